"""The one measurement harness every CPU benchmark here uses: a fresh Python process per measurement, the
memory probes, the marked result line, the CSV writer, the machine record.

Why a process per measurement: peak memory. CPU RSS has no "reset peak" in most tools, allocator state
leaks between cases, and torch.compile / Triton caches inflate the next case. So:

- the parent builds the child's command line and calls :func:`run_child_process` (its own session: a
  timeout kills the child and everything it started; ``child_env``: no Triton interpreter, the repository
  on ``PYTHONPATH``);
- the child measures inside :func:`child_main`, which prints exactly one line ``MARK + json`` (the result,
  or ``{"status": "oom" | "error", "reason": ...}`` when the measurement raised; the traceback goes to
  stderr); a child that dies without that line is classified by :meth:`ChildRun.result_or_failure`;
- results are appended to the CSV as they arrive (:class:`CsvRows`): a killed run keeps what it finished.

Memory on CPU (Linux): before the measured call ``gc.collect()`` + ``malloc_trim(0)``, the baseline is
VmRSS and the high-water mark VmHWM is reset to the current RSS by writing ``5`` to
``/proc/self/clear_refs`` (Linux >= 4.0); the peak extra memory is VmHWM after the call minus the
baseline. If the reset is refused, ``ru_maxrss`` is the fallback (only the first measured call is then
meaningful).

Users: ``benchmarks/runner.py`` (the op suite, ``python -m benchmarks``), ``benchmarks/train_step.py``
(one training step), ``benchmarks/distill.py`` and ``benchmarks/prob_targets.py`` (one shape, one process
per implementation: :func:`run_impls`, :func:`measure_step`, :func:`write_standalone`).
"""

from __future__ import annotations

import csv
import ctypes
import gc
import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

MARK = "@@RESULT@@"
REPO = Path(__file__).resolve().parents[1]
MIB = 2**20

_OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory", "bad_alloc", "memoryerror")


# ------------------------------------------------------------------------------------ memory probes


