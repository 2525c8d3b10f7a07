"""Dense-target linear cross-entropy: probability targets and class-weighted label smoothing, the target tile
read next to the logits tile (docs/maths.md §11; contract ``ce_dense_*`` in lsa_kernels.backends.contract).

Row loss (§11; per row i, z = softcap(x_i Wᵀ + b) with c the softcap as in §3):

    T_iv = κ·t_iv·c_v + β·c_v + α_i·[v = y_i]            (lsa_kernels.targets.DenseTarget; c_v = 1 without
                                                           class weights, β = ε/V)
    ℓ_i  = A_i·lse_i + λ·ω_i·lse_i² − Σ_v T_iv z_iv,      A_i = Σ_v T_iv

Forward (:func:`dense_forward`; grid (row blocks, V splits)): each program walks its share of V, forms the
logits tile, loads the t tile ``[BLOCK_N, BLOCK_V]`` (any float dtype, to fp32) and the c tile ``[BLOCK_V]``
and accumulates, per row (online lse: §14.1),

    m ← max(m, max_v z),  s ← s·e^{m_old − m} + Σ_v e^{z − m}        (lse = m + log s)
    tz = Σ_v t c z      tm = Σ_v t c      cz = Σ_v c z      zy = z_y   (plain sums)

into an ``[S, N, 6]`` fp32 scratch (columns :class:`DensePart`) merged with torch: lse as
:func:`merge.merge_lse`, the sums add (§14.1). The caller (lsa_kernels.weights) forms, §11,

    A = κ·tm + β·Σ_v c_v + α,      Σ_v T z = κ·tz + β·cz + α·zy.

Backward (:func:`dense_backward`; §11 with p = softmax(z), per row the lse coefficient
``g_p = coef·(A + 2λω·lse)`` and ``coef`` given):

    dz_iv = (g_p,i·p_iv − coef_i·T_iv)·(1 − tanh²(z_raw,iv / c))      (∂ℓ/∂z_raw, softcap's chain rule: §3)
    dx = dz W,   dW += dzᵀ x,   db += Σ_i dz_i                           (§14.3)
    dt_iv = coef_i·κ·c_v·(lse_i − z_iv)                                  (∂ℓ/∂t, only when asked: NEED_DT)

with the atomic one-kernel path (as kernels/ce.py ``ce_bwd_kernel``) or, ``deterministic=True``, a dz kernel
plus torch GEMMs per row chunk (kernels/deterministic.py, §14.3); dz is rounded to the input dtype before the
gradient GEMMs (§14.4). Row blocks whose coefficients are all zero skip their logits GEMM (their dt tile is
left at the zeros the launcher wrote). Offsets are int64.
"""

from __future__ import annotations

import enum
from typing import Optional

import torch
import triton
import triton.language as tl

from ..options import CEOptions
from ..targets import DenseOut, DenseTarget
from . import deterministic as det
from ._common import on_tensor_device, pick_config, softcap_args, split_ranges, upcast_and_prec
from .atomics import grad_gemms
from .merge import merge_lse
from .tiles import dot_operand, finish_logits, grouped_pid, logits_tile, online_update, split_bounds, store_dz_tile, tile_index


class DensePart(enum.IntEnum):
    """Columns of the dense forward's ``[S, N, 6]`` partials (module docstring)."""

    M = 0  # running max of z
    S = 1  # Σ e^{z − M}
    TZ = 2  # Σ_v t c z
    TM = 3  # Σ_v t c
    CZ = 4  # Σ_v c z
    ZY = 5  # z at the target column (0 when the target is not in the split)


N_DENSE_PARTS = len(DensePart)
# the columns as constexprs for the kernel
_M: tl.constexpr = tl.constexpr(int(DensePart.M))
_S: tl.constexpr = tl.constexpr(int(DensePart.S))
_TZ: tl.constexpr = tl.constexpr(int(DensePart.TZ))
_TM: tl.constexpr = tl.constexpr(int(DensePart.TM))
_CZ: tl.constexpr = tl.constexpr(int(DensePart.CZ))
_ZY: tl.constexpr = tl.constexpr(int(DensePart.ZY))
_NPART: tl.constexpr = tl.constexpr(N_DENSE_PARTS)


