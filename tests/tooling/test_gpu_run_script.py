"""benchmarks/gpu_run.sh and its steps, without a GPU: the header's time estimate, the preflight's findings
(compiler, Python.h, cache directory, versions, no CUDA), the split of the CUDA tests over processes, the goal
script's arithmetic, and the whole script with DRY_RUN=1 — every step on CPU, the CUDA tests under the
interpreter (which runs the bodies of tests/backends/test_cuda.py and counts the kernel specialisations
they launch). No timing assertions."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_goal, gpu_preflight, gpu_tests

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_run.sh"
VERDICT_BY_S = 300  # the verdict within 5 minutes of work, by the header's estimate


def _header_estimates():
    """{name: (expression, stated seconds)} from the ``# EST name = expr = N s`` lines."""
    est = {}
    for line in SCRIPT.read_text().splitlines():
        m = re.match(r"^# EST (\w+) = (.+?)(?: = (\d+))? s$", line)
        if m:
            expr, stated = m.group(2), m.group(3)
            est[m.group(1)] = (expr, int(stated if stated is not None else expr))
    return est


def test_header_estimate_adds_up_and_fits():
    est = _header_estimates()
    assert set(est) == {"preflight", "cuda_tests", "verdict", "correctness", "goal", "before_suite"}, est
    for name, (expr, stated) in est.items():
        assert re.fullmatch(r"[\d.+*/() ]+", expr), f"{name}: {expr!r} is not arithmetic"
        assert abs(eval(expr) - stated) <= 1, f"EST {name}: {expr} = {eval(expr):.1f}, the header says {stated}"
    assert est["verdict"][1] == est["preflight"][1] + est["cuda_tests"][1]
    assert est["before_suite"][1] == est["verdict"][1] + est["correctness"][1] + est["goal"][1]
    assert est["verdict"][1] <= VERDICT_BY_S
    text = SCRIPT.read_text()
    total = int(re.search(r"TOTAL_S=\$\{TOTAL_S:-(\d+)\}", text).group(1))
    jobs = int(re.search(r"CUDA_TEST_JOBS=\$\{CUDA_TEST_JOBS:-(\d+)\}", text).group(1))
    assert est["before_suite"][1] < total <= 480
    # the cuda_tests formula: (specialisations on CPU + GPU-only) * s per compile / processes + running
    m = re.fullmatch(r"\((\d+) \+ (\d+)\) \* ([\d.]+) / (\d+) \+ (\d+)", est["cuda_tests"][0])
    assert m, est["cuda_tests"][0]
    assert int(m.group(4)) == jobs, "the estimate's process count is not CUDA_TEST_JOBS' default"
    # the script's own re-estimate uses the same counts
    specs = re.search(r"EST_SPECS=\$\(\( (\d+) \+ (\d+) \)\); EST_RUN_S=(\d+)", text)
    assert specs and specs.groups() == (m.group(1), m.group(2), m.group(5))


def test_script_syntax_and_knob_refusal(tmp_path):
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    p = subprocess.run(["bash", str(SCRIPT)], env=dict(os.environ, TOTAL_S="ten", OUT=str(tmp_path)),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 64 and "TOTAL_S must be a positive integer" in p.stdout


# ------------------------------------------------------------------------------------------ preflight


def _report():
    return gpu_preflight.Report()


def test_preflight_no_compiler(monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(gpu_preflight.shutil, "which", lambda name: None)
    rep = _report()
    gpu_preflight.check_compiler(rep)
    assert [(c, chk) for c, chk, _ in rep.fails] == [(gpu_preflight.EXIT_TOOLCHAIN, "compiler")]
    assert "Failed to find C compiler" in rep.fails[0][2]


def test_preflight_missing_python_headers(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_preflight, "python_include_dir", lambda: str(tmp_path))
    rep = _report()
    gpu_preflight.check_compiler(rep)
    assert rep.fails and rep.fails[0][0] == gpu_preflight.EXIT_TOOLCHAIN and "Python.h is missing" in rep.fails[0][2]


def test_preflight_compiler_that_cannot_build(monkeypatch, tmp_path):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'fatal: no headers here' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    rep = _report()
    gpu_preflight.check_compiler(rep)
    assert rep.fails and "fatal: no headers here" in rep.fails[0][2]


def test_preflight_finds_this_machines_compiler():
    if not gpu_preflight.find_c_compiler()[0]:
        pytest.skip("no C compiler here")
    rep = _report()
    gpu_preflight.check_compiler(rep)
    assert not rep.fails, rep.lines


def test_preflight_cache_dir(monkeypatch, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(blocker / "cache"))
    rep = _report()
    gpu_preflight.check_cache(rep)
    assert rep.fails and "not writable" in rep.fails[0][2]
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(gpu_preflight, "_mount_of", lambda path: ("/mnt/shared", "nfs4"))
    rep = _report()
    gpu_preflight.check_cache(rep)
    assert not rep.fails and "network file system" in rep.lines[0]


@pytest.mark.parametrize("cpu", [True, False], ids=["interpreter", "gpu"])
def test_preflight_old_triton_with_new_numpy(monkeypatch, cpu):
    versions = {"torch": "2.11.0", "triton": "3.6.0", "numpy": "2.4.1"}
    monkeypatch.setattr(gpu_preflight, "_version", lambda m: versions[m])
    rep = _report()
    gpu_preflight.check_versions(rep, cpu)
    if cpu:
        assert rep.fails and rep.fails[0][0] == gpu_preflight.EXIT_VERSIONS
    else:
        assert not rep.fails and "numpy < 2.4" in rep.lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine without CUDA")
def test_preflight_without_cuda_says_so_in_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "benchmarks.gpu_preflight", "--json", str(tmp_path / "p.json")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == gpu_preflight.EXIT_NO_CUDA, p.stdout + p.stderr
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("PREFLIGHT: FAIL cuda: no CUDA device") and last.endswith("(exit 2)")
    assert json.loads((tmp_path / "p.json").read_text())["exit"] == 2


def test_script_without_a_compiler_stops_after_the_preflight(tmp_path):
    """No C compiler: no kernel could launch, so the verdict says so and nothing else runs (exit 3)."""
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path), CC=str(tmp_path / "no-such-cc"), PYTHON=sys.executable)
    p = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 3, p.stdout[-2000:]
    verdict = [ln for ln in p.stdout.splitlines() if ln.startswith("VERDICT:")]
    assert len(verdict) == 1 and verdict[0].startswith("VERDICT: FAIL toolchain") and "no-such-cc" in verdict[0]
    assert "== 2." not in p.stdout and "FINAL: exit 3" in p.stdout


