"""Plain-torch maths on materialised logits: the ground truth every backend is tested against.

Nothing here is fused or clever: logits ``z = x W^T + b`` are formed in the input dtype (as torch
would), promoted to fp32, softcapped, and fed to ``log_softmax``. Gradients come from autograd.
To get an fp32 "truth" for low-precision inputs, call these with ``.double()`` or ``.float()``
copies of the inputs (docs/maths.md §7, CCE's rule).

Signatures match the public functions in :mod:`lsa_kernels.functional` (``backend`` is accepted and
ignored), so a test can swap one for the other.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import _checks
from .pairing import LongShortLoss, pair_mask, sample_l_extra  # noqa: F401  (re-exported)

__all__ = [
    "logits",
    "cross_entropy_from_logits",
    "divergence_from_logits",
    "linear_cross_entropy",
    "linear_divergence",
    "long_short_loss",
    "sample_l_extra",
    "LongShortLoss",
]


def logits(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], softcap: Optional[float]) -> torch.Tensor:
    """``softcap(x W^T + b)`` in fp32 (at least); the matmul runs in the input dtype like torch's."""
    z = F.linear(x, w, b)
    z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    if softcap is not None and softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    return z


def cross_entropy_from_logits(
    z: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Per-row loss ``[N]`` of docs/maths.md §3 (0 on ignored rows)."""
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    lse = torch.logsumexp(z, dim=-1)
    zy = z.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    loss = (1.0 - label_smoothing) * (lse - zy)
    if label_smoothing > 0:
        loss = loss + label_smoothing * (lse - z.mean(dim=-1))
    if z_loss > 0:
        loss = loss + z_loss * lse * lse
    return torch.where(valid, loss, torch.zeros_like(loss))


def divergence_from_logits(
    a: torch.Tensor, b: torch.Tensor, divergence: str = "sce", temperature: float = 1.0
) -> torch.Tensor:
    """Per-row divergence ``D(softmax(a/τ), softmax(b/τ))`` of docs/maths.md §5, shape ``a.shape[:-1]``."""
    la = torch.log_softmax(a / temperature, dim=-1)
    lb = torch.log_softmax(b / temperature, dim=-1)
    p, q = la.exp(), lb.exp()
    if divergence == "sce":
        return -(p * lb).sum(-1) - (q * la).sum(-1)
    if divergence == "kl":
        return (p * (la - lb)).sum(-1)
    if divergence == "kl_reverse":
        return (q * (lb - la)).sum(-1)
    if divergence == "sym_kl":
        return ((p - q) * (la - lb)).sum(-1)
    if divergence == "js":
        lm = torch.logaddexp(la, lb) - math.log(2.0)
        return 0.5 * (p * (la - lm)).sum(-1) + 0.5 * (q * (lb - lm)).sum(-1)
    raise ValueError(f"unknown divergence {divergence!r}")


def _reduce(per_row: torch.Tensor, selected: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    return total / selected.sum().clamp(min=1)


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    backend: str = "reference",
    check_targets: bool = True,
) -> torch.Tensor:
    """Reference for :func:`lsa_kernels.linear_cross_entropy` (docs/maths.md §3)."""
    _checks.check_ce(input, linear_weight, target, linear_bias, reduction, ignore_index, label_smoothing, z_loss,
                     softcap, check_values=check_targets)
    x = input.reshape(-1, input.shape[-1])
    y = target.reshape(-1)
    z = logits(x, linear_weight, linear_bias, softcap)
    per_row = cross_entropy_from_logits(
        z, y, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss
    )
    out = _reduce(per_row, y != ignore_index, reduction)
    if reduction == "none":
        out = out.reshape(target.shape)
    return out.to(input.dtype)


def linear_divergence(
    input_p: torch.Tensor,
    input_q: torch.Tensor,
    linear_weight: torch.Tensor,
    *,
    linear_bias: Optional[torch.Tensor] = None,
    divergence: str = "sce",
    temperature: float = 1.0,
    detach: Optional[str] = None,
    reduction: str = "mean",
    mask: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    backend: str = "reference",
) -> torch.Tensor:
    """Reference for :func:`lsa_kernels.linear_divergence` (docs/maths.md §5)."""
    _checks.check_divergence(
        input_p, input_q, linear_weight, linear_bias, divergence, temperature, detach, reduction, mask, softcap
    )
    H = input_p.shape[-1]
    xp, xq = input_p.reshape(-1, H), input_q.reshape(-1, H)
    a = logits(xp, linear_weight, linear_bias, softcap)
    b = logits(xq, linear_weight, linear_bias, softcap)
    if detach == "p":
        a = a.detach()
    elif detach == "q":
        b = b.detach()
    per_row = divergence_from_logits(a, b, divergence, temperature)
    sel = torch.ones_like(per_row, dtype=torch.bool) if mask is None else mask.reshape(-1)
    per_row = torch.where(sel, per_row, torch.zeros_like(per_row))
    out = _reduce(per_row, sel, reduction)
    if reduction == "none":
        out = out.reshape(input_p.shape[:-1])
    return out.to(input_p.dtype)


def long_short_loss(
    hidden_long: torch.Tensor,
    hidden_short: torch.Tensor,
    linear_weight: torch.Tensor,
    labels_long: torch.Tensor,
    labels_short: torch.Tensor,
    *,
    l_extra: int,
    alpha: float = 0.1,
    divergence: str = "sce",
    temperature: float = 1.0,
    detach: Optional[str] = None,
    positions: str = "overlap",
    ignore_index: int = -100,
    linear_bias: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    backend: str = "reference",
    check_targets: bool = True,
) -> LongShortLoss:
    """Reference for :func:`lsa_kernels.long_short_loss` (docs/maths.md §4): CE of both views + α·divergence."""
    _checks.check_long_short(
        hidden_long, hidden_short, linear_weight, labels_long, labels_short, l_extra, alpha, divergence,
        temperature, detach, positions, ignore_index, linear_bias, softcap, label_smoothing, z_loss,
        check_values=check_targets,
    )
    B, T, H = hidden_long.shape
    zl = logits(hidden_long.reshape(-1, H), linear_weight, linear_bias, softcap)
    zs = logits(hidden_short.reshape(-1, H), linear_weight, linear_bias, softcap)
    yl, ys = labels_long.reshape(-1), labels_short.reshape(-1)
    ce_kw = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss)
    ce_rows = torch.cat([cross_entropy_from_logits(zl, yl, **ce_kw), cross_entropy_from_logits(zs, ys, **ce_kw)])
    n_valid = (yl != ignore_index).sum() + (ys != ignore_index).sum()
    ce = ce_rows.sum() / n_valid.clamp(min=1)

    V = zl.shape[-1]
    a = zl.reshape(B, T, V)[:, l_extra:]
    b = zs.reshape(B, T, V)[:, : T - l_extra]
    if detach == "long":
        a = a.detach()
    elif detach == "short":
        b = b.detach()
    sel = pair_mask(labels_long, labels_short, l_extra, positions, ignore_index)
    div = divergence_from_logits(a, b, divergence, temperature)
    div = torch.where(sel, div, torch.zeros_like(div))
    misalign = div.sum() / sel.sum().clamp(min=1)
    dt = hidden_long.dtype
    return LongShortLoss((ce + alpha * misalign).to(dt), ce.to(dt), misalign.to(dt))
