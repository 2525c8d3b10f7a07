"""Pair backward: dz of both views (CE and divergence) per tile, then the gradient GEMMs.

docs/maths.md §3 (CE gradient), §5 (∂D/∂a, ∂D/∂b), §14.3 (atomic vs deterministic), §14.4 (rounding of dz).
Recompute both logits tiles; a = z_p/τ, b = z_q/τ, p = softmax(a), q = softmax(b), u = a − b, and X, Y the
statistics of the forward (lsa_kernels.maths, columns maths.Stat):

    sce          dD/da = p − q − p⊙(b − X)       dD/db = q − p − q⊙(a − Y)
    kl           dD/da = p⊙(u − X)               dD/db = q − p
    kl_reverse   dD/da = p − q                   dD/db = q⊙(Y − u)
    sym_kl       dD/da = p⊙(u − X) + p − q       dD/db = q⊙(Y − u) + q − p
    js           dD/da = ½p⊙(log(p/m) − X)       dD/db = ½q⊙(log(q/m) − Y)       (tiles.log_ratio_to_mid)

    dz_p = coef_ce_p·(softmax(z_p)(1 + 2λ·lse_p) − (1−ε)onehot(y_p) − ε/V) + (coef_div/τ)·dD/da   [GRAD_P]
    dz_q likewise;  both × softcap'(z_raw) = 1 − tanh²(z_raw/c)
    HAS_ENTROPY (long-short's per-view entropies, docs/maths.md §4; e = the entropy's coefficient, H the
    forward's entropy, s = softmax(z) at τ = 1):  dz_p += e_p·(−s_p⊙(log s_p + H_p)), likewise dz_q
    (before the softcap derivative; every row, not masked by ignore_index)
    dx_p = dz_p W,  dx_q = dz_q W,  dW += dz_pᵀ x_p + dz_qᵀ x_q,  db += Σ(dz_p + dz_q)

* :func:`pair_bwd_kernel` (default): atomics over a (row block × V tile) grid, as ce.py's backward; both
  views' dW contributions are summed in registers before ONE relaxed atomic per chunk.
* :func:`pair_dz_kernel` (``deterministic``): writes dz_p and dz_q of a row chunk, rounded to the input
  dtype, into a buffer; torch GEMMs form dx and dW (kernels/deterministic.py).

With a detached view whose CE is off (linear_divergence with detach), its dz is identically zero: the
constexprs USE_GP / USE_GQ drop its GEMMs. CE_P / CE_Q (with WITH_CE): whether each view has a CE term
(distillation: the student's CE only, §12); a view with neither CE nor divergence gradient has USE_G* off.

TWO_HEADS (docs/maths.md §12: teacher = view p, student = view q): z_p = softcap(x_p W_pᵀ + b_p) over H and
z_q = softcap(x_q W_qᵀ + b_q) over Hq; the dz formulas are the same, the GEMMs split by head:
dx_p = dz_p W_p, dW_p += dz_pᵀ x_p, db_p += Σ dz_p (dw/db buffers) and dx_q = dz_q W_q, dW_q += dz_qᵀ x_q,
db_q += Σ dz_q (dwq/dbq buffers).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..maths import Stat
from .atomics import grad_gemms
from .tiles import (
    KL, KL_REVERSE, SCE, SYM_KL, ce_grad, ce_row_coefs, dot_operand, entropy_grad, grouped_pid, load_h_tile,
    log_ratio_to_mid, pair_softmax, pair_tile_logits, store_dz_tile, tile_index,
)

# statistics columns (maths.Stat) as constexprs for the kernels (same shape as pair_phase1's merge.PairPart
# block, other enum: a jit kernel reads module-level constexprs by name, so each file names its own)
_LSE_P: tl.constexpr = tl.constexpr(int(Stat.LSE_P))
_LSE_Q: tl.constexpr = tl.constexpr(int(Stat.LSE_Q))
_LSET_P: tl.constexpr = tl.constexpr(int(Stat.LSET_P))
_LSET_Q: tl.constexpr = tl.constexpr(int(Stat.LSET_Q))
_X: tl.constexpr = tl.constexpr(int(Stat.X))
_Y: tl.constexpr = tl.constexpr(int(Stat.Y))


@triton.jit
def view_ce_row(y_ptr, c_ptr, rows64, row_mask, ignore_index, like, CE: tl.constexpr):
    """(targets, CE coefficients) of one view's row block (:func:`tiles.ce_row_coefs`); without CE targets −1
    and coefficients 0 (``like``'s shape)."""
    if CE:
        y, c = ce_row_coefs(y_ptr, c_ptr, rows64, row_mask, ignore_index)
    else:
        y = tl.zeros_like(rows64) - 1
        c = tl.zeros_like(like)
    return y, c


@triton.jit
def pair_row_loads(
    yp_ptr, yq_ptr, stats_ptr, cp_ptr, cq_ptr, cd_ptr, ent_ptr, cent_ptr, rows64, row_mask, stride_st,
    ignore_index, inv_temp, WITH_CE: tl.constexpr, CE_P: tl.constexpr, CE_Q: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
):
    """Per-row inputs of the backward: targets, statistics and coefficients (0 on masked / ignored rows), and
    with HAS_ENTROPY each view's entropy and its coefficient ([N, 2] arrays; else the div coefficients, unused);
    ``live``: whether any row of the block has a non-zero coefficient."""
    st = stats_ptr + rows64 * stride_st
    lse_p = tl.load(st + _LSE_P, mask=row_mask, other=0.0)
    lse_q = tl.load(st + _LSE_Q, mask=row_mask, other=0.0)
    lset_p = tl.load(st + _LSET_P, mask=row_mask, other=0.0)
    lset_q = tl.load(st + _LSET_Q, mask=row_mask, other=0.0)
    sx = tl.load(st + _X, mask=row_mask, other=0.0)
    sy = tl.load(st + _Y, mask=row_mask, other=0.0)
    cd = tl.load(cd_ptr + rows64, mask=row_mask, other=0.0).to(tl.float32) * inv_temp
    if WITH_CE:
        yp, cp = view_ce_row(yp_ptr, cp_ptr, rows64, row_mask, ignore_index, cd, CE_P)
        yq, cq = view_ce_row(yq_ptr, cq_ptr, rows64, row_mask, ignore_index, cd, CE_Q)
    else:
        yp, cp = view_ce_row(yp_ptr, cp_ptr, rows64, row_mask, ignore_index, cd, False)
        yq, cq = yp, cp
    nz = (cp != 0.0) | (cq != 0.0) | (cd != 0.0)
    if HAS_ENTROPY:
        ent_p = tl.load(ent_ptr + rows64 * 2, mask=row_mask, other=0.0).to(tl.float32)
        ent_q = tl.load(ent_ptr + rows64 * 2 + 1, mask=row_mask, other=0.0).to(tl.float32)
        ce_p = tl.load(cent_ptr + rows64 * 2, mask=row_mask, other=0.0).to(tl.float32)
        ce_q = tl.load(cent_ptr + rows64 * 2 + 1, mask=row_mask, other=0.0).to(tl.float32)
        nz = nz | (ce_p != 0.0) | (ce_q != 0.0)
    else:
        ent_p, ent_q, ce_p, ce_q = cd, cd, cd, cd
    live = tl.sum(nz.to(tl.int32), 0) > 0
    return yp, yq, lse_p, lse_q, lset_p, lset_q, sx, sy, cp, cq, cd, ent_p, ent_q, ce_p, ce_q, live


@triton.jit
def pair_dz_tiles(
    xp_ptr, xq_ptr, w_ptr, b_ptr, wq_ptr, bq_ptr, rows64, row_mask, cols64, col_mask,
    yp, yq, lse_p, lse_q, lset_p, lset_q, sx, sy, cp, cq, cd, ent_p, ent_q, ce_p, ce_q,
    H, Hq, stride_xp, stride_xq, stride_w, stride_wq, cap, inv_cap, inv_temp, one_minus_eps, eps_over_v, two_zloss,
    DIV: tl.constexpr, TEMP_ONE: tl.constexpr, GRAD_P: tl.constexpr, GRAD_Q: tl.constexpr,
    WITH_CE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_ZLOSS: tl.constexpr, CE_P: tl.constexpr, CE_Q: tl.constexpr, TWO_HEADS: tl.constexpr,
    HAS_BIAS_Q: tl.constexpr, HAS_ENTROPY: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """(dz_p, dz_q) w.r.t. the raw logits of one row block × V tile (fp32; 0 on masked entries)."""
    zp, tp, zq, tq, av, bv = pair_tile_logits(
        xp_ptr, xq_ptr, w_ptr, b_ptr, wq_ptr, bq_ptr, rows64, row_mask, cols64, col_mask, H, Hq,
        stride_xp, stride_xq, stride_w, stride_wq, cap, inv_cap, inv_temp, TEMP_ONE, HAS_BIAS, HAS_SOFTCAP,
        TWO_HEADS, HAS_BIAS_Q, UPCAST, DOT_PREC, BLOCK_N, BLOCK_V, BLOCK_H)
    cm = col_mask[None, :]
    logp, logq, p, q = pair_softmax(av, bv, lset_p, lset_q, col_mask)
    X = sx[:, None]
    Y = sy[:, None]
    u = av - bv
    if DIV == SCE:
        da = p - q - p * (bv - X)
        db = q - p - q * (av - Y)
    elif DIV == KL:
        da = p * (u - X)
        db = q - p
    elif DIV == KL_REVERSE:
        da = p - q
        db = q * (Y - u)
    elif DIV == SYM_KL:
        da = p * (u - X) + p - q
        db = q * (Y - u) + q - p
    else:  # js
        d = logq - logp
        da = 0.5 * p * (log_ratio_to_mid(d) - X)
        db = 0.5 * q * (log_ratio_to_mid(-d) - Y)
    gp = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    gq = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    if GRAD_P:
        gp = cd[:, None] * da
    if GRAD_Q:
        gq = cd[:, None] * db
    if WITH_CE or HAS_ENTROPY:
        if TEMP_ONE:
            sm_p = p
            sm_q = q
        else:
            sm_p = tl.where(cm, tl.exp(zp - lse_p[:, None]), 0.0)
            sm_q = tl.where(cm, tl.exp(zq - lse_q[:, None]), 0.0)
    if HAS_ENTROPY:
        gp += ce_p[:, None] * entropy_grad(sm_p, tl.where(cm, zp - lse_p[:, None], 0.0), ent_p)
        gq += ce_q[:, None] * entropy_grad(sm_q, tl.where(cm, zq - lse_q[:, None], 0.0), ent_q)
    if WITH_CE:
        if CE_P:
            gp += cp[:, None] * ce_grad(sm_p, cols64[None, :] == yp[:, None], col_mask, lse_p, one_minus_eps,
                                        eps_over_v, two_zloss, HAS_SMOOTHING, HAS_ZLOSS)
        if CE_Q:
            gq += cq[:, None] * ce_grad(sm_q, cols64[None, :] == yq[:, None], col_mask, lse_q, one_minus_eps,
                                        eps_over_v, two_zloss, HAS_SMOOTHING, HAS_ZLOSS)
    if HAS_SOFTCAP:
        gp = gp * (1.0 - tp * tp)
        gq = gq * (1.0 - tq * tq)
    m2 = cm & row_mask[:, None]
    return tl.where(m2, gp, 0.0), tl.where(m2, gq, 0.0)


@triton.jit
def pair_bwd_kernel(
    xp_ptr, xq_ptr, w_ptr, b_ptr, wq_ptr, bq_ptr, yp_ptr, yq_ptr, stats_ptr, cp_ptr, cq_ptr, cd_ptr,
    ent_ptr, cent_ptr, dxp_ptr, dxq_ptr, dw_ptr, db_ptr, dwq_ptr, dbq_ptr,
    N, V, H, Hq, stride_xp, stride_xq, stride_w, stride_wq, stride_dxp, stride_dxq, stride_dw, stride_dwq,
    stride_st, ignore_index, cap, inv_cap, inv_temp, one_minus_eps, eps_over_v, two_zloss,
    DIV: tl.constexpr, TEMP_ONE: tl.constexpr, GRAD_P: tl.constexpr, GRAD_Q: tl.constexpr,
    WITH_CE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_ZLOSS: tl.constexpr, USE_GP: tl.constexpr, USE_GQ: tl.constexpr,
    NEED_DXP: tl.constexpr, NEED_DXQ: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    CE_P: tl.constexpr, CE_Q: tl.constexpr, TWO_HEADS: tl.constexpr, HAS_BIAS_Q: tl.constexpr,
    NEED_DWQ: tl.constexpr, NEED_DBQ: tl.constexpr, HAS_ENTROPY: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP: tl.constexpr,
):
    """Atomic backward: one program per (row block, V tile), grouped for L2 reuse. One head: NEED_DW / NEED_DB
    take both views; TWO_HEADS: NEED_DW / NEED_DB are view p's head, NEED_DWQ / NEED_DBQ view q's."""
    pid_n, pid_v = grouped_pid(tl.program_id(0), N, V, BLOCK_N, BLOCK_V, GROUP)
    rows64, row_mask = tile_index(pid_n * BLOCK_N, N, BLOCK_N)
    yp, yq, lse_p, lse_q, lset_p, lset_q, sx, sy, cp, cq, cd, ent_p, ent_q, ce_p, ce_q, live = pair_row_loads(
        yp_ptr, yq_ptr, stats_ptr, cp_ptr, cq_ptr, cd_ptr, ent_ptr, cent_ptr, rows64, row_mask, stride_st,
        ignore_index, inv_temp, WITH_CE, CE_P, CE_Q, HAS_ENTROPY)
    if live:  # the loads + pair_dz_tiles calls repeat pair_dz_kernel's; only the skip of dead blocks differs
        cols64, col_mask = tile_index(pid_v * BLOCK_V, V, BLOCK_V)
        gp, gq = pair_dz_tiles(
            xp_ptr, xq_ptr, w_ptr, b_ptr, wq_ptr, bq_ptr, rows64, row_mask, cols64, col_mask,
            yp, yq, lse_p, lse_q, lset_p, lset_q, sx, sy, cp, cq, cd, ent_p, ent_q, ce_p, ce_q,
            H, Hq, stride_xp, stride_xq, stride_w, stride_wq, cap, inv_cap, inv_temp, one_minus_eps, eps_over_v,
            two_zloss, DIV, TEMP_ONE, GRAD_P, GRAD_Q, WITH_CE, HAS_BIAS, HAS_SOFTCAP, HAS_SMOOTHING, HAS_ZLOSS,
            CE_P, CE_Q, TWO_HEADS, HAS_BIAS_Q, HAS_ENTROPY, UPCAST, DOT_PREC, BLOCK_N, BLOCK_V, BLOCK_H)
        if TWO_HEADS:
            if NEED_DB:
                tl.atomic_add(db_ptr + cols64, tl.sum(gp, 0), mask=col_mask, sem="relaxed")
            if NEED_DBQ:
                tl.atomic_add(dbq_ptr + cols64, tl.sum(gq, 0), mask=col_mask, sem="relaxed")
        elif NEED_DB:
            tl.atomic_add(db_ptr + cols64, tl.sum(gp + gq, 0), mask=col_mask, sem="relaxed")
        gpc = dot_operand(gp, xp_ptr, UPCAST)
        gqc = dot_operand(gq, xp_ptr, UPCAST)
        if TWO_HEADS:
            if NEED_DXP or NEED_DW:
                grad_gemms(gpc, xp_ptr, w_ptr, dxp_ptr, dw_ptr, rows64, row_mask, cols64, col_mask, H, stride_xp,
                           stride_w, stride_dxp, stride_dw, NEED_DXP, NEED_DW, UPCAST, DOT_PREC, BLOCK_H)
            if NEED_DXQ or NEED_DWQ:
                grad_gemms(gqc, xq_ptr, wq_ptr, dxq_ptr, dwq_ptr, rows64, row_mask, cols64, col_mask, Hq,
                           stride_xq, stride_wq, stride_dxq, stride_dwq, NEED_DXQ, NEED_DWQ, UPCAST, DOT_PREC,
                           BLOCK_H)
        elif NEED_DXP or NEED_DXQ or NEED_DW:
            for h0 in range(0, H, BLOCK_H):
                offs_h = h0 + tl.arange(0, BLOCK_H)
                h_mask = offs_h < H
                mx = row_mask[:, None] & h_mask[None, :]
                if NEED_DXP or NEED_DXQ:
                    wt = load_h_tile(w_ptr, cols64, col_mask, stride_w, offs_h, h_mask, UPCAST)
                    if NEED_DXP:
                        tl.atomic_add(dxp_ptr + rows64[:, None] * stride_dxp + offs_h[None, :],
                                      tl.dot(gpc, wt, input_precision=DOT_PREC), mask=mx, sem="relaxed")
                    if NEED_DXQ:
                        tl.atomic_add(dxq_ptr + rows64[:, None] * stride_dxq + offs_h[None, :],
                                      tl.dot(gqc, wt, input_precision=DOT_PREC), mask=mx, sem="relaxed")
                if NEED_DW:
                    dw = tl.zeros([BLOCK_V, BLOCK_H], tl.float32)
                    if USE_GP:
                        xpt = load_h_tile(xp_ptr, rows64, row_mask, stride_xp, offs_h, h_mask, UPCAST)
                        dw = tl.dot(tl.trans(gpc), xpt, dw, input_precision=DOT_PREC)
                    if USE_GQ:
                        xqt = load_h_tile(xq_ptr, rows64, row_mask, stride_xq, offs_h, h_mask, UPCAST)
                        dw = tl.dot(tl.trans(gqc), xqt, dw, input_precision=DOT_PREC)
                    tl.atomic_add(dw_ptr + cols64[:, None] * stride_dw + offs_h[None, :], dw,
                                  mask=col_mask[:, None] & h_mask[None, :], sem="relaxed")


@triton.jit
def pair_dz_kernel(
    xp_ptr, xq_ptr, w_ptr, b_ptr, wq_ptr, bq_ptr, yp_ptr, yq_ptr, stats_ptr, cp_ptr, cq_ptr, cd_ptr,
    ent_ptr, cent_ptr, dzp_ptr, dzq_ptr, dbpart_ptr, dbqpart_ptr,
    N, V, H, Hq, stride_xp, stride_xq, stride_w, stride_wq, stride_dz,
    stride_st, ignore_index, cap, inv_cap, inv_temp, one_minus_eps, eps_over_v, two_zloss,
    DIV: tl.constexpr, TEMP_ONE: tl.constexpr, GRAD_P: tl.constexpr, GRAD_Q: tl.constexpr,
    WITH_CE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_ZLOSS: tl.constexpr, USE_GP: tl.constexpr, USE_GQ: tl.constexpr, NEED_DB: tl.constexpr,
    CE_P: tl.constexpr, CE_Q: tl.constexpr, TWO_HEADS: tl.constexpr, HAS_BIAS_Q: tl.constexpr,
    NEED_DBQ: tl.constexpr, HAS_ENTROPY: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Deterministic backward, first half: dz_p / dz_q tiles of (row block, V tile) of a row chunk (N rows,
    pointers offset to the chunk) into the dz buffers (USE_GP / USE_GQ); with NEED_DB the fp32 column sums
    of dz_p + dz_q into dbpart[row block] (TWO_HEADS: Σ dz_p there and, with NEED_DBQ, Σ dz_q in dbqpart)."""
    pid_n = tl.program_id(0)
    rows64, row_mask = tile_index(pid_n * BLOCK_N, N, BLOCK_N)
    cols64, col_mask = tile_index(tl.program_id(1) * BLOCK_V, V, BLOCK_V)
    yp, yq, lse_p, lse_q, lset_p, lset_q, sx, sy, cp, cq, cd, ent_p, ent_q, ce_p, ce_q, live = pair_row_loads(
        yp_ptr, yq_ptr, stats_ptr, cp_ptr, cq_ptr, cd_ptr, ent_ptr, cent_ptr, rows64, row_mask, stride_st,
        ignore_index, inv_temp, WITH_CE, CE_P, CE_Q, HAS_ENTROPY)
    gp = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    gq = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    if live:
        gp, gq = pair_dz_tiles(
            xp_ptr, xq_ptr, w_ptr, b_ptr, wq_ptr, bq_ptr, rows64, row_mask, cols64, col_mask,
            yp, yq, lse_p, lse_q, lset_p, lset_q, sx, sy, cp, cq, cd, ent_p, ent_q, ce_p, ce_q,
            H, Hq, stride_xp, stride_xq, stride_w, stride_wq, cap, inv_cap, inv_temp, one_minus_eps, eps_over_v,
            two_zloss, DIV, TEMP_ONE, GRAD_P, GRAD_Q, WITH_CE, HAS_BIAS, HAS_SOFTCAP, HAS_SMOOTHING, HAS_ZLOSS,
            CE_P, CE_Q, TWO_HEADS, HAS_BIAS_Q, HAS_ENTROPY, UPCAST, DOT_PREC, BLOCK_N, BLOCK_V, BLOCK_H)
    if USE_GP:
        store_dz_tile(dzp_ptr, gp, rows64, row_mask, cols64, col_mask, stride_dz, UPCAST)
    if USE_GQ:
        store_dz_tile(dzq_ptr, gq, rows64, row_mask, cols64, col_mask, stride_dz, UPCAST)
    if TWO_HEADS:
        if NEED_DB:
            tl.store(dbpart_ptr + pid_n.to(tl.int64) * V + cols64, tl.sum(gp, 0), mask=col_mask)
        if NEED_DBQ:
            tl.store(dbqpart_ptr + pid_n.to(tl.int64) * V + cols64, tl.sum(gq, 0), mask=col_mask)
    elif NEED_DB:
        tl.store(dbpart_ptr + pid_n.to(tl.int64) * V + cols64, tl.sum(gp + gq, 0), mask=col_mask)
