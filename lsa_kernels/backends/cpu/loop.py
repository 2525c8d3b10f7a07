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

A second head (distillation, docs/maths.md §12: the teacher's ``W_t`` for view p, the student's ``W_s`` for
view q, different hidden sizes): the parts of each head form a group with its own logits GEMM into its block
of the same buffer, its own ``dx`` and ``dW`` GEMMs — per chunk three GEMMs per head that has a gradient,
one for a frozen head.

Rows per chunk: ``R = budget / (K · V · 4 bytes)``, ``K`` the ``[R, V]`` fp32 buffers the per-chunk
function keeps alive at once (1 compiled, 3 or 5 ATen: tests/backends/test_memory.py checks it), ``budget`` =
``chunk_bytes`` or :data:`DEFAULT_BUDGET`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from ...maths import acc_dtype  # noqa: F401  (re-exported for the cpu backend)

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




def promote(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t`` in its accumulation dtype (half precision promoted: CPU ATen has no bf16 × bf16 → fp32 GEMM)."""
    return None if t is None else t.to(acc_dtype(t))


@dataclass
class Part:
    """One part of a call's rows: ``x [n, H]``; ``dx [n, H]`` (out, or None); ``grad``: whether the per-chunk
    function leaves a meaningful ``dz`` in this part's rows (False: its rows get no gradient); ``head``: the
    index of the head its logits come from (0: ``run``'s ``w``/``b``; 1, 2, ...: ``run``'s ``heads``)."""

    x: Tensor
    dx: Optional[Tensor] = None
    grad: bool = True
    head: int = 0


@dataclass
class Head:
    """A further head of a call (distillation: the student's, docs/maths.md §12): weight ``w [V, H_k]``, bias
    ``b [V]`` or None, and its gradient buffers ``dw``/``db`` (accumulated into; None: not wanted)."""

    w: Tensor
    b: Optional[Tensor] = None
    dw: Optional[Tensor] = None
    db: Optional[Tensor] = None


# step(z_blocks, row_slices): the per-chunk work on each part's block of logits and its rows in the part
Step = Callable[[List[Tensor], List[slice]], None]


def _plan(sizes: Sequence[int], rows: int) -> tuple[int, List[int]]:
    """(chunks, rows per chunk of each part): the fewest chunks whose shares fit in ``rows``."""
    total = sum(sizes)
    m = max(1, math.ceil(total / rows))
    while sum(math.ceil(n / m) for n in sizes) > rows:
        m += 1
    return m, [math.ceil(n / m) for n in sizes]


class _Group:
    """The consecutive parts of one head: their logits come from one GEMM (stacked rows) into one block of
    the chunk's buffer, their gradients from one ``dx`` GEMM and one ``dW`` GEMM."""

    def __init__(self, head: Head, idx: List[int], parts: Sequence[Part], share: List[int], backward: bool,
                 acc: torch.dtype):
        self.w32, self.b32, self.dw, self.db = promote(head.w), promote(head.b), head.dw, head.db
        self.idx = idx
        cap = sum(share[i] for i in idx)
        H, dev = head.w.shape[1], head.w.device
        self.stack = len(idx) > 1
        self.xbuf = torch.empty(cap, H, dtype=acc, device=dev) if self.stack else None
        self.grad_idx = [i for i in idx if parts[i].grad]
        self.want_dx = backward and any(parts[i].dx is not None for i in self.grad_idx)
        self.dxbuf = torch.empty(cap, H, dtype=acc, device=dev) if (self.want_dx and self.stack) else None


def run(parts: Sequence[Part], w: Tensor, b: Optional[Tensor], rows: int, step: Step, *, backward: bool,
        dw: Optional[Tensor] = None, db: Optional[Tensor] = None, heads: Sequence[Head] = ()) -> None:
    """Run ``step`` over chunks of at most ``rows`` rows (module docstring). With ``backward``, the parts'
    ``dx`` are overwritten (zeros for a part with ``grad=False``) and each head's ``dw``/``db`` accumulated
    into (``dw``/``db`` for ``w``'s parts). ``heads``: further heads (:class:`Head`) for parts whose
    ``head`` is 1, 2, ...; the parts of one head must be consecutive. Per chunk and head with parts: one
    logits GEMM, and with a gradient one ``dx`` and one ``dW`` GEMM."""
    acc = acc_dtype(parts[0].x)
    all_heads = [Head(w, b, dw, db), *heads]
    V = w.shape[0]
    sizes = [p.x.shape[0] for p in parts]
    n_chunks, share = _plan(sizes, rows)
    zbuf = torch.empty(sum(share), V, dtype=acc, device=w.device)
    runs: List[List[int]] = []  # consecutive parts of one head
    for i, p in enumerate(parts):
        if runs and parts[runs[-1][0]].head == p.head:
            runs[-1].append(i)
        elif any(parts[r[0]].head == p.head for r in runs):
            raise ValueError("loop.run: the parts of one head must be consecutive")
        else:
            runs.append([i])
    groups = [_Group(all_heads[parts[r[0]].head], r, parts, share, backward, acc) for r in runs]
    for j in range(n_chunks):
        sl = [slice(min(n, j * s), min(n, (j + 1) * s)) for n, s in zip(sizes, share)]
        counts = [s.stop - s.start for s in sl]
        r = sum(counts)
        if r == 0:
            continue
        z = zbuf[:r]
        blocks = list(z.split(counts))
        offs = [sum(counts[:i]) for i in range(len(parts) + 1)]
        xcs = []
        for g in groups:
            i0, i1 = g.idx[0], g.idx[-1] + 1
            if g.stack:
                xc = g.xbuf[: offs[i1] - offs[i0]]
                for blk, i in zip(xc.split(counts[i0:i1]), g.idx):
                    blk.copy_(parts[i].x[sl[i]])
            else:
                xc = promote(parts[i0].x[sl[i0]])
            xcs.append(xc)
            zg = z[offs[i0] : offs[i1]]
            if zg.shape[0] == 0:
                continue
            if g.b32 is not None:
                torch.addmm(g.b32, xc, g.w32.t(), out=zg)
            else:
                torch.mm(xc, g.w32.t(), out=zg)
        step(blocks, sl)
        if not backward:
            continue
        for i, p in enumerate(parts):
            if not p.grad and p.dx is not None:
                p.dx[sl[i]].zero_()
        for g, xc in zip(groups, xcs):
            if not g.grad_idx:
                continue
            base = offs[g.idx[0]]
            lo, hi = offs[g.grad_idx[0]], offs[g.grad_idx[-1] + 1]
            for i in range(g.grad_idx[0], g.grad_idx[-1] + 1):  # a part without gradient between two with one
                if not parts[i].grad:
                    blocks[i].zero_()
            if hi == lo:
                continue
            dz, xg = z[lo:hi], xc[lo - base : hi - base]
            if g.want_dx:
                if g.stack:
                    dxc = torch.mm(dz, g.w32, out=g.dxbuf[lo - base : hi - base])
                    for i in g.grad_idx:
                        if parts[i].dx is not None:
                            a = offs[i] - lo
                            parts[i].dx[sl[i]] = dxc[a : a + counts[i]]
                else:
                    i0 = g.idx[0]
                    torch.mm(dz, g.w32, out=parts[i0].dx[sl[i0]])
            if g.dw is not None:
                g.dw.addmm_(dz.t(), xg)
            if g.db is not None:
                g.db.add_(dz.sum(dim=0))
