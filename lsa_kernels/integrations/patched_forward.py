"""What a patched model's ``forward`` computes (:mod:`lsa_kernels.integrations.patch` installs it and picks one):

* :func:`causal_lm_forward`: transformers' ``ForCausalLMLoss`` through the fused CE
  (``CausalLMOutputWithPast(loss=..., logits=None)``);
* :func:`trl_forward`: TRL's ``fused_lm_head=True`` contract (``FusedCausalLMOutput``: ``log_probs`` and the
  metrics fields from one no-grad pass over the valid rows); :func:`trl_head_options` / :func:`trl_temperature`
  recognise TRL's head and its temperature;
* :func:`long_short_forward`: the long-short loss of token windows for ``lsa_long_short={...}``
  (:class:`LongShortOutput`; at ``alpha = 0`` the plain-CE baseline :func:`~lsa_kernels.integrations.hf.plain_ce_step`).

Each takes the model, the call's keyword arguments and the patch's options (``backend``, ``chunk_bytes``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..functional import linear_cross_entropy
from ..maths import IGNORE_INDEX
from .decoder import UnsupportedModel, decoder_of
from .hf import head_operands, long_short_step, output_head, plain_ce_step, shift_labels

__all__ = ["LongShortOutput", "TRL_FIELDS", "causal_lm_forward", "trl_forward", "long_short_forward",
           "trl_head_options", "trl_temperature"]

# keyword arguments of a causal LM's forward that belong to the loss, not to the decoder
_LOSS_KWARGS = ("labels", "shift_labels", "num_items_in_batch", "ignore_index", "logits_to_keep", "return_dict",
                "fused_lm_head")
# fields of TRL's FusedCausalLMOutput that the no-grad metrics pass can fill
TRL_FIELDS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# set on a model once its TRL head's temperature was warned about
_WARNED_TEMPERATURE = "_lsa_warned_trl_temperature"

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



def trl_head_options(fwd) -> Optional[Dict[str, Any]]:
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


def trl_temperature(lm: nn.Module, trl: Dict[str, Any]) -> float:
    """TRL's head temperature; warns once per model when it is not 1 (that head then runs, not the kernels)."""
    t = float(trl.get("temperature", 1.0))
    if t != 1.0 and not lm.__dict__.get(_WARNED_TEMPERATURE):
        lm.__dict__[_WARNED_TEMPERATURE] = True
        warnings.warn(
            f"lsa_kernels patch: TRL's fused LM head on {type(lm).__name__} divides the logits by temperature={t}, "
            "which the fused cross-entropy has no argument for; its calls (fused_lm_head=True) run TRL's own "
            "head, not lsa_kernels (calls without fused_lm_head still do)", stacklevel=3)
    return t


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


def causal_lm_forward(lm: nn.Module, kw: Dict[str, Any], options: Dict[str, Any]):
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


def trl_forward(lm: nn.Module, kw: Dict[str, Any], fields, options: Dict[str, Any]):
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
    extra = [f for f in TRL_FIELDS if f in fields]
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


def long_short_forward(lm: nn.Module, kw: Dict[str, Any], spec: Dict[str, Any], options: Dict[str, Any]):
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
