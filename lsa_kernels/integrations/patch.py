"""``hf.patch(model)``: the fused losses behind an unchanged ``model(input_ids, labels=labels)`` call.

After ``patch(model)`` the model's ``forward`` (of this instance only: no class is touched) is a wrapper:

* training mode with ``labels`` (targets: ``shift_labels`` when also given): the decoder runs as the
  model's own forward would run it (same ``attention_mask``, ``position_ids``, packed-sequence and
  attention kwargs), its final hidden states go through :func:`lsa_kernels.functional.linear_cross_entropy`
  against the model's output head (:func:`lsa_kernels.integrations.hf.output_head`: scale and softcap from
  the config, checked once against the model's own logits), and the result is
  ``CausalLMOutputWithPast(loss=loss, logits=None)``. No
  ``[B, T, V]`` tensor exists in forward or backward. The loss is transformers' ``ForCausalLMLoss``:
  ``labels`` shifted (``shift_labels`` taken as they are), ``ignore_index`` rows skipped, the mean over
  valid rows, or the sum divided by ``num_items_in_batch`` when the Trainer passes it (its gradient
  accumulation normalisation). ``logits_to_keep`` selects the hidden rows exactly as the model does before
  its head.
* eval mode, or no labels: the model's own forward (generation, evaluation with logits: unchanged).
* ``fused_lm_head=True`` in training mode (what TRL's ``SFTTrainer.compute_loss`` passes, see :func:`patch`):
  TRL's ``FusedCausalLMOutput`` with ``log_probs`` from the fused CE (``reduction="none"``) and the metrics
  fields TRL's head was built for (``entropy``, ``is_top1``, ...) from one extra no-grad pass over the valid
  rows in chunks of rows. When TRL's head (``add_fused_lm_head``, installed by ``SFTTrainer(...)``) wraps the
  patched forward — the model was patched before the trainer was built — a forward pre-hook sends those
  calls through the patched forward too. A TRL head with a temperature other than 1 keeps TRL's own pass
  (the fused CE has no temperature), with a warning, once.
* ``lsa_long_short={...}`` (what :class:`lsa_kernels.integrations.trainer.LongShortTrainer` passes): the
  long-short loss of the token windows in ``input_ids`` (:func:`lsa_kernels.integrations.hf.long_short_step`),
  returned as :class:`LongShortOutput` (``loss``, ``ce``, ``misalign``). Going through ``model(...)`` keeps
  DDP/FSDP/accelerate wrappers in the call.

``unpatch(model)`` puts back exactly what the instance had (its own ``forward`` attribute, or none).
This module installs and removes the wrapper and routes each call; what each branch computes is
:mod:`lsa_kernels.integrations.patched_forward`.
"""

from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch.nn as nn

from ..options import BACKENDS
from .decoder import UnsupportedModel, decoder_of, unwrap
from .hf import output_head
from .patched_forward import (
    TRL_FIELDS,
    LongShortOutput,
    causal_lm_forward,
    long_short_forward,
    trl_forward,
    trl_head_options,
    trl_temperature,
)

__all__ = ["patch", "unpatch", "is_patched", "LongShortOutput"]

class _Missing:
    """No instance-level ``forward`` before the patch (survives ``copy.deepcopy`` as itself)."""

    def __deepcopy__(self, memo):
        return self

    def __repr__(self):
        return "<missing>"


_MISSING = _Missing()


@dataclass
class _Patch:
    previous: Any  # the instance's own ``forward`` attribute before patching, or _MISSING
    installed: Any  # the bound method we installed
    options: Dict[str, Any] = field(default_factory=dict)


# the patches of a model live on the model (a list in its __dict__, removed by the last unpatch): a global
# registry would hold the model alive through the bound methods it keeps
_STACK = "_lsa_patches"


def _stack(lm: nn.Module) -> List[_Patch]:
    return lm.__dict__.get(_STACK) or []


# ---------------------------------------------------------------------------------------------- targets


