"""`lsa train --resume` continues the run with the run's own configuration: flags left out take the run's values,
a flag given with another value is refused in one line (nothing written) unless named in --override-on-resume,
an override is recorded in log.jsonl, and config.json always describes the checkpoints."""

import json
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from _util import read_train_log  # noqa: E402
from lsa_kernels.train.loop import train_main  # noqa: E402

TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--n-kv-head", "1", "--ffn", "64", "--max-positions", "64",
        "--batch-size", "2", "--quiet", "--warmup", "1"]
RUN = ["--l-train", "8", "--alpha", "0", "--steps", "4", "--lr", "5e-3", "--seed", "3"]


@pytest.fixture()
def stopped(tmp_path, texts):
    """A run of 4 steps stopped after 2 (checkpoint at step 2), and the bytes of its config.json."""
    out = tmp_path / "run"
    assert train_main(TINY + RUN + ["--train-files", *texts["train"], "--out", str(out), "--stop-after", "2"]) == 0
    return out, (out / "config.json").read_bytes()


def _files(out):
    return sorted(str(p.relative_to(out)) for p in out.rglob("*"))


def test_resume_without_flags_continues_the_runs_configuration(stopped, tmp_path, texts):
    out, cfg_bytes = stopped
    # no model, objective or data flag: every one comes from the run (l_train 8, not the default 128, which
    # would exceed the model's 64 positions; the run's own training files, not the shipped corpus)
    assert train_main(["--out", str(out), "--resume", "--quiet"]) == 0
    log = read_train_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(r["misalign"] == 0 and r["l_extra"] <= 4 for r in log)  # alpha 0, l_train 8
    assert (out / "config.json").read_bytes() == cfg_bytes
    state = json.load(open(out / open(out / "latest").read().strip() / "state.json"))
    assert state["config"]["l_train"] == 8 and state["config"]["train_files"] == list(texts["train"])
    # the same steps as the uninterrupted run
    full = tmp_path / "full"
    assert train_main(TINY + RUN + ["--train-files", *texts["train"], "--out", str(full)]) == 0
    for a, b in zip(read_train_log(full), log):
        assert a["l_extra"] == b["l_extra"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("flag", [["--alpha", "0.5"], ["--l-train", "16"], ["--steps", "6"], ["--divergence", "js"]])
def test_changed_flag_refused_in_one_line(stopped, capsys, flag):
    out, cfg_bytes = stopped
    before = _files(out)
    capsys.readouterr()
    assert train_main(["--out", str(out), "--resume", "--quiet", *flag]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lsa train: error: --resume: " + flag[0]), err
    assert "--override-on-resume" in err[0] and "Traceback" not in err[0]
    assert _files(out) == before and (out / "config.json").read_bytes() == cfg_bytes
    assert len(read_train_log(out)) == 2


def test_same_value_given_again_is_accepted(stopped):
    out, cfg_bytes = stopped
    assert train_main(["--out", str(out), "--resume", "--quiet", "--alpha", "0", "--l-train", "8"]) == 0
    assert len(read_train_log(out)) == 4 and (out / "config.json").read_bytes() == cfg_bytes


def test_override_is_recorded_and_config_follows_the_checkpoint(stopped, capsys):
    out, cfg_bytes = stopped
    assert train_main(["--out", str(out), "--resume", "--quiet", "--steps", "6", "--lr", "1e-3",
                       "--override-on-resume", "steps", "lr"]) == 0
    assert "--steps 4 -> 6" in capsys.readouterr().err
    log = read_train_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert "resume_overrides" not in log[1]
    assert log[2]["resume_overrides"] == {"steps": [4, 6], "lr": [5e-3, 1e-3]}
    assert all("resume_overrides" not in r for r in log[3:])
    cfg = json.load(open(out / "config.json"))
    assert cfg["steps"] == 6 and cfg["lr"] == 1e-3 and cfg["l_train"] == 8  # what the checkpoints now hold
    state = json.load(open(out / open(out / "latest").read().strip() / "state.json"))
    assert {k: state["config"][k] for k in ("steps", "lr")} == {"steps": 6, "lr": 1e-3}


def test_override_names_must_be_training_flags(stopped, capsys):
    out, _ = stopped
    assert train_main(["--out", str(out), "--resume", "--steps", "6", "--override-on-resume", "stepz"]) == 2
    assert "--override-on-resume: --stepz is not a setting" in capsys.readouterr().err


def test_files_follow_the_umask(tmp_path, texts):
    """latest, metrics.json, config.json, ckpt-*/ and the checkpoint's files get the mode the umask gives (they were
    0600 / 0700 beside 0644 siblings when written through mkstemp / mkdtemp)."""
    from lsa_kernels.train.checkpoint import atomic_write_text

    old = os.umask(0o027)
    try:
        out = tmp_path / "run"
        assert train_main(TINY + RUN + ["--train-files", *texts["train"], "--out", str(out), "--steps", "1"]) == 0
        atomic_write_text(str(tmp_path / "results.json"), "{}")
    finally:
        os.umask(old)
    ckpt = out / open(out / "latest").read().strip()
    for p in [out / "latest", out / "metrics.json", out / "config.json", out / "log.jsonl", tmp_path / "results.json",
              *ckpt.iterdir()]:
        assert p.stat().st_mode & 0o777 == 0o640, (p, oct(p.stat().st_mode))
    assert ckpt.stat().st_mode & 0o777 == 0o750
