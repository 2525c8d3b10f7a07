"""Class weights with label smoothing, and probability targets (docs/maths.md §11): a loss linear in the logits
plus lse terms, so that no new kernel is needed.

Every such row loss has the form

    ℓ_i = A_i·lse_i + λ·ω_i·lse_i² − L_i,      L_i = Σ_v T_iv z_iv,

with T the row's target mass over the classes (c: class weights, 1 without; ε: label smoothing):

    index target y, class weights, ε:     T = (1−ε)·c_y·onehot(y) + (ε/V)·c,   A = (1−ε)c_y + (ε/V)Σ_v c_v,  ω = c_y
    probability target t, ε (torch mixes t ← (1−ε)t + ε/V), c:  T = t ⊙ c,  A = Σ_v t_v c_v,  ω = 1

(with c = 1, ε = 0 the first is the plain CE; torch's ``F.cross_entropy`` definitions). Without a softcap
``z = x Wᵀ + b`` is linear in x, W and b, so L needs no pass over the vocabulary:

    Σ_v c_v z_v = x·(cᵀW) + c·b                          one GEMV per call
    z_y = x·W[y] + b[y]                                   a gather
    Σ_v t_v c_v z_v = rowsum(x ⊙ (t (c⊙W))) + t·(c⊙b)     GEMMs on the user's t, row chunk by row chunk (_TargetDot)

and the gradient of L is plain autograd (``dx −= coef·(tW)``, ``dW −= (coef·t)ᵀx``, ``db −= Σ coef·t``).
lse and its gradient ``coef·softmax(z)`` come from a backend's CE ops run with the target V — "a valid row whose
class is in no shard": softmax gradient, no one-hot (lsa_kernels.backends.contract) — and ε = λ = 0 (_RowLSE).
Cost over the plain fused CE: forward and backward are separate passes (the lse coefficient is only known in
backward), and probability targets add two GEMMs of the logits' size (t·W in forward, tᵀ·x for dW).
With a softcap, z is not linear in W: these combinations are refused (functional).

Vocab-parallel head (docs/maths.md §15; ``shard=``): every L above is a sum over the classes, so each rank forms
its shard's share (its rows of W and b, its columns of t and c; z_y on the owner only) and ONE all-reduce sums
them (with the target mass Σ_v t_v c_v); lse is the VocabParallel merge. In backward, dW and db stay the shard's
and the shares of dx (the linear terms' and lse's) are all-reduced once (vocab_parallel.copy_to_shards).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from . import backends
from .autograd import _autocast_off
from .maths import acc_dtype
from .options import CEOptions

Tensor = torch.Tensor

__all__ = ["linear_target_loss"]

_DEFAULT_BUDGET = 64 << 20


_acc = acc_dtype  # lsa_kernels.maths


class _RowLSE(torch.autograd.Function):
    """``lse(softcap(x Wᵀ + b))`` per row through a backend; backward ``coef·softmax(z)`` (module docstring).

    The backend runs on ``x, w, b`` (the caller's dtype, detached); the gradients go to ``x_acc, w_acc, b_acc``,
    their fp32 (fp64) casts, so that they add to the other terms' gradients in fp32 and are rounded to a
    half-precision input's dtype once (by the cast's backward), not once per term."""

    @staticmethod
    @_autocast_off
    def forward(ctx, x, w, b, x_acc, w_acc, b_acc, opts: CEOptions, backend, n_classes: int, sharded: bool):
        be = backends.get(backend)
        x, w = x.detach().contiguous(), w.detach().contiguous()
        b = None if b is None else b.detach().contiguous()
        # the target n_classes (the whole vocabulary's V): "valid, class in no shard" (module docstring)
        y = torch.full((x.shape[0],), n_classes, dtype=torch.int64, device=x.device)
        o = dataclasses.replace(opts, ignore_index=-1, label_smoothing=0.0, z_loss=0.0)
        lse = be.ce_forward(x, w, b, y, o).lse
        ctx.o, ctx.backend, ctx.sharded = o, backend, sharded
        ctx.save_for_backward(x, w, b, y, lse)
        return lse

    @staticmethod
    @_autocast_off
    def backward(ctx, g):
        x, w, b, y, lse = ctx.saved_tensors
        nx, nw, nb = ctx.needs_input_grad[3:6]
        acc = dict(dtype=_acc(x), device=x.device)
        grads = backends.Grads(
            dx=torch.empty(x.shape, **acc) if nx else None,
            dw=torch.zeros(w.shape, **acc) if nw else None,
            db=torch.zeros(w.shape[0], **acc) if (nb and b is not None) else None,
        )
        kw = dict(reduce_dx=False) if ctx.sharded else {}  # dx: this shard's share, all-reduced with the others
        backends.get(ctx.backend).ce_backward(x, w, b, y, lse, g.to(_acc(x)).contiguous(), ctx.o, grads, **kw)
        return None, None, None, grads.dx, grads.dw, grads.db, None, None, None, None


class _TargetDot(torch.autograd.Function):
    """``(Σ_v t_v c_v z_v, Σ_v t_v c_v)`` per row for a dense target ``t [N, V]``, z = x Wᵀ + b, in row chunks
    of at most ``budget`` bytes of fp32 ``t`` (no second ``[N, V]`` buffer; module docstring)."""

    @staticmethod
    @_autocast_off
    def forward(ctx, x, w, b, t, c, budget: int):
        acc = _acc(x)
        N, V = t.shape
        wc = w.to(acc) if c is None else w.to(acc) * c.to(acc).unsqueeze(1)
        bc = None if b is None else (b.to(acc) if c is None else b.to(acc) * c.to(acc))
        cc = None if c is None else c.to(acc)
        rows = max(1, budget // (V * 4))
        M = torch.empty(N, x.shape[1], dtype=acc, device=x.device)
        L = torch.empty(N, dtype=acc, device=x.device)
        mass = torch.empty(N, dtype=acc, device=x.device)
        for s in range(0, N, rows):
            tc = t[s : s + rows].to(acc)
            torch.mm(tc, wc, out=M[s : s + rows])
            L[s : s + rows] = (x[s : s + rows].to(acc) * M[s : s + rows]).sum(1)
            if bc is not None:
                L[s : s + rows] += tc @ bc
            mass[s : s + rows] = tc.sum(1) if cc is None else tc @ cc
        ctx.rows = rows
        ctx.save_for_backward(x, w, b, t, c, M)
        return L, mass

    @staticmethod
    @_autocast_off
    def backward(ctx, gL, gm):
        x, w, b, t, c, M = ctx.saved_tensors
        acc = _acc(x)
        nx, nw, nb, nt = ctx.needs_input_grad[:4]
        gL = torch.zeros(x.shape[0], dtype=acc, device=x.device) if gL is None else gL.to(acc)
        dx = (M * gL.unsqueeze(1)).to(x.dtype) if nx else None
        dw = torch.zeros(w.shape, dtype=acc, device=x.device) if nw else None
        db = torch.zeros(w.shape[0], dtype=acc, device=x.device) if (nb and b is not None) else None
        dt = torch.empty(t.shape, dtype=t.dtype, device=t.device) if nt else None
        cc = None if c is None else c.to(acc)
        if nt:
            wc = w.to(acc) if cc is None else w.to(acc) * cc.unsqueeze(1)
            bc = None if b is None else (b.to(acc) if cc is None else b.to(acc) * cc)
        rows = ctx.rows
        for s in range(0, x.shape[0], rows):
            sl = slice(s, s + rows)
            if dw is not None or db is not None:
                tc = t[sl].to(acc)
                if dw is not None:
                    dw.addmm_(tc.t(), x[sl].to(acc) * gL[sl].unsqueeze(1))
                if db is not None:
                    db.addmv_(tc.t(), gL[sl])
            if nt:  # ∂/∂t_v = g_L·c_v z_v + g_m·c_v
                d = torch.mm(x[sl].to(acc), wc.t())
                if bc is not None:
                    d += bc
                d.mul_(gL[sl].unsqueeze(1))
                if gm is not None:
                    d += gm[sl].to(acc).unsqueeze(1) * (1.0 if cc is None else cc)
                dt[sl] = d
        if cc is not None:
            if dw is not None:
                dw.mul_(cc.unsqueeze(1))
            if db is not None:
                db.mul_(cc)
        return (dx, None if dw is None else dw.to(w.dtype), None if db is None else db.to(b.dtype), dt, None, None)


def linear_target_loss(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor, *, prob: bool,
                       class_weight: Optional[Tensor], token_weight: Optional[Tensor], reduction: str,
                       ignore_index: int, label_smoothing: float, z_loss: float, opts: CEOptions,
                       backend, shard=None) -> Tensor:
    """The loss of the module docstring over rows ``x [N, H]`` with ``target`` ``[N]`` (int, ``prob`` False) or
    ``[N, V]`` (``prob``); reduced like the CE (docs/maths.md §3, §11): ``mean`` = Σ w·ℓ / Σ w over counted rows
    with w = token weight × (index targets) c_y — torch's definitions —, 0 with zero gradients when Σ w = 0.

    ``shard`` (a :class:`lsa_kernels.distributed.Shard`; ``backend`` is then the VocabParallel wrapper): ``w``/``b``
    are this rank's rows ``[s, s+V_r)`` of the head, ``class_weight`` is the whole ``[V]``, a probability target
    is ``[N, V]`` or this rank's columns ``[N, V_r]`` (docs/maths.md §15). The linear terms are formed on the
    shard and summed over the ranks (one all-reduce of ``[N, 2]``); their dx and lse's dx are this shard's shares,
    all-reduced once in backward; dW, db stay the shard's."""
    from .backends import vocab_parallel as vp

    acc = _acc(x)
    N = x.shape[0]
    V = w.shape[0] if shard is None else shard.vocab_total
    eps = float(label_smoothing)
    x32, w32 = x.to(acc), w.to(acc)
    b32 = None if b is None else b.to(acc)
    xl = x32 if shard is None else vp.copy_to_shards(x32, shard)  # rows for the shard's own terms
    lse = _RowLSE.apply(x, w, b, xl, w32, b32, opts, backend, V, shard is not None)
    c = None if class_weight is None else class_weight.to(acc)
    cw_here = class_weight  # the class weights of this shard's classes
    if shard is not None and class_weight is not None:
        cw_here = class_weight[shard.vocab_start : shard.vocab_start + shard.vocab_size]
    cl = None if cw_here is None else cw_here.to(acc)
    if eps > 0:  # Σ_v c_v z_v = x·(cᵀW) + c·b   (over the shard's classes)
        u = w32.sum(0) if cl is None else cl @ w32
        cz = xl @ u
        if b32 is not None:
            cz = cz + (b32.sum() if cl is None else cl @ b32)
        c_sum = float(V) if c is None else c.sum()
    if prob:
        budget = opts.chunk_bytes or _DEFAULT_BUDGET
        t = target if shard is None else vp.shard_columns(target, shard)
        L, mass = _TargetDot.apply(xl, w32, b32, t, cw_here, budget)
        if eps > 0:
            L = (1.0 - eps) * L + (eps / V) * cz
        if shard is not None:  # Σ over the shards of Σ_{v∈r} T_v z_v and of the target mass
            L, mass = vp.sum_over_shards(torch.stack([L, mass], 1), shard).unbind(1)
        A = mass
        if eps > 0:
            A = (1.0 - eps) * A + (eps / V) * c_sum
        omega = None
        counted = torch.ones(N, dtype=acc, device=x.device)
        den_w = counted
    else:
        valid = target != ignore_index
        ys = torch.where(valid, target, torch.zeros_like(target))
        vf = valid.to(acc)
        cy = vf if c is None else c[ys] * vf
        if shard is None:
            zy = (x32 * w32[ys]).sum(1)
            if b32 is not None:
                zy = zy + b32[ys]
        else:  # the owner's z_y, 0 on the other shards
            yl = ys - shard.vocab_start
            here = valid & (yl >= 0) & (yl < shard.vocab_size)
            yl = torch.where(here, yl, torch.zeros_like(yl))
            zy = (xl * w32[yl]).sum(1)
            if b32 is not None:
                zy = zy + b32[yl]
            zy = zy * here.to(acc)
        A = (1.0 - eps) * cy
        L = (1.0 - eps) * cy * zy
        if eps > 0:
            A = A + (eps / V) * c_sum * vf
            L = L + (eps / V) * vf * cz
        if shard is not None:
            L = vp.sum_over_shards(L, shard)
        omega = cy
        counted = vf
        den_w = cy
    per_row = A * lse - L
    if z_loss > 0:
        per_row = per_row + z_loss * (lse * lse if omega is None else omega * lse * lse)
    tw = None if token_weight is None else token_weight.detach().to(acc)
    if tw is not None:
        per_row = per_row * tw
        den_w = den_w * tw
    per_row = per_row * counted  # ignored rows: exactly 0 (their lse is finite; A = L = 0 there)
    if reduction == "none":
        return per_row.to(x.dtype)
    num = per_row.sum()
    if reduction == "sum":
        return num.to(x.dtype)
    den = den_w.sum()
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num)).to(x.dtype)
