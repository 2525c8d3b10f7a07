"""Probability-target benchmark (docs/maths.md §11): the dense-target CE pass against the GEMM
path it replaced and against torch, side by side in one run.

    python -m benchmarks --prob-targets             # N=4096, H=512, V=32768, fp32, CPU, forward + backward
                                                    # (= python -m benchmarks.prob_targets)
    python -m benchmarks.prob_targets --rows 512 --vocab 4096 --repeats 2 --tag cpu_prob_small   # a quick look

One fresh process per implementation (peak memory as benchmarks/distill.py: VmHWM reset before each measured
call; peak extra memory = VmHWM after − RSS before; the inputs, the target t [N, V] included, exist before).
The step is forward + backward of the mean CE of ``x Wᵀ`` against a float target ``t`` (rows of softmax),
gradients to x and W:

    gemm        the GEMMs the step needs, into preallocated outputs — logits x Wᵀ, dX = G W, dW = Gᵀ x: the floor
    lsa_cpu     lsa_kernels.linear_cross_entropy(x, W, t, backend="cpu"): t read chunk by chunk in the CE pass,
                forward and backward in one pass (this change)
    lsa_gemm    the path it replaced: lsa_kernels/weights.py at --before (default: the commit this branch started
                from), loaded from git — lse from the CE ops, then t·W in forward and tᵀ·x for dW as GEMMs,
                forward and backward in separate passes
    torch_lce   torch.nn.functional.linear_cross_entropy(x, W, t)
    torch       F.cross_entropy(F.linear(x, W), t) on the materialised [N, V] logits

Writes ``{out}/{tag}.csv`` and ``{out}/{tag}.json`` (rows, machine, summary lines) and prints the summary.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import types
from pathlib import Path

from .harness import child_main, measure_step, run_impls, write_standalone

IMPLS = ("gemm", "lsa_cpu", "lsa_gemm", "torch_lce", "torch")
BEFORE = "6554212"  # main when the dense-target pass was started (lsa_kernels/weights.py: the GEMM path)


def _inputs(n, h, v, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) / h**0.5
    t = torch.softmax(torch.randn(n, v, generator=g) * 2, -1)
    return x, w, t


def _old_weights(rev: str):
    """lsa_kernels/weights.py at git ``rev`` as a module of the installed package (its relative imports resolve)."""
    import lsa_kernels

    root = Path(lsa_kernels.__file__).resolve().parent.parent
    src = subprocess.run(["git", "show", f"{rev}:lsa_kernels/weights.py"], cwd=root, capture_output=True, text=True,
                         check=True).stdout
    # the old module imported a private alias that the package no longer has: give it the public name
    src = src.replace("from .autograd import _autocast_off", "from .dispatch import autocast_off as _autocast_off")
    mod = types.ModuleType("lsa_kernels._weights_before")
    mod.__package__ = "lsa_kernels"
    sys.modules[mod.__name__] = mod
    exec(compile(src, f"{rev}:lsa_kernels/weights.py", "exec"), mod.__dict__)
    return mod


def _step(impl, x, w, t, before):
    import torch
    import torch.nn.functional as F

    if impl == "gemm":
        n, v = x.shape[0], w.shape[0]
        z = torch.empty(n, v)
        G = torch.randn(n, v)
        dx, dw = torch.empty_like(x), torch.empty_like(w)

        def step():
            torch.mm(x, w.t(), out=z)
            torch.mm(G, w, out=dx)
            torch.mm(G.t(), x, out=dw)

        return step, []
    x.requires_grad_(True)
    w.requires_grad_(True)
    if impl == "lsa_cpu":
        import lsa_kernels

        def step():
            lsa_kernels.linear_cross_entropy(x, w, t, backend="cpu", check_targets=False).backward()

    elif impl == "lsa_gemm":
        from lsa_kernels.options import CEOptions

        old = _old_weights(before)
        opts = CEOptions()  # ignore_index -100, no smoothing, z-loss or softcap, default chunk, not deterministic

        def step():
            old.linear_target_loss(x, w, None, t, prob=True, class_weight=None, token_weight=None, reduction="mean",
                                   ignore_index=-100, label_smoothing=0.0, z_loss=0.0, opts=opts,
                                   backend="cpu").backward()

    elif impl == "torch_lce":

        def step():
            F.linear_cross_entropy(x, w, t).backward()

    elif impl == "torch":

        def step():
            F.cross_entropy(F.linear(x, w), t).backward()

    else:
        raise ValueError(impl)
    return step, [x, w]


def child(impl, n, h, v, warmup, repeats, before) -> dict:
    import torch

    torch.manual_seed(0)
    x, w, t = _inputs(n, h, v)
    step, params = _step(impl, x, w, t, before)
    return {"impl": impl, "N": n, "H": h, "V": v, "dtype": "fp32", **measure_step(step, params, warmup, repeats)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.prob_targets", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--before", default=BEFORE, help="git revision of the GEMM path (lsa_gemm)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="cpu_prob_targets")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per implementation's process")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    shape = (a.rows, a.hidden, a.vocab)
    if a.child:
        return child_main(lambda: child(a.child, *shape, a.warmup, a.repeats, a.before))
    rows = run_impls("benchmarks.prob_targets", a.impls.split(","),
                     ["--rows", str(a.rows), "--hidden", str(a.hidden), "--vocab", str(a.vocab), "--warmup",
                      str(a.warmup), "--repeats", str(a.repeats), "--before", a.before], a.timeout)
    by = {r["impl"]: r for r in rows if "error" not in r}
    summary = []
    if "lsa_cpu" in by:
        me = by["lsa_cpu"]
        for k in ("gemm", "lsa_gemm", "torch_lce", "torch"):
            if k in by:
                summary.append(f"lsa_cpu vs {k}: time {me['time_s']:.2f} s / {by[k]['time_s']:.2f} s = "
                               f"{me['time_s'] / by[k]['time_s']:.2f}x; peak extra memory {me['peak_mem_mb']:.0f} MiB "
                               f"vs {by[k]['peak_mem_mb']:.0f} MiB")
    fields = ["impl", "N", "H", "V", "dtype", "threads", "time_s", "time_median_s", "repeats", "peak_mem_mb", "error"]
    write_standalone(Path(a.out), a.tag, rows, fields, "summary", summary,
                     "python -m benchmarks.prob_targets " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
