"""Run each benchmark case in its own fresh Python process and collect one CSV row per case.

Why a process per case: peak memory. CPU RSS has no "reset peak" in most tools, allocator state leaks
between cases, and torch.compile / Triton caches inflate the next case. In the child:

1. inputs are built (seeded; the same for every implementation of one shape);
2. ``warmup`` calls (the first one's time is kept as ``time_first_ms``: it includes compilation);
3. ``repeats`` measured calls; before each: grads/outputs dropped, ``gc.collect()``,
   ``malloc_trim(0)`` (CPU), then the memory baseline is taken and the peak is reset:
   - CPU: baseline = VmRSS; the high-water mark VmHWM is reset to the current RSS by writing ``5`` to
     ``/proc/self/clear_refs`` (Linux ≥ 4.0); peak = VmHWM after the call. If the reset is refused,
     the fallback is ``ru_maxrss`` (only the first measured call is then meaningful).
   - CUDA: ``torch.cuda.reset_peak_memory_stats()``; baseline = ``memory_allocated()``;
     peak = ``max_memory_allocated()``.
   ``peak_mem_mb`` = max over the measured calls of (peak − baseline): the extra memory the op needs
   on top of its inputs, including the gradients it returns.
   Time: ``time.perf_counter`` around the call on CPU; CUDA events (after a synchronize) on GPU.
   ``time_ms`` is the median of the measured calls.

The process, the memory probes, the marked result line and the CSV writer are ``benchmarks/harness.py``'s
(shared with the other benchmarks): the child prints one JSON line prefixed by ``@@RESULT@@``; the parent
appends it to the CSV as soon as it arrives (a killed run keeps what it finished).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from .harness import (CsvRows, child_main, machine_info, malloc_trim, maxrss_kb, read_csv, reset_hwm,
                      run_child_process, status_kb)

COLUMNS = [
    "device", "op", "divergence", "impl", "mode", "dtype", "N", "H", "V",
    "status", "reason",
    "time_ms", "time_ms_min", "time_ms_max", "time_ms_first", "repeats",
    "peak_mem_mb", "peak_mem_first_mb", "base_mem_mb", "mem_method",
    "loss", "note",
    "threads", "cpu_model", "gpu_name", "torch", "triton", "loadavg_1m", "wall_s", "timestamp",
]


@dataclass
class Settings:
    warmup: int = 1
    min_repeats: int = 3
    max_repeats: int = 7
    budget_s: float = 20.0  # measured calls per case: as many as fit in this (within min..max)
    case_timeout_s: float = 600.0
    deadline_s: Optional[float] = None  # stop launching new cases after this many seconds


# -------------------------------------------------------------------------------------------- child


def run_child(case_dict: Dict, settings: Dict) -> Dict:
    """Measure one case in this process (call it in a fresh one). Returns the measurement fields."""
    import torch

    from .cases import Case, make_inputs, prepare

    case = Case.from_dict(case_dict)
    cuda = case.device == "cuda"
    torch.manual_seed(0)
    inp = make_inputs(case)
    prep = prepare(case, inp)

    if cuda:
        torch.cuda.synchronize()

        def timed() -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            prep.step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
    else:

        def timed() -> float:
            t0 = time.perf_counter()
            prep.step()
            return time.perf_counter() - t0

    def mem_begin():
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated(), True
        malloc_trim()
        return (status_kb("VmRSS") or 0) * 1024, reset_hwm()

    def mem_end():
        return torch.cuda.max_memory_allocated() if cuda else (status_kb("VmHWM") or 0) * 1024

    # first call: its peak counts caches/workspaces an implementation keeps between calls (and one-time
    # init such as compilation), which the steady-state measurement below cannot see
    warm_times, first_peak = [], float("nan")
    for i in range(max(0, int(settings["warmup"]))):
        prep.reset()
        if i == 0:
            base0, reset_ok = mem_begin()
        warm_times.append(timed())
        if i == 0 and reset_ok:
            first_peak = max(0, mem_end() - base0) / 2**20
    t_ref = warm_times[-1] if warm_times else None
    if t_ref is None or t_ref <= 0:
        n_rep = int(settings["min_repeats"])
    else:
        n_rep = int(round(settings["budget_s"] / t_ref))
        n_rep = max(int(settings["min_repeats"]), min(int(settings["max_repeats"]), n_rep))

    times, mems, bases = [], [], []
    method = "cuda_max_memory_allocated" if cuda else "vmhwm_reset"
    for r in range(n_rep):
        prep.reset()
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            malloc_trim()
            base = (status_kb("VmRSS") or 0) * 1024
            if method == "vmhwm_reset" and not reset_hwm():
                method = "ru_maxrss"
            if method == "ru_maxrss":
                base = max(base, maxrss_kb() * 1024) if r == 0 else None
        dt = timed()
        if cuda:
            peak = torch.cuda.max_memory_allocated()
        elif method == "vmhwm_reset":
            peak = (status_kb("VmHWM") or 0) * 1024
        else:
            peak = maxrss_kb() * 1024
        times.append(dt)
        if base is not None:
            mems.append(max(0, peak - base))
            bases.append(base)

    out = prep.out
    loss = float(out.float().item()) if isinstance(out, torch.Tensor) and out.numel() == 1 else float("nan")
    if case.impl == "gemm":
        loss = float("nan")
    return {
        "time_ms": statistics.median(times) * 1e3,
        "time_ms_min": min(times) * 1e3,
        "time_ms_max": max(times) * 1e3,
        "time_ms_first": (warm_times[0] if warm_times else times[0]) * 1e3,
        "repeats": len(times),
        "peak_mem_mb": max(mems) / 2**20 if mems else float("nan"),
        "base_mem_mb": min(bases) / 2**20 if bases else float("nan"),
        "peak_mem_first_mb": first_peak,
        "mem_method": method,
        "loss": loss,
        "note": prep.note,
        "threads": torch.get_num_threads(),
    }


def _row_key(r: Dict) -> tuple:
    return tuple(str(r.get(k, "")) for k in ("device", "op", "divergence", "impl", "mode", "dtype", "N", "H", "V"))


def run_one(case, settings: Settings, log=None) -> Dict:
    """Run ``case`` in a fresh process; return its CSV row (without machine columns)."""
    from .cases import skip_reason

    row = dict(case.to_dict())
    reason = skip_reason(case)
    if reason:
        row.update(status="skip", reason=reason)
        return row
    argv = [
        "-m", "benchmarks.runner", "--child",
        json.dumps(case.to_dict()),
        json.dumps({k: getattr(settings, k) for k in ("warmup", "min_repeats", "max_repeats", "budget_s")}),
    ]
    t0 = time.time()
    run = run_child_process(argv, settings.case_timeout_s)
    res = run.result_or_failure()
    if res.get("status") not in ("ok", "timeout") and log is not None:
        log.write(f"--- {case.label()}\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}\n")
    row.update(res)
    row["wall_s"] = round(time.time() - t0, 2)
    return row


class CsvSink:
    """One CSV per op (:class:`harness.CsvRows`), rewritten at the start of a run and appended row by row."""

    def __init__(self, out_dir: Path, tag: str, ops, resume: bool = False):
        self.tables = {op: CsvRows(Path(out_dir) / f"{tag}_{op}.csv", COLUMNS, _row_key, resume=resume,
                                   keep=("ok", "skip"), read=read_csv) for op in ops}
        # resume: finished rows (ok / skip) kept from an earlier run
        self.done: Dict[tuple, Dict] = {_row_key(r): r for t in self.tables.values() for r in t.rows}

    def add(self, row: Dict) -> None:
        self.tables[row["op"]].add(row)


def run_cases(cases, out_dir: Path, tag: str, settings: Settings, progress: bool = True,
              resume: bool = False) -> List[Dict]:
    """Run every case (skips recorded as rows too), write ``{out_dir}/{tag}_{op}.csv`` and the machine
    sidecar ``{tag}_machine.json``; returns the rows. ``resume`` keeps the ok/skip rows already in
    those CSVs and runs only the other cases."""
    cases = list(cases)
    device = cases[0].device if cases else "cpu"
    info = machine_info(device)
    out_dir = Path(out_dir)
    sink = CsvSink(out_dir, tag, sorted({c.op for c in cases}), resume=resume)
    if sink.done:
        done = [c for c in cases if _row_key(c.to_dict()) in sink.done]
        rows_done = [sink.done[_row_key(c.to_dict())] for c in done]
        cases = [c for c in cases if _row_key(c.to_dict()) not in sink.done]
        print(f"resume: {len(done)} cases already in the CSVs, {len(cases)} to run", flush=True)
    else:
        rows_done = []
    with open(out_dir / f"{tag}_machine.json", "w") as f:
        json.dump(info, f, indent=2)
    common = {k: info.get(k, "") for k in ("cpu_model", "gpu_name", "torch", "triton")}
    rows: List[Dict] = list(rows_done)
    t_start = time.time()
    try:
        from tqdm import tqdm

        bar = tqdm(cases, desc=f"bench {tag}", unit="case", disable=not progress, dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        bar = cases
    with open(out_dir / f"{tag}_errors.log", "w") as log:
        for case in bar:
            if hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(case.label()[:70])
            if settings.deadline_s is not None and time.time() - t_start > settings.deadline_s:
                row = dict(case.to_dict(), status="not_run", reason=f"deadline {settings.deadline_s:.0f} s reached")
            else:
                row = run_one(case, settings, log)
            row.update(common)
            row["loadavg_1m"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else ""
            row["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            if row.get("status") == "skip":
                row.setdefault("threads", "")
            sink.add(row)
            rows.append(row)
    log_path = out_dir / f"{tag}_errors.log"
    if log_path.exists() and log_path.stat().st_size == 0:
        log_path.unlink()
    return rows


def main(argv: List[str]) -> int:
    if len(argv) == 3 and argv[0] == "--child":
        case_dict, settings = json.loads(argv[1]), json.loads(argv[2])
        return child_main(lambda: dict(run_child(case_dict, settings), status="ok"))
    print("usage: python -m benchmarks [--quick] ...  (this module's CLI is internal: --child CASE SETTINGS)")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
