"""The cpu backend: chunked ATen, never more than one chunk of logits alive.

Rows are processed in chunks of ``C`` rows. For each chunk the logits ``z = softcap(x_c W^T + b)``
(fp32, ``[C, V]``) are formed with one GEMM, reduced to per-row statistics (docs/maths.md §3, §5 and
:mod:`lsa_kernels.maths`), and — when the gradient coefficients are known — turned in place into
``dz`` and fed to two more GEMMs: ``dx_c = dz W`` and ``dW += dzᵀ x_c`` (``addmm_`` into one fp32
buffer, no V×H temporaries). Everything between the GEMMs runs in the compiled extension
``lsa_kernels._C`` when it is built (csrc/), else in the ATen code below.

Chunk size: ``C = budget / (K · V · 4 bytes)`` where ``K`` is the number of ``[C, V]`` fp32 buffers the
path keeps alive at once (measured by tests/test_memory.py) and ``budget`` is ``opts.chunk_bytes`` or,
by default 64 MiB (all buffers together; a problem whose logits are smaller takes one chunk).

Half-precision inputs: x and W are promoted to fp32 before the GEMM (CPU ATen has no bf16 x bf16 ->
fp32 GEMM), so logits are never rounded to bf16. W is promoted once per call (a ``[V, H]`` fp32
copy), each chunk of x per chunk.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .options import (
    N_PAIR_STATS,
    STAT_LSE_P,
    STAT_LSE_Q,
    STAT_LSET_P,
    STAT_LSET_Q,
    STAT_X,
    STAT_X2,
    STAT_Y,
    STAT_Y2,
    CEOptions,
    PairOptions,
)
from . import _ext
from .maths import EXPM1_CLAMP, ce_row_loss, divergence_from_stats

Tensor = torch.Tensor

# [C, V] fp32 buffers alive at once (upper bounds: tests/test_memory.py checks peak <= K·C·V·4 on both paths)
K_CE = 3
K_PAIR = 9
# ... on the compiled path (lsa_kernels._C): the GEMM's output buffer(s) only, turned into dz in place
K_CE_EXT = 1
K_PAIR_EXT = 2

_BUDGET = 64 << 20


def default_budget(n: int, v: int, k: int) -> int:
    """The default budget in bytes for all ``[rows, V]`` buffers together: 64 MiB.

    Measured (fp32 fwd+bwd, 2 cores, best of 3): at the CE goal shape (N=4096, H=512, V=32768) 64 MiB
    chunks were as fast as 128 MiB and faster than 16-32 MiB (smaller GEMMs) or 200 MiB (cache misses).
    The budget used to shrink to 1/8 of the logits (floor 16 MiB) for smaller N, which made the GEMMs of
    a chunk — above all dW += dzᵀx, whose inner dimension is the chunk's rows — too thin: long-short at
    N=1024, V=65536 took 5.05 s with 32 MiB and 3.77 s with 64 MiB; at N=512, V=32768 1.04 s vs 0.90 s."""
    del n, v, k  # the same bytes whatever the path: a path with fewer buffers gets more rows per chunk
    return _BUDGET


def chunk_rows(n: int, v: int, k: int, chunk_bytes: Optional[int], default_k: Optional[int] = None) -> int:
    """Rows per chunk so that ``k`` fp32 ``[rows, v]`` buffers fit in the budget.

    Without ``chunk_bytes`` the budget is :func:`default_budget` for ``default_k`` buffers (default ``k``):
    the compiled path passes the ATen path's K there, so it uses the same memory in fewer, larger chunks.
    """
    if chunk_bytes is None:
        chunk_bytes = default_budget(n, v, k if default_k is None else default_k)
    rows = chunk_bytes // (k * v * 4)
    if rows >= 16:
        rows -= rows % 8
    return int(max(1, min(n, rows)))


def use_ext(x: Tensor) -> bool:
    """Whether this call runs the compiled kernels: fp32/bf16/fp16 inputs and ``lsa_kernels._C`` available.

    fp64 inputs always take the ATen path (gradcheck runs in double there)."""
    return x.dtype != torch.float64 and _ext.available()


def k_buffers(pair: bool, x: Tensor) -> int:
    """``K`` (the ``[C, V]`` fp32 buffers alive at once) of the path a call with input ``x`` takes."""
    if use_ext(x):
        return K_PAIR_EXT if pair else K_CE_EXT
    return K_PAIR if pair else K_CE


def acc_dtype(t: Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs; fp64 stays fp64 (so gradcheck can run in double)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    """Promote half-precision tensors to fp32 (fp32/fp64 pass through)."""
    if t is None:
        return None
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Σ_v a[i, v] b[i, v] without a [C, V] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _logits(x32: Tensor, w32: Tensor, b32: Optional[Tensor], softcap: Optional[float]) -> Tensor:
    z = torch.addmm(b32, x32, w32.t()) if b32 is not None else torch.mm(x32, w32.t())
    if softcap is not None and softcap > 0:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def _softcap_grad_(dz: Tensor, zc: Tensor, softcap: Optional[float], scale: float = 1.0) -> Tensor:
    """``dz *= 1 - (zc·scale/c)²`` where ``zc·scale`` is the softcapped logit (chain rule through tanh)."""
    if softcap is None or not softcap > 0:
        return dz
    d = zc * (scale / softcap)
    d.square_().neg_().add_(1.0)
    return dz.mul_(d)


def _safe_targets(y: Tensor, V: int, ignore_index: int) -> Tensor:
    """Targets with a one-hot in this weight, else -1 (ignored rows, and ids >= V: another vocab shard)."""
    return torch.where((y != ignore_index) & (y >= 0) & (y < V), y, torch.full_like(y, -1))


def _ce_rows(z: Tensor, y: Tensor, opts: CEOptions) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss_row, lse, safe targets) of a chunk of softcapped fp32 logits."""
    valid = y != opts.ignore_index
    ys = _safe_targets(y, z.shape[1], opts.ignore_index)
    lse = torch.logsumexp(z, dim=1)
    zy = z.gather(1, ys.clamp(min=0).unsqueeze(1)).squeeze(1)
    zmean = z.mean(dim=1) if opts.label_smoothing > 0 else None
    return ce_row_loss(lse, zy, zmean, valid, opts.label_smoothing, opts.z_loss), lse, ys


