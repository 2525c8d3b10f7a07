"""Fused linear cross-entropy: logits are formed tile by tile in SRAM and never reach global memory.

Forward (per row i, z = softcap(x_i Wᵀ + b), c the softcap, ε label smoothing, λ z-loss):

    lse_i  = log Σ_v exp(z_iv)            online over V tiles: m ← max(m, max_v z),
                                          s ← s·exp(m_old − m) + Σ_v exp(z − m),  lse = m + log s
    ℓ_i    = (1−ε)(lse_i − z_{i,y_i}) + ε(lse_i − (1/V) Σ_v z_iv) + λ·lse_i²     (0 if y_i ignored)

Grid: (row blocks, V splits). With one split a program walks all of V; with S splits each program walks
V/S and writes its partial (m, s, z_y, Σz) to an ``[S, N, 4]`` fp32 scratch that :func:`_merge_ce`
folds with plain torch ops (no host sync). Splitting fills the GPU when N/BLOCK_N < #SMs.

Backward (per unit of the row coefficient g_i = coef_i):

    dz_iv = g_i·(softmax(z_i)_v·(1 + 2λ·lse_i) − (1−ε)·[v = y_i] − ε/V)·(1 − tanh²(z_raw,iv / c))
    dx    = dz W            dW += dzᵀ x            db += Σ_i dz_i

Design of the backward, and why:

* ``deterministic=False`` (default): ONE kernel over the (row block × V tile) grid. Each program
  recomputes its logits tile once, forms dz in registers, then walks H once more and adds
  ``dz @ W[tile]`` into dx and ``dzᵀ @ x[block]`` into dW with fp32 atomics. Cost: one logits GEMM
  plus the two gradient GEMMs (the minimum for a recompute design) and a grid of N/BN × V/BV programs
  that fills any GPU. Atomics make the fp32 summation order vary from run to run (≈1 ulp noise).
  The grid is grouped by row blocks (GROUP) so the W tiles of a group stay in L2.
* ``deterministic=True``: no atomics. Two kernels, each owner of what it writes: a dx kernel over row
  blocks (walks every V tile, recomputes z, read-modify-writes its own dx rows in a fixed order) and a
  dW kernel over V tiles (walks every row block, recomputes z, read-modify-writes its own dW rows and
  accumulates db in registers). Bit-identical run to run, at the price of one extra logits GEMM.
  Either kernel is skipped when its output is not asked for.

Row blocks whose coefficients are all zero (ignored / unselected rows) skip all their work.
Offsets are int64 (row · stride, col · stride), so N·H, N·V and V·H may pass 2^31.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..options import CEOptions
from ._common import (
    ce_grad_,
    dot_operand_,
    grouped_pid_,
    on_tensor_device,
    finish_logits_,
    logits_tile_,
    online_update_,
    pick_config,
    softcap_args,
    split_ranges,
    upcast_and_prec,
)

N_CE_PARTIALS = 4  # m, s, z_y, Σz


# ----------------------------------------------------------------------------------------- forward


@triton.jit
def _ce_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, part_ptr,
    N, V, H, stride_x, stride_w, tiles_per_split,
    cap, inv_cap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    y = tl.load(y_ptr + rows64, mask=row_mask, other=-1).to(tl.int64)

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    zy = tl.zeros([BLOCK_N], tl.float32)
    sz = tl.zeros([BLOCK_N], tl.float32)
    v_start = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(V, v_start + tiles_per_split * BLOCK_V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        cols64 = cols.to(tl.int64)
        acc = logits_tile_(x_ptr, w_ptr, rows64, row_mask, cols64, col_mask, H, stride_x, stride_w,
                           BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PREC)
        z, t = finish_logits_(acc, b_ptr, cols64, col_mask, cap, inv_cap, HAS_BIAS, HAS_SOFTCAP)
        zm = tl.where(col_mask[None, :], z, float("-inf"))
        m, alpha, e, s = online_update_(m, s, zm)
        zy += tl.sum(tl.where(cols64[None, :] == y[:, None], z, 0.0), 1)
        if HAS_SMOOTHING:
            sz += tl.sum(tl.where(col_mask[None, :], z, 0.0), 1)

    base = part_ptr + (split.to(tl.int64) * N + rows64) * 4
    tl.store(base + 0, m, mask=row_mask)
    tl.store(base + 1, s, mask=row_mask)
    tl.store(base + 2, zy, mask=row_mask)
    tl.store(base + 3, sz, mask=row_mask)


def _merge_lse(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """lse from per-split (m, s) of shape [S, N] (S may be 1)."""
    if m.shape[0] == 1:
        return m[0] + torch.log(s[0])
    M = m.max(dim=0).values
    return M + torch.log((s * torch.exp(m - M)).sum(dim=0))


def _merge_ce(part: torch.Tensor, y: torch.Tensor, V: int, opts: CEOptions):
    """(loss_row, lse) from the [S, N, 4] partials."""
    lse = _merge_lse(part[..., 0], part[..., 1])
    zy = part[..., 2].sum(dim=0)
    eps = float(opts.label_smoothing)
    loss = (1.0 - eps) * (lse - zy)
    if eps > 0:
        loss = loss + eps * (lse - part[..., 3].sum(dim=0) / V)
    if opts.z_loss > 0:
        loss = loss + float(opts.z_loss) * lse * lse
    loss = torch.where(y != opts.ignore_index, loss, torch.zeros_like(loss))
    return loss, lse


@on_tensor_device
def ce_forward(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], y: torch.Tensor, opts: CEOptions):
    """Per-row CE loss and lse, both fp32 [N] (see lsa_kernels.backends)."""
    N, H = x.shape
    V = w.shape[0]
    cfg = pick_config("ce_fwd", N, V, H, x.device, x.dtype)
    per, n_split = split_ranges(V, cfg.BLOCK_V, cfg.SPLIT_V)
    part = torch.empty((n_split, N, N_CE_PARTIALS), device=x.device, dtype=torch.float32)
    if N > 0:
        has_cap, cap, inv_cap = softcap_args(opts.softcap)
        upcast, prec = upcast_and_prec(x.dtype)
        grid = (triton.cdiv(N, cfg.BLOCK_N), n_split)
        _ce_fwd_kernel[grid](
            x, w, b if b is not None else w, y, part,
            N, V, H, x.stride(0), w.stride(0), per,
            cap, inv_cap,
            HAS_BIAS=b is not None, HAS_SOFTCAP=has_cap, HAS_SMOOTHING=opts.label_smoothing > 0,
            UPCAST=upcast, DOT_PREC=prec,
            BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_H=cfg.BLOCK_H,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return _merge_ce(part, y, V, opts)


# ----------------------------------------------------------------------------------------- backward


@triton.jit
def _ce_dz_tile(
    x_ptr, w_ptr, b_ptr, rows64, row_mask, cols64, col_mask, y, lse, coef,
    H, stride_x, stride_w, cap, inv_cap, one_minus_eps, eps_over_v, two_zloss,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """dz (fp32, w.r.t. the raw logits) of one row block × V tile; 0 on masked rows / columns."""
    acc = logits_tile_(x_ptr, w_ptr, rows64, row_mask, cols64, col_mask, H, stride_x, stride_w,
                       BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PREC)
    z, t = finish_logits_(acc, b_ptr, cols64, col_mask, cap, inv_cap, HAS_BIAS, HAS_SOFTCAP)
    p = tl.exp(tl.where(col_mask[None, :], z, float("-inf")) - lse[:, None])
    g = ce_grad_(p, cols64[None, :] == y[:, None], col_mask, lse, one_minus_eps, eps_over_v, two_zloss,
                 HAS_SMOOTHING, HAS_ZLOSS)
    g = g * coef[:, None]
    if HAS_SOFTCAP:
        g = g * (1.0 - t * t)
    return tl.where(col_mask[None, :] & row_mask[:, None], g, 0.0)


@triton.jit
def _ce_bwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, coef_ptr, dx_ptr, dw_ptr, db_ptr,
    N, V, H, stride_x, stride_w, stride_dx, stride_dw,
    ignore_index, cap, inv_cap, one_minus_eps, eps_over_v, two_zloss,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP: tl.constexpr,
):
    """Atomic variant: one program per (row block, V tile), grouped for L2 reuse."""
    pid_n, pid_v = grouped_pid_(tl.program_id(0), N, V, BLOCK_N, BLOCK_V, GROUP)

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    y = tl.load(y_ptr + rows64, mask=row_mask, other=ignore_index).to(tl.int64)
    coef = tl.load(coef_ptr + rows64, mask=row_mask, other=0.0).to(tl.float32)
    coef = tl.where(y == ignore_index, 0.0, coef)
    if tl.sum((coef != 0.0).to(tl.int32), 0) > 0:
        lse = tl.load(lse_ptr + rows64, mask=row_mask, other=0.0)
        cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        cols64 = cols.to(tl.int64)
        dz = _ce_dz_tile(x_ptr, w_ptr, b_ptr, rows64, row_mask, cols64, col_mask, y, lse, coef,
                         H, stride_x, stride_w, cap, inv_cap, one_minus_eps, eps_over_v, two_zloss,
                         HAS_BIAS, HAS_SOFTCAP, HAS_SMOOTHING, HAS_ZLOSS, UPCAST, DOT_PREC,
                         BLOCK_N, BLOCK_V, BLOCK_H)
        if NEED_DB:
            tl.atomic_add(db_ptr + cols64, tl.sum(dz, 0), mask=col_mask, sem="relaxed")
        if NEED_DX or NEED_DW:
            dzc = dot_operand_(dz, x_ptr, UPCAST)
            for h0 in range(0, H, BLOCK_H):
                offs_h = h0 + tl.arange(0, BLOCK_H)
                h_mask = offs_h < H
                if NEED_DX:
                    wt = tl.load(w_ptr + cols64[:, None] * stride_w + offs_h[None, :],
                                 mask=col_mask[:, None] & h_mask[None, :], other=0.0)
                    if UPCAST:
                        wt = wt.to(tl.float32)
                    dx = tl.dot(dzc, wt, input_precision=DOT_PREC)
                    tl.atomic_add(dx_ptr + rows64[:, None] * stride_dx + offs_h[None, :], dx,
                                  mask=row_mask[:, None] & h_mask[None, :], sem="relaxed")
                if NEED_DW:
                    xt = tl.load(x_ptr + rows64[:, None] * stride_x + offs_h[None, :],
                                 mask=row_mask[:, None] & h_mask[None, :], other=0.0)
                    if UPCAST:
                        xt = xt.to(tl.float32)
                    dw = tl.dot(tl.trans(dzc), xt, input_precision=DOT_PREC)
                    tl.atomic_add(dw_ptr + cols64[:, None] * stride_dw + offs_h[None, :], dw,
                                  mask=col_mask[:, None] & h_mask[None, :], sem="relaxed")


@triton.jit
def _ce_bwd_dx_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, coef_ptr, dx_ptr,
    N, V, H, stride_x, stride_w, stride_dx,
    ignore_index, cap, inv_cap, one_minus_eps, eps_over_v, two_zloss,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Deterministic dx: one program per row block, V tiles in a fixed order, dx rows owned (dx pre-zeroed)."""
    pid_n = tl.program_id(0)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    y = tl.load(y_ptr + rows64, mask=row_mask, other=ignore_index).to(tl.int64)
    coef = tl.load(coef_ptr + rows64, mask=row_mask, other=0.0).to(tl.float32)
    coef = tl.where(y == ignore_index, 0.0, coef)
    if tl.sum((coef != 0.0).to(tl.int32), 0) > 0:
        lse = tl.load(lse_ptr + rows64, mask=row_mask, other=0.0)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_mask = cols < V
            cols64 = cols.to(tl.int64)
            dz = _ce_dz_tile(x_ptr, w_ptr, b_ptr, rows64, row_mask, cols64, col_mask, y, lse, coef,
                             H, stride_x, stride_w, cap, inv_cap, one_minus_eps, eps_over_v, two_zloss,
                             HAS_BIAS, HAS_SOFTCAP, HAS_SMOOTHING, HAS_ZLOSS, UPCAST, DOT_PREC,
                             BLOCK_N, BLOCK_V, BLOCK_H)
            dzc = dot_operand_(dz, x_ptr, UPCAST)
            for h0 in range(0, H, BLOCK_H):
                offs_h = h0 + tl.arange(0, BLOCK_H)
                h_mask = offs_h < H
                wt = tl.load(w_ptr + cols64[:, None] * stride_w + offs_h[None, :],
                             mask=col_mask[:, None] & h_mask[None, :], other=0.0)
                if UPCAST:
                    wt = wt.to(tl.float32)
                ptrs = dx_ptr + rows64[:, None] * stride_dx + offs_h[None, :]
                m2 = row_mask[:, None] & h_mask[None, :]
                cur = tl.load(ptrs, mask=m2, other=0.0)
                tl.store(ptrs, tl.dot(dzc, wt, cur, input_precision=DOT_PREC), mask=m2)


