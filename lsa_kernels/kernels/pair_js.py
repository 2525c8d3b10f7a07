"""js, second pass: X = Σ_v p_v log(p_v/m_v), Y = Σ_v q_v log(q_v/m_v) for GIVEN normalisers lse_a, lse_b.

docs/maths.md §5 (js), §14.2. With a = z_p/τ, b = z_q/τ (z = softcap(x Wᵀ + b); with TWO_HEADS each view
has its own head, z_q = softcap(x_q W_qᵀ + b_q), §12) and the lse of a and b from
phase 1 (or, for a vocab shard, the whole vocabulary's; lsa_kernels.distributed):

    log p = a − lse_a,  log q = b − lse_b,  d = log q − log p,   m = (p + q)/2
    log(p/m) = −log1p(expm1(d)/2)  (d ≤ 1),   −d + log 2 − log1p(e^{−d})  (d > 1)      (tiles.log_ratio_to_mid)
    X ← Σ_v p·log(p/m),   Y ← Σ_v q·log(q/m)        plain sums: no rescaling, the normalisers are final

so js = (X + Y)/2 (lsa_kernels.maths.divergence_from_stats) never forms log(p + q) (both can underflow).
Grid: (row blocks, V splits); each program writes its [X, Y] partial to an ``[S, N, 2]`` scratch that the
launcher sums over S. The gradient (½p⊙(log(p/m) − X), ½q⊙(log(q/m) − Y)) is in kernels/pair_bwd.py.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import log_ratio_to_mid, pair_softmax, pair_tile_logits, split_bounds, tile_index

N_JS_PARTS = 2  # columns of the partials: X, Y
_NJS: tl.constexpr = tl.constexpr(N_JS_PARTS)


# its parameter list repeats pair_phase1_kernel's (duplicates): a @triton.jit kernel's signature cannot be shared
@triton.jit
def pair_js_kernel(
    xp_ptr, xq_ptr, w_ptr, b_ptr, wq_ptr, bq_ptr, lset_ptr, part_ptr,
    N, V, H, Hq, stride_xp, stride_xq, stride_w, stride_wq, tiles_per_split,
    cap, inv_cap, inv_temp,
    TEMP_ONE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    TWO_HEADS: tl.constexpr, HAS_BIAS_Q: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """js's (X, Y) partial sums of one row block over one V split; ``lset [N, 2]`` holds lse_a, lse_b."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows64, row_mask = tile_index(pid_n * BLOCK_N, N, BLOCK_N)
    lse_a = tl.load(lset_ptr + rows64 * 2 + 0, mask=row_mask, other=0.0)
    lse_b = tl.load(lset_ptr + rows64 * 2 + 1, mask=row_mask, other=0.0)
    acc_x = tl.zeros([BLOCK_N], tl.float32)
    acc_y = tl.zeros([BLOCK_N], tl.float32)

    v_start, v_end = split_bounds(split, tiles_per_split, V, BLOCK_V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols64, col_mask = tile_index(v0, V, BLOCK_V)
        zp, tp, zq, tq, av, bv = pair_tile_logits(
            xp_ptr, xq_ptr, w_ptr, b_ptr, wq_ptr, bq_ptr, rows64, row_mask, cols64, col_mask, H, Hq,
            stride_xp, stride_xq, stride_w, stride_wq, cap, inv_cap, inv_temp, TEMP_ONE, HAS_BIAS, HAS_SOFTCAP,
            TWO_HEADS, HAS_BIAS_Q, UPCAST, DOT_PREC, BLOCK_N, BLOCK_V, BLOCK_H)
        logp, logq, p, q = pair_softmax(av, bv, lse_a, lse_b, col_mask)
        d = logq - logp
        acc_x += tl.sum(p * log_ratio_to_mid(d), 1)
        acc_y += tl.sum(q * log_ratio_to_mid(-d), 1)

    base = part_ptr + (split.to(tl.int64) * N + rows64) * _NJS
    tl.store(base + 0, acc_x, mask=row_mask)
    tl.store(base + 1, acc_y, mask=row_mask)