def _ce_grad_(p: Tensor, lse: Tensor, ys: Tensor, coef: Tensor, opts: CEOptions) -> Tensor:
    """Turn ``p = softmax(z)`` in place into ``coef ⊙ ∂ℓ/∂z`` (before the softcap derivative)."""
    eps, V = opts.label_smoothing, p.shape[1]
    if opts.z_loss > 0:
        p.mul_((1.0 + 2.0 * opts.z_loss * lse).unsqueeze(1))
    hot = (ys >= 0).to(p.dtype)
    p.scatter_add_(1, ys.clamp(min=0).unsqueeze(1), (hot * -(1.0 - eps)).unsqueeze(1))
    if eps > 0:
        p.sub_(eps / (opts.vocab_total or V))
    return p.mul_(coef.unsqueeze(1))


def _grad_gemms(dz: Tensor, x32: Tensor, w32: Tensor, rows: slice, dx_out, dw_out, db_out) -> None:
    if dx_out is not None:
        torch.mm(dz, w32, out=dx_out[rows])
    if dw_out is not None:
        dw_out.addmm_(dz.t(), x32)
    if db_out is not None:
        db_out.add_(dz.sum(dim=0))


# --------------------------------------------------------------------------------------------- CE


def ce_forward_backward(
    x: Tensor, w: Tensor, b: Optional[Tensor], y: Tensor, opts: CEOptions,
    coef: Optional[Tensor] = None, dx_out=None, dw_out=None, db_out=None,
) -> Tuple[Tensor, Tensor]:
    """CE forward over chunks; with ``coef`` also the gradient (backends.py contract) in the same pass."""
    if use_ext(x):
        return _ce_ext(x, w, b, y, opts, None, coef, dx_out, dw_out, db_out)
    N, V = x.shape[0], w.shape[0]
    loss = torch.empty(N, dtype=acc_dtype(x), device=x.device)
    lse_all = torch.empty(N, dtype=acc_dtype(x), device=x.device)
    w32, b32 = _f32(w), _f32(b)
    C = chunk_rows(N, V, K_CE, opts.chunk_bytes)
    for s in range(0, N, C):
        rows = slice(s, min(N, s + C))
        x32 = _f32(x[rows])
        z = _logits(x32, w32, b32, opts.softcap)
        loss[rows], lse, ys = _ce_rows(z, y[rows], opts)
        lse_all[rows] = lse
        if coef is not None:
            dz = _softcap_grad_(_ce_grad_(_softmax_(z, lse, opts.softcap), lse, ys, coef[rows], opts), z, opts.softcap)
            _grad_gemms(dz, x32, w32, rows, dx_out, dw_out, db_out)
            del dz  # else it lives on into the next chunk's logits: K_CE + 1 buffers at once
        del z
    return loss, lse_all


