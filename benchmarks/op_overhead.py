"""Per-call CPU time of the public ops at tiny shapes, where the Python op boundary (the options record, the
checks, the dispatch, autocast handling) is a visible part of the call: to compare two source trees.

    python -m benchmarks.op_overhead                              # this tree, 3 rounds
    python -m benchmarks.op_overhead --trees /tmp/wt_old,. --rounds 3   # two trees, alternated

A tree is a directory holding ``lsa_kernels/`` with its extension built (``python setup.py build_ext --inplace``
there). Each (tree, round) is a fresh process (benchmarks/harness.py) with one torch thread that imports that
tree's package and times, after 20 warm-up calls, 15 batches of 40 calls of: ``linear_cross_entropy`` forward
(no grad) and forward + backward (N=64, H=32, V=256, backend="cpu"), and ``long_short_loss`` forward + backward
(2 x 40 rows per view, l_extra=8). Prints, per op, the fastest batch's time per call of every run and the
ratio of the trees' fastest (the noise of a shared machine only ever adds time).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .harness import child_main, run_child_process

OPS = ("ce_fwd", "ce_fwd_bwd", "long_short_fwd_bwd")


def measure(tree: str) -> dict:
    sys.path.insert(0, tree)
    import torch

    torch.set_num_threads(1)
    import lsa_kernels as L

    where = str(Path(L.__file__).resolve().parent.parent)
    if where != str(Path(tree).resolve()):
        raise RuntimeError(f"imported lsa_kernels from {where}, not from {tree}")
    g = torch.Generator().manual_seed(0)
    N, H, V = 64, 32, 256
    x = torch.randn(N, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    y = torch.randint(0, V, (N,), generator=g)
    xl = torch.randn(2, 40, H, generator=g, requires_grad=True)
    xs = torch.randn(2, 40, H, generator=g, requires_grad=True)
    yl, ys = torch.randint(0, V, (2, 40), generator=g), torch.randint(0, V, (2, 40), generator=g)

    def ce_fwd():
        with torch.no_grad():
            L.linear_cross_entropy(x, w, y, backend="cpu")

    def ce_fwd_bwd():
        L.linear_cross_entropy(x, w, y, backend="cpu").backward()

    def long_short_fwd_bwd():
        L.long_short_loss(xl, xs, w, yl, ys, l_extra=8, alpha=0.1, backend="cpu").loss.backward()

    out = {"tree": tree}
    for name, fn in zip(OPS, (ce_fwd, ce_fwd_bwd, long_short_fwd_bwd)):
        for _ in range(20):
            fn()
        per_call = []
        for _ in range(15):
            t0 = time.perf_counter()
            for _ in range(40):
                fn()
            per_call.append((time.perf_counter() - t0) / 40 * 1e6)
        out[name + "_us"] = min(per_call)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.op_overhead", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", default=".", help="comma list of source trees (default: this one)")
    ap.add_argument("--rounds", type=int, default=3, help="runs per tree, alternated (default 3)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child_main(lambda: measure(a.child))
    if a.rounds < 1:
        ap.error(f"--rounds: expected an int >= 1, got {a.rounds}")
    trees = [str(Path(t).resolve()) for t in a.trees.split(",") if t.strip()]
    missing = [t for t in trees if not (Path(t) / "lsa_kernels" / "__init__.py").exists()]
    if not trees or missing:
        ap.error(f"--trees: no lsa_kernels/ package in {missing or a.trees!r}")
    rows = []
    for _ in range(a.rounds):
        for t in trees:
            run = run_child_process(["-m", "benchmarks.op_overhead", "--child", t], 600)
            res = run.result_or_failure()
            if res.get("status", "ok") != "ok":
                print(f"{t}: {res['status']}: {res.get('reason', '')}", file=sys.stderr)
                return 1
            rows.append(res)
            print(json.dumps(res), flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nfastest batch, microseconds per call (1-minute load average at the end: {load:.1f})")
    for op in OPS:
        best = {t: min(r[op + "_us"] for r in rows if r["tree"] == t) for t in trees}
        runs = {t: [round(r[op + "_us"]) for r in rows if r["tree"] == t] for t in trees}
        line = "  ".join(f"{Path(t).name or t}: {runs[t]}" for t in trees)
        ratio = "" if len(trees) < 2 else f"  last/first {best[trees[-1]] / best[trees[0]]:.3f}"
        print(f"{op:20s} {line}{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