def status_kb(key: str) -> Optional[int]:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``, ``VmSize``); None when unreadable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def meminfo_mib(key: str) -> Optional[float]:
    """A ``/proc/meminfo`` field in MiB (``MemTotal``, ``MemAvailable``); None when unreadable."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS; True when the kernel accepted it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = status_kb("VmHWM"), status_kb("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024


def malloc_trim() -> None:
    """Return glibc's free heap pages to the system (so that VmRSS is what is live)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def maxrss_kb() -> int:
    """The process's peak RSS in KiB (``ru_maxrss``; never reset)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def loadavg_1m() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


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


def _has_c_ext() -> bool:
    try:
        import importlib

        importlib.import_module("lsa_kernels._C")
        return True
    except Exception:
        return False


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


# -------------------------------------------------------------------------------------------- child


def is_oom(e: BaseException) -> bool:
    """An allocation failure: MemoryError, or an error whose message says the allocator gave up."""
    if isinstance(e, MemoryError):
        return True
    msg = f"{type(e).__name__}: {e}".lower()
    return any(w in msg for w in _OOM_WORDS)


def child_main(measure: Callable[[], Dict]) -> int:
    """In the child: run ``measure()`` and print its result as the one marked line. An exception is reported,
    not raised (the parent records the row): ``{"status": "oom" | "error", "reason": ...}``, traceback on stderr."""
    try:
        res = measure()
    except Exception as e:  # MemoryError included
        import traceback

        traceback.print_exc()
        msg = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
        res = {"status": "oom" if is_oom(e) else "error", "reason": msg}
    print(MARK + json.dumps(res), flush=True)
    return 0


def measure_step(step: Callable[[], object], params: Sequence, warmup: int, repeats: int) -> Dict:
    """``warmup`` then ``repeats`` timed calls of ``step()`` (a forward+backward), grads of ``params`` dropped before
    each; peak extra memory from the high-water mark (module docstring). -> time_s (fastest), time_median_s,
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
        malloc_trim()
        ok = reset_hwm()
        base = (status_kb("VmRSS") or 0) * 1024
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        peak = (status_kb("VmHWM") or 0) * 1024
        mems.append(max(0, peak - base) / MIB if ok else float("nan"))
    return {"threads": torch.get_num_threads(), "time_s": min(times),
            "time_median_s": sorted(times)[len(times) // 2], "repeats": repeats, "peak_mem_mb": max(mems)}


# ------------------------------------------------------------------------------------------- parent


def child_env() -> Dict[str, str]:
    """The child's environment: compiled kernels (never the Triton interpreter), the repository importable."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def address_space_cap(hard_bytes: int) -> Callable[[], None]:
    """A ``preexec_fn`` that caps the child's virtual size (``RLIMIT_AS``) at ``hard_bytes``."""
    def fn():  # runs in the child before exec: nothing it does can grow past this
        resource.setrlimit(resource.RLIMIT_AS, (hard_bytes, hard_bytes))
    return fn


@dataclass
class ChildRun:
    """What a child process left: its marked result (None when it printed none), exit code and output."""

    result: Optional[Dict]
    returncode: Optional[int]
    stdout: str
    stderr: str
    timed_out: bool
    timeout_s: float

    def result_or_failure(self) -> Dict:
        """The marked result; else a ``timeout`` / ``oom`` (killed, or the last lines say so) / ``error`` row."""
        if self.timed_out:
            return {"status": "timeout", "reason": f"over {self.timeout_s:.0f} s"}
        if self.result is not None:
            return self.result
        tail = " | ".join((self.stderr or self.stdout or "").strip().splitlines()[-3:])
        oomish = self.returncode in (-9, 137) or any(w in tail.lower() for w in _OOM_WORDS)
        return {"status": "oom" if oomish else "error", "reason": f"child exit {self.returncode}: {tail}"[:300]}


def run_child_process(argv: Sequence[str], timeout_s: float,
                      preexec_fn: Optional[Callable[[], None]] = None) -> ChildRun:
    """Run ``python <argv>`` in the repository in a new session (a timeout kills its whole process group) with
    :func:`child_env`; returns the last marked line's JSON and the output."""
    cmd = [sys.executable, *argv]
    p = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, preexec_fn=preexec_fn)
    try:
        out, err = p.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # our own child's session only
        out, err = p.communicate()
        return ChildRun(None, p.returncode, out or "", err or "", True, timeout_s)
    res = None
    for line in out.splitlines():
        if line.startswith(MARK):
            res = json.loads(line[len(MARK):])
    return ChildRun(res, p.returncode, out, err, False, timeout_s)


# ---------------------------------------------------------------------------------------------- CSV


def format_value(v, nan: str = "nan"):
    """A CSV cell: floats to 6 significant digits, NaN as ``nan``."""
    if isinstance(v, float):
        return nan if math.isnan(v) else f"{v:.6g}"
    return v


def read_csv(path: Path) -> List[Dict]:
    """The rows of a CSV as strings ([] when it does not exist)."""
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class CsvRows:
    """One CSV, rewritten with its header at the start of a run and appended row by row as results arrive.

    ``resume``: the rows already in the file whose status is in ``keep`` are kept (read back with ``read``,
    default :func:`read_csv`) and rewritten first. ``key(row)`` identifies a case: a later row of the same key
    replaces the earlier one in ``rows`` (the file keeps both). ``nan``: how a NaN cell is written."""

    def __init__(self, path: Path, columns: Sequence[str], key: Callable[[Dict], tuple], resume: bool = False,
                 keep: Iterable[str] = ("ok",), read: Callable[[Path], List[Dict]] = read_csv, nan: str = "nan"):
        self.path, self.columns, self.key, self.nan = Path(path), list(columns), key, nan
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep = set(keep)
        kept = [r for r in read(self.path) if r.get("status") in keep] if resume else []
        with open(self.path, "w", newline="") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writeheader()
        self.rows: List[Dict] = []
        for r in kept:
            self.add(r)

    def add(self, row: Dict) -> None:
        k = self.key(row)
        self.rows = [r for r in self.rows if self.key(r) != k] + [row]
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(
                {c: format_value(row.get(c, ""), self.nan) for c in self.columns})

    def get(self, key: tuple) -> Optional[Dict]:
        for r in self.rows:
            if self.key(r) == key:
                return r
        return None


# ---------------------------------------------------------------- one-shape benchmarks (distill, prob_targets)


def run_impls(module: str, impls: Iterable[str], args: List[str], timeout: float) -> List[Dict]:
    """Each implementation in its own ``python -m <module> --child IMPL <args>`` process (its ``main`` calls
    :func:`child_main`); the marked line is the row (``{"impl", "error"}`` when it failed or timed out). Rows are
    printed as they arrive."""
    rows = []
    for impl in impls:
        run = run_child_process(["-m", module, "--child", impl, *args], timeout)
        if run.timed_out:
            row = {"impl": impl, "error": f"timeout after {timeout} s"}
        elif run.result is None or run.result.get("status", "ok") != "ok":
            row = {"impl": impl, "error": run.stderr[-2000:]}
        else:
            row = run.result
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


def collect() -> None:
    """``gc.collect()`` then ``malloc_trim(0)``: what is resident afterwards is what is live."""
    gc.collect()
    malloc_trim()