def _softmax_(z: Tensor, lse: Tensor, softcap: Optional[float]) -> Tensor:
    """softmax(z) into a buffer. With a softcap the capped logits are still needed for the chain rule,
    so the result goes to a new buffer and ``z`` is left intact; otherwise it is computed in place."""
    if softcap is not None and softcap > 0:
        return (z - lse.unsqueeze(1)).exp_()
    return z.sub_(lse.unsqueeze(1)).exp_()


def ce_forward(x, w, b, y, opts: CEOptions):
    return ce_forward_backward(x, w, b, y, opts)


def ce_backward(x, w, b, y, lse, coef, opts: CEOptions, dx_out, dw_out, db_out) -> None:
    if use_ext(x):
        _ce_ext(x, w, b, y, opts, lse, coef, dx_out, dw_out, db_out)
        return
    N, V = x.shape[0], w.shape[0]
    w32, b32 = _f32(w), _f32(b)
    C = chunk_rows(N, V, K_CE, opts.chunk_bytes)
    for s in range(0, N, C):
        rows = slice(s, min(N, s + C))
        x32 = _f32(x[rows])
        z = _logits(x32, w32, b32, opts.softcap)
        ys = _safe_targets(y[rows], V, opts.ignore_index)
        dz = _softcap_grad_(_ce_grad_(_softmax_(z, lse[rows], opts.softcap), lse[rows], ys, coef[rows], opts), z, opts.softcap)
        _grad_gemms(dz, x32, w32, rows, dx_out, dw_out, db_out)
        del z, dz


# ------------------------------------------------------------------------------------------- pairs


def _js_log_ratios(a: Tensor, b: Tensor, lta: Tensor, ltb: Tensor) -> Tuple[Tensor, Tensor]:
    """(log p − log m, log q − log m) of a chunk, m = (p + q)/2, all in log space (docs/maths.md §5);
    ``lta``/``ltb`` are the ``[C, 1]`` normalisers of a = z_p/τ and b = z_q/τ."""
    lp = a - lta
    lq = b - ltb
    lm = torch.logaddexp(lp, lq).sub_(math.log(2.0))
    return lp.sub_(lm), lq.sub_(lm)


