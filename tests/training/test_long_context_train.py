"""lsa train's memory levers for long contexts: --views sequential, --tiled-mlp, --tiled-norms, --offload-activations.

They change how much memory a step holds, not the step: the run follows the plain run's losses."""

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from _util import read_train_log  # noqa: E402
from lsa_kernels.train.loop import train_main  # noqa: E402

TINY = ["--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--n-kv-head", "1", "--ffn", "64", "--max-positions", "256",
        "--l-train", "32", "--batch-size", "2", "--quiet", "--steps", "3", "--warmup", "1", "--lr", "1e-2"]


def _train(out, texts, *extra):
    return train_main(TINY + ["--train-files", *texts["train"], "--out", str(out), *extra])


@pytest.mark.parametrize("levers", [["--views", "sequential"],
                                    ["--views", "sequential", "--tiled-mlp", "--tiled-norms", "--grad-checkpointing"],
                                    ["--tiled-mlp", "3", "--grad-accum", "2"]])
def test_levers_follow_the_plain_run(tmp_path, texts, levers):
    extra = ["--grad-accum", "2"] if "--grad-accum" in levers else []
    assert _train(tmp_path / "plain", texts, *extra) == 0
    assert _train(tmp_path / "levers", texts, *levers) == 0
    a, b = read_train_log(tmp_path / "plain"), read_train_log(tmp_path / "levers")
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        for k in ("loss", "ce", "misalign"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-5), (k, ra, rb)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4), (ra, rb)


def test_bad_inputs_one_line_exit_2(tmp_path, texts, capsys, monkeypatch):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    out = tmp_path / "bad"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cases = [
        (["--offload-activations"], "--offload-activations moves saved activations to pinned host memory"),
        (["--views", "sequential", "--alpha", "0"], "--views sequential runs the two views one after the other"),
        (["--tiled-mlp", "0"], "argument --tiled-mlp: must be an integer >= 1"),
        (["--tiled-norms", "-1"], "argument --tiled-norms: must be an integer >= 1"),
    ]
    moe = tmp_path / "moe"
    Qwen2MoeForCausalLM(Qwen2MoeConfig(vocab_size=4096, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, num_experts=2,
                                       num_experts_per_tok=1, moe_intermediate_size=8,
                                       shared_expert_intermediate_size=8, max_position_embeddings=256)
                        ).save_pretrained(moe)
    cases.append((["--model", str(moe), "--tiled-mlp"], "--tiled-mlp: layer 0's mlp (Qwen2MoeSparseMoeBlock) is a mixture of experts"))
    for args, msg in cases:
        capsys.readouterr()
        assert _train(out, texts, *args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], (args, err)
        assert not out.exists() or not any(out.iterdir()), args


def test_ddp_sequential_with_accumulation_follows_joint(tmp_path, texts):
    """DDP over 2 gloo processes with --grad-accum 2: --views sequential (static graph, every micro-batch
    synced) follows the joint run step by step and the replicas stay identical."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    logs = {}
    for views in ("joint", "sequential"):
        out = tmp_path / views
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "lsa_kernels.train.loop", *TINY, "--train-files", *texts["train"], "--grad-accum", "2",
               "--views", views, "--out", str(out)]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        assert json.load(open(out / "metrics.json"))["replicas_agree"] is True
        logs[views] = read_train_log(out)
    for ra, rb in zip(logs["joint"], logs["sequential"]):
        for k in ("loss", "ce", "misalign"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-5), (k, ra, rb)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4), (ra, rb)
