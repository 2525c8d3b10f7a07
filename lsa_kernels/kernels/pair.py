"""Fused two-view loss: CE(p), CE(q) and the divergence D(p, q) in one pass over V (docs/maths.md §3, §5).

Views: z_p = softcap(x_p Wᵀ + b), z_q = softcap(x_q Wᵀ + b); each W chunk is loaded ONCE per tile step
and used by both views' dots. Divergence logits a = z_p/τ, b = z_q/τ; p = softmax(a), q = softmax(b),
u = a − b (formed per element).

Forward, phase 1 (online over V tiles, every running sum rescaled by exp(m_old − m_new) when its max moves):

    CE stats     m_z, s_z = Σ e^{z−m_z}, z_y, Σ_v z        → lse(z), ℓ as in ce.py       (each view)
    lse of a, b  m_a, s_a, m_b, s_b                          (shared with the CE stats when τ == 1)
    divergence   X, Y of lsa_kernels.maths, from weighted sums:
        sce         X = Σ e^{a−m_a}·b / s_a         Y = Σ e^{b−m_b}·a / s_b
        kl          X = Σ e^{a−m_a}·u / s_a         Y = Σ e^{a−m_a}·expm1(−u) / s_a
                    (every expm1 argument clamped at maths.EXPM1_CLAMP = 80: no 0·inf)
        kl_reverse  X = Σ e^{b−m_b}·expm1(u) / s_b  Y = Σ e^{b−m_b}·u / s_b
        sym_kl      X = Σ e^{a−m_a}·u / s_a         Y = Σ e^{b−m_b}·u / s_b
                    X2 = Σ e^{a−m_a}·expm1(−u) / s_a  Y2 = Σ e^{b−m_b}·expm1(u) / s_b
                    (D = X + log1p(X2) + log1p(Y2) − Y: both KLs in the cancellation-free form)
    js, phase 2 (a second pass, needs lse_a, lse_b):
        X = Σ p·log(p/m),  Y = Σ q·log(q/m),  log(p/m) = −log1p(expm1(log q − log p)/2) (see _common)
        (``pair_js_partial`` runs phase 2 alone for given lse_a, lse_b: with a vocab shard's W and the
        whole vocabulary's normalisers it gives that shard's share of X and Y; lsa_kernels.distributed)

The per-row value D is :func:`lsa_kernels.maths.divergence_from_stats` of the [N, 8] stats.
Grid: (row blocks, V splits); splits write partial statistics to an [S, N, k] fp32 scratch merged by
a few torch ops (no host sync, no rows×V tensor).

Backward (recompute both tiles; per unit of a and b, from lsa_kernels.maths):

    sce          dD/da = p − q − p⊙(b − X)       dD/db = q − p − q⊙(a − Y)
    kl           dD/da = p⊙(u − X)               dD/db = q − p
    kl_reverse   dD/da = p − q                   dD/db = q⊙(Y − u)
    sym_kl       dD/da = p⊙(u − X) + p − q       dD/db = q⊙(Y − u) + q − p
    js           dD/da = ½p⊙(log p − log m − X)  dD/db = ½q⊙(log q − log m − Y)

    dz_p = coef_ce_p·(softmax(z_p)(1 + 2λ·lse_p) − (1−ε)onehot(y_p) − ε/V) + (coef_div/τ)·dD/da   [GRAD_P]
    dz_q likewise;  both × softcap'(z_raw) = 1 − tanh²(z_raw/c)
    dx_p = dz_p W,  dx_q = dz_q W,  dW += dz_pᵀ x_p + dz_qᵀ x_q,  db += Σ(dz_p + dz_q)

The backward design is the one of ce.py (read its header): atomics over a (row block × V tile) grid by
default — one recompute, both views' dW contributions summed in registers before ONE atomic per chunk —
and, when ``deterministic``, an owner-writes dx kernel over row blocks plus a dW kernel over V tiles.
With a detached view whose CE is off (linear_divergence with detach), its dz is identically zero: the
constexprs USE_GP / USE_GQ drop its GEMMs.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..options import N_PAIR_STATS, STAT_X2, STAT_Y2, PairOptions
from ..maths import EXPM1_CLAMP, Divergence, divergence_from_stats
from ._common import (
    ce_grad_,
    dot_operand_,
    grouped_pid_,
    on_tensor_device,
    expm1_,
    finish_logits_,
    log_ratio_to_mid_,
    logits_tile2_,
    online_update_,
    pick_config,
    softcap_args,
    split_ranges,
    upcast_and_prec,
)
from .ce import _merge_lse

# expm1 arguments are clamped (lsa_kernels.maths: e^80 is finite in fp32; rows where it could bite take
# the lse difference in divergence_from_stats instead)
_CLAMP = tl.constexpr(EXPM1_CLAMP)
DIVERGENCE_IDS = {d.label: int(d) for d in Divergence}
N_P1 = 16  # phase-1 partials: m_p s_p zy_p sz_p m_q s_q zy_q sz_q m_a s_a m_b s_b accX accY accX2 accY2


# ----------------------------------------------------------------------------------------- forward


@triton.jit
def _pair_fwd_kernel(
    xp_ptr, xq_ptr, w_ptr, b_ptr, yp_ptr, yq_ptr, lset_ptr, part_ptr,
    N, V, H, stride_xp, stride_xq, stride_w, tiles_per_split,
    cap, inv_cap, inv_temp,
    DIV: tl.constexpr, PHASE: tl.constexpr, TEMP_ONE: tl.constexpr,
    WITH_CE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    zero = tl.zeros([BLOCK_N], tl.float32)
    ninf = tl.full([BLOCK_N], float("-inf"), tl.float32)
    if WITH_CE:
        yp = tl.load(yp_ptr + rows64, mask=row_mask, other=-1).to(tl.int64)
        yq = tl.load(yq_ptr + rows64, mask=row_mask, other=-1).to(tl.int64)
    if PHASE == 2:
        lset_p = tl.load(lset_ptr + rows64 * 2 + 0, mask=row_mask, other=0.0)
        lset_q = tl.load(lset_ptr + rows64 * 2 + 1, mask=row_mask, other=0.0)
    m_p, s_p, zy_p, sz_p = ninf, zero, zero, zero
    m_q, s_q, zy_q, sz_q = ninf, zero, zero, zero
    m_a, s_a, m_b, s_b = ninf, zero, ninf, zero
    acc_x, acc_y, acc_x2, acc_y2 = zero, zero, zero, zero

    v_start = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(V, v_start + tiles_per_split * BLOCK_V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        cols64 = cols.to(tl.int64)
        cm = col_mask[None, :]
        lp_, lq_ = logits_tile2_(xp_ptr, xq_ptr, w_ptr, rows64, row_mask, cols64, col_mask, H,
                                 stride_xp, stride_xq, stride_w, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PREC)
        zp, tp = finish_logits_(lp_, b_ptr, cols64, col_mask, cap, inv_cap, HAS_BIAS, HAS_SOFTCAP)
        zq, tq = finish_logits_(lq_, b_ptr, cols64, col_mask, cap, inv_cap, HAS_BIAS, HAS_SOFTCAP)
        if TEMP_ONE:
            av = tl.where(cm, zp, 0.0)
            bv = tl.where(cm, zq, 0.0)
        else:
            av = tl.where(cm, zp * inv_temp, 0.0)
            bv = tl.where(cm, zq * inv_temp, 0.0)
        if PHASE == 1:
            m_p, al_p, e_p, s_p = online_update_(m_p, s_p, tl.where(cm, zp, float("-inf")))
            m_q, al_q, e_q, s_q = online_update_(m_q, s_q, tl.where(cm, zq, float("-inf")))
            if WITH_CE:
                zy_p += tl.sum(tl.where(cols64[None, :] == yp[:, None], zp, 0.0), 1)
                zy_q += tl.sum(tl.where(cols64[None, :] == yq[:, None], zq, 0.0), 1)
                if HAS_SMOOTHING:
                    sz_p += tl.sum(tl.where(cm, zp, 0.0), 1)
                    sz_q += tl.sum(tl.where(cm, zq, 0.0), 1)
            if TEMP_ONE:
                al_a, e_a, al_b, e_b = al_p, e_p, al_q, e_q
            else:
                m_a, al_a, e_a, s_a = online_update_(m_a, s_a, tl.where(cm, av, float("-inf")))
                m_b, al_b, e_b, s_b = online_update_(m_b, s_b, tl.where(cm, bv, float("-inf")))
            u = av - bv
            if DIV == 0:  # sce
                acc_x = acc_x * al_a + tl.sum(e_a * bv, 1)
                acc_y = acc_y * al_b + tl.sum(e_b * av, 1)
            elif DIV == 1:  # kl
                acc_x = acc_x * al_a + tl.sum(e_a * u, 1)
                acc_y = acc_y * al_a + tl.sum(e_a * expm1_(tl.minimum(-u, _CLAMP)), 1)
            elif DIV == 2:  # kl_reverse
                acc_x = acc_x * al_b + tl.sum(e_b * expm1_(tl.minimum(u, _CLAMP)), 1)
                acc_y = acc_y * al_b + tl.sum(e_b * u, 1)
            elif DIV == 3:  # sym_kl = KL(p||q) + KL(q||p), each in the expm1 form
                acc_x = acc_x * al_a + tl.sum(e_a * u, 1)
                acc_y = acc_y * al_b + tl.sum(e_b * u, 1)
                acc_x2 = acc_x2 * al_a + tl.sum(e_a * expm1_(tl.minimum(-u, _CLAMP)), 1)
                acc_y2 = acc_y2 * al_b + tl.sum(e_b * expm1_(tl.minimum(u, _CLAMP)), 1)
        else:  # PHASE 2: js terms
            lp = av - lset_p[:, None]
            lq = bv - lset_q[:, None]
            p = tl.where(cm, tl.exp(lp), 0.0)
            q = tl.where(cm, tl.exp(lq), 0.0)
            d = lq - lp
            acc_x += tl.sum(p * log_ratio_to_mid_(d), 1)
            acc_y += tl.sum(q * log_ratio_to_mid_(-d), 1)

    if PHASE == 1:
        if TEMP_ONE:
            m_a, s_a, m_b, s_b = m_p, s_p, m_q, s_q
        base = part_ptr + (split.to(tl.int64) * N + rows64) * 16
        tl.store(base + 0, m_p, mask=row_mask)
        tl.store(base + 1, s_p, mask=row_mask)
        tl.store(base + 2, zy_p, mask=row_mask)
        tl.store(base + 3, sz_p, mask=row_mask)
        tl.store(base + 4, m_q, mask=row_mask)
        tl.store(base + 5, s_q, mask=row_mask)
        tl.store(base + 6, zy_q, mask=row_mask)
        tl.store(base + 7, sz_q, mask=row_mask)
        tl.store(base + 8, m_a, mask=row_mask)
        tl.store(base + 9, s_a, mask=row_mask)
        tl.store(base + 10, m_b, mask=row_mask)
        tl.store(base + 11, s_b, mask=row_mask)
        tl.store(base + 12, acc_x, mask=row_mask)
        tl.store(base + 13, acc_y, mask=row_mask)
        tl.store(base + 14, acc_x2, mask=row_mask)
        tl.store(base + 15, acc_y2, mask=row_mask)
    else:
        base = part_ptr + (split.to(tl.int64) * N + rows64) * 2
        tl.store(base + 0, acc_x, mask=row_mask)
        tl.store(base + 1, acc_y, mask=row_mask)


def _merge_weighted(m: torch.Tensor, s: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """Σ_s acc_s e^{m_s} / Σ_s s_s e^{m_s} from [S, N] partials."""
    if m.shape[0] == 1:
        return acc[0] / s[0]
    M = m.max(dim=0).values
    r = torch.exp(m - M)
    return (acc * r).sum(0) / (s * r).sum(0)


def _ce_rows(lse, zy, sz, y, V, opts: PairOptions):
    eps = float(opts.ce.label_smoothing)
    loss = (1.0 - eps) * (lse - zy)
    if eps > 0:
        loss = loss + eps * (lse - sz / V)
    if opts.ce.z_loss > 0:
        loss = loss + float(opts.ce.z_loss) * lse * lse
    return torch.where(y != opts.ce.ignore_index, loss, torch.zeros_like(loss))


def _fwd_launch(xp, xq, w, b, opts: PairOptions, kind: str = "pair_fwd"):
    """(grid, n_split, positional args after the pointers, constexpr kwargs) of _pair_fwd_kernel; ``kind``
    "pair_js" picks the block sizes of phase 2 alone (expm1/log1p per element of both views: fewer columns)."""
    N, H = xp.shape
    V = w.shape[0]
    cfg = pick_config(kind, N, V, H, xp.device, xp.dtype)
    per, n_split = split_ranges(V, cfg.BLOCK_V, cfg.SPLIT_V)
    has_cap, cap, inv_cap = softcap_args(opts.softcap)
    upcast, prec = upcast_and_prec(xp.dtype)
    common = dict(
        TEMP_ONE=float(opts.temperature) == 1.0, WITH_CE=bool(opts.with_ce), HAS_BIAS=b is not None,
        HAS_SOFTCAP=has_cap, HAS_SMOOTHING=opts.ce.label_smoothing > 0, UPCAST=upcast, DOT_PREC=prec,
        BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_H=cfg.BLOCK_H,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, DIV=DIVERGENCE_IDS[opts.divergence],
    )
    scal = (N, V, H, xp.stride(0), xq.stride(0), w.stride(0), per, cap, inv_cap, 1.0 / float(opts.temperature))
    return (triton.cdiv(N, cfg.BLOCK_N), n_split), n_split, scal, common


@on_tensor_device
def pair_js_partial(xp, xq, w, b, lset, opts: PairOptions) -> torch.Tensor:
    """``[N, 2]`` fp32: ``Σ_v p_v log(p_v/m_v)`` and ``Σ_v q_v log(q_v/m_v)`` over the rows of ``w``, with
    p = exp(a − lset[:, 0]), q = exp(b − lset[:, 1]) for GIVEN normalisers ``lset [N, 2]`` (js phase 2).

    With the lse of the whole vocabulary these are one vocab shard's share of js's X and Y
    (:mod:`lsa_kernels.distributed` sums them over the ranks)."""
    N = xp.shape[0]
    grid, n_split, scal, common = _fwd_launch(xp, xq, w, b, opts, "pair_js")
    common = dict(common, WITH_CE=False, DIV=DIVERGENCE_IDS["js"])
    lset = lset.float().contiguous()
    part2 = torch.empty((n_split, N, 2), device=xp.device, dtype=torch.float32)
    if N > 0:
        bb = b if b is not None else w
        _pair_fwd_kernel[grid](xp, xq, w, bb, part2, part2, lset, part2, *scal, PHASE=2, **common)
    return part2.sum(0)


@on_tensor_device
def pair_forward(xp, xq, w, b, yp, yq, opts: PairOptions):
    """(ce_p [N], ce_q [N], div [N], stats [N, 8]), fp32 (see lsa_kernels.backends / lsa_kernels.maths)."""
    N = xp.shape[0]
    V = w.shape[0]
    dev = xp.device
    div_id = DIVERGENCE_IDS[opts.divergence]
    temp_one = float(opts.temperature) == 1.0
    with_ce = bool(opts.with_ce)
    grid, n_split, scal, common = _fwd_launch(xp, xq, w, b, opts)
    part = torch.empty((n_split, N, N_P1), device=dev, dtype=torch.float32)
    stats = torch.zeros((N, N_PAIR_STATS), device=dev, dtype=torch.float32)
    bb = b if b is not None else w
    ypp = yp if with_ce else part
    yqp = yq if with_ce else part
    if N > 0:
        _pair_fwd_kernel[grid](xp, xq, w, bb, ypp, yqp, part, part, *scal, PHASE=1, **common)
    lse_p = _merge_lse(part[..., 0], part[..., 1])
    lse_q = _merge_lse(part[..., 4], part[..., 5])
    stats[:, 0] = lse_p
    stats[:, 1] = lse_q
    if temp_one:
        stats[:, 2] = lse_p
        stats[:, 3] = lse_q
    else:
        stats[:, 2] = _merge_lse(part[..., 8], part[..., 9])
        stats[:, 3] = _merge_lse(part[..., 10], part[..., 11])
    if div_id == 4:  # js: second pass with the final lse of a and b
        stats[:, 4:6] = pair_js_partial(xp, xq, w, b, stats[:, 2:4], opts)
    else:
        m_a, s_a, m_b, s_b = part[..., 8], part[..., 9], part[..., 10], part[..., 11]
        x_on_a = div_id in (0, 1, 3)
        y_on_a = div_id == 1
        stats[:, 4] = _merge_weighted(m_a if x_on_a else m_b, s_a if x_on_a else s_b, part[..., 12])
        stats[:, 5] = _merge_weighted(m_a if y_on_a else m_b, s_a if y_on_a else s_b, part[..., 13])
        if div_id == 3:
            stats[:, STAT_X2] = _merge_weighted(m_a, s_a, part[..., 14])
            stats[:, STAT_Y2] = _merge_weighted(m_b, s_b, part[..., 15])
    div = divergence_from_stats(stats, opts.divergence)
    if with_ce:
        ce_p = _ce_rows(lse_p, part[..., 2].sum(0), part[..., 3].sum(0), yp, V, opts)
        ce_q = _ce_rows(lse_q, part[..., 6].sum(0), part[..., 7].sum(0), yq, V, opts)
    else:
        ce_p = torch.zeros(N, device=dev, dtype=torch.float32)
        ce_q = torch.zeros(N, device=dev, dtype=torch.float32)
    return ce_p, ce_q, div, stats


# ----------------------------------------------------------------------------------------- backward


@triton.jit
def _pair_row_loads(
    yp_ptr, yq_ptr, stats_ptr, cp_ptr, cq_ptr, cd_ptr, rows64, row_mask, stride_st, ignore_index, inv_temp,
    WITH_CE: tl.constexpr,
):
    """Per-row inputs of the backward: targets, stats and coefficients (0 on masked / ignored rows)."""
    st = stats_ptr + rows64 * stride_st
    lse_p = tl.load(st + 0, mask=row_mask, other=0.0)
    lse_q = tl.load(st + 1, mask=row_mask, other=0.0)
    lset_p = tl.load(st + 2, mask=row_mask, other=0.0)
    lset_q = tl.load(st + 3, mask=row_mask, other=0.0)
    sx = tl.load(st + 4, mask=row_mask, other=0.0)
    sy = tl.load(st + 5, mask=row_mask, other=0.0)
    cd = tl.load(cd_ptr + rows64, mask=row_mask, other=0.0).to(tl.float32) * inv_temp
    if WITH_CE:
        yp = tl.load(yp_ptr + rows64, mask=row_mask, other=ignore_index).to(tl.int64)
        yq = tl.load(yq_ptr + rows64, mask=row_mask, other=ignore_index).to(tl.int64)
        cp = tl.load(cp_ptr + rows64, mask=row_mask, other=0.0).to(tl.float32)
        cq = tl.load(cq_ptr + rows64, mask=row_mask, other=0.0).to(tl.float32)
        cp = tl.where(yp == ignore_index, 0.0, cp)
        cq = tl.where(yq == ignore_index, 0.0, cq)
    else:
        yp = tl.zeros_like(rows64) - 1
        yq = yp
        cp = tl.zeros_like(cd)
        cq = cp
    live = tl.sum(((cp != 0.0) | (cq != 0.0) | (cd != 0.0)).to(tl.int32), 0) > 0
    return yp, yq, lse_p, lse_q, lset_p, lset_q, sx, sy, cp, cq, cd, live


@triton.jit
def _pair_dz_tiles(
    xp_ptr, xq_ptr, w_ptr, b_ptr, rows64, row_mask, cols64, col_mask,
    yp, yq, lse_p, lse_q, lset_p, lset_q, sx, sy, cp, cq, cd,
    H, stride_xp, stride_xq, stride_w, cap, inv_cap, inv_temp, one_minus_eps, eps_over_v, two_zloss,
    DIV: tl.constexpr, TEMP_ONE: tl.constexpr, GRAD_P: tl.constexpr, GRAD_Q: tl.constexpr,
    WITH_CE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_ZLOSS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """(dz_p, dz_q) w.r.t. the raw logits of one row block × V tile (fp32; 0 on masked entries)."""
    lp_, lq_ = logits_tile2_(xp_ptr, xq_ptr, w_ptr, rows64, row_mask, cols64, col_mask, H,
                             stride_xp, stride_xq, stride_w, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PREC)
    zp, tp = finish_logits_(lp_, b_ptr, cols64, col_mask, cap, inv_cap, HAS_BIAS, HAS_SOFTCAP)
    zq, tq = finish_logits_(lq_, b_ptr, cols64, col_mask, cap, inv_cap, HAS_BIAS, HAS_SOFTCAP)
    cm = col_mask[None, :]
    if TEMP_ONE:
        av = tl.where(cm, zp, 0.0)
        bv = tl.where(cm, zq, 0.0)
    else:
        av = tl.where(cm, zp * inv_temp, 0.0)
        bv = tl.where(cm, zq * inv_temp, 0.0)
    lp = av - lset_p[:, None]
    lq = bv - lset_q[:, None]
    p = tl.where(cm, tl.exp(lp), 0.0)
    q = tl.where(cm, tl.exp(lq), 0.0)
    X = sx[:, None]
    Y = sy[:, None]
    u = av - bv
    if DIV == 0:
        da = p - q - p * (bv - X)
        db = q - p - q * (av - Y)
    elif DIV == 1:
        da = p * (u - X)
        db = q - p
    elif DIV == 2:
        da = p - q
        db = q * (Y - u)
    elif DIV == 3:
        da = p * (u - X) + p - q
        db = q * (Y - u) + q - p
    else:
        d = lq - lp
        da = 0.5 * p * (log_ratio_to_mid_(d) - X)
        db = 0.5 * q * (log_ratio_to_mid_(-d) - Y)
    gp = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    gq = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    if GRAD_P:
        gp = cd[:, None] * da
    if GRAD_Q:
        gq = cd[:, None] * db
    if WITH_CE:
        if TEMP_ONE:
            pc = p
            qc = q
        else:
            pc = tl.where(cm, tl.exp(zp - lse_p[:, None]), 0.0)
            qc = tl.where(cm, tl.exp(zq - lse_q[:, None]), 0.0)
        gp += cp[:, None] * ce_grad_(pc, cols64[None, :] == yp[:, None], col_mask, lse_p, one_minus_eps,
                                     eps_over_v, two_zloss, HAS_SMOOTHING, HAS_ZLOSS)
        gq += cq[:, None] * ce_grad_(qc, cols64[None, :] == yq[:, None], col_mask, lse_q, one_minus_eps,
                                     eps_over_v, two_zloss, HAS_SMOOTHING, HAS_ZLOSS)
    if HAS_SOFTCAP:
        gp = gp * (1.0 - tp * tp)
        gq = gq * (1.0 - tq * tq)
    m2 = cm & row_mask[:, None]
    return tl.where(m2, gp, 0.0), tl.where(m2, gq, 0.0)


@triton.jit
def _pair_bwd_kernel(
    xp_ptr, xq_ptr, w_ptr, b_ptr, yp_ptr, yq_ptr, stats_ptr, cp_ptr, cq_ptr, cd_ptr,
    dxp_ptr, dxq_ptr, dw_ptr, db_ptr,
    N, V, H, stride_xp, stride_xq, stride_w, stride_dxp, stride_dxq, stride_dw,
    stride_st, ignore_index, cap, inv_cap, inv_temp, one_minus_eps, eps_over_v, two_zloss,
    DIV: tl.constexpr, TEMP_ONE: tl.constexpr, GRAD_P: tl.constexpr, GRAD_Q: tl.constexpr,
    WITH_CE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_ZLOSS: tl.constexpr, USE_GP: tl.constexpr, USE_GQ: tl.constexpr,
    NEED_DXP: tl.constexpr, NEED_DXQ: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP: tl.constexpr,
):
    """Atomic variant: one program per (row block, V tile), grouped for L2 reuse."""
    pid_n, pid_v = grouped_pid_(tl.program_id(0), N, V, BLOCK_N, BLOCK_V, GROUP)

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    yp, yq, lse_p, lse_q, lset_p, lset_q, sx, sy, cp, cq, cd, live = _pair_row_loads(
        yp_ptr, yq_ptr, stats_ptr, cp_ptr, cq_ptr, cd_ptr, rows64, row_mask, stride_st, ignore_index, inv_temp, WITH_CE)
    if live:
        cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        cols64 = cols.to(tl.int64)
        gp, gq = _pair_dz_tiles(
            xp_ptr, xq_ptr, w_ptr, b_ptr, rows64, row_mask, cols64, col_mask,
            yp, yq, lse_p, lse_q, lset_p, lset_q, sx, sy, cp, cq, cd,
            H, stride_xp, stride_xq, stride_w, cap, inv_cap, inv_temp, one_minus_eps, eps_over_v, two_zloss,
            DIV, TEMP_ONE, GRAD_P, GRAD_Q, WITH_CE, HAS_BIAS, HAS_SOFTCAP, HAS_SMOOTHING, HAS_ZLOSS,
            UPCAST, DOT_PREC, BLOCK_N, BLOCK_V, BLOCK_H)
        if NEED_DB:
            tl.atomic_add(db_ptr + cols64, tl.sum(gp + gq, 0), mask=col_mask, sem="relaxed")
        gpc = dot_operand_(gp, xp_ptr, UPCAST)
        gqc = dot_operand_(gq, xp_ptr, UPCAST)
        if NEED_DXP or NEED_DXQ or NEED_DW:
            for h0 in range(0, H, BLOCK_H):
                offs_h = h0 + tl.arange(0, BLOCK_H)
                h_mask = offs_h < H
                mx = row_mask[:, None] & h_mask[None, :]
                mw = col_mask[:, None] & h_mask[None, :]
                if NEED_DXP or NEED_DXQ:
                    wt = tl.load(w_ptr + cols64[:, None] * stride_w + offs_h[None, :], mask=mw, other=0.0)
                    if UPCAST:
                        wt = wt.to(tl.float32)
                    if NEED_DXP:
                        tl.atomic_add(dxp_ptr + rows64[:, None] * stride_dxp + offs_h[None, :],
                                      tl.dot(gpc, wt, input_precision=DOT_PREC), mask=mx, sem="relaxed")
                    if NEED_DXQ:
                        tl.atomic_add(dxq_ptr + rows64[:, None] * stride_dxq + offs_h[None, :],
                                      tl.dot(gqc, wt, input_precision=DOT_PREC), mask=mx, sem="relaxed")
                if NEED_DW:
                    dw = tl.zeros([BLOCK_V, BLOCK_H], tl.float32)
                    if USE_GP:
                        xpt = tl.load(xp_ptr + rows64[:, None] * stride_xp + offs_h[None, :], mask=mx, other=0.0)
                        if UPCAST:
                            xpt = xpt.to(tl.float32)
                        dw = tl.dot(tl.trans(gpc), xpt, dw, input_precision=DOT_PREC)
                    if USE_GQ:
                        xqt = tl.load(xq_ptr + rows64[:, None] * stride_xq + offs_h[None, :], mask=mx, other=0.0)
                        if UPCAST:
                            xqt = xqt.to(tl.float32)
                        dw = tl.dot(tl.trans(gqc), xqt, dw, input_precision=DOT_PREC)
                    tl.atomic_add(dw_ptr + cols64[:, None] * stride_dw + offs_h[None, :], dw, mask=mw, sem="relaxed")


@triton.jit
def _pair_bwd_dx_kernel(
    xp_ptr, xq_ptr, w_ptr, b_ptr, yp_ptr, yq_ptr, stats_ptr, cp_ptr, cq_ptr, cd_ptr,
    dxp_ptr, dxq_ptr,
    N, V, H, stride_xp, stride_xq, stride_w, stride_dxp, stride_dxq,
    stride_st, ignore_index, cap, inv_cap, inv_temp, one_minus_eps, eps_over_v, two_zloss,
    DIV: tl.constexpr, TEMP_ONE: tl.constexpr, GRAD_P: tl.constexpr, GRAD_Q: tl.constexpr,
    WITH_CE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_ZLOSS: tl.constexpr, NEED_DXP: tl.constexpr, NEED_DXQ: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Deterministic dx_p / dx_q: one program per row block, owner read-modify-write (dx pre-zeroed)."""
    pid_n = tl.program_id(0)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    yp, yq, lse_p, lse_q, lset_p, lset_q, sx, sy, cp, cq, cd, live = _pair_row_loads(
        yp_ptr, yq_ptr, stats_ptr, cp_ptr, cq_ptr, cd_ptr, rows64, row_mask, stride_st, ignore_index, inv_temp, WITH_CE)
    if live:
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_mask = cols < V
            cols64 = cols.to(tl.int64)
            gp, gq = _pair_dz_tiles(
                xp_ptr, xq_ptr, w_ptr, b_ptr, rows64, row_mask, cols64, col_mask,
                yp, yq, lse_p, lse_q, lset_p, lset_q, sx, sy, cp, cq, cd,
                H, stride_xp, stride_xq, stride_w, cap, inv_cap, inv_temp, one_minus_eps, eps_over_v, two_zloss,
                DIV, TEMP_ONE, GRAD_P, GRAD_Q, WITH_CE, HAS_BIAS, HAS_SOFTCAP, HAS_SMOOTHING, HAS_ZLOSS,
                UPCAST, DOT_PREC, BLOCK_N, BLOCK_V, BLOCK_H)
            gpc = dot_operand_(gp, xp_ptr, UPCAST)
            gqc = dot_operand_(gq, xp_ptr, UPCAST)
            for h0 in range(0, H, BLOCK_H):
                offs_h = h0 + tl.arange(0, BLOCK_H)
                h_mask = offs_h < H
                mx = row_mask[:, None] & h_mask[None, :]
                wt = tl.load(w_ptr + cols64[:, None] * stride_w + offs_h[None, :],
                             mask=col_mask[:, None] & h_mask[None, :], other=0.0)
                if UPCAST:
                    wt = wt.to(tl.float32)
                if NEED_DXP:
                    ptr_p = dxp_ptr + rows64[:, None] * stride_dxp + offs_h[None, :]
                    cur_p = tl.load(ptr_p, mask=mx, other=0.0)
                    tl.store(ptr_p, tl.dot(gpc, wt, cur_p, input_precision=DOT_PREC), mask=mx)
                if NEED_DXQ:
                    ptr_q = dxq_ptr + rows64[:, None] * stride_dxq + offs_h[None, :]
                    cur_q = tl.load(ptr_q, mask=mx, other=0.0)
                    tl.store(ptr_q, tl.dot(gqc, wt, cur_q, input_precision=DOT_PREC), mask=mx)