def _pair_chunk(
    xp32: Tensor, xq32: Tensor, w32: Tensor, b32: Optional[Tensor], yp, yq, opts: PairOptions,
    stats_in: Optional[Tensor], coefs: Optional[Tuple[Optional[Tensor], Optional[Tensor], Tensor]],
):
    """One chunk of paired rows. Returns (ce_p, ce_q, stats, dz_p, dz_q); dz_* are None without coefs.

    When ``stats_in`` is given (backward) the statistics are not recomputed, only the gradient.
    """
    ce = opts.ce
    tau = opts.temperature
    za = _logits(xp32, w32, b32, ce.softcap)
    zb = _logits(xq32, w32, b32, ce.softcap)
    C = za.shape[0]
    if stats_in is None:
        stats = torch.empty(C, N_PAIR_STATS, dtype=za.dtype, device=za.device)
        if opts.with_ce:
            ce_p, stats[:, STAT_LSE_P], ysp = _ce_rows(za, yp, ce)
            ce_q, stats[:, STAT_LSE_Q], ysq = _ce_rows(zb, yq, ce)
        else:
            ce_p = ce_q = None
            stats[:, STAT_LSE_P] = 0.0
            stats[:, STAT_LSE_Q] = 0.0
    else:
        stats, ce_p, ce_q = stats_in, None, None
        if opts.with_ce:
            ysp = _safe_targets(yp, za.shape[1], ce.ignore_index)
            ysq = _safe_targets(yq, zb.shape[1], ce.ignore_index)

    # divergence on a = za/τ, b = zb/τ (scaled in place; za = τ·a is recovered where needed)
    if tau != 1.0:
        za.div_(tau)
        zb.div_(tau)
    a, b = za, zb
    if stats_in is None:
        if opts.with_ce and tau == 1.0:
            stats[:, STAT_LSET_P] = stats[:, STAT_LSE_P]
            stats[:, STAT_LSET_Q] = stats[:, STAT_LSE_Q]
        else:
            stats[:, STAT_LSET_P] = torch.logsumexp(a, dim=1)
            stats[:, STAT_LSET_Q] = torch.logsumexp(b, dim=1)
    lta, ltb = stats[:, STAT_LSET_P].unsqueeze(1), stats[:, STAT_LSET_Q].unsqueeze(1)
    p = (a - lta).exp_()
    q = (b - ltb).exp_()
    if stats_in is None:
        # the forward's p and q normalised by their own sums: an lse one ulp off at large logits (|z| ≈ 300:
        # ε ≈ 3e-5) would scale every expectation E_p[·], E_q[·] by (1 − ε), an error of ε·|E[z]| in X and Y
        # (sce's Y off by 2.7e-3 at |z| ≈ 300 and dx by 0.03, 20x the compiled path's error: found by the
        # nightly property run). Not from saved statistics: a vocab shard's backward gets the GLOBAL lse,
        # under which its p sums to its share of the mass, not to 1.
        p.div_(p.sum(1, keepdim=True))
        q.div_(q.sum(1, keepdim=True))
    div = opts.divergence
    u = a - b if div in ("kl", "kl_reverse", "sym_kl") else None
    if div == "js":
        lp, lq = _js_log_ratios(a, b, lta, ltb)
    if stats_in is None:
        if div == "sce":
            X, Y = _rowdot(p, b), _rowdot(q, a)
        elif div == "kl":
            X, Y = _rowdot(p, u), _rowdot(p, torch.expm1((-u).clamp_(max=EXPM1_CLAMP)))
        elif div == "kl_reverse":
            X, Y = _rowdot(q, torch.expm1(u.clamp(max=EXPM1_CLAMP))), _rowdot(q, u)
        elif div == "sym_kl":
            X, Y = _rowdot(p, u), _rowdot(q, u)
            stats[:, STAT_X2], stats[:, STAT_Y2] = _rowdot(p, torch.expm1((-u).clamp_(max=EXPM1_CLAMP))), _rowdot(q, torch.expm1(u.clamp(max=EXPM1_CLAMP)))
        else:  # js
            X, Y = _rowdot(p, lp), _rowdot(q, lq)
        stats[:, STAT_X], stats[:, STAT_Y] = X, Y
        if div != "sym_kl":
            stats[:, STAT_X2] = 0.0
            stats[:, STAT_Y2] = 0.0
    if coefs is None:
        return ce_p, ce_q, stats, None, None

    coef_ce_p, coef_ce_q, coef_div = coefs
    X, Y = stats[:, STAT_X].unsqueeze(1), stats[:, STAT_Y].unsqueeze(1)
    cd = (coef_div / tau).unsqueeze(1)

    # dD/da into gp, dD/db into gq (maths.py table), scaled by coef_div/τ
    gp = gq = None
    if opts.grad_p:
        if div == "sce":
            gp = (b - X).mul_(p).neg_().add_(p).sub_(q)
        elif div == "kl":
            gp = (u - X).mul_(p)
        elif div == "kl_reverse":
            gp = p - q
        elif div == "sym_kl":
            gp = (u - X).mul_(p).add_(p).sub_(q)
        else:
            gp = (lp - X).mul_(p).mul_(0.5)
        gp.mul_(cd)
    if opts.grad_q:
        if div == "sce":
            gq = (a - Y).mul_(q).neg_().add_(q).sub_(p)
        elif div == "kl":
            gq = q - p
        elif div == "kl_reverse":
            gq = (Y - u).mul_(q)
        elif div == "sym_kl":
            gq = (Y - u).mul_(q).add_(q).sub_(p)
        else:
            gq = (lq - Y).mul_(q).mul_(0.5)
        gq.mul_(cd)
    del u
    if div == "js":
        del lp, lq

    def _view_grad(g, z_over_tau, p_t, lse_col, ys, coef_ce):
        if opts.with_ce:
            # softmax(z) for CE: equals p when τ = 1, else exp(τ·a − lse)
            if tau == 1.0:
                sm = p_t.clone() if g is not None else p_t
            else:
                sm = (z_over_tau * tau).sub_(lse_col.unsqueeze(1)).exp_()
            sm = _ce_grad_(sm, lse_col, ys, coef_ce, ce)
            g = sm if g is None else g.add_(sm)
        if g is None:
            return None
        return _softcap_grad_(g, z_over_tau, ce.softcap, scale=tau)

    dz_p = _view_grad(gp, a, p, stats[:, STAT_LSE_P], ysp if opts.with_ce else None, coef_ce_p)
    del gp
    dz_q = _view_grad(gq, b, q, stats[:, STAT_LSE_Q], ysq if opts.with_ce else None, coef_ce_q)
    return ce_p, ce_q, stats, dz_p, dz_q


