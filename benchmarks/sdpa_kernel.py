"""Which attention kernel a transformers Llama layer runs on the CPU at long context, and what it keeps.

    python -m benchmarks.sdpa_kernel                         # T = 8192, 32768, 131072 (~10 min on 2 cores)
    python -m benchmarks.sdpa_kernel --tokens 4096 --out /tmp/sdpa   # one quick length

The long-context rows of benchmarks/results/long_context/ assume that attention memory is linear in T: the
memory-efficient ("flash") SDPA kernel, never a ``[T, T]`` score matrix (at T = 131072 one fp32 score matrix
per head is 64 GiB). This checks it on the model those rows are for (the train-step benchmark's layer: H = 256,
4 query heads, 2 key/value heads, head dim 64, fp32, causal, no attention mask, SDPA attention as
``lsa train`` loads it): one decoder layer's ``self_attn`` runs forward and backward at each length, in a fresh
process per length (:mod:`benchmarks.harness`), under a dispatch mode that records every aten op that runs
(which SDPA kernel, whether any op made a tensor with a ``T x T`` plane) and VmHWM above the inputs.

Writes ``sdpa_kernel.json`` in ``--out`` (default benchmarks/results/long_context): per length the kernels
seen, the largest tensor made (bytes), the peak above the baseline and its bytes per token, the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List

from benchmarks.harness import (child_main, machine_info, malloc_trim, reset_hwm, run_child_process,
                                status_kb)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "long_context")
LAYER = dict(vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2)


def measure(T: int) -> Dict:
    """One layer's attention forward + backward at ``T`` tokens: kernels, largest tensor, peak memory."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import LlamaConfig

    from lsa_kernels.integrations import hf

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.largest, self.square = set(), 0, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = str(func.overloadpacket.__name__)
            self.ops.add(name)
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel() * t.element_size())
                    if t.dim() >= 2 and t.shape[-1] == T and t.shape[-2] == T:
                        self.square.append(name)
            return out

    torch.manual_seed(0)
    model = hf.load_causal_lm(LlamaConfig(**LAYER, max_position_embeddings=T), dtype=torch.float32, attn="sdpa")
    layer = model.model.layers[0]
    x = torch.randn(1, T, LAYER["hidden_size"], requires_grad=True)
    pos = torch.arange(T).unsqueeze(0)
    cos_sin = model.model.rotary_emb(x, pos)
    malloc_trim()
    base_kb = status_kb("VmRSS")
    reset_hwm()
    t0 = time.perf_counter()
    with Record() as rec:
        out = layer.self_attn(hidden_states=x, position_embeddings=cos_sin, attention_mask=None)[0]
        out.sum().backward()
    dt = time.perf_counter() - t0
    peak_kb = status_kb("VmHWM") - base_kb
    sdpa = sorted(op for op in rec.ops if "attention" in op or "sdpa" in op)
    return {"T": T, "sdpa_ops": sdpa, "square_tensor_ops": sorted(set(rec.square)),
            "largest_tensor_bytes": rec.largest, "peak_above_inputs_mib": round(peak_kb / 1024, 1),
            "peak_bytes_per_token": round(peak_kb * 1024 / T, 1), "seconds": round(dt, 1),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child_main(lambda: measure(a.child))
    rows = []
    for T in a.tokens:
        run = run_child_process(["-m", "benchmarks.sdpa_kernel", "--child", str(T)], a.timeout)
        r = run.result_or_failure()
        r.setdefault("T", T)
        rows.append(r)
        print(json.dumps(r), flush=True)
    flash = all(r.get("sdpa_ops") and all("flash" in op for op in r["sdpa_ops"]) and not r.get("square_tensor_ops")
                for r in rows)
    verdict = ("memory-efficient SDPA at every length: " + ", ".join(sorted({op for r in rows for op in r.get("sdpa_ops", [])}))
               + "; no T x T tensor" if flash else "NOT the memory-efficient path at every length (see rows)")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "sdpa_kernel.json"), "w") as f:
        json.dump({"command": "python -m benchmarks.sdpa_kernel " + " ".join(sys.argv[1:]), "verdict": verdict,
                   "rows": rows, "machine": machine_info("cpu")}, f, indent=1)
    print(verdict)
    return 0 if flash else 1


if __name__ == "__main__":
    sys.exit(main())
