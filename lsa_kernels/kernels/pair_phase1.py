"""Pair forward, phase 1: CE of both views, the lse of a and b and the divergence sums, in one pass over V.

docs/maths.md §3 (CE), §5 (divergences), §14.1 (online softmax, split merge), §14.2 (these partials).
Views z_p = softcap(x_p Wᵀ + b), z_q = softcap(x_q Wᵀ + b); each W chunk is loaded ONCE per tile step
and used by both views' dots. With TWO_HEADS (distillation, §12: teacher = view p, student = view q) each
view has its own head and hidden size: z_p = softcap(x_p W_pᵀ + b_p) over H, z_q = softcap(x_q W_qᵀ + b_q)
over Hq (V shared); everything below is unchanged.
a = z_p/τ, b = z_q/τ, u = a − b (per element), p = softmax(a), q = softmax(b).
Online over V tiles, every running sum rescaled by exp(m_old − m_new) when its max moves:

    CE stats     m_z, s_z = Σ e^{z−m_z}, z_y, Σ_v z      → lse(z) and the CE row loss    (each view)
    lse of a, b  m_a, s_a, m_b, s_b                        (the CE ones when τ == 1: TEMP_ONE)
    divergence   the weighted sums behind X, Y (X2, Y2) of lsa_kernels.maths:
        sce         X ← Σ e^{a−m_a}·b               Y ← Σ e^{b−m_b}·a
        kl          X ← Σ e^{a−m_a}·u               Y ← Σ e^{a−m_a}·expm1(−u)
        kl_reverse  X ← Σ e^{b−m_b}·expm1(u)        Y ← Σ e^{b−m_b}·u
        sym_kl      X ← Σ e^{a−m_a}·u               Y ← Σ e^{b−m_b}·u
                    X2 ← Σ e^{a−m_a}·expm1(−u)      Y2 ← Σ e^{b−m_b}·expm1(u)
        js          nothing here: its sums need the final lse_a, lse_b (kernels/pair_js.py)
    (every expm1 argument is clamped at maths.EXPM1_CLAMP: no 0·inf where p ≈ 0)

Per-view extras (long-short's per-token outputs, docs/maths.md §4; constexprs ENTROPY / ARGMAX, off by
default), of each view's z at temperature 1 with its CE running max m_z and sum s_z, exactly as kernels/ce.py:

    entropy  acc ← e^{m_old − m_new}·(acc + (m_old − m_new)·s_old) + Σ_v e^{z − m_new}·(z − m_new)
             (acc = Σ_v e^{z − m}(z − m); H = log s − acc/s after the split merge, merge.merge_extras)
    argmax   per tile tl.argmax, kept where the tile's max beats the running one strictly (ties → lowest)

into ``ent [S, N, 2]`` (fp32) and ``am [S, N, 2]`` (int32), column 0 view p, column 1 view q.

Each program writes its partials, columns merge.PairPart, to an ``[S, N, 16]`` fp32 scratch;
:func:`merge.pair_stats` divides each sum by its softmax's s (E_p[f] = Σ e^{a−m_a} f / s_a, §5) and merges
the splits. Gradients: kernels/pair_bwd.py.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..maths import EXPM1_CLAMP
from .merge import N_PAIR_PARTS, PairPart
from .tiles import KL, KL_REVERSE, SCE, SYM_KL, expm1, online_update, pair_tile_logits, split_bounds, tile_index

_CLAMP: tl.constexpr = tl.constexpr(EXPM1_CLAMP)

# partial columns (merge.PairPart) as constexprs for the kernel
_NPART: tl.constexpr = tl.constexpr(N_PAIR_PARTS)
_M_P: tl.constexpr = tl.constexpr(int(PairPart.M_P))
_S_P: tl.constexpr = tl.constexpr(int(PairPart.S_P))
_ZY_P: tl.constexpr = tl.constexpr(int(PairPart.ZY_P))
_SZ_P: tl.constexpr = tl.constexpr(int(PairPart.SZ_P))
_M_Q: tl.constexpr = tl.constexpr(int(PairPart.M_Q))
_S_Q: tl.constexpr = tl.constexpr(int(PairPart.S_Q))
_ZY_Q: tl.constexpr = tl.constexpr(int(PairPart.ZY_Q))
_SZ_Q: tl.constexpr = tl.constexpr(int(PairPart.SZ_Q))
_M_A: tl.constexpr = tl.constexpr(int(PairPart.M_A))
_S_A: tl.constexpr = tl.constexpr(int(PairPart.S_A))
_M_B: tl.constexpr = tl.constexpr(int(PairPart.M_B))
_S_B: tl.constexpr = tl.constexpr(int(PairPart.S_B))
_X: tl.constexpr = tl.constexpr(int(PairPart.X))
_Y: tl.constexpr = tl.constexpr(int(PairPart.Y))
_X2: tl.constexpr = tl.constexpr(int(PairPart.X2))
_Y2: tl.constexpr = tl.constexpr(int(PairPart.Y2))


@triton.jit
def pair_phase1_kernel(
    xp_ptr, xq_ptr, w_ptr, b_ptr, wq_ptr, bq_ptr, yp_ptr, yq_ptr, part_ptr, ent_ptr, am_ptr,
    N, V, H, Hq, stride_xp, stride_xq, stride_w, stride_wq, tiles_per_split,
    cap, inv_cap, inv_temp,
    DIV: tl.constexpr, TEMP_ONE: tl.constexpr,
    WITH_CE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    TWO_HEADS: tl.constexpr, HAS_BIAS_Q: tl.constexpr, ENTROPY: tl.constexpr, ARGMAX: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Phase-1 partials (merge.PairPart) of one row block over one V split; with ENTROPY / ARGMAX each view's
    entropy sum and first argmax into ent / am [split, row, view] (module docstring)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows64, row_mask = tile_index(pid_n * BLOCK_N, N, BLOCK_N)
    zero = tl.zeros([BLOCK_N], tl.float32)
    ninf = tl.full([BLOCK_N], float("-inf"), tl.float32)
    if WITH_CE:
        yp = tl.load(yp_ptr + rows64, mask=row_mask, other=-1).to(tl.int64)
        yq = tl.load(yq_ptr + rows64, mask=row_mask, other=-1).to(tl.int64)
    m_p, s_p, zy_p, sz_p = ninf, zero, zero, zero
    m_q, s_q, zy_q, sz_q = ninf, zero, zero, zero
    m_a, s_a, m_b, s_b = ninf, zero, ninf, zero
    acc_x, acc_y, acc_x2, acc_y2 = zero, zero, zero, zero
    h_p, h_q = zero, zero
    am_p = tl.zeros([BLOCK_N], tl.int32)
    am_q = tl.zeros([BLOCK_N], tl.int32)

    v_start, v_end = split_bounds(split, tiles_per_split, V, BLOCK_V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols64, col_mask = tile_index(v0, V, BLOCK_V)
        cm = col_mask[None, :]
        zp, tp, zq, tq, av, bv = pair_tile_logits(
            xp_ptr, xq_ptr, w_ptr, b_ptr, wq_ptr, bq_ptr, rows64, row_mask, cols64, col_mask, H, Hq,
            stride_xp, stride_xq, stride_w, stride_wq, cap, inv_cap, inv_temp, TEMP_ONE, HAS_BIAS, HAS_SOFTCAP,
            TWO_HEADS, HAS_BIAS_Q, UPCAST, DOT_PREC, BLOCK_N, BLOCK_V, BLOCK_H)
        m_p_old, s_p_old, m_q_old, s_q_old = m_p, s_p, m_q, s_q
        zpm = tl.where(cm, zp, float("-inf"))
        zqm = tl.where(cm, zq, float("-inf"))
        m_p, al_p, e_p, s_p = online_update(m_p, s_p, zpm)
        m_q, al_q, e_q, s_q = online_update(m_q, s_q, zqm)
        # extras: e is 0 on masked columns (z there is finite), and the tile's max beats the running one
        # exactly when the running max moved (m_new > m_old)
        if ENTROPY:  # 0 shift before the first tile (m_old = −inf, s_old = 0)
            h_p = al_p * (h_p + (tl.where(s_p_old > 0.0, m_p_old, m_p) - m_p) * s_p_old) + tl.sum(
                e_p * (zp - m_p[:, None]), 1)
            h_q = al_q * (h_q + (tl.where(s_q_old > 0.0, m_q_old, m_q) - m_q) * s_q_old) + tl.sum(
                e_q * (zq - m_q[:, None]), 1)
        if ARGMAX:
            am_p = tl.where(m_p > m_p_old, v0 + tl.argmax(zpm, 1).to(tl.int32), am_p)
            am_q = tl.where(m_q > m_q_old, v0 + tl.argmax(zqm, 1).to(tl.int32), am_q)
        if WITH_CE:
            zy_p += tl.sum(tl.where(cols64[None, :] == yp[:, None], zp, 0.0), 1)
            zy_q += tl.sum(tl.where(cols64[None, :] == yq[:, None], zq, 0.0), 1)
            if HAS_SMOOTHING:
                sz_p += tl.sum(tl.where(cm, zp, 0.0), 1)
                sz_q += tl.sum(tl.where(cm, zq, 0.0), 1)
        if TEMP_ONE:
            al_a, e_a, al_b, e_b = al_p, e_p, al_q, e_q
        else:
            m_a, al_a, e_a, s_a = online_update(m_a, s_a, tl.where(cm, av, float("-inf")))
            m_b, al_b, e_b, s_b = online_update(m_b, s_b, tl.where(cm, bv, float("-inf")))
        u = av - bv
        if DIV == SCE:
            acc_x = acc_x * al_a + tl.sum(e_a * bv, 1)
            acc_y = acc_y * al_b + tl.sum(e_b * av, 1)
        elif DIV == KL:
            acc_x = acc_x * al_a + tl.sum(e_a * u, 1)
            acc_y = acc_y * al_a + tl.sum(e_a * expm1(tl.minimum(-u, _CLAMP)), 1)
        elif DIV == KL_REVERSE:
            acc_x = acc_x * al_b + tl.sum(e_b * expm1(tl.minimum(u, _CLAMP)), 1)
            acc_y = acc_y * al_b + tl.sum(e_b * u, 1)
        elif DIV == SYM_KL:  # KL(p||q) + KL(q||p), each in the expm1 form
            acc_x = acc_x * al_a + tl.sum(e_a * u, 1)
            acc_y = acc_y * al_b + tl.sum(e_b * u, 1)
            acc_x2 = acc_x2 * al_a + tl.sum(e_a * expm1(tl.minimum(-u, _CLAMP)), 1)
            acc_y2 = acc_y2 * al_b + tl.sum(e_b * expm1(tl.minimum(u, _CLAMP)), 1)

    if TEMP_ONE:
        m_a, s_a, m_b, s_b = m_p, s_p, m_q, s_q
    base = part_ptr + (split.to(tl.int64) * N + rows64) * _NPART
    tl.store(base + _M_P, m_p, mask=row_mask)
    tl.store(base + _S_P, s_p, mask=row_mask)
    tl.store(base + _ZY_P, zy_p, mask=row_mask)
    tl.store(base + _SZ_P, sz_p, mask=row_mask)
    tl.store(base + _M_Q, m_q, mask=row_mask)
    tl.store(base + _S_Q, s_q, mask=row_mask)
    tl.store(base + _ZY_Q, zy_q, mask=row_mask)
    tl.store(base + _SZ_Q, sz_q, mask=row_mask)
    tl.store(base + _M_A, m_a, mask=row_mask)
    tl.store(base + _S_A, s_a, mask=row_mask)
    tl.store(base + _M_B, m_b, mask=row_mask)
    tl.store(base + _S_B, s_b, mask=row_mask)
    tl.store(base + _X, acc_x, mask=row_mask)
    tl.store(base + _Y, acc_y, mask=row_mask)
    tl.store(base + _X2, acc_x2, mask=row_mask)
    tl.store(base + _Y2, acc_y2, mask=row_mask)
    ex = (split.to(tl.int64) * N + rows64) * 2
    if ENTROPY:
        tl.store(ent_ptr + ex, h_p, mask=row_mask)
        tl.store(ent_ptr + ex + 1, h_q, mask=row_mask)
    if ARGMAX:
        tl.store(am_ptr + ex, am_p, mask=row_mask)
        tl.store(am_ptr + ex + 1, am_q, mask=row_mask)