def pair_forward_backward(
    xp, xq, w, b, yp, yq, opts: PairOptions,
    coef_ce_p=None, coef_ce_q=None, coef_div=None,
    dxp_out=None, dxq_out=None, dw_out=None, db_out=None, stats_in=None,
):
    """Pair forward over chunks; with ``coef_div`` also the gradient in the same pass (contract)."""
    if use_ext(xp):
        return _pair_ext(
            xp, xq, w, b, yp, yq, opts, coef_ce_p, coef_ce_q, coef_div, dxp_out, dxq_out, dw_out, db_out, stats_in
        )
    N, V = xp.shape[0], w.shape[0]
    zeros = torch.zeros(N, dtype=acc_dtype(xp), device=xp.device)
    ce_p, ce_q = (torch.empty_like(zeros), torch.empty_like(zeros)) if opts.with_ce else (zeros, zeros)
    stats = stats_in if stats_in is not None else torch.empty(N, N_PAIR_STATS, dtype=acc_dtype(xp), device=xp.device)
    w32, b32 = _f32(w), _f32(b)
    C = chunk_rows(N, V, K_PAIR, opts.ce.chunk_bytes)
    with_grad = coef_div is not None
    for s in range(0, N, C):
        rows = slice(s, min(N, s + C))
        xp32, xq32 = _f32(xp[rows]), _f32(xq[rows])
        coefs = None
        if with_grad:
            coefs = (
                None if coef_ce_p is None else coef_ce_p[rows],
                None if coef_ce_q is None else coef_ce_q[rows],
                coef_div[rows],
            )
        cp, cq, st, dz_p, dz_q = _pair_chunk(
            xp32, xq32, w32, b32,
            None if yp is None else yp[rows], None if yq is None else yq[rows],
            opts, None if stats_in is None else stats_in[rows], coefs,
        )
        if stats_in is None:
            stats[rows] = st
            if opts.with_ce:
                ce_p[rows], ce_q[rows] = cp, cq
        if dz_p is not None:
            _grad_gemms(dz_p, xp32, w32, rows, dxp_out, dw_out, db_out)
        elif dxp_out is not None:
            dxp_out[rows].zero_()
        del dz_p
        if dz_q is not None:
            _grad_gemms(dz_q, xq32, w32, rows, dxq_out, dw_out, db_out)
        elif dxq_out is not None:
            dxq_out[rows].zero_()
    div = divergence_from_stats(stats, opts.divergence)
    return ce_p, ce_q, div, stats