@triton.jit
def dense_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, t_ptr, c_ptr, part_ptr,
    N, V, H, stride_x, stride_w, stride_t, tiles_per_split, cap, inv_cap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_Y: tl.constexpr, HAS_T: tl.constexpr,
    HAS_C: tl.constexpr, HAS_CZ: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Partials (m, s, tz, tm, cz, zy) of one row block over one V split (module docstring)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows64, row_mask = tile_index(pid_n * BLOCK_N, N, BLOCK_N)
    if HAS_Y:
        y = tl.load(y_ptr + rows64, mask=row_mask, other=-1).to(tl.int64)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    tz = tl.zeros([BLOCK_N], tl.float32)
    tm = tl.zeros([BLOCK_N], tl.float32)
    cz = tl.zeros([BLOCK_N], tl.float32)
    zy = tl.zeros([BLOCK_N], tl.float32)
    v_start, v_end = split_bounds(split, tiles_per_split, V, BLOCK_V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols64, col_mask = tile_index(v0, V, BLOCK_V)
        z_raw = logits_tile(x_ptr, w_ptr, rows64, row_mask, cols64, col_mask, H, stride_x, stride_w,
                            BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PREC)
        z, th = finish_logits(z_raw, b_ptr, cols64, col_mask, cap, inv_cap, HAS_BIAS, HAS_SOFTCAP)
        zm = tl.where(col_mask[None, :], z, float("-inf"))
        m, alpha, e, s = online_update(m, s, zm)
        z0 = tl.where(col_mask[None, :] & row_mask[:, None], z, 0.0)
        if HAS_C:
            c = tl.load(c_ptr + cols64, mask=col_mask, other=0.0).to(tl.float32)
        if HAS_T:
            tt = tl.load(t_ptr + rows64[:, None] * stride_t + cols64[None, :],
                         mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
            if HAS_C:
                tt = tt * c[None, :]
            tz += tl.sum(tt * z0, 1)
            tm += tl.sum(tt, 1)
        if HAS_CZ:
            if HAS_C:
                cz += tl.sum(z0 * c[None, :], 1)
            else:
                cz += tl.sum(z0, 1)
        if HAS_Y:
            zy += tl.sum(tl.where(cols64[None, :] == y[:, None], z0, 0.0), 1)
    base = part_ptr + (split.to(tl.int64) * N + rows64) * _NPART
    tl.store(base + _M, m, mask=row_mask)
    tl.store(base + _S, s, mask=row_mask)
    tl.store(base + _TZ, tz, mask=row_mask)
    tl.store(base + _TM, tm, mask=row_mask)
    tl.store(base + _CZ, cz, mask=row_mask)
    tl.store(base + _ZY, zy, mask=row_mask)


def _rows_of(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` as the kernels read it: rows at stride(0), columns contiguous (a vocab shard's column slice of a
    full target as it is: no copy)."""
    if t is None or t.stride(-1) == 1:
        return t
    return t.contiguous()


def _flags(x, b, y, T: DenseTarget, opts: CEOptions):
    has_cap, cap, inv_cap = softcap_args(opts.softcap)
    upcast, prec = upcast_and_prec(x.dtype)
    return (cap, inv_cap), dict(HAS_BIAS=b is not None, HAS_SOFTCAP=has_cap, HAS_Y=y is not None,
                                HAS_T=T.t is not None, HAS_C=T.c is not None, UPCAST=upcast, DOT_PREC=prec)


@on_tensor_device
def dense_forward(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], y: Optional[torch.Tensor],
                  T: DenseTarget, opts: CEOptions) -> DenseOut:
    """Per-row lse, Σ t c z, Σ t c, Σ c z, z_y (fp32 [N]; module docstring, contract.DenseOut)."""
    N, H = x.shape
    V = w.shape[0]
    cfg = pick_config("dense_fwd", N, V, H, x.device, x.dtype)
    per, n_split = split_ranges(V, cfg.BLOCK_V, cfg.SPLIT_V)
    part = torch.zeros((n_split, N, N_DENSE_PARTS), device=x.device, dtype=torch.float32)
    t = _rows_of(T.t)
    c = None if T.c is None else T.c.to(torch.float32).contiguous()
    if N > 0:
        scal, flags = _flags(x, b, y, T, opts)
        dense_fwd_kernel[(triton.cdiv(N, cfg.BLOCK_N), n_split)](
            x, w, b if b is not None else w, y if y is not None else part, t if t is not None else part,
            c if c is not None else part, part,
            N, V, H, x.stride(0), w.stride(0), 0 if t is None else t.stride(0), per, *scal,
            **flags, HAS_CZ=T.beta != 0,
            BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_H=cfg.BLOCK_H,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    lse = merge_lse(part[..., DensePart.M], part[..., DensePart.S])
    tz, tm, cz, zy = (part[..., col].sum(0) for col in (DensePart.TZ, DensePart.TM, DensePart.CZ, DensePart.ZY))
    return DenseOut(lse, tz, tm, cz, zy)


@triton.jit
def dense_dz_tile(
    x_ptr, w_ptr, b_ptr, t_ptr, c_ptr, dt_ptr, rows64, row_mask, cols64, col_mask, y, lse, gp, ct, cb, ca,
    H, stride_x, stride_w, stride_t, stride_dt, cap, inv_cap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_Y: tl.constexpr, HAS_T: tl.constexpr,
    HAS_C: tl.constexpr, HAS_CB: tl.constexpr, NEED_DT: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """dz (fp32, w.r.t. the raw logits) of one row block × V tile, 0 on masked rows / columns; with NEED_DT
    the tile of dt = ct·c⊙(lse − z) is stored (ct = coef·κ per row)."""
    z_raw = logits_tile(x_ptr, w_ptr, rows64, row_mask, cols64, col_mask, H, stride_x, stride_w,
                        BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PREC)
    z, th = finish_logits(z_raw, b_ptr, cols64, col_mask, cap, inv_cap, HAS_BIAS, HAS_SOFTCAP)
    mask2 = row_mask[:, None] & col_mask[None, :]
    p = tl.exp(tl.where(col_mask[None, :], z, float("-inf")) - lse[:, None])
    g = gp[:, None] * p
    if HAS_C:
        c = tl.load(c_ptr + cols64, mask=col_mask, other=0.0).to(tl.float32)
    if HAS_T:
        tt = tl.load(t_ptr + rows64[:, None] * stride_t + cols64[None, :], mask=mask2, other=0.0).to(tl.float32)
        if HAS_C:
            tt = tt * c[None, :]
        g -= ct[:, None] * tt
    if HAS_CB:
        if HAS_C:
            g -= cb[:, None] * c[None, :]
        else:
            g -= cb[:, None]
    if HAS_Y:
        g -= tl.where(cols64[None, :] == y[:, None], ca[:, None], 0.0)
    if NEED_DT:
        d = ct[:, None] * (lse[:, None] - z)
        if HAS_C:
            d = d * c[None, :]
        tl.store(dt_ptr + rows64[:, None] * stride_dt + cols64[None, :], d, mask=mask2)
    if HAS_SOFTCAP:
        g = g * (1.0 - th * th)
    return tl.where(mask2, g, 0.0)


@triton.jit
def dense_row_coefs(y_ptr, gp_ptr, ct_ptr, cb_ptr, ca_ptr, rows64, row_mask, HAS_Y: tl.constexpr):
    """(y, g_p, coef·κ, coef·β, coef·α, live) of a row block (0 on masked rows)."""
    gp = tl.load(gp_ptr + rows64, mask=row_mask, other=0.0)
    ct = tl.load(ct_ptr + rows64, mask=row_mask, other=0.0)
    cb = tl.load(cb_ptr + rows64, mask=row_mask, other=0.0)
    ca = tl.load(ca_ptr + rows64, mask=row_mask, other=0.0)
    y = rows64
    if HAS_Y:
        y = tl.load(y_ptr + rows64, mask=row_mask, other=-1).to(tl.int64)
    live = tl.sum(((gp != 0.0) | (ct != 0.0) | (cb != 0.0) | (ca != 0.0)).to(tl.int32), 0) > 0
    return y, gp, ct, cb, ca, live


@triton.jit
def dense_bwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, t_ptr, c_ptr, lse_ptr, gp_ptr, ct_ptr, cb_ptr, ca_ptr, dt_ptr, dx_ptr, dw_ptr,
    db_ptr, N, V, H, stride_x, stride_w, stride_t, stride_dt, stride_dx, stride_dw, cap, inv_cap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_Y: tl.constexpr, HAS_T: tl.constexpr,
    HAS_C: tl.constexpr, HAS_CB: tl.constexpr, NEED_DT: tl.constexpr, NEED_DX: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP: tl.constexpr,
):
    """Atomic backward: one program per (row block, V tile), grouped for L2 reuse (as ce.ce_bwd_kernel)."""
    pid_n, pid_v = grouped_pid(tl.program_id(0), N, V, BLOCK_N, BLOCK_V, GROUP)
    rows64, row_mask = tile_index(pid_n * BLOCK_N, N, BLOCK_N)
    y, gp, ct, cb, ca, live = dense_row_coefs(y_ptr, gp_ptr, ct_ptr, cb_ptr, ca_ptr, rows64, row_mask, HAS_Y)
    if live:
        lse = tl.load(lse_ptr + rows64, mask=row_mask, other=0.0)
        cols64, col_mask = tile_index(pid_v * BLOCK_V, V, BLOCK_V)
        dz = dense_dz_tile(x_ptr, w_ptr, b_ptr, t_ptr, c_ptr, dt_ptr, rows64, row_mask, cols64, col_mask, y, lse,
                           gp, ct, cb, ca, H, stride_x, stride_w, stride_t, stride_dt, cap, inv_cap,
                           HAS_BIAS, HAS_SOFTCAP, HAS_Y, HAS_T, HAS_C, HAS_CB, NEED_DT, UPCAST, DOT_PREC,
                           BLOCK_N, BLOCK_V, BLOCK_H)
        if NEED_DB:
            tl.atomic_add(db_ptr + cols64, tl.sum(dz, 0), mask=col_mask, sem="relaxed")
        if NEED_DX or NEED_DW:
            grad_gemms(dot_operand(dz, x_ptr, UPCAST), x_ptr, w_ptr, dx_ptr, dw_ptr, rows64, row_mask, cols64,
                       col_mask, H, stride_x, stride_w, stride_dx, stride_dw, NEED_DX, NEED_DW, UPCAST, DOT_PREC,
                       BLOCK_H)


@triton.jit
def dense_dz_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, t_ptr, c_ptr, lse_ptr, gp_ptr, ct_ptr, cb_ptr, ca_ptr, dt_ptr, dz_ptr, dbpart_ptr,
    N, V, H, stride_x, stride_w, stride_t, stride_dt, stride_dz, cap, inv_cap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_Y: tl.constexpr, HAS_T: tl.constexpr,
    HAS_C: tl.constexpr, HAS_CB: tl.constexpr, NEED_DT: tl.constexpr, NEED_DB: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Deterministic backward, first half: the dz tile of (row block, V tile) of a row chunk (pointers already
    offset to the chunk) into the dz buffer; with NEED_DB its column sums into dbpart[row block]."""
    pid_n = tl.program_id(0)
    rows64, row_mask = tile_index(pid_n * BLOCK_N, N, BLOCK_N)
    cols64, col_mask = tile_index(tl.program_id(1) * BLOCK_V, V, BLOCK_V)
    y, gp, ct, cb, ca, live = dense_row_coefs(y_ptr, gp_ptr, ct_ptr, cb_ptr, ca_ptr, rows64, row_mask, HAS_Y)
    dz = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    if live:
        lse = tl.load(lse_ptr + rows64, mask=row_mask, other=0.0)
        dz = dense_dz_tile(x_ptr, w_ptr, b_ptr, t_ptr, c_ptr, dt_ptr, rows64, row_mask, cols64, col_mask, y, lse,
                           gp, ct, cb, ca, H, stride_x, stride_w, stride_t, stride_dt, cap, inv_cap,
                           HAS_BIAS, HAS_SOFTCAP, HAS_Y, HAS_T, HAS_C, HAS_CB, NEED_DT, UPCAST, DOT_PREC,
                           BLOCK_N, BLOCK_V, BLOCK_H)
    store_dz_tile(dz_ptr, dz, rows64, row_mask, cols64, col_mask, stride_dz, UPCAST)
    if NEED_DB:
        tl.store(dbpart_ptr + pid_n.to(tl.int64) * V + cols64, tl.sum(dz, 0), mask=col_mask)


@on_tensor_device
def dense_backward(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], y: Optional[torch.Tensor],
                   T: DenseTarget, lse: torch.Tensor, coef_p: torch.Tensor, coef: torch.Tensor, opts: CEOptions,
                   dx_out: Optional[torch.Tensor], dw_out: Optional[torch.Tensor], db_out: Optional[torch.Tensor],
                   dt_out: Optional[torch.Tensor] = None) -> None:
    """dx_out ← dz W; dw_out += dzᵀ x; db_out += Σ dz; dt_out ← ∂/∂t (fp32 [N, V]) (module docstring)."""
    N, H = x.shape
    V = w.shape[0]
    if dx_out is not None:
        dx_out.zero_()
    if dt_out is not None:
        if dt_out.dtype != torch.float32 or not dt_out.is_contiguous() or T.t is None:
            raise ValueError("dt_out must be a contiguous fp32 [N, V] buffer, with a probability target T.t")
        dt_out.zero_()
    if db_out is not None and b is None:
        db_out = None
    if N == 0 or (dx_out is None and dw_out is None and db_out is None and dt_out is None):
        return
    f32 = torch.float32
    coef = coef.to(f32)
    gp = coef_p.to(f32).contiguous()
    ct = (coef * T.kappa).contiguous()
    cb = (coef * T.beta).contiguous()
    ca = (coef * T.alpha.to(f32)).contiguous() if (T.alpha is not None and y is not None) else torch.zeros_like(coef)
    lse = lse.to(f32).contiguous()
    t = _rows_of(T.t)
    c = None if T.c is None else T.c.to(f32).contiguous()
    scal, flags = _flags(x, b, y, T, opts)
    flags.update(HAS_CB=T.beta != 0, NEED_DT=dt_out is not None)
    bb = b if b is not None else w
    yy = y if y is not None else coef
    tp = t if t is not None else coef
    cp = c if c is not None else coef
    dtp = dt_out if dt_out is not None else coef
    st = 0 if t is None else t.stride(0)
    sdt = 0 if dt_out is None else dt_out.stride(0)
    if dt_out is not None and dt_out.shape != t.shape:
        raise ValueError(f"dt_out must have the probability target's shape {tuple(t.shape)}, got {tuple(dt_out.shape)}")
    if opts.deterministic:
        cfg = pick_config("dense_dz", N, V, H, x.device, x.dtype)
        C = det.chunk_rows(N, V, 1, x.dtype, opts.chunk_bytes)
        dz = torch.empty((C, V), device=x.device, dtype=x.dtype)
        need_db = db_out is not None
        dbpart = torch.empty((triton.cdiv(C, cfg.BLOCK_N), V), device=x.device, dtype=f32) if need_db else coef
        w_op = det.gemm_operand(w) if dx_out is not None else None
        for r0 in range(0, N, C):
            n = min(C, N - r0)
            r = slice(r0, r0 + n)
            grid = (triton.cdiv(n, cfg.BLOCK_N), triton.cdiv(V, cfg.BLOCK_V))
            dense_dz_kernel[grid](
                x[r], w, bb, yy[r] if y is not None else yy, tp[r] if t is not None else tp, cp, lse[r], gp[r],
                ct[r], cb[r], ca[r], dtp[r] if dt_out is not None else dtp, dz, dbpart,
                n, V, H, x.stride(0), w.stride(0), st, sdt, dz.stride(0), *scal, **flags, NEED_DB=need_db,
                BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_H=cfg.BLOCK_H,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
            if dx_out is not None:
                det.mm_into(dx_out[r], dz[:n], w_op)
            if dw_out is not None:
                det.addmm_into(dw_out, dz[:n].t(), det.gemm_operand(x[r]))
            if need_db:
                db_out += dbpart[: grid[0]].sum(0)
        return
    cfg = pick_config("dense_bwd", N, V, H, x.device, x.dtype)
    grid = (triton.cdiv(N, cfg.BLOCK_N) * triton.cdiv(V, cfg.BLOCK_V),)
    dense_bwd_kernel[grid](
        x, w, bb, yy, tp, cp, lse, gp, ct, cb, ca, dtp,
        dx_out if dx_out is not None else coef, dw_out if dw_out is not None else coef,
        db_out if db_out is not None else coef,
        N, V, H, x.stride(0), w.stride(0), st, sdt,
        dx_out.stride(0) if dx_out is not None else 0, dw_out.stride(0) if dw_out is not None else 0,
        *scal, **flags, NEED_DX=dx_out is not None, NEED_DW=dw_out is not None, NEED_DB=db_out is not None,
        BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_H=cfg.BLOCK_H, GROUP=cfg.GROUP,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
