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
"""

from __future__ import annotations

import functools
import inspect
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..functional import linear_cross_entropy
from ..maths import IGNORE_INDEX
from ..options import BACKENDS
from .hf import (
    UnsupportedModel,
    _unwrap,
    decoder_of,
    head_operands,
    hidden_states,
    long_short_step,
    output_head,
    plain_ce_step,
    shift_labels,
)

__all__ = ["patch", "unpatch", "is_patched", "LongShortOutput"]

class _Missing:
    """No instance-level ``forward`` before the patch (survives ``copy.deepcopy`` as itself)."""

    def __deepcopy__(self, memo):
        return self

    def __repr__(self):
        return "<missing>"


_MISSING = _Missing()
# keyword arguments of a causal LM's forward that belong to the loss, not to the decoder
_LOSS_KWARGS = ("labels", "shift_labels", "num_items_in_batch", "ignore_index", "logits_to_keep", "return_dict",
                "fused_lm_head")
# fields of TRL's FusedCausalLMOutput that the no-grad metrics pass can fill
_TRL_FIELDS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


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


try:  # transformers' ModelOutput: dict + attribute access, what Trainer expects from a model
    from transformers.utils import ModelOutput as _ModelOutput
except Exception:  # pragma: no cover - transformers is required by this module's callers anyway
    _ModelOutput = object


@dataclass
class LongShortOutput(_ModelOutput):
    """What a patched model returns for ``lsa_long_short=...``: ``loss = ce + alpha * misalign``."""

    loss: Optional[torch.Tensor] = None
    ce: Optional[torch.Tensor] = None
    misalign: Optional[torch.Tensor] = None


# ---------------------------------------------------------------------------------------------- targets


def _is_trainer(obj) -> bool:
    try:
        from transformers import Trainer
    except Exception:  # pragma: no cover
        return False
    return isinstance(obj, Trainer)


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside DDP/FSDP/compile wrappers and a PEFT model."""
    m = _unwrap(model)
    get_base = getattr(m, "get_base_model", None)
    if callable(get_base) and hasattr(m, "peft_config"):
        m = _unwrap(get_base())
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
            return _long_short_forward(self, _as_kwargs(sig, self, args, kwargs), ls, record.options)
        if not self.training:
            return inner(*args, **kwargs)
        routed = kwargs.pop(_ROUTED, None)  # TRL's head above us, routed here by _route_trl_head
        if routed is not None:
            return _trl_forward(self, _as_kwargs(sig, self, args, kwargs), routed, record.options)
        if kwargs.get("fused_lm_head", False):
            trl = _trl_head_options(inner)
            if trl is not None and _trl_temperature(self, trl) != 1.0:
                return inner(*args, **kwargs)  # TRL's head applies a temperature the fused CE has no argument for
            fields = tuple(trl.get("outputs", ())) if trl is not None else ("log_probs",) + _TRL_FIELDS
            return _trl_forward(self, _as_kwargs(sig, self, args, kwargs), fields, record.options)
        kw = _as_kwargs(sig, self, args, kwargs)
        if kw.get("labels") is None:  # as the model's own forward: no labels, no loss (shift_labels alone neither)
            return inner(*args, **kwargs)
        return _causal_lm_forward(self, kw, record.options)

    return forward


def _trl_head_options(fwd) -> Optional[Dict[str, Any]]:
    """The closure of TRL's ``add_fused_lm_head`` wrapper (temperature, outputs, original_forward), found in
    ``fwd`` or under the wrappers around it (accelerate's autocast / fp32 ones, through ``__wrapped__``), or
    None. Recognised by its code object: TRL ``functools.wraps`` it, so its ``__name__`` and ``__module__``
    are the model's ``forward``'s."""
    fn = getattr(fwd, "__func__", fwd)
    for _ in range(8):
        code = getattr(fn, "__code__", None)
        if code is not None and code.co_name == "_fused_forward" and "/trl/" in code.co_filename.replace("\\", "/"):
            out = {}
            for name, cell in zip(code.co_freevars, getattr(fn, "__closure__", None) or ()):
                try:
                    out[name] = cell.cell_contents
                except ValueError:
                    pass
            return out
        nxt = getattr(fn, "__wrapped__", None)
        if nxt is None:
            return None
        fn = getattr(nxt, "__func__", nxt)
    return None


def _trl_temperature(lm: nn.Module, trl: Dict[str, Any]) -> float:
    """TRL's head temperature; warns once per model when it is not 1 (that head then runs, not the kernels)."""
    t = float(trl.get("temperature", 1.0))
    if t != 1.0 and not lm.__dict__.get(_WARNED_TEMPERATURE):
        lm.__dict__[_WARNED_TEMPERATURE] = True
        warnings.warn(
            f"lsa_kernels patch: TRL's fused LM head on {type(lm).__name__} divides the logits by temperature={t}, "
            "which the fused cross-entropy has no argument for; its calls (fused_lm_head=True) run TRL's own "
            "head, not lsa_kernels (calls without fused_lm_head still do)", stacklevel=3)
    return t


