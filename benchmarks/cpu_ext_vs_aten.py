"""CPU backend: compiled kernels (lsa_kernels._C) vs the chunked ATen path vs the bare GEMMs, one run.

    python benchmarks/cpu_ext_vs_aten.py                 # N=4096 H=512 V=32768 fp32, 3 timed reps
    python benchmarks/cpu_ext_vs_aten.py --quick         # N=1024 H=256 V=8192, for a smoke test
    python benchmarks/cpu_ext_vs_aten.py --csv out.csv   # also write the table as CSV

Times forward+backward of ``linear_cross_entropy`` (mean) and of ``long_short_loss`` (sce, two views of
N/2 rows each, l_extra = T/4) with the extension on and off (``lsa_kernels._ext.disable()``), and the
floor: the bare GEMMs into preallocated buffers — logits ``x Wᵀ``, ``dH = dz W``, ``dW = dzᵀ x`` (3 for
CE, 6 for long-short: one set per view). Goals: CE ≤ 1.2x its 3 GEMMs, long-short ≤ 1.15x its 6.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time

import torch

import lsa_kernels
from lsa_kernels import _ext
from lsa_kernels.backends import cpu


def _time_interleaved(cases: dict, reps: int) -> dict:
    """{name: (min wall s, median wall s, min process cpu s)}; the cases run interleaved, rep by rep, so a
    busy machine slows all of them alike (min is the least disturbed run)."""
    for fn in cases.values():  # warm-up
        fn()
    wall = {k: [] for k in cases}
    cpu_s = {k: [] for k in cases}
    for _ in range(reps):
        for k, fn in cases.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[k].append(time.perf_counter() - t0)
            cpu_s[k].append(time.process_time() - c0)
    return {k: (min(wall[k]), statistics.median(wall[k]), min(cpu_s[k])) for k in cases}


def bare_gemms(x: torch.Tensor, w: torch.Tensor, views: int):
    """The three GEMMs of each view into preallocated fp32 buffers (no elementwise work at all)."""
    n = x.shape[0] // views
    xs = [x[i * n : (i + 1) * n] for i in range(views)]
    z = torch.empty(n, w.shape[0])
    dx = torch.empty(n, x.shape[1])
    dw = torch.zeros_like(w)

    def run():
        for xv in xs:
            torch.mm(xv, w.t(), out=z)
            torch.mm(z, w, out=dx)
            dw.addmm_(z.t(), xv)

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--h", type=int, default=512)
    ap.add_argument("--v", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunk-bytes", type=int, default=None)
    ap.add_argument("--csv", default=None)
    a = ap.parse_args(argv)
    if a.quick:
        a.n, a.h, a.v, a.reps = 1024, 256, 8192, 2
    if not _ext.built():
        print("lsa_kernels._C is not built: only the ATen path can be timed", file=sys.stderr)
    torch.manual_seed(0)
    N, H, V = a.n, a.h, a.v
    x = (torch.randn(N, H) * 0.5).requires_grad_(True)
    w = (torch.randn(V, H) * H**-0.5).requires_grad_(True)
    y = torch.randint(0, V, (N,))
    T = N // 2
    hl = (torch.randn(1, T, H) * 0.5).requires_grad_(True)
    hs = (torch.randn(1, T, H) * 0.5).requires_grad_(True)
    yl, ys = torch.randint(0, V, (1, T)), torch.randint(0, V, (1, T))
    l_extra = T // 4

    def ce():
        x.grad = w.grad = None
        lsa_kernels.linear_cross_entropy(x, w, y, backend="cpu", chunk_bytes=a.chunk_bytes).backward()

    def ls():
        hl.grad = hs.grad = w.grad = None
        lsa_kernels.long_short_loss(
            hl, hs, w, yl, ys, l_extra=l_extra, divergence="sce", backend="cpu", chunk_bytes=a.chunk_bytes
        ).loss.backward()

    def with_path(fn, off):
        def run():
            with _ext.disable(off):
                fn()
        return run

    paths = [("aten", True)] + ([("ext", False)] if _ext.built() else [])
    gemm_ce = bare_gemms(x.detach(), w.detach(), 1)
    gemm_ls = bare_gemms(torch.cat([hl.detach()[0], hs.detach()[0]]), w.detach(), 2)
    cases = {("ce", "gemm"): gemm_ce, ("ls", "gemm"): gemm_ls}
    for name, off in paths:
        cases[("ce", name)] = with_path(ce, off)
        cases[("ls", name)] = with_path(ls, off)
    res = _time_interleaved(cases, a.reps)

    rows = []
    dx = torch.empty(1, H)
    for op, goal, label in (("ce", 1.2, "linear_cross_entropy"), ("ls", 1.15, "long_short_loss sce")):
        fw, fm, fc = res[(op, "gemm")]
        rows.append(dict(op=label, path="GEMMs", K=0, chunk_rows=N if op == "ce" else N // 2, wall_min=round(fw, 4),
                         wall_median=round(fm, 4), cpu=round(fc, 4), ratio=1.0, cpu_ratio=1.0, goal=goal, met=True))
        for name, off in paths:
            with _ext.disable(off):
                k = cpu.k_buffers(op == "ls", dx)
            c = cpu.chunk_rows(V, k, a.chunk_bytes)  # rows per chunk, both views and the unpaired rows together
            tw, tm, tc = res[(op, name)]
            rows.append(dict(op=label, path=name, K=k, chunk_rows=c, wall_min=round(tw, 4), wall_median=round(tm, 4),
                             cpu=round(tc, 4), ratio=round(tw / fw, 3), cpu_ratio=round(tc / fc, 3), goal=goal,
                             met=tw / fw <= goal))
    print(f"N={N} H={H} V={V} fp32, threads={torch.get_num_threads()}, simd={_ext.simd()}, reps={a.reps} interleaved; "
          "ratio = wall min / GEMMs wall min; cpu = process CPU seconds (min)")
    print(f"{'op':21s} {'path':5s} {'K':>2s} {'rows':>5s} {'wall min':>9s} {'wall med':>9s} {'cpu s':>8s} "
          f"{'ratio':>6s} {'cpu rat':>7s} {'goal':>5s} met")
    for r in rows:
        print(f"{r['op']:21s} {r['path']:5s} {r['K']:2d} {r['chunk_rows']:5d} {r['wall_min']:9.3f} {r['wall_median']:9.3f} "
              f"{r['cpu']:8.3f} {r['ratio']:6.3f} {r['cpu_ratio']:7.3f} {r['goal']:5.2f} {'yes' if r['met'] else 'NO'}")
    if ("ce", "ext") in res:
        print(f"speed-up ext vs aten (wall min): CE {res[('ce', 'aten')][0] / res[('ce', 'ext')][0]:.2f}x, "
              f"long-short {res[('ls', 'aten')][0] / res[('ls', 'ext')][0]:.2f}x")
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
