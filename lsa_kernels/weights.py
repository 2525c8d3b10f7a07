"""Class weights with label smoothing, and probability targets (docs/maths.md §11): the coefficients of the
dense-target row loss, computed IN the CE pass over the vocabulary by a backend's ``ce_dense_*`` ops.

Every such row loss has the form

    ℓ_i = A_i·lse_i + λ·ω_i·lse_i² − Σ_v T_iv z_iv,      A_i = Σ_v T_iv,      z = softcap(x Wᵀ + b)

with T the row's target mass over the classes (c: class weights, 1 without; ε: label smoothing):

    index target y, class weights, ε:     T = (1−ε)·c_y·onehot(y) + (ε/V)·c,   A = (1−ε)c_y + (ε/V)Σ_v c_v,  ω = c_y
    probability target t, ε (torch mixes t ← (1−ε)t + ε/V), c:  T = t ⊙ c (mixed),  A = Σ_v T_v,  ω = 1

(with c = 1, ε = 0 the first is the plain CE; torch's ``F.cross_entropy`` definitions), i.e. the backends'
:class:`~lsa_kernels.backends.contract.DenseTarget` ``T = κ·t⊙c + β·c + α·onehot(y)`` with κ = 1−ε (probability
targets; 0 for index targets), β = ε/V, α_i = (1−ε)·c_{y_i} (index targets). The backend reads the row's t
and c tiles next to the logits tile and returns per row lse, Σ t c z, Σ t c, Σ c z and z_y (one pass, any
softcap); this module forms A, the row loss and the reduction, and the gradient

    ∂ℓ/∂z_v = (A + 2λω·lse)·p_v − T_v      (times softcap'),      ∂ℓ/∂t_v = κ·c_v·(lse − z_v)

goes back through the backend's ``ce_dense_backward`` (the lse coefficient ``coef·(A + 2λω·lse)`` per row)
or, for ``mean``/``sum`` with a backend that has ``fused_forward_backward``, is formed in the forward pass
(``ce_dense_forward_backward``): one pass over the logits and no GEMM on t. A probability target that
requires grad gets ``dt`` (fp32 ``[N, V]``, the output the user asked for) from the same pass; class weights
take no gradient. No other ``[N, V]`` buffer: t is read chunk by chunk (cpu) or tile by tile (triton).

Vocab-parallel head (docs/maths.md §15; ``shard=``, ``backend`` the VocabParallel wrapper): the wrapper
slices t's and c's columns, its merge sums Σ t c z, Σ t c, Σ c z and z_y over the shards and merges lse as
for CE; the backward runs each shard with the merged lse and all-reduces dx (and a full t's dt).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import backends
from .autograd import cast_grad, contig, grad_buffers, save_with_grads, saved_with_grads
from .backends.contract import DenseTarget
from .dispatch import autocast_off
from .maths import acc_dtype, mean_scale
from .options import CEOptions

Tensor = torch.Tensor

__all__ = ["linear_target_loss"]

_acc = acc_dtype  # lsa_kernels.maths


def _row_loss(out, T: DenseTarget, z_loss: float, counted: Tensor) -> tuple[Tensor, Tensor]:
    """(ℓ [N], A [N]) from a dense forward's sums (module docstring); 0 on rows not counted."""
    A = T.kappa * out.tm + T.beta * T.c_sum
    L = T.kappa * out.tz + T.beta * out.cz
    if T.alpha is not None:
        A = A + T.alpha
        L = L + T.alpha * out.zy
    per_row = A * out.lse - L
    if z_loss > 0:
        om = 1.0 if T.omega is None else T.omega
        per_row = per_row + z_loss * om * out.lse * out.lse
    return per_row * counted, A


