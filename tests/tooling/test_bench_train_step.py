"""The training-step memory benchmark (benchmarks/train_step.py) end to end on a tiny Llama (V=32768, H=64),
through ``python -m benchmarks --train-step --quick``: one fresh process per case, the CSV/plot/summary
written, and memory numbers that say what they should -- transformers' loss holds ~3 [T, V] fp32 buffers
at its peak, the fused objectives far less. Plus the oom path (a capped step is recorded, the next length
is not run) and the report's logic on synthetic rows. ~30 s on 2 idle cores (two runs side by side)."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import train_step as ts
from benchmarks import train_step_report as report

REPO = Path(__file__).resolve().parents[2]
V = ts.QUICK_MODEL["vocab_size"]


def _cmd(out, *args):
    return [sys.executable, "-m", "benchmarks", "--train-step", "--quick", "--no-progress", "--out", str(out), *args]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("ts_a"), tmp_path_factory.mktemp("ts_b")
    # two runs side by side (memory is per process; times are not checked). B: checkpointing on and the
    # step's extra memory capped at 200 MiB -- transformers' loss needs ~400 MiB at T=1024 (oom), fused CE ~100
    pb = subprocess.Popen(_cmd(b, "--objectives", "hf,fused_ce", "--ckpt", "on", "--lengths", "1024,2048",
                               "--extra-limit-mib", "200"),
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pa = subprocess.run(_cmd(a, "--objectives", "hf,long_short", "--ckpt", "off", "--lengths", "512,1024"),
                        cwd=REPO, capture_output=True, text=True, timeout=240)
    out_b, _ = pb.communicate(timeout=240)
    assert pa.returncode == 0, pa.stdout[-3000:] + pa.stderr[-3000:]
    assert pb.returncode == 0, out_b[-3000:]
    return a, pa.stdout, b, out_b


def _rows(d):
    with open(d / "train_step.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ts.COLUMNS
        return {(r["objective"], int(r["T"])): r for r in reader}


def test_outputs_and_memory(runs):
    a, stdout, b, _ = runs
    rows = _rows(a)
    assert sorted(rows) == sorted((o, T) for o in ("hf", "long_short") for T in (512, 1024))
    for (o, T), r in rows.items():
        assert r["status"] == "ok", r
        assert r["grad_ckpt"] == "False" and r["kind"] == "grid" and r["optimizer"] == "adamw"
        assert int(r["tokens_processed"]) == (2 * T if o == "long_short" else T)
        extra, total, base = float(r["peak_extra_mib"]), float(r["peak_total_mib"]), float(r["base_mib"])
        assert 0 < extra < total and abs(total - (base + extra)) < 64, r
        assert float(r["step_s"]) > 0 and int(r["repeats"]) == 1
    mib = lambda o, T: float(rows[(o, T)]["peak_extra_mib"])  # noqa: E731
    fused = _rows(b)[("fused_ce", 1024)]
    assert fused["status"] == "ok" and fused["grad_ckpt"] == "True", fused
    tv = 1024 * V * 4 / 2**20  # one [T, V] fp32 buffer at T=1024: 128 MiB
    # transformers' loss: logits, log-softmax and their gradient live together -> at least 2 [T, V] buffers,
    # and it grows with T; the fused objectives stay far below (chunks of 64 MiB at most)
    assert mib("hf", 1024) > 2 * tv
    assert mib("hf", 1024) > 1.5 * mib("hf", 512)
    assert mib("hf", 1024) > 2 * float(fused["peak_extra_mib"])
    assert mib("long_short", 1024) < mib("hf", 1024) - tv
    summary = (a / "SUMMARY.md").read_text()
    goal = "long-short step (two views) peaks below transformers' one-view step at every length: yes"
    assert goal in summary and goal in stdout
    assert "T=512: yes; T=1024: yes" in summary
    assert "Longest context that fits in 8 GiB" in summary and "torch 2." in summary
    png = (a / "train_step.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    machine = (a / "machine.json").read_text()
    assert '"torch"' in machine and '"cpu_model"' in machine and '"transformers"' in machine


def test_oom_is_recorded_and_stops_the_line(runs):
    _, _, b, out_b = runs
    rows = _rows(b)
    r1, r2 = rows[("hf", 1024)], rows[("hf", 2048)]
    assert r1["status"] == "oom" and r1["grad_ckpt"] == "True", r1
    assert "cap" in r1["reason"] and "allocate" in r1["reason"], r1
    # it got as far as the cap (200 MiB over the resident state) before failing
    assert 100 < float(r1["peak_extra_mib"]) < 400, r1
    assert [rows[("fused_ce", T)]["status"] for T in (1024, 2048)] == ["ok", "ok"]
    assert r2["status"] == "oom" and "not run" in r2["reason"], r2
    assert "oom" in (b / "SUMMARY.md").read_text()


def _row(o, ckpt, T, status="ok", total=0.0, cap=14336.0, kind="grid"):
    return dict(objective=o, grad_ckpt=ckpt, T=T, status=status, peak_total_mib=total, peak_extra_mib=total - 1000,
                mem_cap_mib=cap, kind=kind, step_s=1.0, repeats=1)


def test_longest_fit_and_goal_logic():
    rows = [_row("hf", False, 1024, total=2000), _row("hf", False, 2048, total=4000),
            _row("hf", False, 4096, total=8000), _row("hf", False, 8192, total=14000),
            _row("hf", False, 16384, "oom", total=14000), _row("hf", False, 6144, total=9000, kind="refine"),
            _row("hf", False, 5120, total=8100, kind="refine"),
            _row("long_short", False, 1024, total=1500), _row("long_short", False, 16384, total=3000),
            _row("fused_ce", True, 1024, "oom", cap=4000)]  # oom under a small cap: unknown for 8 GiB
    lf = report.longest_fit(rows, "hf", False, 8192)
    assert (lf["grid_fit"], lf["grid_next"]) == (4096, 8192)
    assert (lf["fit"], lf["next"], lf["refined"]) == (5120, 6144, True)
    lf = report.longest_fit(rows, "long_short", False, 8192)
    assert lf["fit"] == 16384 and lf["next"] is None
    assert report.longest_fit(rows, "fused_ce", True, 8192)["fit"] is None
    allyes, det = report.compare_long_short(rows)
    assert allyes is True and [(d["T"], d["yes"]) for d in det] == [(1024, True), (16384, True)]
    rows.append(_row("long_short", False, 2048, total=4500))  # above transformers' 4000 at T=2048
    allyes, det = report.compare_long_short(rows)
    assert allyes is False and [d["yes"] for d in det] == [True, False, True]
    text, lines = report.summary_markdown(rows, {}, 8192, {})
    assert "every length: no" in lines[0] and "T=2048: no" in lines[0]