@triton.jit
def _pair_bwd_dw_kernel(
    xp_ptr, xq_ptr, w_ptr, b_ptr, yp_ptr, yq_ptr, stats_ptr, cp_ptr, cq_ptr, cd_ptr,
    dw_ptr, db_ptr,
    N, V, H, stride_xp, stride_xq, stride_w, stride_dw,
    stride_st, ignore_index, cap, inv_cap, inv_temp, one_minus_eps, eps_over_v, two_zloss,
    DIV: tl.constexpr, TEMP_ONE: tl.constexpr, GRAD_P: tl.constexpr, GRAD_Q: tl.constexpr,
    WITH_CE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_ZLOSS: tl.constexpr, USE_GP: tl.constexpr, USE_GQ: tl.constexpr,
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
        yp, yq, lse_p, lse_q, lset_p, lset_q, sx, sy, cp, cq, cd, live = _pair_row_loads(
            yp_ptr, yq_ptr, stats_ptr, cp_ptr, cq_ptr, cd_ptr, rows64, row_mask, stride_st, ignore_index, inv_temp, WITH_CE)
        if live:
            gp, gq = _pair_dz_tiles(
                xp_ptr, xq_ptr, w_ptr, b_ptr, rows64, row_mask, cols64, col_mask,
                yp, yq, lse_p, lse_q, lset_p, lset_q, sx, sy, cp, cq, cd,
                H, stride_xp, stride_xq, stride_w, cap, inv_cap, inv_temp, one_minus_eps, eps_over_v, two_zloss,
                DIV, TEMP_ONE, GRAD_P, GRAD_Q, WITH_CE, HAS_BIAS, HAS_SOFTCAP, HAS_SMOOTHING, HAS_ZLOSS,
                UPCAST, DOT_PREC, BLOCK_N, BLOCK_V, BLOCK_H)
            if NEED_DB:
                db_acc += tl.sum(gp + gq, 0)
            if NEED_DW:
                gpt = tl.trans(dot_operand_(gp, xp_ptr, UPCAST))
                gqt = tl.trans(dot_operand_(gq, xp_ptr, UPCAST))
                for h0 in range(0, H, BLOCK_H):
                    offs_h = h0 + tl.arange(0, BLOCK_H)
                    h_mask = offs_h < H
                    mx = row_mask[:, None] & h_mask[None, :]
                    ptrs = dw_ptr + cols64[:, None] * stride_dw + offs_h[None, :]
                    mw = col_mask[:, None] & h_mask[None, :]
                    acc = tl.load(ptrs, mask=mw, other=0.0)
                    if USE_GP:
                        xpt = tl.load(xp_ptr + rows64[:, None] * stride_xp + offs_h[None, :], mask=mx, other=0.0)
                        if UPCAST:
                            xpt = xpt.to(tl.float32)
                        acc = tl.dot(gpt, xpt, acc, input_precision=DOT_PREC)
                    if USE_GQ:
                        xqt = tl.load(xq_ptr + rows64[:, None] * stride_xq + offs_h[None, :], mask=mx, other=0.0)
                        if UPCAST:
                            xqt = xqt.to(tl.float32)
                        acc = tl.dot(gqt, xqt, acc, input_precision=DOT_PREC)
                    tl.store(ptrs, acc, mask=mw)
    if NEED_DB:
        cur_b = tl.load(db_ptr + cols64, mask=col_mask, other=0.0)
        tl.store(db_ptr + cols64, cur_b + db_acc, mask=col_mask)


@on_tensor_device
def pair_backward(
    xp, xq, w, b, yp, yq, stats, coef_ce_p, coef_ce_q, coef_div, opts: PairOptions,
    dxp_out: Optional[torch.Tensor], dxq_out: Optional[torch.Tensor],
    dw_out: Optional[torch.Tensor], db_out: Optional[torch.Tensor],
) -> None:
    """dx_p, dx_q ← (overwritten); dW, db += (see lsa_kernels.backends)."""
    N, H = xp.shape
    V = w.shape[0]
    for d in (dxp_out, dxq_out):
        if d is not None:
            d.zero_()
    if db_out is not None and b is None:
        db_out = None
    with_ce = bool(opts.with_ce) and coef_ce_p is not None and coef_ce_q is not None
    grad_p, grad_q = opts.grad_p, opts.grad_q
    use_gp, use_gq = with_ce or grad_p, with_ce or grad_q
    need_dxp = dxp_out is not None and use_gp
    need_dxq = dxq_out is not None and use_gq
    need_dw = dw_out is not None and (use_gp or use_gq)
    need_db = db_out is not None and (use_gp or use_gq)
    if N == 0 or not (need_dxp or need_dxq or need_dw or need_db):
        return
    stats = stats.to(torch.float32).contiguous()
    cd = coef_div.to(torch.float32).contiguous()
    cp = coef_ce_p.to(torch.float32).contiguous() if with_ce else cd
    cq = coef_ce_q.to(torch.float32).contiguous() if with_ce else cd
    ypp = yp if with_ce else cd
    yqp = yq if with_ce else cd
    has_cap, cap, inv_cap = softcap_args(opts.softcap)
    upcast, prec = upcast_and_prec(xp.dtype)
    eps = float(opts.ce.label_smoothing)
    temp = float(opts.temperature)
    scal = (stats.stride(0), opts.ce.ignore_index, cap, inv_cap, 1.0 / temp, 1.0 - eps, eps / (opts.ce.vocab_total or V), 2.0 * float(opts.ce.z_loss))
    flags = dict(
        DIV=DIVERGENCE_IDS[opts.divergence], TEMP_ONE=temp == 1.0, GRAD_P=grad_p, GRAD_Q=grad_q,
        WITH_CE=with_ce, HAS_BIAS=b is not None, HAS_SOFTCAP=has_cap, HAS_SMOOTHING=eps > 0,
        HAS_ZLOSS=opts.ce.z_loss > 0, UPCAST=upcast, DOT_PREC=prec,
    )
    bb = b if b is not None else w
    dummy = cd
    dxp = dxp_out if dxp_out is not None else dummy
    dxq = dxq_out if dxq_out is not None else dummy
    dw = dw_out if dw_out is not None else dummy
    db = db_out if db_out is not None else dummy
    sdxp = dxp_out.stride(0) if dxp_out is not None else 0
    sdxq = dxq_out.stride(0) if dxq_out is not None else 0
    sdw = dw_out.stride(0) if dw_out is not None else 0
    head = (xp, xq, w, bb, ypp, yqp, stats, cp, cq, cd)
    if not opts.ce.deterministic:
        cfg = pick_config("pair_bwd", N, V, H, xp.device, xp.dtype)
        grid = (triton.cdiv(N, cfg.BLOCK_N) * triton.cdiv(V, cfg.BLOCK_V),)
        _pair_bwd_kernel[grid](
            *head, dxp, dxq, dw, db,
            N, V, H, xp.stride(0), xq.stride(0), w.stride(0), sdxp, sdxq, sdw, *scal, **flags,
            USE_GP=use_gp, USE_GQ=use_gq, NEED_DXP=need_dxp, NEED_DXQ=need_dxq, NEED_DW=need_dw, NEED_DB=need_db,
            BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_H=cfg.BLOCK_H, GROUP=cfg.GROUP,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return
    if need_dxp or need_dxq:
        cfg = pick_config("pair_bwd_dx", N, V, H, xp.device, xp.dtype)
        _pair_bwd_dx_kernel[(triton.cdiv(N, cfg.BLOCK_N),)](
            *head, dxp, dxq,
            N, V, H, xp.stride(0), xq.stride(0), w.stride(0), sdxp, sdxq, *scal, **flags,
            NEED_DXP=need_dxp, NEED_DXQ=need_dxq,
            BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_H=cfg.BLOCK_H,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    if need_dw or need_db:
        cfg = pick_config("pair_bwd_dw", N, V, H, xp.device, xp.dtype)
        _pair_bwd_dw_kernel[(triton.cdiv(V, cfg.BLOCK_V),)](
            *head, dw, db,
            N, V, H, xp.stride(0), xq.stride(0), w.stride(0), sdw, *scal, **flags,
            USE_GP=use_gp, USE_GQ=use_gq, NEED_DW=need_dw, NEED_DB=need_db,
            BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_H=cfg.BLOCK_H,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