def pair_js_partial(xp, xq, w, b, lset, opts: PairOptions) -> Tensor:
    """``[N, 2]``: ``Σ_v p_v log(p_v/m_v)`` and ``Σ_v q_v log(q_v/m_v)`` over the rows of ``w`` for GIVEN
    normalisers ``lset [N, 2]`` of a = z_p/τ and b = z_q/τ (the whole vocabulary's, when ``w`` is a vocab
    shard: :mod:`lsa_kernels.distributed` sums these over the ranks). ATen chunks on every input dtype."""
    N, V = xp.shape[0], w.shape[0]
    out = torch.empty(N, 2, dtype=acc_dtype(xp), device=xp.device)
    w32, b32 = _f32(w), _f32(b)
    cap, tau = opts.ce.softcap, float(opts.temperature)
    C = chunk_rows(N, V, K_PAIR, opts.ce.chunk_bytes)
    for s in range(0, N, C):
        rows = slice(s, min(N, s + C))
        a = _logits(_f32(xp[rows]), w32, b32, cap)
        b_ = _logits(_f32(xq[rows]), w32, b32, cap)
        if tau != 1.0:
            a.div_(tau)
            b_.div_(tau)
        lta, ltb = (lset[rows, i : i + 1].to(a.dtype) for i in (0, 1))
        p, q = (a - lta).exp_(), (b_ - ltb).exp_()
        lp, lq = _js_log_ratios(a, b_, lta, ltb)
        out[rows, 0], out[rows, 1] = _rowdot(p, lp), _rowdot(q, lq)
        del a, b_, p, q, lp, lq
    return out


def pair_forward(xp, xq, w, b, yp, yq, opts: PairOptions):
    return pair_forward_backward(xp, xq, w, b, yp, yq, opts)


def pair_backward(
    xp, xq, w, b, yp, yq, stats, coef_ce_p, coef_ce_q, coef_div, opts: PairOptions,
    dxp_out, dxq_out, dw_out, db_out,
) -> None:
    pair_forward_backward(
        xp, xq, w, b, yp, yq, opts, coef_ce_p, coef_ce_q, coef_div, dxp_out, dxq_out, dw_out, db_out,
        stats_in=stats,
    )


# ---------------------------------------------------------------------------- compiled path (_C)
#
# Same chunk loop, but one reusable fp32 [C, V] buffer per view: the GEMM writes raw logits into it
# (bias included), one lsa_kernels._C op applies the softcap, reduces each row to its statistics and
# — given the coefficients — overwrites it with dz, which the gradient GEMMs then read. No other
# [C, V] tensor exists (K_CE_EXT = 1, K_PAIR_EXT = 2), so a chunk is K_CE/K_CE_EXT = 3x (CE) and
# K_PAIR/K_PAIR_EXT = 4.5x (pairs) larger than on the ATen path for the same ``chunk_bytes``; without
# ``chunk_bytes`` the default budget is the ATen path's (same memory, fewer and larger GEMMs).


def _softcap_arg(opts: CEOptions) -> float:
    return float(opts.softcap) if opts.has_softcap else 0.0


def _logits_into(out: Tensor, x32: Tensor, w32: Tensor, b32: Optional[Tensor]) -> Tensor:
    if b32 is not None:
        return torch.addmm(b32, x32, w32.t(), out=out)
    return torch.mm(x32, w32.t(), out=out)