# the forward pre-hook that routes TRL's head calls into the patched forward (its id lives on the model), and the
# keyword argument it adds for that (TRL's head passes unknown keyword arguments on to the forward it wraps)
_HOOK = "_lsa_trl_hook"
_ROUTED = "_lsa_trl_fields"
_WARNED_TEMPERATURE = "_lsa_warned_trl_temperature"


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
    trl = _trl_head_options(current)
    if trl is None:
        return None
    below = trl.get("original_forward")
    if getattr(below, "__func__", None) is not stack[-1].installed.__func__ or _trl_temperature(lm, trl) != 1.0:
        return None
    kwargs = dict(kwargs)
    kwargs["fused_lm_head"] = False
    kwargs[_ROUTED] = tuple(trl.get("outputs", ("log_probs",)))
    return args, kwargs


def _router_logits_requested(lm, kw) -> bool:
    return bool(kw.get("output_router_logits", getattr(lm.config, "output_router_logits", False)))


def _run_decoder(lm: nn.Module, kw: Dict[str, Any]):
    if _router_logits_requested(lm, kw):
        raise UnsupportedModel(
            f"patched {type(lm).__name__}: output_router_logits=True (the MoE load-balancing loss) is not computed "
            "by the fused path; set output_router_logits=False in the config and call"
        )
    for k in _LOSS_KWARGS:
        kw.pop(k, None)
    dec = decoder_of(lm)
    out = dec(**kw)
    h = getattr(out, "last_hidden_state", None)
    return (out[0] if h is None else h), out


def _slice_to_keep(h: torch.Tensor, keep) -> torch.Tensor:
    """transformers' ``slice_logits_to_keep`` (int: the last ``keep`` positions, 0 = all; a 1-D tensor of
    positions; a 2-D tensor of positions per row, or a boolean mask that flattens the kept rows)."""
    if isinstance(keep, int) and keep == 0:
        return h
    try:
        from transformers.modeling_utils import slice_logits_to_keep

        return slice_logits_to_keep(h, keep)
    except ImportError:  # older transformers
        if isinstance(keep, torch.Tensor) and keep.ndim == 2:
            if keep.dtype == torch.bool:
                return h[keep]
            return torch.take_along_dim(h, keep[..., None], dim=1)
        return h[:, slice(-keep, None) if isinstance(keep, int) else keep, :]


def _causal_lm_forward(lm: nn.Module, kw: Dict[str, Any], options: Dict[str, Any]):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    labels, shifted = kw.get("labels"), kw.get("shift_labels")
    nib = kw.get("num_items_in_batch")
    ignore_index = IGNORE_INDEX if kw.get("ignore_index") is None else int(kw["ignore_index"])
    keep = kw.get("logits_to_keep", 0)
    return_dict = kw.get("return_dict")
    h, out = _run_decoder(lm, kw)
    h = _slice_to_keep(h, keep if keep is not None else 0)
    y = shifted if shifted is not None else shift_labels(labels, ignore_index)
    H = h.shape[-1]
    h2, y2 = h.reshape(-1, H), y.reshape(-1).to(h.device)
    if h2.shape[0] != y2.shape[0]:
        raise ValueError(
            f"patched {type(lm).__name__}: {h2.shape[0]} hidden rows (after logits_to_keep) but {y2.shape[0]} "
            f"{'shift_labels' if shifted is not None else 'labels'}; they must match as for the model's own loss"
        )
    head = output_head(lm)
    hh, w, b = head_operands(head, h2)
    kw_ce = dict(linear_bias=b, softcap=head.softcap, ignore_index=ignore_index, backend=options["backend"],
                 chunk_bytes=options["chunk_bytes"])
    if nib is None:
        loss = linear_cross_entropy(hh, w, y2, reduction="mean", **kw_ce)
    else:
        total = linear_cross_entropy(hh, w, y2, reduction="sum", **kw_ce)
        if torch.is_tensor(nib):
            nib = nib.to(total.device)
        loss = total / nib
    result = CausalLMOutputWithPast(
        loss=loss, logits=None, hidden_states=getattr(out, "hidden_states", None),
        attentions=getattr(out, "attentions", None),
    )
    return result.to_tuple() if return_dict is False else result