class _DenseCE(torch.autograd.Function):
    """Σ coef·ℓ (``mean``/``sum``) or ``coef ⊙ ℓ`` (``none``) of the dense-target rows (module docstring)."""

    @staticmethod
    @autocast_off
    def forward(ctx, x, w, b, t, y, T: DenseTarget, coef, counted, reduction: str, opts: CEOptions, backend):
        be = backends.get(backend)
        x, w, b = contig(x), contig(w), contig(b)
        T = DenseTarget(contig(t), T.c, T.kappa, T.beta, T.alpha, T.omega, T.c_sum)
        need = ctx.needs_input_grad[:3]
        need_t = t is not None and ctx.needs_input_grad[3]
        acc = _acc(x)
        ctx.T, ctx.opts, ctx.backend, ctx.reduction, ctx.need_t = T, opts, backend, reduction, need_t
        if reduction != "none" and (any(need) or need_t) and be.caps.fused_forward_backward:
            pre = grad_buffers(x, w, b, *need)
            dt = torch.empty(t.shape, dtype=acc, device=x.device) if need_t else None
            out = be.ce_dense_forward_backward(x, w, b, y, T, opts, coef, pre, dt=dt)
            save_with_grads(ctx, pre, x, w, b, t, dt)
        else:
            out = be.ce_dense_forward(x, w, b, y, T, opts)
            save_with_grads(ctx, None, x, w, b, t, y, out.lse, coef)
        per_row, A = _row_loss(out, T, opts.z_loss, counted)
        ctx.A = A
        if reduction == "none":
            return per_row * coef
        return (per_row * coef).sum()

    @staticmethod
    @autocast_off
    def backward(ctx, g):
        nones = (None,) * 7
        saved, pre = saved_with_grads(ctx)
        if pre is not None:
            x, w, b, t, dt = saved
            g = g.to(_acc(w))
            return (cast_grad(pre.dx, x, g), cast_grad(pre.dw, w, g), cast_grad(pre.db, b, g),
                    cast_grad(dt, t, g) if ctx.need_t else None, *nones)
        x, w, b, t, y, lse, coef = saved
        acc = _acc(w)
        T, opts = ctx.T, ctx.opts
        T = DenseTarget(t, T.c, T.kappa, T.beta, T.alpha, T.omega, T.c_sum)
        c = coef * (g.to(acc).reshape(-1) if ctx.reduction == "none" else g.to(acc))
        A = ctx.A
        if opts.z_loss > 0:
            A = A + 2.0 * opts.z_loss * lse * (1.0 if T.omega is None else T.omega)
        grads = grad_buffers(x, w, b, *ctx.needs_input_grad[:3])
        dt = torch.empty(t.shape, dtype=acc, device=x.device) if ctx.need_t else None
        backends.get(ctx.backend).ce_dense_backward(x, w, b, y, T, lse, (c * A).contiguous(), c.contiguous(), opts,
                                                    grads, dt=dt)
        return cast_grad(grads.dx, x), cast_grad(grads.dw, w), cast_grad(grads.db, b), cast_grad(dt, t), *nones


def linear_target_loss(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor, *, prob: bool,
                       class_weight: Optional[Tensor], token_weight: Optional[Tensor], reduction: str,
                       ignore_index: int, label_smoothing: float, z_loss: float, opts: CEOptions,
                       backend, shard=None) -> Tensor:
    """The loss of the module docstring over rows ``x [N, H]`` with ``target`` ``[N]`` (int, ``prob`` False) or
    ``[N, V]`` (``prob``); reduced like the CE (docs/maths.md §3, §11): ``mean`` = Σ w·ℓ / Σ w over counted rows
    with w = token weight × (index targets) c_y — torch's definitions —, 0 with zero gradients when Σ w = 0.

    ``shard`` (a :class:`lsa_kernels.distributed.Shard`; ``backend`` is then the VocabParallel wrapper): ``w``/``b``
    are this rank's rows ``[s, s+V_r)`` of the head, ``class_weight`` is the whole ``[V]``, a probability target
    is ``[N, V]`` or this rank's columns ``[N, V_r]`` (docs/maths.md §15; the wrapper slices both)."""
    acc = _acc(x)
    N = x.shape[0]
    V = w.shape[0] if shard is None else shard.vocab_total
    eps = float(label_smoothing)
    c = None if class_weight is None else class_weight.detach().to(acc)
    c_sum = float(V) if c is None else c.sum()
    beta = eps / V
    if prob:
        T = DenseTarget(None, c, 1.0 - eps, beta, None, None, c_sum)
        t, y = target, None
        counted = torch.ones(N, dtype=acc, device=x.device)
        den_w = counted
    else:
        valid = target != ignore_index
        ys = torch.where(valid, target, torch.zeros_like(target))
        counted = valid.to(acc)
        cy = counted if c is None else c[ys] * counted
        T = DenseTarget(None, c, 0.0, beta, (1.0 - eps) * cy, cy, c_sum)
        t, y = None, target.contiguous()
        den_w = cy
    tw = None if token_weight is None else token_weight.detach().to(acc)
    coef = counted if tw is None else counted * tw
    if reduction == "mean":
        coef = coef * mean_scale((den_w if tw is None else den_w * tw).sum())
    out = _DenseCE.apply(x, w, b, t, y, T, coef, counted, reduction, opts, backend)
    return out
