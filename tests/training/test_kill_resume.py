"""A training run killed with SIGKILL mid-run and resumed ends with the same metrics as an uninterrupted
run, and `latest` never points at a half-written checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers")

from _util import write_corpus_texts  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--n-kv-head", "1", "--ffn", "64",
        "--max-positions", "256", "--l-train", "16", "--batch-size", "4", "--quiet",
        "--steps", "14", "--alpha", "0.2", "--lr", "5e-3", "--warmup", "2", "--ckpt-every", "1"]


def _texts(tmp):
    return write_corpus_texts(tmp)["train"]


def _cmd(out, texts, *extra):
    return [sys.executable, "-m", "lsa_kernels.train.loop", *ARGS, "--train-files", *texts, "--out", str(out), *extra]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    return env


def _last_by_step(out):
    rows = {}
    with open(os.path.join(out, "log.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            rows[r["step"]] = r  # a step re-run after the kill replaces the killed run's line
    return rows


def _assert_complete(ckpt_dir):
    for name in ("config.json", "model.safetensors", "optimizer.pt", "trainer.pt", "state.json"):
        assert os.path.isfile(os.path.join(ckpt_dir, name)), f"{ckpt_dir} lacks {name}"
    from safetensors.torch import load_file

    assert load_file(os.path.join(ckpt_dir, "model.safetensors"))  # readable, not truncated


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    texts = _texts(tmp_path)
    full, part = tmp_path / "full", tmp_path / "part"
    assert subprocess.run(_cmd(full, texts), env=_env(), timeout=600).returncode == 0

    proc = subprocess.Popen(_cmd(part, texts), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    latest = part / "latest"
    # kill as soon as a few checkpoints exist: with a checkpoint every step, the kill lands while a step or a
    # checkpoint write is in flight
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip().endswith(("000004", "000005", "000006")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed: make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    name = latest.read_text().strip()
    _assert_complete(os.path.join(part, os.path.basename(name)))

    assert subprocess.run(_cmd(part, texts, "--resume"), env=_env(), timeout=600).returncode == 0
    a, b = _last_by_step(full), _last_by_step(part)
    resumed_from = int(name.rsplit("-", 1)[-1])
    assert sorted(a) == list(range(1, 15))
    # every step is logged: by the killed run (flushed per line) up to the kill, then by the resumed one
    assert sorted(b) == list(range(1, 15)) and resumed_from >= 4
    for s in b:
        assert a[s]["loss"] == pytest.approx(b[s]["loss"], rel=1e-6, abs=1e-6), s
    ma = json.load(open(full / "metrics.json"))
    mb = json.load(open(part / "metrics.json"))
    assert ma["param_sum"] == pytest.approx(mb["param_sum"], rel=1e-9, abs=1e-6)
