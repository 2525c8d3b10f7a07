"""Fused linear cross-entropy: logits are formed tile by tile in SRAM (docs/maths.md §3, §14).

Forward (per row i, z = softcap(x_i Wᵀ + b), c the softcap, ε label smoothing, λ z-loss; §3):

    lse_i  = log Σ_v exp(z_iv)            online over V tiles (§14.1): m ← max(m, max_v z),
                                          s ← s·exp(m_old − m) + Σ_v exp(z − m),  lse = m + log s
    ℓ_i    = (1−ε)(lse_i − z_{i,y_i}) + ε(lse_i − (1/V) Σ_v z_iv) + λ·lse_i²     (0 if y_i ignored)

Per-token extras of the same pass (§3; ``ce_forward_ext``, constexprs ENTROPY / ARGMAX, off by default):

    H_i      = lse_i − E_p[z_i] = log s_i − E_p[z_i − m_i]        (both terms ≥ 0: no cancellation)
               online: acc ← e^{m_old − m_new}·(acc + (m_old − m_new)·s_old) + Σ_v e^{z − m_new}·(z − m_new)
               so that acc = Σ_v e^{z − m}(z − m) for the running max m, and E_p[z − m] = acc / s
    argmax_i = the first index of max_v z_iv (ties → lowest index, as torch.argmax): per tile tl.argmax,
               kept where the tile's max beats the running one strictly; splits merge to the first split
               holding the row's max (merge.merge_extras)

Grid: (row blocks, V splits). Each program walks its share of V and writes the partials (m, s, z_y, Σz:
merge.CEPart) to an ``[S, N, 4]`` fp32 scratch that :func:`merge.merge_ce` folds with plain torch ops (no
host sync); the row loss is :func:`lsa_kernels.maths.ce_row_loss`. Splitting fills the GPU when
N/BLOCK_N < #SMs.

Backward (§3; g_i = coef_i, the upstream gradient times the reduction weight; e_i = coef_entropy_i, the
entropy's coefficient, with HAS_ENTROPY only):

    dz_iv = (g_i·(softmax(z_i)_v·(1 + 2λ·lse_i) − (1−ε)·[v = y_i] − ε/V)
             − e_i·p_iv·(log p_iv + H_i))·(1 − tanh²(z_raw,iv / c))          (∂H/∂z = −p⊙(z − E_p[z]))
    dx    = dz W            dW += dzᵀ x            db += Σ_i dz_i

* ``deterministic=False`` (default), :func:`ce_bwd_kernel`: ONE kernel over the (row block × V tile) grid.
  Each program recomputes its logits tile, forms dz in registers, rounds it to the input dtype (§14.4),
  then walks H once more and adds ``dz @ W[tile]`` into dx and ``dzᵀ @ x[block]`` into dW with relaxed
  fp32 atomics: one logits GEMM plus the two gradient GEMMs, and a grid that fills any GPU. The summation
  order varies from run to run (≈1 ulp noise). GROUP row blocks at a time share W tiles in L2.
* ``deterministic=True``, :func:`ce_dz_kernel` + torch GEMMs (kernels/deterministic.py, §14.3): per chunk
  of rows the kernel writes dz (input dtype) for chunk × V, then ``torch.mm`` forms dx and dW. No atomics;
  bit-identical run to run.

Row blocks whose coefficients are all zero (ignored / unselected rows) skip their logits GEMM.
Offsets are int64 (row · stride, col · stride), so N·H, N·V and V·H may pass 2^31.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..options import CEOptions
from . import deterministic as det
from ._common import on_tensor_device, pick_config, softcap_args, split_ranges, upcast_and_prec
from .atomics import grad_gemms
from .merge import N_CE_PARTS, CEPart, merge_ce, merge_extras
from .tiles import (
    ce_grad, ce_row_coefs, dot_operand, entropy_grad, finish_logits, grouped_pid, logits_tile,
    online_update, split_bounds, store_dz_tile, tile_index,
)

# partial columns (merge.CEPart) as constexprs for the kernel
_M: tl.constexpr = tl.constexpr(int(CEPart.M))
_S: tl.constexpr = tl.constexpr(int(CEPart.S))
_ZY: tl.constexpr = tl.constexpr(int(CEPart.ZY))
_SZ: tl.constexpr = tl.constexpr(int(CEPart.SZ))
_NPART: tl.constexpr = tl.constexpr(N_CE_PARTS)


# ----------------------------------------------------------------------------------------- forward


@triton.jit
def ce_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, ent_ptr, am_ptr,
    N, V, H, stride_x, stride_w, tiles_per_split,
    cap, inv_cap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    ENTROPY: tl.constexpr, ARGMAX: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Partials (m, s, z_y, Σz) of one row block over one V split; with ENTROPY Σ e^{z−m}(z − m) into
    ent[split, row], with ARGMAX the split's first argmax into am[split, row] (int32)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows64, row_mask = tile_index(pid_n * BLOCK_N, N, BLOCK_N)
    y = tl.load(y_ptr + rows64, mask=row_mask, other=-1).to(tl.int64)

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    zy = tl.zeros([BLOCK_N], tl.float32)
    sz = tl.zeros([BLOCK_N], tl.float32)
    acc_ez = tl.zeros([BLOCK_N], tl.float32)
    am = tl.zeros([BLOCK_N], tl.int32)
    v_start, v_end = split_bounds(split, tiles_per_split, V, BLOCK_V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols64, col_mask = tile_index(v0, V, BLOCK_V)
        z_raw = logits_tile(x_ptr, w_ptr, rows64, row_mask, cols64, col_mask, H, stride_x, stride_w,
                            BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PREC)
        z, t = finish_logits(z_raw, b_ptr, cols64, col_mask, cap, inv_cap, HAS_BIAS, HAS_SOFTCAP)
        m_old = m
        s_old = s
        zm = tl.where(col_mask[None, :], z, float("-inf"))
        m, alpha, e, s = online_update(m, s, zm)
        if ENTROPY:
            shift = (tl.where(s_old > 0.0, m_old, m) - m) * s_old  # 0 before the first tile (m_old = −inf)
            acc_ez = alpha * (acc_ez + shift) + tl.sum(e * tl.where(col_mask[None, :], z - m[:, None], 0.0), 1)
        if ARGMAX:
            am = tl.where(tl.max(zm, 1) > m_old, v0 + tl.argmax(zm, 1).to(tl.int32), am)
        zy += tl.sum(tl.where(cols64[None, :] == y[:, None], z, 0.0), 1)
        if HAS_SMOOTHING:
            sz += tl.sum(tl.where(col_mask[None, :], z, 0.0), 1)

    base = part_ptr + (split.to(tl.int64) * N + rows64) * _NPART
    tl.store(base + _M, m, mask=row_mask)
    tl.store(base + _S, s, mask=row_mask)
    tl.store(base + _ZY, zy, mask=row_mask)
    tl.store(base + _SZ, sz, mask=row_mask)
    if ENTROPY:
        tl.store(ent_ptr + split.to(tl.int64) * N + rows64, acc_ez, mask=row_mask)
    if ARGMAX:
        tl.store(am_ptr + split.to(tl.int64) * N + rows64, am, mask=row_mask)


class CEForwardExt(NamedTuple):
    """:func:`ce_forward_ext`'s per-row outputs: loss and lse (fp32 [N]) and the extras asked for (else None):
    entropy H = −Σ_v p_v log p_v of softmax(z) (fp32 [N]) and argmax (int64 [N], ties → lowest index)."""

    loss: torch.Tensor
    lse: torch.Tensor
    entropy: Optional[torch.Tensor]
    argmax: Optional[torch.Tensor]


def _ce_forward_launch(x, w, b, y, opts: CEOptions, entropy: bool, argmax: bool):
    N, H = x.shape
    V = w.shape[0]
    cfg = pick_config("ce_fwd_ext" if (entropy or argmax) else "ce_fwd", N, V, H, x.device, x.dtype)
    per, n_split = split_ranges(V, cfg.BLOCK_V, cfg.SPLIT_V)
    part = torch.empty((n_split, N, N_CE_PARTS), device=x.device, dtype=torch.float32)
    ent = torch.empty((n_split, N), device=x.device, dtype=torch.float32) if entropy else None
    am = torch.empty((n_split, N), device=x.device, dtype=torch.int32) if argmax else None
    if N > 0:
        has_cap, cap, inv_cap = softcap_args(opts.softcap)
        upcast, prec = upcast_and_prec(x.dtype)
        grid = (triton.cdiv(N, cfg.BLOCK_N), n_split)
        ce_fwd_kernel[grid](
            x, w, b if b is not None else w, y, part, ent if entropy else part, am if argmax else part,
            N, V, H, x.stride(0), w.stride(0), per,
            cap, inv_cap,
            HAS_BIAS=b is not None, HAS_SOFTCAP=has_cap, HAS_SMOOTHING=opts.label_smoothing > 0,
            ENTROPY=entropy, ARGMAX=argmax,
            UPCAST=upcast, DOT_PREC=prec,
            BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_H=cfg.BLOCK_H,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return part, ent, am


@on_tensor_device
def ce_forward(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], y: torch.Tensor, opts: CEOptions):
    """Per-row CE loss and lse, both fp32 [N] (see lsa_kernels.backends)."""
    part, _, _ = _ce_forward_launch(x, w, b, y, opts, False, False)
    return merge_ce(part, y, w.shape[0], opts.ignore_index, opts.label_smoothing, opts.z_loss)


@on_tensor_device
def ce_forward_ext(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], y: torch.Tensor, opts: CEOptions,
                   *, entropy: bool = False, argmax: bool = False) -> CEForwardExt:
    """:func:`ce_forward` plus, in the same pass over V, the per-row entropy of softmax(z) and / or the argmax
    of z (docs/maths.md §3). The entropy is of every row (ignored targets included); its gradient:
    ``ce_backward(..., coef_entropy=, entropy=)``."""
    part, ent, am = _ce_forward_launch(x, w, b, y, opts, bool(entropy), bool(argmax))
    loss, lse = merge_ce(part, y, w.shape[0], opts.ignore_index, opts.label_smoothing, opts.z_loss)
    h, idx = merge_extras(part, lse, ent, am)
    return CEForwardExt(loss, lse, h, idx)


# ----------------------------------------------------------------------------------------- backward


@triton.jit
def ce_row_entropy(ent_ptr, cent_ptr, coef, rows64, row_mask, HAS_ENTROPY: tl.constexpr):
    """(H, entropy coefficient, live) of a row block: the entropy terms (0 without HAS_ENTROPY; the entropy's
    coefficient is NOT masked by ignore_index) and whether any row has a non-zero coefficient."""
    if HAS_ENTROPY:
        ent = tl.load(ent_ptr + rows64, mask=row_mask, other=0.0).to(tl.float32)
        cent = tl.load(cent_ptr + rows64, mask=row_mask, other=0.0).to(tl.float32)
        live = tl.sum(((coef != 0.0) | (cent != 0.0)).to(tl.int32), 0) > 0
    else:
        ent = coef
        cent = coef
        live = tl.sum((coef != 0.0).to(tl.int32), 0) > 0
    return ent, cent, live


@triton.jit
def ce_dz_tile(
    x_ptr, w_ptr, b_ptr, rows64, row_mask, cols64, col_mask, y, lse, coef, ent, cent,
    H, stride_x, stride_w, cap, inv_cap, one_minus_eps, eps_over_v, two_zloss,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr,
    HAS_ENTROPY: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """dz (fp32, w.r.t. the raw logits) of one row block × V tile; 0 on masked rows / columns."""
    z_raw = logits_tile(x_ptr, w_ptr, rows64, row_mask, cols64, col_mask, H, stride_x, stride_w,
                        BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PREC)
    z, t = finish_logits(z_raw, b_ptr, cols64, col_mask, cap, inv_cap, HAS_BIAS, HAS_SOFTCAP)
    p = tl.exp(tl.where(col_mask[None, :], z, float("-inf")) - lse[:, None])
    g = ce_grad(p, cols64[None, :] == y[:, None], col_mask, lse, one_minus_eps, eps_over_v, two_zloss,
                HAS_SMOOTHING, HAS_ZLOSS)
    g = g * coef[:, None]
    if HAS_ENTROPY:
        g += cent[:, None] * entropy_grad(p, tl.where(col_mask[None, :], z - lse[:, None], 0.0), ent)
    if HAS_SOFTCAP:
        g = g * (1.0 - t * t)
    return tl.where(col_mask[None, :] & row_mask[:, None], g, 0.0)


@triton.jit
def ce_bwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, coef_ptr, ent_ptr, cent_ptr, dx_ptr, dw_ptr, db_ptr,
    N, V, H, stride_x, stride_w, stride_dx, stride_dw,
    ignore_index, cap, inv_cap, one_minus_eps, eps_over_v, two_zloss,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, HAS_ENTROPY: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP: tl.constexpr,
):
    """Atomic backward: one program per (row block, V tile), grouped for L2 reuse."""
    pid_n, pid_v = grouped_pid(tl.program_id(0), N, V, BLOCK_N, BLOCK_V, GROUP)
    rows64, row_mask = tile_index(pid_n * BLOCK_N, N, BLOCK_N)
    y, coef = ce_row_coefs(y_ptr, coef_ptr, rows64, row_mask, ignore_index)
    ent, cent, live = ce_row_entropy(ent_ptr, cent_ptr, coef, rows64, row_mask, HAS_ENTROPY)
    if live:
        lse = tl.load(lse_ptr + rows64, mask=row_mask, other=0.0)
        cols64, col_mask = tile_index(pid_v * BLOCK_V, V, BLOCK_V)
        dz = ce_dz_tile(x_ptr, w_ptr, b_ptr, rows64, row_mask, cols64, col_mask, y, lse, coef, ent, cent,
                        H, stride_x, stride_w, cap, inv_cap, one_minus_eps, eps_over_v, two_zloss,
                        HAS_BIAS, HAS_SOFTCAP, HAS_SMOOTHING, HAS_ZLOSS, HAS_ENTROPY, UPCAST, DOT_PREC,
                        BLOCK_N, BLOCK_V, BLOCK_H)
        if NEED_DB:
            tl.atomic_add(db_ptr + cols64, tl.sum(dz, 0), mask=col_mask, sem="relaxed")
        if NEED_DX or NEED_DW:
            grad_gemms(dot_operand(dz, x_ptr, UPCAST), x_ptr, w_ptr, dx_ptr, dw_ptr, rows64, row_mask, cols64,
                       col_mask, H, stride_x, stride_w, stride_dx, stride_dw, NEED_DX, NEED_DW, UPCAST, DOT_PREC,
                       BLOCK_H)


@triton.jit
def ce_dz_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, coef_ptr, ent_ptr, cent_ptr, dz_ptr, dbpart_ptr,
    N, V, H, stride_x, stride_w, stride_dz,
    ignore_index, cap, inv_cap, one_minus_eps, eps_over_v, two_zloss,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr,
    NEED_DB: tl.constexpr, HAS_ENTROPY: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Deterministic backward, first half: the dz tile of (row block, V tile) of a row chunk (N rows, pointers
    already offset to the chunk) into the dz buffer; with NEED_DB its fp32 column sums into dbpart[row block]."""
    pid_n = tl.program_id(0)
    rows64, row_mask = tile_index(pid_n * BLOCK_N, N, BLOCK_N)
    cols64, col_mask = tile_index(tl.program_id(1) * BLOCK_V, V, BLOCK_V)
    y, coef = ce_row_coefs(y_ptr, coef_ptr, rows64, row_mask, ignore_index)
    ent, cent, live = ce_row_entropy(ent_ptr, cent_ptr, coef, rows64, row_mask, HAS_ENTROPY)
    dz = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    if live:
        lse = tl.load(lse_ptr + rows64, mask=row_mask, other=0.0)
        dz = ce_dz_tile(x_ptr, w_ptr, b_ptr, rows64, row_mask, cols64, col_mask, y, lse, coef, ent, cent,
                        H, stride_x, stride_w, cap, inv_cap, one_minus_eps, eps_over_v, two_zloss,
                        HAS_BIAS, HAS_SOFTCAP, HAS_SMOOTHING, HAS_ZLOSS, HAS_ENTROPY, UPCAST, DOT_PREC,
                        BLOCK_N, BLOCK_V, BLOCK_H)
    store_dz_tile(dz_ptr, dz, rows64, row_mask, cols64, col_mask, stride_dz, UPCAST)
    if NEED_DB:
        tl.store(dbpart_ptr + pid_n.to(tl.int64) * V + cols64, tl.sum(dz, 0), mask=col_mask)


