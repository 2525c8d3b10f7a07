"""The goal shapes on one GPU, first in a GPU run: CE and long-short sce in bf16 at a long-context size.

    python -m benchmarks.gpu_goal --out DIR                      # on a GPU (benchmarks/gpu_run.sh runs it)
    python -m benchmarks.gpu_goal --device cpu --small --out DIR # the same code on CPU at tiny shapes

Shape: BT = 16384 rows per view, H = 4096, V = 128256 (a Llama-3 head), bf16, forward + backward. Cases, in
this order (each in its own process, by the suite's runner; a deadline stops launching new ones):

    ce          ours (lsa_triton), torch's chunked F.linear_cross_entropy, the bare GEMMs
    long_short  ours (sce), the bare GEMMs (6 per step: logits, dH, dW for each view)
    then        the materialised-logits torch versions (naive) of both, for the memory ratio

For each row: median time, peak extra memory (on top of the inputs), the GEMM work the op needs
(``6·N·V·H`` flops per view for forward + backward, ``2·N·V·H`` forward only) divided by the time as a
fraction of the GPU's dense bf16 peak (a table by GPU name; ``--peak-tflops`` or ``PEAK_TFLOPS`` overrides
it), and the time against the bare GEMMs and torch's chunked CE. Writes ``{tag}_ce.csv``,
``{tag}_long_short.csv`` (the suite's columns) and ``{tag}.md`` (the table); prints one ``GOAL`` line per row.
Exit status 0 when ours ran for both ops, 1 otherwise.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

from .cases import Case
from .runner import Settings, run_cases

SHAPE = dict(N=16384, H=4096, V=128256)
SMALL = dict(N=64, H=32, V=512)
# dense (no sparsity) bf16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name (first match)
BF16_PEAK_TFLOPS = (
    ("GH200", 989.4), ("H200", 989.4), ("H100 PCIe", 756.5), ("H100 NVL", 835.5), ("H100", 989.4), ("H800", 989.4),
    ("B200", 2250.0), ("B100", 1750.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("L40", 181.0),
    ("A10G", 70.0), ("A10", 125.0), ("L4", 121.0),
)


def peak_tflops(gpu_name: str, override: Optional[float] = None) -> Optional[float]:
    """The dense bf16 peak of ``gpu_name`` (None when unknown); ``override`` wins."""
    if override:
        return float(override)
    for key, val in BF16_PEAK_TFLOPS:
        if key.lower() in (gpu_name or "").lower():
            return val
    return None


def goal_cases(device: str, small: bool = False) -> List[Case]:
    s = SMALL if small else SHAPE
    ours = "lsa_triton" if device == "cuda" else "lsa_cpu"
    dt = "bf16" if device == "cuda" else "fp32"  # CPU bf16 GEMMs are a different benchmark: fp32 there
    N, H, V = s["N"], s["H"], s["V"]

    def c(op, impl, div=""):
        return Case(op, impl, "fwd_bwd", dt, N, H, V, div, device)

    return [c("ce", ours), c("ce", "torch_chunked"), c("ce", "gemm"),
            c("long_short", ours, "sce"), c("long_short", "gemm", "sce"),
            c("ce", "naive"), c("long_short", "naive", "sce")]


def gemm_flops(row: Dict) -> float:
    """Flops of the GEMMs the op needs: 2·N·V·H per GEMM, 3 GEMMs forward + backward, per view."""
    n, h, v = (int(float(row[k])) for k in ("N", "H", "V"))
    per_view = 2.0 * n * v * h * (3 if row["mode"] == "fwd_bwd" else 1)
    return per_view * (2 if row["op"] == "long_short" else 1)


def _num(row: Optional[Dict], key: str) -> float:
    try:
        return float(row[key]) if row is not None and row.get("status") == "ok" else math.nan
    except (TypeError, ValueError):
        return math.nan


def summarise(rows: List[Dict], peak: Optional[float]) -> List[str]:
    """One ``GOAL`` line per row, in the order run."""
    by = {(r["op"], r["impl"]): r for r in rows}
    lines = []
    for r in rows:
        label = f"{r['op']}{' ' + r['divergence'] if r.get('divergence') else ''} {r['dtype']} N={r['N']} " \
                f"H={r['H']} V={r['V']} {r['impl']}"
        if r.get("status") != "ok":
            lines.append(f"GOAL {label}: {r.get('status')} {r.get('reason', '')}".rstrip())
            continue
        t = _num(r, "time_ms")
        tflops = gemm_flops(r) / (t * 1e-3) / 1e12
        parts = [f"{t:.1f} ms", f"{tflops:.3g} TFLOP/s of GEMM work"]
        if peak:
            parts.append(f"{100 * tflops / peak:.0f}% of bf16 peak {peak:g}")
        g = _num(by.get((r["op"], "gemm")), "time_ms")
        if r["impl"] != "gemm" and math.isfinite(g):
            parts.append(f"{t / g:.2f}x the bare GEMMs")
        tc = _num(by.get(("ce", "torch_chunked")), "time_ms")
        if r["op"] == "ce" and r["impl"] not in ("torch_chunked", "gemm") and math.isfinite(tc):
            parts.append(f"{t / tc:.2f}x torch chunked")
        mem = _num(r, "peak_mem_mb")
        if r["impl"] != "gemm":
            parts.append(f"peak extra {mem:.0f} MB")
        lines.append(f"GOAL {label}: " + ", ".join(parts))
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_goal", description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    ap.add_argument("--small", action="store_true", help=f"tiny shapes {SMALL} (a CPU check of this script)")
    ap.add_argument("--out", default="runs/bench", help="output directory")
    ap.add_argument("--tag", default=None, help="file prefix (default: {device}_goal)")
    ap.add_argument("--deadline", type=float, default=None, help="launch no new case after this many seconds")
    ap.add_argument("--case-timeout", type=float, default=120.0, help="seconds per case process")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU (default: by name)")
    a = ap.parse_args(argv)
    for name, v in (("--deadline", a.deadline), ("--case-timeout", a.case_timeout), ("--peak-tflops", a.peak_tflops)):
        if v is not None and not v > 0:
            ap.error(f"{name} must be > 0, got {v}")
    out, tag = Path(a.out), a.tag or f"{a.device}_goal"
    s = Settings(warmup=1, min_repeats=3, max_repeats=10, budget_s=1.0, case_timeout_s=a.case_timeout,
                 deadline_s=a.deadline)
    cases = goal_cases(a.device, a.small)
    print(f"{len(cases)} goal cases on {a.device} -> {out}/{tag}_*.csv", flush=True)
    rows = run_cases(cases, out, tag, s, progress=False)
    gpu = next((r.get("gpu_name") for r in rows if r.get("gpu_name")), "")
    env_peak = os.environ.get("PEAK_TFLOPS")
    peak = peak_tflops(gpu, a.peak_tflops or (float(env_peak) if env_peak else None)) if a.device == "cuda" else None
    lines = summarise(rows, peak)
    md = [f"# Goal shapes on {gpu or a.device}", "",
          f"bf16 peak used: {peak if peak else 'unknown (pass --peak-tflops)'} TFLOP/s dense; GEMM work = 6·N·V·H "
          "per view (forward + backward); peak extra = memory on top of the inputs.", ""]
    md += [f"- {ln[5:]}" for ln in lines]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(lines), flush=True)
    ours = {r["op"] for r in rows if r["impl"].startswith("lsa_") and r.get("status") == "ok"}
    return 0 if ours == {"ce", "long_short"} else 1


if __name__ == "__main__":
    sys.exit(main())