@torch.no_grad()
def _row_stats(head, h: torch.Tensor, y: torch.Tensor, fields, chunk_bytes: Optional[int]) -> Dict[str, torch.Tensor]:
    """Per-row entropy / log(sum p^2) / mean logit / label-is-argmax of the head's logits for rows ``h [N, H]``,
    ``chunk`` rows at a time (no gradient; at most ``chunk_bytes``, default 64 MiB, of fp32 logits)."""
    N, V = h.shape[0], head.weight.shape[0]
    out = {f: torch.zeros(N, dtype=torch.bool if f == "is_top1" else torch.float32, device=h.device) for f in fields}
    if N == 0 or not fields:
        return out
    rows = max(1, int((chunk_bytes or (64 << 20)) // (4 * V * 3)))
    for s in range(0, N, rows):
        hh, w, b = head_operands(head, h[s : s + rows])
        z = F.linear(hh, w, b).float()
        if head.softcap:
            z = head.softcap * torch.tanh(z / head.softcap)
        logp = torch.log_softmax(z, dim=-1)
        if "entropy" in out:
            out["entropy"][s : s + rows] = -(logp.exp() * logp).sum(-1)
        if "log_sum_sq_probs" in out:
            out["log_sum_sq_probs"][s : s + rows] = torch.logsumexp(2 * logp, dim=-1)
        if "mean_logits" in out:
            out["mean_logits"][s : s + rows] = z.mean(-1)
        if "is_top1" in out:
            out["is_top1"][s : s + rows] = z.argmax(-1) == y[s : s + rows]
        del z, logp
    return out


def _trl_forward(lm: nn.Module, kw: Dict[str, Any], fields, options: Dict[str, Any]):
    """TRL's ``fused_lm_head=True`` contract (``FusedCausalLMOutput``), served by the fused CE."""
    try:
        from trl.trainer.utils import FusedCausalLMOutput as Out
    except Exception:  # TRL absent: same fields in a plain ModelOutput
        Out = _FusedOutput
    labels, shifted, nib = kw.get("labels"), kw.get("shift_labels"), kw.get("num_items_in_batch")
    kw["use_cache"] = False
    h, _ = _run_decoder(lm, kw)
    if shifted is None:
        h, y = h[:, :-1], labels[:, 1:]
    else:
        y = shifted
    y = y.to(h.device)
    mask = y != IGNORE_INDEX
    head = output_head(lm)
    H = h.shape[-1]
    hh, w, b = head_operands(head, h.reshape(-1, H))
    nll = linear_cross_entropy(hh, w, y.reshape(-1), linear_bias=b, softcap=head.softcap, reduction="none",
                               backend=options["backend"], chunk_bytes=options["chunk_bytes"])
    log_probs = (-nll.float()).reshape(mask.shape).masked_fill(~mask, 0.0)
    loss = -log_probs.sum() / (mask.sum().clamp(min=1) if nib is None else nib)
    extra = [f for f in _TRL_FIELDS if f in fields]
    per = {}
    if extra:
        stats = _row_stats(head, h.detach()[mask], y[mask], extra, options["chunk_bytes"])
        for f, v in stats.items():
            full = torch.zeros(mask.shape, dtype=v.dtype, device=v.device)
            full[mask] = v
            per[f] = full
    return Out(loss=loss, log_probs=log_probs, label_mask=mask, **per)


@dataclass
class _FusedOutput(_ModelOutput):
    loss: Optional[torch.Tensor] = None
    log_probs: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    log_sum_sq_probs: Optional[torch.Tensor] = None
    mean_logits: Optional[torch.Tensor] = None
    is_top1: Optional[torch.Tensor] = None
    label_mask: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None


def _long_short_forward(lm: nn.Module, kw: Dict[str, Any], spec: Dict[str, Any], options: Dict[str, Any]):
    """``input_ids`` = windows ``[B, l_train + l_extra + 1]``; ``spec``: ``l_extra``, ``alpha``, ``divergence``,
    ``temperature``, ``detach``, ``positions`` (see :class:`lsa_kernels.integrations.trainer.LongShortTrainer`)."""
    window = kw.get("input_ids")
    if window is None:
        raise ValueError("lsa_long_short: input_ids (the token windows) is required")
    extra = set(k for k, v in kw.items() if v is not None) - {"input_ids", "use_cache", "return_dict", "attention_mask"}
    if extra:
        raise ValueError(f"lsa_long_short: unexpected arguments {sorted(extra)} (the windows are unpadded token ids)")
    spec = dict(spec)
    l_extra, alpha = int(spec.pop("l_extra")), float(spec.pop("alpha", 0.1))
    divergence = spec.pop("divergence", "sce")
    if alpha == 0:  # the baseline: CE on the long view window[:, :l_train + 1] (hf.plain_ce_step)
        res = plain_ce_step(lm, window, l_extra, backend=options["backend"], chunk_bytes=options["chunk_bytes"])
        return LongShortOutput(loss=res.loss, ce=res.ce, misalign=res.misalign)
    res = long_short_step(lm, window, l_extra, alpha=alpha, divergence=divergence, backend=options["backend"],
                          chunk_bytes=options["chunk_bytes"], **spec)
    return LongShortOutput(loss=res.loss, ce=res.ce, misalign=res.misalign)
