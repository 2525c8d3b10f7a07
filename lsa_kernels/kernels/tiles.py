"""The @triton.jit helpers every kernel of lsa_kernels.kernels shares (inlined into the kernels that call them).

Maths (all fp32; no libdevice, so they run under the interpreter and compile for every target):

    tanh(x)   = 2·sigmoid(2x) − 1                  softcap z = c·tanh(z_raw/c), ∂z/∂z_raw = 1 − tanh²   (docs/maths.md §2, §3)
    expm1(x)  = degree-9 Taylor series for |x| < ½, else exp(x) − 1   (relative error ≲ 3e-7; §5, §14.2)
    log1p(x)  = x                     if fl(1 + x) == 1
              = log(u)·x / (u − 1)    u = fl(1 + x)     (Goldberg's trick: cancels the rounding of 1 + x)
    log(p/m)  for m = (p + q)/2 and d = log q − log p                                      (js, §5, §14.2)
              = −log1p(expm1(d)/2)              d ≤ 1  (relative precision as p → q)
              = −d + log 2 − log1p(e^{−d})      d > 1  (no overflow for d ≫ 1)
    online softmax step (§14.1):  m' = max(m, max_v z),  s' = s·e^{m − m'} + Σ_v e^{z − m'}
    CE gradient per unit coefficient (§3):  softmax(z)·(1 + 2λ·lse) − (1−ε)·onehot(y) − ε/V
    entropy gradient per unit coefficient (§3):  ∂H/∂z = −p⊙(z − E_p[z]) = −p⊙(log p + H)

The logits tile of a row block × V tile is ``Σ_h x[rows, h]·W[cols, h]`` with fp32 accumulation (the RAW
logits, before bias and softcap: :func:`finish_logits` applies those); every row / column index is cast to
int64 before it multiplies a stride, so N·H and V·H may pass 2^31 (§7). ``UPCAST`` casts bf16/fp16 operands
to fp32 right after the load (required by the interpreter, which stores bf16 as uint16); on a GPU bf16
operands go to the tensor cores as they are (bf16·bf16 products are exact in fp32, the accumulation is fp32
either way). fp32 inputs use ``tf32x3`` on a GPU (≈ fp32 accuracy on tensor cores).

Tile bookkeeping shared by every kernel: :func:`tile_index` (int64 indices + mask of a row block or V tile),
:func:`split_bounds` (the V range of a split-V program), :func:`pair_tile_logits` (both views' logits of a
tile, bias, softcap, then a = z_p/τ, b = z_q/τ; §5, §12 for a second head) and :func:`pair_softmax`
(log p = a − lse_a, log q, p, q of a tile given the row normalisers; §5).

The gradient GEMMs take dz rounded to the input dtype (:func:`dot_operand`, §14.4), as a GPU's bf16/fp16
tensor cores need; under the interpreter the same rounding is done explicitly (round to nearest even: the
interpreter's own fp32 → bf16 cast truncates) so that interpreter tests check the numbers a GPU computes.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..maths import Divergence

LN2: tl.constexpr = tl.constexpr(0.6931471805599453)

# divergence ids (maths.Divergence) as constexprs for the pair kernels (js is the remaining id)
SCE: tl.constexpr = tl.constexpr(int(Divergence.SCE))
KL: tl.constexpr = tl.constexpr(int(Divergence.KL))
KL_REVERSE: tl.constexpr = tl.constexpr(int(Divergence.KL_REVERSE))
SYM_KL: tl.constexpr = tl.constexpr(int(Divergence.SYM_KL))


@triton.jit
def tanh(x):
    """tanh via the sigmoid: saturates cleanly to ±1 (exp overflow gives 1/(1+inf) = 0)."""
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def expm1(x):
    """exp(x) − 1 with relative precision for small |x|."""
    small = tl.abs(x) < 0.5
    s = tl.where(small, x, 0.0)
    poly = 1.0 / 362880.0
    poly = poly * s + 1.0 / 40320.0
    poly = poly * s + 1.0 / 5040.0
    poly = poly * s + 1.0 / 720.0
    poly = poly * s + 1.0 / 120.0
    poly = poly * s + 1.0 / 24.0
    poly = poly * s + 1.0 / 6.0
    poly = poly * s + 0.5
    poly = poly * s + 1.0
    return tl.where(small, poly * s, tl.exp(x) - 1.0)


@triton.jit
def log1p(x):
    """log(1 + x) for x ≥ −1 with relative precision for small |x| (Goldberg)."""
    u = 1.0 + x
    d = u - 1.0
    safe_d = tl.where(d == 0.0, 1.0, d)
    big = u > 1.0e30
    r = tl.where(big, tl.log(u), tl.log(u) * (x / safe_d))
    return tl.where(d == 0.0, x, r)


@triton.jit
def log_ratio_to_mid(d):
    """log(p / m) with m = (p + q)/2 and d = log q − log p (finite)."""
    dc = tl.minimum(d, 1.0)
    r_small = -log1p(0.5 * expm1(dc))
    dl = tl.maximum(d, 1.0)
    r_large = -dl + LN2 - log1p(tl.exp(-dl))
    return tl.where(d > 1.0, r_large, r_small)


@triton.jit
def round_bf16(x):
    """fp32 → the nearest bf16 (ties to even), returned as fp32 (finite x). Bit arithmetic, because the
    interpreter's own fp32 → bf16 cast truncates instead of rounding."""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def dot_operand(t, like_ptr, UPCAST: tl.constexpr):
    """fp32 ``t`` (dz) as an operand of the gradient GEMMs: rounded to the input dtype (``like_ptr``'s
    element type) as the tensor cores take it on a GPU; under the interpreter (UPCAST) the same rounding,
    kept in fp32 (so storing it to a bf16 / fp16 buffer afterwards is exact). fp32 inputs: unchanged."""
    if UPCAST:
        if like_ptr.dtype.element_ty == tl.bfloat16:
            r = round_bf16(t)
        else:
            r = t.to(like_ptr.dtype.element_ty).to(tl.float32)
    else:
        r = t.to(like_ptr.dtype.element_ty)
    return r