def _ce_ext(x, w, b, y, opts: CEOptions, lse_in, coef, dx_out, dw_out, db_out):
    """CE over chunks on the compiled path: forward (``lse_in`` None), folded forward+backward
    (``coef`` given) or backward from saved ``lse_in``."""
    N, V = x.shape[0], w.shape[0]
    loss = torch.empty(N, dtype=torch.float32, device=x.device)
    lse_all = torch.empty(N, dtype=torch.float32, device=x.device)
    w32, b32 = _f32(w), _f32(b)
    C = chunk_rows(N, V, K_CE_EXT, opts.chunk_bytes, default_k=K_CE)
    zbuf = torch.empty(min(C, N), V, dtype=torch.float32, device=x.device)
    ops = _ext.ops()
    cap = _softcap_arg(opts)
    for s in range(0, N, C):
        rows = slice(s, min(N, s + C))
        x32 = _f32(x[rows])
        z = _logits_into(zbuf[: x32.shape[0]], x32, w32, b32)
        lr, lsr = ops.ce_chunk(
            z, y[rows], None if lse_in is None else lse_in[rows], None if coef is None else coef[rows],
            opts.ignore_index, opts.label_smoothing, opts.z_loss, cap, opts.vocab_total or 0,
        )
        if lse_in is None:
            loss[rows] = lr
            lse_all[rows] = lsr
        if coef is not None:
            _grad_gemms(z, x32, w32, rows, dx_out, dw_out, db_out)
    return loss, lse_all


def _pair_ext(xp, xq, w, b, yp, yq, opts: PairOptions, coef_ce_p, coef_ce_q, coef_div,
              dxp_out, dxq_out, dw_out, db_out, stats_in):
    N, V = xp.shape[0], w.shape[0]
    f32 = dict(dtype=torch.float32, device=xp.device)
    ce_p = torch.empty(N, **f32) if opts.with_ce else torch.zeros(N, **f32)
    ce_q = torch.empty(N, **f32) if opts.with_ce else torch.zeros(N, **f32)
    stats = stats_in if stats_in is not None else torch.empty(N, N_PAIR_STATS, **f32)
    w32, b32 = _f32(w), _f32(b)
    C = chunk_rows(N, V, K_PAIR_EXT, opts.ce.chunk_bytes, default_k=K_PAIR)
    za_buf = torch.empty(min(C, N), V, **f32)
    zb_buf = torch.empty(min(C, N), V, **f32)
    with_grad = coef_div is not None
    has_dz_p = with_grad and (opts.with_ce or opts.grad_p)
    has_dz_q = with_grad and (opts.with_ce or opts.grad_q)
    ce = opts.ce
    ops = _ext.ops()
    cap = _softcap_arg(ce)
    code = _ext.DIVERGENCE_CODES[opts.divergence]
    use_y = opts.with_ce

    def sl(t, rows):
        return None if t is None else t[rows]

    for s in range(0, N, C):
        rows = slice(s, min(N, s + C))
        xp32, xq32 = _f32(xp[rows]), _f32(xq[rows])
        c = xp32.shape[0]
        za = _logits_into(za_buf[:c], xp32, w32, b32)
        zb = _logits_into(zb_buf[:c], xq32, w32, b32)
        cp, cq, st = ops.pair_chunk(
            za, zb, sl(yp, rows) if use_y else None, sl(yq, rows) if use_y else None, sl(stats_in, rows),
            sl(coef_ce_p, rows) if with_grad else None, sl(coef_ce_q, rows) if with_grad else None,
            sl(coef_div, rows), code, float(opts.temperature), opts.grad_p, opts.grad_q, opts.with_ce,
            ce.ignore_index, ce.label_smoothing, ce.z_loss, cap, ce.vocab_total or 0,
        )
        if stats_in is None:
            stats[rows] = st
            if opts.with_ce:
                ce_p[rows], ce_q[rows] = cp, cq
        if has_dz_p:
            _grad_gemms(za, xp32, w32, rows, dxp_out, dw_out, db_out)
        elif dxp_out is not None:
            dxp_out[rows].zero_()
        if has_dz_q:
            _grad_gemms(zb, xq32, w32, rows, dxq_out, dw_out, db_out)
        elif dxq_out is not None:
            dxq_out[rows].zero_()
    div = divergence_from_stats(stats, opts.divergence)
    return ce_p, ce_q, div, stats