@on_tensor_device
def ce_backward(
    x: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor],
    y: torch.Tensor,
    lse: torch.Tensor,
    coef: torch.Tensor,
    opts: CEOptions,
    dx_out: Optional[torch.Tensor],
    dw_out: Optional[torch.Tensor],
    db_out: Optional[torch.Tensor],
    *,
    coef_entropy: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
) -> None:
    """dx_out ← dz W; dw_out += dzᵀ x; db_out += Σ dz (see lsa_kernels.backends). With ``coef_entropy [N]``
    (and ``entropy [N]``, the H that :func:`ce_forward_ext` returned) dz also carries
    ``coef_entropy·∂H/∂z = −coef_entropy·p⊙(log p + H)`` (every row; not masked by ignore_index)."""
    if (coef_entropy is None) != (entropy is None):
        raise ValueError("coef_entropy and entropy go together: pass the forward's entropy with its coefficient")
    N, H = x.shape
    V = w.shape[0]
    if dx_out is not None:
        dx_out.zero_()
    if db_out is not None and b is None:
        db_out = None
    if N == 0 or (dx_out is None and dw_out is None and db_out is None):
        return
    coef = coef.to(torch.float32).contiguous()
    lse = lse.to(torch.float32).contiguous()
    has_ent = coef_entropy is not None
    if has_ent:
        for name, t in (("coef_entropy", coef_entropy), ("entropy", entropy)):
            if t.shape != (N,):
                raise ValueError(f"{name} must be [N] = [{N}], got {tuple(t.shape)}")
        ent = entropy.to(torch.float32).contiguous()
        cent = coef_entropy.to(torch.float32).contiguous()
    else:
        ent = cent = coef
    has_cap, cap, inv_cap = softcap_args(opts.softcap)
    upcast, prec = upcast_and_prec(x.dtype)
    eps = float(opts.label_smoothing)
    scal = (opts.ignore_index, cap, inv_cap, 1.0 - eps, eps / (opts.vocab_total or V), 2.0 * float(opts.z_loss))
    flags = dict(HAS_BIAS=b is not None, HAS_SOFTCAP=has_cap, HAS_SMOOTHING=eps > 0,
                 HAS_ZLOSS=opts.z_loss > 0, HAS_ENTROPY=has_ent, UPCAST=upcast, DOT_PREC=prec)
    bb = b if b is not None else w
    if opts.deterministic:
        _ce_backward_gemm(x, w, bb, y, lse, coef, ent, cent, opts, dx_out, dw_out, db_out, scal, flags)
        return
    cfg = pick_config("ce_bwd", N, V, H, x.device, x.dtype)
    dx = dx_out if dx_out is not None else coef
    dw = dw_out if dw_out is not None else coef
    db = db_out if db_out is not None else coef
    grid = (triton.cdiv(N, cfg.BLOCK_N) * triton.cdiv(V, cfg.BLOCK_V),)
    ce_bwd_kernel[grid](
        x, w, bb, y, lse, coef, ent, cent, dx, dw, db,
        N, V, H, x.stride(0), w.stride(0),
        dx_out.stride(0) if dx_out is not None else 0, dw_out.stride(0) if dw_out is not None else 0,
        *scal, **flags,
        NEED_DX=dx_out is not None, NEED_DW=dw_out is not None, NEED_DB=db_out is not None,
        BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_H=cfg.BLOCK_H, GROUP=cfg.GROUP,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _ce_backward_gemm(x, w, bb, y, lse, coef, ent, cent, opts, dx_out, dw_out, db_out, scal, flags) -> None:
    """deterministic=True: per row chunk, ce_dz_kernel writes dz, torch GEMMs form dx and dW (§14.3)."""
    N, H = x.shape
    V = w.shape[0]
    cfg = pick_config("ce_dz", N, V, H, x.device, x.dtype)
    C = det.chunk_rows(N, V, 1, x.dtype, opts.chunk_bytes)
    dz = torch.empty((C, V), device=x.device, dtype=x.dtype)
    need_db = db_out is not None
    dbpart = torch.empty((triton.cdiv(C, cfg.BLOCK_N), V), device=x.device, dtype=torch.float32) if need_db else coef
    w_op = det.gemm_operand(w) if dx_out is not None else None
    for r0 in range(0, N, C):
        n = min(C, N - r0)
        rows = slice(r0, r0 + n)
        grid = (triton.cdiv(n, cfg.BLOCK_N), triton.cdiv(V, cfg.BLOCK_V))
        ce_dz_kernel[grid](
            x[rows], w, bb, y[rows], lse[rows], coef[rows], ent[rows], cent[rows], dz, dbpart,
            n, V, H, x.stride(0), w.stride(0), dz.stride(0),
            *scal, **flags, NEED_DB=need_db,
            BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_H=cfg.BLOCK_H,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if dx_out is not None:
            det.mm_into(dx_out[rows], dz[:n], w_op)
        if dw_out is not None:
            det.addmm_into(dw_out, dz[:n].t(), det.gemm_operand(x[rows]))
        if need_db:
            db_out += dbpart[: grid[0]].sum(0)
