"""Peak memory and time of one long-short training step, joint vs sequential views (and the tiled MLP), on
the train-step benchmark's model (benchmarks/train_step.py: Llama, V = 128256, 2 layers, hidden 256, fp32, CPU).

    python scripts/measure_views.py --T 4096                 # memory: one fresh process per case
    python scripts/measure_views.py --T 1024 --timing 3      # time: the cases alternated in one process
                                                             # (median process CPU time and wall time)

Memory is measured as benchmarks/train_step.py does: build the model, one warm-up step at 64 tokens, drop
the gradients, ``gc`` + ``malloc_trim``, reset VmHWM to the current RSS, run forward + backward, read VmHWM;
``extra`` = VmHWM - RSS before the step (activations, hidden states, logits chunks, the gradients).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CASES = {  # name: (objective, views, checkpointing, tiled MLP and norms: 0 off, -1 MLP, -2 MLP and norms)
    "ce": ("ce", "joint", False, 0),
    "joint": ("ls", "joint", False, 0),
    "sequential": ("ls", "sequential", False, 0),
    "ce+ckpt": ("ce", "joint", True, 0),
    "joint+ckpt": ("ls", "joint", True, 0),
    "sequential+ckpt": ("ls", "sequential", True, 0),
    "sequential+ckpt+tiled": ("ls", "sequential", True, -1),
    "sequential+ckpt+tiled+norms": ("ls", "sequential", True, -2),
}


def _setup(name: str, T: int):
    import torch
    from transformers import LlamaConfig

    from benchmarks.train_step import FULL_MODEL
    from lsa_kernels.integrations import hf
    from lsa_kernels.integrations.tiling import tile_mlp, tile_norms

    obj, views, ckpt, tiled = CASES[name]
    torch.manual_seed(0)
    model = hf.load_causal_lm(LlamaConfig(**FULL_MODEL, max_position_embeddings=max(32768, 2 * T)),
                              dtype=torch.float32, attn="sdpa").train()
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tiled:
        tile_mlp(model)  # one tile per hidden-size tokens
    if tiled == -2:
        tile_norms(model)
    gen = torch.Generator().manual_seed(1234)

    def step(t: int) -> float:
        if obj == "ce":
            x = torch.randint(0, FULL_MODEL["vocab_size"], (1, t), generator=gen)
            loss = hf.causal_lm_loss(model, x, x)
        else:
            x = torch.randint(0, FULL_MODEL["vocab_size"], (1, t + t // 4 + 1), generator=gen)
            loss = hf.long_short_step(model, x, t // 4, alpha=0.1, views=views).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss)

    return step


def child(name: str, T: int) -> dict:
    from benchmarks.harness import malloc_trim, reset_hwm, status_kb

    step = _setup(name, T)
    step(64)
    gc.collect()
    malloc_trim()
    rss0 = status_kb("VmRSS")
    ok = reset_hwm()
    t0 = time.perf_counter()
    step(T)
    dt = time.perf_counter() - t0
    hwm = status_kb("VmHWM")
    return {"case": name, "T": T, "base_mib": rss0 / 1024, "peak_mib": hwm / 1024, "extra_mib": (hwm - rss0) / 1024,
            "step_s": dt, "hwm_reset": ok}


def timing(T: int, rounds: int, names) -> dict:
    steps = {n: _setup(n, T) for n in names}
    for s in steps.values():
        s(64)
    cpu, wall = {n: [] for n in names}, {n: [] for n in names}
    for _ in range(rounds):
        for n, s in steps.items():
            c0, t0 = time.process_time(), time.perf_counter()
            s(T)
            cpu[n].append(time.process_time() - c0)
            wall[n].append(time.perf_counter() - t0)
    return {n: {"cpu_s": statistics.median(cpu[n]), "wall_s": statistics.median(wall[n])} for n in names}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--timing", type=int, default=0, help="rounds of the timing mode (0 = memory mode)")
    ap.add_argument("--child", default="")
    a = ap.parse_args(argv)
    if a.child:
        print("@@" + json.dumps(child(a.child, a.T)))
        return 0
    if a.timing:
        print(json.dumps(timing(a.T, a.timing, a.cases)))
        return 0
    for name in a.cases:
        p = subprocess.run([sys.executable, __file__, "--T", str(a.T), "--child", name], capture_output=True, text=True)
        lines = [ln[2:] for ln in p.stdout.splitlines() if ln.startswith("@@")]
        print(lines[0] if lines else json.dumps({"case": name, "error": p.stderr.strip().splitlines()[-1:]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
