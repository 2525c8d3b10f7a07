"""The atomic backward path's @triton.jit helper, shared by ce.py's and pair_bwd.py's atomic kernels.

docs/maths.md §14.3 (atomic path): for one (row block, V tile) with dz rounded by tiles.dot_operand (§14.4),

    dx[rows] += dz · W[cols]        dW[cols] += dzᵀ · x[rows]          over H chunks, relaxed fp32 atomics

Kept out of tiles.py on purpose: tiles.py is shared with the deterministic kernels and must hold no atomic
(tests/backends/test_triton_kernels.py::test_deterministic_kernels_have_no_atomics).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import load_h_tile


@triton.jit
def grad_gemms(
    dzc, x_ptr, w_ptr, dx_ptr, dw_ptr, rows64, row_mask, cols64, col_mask, H, stride_x, stride_w, stride_dx,
    stride_dw, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """The atomic path's gradient GEMMs of one (row block, V tile) for one head: dx[rows] += dz W[cols] and
    dW[cols] += dzᵀ x[rows] over H chunks, relaxed fp32 atomics (``dzc``: dz from :func:`tiles.dot_operand`)."""
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        if NEED_DX:
            wt = load_h_tile(w_ptr, cols64, col_mask, stride_w, offs_h, h_mask, UPCAST)
            tl.atomic_add(dx_ptr + rows64[:, None] * stride_dx + offs_h[None, :],
                          tl.dot(dzc, wt, input_precision=DOT_PREC),
                          mask=row_mask[:, None] & h_mask[None, :], sem="relaxed")
        if NEED_DW:
            xt = load_h_tile(x_ptr, rows64, row_mask, stride_x, offs_h, h_mask, UPCAST)
            tl.atomic_add(dw_ptr + cols64[:, None] * stride_dw + offs_h[None, :],
                          tl.dot(tl.trans(dzc), xt, input_precision=DOT_PREC),
                          mask=col_mask[:, None] & h_mask[None, :], sem="relaxed")
