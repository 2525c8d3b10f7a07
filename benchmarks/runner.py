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

The child prints one JSON line prefixed by ``@@RESULT@@``; the parent appends it to the CSV as soon
as it arrives (a killed run keeps what it finished).
"""

from __future__ import annotations

import csv
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional

MARK = "@@RESULT@@"
REPO = Path(__file__).resolve().parents[1]

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


# ------------------------------------------------------------------------------------ machine info

_MACHINE: Optional[Dict] = None


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_smi() -> str:
    try:
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
        return r.stdout.strip()
    except Exception:
        return ""


def machine_info(device: str) -> Dict:
    """CPU model, cores, library versions, GPU (name + nvidia-smi line). Cached per process."""
    global _MACHINE
    if _MACHINE is not None and _MACHINE.get("device") == device:
        return _MACHINE
    import torch

    info = {
        "device": device,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "gpu_name": "",
        "nvidia_smi": "",
    }
    for mod in ("triton", "liger_kernel", "cut_cross_entropy"):
        try:
            from importlib.metadata import version

            info[mod] = version(mod.replace("_", "-"))
        except Exception:
            info[mod] = ""
    try:
        import lsa_kernels

        info["lsa_kernels"] = getattr(lsa_kernels, "__version__", "")
        info["lsa_kernels_C"] = _has_c_ext()
    except Exception:
        pass
    try:
        info["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except Exception:
        info["git"] = ""
    if device == "cuda" and torch.cuda.is_available():
        info["gpu_name"] = torch.cuda.get_device_name(0)
        info["nvidia_smi"] = _nvidia_smi()
        info["cuda"] = torch.version.cuda
    _MACHINE = info
    return info


def _has_c_ext() -> bool:
    try:
        import importlib

        importlib.import_module("lsa_kernels._C")
        return True
    except Exception:
        return False


# ------------------------------------------------------------------------------------ memory probes


def _status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS; True when the kernel accepted it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _status_kb("VmHWM"), _status_kb("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def _maxrss_kb() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


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
        _malloc_trim()
        return (_status_kb("VmRSS") or 0) * 1024, _reset_hwm()

    def mem_end():
        return torch.cuda.max_memory_allocated() if cuda else (_status_kb("VmHWM") or 0) * 1024

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
            _malloc_trim()
            base = (_status_kb("VmRSS") or 0) * 1024
            if method == "vmhwm_reset" and not _reset_hwm():
                method = "ru_maxrss"
            if method == "ru_maxrss":
                base = max(base, _maxrss_kb() * 1024) if r == 0 else None
        dt = timed()
        if cuda:
            peak = torch.cuda.max_memory_allocated()
        elif method == "vmhwm_reset":
            peak = (_status_kb("VmHWM") or 0) * 1024
        else:
            peak = _maxrss_kb() * 1024
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


def _child_main(argv: List[str]) -> int:
    case_dict, settings = json.loads(argv[0]), json.loads(argv[1])
    try:
        res = run_child(case_dict, settings)
        res["status"] = "ok"
    except Exception as e:  # reported, not raised: the parent records the row
        import traceback

        traceback.print_exc()
        msg = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
        res = {"status": "oom" if "out of memory" in msg.lower() else "error", "reason": msg}
    print(MARK + json.dumps(res), flush=True)
    return 0


# ------------------------------------------------------------------------------------------- parent


def _child_env() -> Dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # benchmark compiled kernels, never the interpreter
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def run_one(case, settings: Settings, log=None) -> Dict:
    """Run ``case`` in a fresh process; return its CSV row (without machine columns)."""
    from .cases import skip_reason

    row = dict(case.to_dict())
    reason = skip_reason(case)
    if reason:
        row.update(status="skip", reason=reason)
        return row
    cmd = [
        sys.executable, "-m", "benchmarks.runner", "--child",
        json.dumps(case.to_dict()),
        json.dumps({k: getattr(settings, k) for k in ("warmup", "min_repeats", "max_repeats", "budget_s")}),
    ]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=REPO, env=_child_env(), capture_output=True, text=True,
                           timeout=settings.case_timeout_s)
        res = None
        for line in p.stdout.splitlines():
            if line.startswith(MARK):
                res = json.loads(line[len(MARK):])
        if res is None:
            tail = (p.stderr or p.stdout or "").strip().splitlines()[-3:]
            status = "oom" if p.returncode in (-9, 137) else "error"
            res = {"status": status, "reason": f"child exit {p.returncode}: " + " | ".join(tail)[:300]}
        if res.get("status") != "ok" and log is not None:
            log.write(f"--- {case.label()}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}\n")
    except subprocess.TimeoutExpired:
        res = {"status": "timeout", "reason": f"over {settings.case_timeout_s:.0f} s"}
    row.update(res)
    row["wall_s"] = round(time.time() - t0, 2)
    return row


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _row_key(r: Dict) -> tuple:
    return tuple(str(r.get(k, "")) for k in ("device", "op", "divergence", "impl", "mode", "dtype", "N", "H", "V"))


class CsvSink:
    """One CSV per op, rewritten at the start of a run and appended row by row."""

    def __init__(self, out_dir: Path, tag: str, ops: Iterable[str], resume: bool = False):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.paths = {op: out_dir / f"{tag}_{op}.csv" for op in ops}
        self.done: Dict[tuple, Dict] = {}  # resume: finished rows (ok / skip) kept from an earlier run
        for p in self.paths.values():
            kept = []
            if resume and p.exists():
                with open(p, newline="") as f:
                    kept = [r for r in csv.DictReader(f) if r.get("status") in ("ok", "skip")]
            with open(p, "w", newline="") as f:
                w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
                w.writeheader()
                for r in kept:
                    w.writerow({k: r.get(k, "") for k in COLUMNS})
                    self.done[_row_key(r)] = r

    def add(self, row: Dict) -> None:
        with open(self.paths[row["op"]], "a", newline="") as f:
            csv.DictWriter(f, COLUMNS, extrasaction="ignore").writerow({k: _fmt(row.get(k, "")) for k in COLUMNS})


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


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--child":
        sys.exit(_child_main(sys.argv[2:]))
    print("usage: python -m benchmarks [--quick] ...  (this module's CLI is internal: --child CASE SETTINGS)")
    sys.exit(2)


# ---------------------------------------------------------------- one-shape benchmarks (distill, prob_targets)

STANDALONE_MARK = "RESULT "


def run_impls(module: str, impls: Iterable[str], args: List[str], timeout: float) -> List[Dict]:
    """Each implementation in its own ``python -m <module> --child IMPL <args>`` process (the module docstring's
    reasons); its ``RESULT {json}`` line is the row (``{"impl", "error"}`` when it failed or timed out). Rows are
    printed as they arrive."""
    rows = []
    for impl in impls:
        cmd = [sys.executable, "-m", module, "--child", impl, *args]
        try:
            p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
            line = [x for x in p.stdout.splitlines() if x.startswith(STANDALONE_MARK)]
            row = json.loads(line[-1][len(STANDALONE_MARK):]) if line else {"impl": impl, "error": p.stderr[-2000:]}
        except subprocess.TimeoutExpired:
            row = {"impl": impl, "error": f"timeout after {timeout} s"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def write_standalone(out: Path, tag: str, rows: List[Dict], fields: List[str], lines_key: str, lines: List[str],
                     command: str) -> None:
    """``<out>/<tag>.csv`` (``fields`` of every row) and ``<out>/<tag>.json`` (rows, ``lines_key``: the computed
    summary / goal lines, the machine and the command); prints the lines."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{tag}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "python": platform.python_version(),
               "command": command}
    (out / f"{tag}.json").write_text(json.dumps({"rows": rows, lines_key: lines, "machine": machine}, indent=2))
    print("\n".join(lines))


def measure_step(step, params, warmup: int, repeats: int) -> Dict:
    """``warmup`` then ``repeats`` timed calls of ``step()`` (a forward+backward), grads of ``params`` dropped before
    each; CPU peak extra memory from the high-water mark (module docstring). -> time_s (fastest), time_median_s,
    repeats, peak_mem_mb (max over the calls), threads."""
    import torch

    for _ in range(warmup):
        step()
        for p in params:
            p.grad = None
    times, mems = [], []
    for _ in range(repeats):
        for p in params:
            p.grad = None
        _malloc_trim()
        ok = _reset_hwm()
        base = (_status_kb("VmRSS") or 0) * 1024
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        peak = (_status_kb("VmHWM") or 0) * 1024
        mems.append(max(0, peak - base) / 2**20 if ok else float("nan"))
    return {"threads": torch.get_num_threads(), "time_s": min(times),
            "time_median_s": sorted(times)[len(times) // 2], "repeats": repeats, "peak_mem_mb": max(mems)}
