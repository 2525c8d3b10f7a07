"""The benchmark harness runs end to end on tiny shapes (< 60 s): one fresh process per case, a CSV with
the documented columns, finite positive numbers, a summary with the goal lines. No timing assertions."""

import csv
import math

import pytest

from benchmarks import cases as C
from benchmarks.report import goal_lines, read_rows, write_report
from benchmarks.runner import COLUMNS, Settings, run_cases

TINY = dict(mode="fwd_bwd", dtype="fp32", N=64, H=32, V=256)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cases = [
        C.Case("ce", "lsa_cpu", **TINY),
        C.Case("ce", "naive", **TINY),
        C.Case("ce", "gemm", **TINY),
        C.Case("ce", "liger", **TINY),  # GPU only: a skip row, no process
    ]
    s = Settings(warmup=1, min_repeats=2, max_repeats=2, budget_s=0.01, case_timeout_s=50)
    rows = run_cases(cases, out, "t", s, progress=False)
    return out, rows


def test_csv_columns_and_numbers(tiny_run):
    out, rows = tiny_run
    with open(out / "t_ce.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        got = list(reader)
    assert [r["impl"] for r in got] == ["lsa_cpu", "naive", "gemm", "liger"]
    for r in got[:3]:
        assert r["status"] == "ok", r
        for k in ("time_ms", "time_ms_min", "time_ms_max", "time_ms_first"):
            v = float(r[k])
            assert math.isfinite(v) and v > 0, (k, r)
        assert int(r["repeats"]) == 2
        mem = float(r["peak_mem_mb"])
        assert math.isfinite(mem) and mem >= 0
        assert r["mem_method"] in ("vmhwm_reset", "ru_maxrss")
        assert r["cpu_model"] and r["torch"]
    assert got[3]["status"] == "skip" and "GPU" in got[3]["reason"]
    # same inputs, same loss
    l_ours, l_naive = float(got[0]["loss"]), float(got[1]["loss"])
    assert math.isfinite(l_ours) and abs(l_ours - l_naive) < 1e-4 * max(1.0, abs(l_naive))
    assert (out / "t_machine.json").exists()


def test_report(tiny_run):
    out, _ = tiny_run
    md, goals = write_report(out, "t")
    text = md.read_text()
    assert "| lsa_cpu |" in text and "×gemm" in text
    assert len(goals) == 2 and all("N/A" in g for g in goals)  # tiny shapes are not the goal shapes


def test_report_without_matplotlib(tiny_run, monkeypatch):
    """A machine without matplotlib (a GPU image may lack it) still gets the summary tables, and says why no plot."""
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **k)

    out, _ = tiny_run
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    md, goals = write_report(out, "t")
    text = md.read_text()
    assert "| lsa_cpu |" in text and "no plots: matplotlib is not installed" in text
    assert "## Plots" not in text and len(goals) == 2


def test_goal_lines_pass_miss():
    def row(op, impl, t, mem, div=""):
        g = C.GOAL_CE if op == "ce" else C.GOAL_LS
        return dict(op=op, impl=impl, divergence=div, dtype="fp32", mode="fwd_bwd", N=g["N"], H=g["H"], V=g["V"],
                    status="ok", time_ms=t, peak_mem_mb=mem)

    rows = [row("ce", "lsa_cpu", 110, 100), row("ce", "gemm", 100, 0), row("ce", "torch_chunked", 500, 600),
            row("long_short", "lsa_cpu", 200, 300, "sce"), row("long_short", "gemm", 100, 0, "sce"),
            row("long_short", "naive", 300, 6000, "sce")]
    lines = goal_lines(rows)
    assert "PASS" in lines[0] and "PASS" in lines[1]  # 1.10x <= 1.2x ; 100 MB <= 600 MB
    assert "MISS" in lines[2] and "PASS" in lines[3]  # 2.0x > 1.25x ; 20x less memory


def test_case_lists():
    full = C.build_cases("cpu")
    goal_ce = C.Case("ce", "lsa_cpu", "fwd_bwd", "fp32", 4096, 512, 32768)
    goal_ls = C.Case("long_short", "lsa_cpu", "fwd_bwd", "fp32", 4096, 512, 32768, "sce")
    assert full[0] == goal_ce and goal_ls in full
    assert {c.divergence for c in full if c.op == "long_short"} >= {"sce", "kl", "sym_kl", "js"}
    quick = C.build_cases("cpu", quick=True, dtypes=["fp32"])
    assert {c.divergence for c in quick if c.op == "long_short"} == {"sce"}
    assert {c.impl for c in quick} >= {"lsa_cpu", "naive", "torch_chunked", "cce", "gemm"}
    assert C.skip_reason(C.Case("ce", "liger", **TINY))
    assert C.skip_reason(C.Case("long_short", "torch_chunked", **TINY, divergence="sce"))
    assert C.Case.from_dict(goal_ls.to_dict()) == goal_ls
    assert read_rows([]) == []