def _is_trainer(obj) -> bool:
    try:
        from transformers import Trainer
    except Exception:  # pragma: no cover
        return False
    return isinstance(obj, Trainer)


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside DDP/FSDP/compile wrappers and a PEFT model."""
    m = unwrap(model)
    get_base = getattr(m, "get_base_model", None)
    if callable(get_base) and hasattr(m, "peft_config"):
        m = unwrap(get_base())
    return m


def _check_supported(lm: nn.Module) -> None:
    if not isinstance(lm, nn.Module):
        raise TypeError(f"patch(model): expected a torch.nn.Module (a transformers causal LM), got {type(lm).__name__}")
    lf = getattr(type(lm), "loss_function", None)
    if lf is not None:
        try:
            fn = lm.loss_function
        except Exception:
            fn = None
        name = getattr(fn, "__name__", type(fn).__name__)
        if fn is not None and name != "ForCausalLMLoss":
            raise UnsupportedModel(
                f"patch(model): {type(lm).__name__}.loss_function is {name}, not transformers' ForCausalLMLoss "
                "(config.loss_type or a custom loss); the fused loss would not be the model's loss"
            )
    if decoder_of(lm) is None:
        raise UnsupportedModel(
            f"patch(model): {type(lm).__name__} has no decoder (get_decoder()/base_model) that returns the final "
            "hidden states; lsa_kernels needs a transformers causal LM"
        )
    output_head(lm)  # raises UnsupportedModel (no linear head, or it does not reproduce the model's logits)


def _check_options(backend, chunk_bytes) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"patch(backend=...): expected one of {BACKENDS}, got {backend!r}")
    bad = isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0
    if chunk_bytes is not None and bad:
        raise ValueError(f"patch(chunk_bytes=...): expected a positive int or None, got {chunk_bytes!r}")


# ---------------------------------------------------------------------------------------------- public


def patch(model, *, backend: str = "auto", chunk_bytes: Optional[int] = None):
    """Make ``model(..., labels=...)`` compute the fused loss in training mode; returns ``model``.

    ``model``: a transformers causal LM, that model inside a PEFT ``PeftModel`` (the base model is patched,
    so the LoRA layers stay in the computation), inside DDP/``torch.compile``, or a ``transformers.Trainer``
    (its ``model``). Raises :class:`~lsa_kernels.integrations.hf.UnsupportedModel` with the reason when the
    adapter cannot reproduce the model's own logits or loss.

    ``backend`` and ``chunk_bytes`` go to the fused ops (``"auto"``: Triton on CUDA, the cpu backend
    elsewhere; ``chunk_bytes`` bounds the logits the cpu backend holds at once).

    TRL's ``SFTTrainer`` installs its own chunked LM head on the model when it is built (on top of whatever
    ``forward`` the model has) and calls it with ``fused_lm_head=True``; either order works: patched before
    ``SFTTrainer(...)``, a forward pre-hook that the patch registers routes TRL's calls into the patched
    forward; patched after (``hf.patch(trainer)``), the patch sits on top of TRL's head. Patching a patched
    model whose ``forward`` is still ours only updates the options.
    """
    _check_options(backend, chunk_bytes)
    if _is_trainer(model):
        patch(model.model, backend=backend, chunk_bytes=chunk_bytes)
        return model
    lm = _causal_lm(model)
    _check_supported(lm)
    opts = {"backend": backend, "chunk_bytes": chunk_bytes}
    stack = _stack(lm)
    if stack and lm.__dict__.get("forward", _MISSING) is stack[-1].installed:
        stack[-1].options.update(opts)
        return model
    previous = lm.__dict__.get("forward", _MISSING)
    record = _Patch(previous, None, opts)
    record.installed = types.MethodType(_make_forward(type(lm).forward), lm)
    lm.forward = record.installed
    lm.__dict__[_STACK] = stack + [record]
    if _HOOK not in lm.__dict__:
        lm.__dict__[_HOOK] = lm.register_forward_pre_hook(_route_trl_head, with_kwargs=True).id
    return model


def unpatch(model):
    """Undo the last :func:`patch` of ``model`` (or of a Trainer's model); returns ``model``.

    Restores exactly what the instance held before (its own ``forward`` attribute, or none, so that the
    class's ``forward`` shows through). Raises ``RuntimeError`` if something wrapped ``forward`` again after
    the patch (unpatching would drop that wrapper), ``ValueError`` if the model is not patched.
    """
    if _is_trainer(model):
        unpatch(model.model)
        return model
    lm = _causal_lm(model)
    stack = _stack(lm)
    if not stack:
        raise ValueError(f"unpatch(model): {type(lm).__name__} is not patched")
    top = stack[-1]
    current = lm.__dict__.get("forward", _MISSING)
    if current is not top.installed:
        raise RuntimeError(
            f"unpatch(model): {type(lm).__name__}.forward was wrapped again after patch() (now "
            f"{getattr(current, '__qualname__', current)!r}); remove that wrapper first"
        )
    if top.previous is _MISSING:
        del lm.forward
    else:
        lm.forward = top.previous
    if len(stack) > 1:
        lm.__dict__[_STACK] = stack[:-1]
    else:
        del lm.__dict__[_STACK]
        hook_id = lm.__dict__.pop(_HOOK, None)  # by id, not handle: a deepcopy of the model holds its own hooks
        lm._forward_pre_hooks.pop(hook_id, None)
        lm._forward_pre_hooks_with_kwargs.pop(hook_id, None)
    return model


def is_patched(model) -> bool:
    """Whether ``model`` (or the causal LM inside it) currently runs a patched ``forward``."""
    if _is_trainer(model):
        model = model.model
    lm = _causal_lm(model)
    stack = _stack(lm)
    return bool(stack) and lm.__dict__.get("forward", _MISSING) is stack[-1].installed


# ---------------------------------------------------------------------------------------------- forward


def _as_kwargs(sig: Optional[inspect.Signature], self, args, kwargs) -> Dict[str, Any]:
    if not args:
        return dict(kwargs)
    if sig is None:
        raise TypeError("patched forward: pass the arguments by name")
    bound = sig.bind_partial(self, *args).arguments
    out = {}
    for name, value in bound.items():
        p = sig.parameters[name]
        if p.kind == inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif p.kind != inspect.Parameter.VAR_POSITIONAL:
            out[name] = value
    out.pop(next(iter(sig.parameters)), None)  # self
    out.update(kwargs)
    return out


def _record_of(model: nn.Module, fn) -> _Patch:
    for rec in reversed(_stack(model)):
        if getattr(rec.installed, "__func__", None) is fn:
            return rec
    raise RuntimeError(f"patched forward called on a {type(model).__name__} that does not hold this patch")


def _make_forward(class_forward):
    """The patched forward. What it wraps (``inner``) and its options are looked up on the model at each
    call, not captured here: a ``copy.deepcopy`` of a patched model then runs its own weights."""
    try:
        sig = inspect.signature(class_forward)
    except (TypeError, ValueError):  # pragma: no cover
        sig = None

    @functools.wraps(class_forward)  # keeps the signature: Trainer and generate() inspect it
    def forward(self, *args, **kwargs):
        record = _record_of(self, forward)
        # the instance's own forward before the patch (e.g. TRL's head), else the class's
        inner = types.MethodType(class_forward, self) if record.previous is _MISSING else record.previous
        ls = kwargs.pop("lsa_long_short", None)
        if ls is not None:
            return long_short_forward(self, _as_kwargs(sig, self, args, kwargs), ls, record.options)
        if not self.training:
            return inner(*args, **kwargs)
        routed = kwargs.pop(_ROUTED, None)  # TRL's head above us, routed here by _route_trl_head
        if routed is not None:
            return trl_forward(self, _as_kwargs(sig, self, args, kwargs), routed, record.options)
        if kwargs.get("fused_lm_head", False):
            trl = trl_head_options(inner)
            if trl is not None and trl_temperature(self, trl) != 1.0:
                return inner(*args, **kwargs)  # TRL's head applies a temperature the fused CE has no argument for
            fields = tuple(trl.get("outputs", ())) if trl is not None else ("log_probs",) + TRL_FIELDS
            return trl_forward(self, _as_kwargs(sig, self, args, kwargs), fields, record.options)
        kw = _as_kwargs(sig, self, args, kwargs)
        if kw.get("labels") is None:  # as the model's own forward: no labels, no loss (shift_labels alone neither)
            return inner(*args, **kwargs)
        return causal_lm_forward(self, kw, record.options)

    return forward


# the forward pre-hook that routes TRL's head calls into the patched forward (its id lives on the model), and the
# keyword argument it adds for that (TRL's head passes unknown keyword arguments on to the forward it wraps)
_HOOK = "_lsa_trl_hook"
_ROUTED = "_lsa_trl_fields"


def _route_trl_head(lm: nn.Module, args, kwargs):
    """Forward pre-hook of a patched model: when TRL's fused LM head was added on top of the patched forward
    (the model was patched before ``SFTTrainer(...)``) and is called with ``fused_lm_head=True`` in training
    mode, the call is turned into TRL's plain path (``fused_lm_head=False``: TRL then calls the forward it wraps,
    ours, with ``labels`` / ``shift_labels`` / ``num_items_in_batch``) plus the fields TRL's head computes, so
    that the patched forward returns TRL's ``FusedCausalLMOutput`` from the fused kernels."""
    if not kwargs.get("fused_lm_head", False) or not lm.training:
        return None
    stack = _stack(lm)
    current = lm.__dict__.get("forward", _MISSING)
    if not stack or current is stack[-1].installed:
        return None  # not patched, or ours on top (handled in the patched forward)
    trl = trl_head_options(current)
    if trl is None:
        return None
    below = trl.get("original_forward")
    if getattr(below, "__func__", None) is not stack[-1].installed.__func__ or trl_temperature(lm, trl) != 1.0:
        return None
    kwargs = dict(kwargs)
    kwargs["fused_lm_head"] = False
    kwargs[_ROUTED] = tuple(trl.get("outputs", ("log_probs",)))
    return args, kwargs