# ---------------------------------------------------------------------------------- tests / goal


def test_split_keeps_every_test_once_and_big_ones_together():
    ids = [f"tests/backends/test_cuda.py::test_{i}" for i in range(11)]
    ids += ["tests/backends/test_cuda.py::test_int64_offsets_rows_past_2_31_elements",
            "tests/backends/test_cuda.py::test_dense_targets_rows_past_2_31_elements"]
    for jobs in (1, 3, 4, 20):
        groups = gpu_tests.split(ids, jobs)
        assert sorted(i for g in groups for i in g) == sorted(ids)
        assert len(groups) <= jobs
        big = [k for k, g in enumerate(groups) for i in g if "past_2_31" in i]
        assert big == [0, 0]


def test_goal_arithmetic():
    assert gpu_goal.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert gpu_goal.peak_tflops("NVIDIA H100 PCIe") == 756.5
    assert gpu_goal.peak_tflops("NVIDIA H200") == 989.4
    assert gpu_goal.peak_tflops("some other card") is None
    assert gpu_goal.peak_tflops("some other card", 100.0) == 100.0
    base = dict(dtype="bf16", N="16384", H="4096", V="128256", mode="fwd_bwd", divergence="", status="ok")
    flops = 6 * 16384 * 128256 * 4096
    assert gpu_goal.gemm_flops(dict(base, op="ce")) == flops
    assert gpu_goal.gemm_flops(dict(base, op="long_short")) == 2 * flops
    t_ms = flops / 500e12 * 1e3  # 500 TFLOP/s
    rows = [dict(base, op="ce", impl="lsa_triton", time_ms=str(2 * t_ms), peak_mem_mb="100"),
            dict(base, op="ce", impl="gemm", time_ms=str(t_ms), peak_mem_mb="0"),
            dict(base, op="ce", impl="torch_chunked", status="skip", reason="no chunked CE")]
    lines = gpu_goal.summarise(rows, peak=1000.0)
    assert "250 TFLOP/s" in lines[0] and "25% of bf16 peak" in lines[0] and "2.00x the bare GEMMs" in lines[0]
    assert "torch chunked" not in lines[0]  # its row was skipped: no ratio
    assert lines[2].endswith("skip no chunked CE")


# ------------------------------------------------------------------------------- the whole script


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_run")
    env = dict(os.environ, DRY_RUN="1", OUT=str(out), CUDA_TEST_JOBS="2", PYTHON=sys.executable,
               TOTAL_S="1500", CUDA_TEST_S="900", CHECK_S="300", GOAL_S="400")  # a loaded CI machine: no step cut
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    (res,) = list(out.glob("gpu_*"))
    return p, res


def test_dry_run_verdict_first_then_numbers(dry_run):
    p, res = dry_run
    log = p.stdout
    assert p.returncode == 0, log[-3000:]
    lines = log.splitlines()
    verdict = [i for i, ln in enumerate(lines) if ln.startswith("VERDICT:")]
    assert len(verdict) == 1 and lines[verdict[0]].startswith("VERDICT: PASS")
    first_check = next(i for i, ln in enumerate(lines) if ln.startswith(("PASS {", "FAIL {")))
    assert verdict[0] < first_check, "the verdict must come before the correctness lines"
    assert (res / "VERDICT.txt").read_text().strip() == lines[verdict[0]]
    assert lines[-1].startswith("FINAL: exit 0") or any(ln.startswith("FINAL: exit 0") for ln in lines)
    checks = [json.loads(ln) for ln in (res / "cpu_correctness.jsonl").read_text().splitlines()]
    assert checks and all(c["ok"] for c in checks)
    goal = (res / "cpu_goal.md").read_text()
    assert "lsa_cpu" in goal and "gemm" in goal
    summary = json.loads((res / "test_cuda_summary.json").read_text())
    assert summary["status"] == "PASS" and summary["passed"] > 0 and not summary["failed"]


def test_dry_run_counts_the_specialisations_the_header_uses(dry_run):
    p, _ = dry_run
    m = re.search(r"^SPECIALISATIONS (\d+)", p.stdout, re.M)
    assert m, p.stdout[-2000:]
    header = re.fullmatch(r"\((\d+) \+ \d+\).*", _header_estimates()["cuda_tests"][0])
    assert int(m.group(1)) == int(header.group(1)), (
        f"test_cuda.py now launches {m.group(1)} specialisations on CPU; update the EST lines of gpu_run.sh")
