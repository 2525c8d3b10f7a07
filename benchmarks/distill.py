"""Distillation benchmark: fused linear_distillation against torch KD on materialised logits.

    python -m benchmarks.distill                     # the goal shape, fp32, CPU: N=4096, Hs=512, Ht=1024, V=32768
    python -m benchmarks.distill --rows 512 --vocab 4096 --repeats 2 --tag cpu_distill_small   # a quick look

One fresh process per implementation (benchmarks/harness.py; peak memory as in the op suite: VmHWM reset through
/proc/self/clear_refs before each measured call; peak extra memory = VmHWM after − RSS before). The step is
forward + backward of ``loss = 0.5·CE(student, y) + τ²·KL(teacher ‖ student)`` (τ = 2, mean over rows,
frozen teacher; gradients to the student's hidden states and head):

    lsa_cpu   lsa_kernels.linear_distillation(backend="cpu")
    torch     F.linear for both heads (teacher under no_grad), log_softmax, KL and CE on the [N, V] logits
    gemm      the GEMMs the step needs, into preallocated outputs — student logits x_s W_sᵀ, dX = G W_s,
              dW = Gᵀ x_s, teacher logits x_t W_tᵀ: the floor
    liger     Liger's fused linear JSD is Triton only; on a CPU it runs only under the Triton interpreter, which
              is no speed measurement: not run here (its values are checked in tests/api/test_distillation.py)

Goal: lsa_cpu ≤ 1.25× the GEMMs' time and ≥ 10× less peak extra memory than torch. Writes
``{out}/{tag}.csv`` and ``{out}/{tag}.json`` (rows + machine + goal lines) and prints the goal lines.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .harness import child_main, measure_step, run_impls, write_standalone

IMPLS = ("gemm", "lsa_cpu", "torch")
TAU, HARD = 2.0, 0.5


def _inputs(n, hs, ht, v, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, hs, generator=g)
    xt = torch.randn(n, ht, generator=g)
    ws = torch.randn(v, hs, generator=g) / hs**0.5
    wt = torch.randn(v, ht, generator=g) / ht**0.5
    y = torch.randint(0, v, (n,), generator=g)
    return xs, ws, xt, wt, y


def _step(impl, xs, ws, xt, wt, y):
    import torch
    import torch.nn.functional as F

    if impl == "gemm":
        n, v = xs.shape[0], ws.shape[0]
        z = torch.empty(n, v)
        zt = torch.empty(n, v)
        G = torch.randn(n, v)
        dx, dw = torch.empty_like(xs), torch.empty_like(ws)

        def step():
            torch.mm(xs, ws.t(), out=z)
            torch.mm(xt, wt.t(), out=zt)
            torch.mm(G, ws, out=dx)
            torch.mm(G.t(), xs, out=dw)

        return step, []
    xs.requires_grad_(True)
    ws.requires_grad_(True)
    if impl == "lsa_cpu":
        import lsa_kernels

        def step():
            out = lsa_kernels.linear_distillation(xs, ws, xt, wt, y, divergence="kl", temperature=TAU,
                                                  hard_loss_weight=HARD, backend="cpu", check_targets=False)
            out.loss.backward()

        return step, [xs, ws]
    if impl == "torch":

        def step():
            zs = F.linear(xs, ws)
            with torch.no_grad():
                lp = torch.log_softmax(F.linear(xt, wt) / TAU, -1)
            lq = torch.log_softmax(zs / TAU, -1)
            soft = F.kl_div(lq, lp, log_target=True, reduction="batchmean") * TAU**2
            loss = HARD * F.cross_entropy(zs, y) + soft
            loss.backward()

        return step, [xs, ws]
    raise ValueError(impl)


def child(impl, n, hs, ht, v, warmup, repeats) -> dict:
    import torch

    torch.manual_seed(0)
    xs, ws, xt, wt, y = _inputs(n, hs, ht, v)
    step, params = _step(impl, xs, ws, xt, wt, y)
    return {"impl": impl, "N": n, "Hs": hs, "Ht": ht, "V": v, "dtype": "fp32",
            **measure_step(step, params, warmup, repeats)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.distill", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--hs", type=int, default=512)
    ap.add_argument("--ht", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="cpu_distill")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per implementation's process")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    shape = (a.rows, a.hs, a.ht, a.vocab)
    if a.child:
        return child_main(lambda: child(a.child, *shape, a.warmup, a.repeats))
    rows = run_impls("benchmarks.distill", a.impls.split(","),
                     ["--rows", str(a.rows), "--hs", str(a.hs), "--ht", str(a.ht), "--vocab", str(a.vocab),
                      "--warmup", str(a.warmup), "--repeats", str(a.repeats)], a.timeout)
    by = {r["impl"]: r for r in rows if "error" not in r}
    goals = []
    if "lsa_cpu" in by and "gemm" in by:
        r = by["lsa_cpu"]["time_s"] / by["gemm"]["time_s"]
        goals.append(f"time: lsa_cpu {by['lsa_cpu']['time_s']:.2f} s = {r:.2f}x the GEMMs "
                     f"({by['gemm']['time_s']:.2f} s); goal <= 1.25x: {'MET' if r <= 1.25 else 'NOT MET'}")
    if "lsa_cpu" in by and "torch" in by:
        r = by["torch"]["peak_mem_mb"] / max(by["lsa_cpu"]["peak_mem_mb"], 1e-9)
        goals.append(f"memory: torch {by['torch']['peak_mem_mb']:.0f} MiB / lsa_cpu {by['lsa_cpu']['peak_mem_mb']:.0f} "
                     f"MiB = {r:.1f}x less; goal >= 10x: {'MET' if r >= 10 else 'NOT MET'}")
        goals.append(f"time vs torch: {by['torch']['time_s'] / by['lsa_cpu']['time_s']:.2f}x faster")
    fields = ["impl", "N", "Hs", "Ht", "V", "dtype", "threads", "time_s", "time_median_s", "repeats", "peak_mem_mb",
              "error"]
    write_standalone(Path(a.out), a.tag, rows, fields, "goals", goals,
                     "python -m benchmarks.distill " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
