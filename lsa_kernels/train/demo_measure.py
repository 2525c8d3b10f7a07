"""The cost of a long-short training step against a plain-CE step (docs/training.md, "Cost of a long-short
step"): one optimizer step (forward, backward, AdamW) of the demo model on the same windows, ``alpha = 0`` on
one view vs ``alpha = 0.1`` on both views (docs/maths.md §4), each mode in its own process so that peak
memory is not shared; median / min wall time, median process CPU time and the peak extra memory. Also
:func:`machine`, the description of the machine that ``lsa demo`` stores in its results.json.

    OMP_NUM_THREADS=1 python -m lsa_kernels.train.demo --measure --repeats 10 [--backend reference]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import List, Optional

from .. import _env


def machine() -> dict:
    """The machine a demo ran on (results.json's "machine"): CPU, cores, torch threads and version, load."""
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "python": platform.python_version(),
            "platform": platform.platform(), "loadavg_at_start": load}


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
    from .config import TrainConfig
    from .model import build_model

    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = TrainConfig(n_layer=n_layer, n_embd=n_embd, ffn=int(n_embd * 2.75) // 32 * 32)
    model = build_model(cfg, 4096, dev)
    output_head(model)
    obj = LongShortObjective(model, backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    l_extra = l_train // 4  # the mean of U{1..l_train/2}
    window = torch.randint(0, 4096, (batch, l_train + l_extra + 1), device=dev)
    # ce: the one-view baseline, the whole [B, l_train + 1] window is the long view (l_extra 0: l_train CE rows)
    alpha, win, l_ex = (0.0, window[:, : l_train + 1], 0) if mode == "ce" else (0.1, window, l_extra)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else None

    def step():
        if amp is not None:
            with amp:
                out = obj(win, l_ex, alpha)
        else:
            out = obj(win, l_ex, alpha)
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
    """``python -m lsa_kernels.train.demo --measure`` (or ``-m lsa_kernels.train.demo_measure``): long-short step
    vs plain CE step on the same window.

    Each mode runs in its own process (so peak memory is not shared); prints a JSON line per mode and
    the time ratio."""
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
    _env.smoke_caps(a, "lsa demo --measure", repeats=2, batch_size=2)
    res = {}
    for mode in ("ce", "lsa"):
        cmd = [sys.executable, "-m", "lsa_kernels.train.demo_measure", "--one", mode] + [
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


if __name__ == "__main__":
    sys.exit(measure_main())
