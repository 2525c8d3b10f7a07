"""The cpu backend's one chunk loop: GEMM, a per-chunk function, the gradient GEMMs.

Maths: docs/maths.md §3 (the gradient GEMMs ``∂/∂h = G W``, ``∂/∂W = Gᵀ h``, ``∂/∂b = Σ_rows G``); what
happens between the GEMMs is the per-chunk function's (:mod:`.aten` or :mod:`.ext`).

The rows of a call come in *parts* (CE: one; a pair op: the p rows, the q rows and, for long-short, the
CE-only rows). Every chunk takes a share of each part's rows (the p and q parts, of equal length, take the
same rows), stacks them in one fp32 ``[R, H]`` block and forms ALL their logits with one GEMM into one
reusable ``[R, V]`` buffer. The per-chunk function turns each part's block of that buffer into its
statistics and (given coefficients) its ``dz``, and then ONE GEMM gives every row's ``dx = dz W`` and one
``dW += dzᵀ x`` (``addmm_`` into one fp32 buffer, no V×H temporary) — per chunk three GEMMs, however many
parts, so the GEMMs stay as wide as the budget allows.

Rows per chunk: ``R = budget / (K · V · 4 bytes)``, ``K`` the ``[R, V]`` fp32 buffers the per-chunk
function keeps alive at once (1 compiled, 3 or 5 ATen: tests/test_memory.py checks it), ``budget`` =
``chunk_bytes`` or :data:`DEFAULT_BUDGET`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

Tensor = torch.Tensor

#: default bytes of [rows, V] fp32 buffers per chunk (all buffers together). Measured (fp32 fwd+bwd, 2 cores):
#: at the CE goal shape (N=4096, H=512, V=32768) 64 MiB was as fast as 128 MiB and faster than 16-32 MiB
#: (thinner GEMMs, above all dW += dzᵀx whose inner dimension is the chunk's rows) or 200 MiB (cache misses).
DEFAULT_BUDGET = 64 << 20


def chunk_rows(v: int, k: int, chunk_bytes: Optional[int]) -> int:
    """Rows per chunk so that ``k`` fp32 ``[rows, v]`` buffers fit in ``chunk_bytes`` (default budget if None);
    a multiple of 8 from 16 rows up, at least 1."""
    budget = DEFAULT_BUDGET if chunk_bytes is None else chunk_bytes
    rows = budget // (k * v * 4)
    if rows >= 16:
        rows -= rows % 8
    return int(max(1, rows))


def acc_dtype(t: Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs; fp64 stays fp64 (gradcheck runs in double on the ATen path)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def promote(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t`` in its accumulation dtype (half precision promoted: CPU ATen has no bf16 × bf16 → fp32 GEMM)."""
    return None if t is None else t.to(acc_dtype(t))


@dataclass
class Part:
    """One part of a call's rows: ``x [n, H]``; ``dx [n, H]`` (out, or None); ``grad``: whether the per-chunk
    function leaves a meaningful ``dz`` in this part's rows (False: its rows get no gradient)."""

    x: Tensor
    dx: Optional[Tensor] = None
    grad: bool = True


# step(z_blocks, row_slices): the per-chunk work on each part's block of logits and its rows in the part
Step = Callable[[List[Tensor], List[slice]], None]


def _plan(sizes: Sequence[int], rows: int) -> tuple[int, List[int]]:
    """(chunks, rows per chunk of each part): the fewest chunks whose shares fit in ``rows``."""
    total = sum(sizes)
    m = max(1, math.ceil(total / rows))
    while sum(math.ceil(n / m) for n in sizes) > rows:
        m += 1
    return m, [math.ceil(n / m) for n in sizes]


def run(parts: Sequence[Part], w: Tensor, b: Optional[Tensor], rows: int, step: Step, *, backward: bool,
        dw: Optional[Tensor] = None, db: Optional[Tensor] = None) -> None:
    """Run ``step`` over chunks of at most ``rows`` rows (module docstring). With ``backward``, the parts'
    ``dx`` are overwritten (zeros for a part with ``grad=False``) and ``dw``/``db`` accumulated into."""
    acc = acc_dtype(parts[0].x)
    w32, b32 = promote(w), promote(b)
    V, H = w.shape
    sizes = [p.x.shape[0] for p in parts]
    n_chunks, share = _plan(sizes, rows)
    cap = sum(share)
    zbuf = torch.empty(cap, V, dtype=acc, device=w.device)
    stack = len(parts) > 1
    xbuf = torch.empty(cap, H, dtype=acc, device=w.device) if stack else None
    grad_idx = [i for i, p in enumerate(parts) if p.grad]
    want_dx = backward and any(parts[i].dx is not None for i in grad_idx)
    dxbuf = torch.empty(cap, H, dtype=acc, device=w.device) if (want_dx and stack) else None
    for j in range(n_chunks):
        sl = [slice(min(n, j * s), min(n, (j + 1) * s)) for n, s in zip(sizes, share)]
        counts = [s.stop - s.start for s in sl]
        r = sum(counts)
        if r == 0:
            continue
        if stack:
            xc = xbuf[:r]
            for blk, p, s in zip(xc.split(counts), parts, sl):
                blk.copy_(p.x[s])
        else:
            xc = promote(parts[0].x[sl[0]])
        z = zbuf[:r]
        if b32 is not None:
            torch.addmm(b32, xc, w32.t(), out=z)
        else:
            torch.mm(xc, w32.t(), out=z)
        blocks = list(z.split(counts))
        step(blocks, sl)
        if not backward:
            continue
        for i, p in enumerate(parts):
            if not p.grad and p.dx is not None:
                p.dx[sl[i]].zero_()
        if not grad_idx:
            continue
        lo = sum(counts[: grad_idx[0]])
        hi = sum(counts[: grad_idx[-1] + 1])
        for i in range(grad_idx[0], grad_idx[-1] + 1):  # a part without gradient between two with one
            if not parts[i].grad:
                blocks[i].zero_()
        dz, xg = z[lo:hi], xc[lo:hi]
        if want_dx:
            if stack:
                dxc = torch.mm(dz, w32, out=dxbuf[lo:hi])
                for i in grad_idx:
                    if parts[i].dx is not None:
                        a = sum(counts[:i]) - lo
                        parts[i].dx[sl[i]] = dxc[a : a + counts[i]]
            else:
                torch.mm(dz, w32, out=parts[0].dx[sl[0]])
        if dw is not None:
            dw.addmm_(dz.t(), xg)
        if db is not None:
            db.add_(dz.sum(dim=0))