@triton.jit
def _ce_bwd_dw_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, coef_ptr, dw_ptr, db_ptr,
    N, V, H, stride_x, stride_w, stride_dw,
    ignore_index, cap, inv_cap, one_minus_eps, eps_over_v, two_zloss,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Deterministic dW/db: one program per V tile, row blocks in a fixed order, dW rows owned."""
    pid_v = tl.program_id(0)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    cols64 = cols.to(tl.int64)
    db_acc = tl.zeros([BLOCK_V], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        rows64 = rows.to(tl.int64)
        y = tl.load(y_ptr + rows64, mask=row_mask, other=ignore_index).to(tl.int64)
        coef = tl.load(coef_ptr + rows64, mask=row_mask, other=0.0).to(tl.float32)
        coef = tl.where(y == ignore_index, 0.0, coef)
        if tl.sum((coef != 0.0).to(tl.int32), 0) > 0:
            lse = tl.load(lse_ptr + rows64, mask=row_mask, other=0.0)
            dz = _ce_dz_tile(x_ptr, w_ptr, b_ptr, rows64, row_mask, cols64, col_mask, y, lse, coef,
                             H, stride_x, stride_w, cap, inv_cap, one_minus_eps, eps_over_v, two_zloss,
                             HAS_BIAS, HAS_SOFTCAP, HAS_SMOOTHING, HAS_ZLOSS, UPCAST, DOT_PREC,
                             BLOCK_N, BLOCK_V, BLOCK_H)
            if NEED_DB:
                db_acc += tl.sum(dz, 0)
            if NEED_DW:
                dzt = tl.trans(dot_operand_(dz, x_ptr, UPCAST))
                for h0 in range(0, H, BLOCK_H):
                    offs_h = h0 + tl.arange(0, BLOCK_H)
                    h_mask = offs_h < H
                    xt = tl.load(x_ptr + rows64[:, None] * stride_x + offs_h[None, :],
                                 mask=row_mask[:, None] & h_mask[None, :], other=0.0)
                    if UPCAST:
                        xt = xt.to(tl.float32)
                    ptrs = dw_ptr + cols64[:, None] * stride_dw + offs_h[None, :]
                    m2 = col_mask[:, None] & h_mask[None, :]
                    cur = tl.load(ptrs, mask=m2, other=0.0)
                    tl.store(ptrs, tl.dot(dzt, xt, cur, input_precision=DOT_PREC), mask=m2)
    if NEED_DB:
        cur_b = tl.load(db_ptr + cols64, mask=col_mask, other=0.0)
        tl.store(db_ptr + cols64, cur_b + db_acc, mask=col_mask)


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
) -> None:
    """dx_out ← dz W; dw_out += dzᵀ x; db_out += Σ dz (see lsa_kernels.backends)."""
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
    has_cap, cap, inv_cap = softcap_args(opts.softcap)
    upcast, prec = upcast_and_prec(x.dtype)
    eps = float(opts.label_smoothing)
    scal = (opts.ignore_index, cap, inv_cap, 1.0 - eps, eps / (opts.vocab_total or V), 2.0 * float(opts.z_loss))
    flags = dict(HAS_BIAS=b is not None, HAS_SOFTCAP=has_cap, HAS_SMOOTHING=eps > 0,
                 HAS_ZLOSS=opts.z_loss > 0, UPCAST=upcast, DOT_PREC=prec)
    bb = b if b is not None else w
    if not opts.deterministic:
        cfg = pick_config("ce_bwd", N, V, H, x.device, x.dtype)
        dx = dx_out if dx_out is not None else coef
        dw = dw_out if dw_out is not None else coef
        db = db_out if db_out is not None else coef
        grid = (triton.cdiv(N, cfg.BLOCK_N) * triton.cdiv(V, cfg.BLOCK_V),)
        _ce_bwd_kernel[grid](
            x, w, bb, y, lse, coef, dx, dw, db,
            N, V, H, x.stride(0), w.stride(0),
            dx_out.stride(0) if dx_out is not None else 0, dw_out.stride(0) if dw_out is not None else 0,
            *scal, **flags,
            NEED_DX=dx_out is not None, NEED_DW=dw_out is not None, NEED_DB=db_out is not None,
            BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_H=cfg.BLOCK_H, GROUP=cfg.GROUP,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return
    if dx_out is not None:
        cfg = pick_config("ce_bwd_dx", N, V, H, x.device, x.dtype)
        _ce_bwd_dx_kernel[(triton.cdiv(N, cfg.BLOCK_N),)](
            x, w, bb, y, lse, coef, dx_out,
            N, V, H, x.stride(0), w.stride(0), dx_out.stride(0),
            *scal, **flags,
            BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_H=cfg.BLOCK_H,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    if dw_out is not None or db_out is not None:
        cfg = pick_config("ce_bwd_dw", N, V, H, x.device, x.dtype)
        _ce_bwd_dw_kernel[(triton.cdiv(V, cfg.BLOCK_V),)](
            x, w, bb, y, lse, coef, dw_out if dw_out is not None else coef, db_out if db_out is not None else coef,
            N, V, H, x.stride(0), w.stride(0), dw_out.stride(0) if dw_out is not None else 0,
            *scal, **flags,
            NEED_DW=dw_out is not None, NEED_DB=db_out is not None,
            BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_H=cfg.BLOCK_H,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
