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
from .options import CrossEntropyArgs, DivergenceArgs, LongShortArgs
from .outputs import CrossEntropyOutput, LongShortLoss, LongShortLossOutput, PerToken  # noqa: F401  (re-exported)
from .pairing import pair_mask, sample_l_extra  # noqa: F401  (re-exported)

__all__ = [
    "logits",
    "cross_entropy_from_logits",
    "divergence_from_logits",
    "weighted_cross_entropy_from_logits",
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


def _reduce(per_row: torch.Tensor, selected: torch.Tensor, reduction: str, weight: Optional[torch.Tensor] = None,
            den: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reduce per-row values: ``none`` ``w·ℓ``, ``sum`` ``Σ w·ℓ``, ``mean`` ``Σ w·ℓ / Σ den`` over selected rows
    (``den`` = w by default; 0 when that total is 0). ``weight`` None: 1 (docs/maths.md §3, §11)."""
    per_row = torch.where(selected, per_row, torch.zeros_like(per_row))
    if weight is not None:
        per_row = per_row * weight.to(per_row.dtype)
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    d = selected.to(per_row.dtype) if weight is None else weight.to(per_row.dtype) * selected
    if den is not None:
        d = den.to(per_row.dtype) * selected
    d = d.sum()
    return torch.where(d > 0, total / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(total))


def weighted_cross_entropy_from_logits(
    z: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Per-row loss ``[N]`` with class weights and/or probability targets (docs/maths.md §11; torch's
    ``F.cross_entropy`` definitions), from ``log_softmax``; z-loss times the row's class weight (index targets)."""
    lp = torch.log_softmax(z, dim=-1)
    lse = torch.logsumexp(z, dim=-1)
    V = z.shape[-1]
    c = torch.ones(V, dtype=z.dtype, device=z.device) if weight is None else weight.to(z.dtype)
    eps = label_smoothing
    if target.is_floating_point():
        t = (1.0 - eps) * target.to(z.dtype) + eps / V
        return -(t * c * lp).sum(-1) + z_loss * lse * lse
    valid = target != ignore_index
    ys = torch.where(valid, target, torch.zeros_like(target))
    cy = c[ys]
    loss = (1.0 - eps) * cy * -lp.gather(-1, ys.unsqueeze(-1)).squeeze(-1)
    loss = loss + (eps / V) * -(lp * c).sum(-1) + z_loss * cy * lse * lse
    return torch.where(valid, loss, torch.zeros_like(loss))


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    token_weight: Optional[torch.Tensor] = None,
    backend: str = "reference",
    check_targets: bool = True,
    return_lse: bool = False,
    return_entropy: bool = False,
    return_accuracy: bool = False,
):
    """Reference for :func:`lsa_kernels.linear_cross_entropy` (docs/maths.md §3, §11), per-token outputs included
    (from the materialised logits: logsumexp, −Σ p log p, argmax)."""
    opts = CrossEntropyArgs(reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
                            z_loss=z_loss, softcap=softcap, check_targets=check_targets)
    prob = _checks.check_ce(input, linear_weight, target, opts, bias=linear_bias, weight=weight,
                            token_weight=token_weight)
    ignore_index = opts.ignore
    V = linear_weight.shape[0]
    x = input.reshape(-1, input.shape[-1])
    z = logits(x, linear_weight, linear_bias, softcap)
    tw = None if token_weight is None else token_weight.reshape(-1)
    if prob:
        t = target.reshape(-1, V)
        per_row = weighted_cross_entropy_from_logits(z, t, weight=weight, label_smoothing=label_smoothing,
                                                     z_loss=z_loss)
        out = _reduce(per_row, torch.ones_like(per_row, dtype=torch.bool), reduction, tw)
    else:
        y = target.reshape(-1)
        valid = y != ignore_index
        if weight is None:
            per_row = cross_entropy_from_logits(
                z, y, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss
            )
            den = tw
        else:
            per_row = weighted_cross_entropy_from_logits(z, y, weight=weight, ignore_index=ignore_index,
                                                         label_smoothing=label_smoothing, z_loss=z_loss)
            cy = weight.to(z.dtype)[torch.where(valid, y, torch.zeros_like(y))]
            den = cy if tw is None else cy * tw.to(z.dtype)
        out = _reduce(per_row, valid, reduction, tw, den)
    if reduction == "none":
        out = out.reshape(input.shape[:-1])
    out = out.to(input.dtype)
    if not (return_lse or return_entropy or return_accuracy):
        return out
    rows = input.shape[:-1]
    lse = torch.logsumexp(z, -1).detach().to(input.dtype).reshape(rows) if return_lse else None
    lp = torch.log_softmax(z, -1)
    ent = -(lp.exp() * lp).sum(-1).to(input.dtype).reshape(rows) if return_entropy else None
    acc = None
    if return_accuracy:
        y = target.reshape(-1)
        acc = ((z.argmax(-1) == y) & (y != ignore_index)).reshape(rows)
    return CrossEntropyOutput(out, lse, ent, acc)


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
    token_weight: Optional[torch.Tensor] = None,
    backend: str = "reference",
) -> torch.Tensor:
    """Reference for :func:`lsa_kernels.linear_divergence` (docs/maths.md §5, §11)."""
    opts = DivergenceArgs(divergence=divergence, temperature=temperature, detach=detach, reduction=reduction,
                          softcap=softcap)
    _checks.check_divergence(input_p, input_q, linear_weight, opts, bias=linear_bias, mask=mask,
                             token_weight=token_weight)
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
    out = _reduce(per_row, sel, reduction, None if token_weight is None else token_weight.reshape(-1))
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
    token_weight_long: Optional[torch.Tensor] = None,
    token_weight_short: Optional[torch.Tensor] = None,
    ce_weighting: str = "none",
    longce_gamma: float = 5.0,
    return_lse: bool = False,
    return_entropy: bool = False,
    return_accuracy: bool = False,
):
    """Reference for :func:`lsa_kernels.long_short_loss` (docs/maths.md §4): CE of both views + α·divergence;
    token weights (§11) and LongCE (§13) from the materialised logits; the per-view outputs (§4: logsumexp,
    −Σ p log p, argmax of each view's z at temperature 1) as a LongShortLossOutput when asked."""
    opts = LongShortArgs(l_extra=l_extra, alpha=alpha, divergence=divergence, temperature=temperature,
                         detach=detach, positions=positions, ignore_index=ignore_index, softcap=softcap,
                         label_smoothing=label_smoothing, z_loss=z_loss, ce_weighting=ce_weighting,
                         longce_gamma=longce_gamma, check_targets=check_targets)
    _checks.check_long_short(hidden_long, hidden_short, linear_weight, labels_long, labels_short, opts,
                             bias=linear_bias, token_weight_long=token_weight_long,
                             token_weight_short=token_weight_short)
    B, T, H = hidden_long.shape
    zl = logits(hidden_long.reshape(-1, H), linear_weight, linear_bias, softcap)
    zs = logits(hidden_short.reshape(-1, H), linear_weight, linear_bias, softcap)
    yl, ys = labels_long.reshape(-1), labels_short.reshape(-1)
    ce_kw = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss)
    ce_l = cross_entropy_from_logits(zl, yl, **ce_kw).reshape(B, T)
    ce_s = cross_entropy_from_logits(zs, ys, **ce_kw).reshape(B, T)
    vl, vs = labels_long != ignore_index, labels_short != ignore_index
    ones = torch.ones(B, T, dtype=ce_l.dtype, device=ce_l.device)
    wl = ones if token_weight_long is None else token_weight_long.to(ce_l.dtype)
    ws = ones if token_weight_short is None else token_weight_short.to(ce_l.dtype)
    f = ones.clone()
    if ce_weighting == "longce":  # §13: long row t = l_extra + i pairs with short row i
        both = vl[:, l_extra:] & vs[:, : T - l_extra]
        lsd = (ce_s[:, : T - l_extra] - ce_l[:, l_extra:]).detach()
        f[:, l_extra:] = torch.where(both, torch.clamp(torch.exp(lsd), max=longce_gamma), ones[:, l_extra:])
    num = (ce_l * wl * f * vl).sum() + (ce_s * ws * vs).sum()
    den = (wl * vl).sum() + (ws * vs).sum()
    ce = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))

    V = zl.shape[-1]
    a = zl.reshape(B, T, V)[:, l_extra:]
    b = zs.reshape(B, T, V)[:, : T - l_extra]
    if detach == "long":
        a = a.detach()
    elif detach == "short":
        b = b.detach()
    sel = pair_mask(labels_long, labels_short, l_extra, positions, ignore_index)
    div = divergence_from_logits(a, b, divergence, temperature)
    misalign = _reduce(div.reshape(-1), sel.reshape(-1), "mean", wl[:, l_extra:].reshape(-1))
    dt = hidden_long.dtype
    result = LongShortLoss((ce + alpha * misalign).to(dt), ce.to(dt), misalign.to(dt))
    if not (return_lse or return_entropy or return_accuracy):
        return result

    def view(z: torch.Tensor, y: torch.Tensor) -> PerToken:
        lse = torch.logsumexp(z, -1).detach().to(dt).reshape(B, T) if return_lse else None
        lp = torch.log_softmax(z, -1)
        ent = -(lp.exp() * lp).sum(-1).to(dt).reshape(B, T) if return_entropy else None
        acc = ((z.argmax(-1) == y) & (y != ignore_index)).reshape(B, T) if return_accuracy else None
        return PerToken(lse, ent, acc)

    return LongShortLossOutput(*result, view(zl, yl), view(zs, ys))
