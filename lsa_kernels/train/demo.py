"""The end-to-end demo: same model, same data, same steps, with alpha = 0 (plain CE) and alpha = 0.1.

    python -m lsa_kernels.train.demo --out runs/demo        # ~10 min on 2 CPU cores

Trains the small default Llama twice (``<out>/ce``, ``<out>/lsa``), evaluates both at 1x..8x the
training length (``<out>/eval``: results.json, ppl_vs_length.png) and writes ``<out>/table.md``.
At this scale (a few hundred steps of a ~1M-parameter model) the difference may be small or go
either way; the table reports what came out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import List, Optional


def demo_main(argv: Optional[List[str]] = None) -> int:
    from ..integrations.hf import UnsupportedModel
    from .evaluate import evaluate, markdown_table
    from .loop import ConfigError, TrainConfig, train, validate

    ap = argparse.ArgumentParser(prog="lsa demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--l-train", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="auto", choices=["auto", "cpu", "triton", "reference"])
    ap.add_argument("--n-windows", type=int, default=16)
    ap.add_argument("--lsm-samples", type=int, default=64)
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)

    t0 = time.perf_counter()
    runs = {"ce (alpha=0)": os.path.join(a.out, "ce"), f"lsa (alpha={a.alpha:g})": os.path.join(a.out, "lsa")}
    cfgs = [
        TrainConfig(alpha=alpha, steps=a.steps, l_train=a.l_train, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                    backend=a.backend, out=path, ckpt_every=a.steps, quiet=a.quiet)
        for alpha, path in zip((0.0, a.alpha), runs.values())
    ]
    try:
        for c in cfgs:  # check flags before touching --out; the demo always starts its runs fresh
            shutil.rmtree(c.out, ignore_errors=True) if os.path.isdir(c.out) and _is_demo_run(c.out) else None
            validate(c)
        times = {}
        for name, c in zip(runs, cfgs):
            t = time.perf_counter()
            m = train(c)
            times[name] = (time.perf_counter() - t, m)
        res = evaluate(list(runs.values()), os.path.join(a.out, "eval"), labels=list(runs), l_train=a.l_train,
                       n_windows=a.n_windows, lsm_samples=a.lsm_samples, backend=a.backend)
    except (ConfigError, UnsupportedModel, FileNotFoundError) as e:
        print(f"lsa demo: error: {e}", file=sys.stderr)
        return 2
    table = markdown_table(res)
    lines = [
        f"Demo: default Llama ({cfgs[0].n_layer} layers, d={cfgs[0].n_embd}), l_train={a.l_train}, "
        f"batch {a.batch_size}, {a.steps} steps, seed {a.seed}, backend {a.backend}; held-out Shakespeare, "
        f"{a.n_windows} windows per length, LSM over {a.lsm_samples} samples. No RoPE extension at evaluation.",
        "",
        table,
        "",
        "| run | train time (s) | final train CE | final misalign | tokens/s |",
        "|---|---|---|---|---|",
    ]
    for name, (sec, m) in times.items():
        lines.append(f"| {name} | {sec:.0f} | {m['ce']:.3f} | {m['misalign']:.3f} | {m['tok_s']:.0f} |")
    lines += ["", f"total wall time {time.perf_counter() - t0:.0f} s"]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"plot: {os.path.join(a.out, 'eval', 'ppl_vs_length.png')}")
    return 0


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _measure_one(mode: str, l_train: int, batch: int, repeats: int, backend: str, n_layer: int, n_embd: int) -> dict:
    """Time one training step (fwd+bwd+AdamW) of ``mode`` ("ce": alpha=0, one view; "lsa": both views)."""
    import torch

    from ..integrations.hf import LongShortObjective, output_head
    from .loop import TrainConfig, build_model

    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = TrainConfig(n_layer=n_layer, n_embd=n_embd, ffn=int(n_embd * 2.75) // 32 * 32)
    model = build_model(cfg, 4096, dev)
    output_head(model)
    obj = LongShortObjective(model, backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    l_extra = l_train // 4  # the mean of U{1..l_train/2}
    window = torch.randint(0, 4096, (batch, l_train + l_extra + 1), device=dev)
    alpha, win = (0.0, window[:, : l_train + 1]) if mode == "ce" else (0.1, window)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else None

    def step():
        if amp is not None:
            with amp:
                out = obj(win, l_extra, alpha)
        else:
            out = obj(win, l_extra, alpha)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    step()  # warm-up (allocates optimizer state)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kib("VmRSS") * 1024
    times, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    peak = torch.cuda.max_memory_allocated() - base if dev.type == "cuda" else _rss_kib("VmHWM") * 1024 - base
    times.sort()
    cpu.sort()
    return {"mode": mode, "median_s": times[len(times) // 2], "min_s": times[0], "cpu_median_s": cpu[len(cpu) // 2], "peak_extra_mib": peak / 2**20,
            "device": str(dev), "backend": backend}


def measure_main(argv: Optional[List[str]] = None) -> int:
    """``python -m lsa_kernels.train.demo --measure``: long-short step vs plain CE step on the same window.

    Each mode runs in its own process (so peak memory is not shared); prints a JSON line per mode and
    the time ratio."""
    import subprocess

    ap = argparse.ArgumentParser(prog="lsa demo --measure")
    ap.add_argument("--measure", action="store_true")
    ap.add_argument("--l-train", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(_measure_one(a.one, a.l_train, a.batch_size, a.repeats, a.backend, a.n_layer, a.n_embd)))
        return 0
    res = {}
    for mode in ("ce", "lsa"):
        cmd = [sys.executable, "-m", "lsa_kernels.train.demo", "--measure", "--one", mode] + [
            f"--l-train={a.l_train}", f"--batch-size={a.batch_size}", f"--repeats={a.repeats}", f"--backend={a.backend}",
            f"--n-layer={a.n_layer}", f"--n-embd={a.n_embd}"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        res[mode] = json.loads(out)
        print(out)
    r = res["lsa"]["median_s"] / res["ce"]["median_s"]
    rc = res["lsa"]["cpu_median_s"] / res["ce"]["cpu_median_s"]
    rm = res["lsa"]["min_s"] / res["ce"]["min_s"]
    print(f"long-short / plain-CE step time: median wall {r:.2f}x, min wall {rm:.2f}x, median process-CPU {rc:.2f}x "
          f"(goal <= 2.1x; the long-short step processes 2 views)")
    return 0


def _is_demo_run(path: str) -> bool:
    try:
        with open(os.path.join(path, "config.json")) as f:
            return "alpha" in json.load(f)
    except (OSError, ValueError):
        return False


if __name__ == "__main__":
    sys.exit(measure_main() if "--measure" in sys.argv[1:] else demo_main())
