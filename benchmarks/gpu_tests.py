"""Run tests/backends/test_cuda.py with the kernels compiled, in parallel processes, within a time limit.

    python -m benchmarks.gpu_tests --out DIR [--jobs 4] [--timeout 200]

The tests are collected once, then split round-robin over ``--jobs`` pytest processes on the one GPU (Triton
compiles on the CPU, one kernel at a time per process: parallel processes cut the cold-compile time that
dominates this step; the two tests that need tens of GB of GPU memory share one process, so they never run
at the same time). Each result line is read as it is written; a failure is printed at once. At the end,
or at ``--timeout`` (the processes are then stopped), one summary line:

    cuda tests: PASS 58 passed, 3 skipped in 95 s (4 processes)
    cuda tests: FAIL 2 failed, 56 passed, 3 skipped in 97 s (4 processes): test_ce[all-bf16], ...
    cuda tests: TIMEOUT at 200 s: 40 passed, 0 failed, 21 not run (4 processes)

and ``DIR/test_cuda_summary.json``; ``DIR/test_cuda_K.log`` holds each process's pytest output. ``--cpu``:
the same on CPU tensors under the Triton interpreter (``LSA_CUDA_TEST_ON_CPU=1``; what ``DRY_RUN=1
benchmarks/gpu_run.sh`` runs), which also prints ``SPECIALISATIONS n``, the kernel specialisations the tests
launch (benchmarks/gpu_specs.py). Exit status: 0 all ran and passed (skips allowed), 1 a test failed, 124 the
time limit cut the run, 2 nothing was collected.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
TEST_FILE = "tests/backends/test_cuda.py"
BIG_MEMORY = ("test_int64_offsets", "test_dense_targets_rows_past")  # tens of GB each: never side by side
RESULT = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def child_env(cpu: bool = False) -> Dict[str, str]:
    env = dict(os.environ)
    env.pop("LSA_SPECS_OUT", None)
    if cpu:  # the test code on CPU tensors under the interpreter
        env.update(TRITON_INTERPRET="1", LSA_CUDA_TEST_ON_CPU="1")
    else:  # compiled kernels (the flag is read when the kernels are imported)
        env["TRITON_INTERPRET"] = "0"
        env.pop("LSA_CUDA_TEST_ON_CPU", None)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def collect(py: str, timeout: float, cpu: bool = False) -> List[str]:
    p = subprocess.run([py, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", TEST_FILE],
                       cwd=REPO, env=child_env(cpu), capture_output=True, text=True, timeout=timeout)
    return [ln.strip() for ln in p.stdout.splitlines() if ln.startswith(TEST_FILE + "::")]


def split(ids: List[str], jobs: int) -> List[List[str]]:
    """Round-robin over ``jobs`` groups; the big-memory tests all in the first group."""
    jobs = max(1, min(jobs, len(ids)))
    groups: List[List[str]] = [[] for _ in range(jobs)]
    big = [i for i in ids if any(b in i for b in BIG_MEMORY)]
    rest = [i for i in ids if i not in big]
    groups[0].extend(big)
    for k, i in enumerate(rest):
        groups[(k + (1 if big and jobs > 1 else 0)) % jobs].append(i)
    return [g for g in groups if g]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_tests", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for the logs and the summary")
    ap.add_argument("--jobs", type=int, default=4, help="parallel pytest processes (>= 1)")
    ap.add_argument("--timeout", type=float, default=200.0, help="seconds for the whole step (> 0)")
    ap.add_argument("--python", default=sys.executable, help="interpreter with CUDA torch + triton")
    ap.add_argument("--cpu", action="store_true", help="run the tests on CPU under the interpreter (a check of "
                    "this step and of the test code) and count the kernel specialisations they launch")
    a = ap.parse_args(argv)
    if a.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {a.jobs}")
    if not a.timeout > 0:
        ap.error(f"--timeout must be > 0, got {a.timeout}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        ids = collect(a.python, a.timeout, a.cpu)
    except subprocess.TimeoutExpired:
        print(f"cuda tests: TIMEOUT at {a.timeout:.0f} s: collecting {TEST_FILE} did not finish")
        return 124
    if not ids:
        print(f"cuda tests: FAIL nothing collected from {TEST_FILE} (is CUDA visible? see pytest --collect-only)")
        return 2
    groups = split(ids, a.jobs)
    procs, logs, offsets = [], [], []
    for k, g in enumerate(groups):
        log = out / f"test_cuda_{k}.log"
        fh = open(log, "wb")
        env = child_env(a.cpu)
        plugin = []
        if a.cpu:
            env["LSA_SPECS_OUT"] = str(out / f"specs_{k}.json")
            plugin = ["-p", "benchmarks.gpu_specs"]
        procs.append(subprocess.Popen([a.python, "-m", "pytest", "-v", "-p", "no:cacheprovider", *plugin, "-rfE",
                                       "--tb=short", *g], cwd=REPO, env=env, stdout=fh,
                                      stderr=subprocess.STDOUT, start_new_session=True))
        fh.close()
        logs.append(log)
        offsets.append(0)
    results: Dict[str, str] = {}

    def stop_children(signum=None, frame=None):
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        if signum is not None:  # stopped from outside (gpu_run.sh's timeout): no orphan keeps the GPU
            sys.exit(124)

    signal.signal(signal.SIGTERM, stop_children)

    def read_new():
        for k, log in enumerate(logs):
            with open(log, "rb") as f:
                f.seek(offsets[k])
                chunk = f.read()
            cut = chunk.rfind(b"\n") + 1
            offsets[k] += cut
            for ln in chunk[:cut].decode(errors="replace").splitlines():
                m = RESULT.match(ln)
                if m and m.group(1) not in results:
                    results[m.group(1)] = m.group(2)
                    if m.group(2) in ("FAILED", "ERROR"):
                        print(f"  {m.group(2)} {m.group(1).split('::', 1)[1]}", flush=True)

    timed_out, last_note = False, t0
    while any(p.poll() is None for p in procs):
        read_new()
        if time.time() - t0 > a.timeout:
            timed_out = True
            stop_children()
            break
        if time.time() - last_note > 30:
            last_note = time.time()
            print(f"  ... {len(results)}/{len(ids)} tests done at {time.time() - t0:.0f} s", flush=True)
        time.sleep(0.5)
    for p in procs:
        p.wait()
    read_new()
    took = time.time() - t0
    n = {s: sum(v == s for v in results.values()) for s in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    failed = [i.split("::", 1)[1] for i, v in results.items() if v in ("FAILED", "ERROR")]
    not_run = len(ids) - len(results)
    crashed = [k for k, p in enumerate(procs) if p.returncode not in (0, 1) and not timed_out]
    counts = f"{n['PASSED']} passed, {n['FAILED'] + n['ERROR']} failed, {n['SKIPPED']} skipped"
    if timed_out:
        status, code = "TIMEOUT", 124
        line = f"cuda tests: TIMEOUT at {a.timeout:.0f} s: {counts}, {not_run} not run ({len(groups)} processes)"
    elif failed or not_run or crashed:
        status, code = "FAIL", 1
        line = (f"cuda tests: FAIL {counts}, {not_run} not run in {took:.0f} s ({len(groups)} processes)"
                + (f": {', '.join(failed[:8])}{' ...' if len(failed) > 8 else ''}" if failed else "")
                + (f"; process(es) {crashed} exited abnormally" if crashed else ""))
    else:
        status, code = "PASS", 0
        line = f"cuda tests: PASS {counts} in {took:.0f} s ({len(groups)} processes)"
    skipped = [i.split("::", 1)[1] for i, v in results.items() if v == "SKIPPED"]
    (out / "test_cuda_summary.json").write_text(json.dumps(dict(
        status=status, seconds=round(took, 1), processes=len(groups), collected=len(ids), passed=n["PASSED"],
        failed=failed, skipped=skipped, not_run=not_run, line=line), indent=2))
    with open(out / "test_cuda.log", "w") as f:
        for log in logs:
            f.write(f"===== {log.name}\n{log.read_text(errors='replace')}\n")
    print(line, flush=True)
    if a.cpu and not timed_out:
        keys = set()
        for k in range(len(groups)):
            f = out / f"specs_{k}.json"
            if f.exists():
                keys.update(json.loads(f.read_text()))
        print(f"SPECIALISATIONS {len(keys)} (kernels launched by the tests on CPU; GPU-only tests not counted)")
    return code


if __name__ == "__main__":
    sys.exit(main())