@triton.jit
def tile_index(start, n, BLOCK: tl.constexpr):
    """Indices ``start + [0, BLOCK)`` of a row block or V tile as int64 (they multiply strides, §7) and
    their mask ``< n``."""
    idx = start + tl.arange(0, BLOCK)
    return idx.to(tl.int64), idx < n


@triton.jit
def split_bounds(split, tiles_per_split, V, BLOCK_V: tl.constexpr):
    """[v_start, v_end) of V split ``split`` (``tiles_per_split`` tiles of BLOCK_V each, the last one cut at V)."""
    v_start = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(V, v_start + tiles_per_split * BLOCK_V)
    return v_start, v_end


@triton.jit
def grouped_pid(pid, N, V, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, GROUP: tl.constexpr):
    """(row block, V tile) of program ``pid`` in a grid of row blocks × V tiles, GROUP row blocks at a time
    so that consecutive programs reuse the same W tiles from L2."""
    n_pid_n = tl.cdiv(N, BLOCK_N)
    n_pid_v = tl.cdiv(V, BLOCK_V)
    in_group = GROUP * n_pid_v
    first_n = (pid // in_group) * GROUP
    group_size = tl.minimum(n_pid_n - first_n, GROUP)
    return first_n + (pid % in_group) % group_size, (pid % in_group) // group_size


@triton.jit
def online_update(m, s, z_masked):
    """One online-softmax step (docs/maths.md §14.1). z_masked has −inf on invalid columns.

    Returns (m_new, alpha = exp(m − m_new), e = exp(z − m_new), s_new = s·alpha + Σ e)."""
    m_new = tl.maximum(m, tl.max(z_masked, 1))
    alpha = tl.exp(m - m_new)
    e = tl.exp(z_masked - m_new[:, None])
    s_new = s * alpha + tl.sum(e, 1)
    return m_new, alpha, e, s_new


@triton.jit
def logits_tile(
    x_ptr, w_ptr, rows64, row_mask, cols64, col_mask, H, stride_x, stride_w,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """fp32 raw logits ``x[rows] @ W[cols]ᵀ`` over H chunks (no bias / softcap)."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        xt = tl.load(x_ptr + rows64[:, None] * stride_x + offs_h[None, :],
                     mask=row_mask[:, None] & h_mask[None, :], other=0.0)
        wt = tl.load(w_ptr + cols64[:, None] * stride_w + offs_h[None, :],
                     mask=col_mask[:, None] & h_mask[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def logits_tile2(
    xp_ptr, xq_ptr, w_ptr, rows64, row_mask, cols64, col_mask, H, stride_xp, stride_xq, stride_w,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Both views' fp32 raw logits tiles; each W chunk is loaded once and used by both dots."""
    acc_p = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    acc_q = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        m2 = row_mask[:, None] & h_mask[None, :]
        wt = tl.load(w_ptr + cols64[:, None] * stride_w + offs_h[None, :],
                     mask=col_mask[:, None] & h_mask[None, :], other=0.0)
        xpt = tl.load(xp_ptr + rows64[:, None] * stride_xp + offs_h[None, :], mask=m2, other=0.0)
        xqt = tl.load(xq_ptr + rows64[:, None] * stride_xq + offs_h[None, :], mask=m2, other=0.0)
        if UPCAST:
            wt = wt.to(tl.float32)
            xpt = xpt.to(tl.float32)
            xqt = xqt.to(tl.float32)
        wtt = tl.trans(wt)
        acc_p = tl.dot(xpt, wtt, acc_p, input_precision=DOT_PREC)
        acc_q = tl.dot(xqt, wtt, acc_q, input_precision=DOT_PREC)
    return acc_p, acc_q


@triton.jit
def pair_logits(
    xp_ptr, xq_ptr, w_ptr, wq_ptr, rows64, row_mask, cols64, col_mask, H, Hq, stride_xp, stride_xq, stride_w,
    stride_wq, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, TWO_HEADS: tl.constexpr,
):
    """Both views' fp32 raw logits tiles: one shared head (``logits_tile2``: each W chunk loaded once for
    both dots) or, with TWO_HEADS, ``x_p W_pᵀ`` over H and ``x_q W_qᵀ`` over Hq (docs/maths.md §12)."""
    if TWO_HEADS:
        zraw_p = logits_tile(xp_ptr, w_ptr, rows64, row_mask, cols64, col_mask, H, stride_xp, stride_w,
                             BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PREC)
        zraw_q = logits_tile(xq_ptr, wq_ptr, rows64, row_mask, cols64, col_mask, Hq, stride_xq, stride_wq,
                             BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PREC)
    else:
        zraw_p, zraw_q = logits_tile2(xp_ptr, xq_ptr, w_ptr, rows64, row_mask, cols64, col_mask, H,
                                      stride_xp, stride_xq, stride_w, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PREC)
    return zraw_p, zraw_q


@triton.jit
def finish_logits(z_raw, b_ptr, cols64, col_mask, cap, inv_cap,
                  HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """bias + softcap of a raw logits tile. Returns (z, t) with t = tanh(z_raw/c) (t = 0 without softcap)."""
    z = z_raw
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols64, mask=col_mask, other=0.0).to(tl.float32)
        z = z + bias[None, :]
    if HAS_SOFTCAP:
        t = tanh(z * inv_cap)
        z = cap * t
    else:
        t = tl.zeros_like(z)
    return z, t


@triton.jit
def pair_tile_logits(
    xp_ptr, xq_ptr, w_ptr, b_ptr, wq_ptr, bq_ptr, rows64, row_mask, cols64, col_mask, H, Hq,
    stride_xp, stride_xq, stride_w, stride_wq, cap, inv_cap, inv_temp,
    TEMP_ONE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, TWO_HEADS: tl.constexpr,
    HAS_BIAS_Q: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Both views' logits tiles (docs/maths.md §4, §12): ``(z_p, t_p, z_q, t_q, a, b)`` with z = softcap(raw +
    bias), t = tanh(raw/c) (:func:`finish_logits`) and a = z_p/τ, b = z_q/τ, 0 on masked columns."""
    zraw_p, zraw_q = pair_logits(xp_ptr, xq_ptr, w_ptr, wq_ptr, rows64, row_mask, cols64, col_mask, H, Hq,
                                 stride_xp, stride_xq, stride_w, stride_wq, BLOCK_N, BLOCK_V, BLOCK_H,
                                 UPCAST, DOT_PREC, TWO_HEADS)
    zp, tp = finish_logits(zraw_p, b_ptr, cols64, col_mask, cap, inv_cap, HAS_BIAS, HAS_SOFTCAP)
    zq, tq = finish_logits(zraw_q, bq_ptr, cols64, col_mask, cap, inv_cap, HAS_BIAS_Q, HAS_SOFTCAP)
    cm = col_mask[None, :]
    if TEMP_ONE:
        av = tl.where(cm, zp, 0.0)
        bv = tl.where(cm, zq, 0.0)
    else:
        av = tl.where(cm, zp * inv_temp, 0.0)
        bv = tl.where(cm, zq * inv_temp, 0.0)
    return zp, tp, zq, tq, av, bv


@triton.jit
def pair_softmax(av, bv, lse_a, lse_b, col_mask):
    """``(log p, log q, p, q)`` of a tile for GIVEN normalisers: log p = a − lse_a, log q = b − lse_b; p, q are
    0 on masked columns (§5)."""
    cm = col_mask[None, :]
    logp = av - lse_a[:, None]
    logq = bv - lse_b[:, None]
    p = tl.where(cm, tl.exp(logp), 0.0)
    q = tl.where(cm, tl.exp(logq), 0.0)
    return logp, logq, p, q


@triton.jit
def ce_row_coefs(y_ptr, coef_ptr, rows64, row_mask, ignore_index):
    """(targets, coefficients) of a row block; coefficient 0 on masked / ignored rows."""
    y = tl.load(y_ptr + rows64, mask=row_mask, other=ignore_index).to(tl.int64)
    coef = tl.load(coef_ptr + rows64, mask=row_mask, other=0.0).to(tl.float32)
    return y, tl.where(y == ignore_index, 0.0, coef)


@triton.jit
def ce_grad(p, z_is_target, col_mask, lse, one_minus_eps, eps_over_v, two_zloss,
            HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr):
    """∂ℓ/∂z of the CE row loss (per unit coefficient): softmax(1 + 2λ·lse) − (1−ε)·onehot − ε/V (§3)."""
    g = p
    if HAS_ZLOSS:
        g = g * (1.0 + two_zloss * lse)[:, None]
    g = g - tl.where(z_is_target, one_minus_eps, 0.0)
    if HAS_SMOOTHING:
        g = g - tl.where(col_mask[None, :], eps_over_v, 0.0)
    return g


@triton.jit
def entropy_grad(p, logp, ent):
    """∂H/∂z of the softmax entropy H = −Σ_v p_v log p_v (per unit coefficient): −p⊙(log p + H) (§3).
    ``p``, ``logp`` 0 on masked columns; ``ent`` [rows] the forward's H."""
    return -p * (logp + ent[:, None])


@triton.jit
def load_h_tile(ptr, idx64, idx_mask, stride, offs_h, h_mask, UPCAST: tl.constexpr):
    """``ptr[idx, offs_h]`` (rows of x or of W) as a GEMM operand; fp32 under UPCAST."""
    t = tl.load(ptr + idx64[:, None] * stride + offs_h[None, :], mask=idx_mask[:, None] & h_mask[None, :], other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def store_dz_tile(dz_ptr, dz, rows_local64, row_mask, cols64, col_mask, stride_dz, UPCAST: tl.constexpr):
    """Store an fp32 dz tile into the deterministic path's dz buffer, rounded to the buffer's (= the input's)
    dtype exactly as :func:`dot_operand` rounds it for the atomic path's GEMMs (§14.4)."""
    r = dot_operand(dz, dz_ptr, UPCAST)
    tl.store(dz_ptr + rows_local64[:, None] * stride_dz + cols64[None, :], r.to(dz_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])