def test_correctness_smoke():
    """The GPU correctness check's code path, on CPU tensors and tiny shapes (backend="cpu")."""
    res = C.correctness("cpu", quick=True)
    assert len(res) == 4 and all(r["ok"] for r in res), res
    # the truth is fp64, not the fp32 reference itself: torch's fp32 reference has a (small) error against it
    for r in res:
        assert r["truth"] == "fp64"
        for k in ("loss", "x", "w") if r["op"] == "ce" else ("loss", "hl", "hs", "w"):
            assert 0 < r[k]["err_torch_same_dtype"] < (1e-5 if r["dtype"] == "fp32" else 2e-2), (r, k)


def test_tp_comm_counts_the_bytes(tmp_path):
    """benchmarks/tp_comm.py counts what the vocab-parallel ops send: CE = one all-gather of 3 fp32 per row,
    dX all-reduced once per view, js = the sce exchange + one [rows, 2] fp32 all-reduce."""
    import json

    from benchmarks import tp_comm

    N, H, V = 64, 16, 257
    out = tmp_path / "tp.json"
    assert tp_comm.main(["--world", "2", "--rows", str(N), "--hidden", str(H), "--vocab", str(V), "--out", str(out)]) == 0
    rows = {r["op"]: r for r in json.load(open(out))}
    ce, sce, js = rows["ce"], rows["long_short"], rows["long_short_js"]
    assert ce["stats_bytes"] == ce["all_gather_bytes"] == N * 3 * 4
    assert ce["dx_all_reduce_bytes"] == N * H * 4
    assert sce["dx_all_reduce_bytes"] == js["dx_all_reduce_bytes"] == 2 * N * H * 4
    paired = (js["stats_bytes"] - sce["stats_bytes"]) // 8  # js: one more [rows, 2] fp32 exchange
    assert 0 < paired <= N and js["all_gather_bytes"] == sce["all_gather_bytes"]
    assert ce["gather_logits_bytes"] == N * ce["V_rank"] * 4 + N * H * 4


def test_prob_targets_benchmark_runs(tmp_path):
    """python -m benchmarks --prob-targets on a tiny shape: every implementation gives a row (no error), the GEMM
    path of --before loads from git, and the summary compares lsa_cpu with each."""
    import json

    from benchmarks import prob_targets

    rc = prob_targets.main(["--rows", "64", "--hidden", "16", "--vocab", "256", "--warmup", "0", "--repeats", "1",
                            "--out", str(tmp_path), "--tag", "t"])
    assert rc == 0
    rep = json.loads((tmp_path / "t.json").read_text())
    assert [r["impl"] for r in rep["rows"]] == list(prob_targets.IMPLS)
    assert all("error" not in r for r in rep["rows"]), [r.get("error") for r in rep["rows"]]
    assert len(rep["summary"]) == len(prob_targets.IMPLS) - 1


def test_distill_benchmark_runs(tmp_path, monkeypatch):
    """python -m benchmarks --distill on a tiny shape, from another working directory (the children find the
    package): a row per implementation (Liger may be absent: an error row then), both goal lines computed."""
    import json

    from benchmarks import distill

    monkeypatch.chdir(tmp_path)
    rc = distill.main(["--rows", "64", "--hs", "16", "--ht", "24", "--vocab", "257", "--warmup", "0", "--repeats", "1",
                       "--impls", "lsa_cpu,gemm,torch", "--out", str(tmp_path), "--tag", "t"])
    assert rc == 0
    rep = json.loads((tmp_path / "t.json").read_text())
    assert [r["impl"] for r in rep["rows"]] == ["lsa_cpu", "gemm", "torch"]
    assert all("error" not in r for r in rep["rows"]), [r.get("error") for r in rep["rows"]]
    assert [g.split(":")[0] for g in rep["goals"]] == ["time", "memory", "time vs torch"]
    assert (tmp_path / "t.csv").read_text().startswith("impl,N,Hs,Ht,V")
