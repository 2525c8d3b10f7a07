"""The deterministic backward: dz of a chunk of rows in a buffer, then the gradient GEMMs by torch.

docs/maths.md §3 (gradient), §14.3 (this schedule), §14.4 (rounding of dz). For a chunk R of at most C rows:

    dz[R, :] ← a Triton kernel over (row blocks of R) × (V tiles): each program recomputes its logits tile
               and writes its dz tile, rounded to the input dtype, to a [C, V] buffer (ce.py / pair_bwd.py)
    dX[R]  = dz[R] · W                  torch.mm    (fp32 output, fp32 accumulation)
    dW    += dz[R]ᵀ · X[R]              torch.addmm (accumulated in dW's fp32)
    db    += Σ_blocks dbpart            the kernel's fp32 column sums of dz per row block, summed by torch

No atomics anywhere: every program owns the tile it writes, and a GEMM of fixed shapes on a fixed device
sums in a fixed order, so two runs give the same bits. (cuBLAS guarantees this for one stream; with
several streams it needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (or ``:16:8``), as torch's
``use_deterministic_algorithms`` documents. The chunking depends only on the shapes and the budget.)

The dz buffer holds ``C·V`` elements of the input dtype per view; C is the largest multiple of 128 rows
(or, below 128, the largest number of rows) whose buffer fits ``chunk_bytes`` (the options' ``chunk_bytes``, else
:data:`DEFAULT_DZ_BYTES`). bf16 / fp16 inputs on CUDA: the GEMMs take the bf16 dz and W / X as they are
and write fp32 (``out_dtype=torch.float32``), the numbers the atomic path's tensor-core dots produce.
Under the interpreter (CPU tensors) the operands are upcast to fp32 first: products of bf16 values are
exact in fp32, so that is the same GEMM. fp32 inputs: fp32 GEMMs, whose precision follows
``torch.backends.cuda.matmul`` (full fp32 by default; TF32 when the user allows it). A torch build without
``mm`` / ``addmm(out_dtype=)`` for the operands' dtypes (torch 2.11 on CPU tensors, say) gets fp32 operands
instead: the same products, one fp32 copy of the operands.

Expected cost against the atomic backward (from the traffic; not measured on a GPU yet): the same flops — the
dz kernel recomputes the logits once, the two GEMMs form dX and dW — plus writing dz once and reading it twice
(``3·N·V`` elements of the input dtype per view) and reading and writing the fp32 dW once per chunk
(``2·V·H·4`` bytes per chunk). At N = 16384 rows, V = 128256, H = 4096 in bf16 with the default 1 GiB budget
(C = 4096 rows, 4 chunks) that is 12.6 GB of dz and 16.8 GB of dW traffic, about 9 ms at an H100's 3.35 TB/s,
next to about 80 ms for the backward's 5.2·10¹³ flops at 650 TFLOP/s: up to about 10 % slower where the GEMMs
do not hide it, and ``chunk_bytes`` (1 GiB) more memory. fp32 inputs: the two GEMMs are full-fp32 cuBLAS
GEMMs (67 TFLOP/s peak on an H100 SXM) where the atomic kernel's tf32x3 dots have about 165, so expect up
to about 2x the atomic fp32 backward unless TF32 is allowed.

The dz kernels themselves (block sizes: ``_common.GPU_TABLE``, kinds ``ce_dz``, ``pair_dz``, ``dense_dz``):
one program per (row block, V tile) of a chunk, so ``⌈C/BLOCK_N⌉·⌈V/BLOCK_V⌉`` programs per chunk; each
recomputes its logits tile over all of H, so within a chunk W is read ``⌈C/BLOCK_N⌉`` times and the chunk's
rows ``⌈V/BLOCK_V⌉`` times, mostly from L2 (the programs of one V tile are consecutive in the grid, so each W
tile comes from HBM about once per chunk). fp32 pair dz at N = 16384, V = 128256, H = 4096, both views: C =
1024 rows (16 chunks), 32 × 64 × 32 tiles: 32 × 2004 = 64,128 programs per chunk, W (2.1 GB in fp32) from HBM
about 16 times, 34 GB, about 10 ms at 3.35 TB/s next to about 210 ms of tf32x3 dots for the 3.4·10¹³ flops of
the recomputed logits. Its table entry caps registers at 255 (ptxas ``.maxnreg``): without the cap ptxas
squeezed 18-29 % of the sampled fp32 flag sets into 128 registers (two blocks of 8 warps per SM) and some of
those spilled 8-16 B; with it all 4220 flag sets (and the production ones) compile spill-free on sm_80 and
sm_90 under Triton 3.6 (at most 239 registers) and 3.8 (at most 255), and every fp32 ce_dz and dense_dz flag
set is spill-free without a cap
(benchmarks/results/compile_sweep/DETERMINISTIC_FP32.md). The tile is unchanged, so the number of programs and
the re-reads above are too; what changes is occupancy, for the flag sets ptxas used to squeeze only (above 128
registers a block of 8 warps is alone on its SM anyway): one block per SM instead of two. Expected cost: none
where the tf32x3 dots keep the tensor cores busy with 8 warps; at worst, for those flag sets, the latency hiding
that the second block gave (not measured: no GPU yet; override the config with ``maxnreg=None`` to compare).
"""

from __future__ import annotations

from typing import Optional

import torch

DEFAULT_DZ_BYTES = 1 << 30
ROW_MULTIPLE = 128


def chunk_rows(N: int, V: int, n_views: int, dtype: torch.dtype, chunk_bytes: Optional[int]) -> int:
    """Rows per chunk: the dz buffer ``[n_views·C, V]`` of ``dtype`` stays within the budget (one row at least)."""
    budget = chunk_bytes if chunk_bytes else DEFAULT_DZ_BYTES
    per_row = n_views * max(V, 1) * torch.empty((), dtype=dtype).element_size()
    c = budget // per_row
    if c >= ROW_MULTIPLE:
        c -= c % ROW_MULTIPLE
    c = max(c, 1)
    return min(c, max(N, 1))


def gemm_operand(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the GEMMs take it: unchanged on CUDA; fp32 on CPU (interpreter tests: exact products)."""
    return t if t.device.type == "cuda" else t.float()


def native_out_dtype(device: torch.device) -> bool:
    """Whether the GEMMs on ``device`` first try ``mm`` / ``addmm(out_dtype=torch.float32)`` on the operands as
    they are (CUDA; CPU builds have no such kernel, so CPU operands are upcast at once)."""
    return device.type == "cuda"


# What a torch without mm / addmm(out_dtype=) for the operands raises: NotImplementedError (a RuntimeError) where
# the overload exists but has no kernel for the device or dtypes, TypeError where the keyword does not exist.
_NO_OUT_DTYPE = (RuntimeError, TypeError)


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out ← a·b`` with fp32 ``out`` (a, b from :func:`gemm_operand` or a dz buffer)."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        torch.mm(a, b, out=out)
        return
    if native_out_dtype(out.device):
        try:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
            return
        except _NO_OUT_DTYPE:  # fp32 operands instead: the same products
            pass
    torch.mm(a.float(), b.float(), out=out)


def addmm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out += a·b`` with fp32 ``out``."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        out.addmm_(a, b)
        return
    if native_out_dtype(out.device):
        try:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
            return
        except _NO_OUT_DTYPE:  # also: a build refusing out= aliasing self; fp32 operands instead
            pass
    out.addmm_(a.float(), b.float())
