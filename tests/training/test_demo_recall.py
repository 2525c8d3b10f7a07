"""The recall testbed's demo pieces: the gate, the per-length metrics, the training sampler and the
induction pretraining data, checked with hand-built predictors (an in-context copier and a unigram model)."""

import math

import pytest
import torch

from lsa_kernels.train import demo_recall as DR
from lsa_kernels.train.recall_data import RecallSampler, repeat_windows

from test_recall_data import env, lookup_oracle, unigram_predictor  # noqa: F401  (env: a fixture)


class FakeLM(torch.nn.Module):
    """A transformers-like causal LM whose logits come from ``fn`` (ids -> logits)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.fn(input_ids)})()


def test_gate_passes_an_in_context_copier_and_refuses_a_unigram_model(env):  # noqa: F811
    tok, test, pool, _ = env
    res = DR.gate(FakeLM(lookup_oracle(tok.vocab_size)), pool, test, tok, length=64, n=12)
    assert res["passed"], res["line"]
    assert res["full"]["fact/all"]["exact"] == 1.0 and res["full"]["span/all"]["exact"] >= 0.9
    # without the source only chance is left: the copier's truncated accuracy is at chance, below the bound
    assert res["truncated"]["span/all"]["token_acc"] <= 2 * res["chance"]["span"]["token_acc"] + 0.02
    assert "-> PASS" in res["line"]
    bad = DR.gate(FakeLM(unigram_predictor(tok.vocab_size)), pool, test, tok, length=64, n=12)
    assert not bad["passed"] and "-> FAIL" in bad["line"] and "span exact 0.00" in bad["line"]
    # the threshold is the caller's: at 0 the unigram model passes the in-window half, and the chance half
    assert DR.gate(FakeLM(unigram_predictor(tok.vocab_size)), pool, test, tok, length=64, n=4, exact=0.0)["passed"]


def test_length_metrics_separate_key_and_natural_tokens(env):  # noqa: F811
    tok, test, pool, _ = env
    batches = {L: DR.recall_batch(L, 4, pool, test, tok) for L in (256, 512)}
    for L, b in batches.items():
        assert b.inserted.any() and not b.inserted.all()
        assert {a.bucket for a in b.answers} <= {name for name, _, _ in DR.buckets_for(L)}
    assert [n for n, _, _ in DR.buckets_for(256)] == ["near", "mid", "far"]
    assert [n for n, _, _ in DR.buckets_for(1024)] == ["near", "mid", "far", "beyond", "farthest"]
    parts = {}
    copier = DR.length_metrics(FakeLM(lookup_oracle(tok.vocab_size)), batches, parts=parts)
    uni = DR.length_metrics(FakeLM(unigram_predictor(tok.vocab_size)), batches)
    # the per-window pieces pool back to the metrics (what the bootstrap over windows resamples)
    from lsa_kernels.train.demo_stats import _pooled_value

    for m in ("natPPL@256", "keyPPL@512", "recall@256", "recall@512"):
        assert len(parts[m]["num"]) == 4
        assert _pooled_value(parts[m], range(4)) == pytest.approx(copier[m], rel=1e-5)
    for L in (256, 512):
        assert copier[f"recall@{L}"] >= 0.9 and uni[f"recall@{L}"] == 0.0
        assert copier[f"keyPPL@{L}"] < 1.5 < uni[f"keyPPL@{L}"]  # p_hit 0.9 -> PPL 1/0.9 on copied answers
        assert math.isfinite(copier[f"natPPL@{L}"]) and copier[f"natPPL@{L}"] > copier[f"keyPPL@{L}"]
        assert f"recall@{L}/far" in copier
    assert "recall@512/beyond" in copier and "recall@256/beyond" not in copier
    assert set(DR.verdict_metrics([256, 512, 1024])) == {"natPPL@1024", "keyPPL@1024", "recall@256", "recall@1024"}


def test_recall_sampler_is_a_function_of_seed_rank_and_step(env):  # noqa: F811
    tok, test, pool, _ = env
    s = RecallSampler(test, tok, seed=3, pool=pool)
    a, b = s.windows(5, 2, 300), RecallSampler(test, tok, seed=3, pool=pool).windows(5, 2, 300)
    assert a.shape == (2, 300) and torch.equal(a, b)
    assert not torch.equal(a, s.windows(6, 2, 300))
    assert not torch.equal(a, RecallSampler(test, tok, seed=3, rank=1, pool=pool).windows(5, 2, 300))
    with pytest.raises(ValueError, match="160 tokens"):
        s.windows(0, 2, 100)


def test_repeat_windows_copy_mask_marks_exactly_the_predictable_tokens():
    g = torch.Generator().manual_seed(0)
    pool = torch.arange(100, 612)
    ids, mask = repeat_windows(g, 64, 32, pool)
    assert ids.shape == mask.shape == (64, 32) and bool(((ids >= 100) & (ids < 612)).all())
    dists = set()
    for w in range(64):
        t = mask[w].nonzero().flatten()
        assert t.numel() >= 3  # a span of >= 4 tokens: its 2nd.. tokens are marked
        first = int(t[0]) - 1  # the second copy starts one before its first marked token
        k = t.numel() + 1
        found = [s for s in range(0, first - k + 1) if torch.equal(ids[w, s : s + k], ids[w, first : first + k])]
        assert found, w
        dists.add(first - found[-1])
    assert len(dists) > 10  # the copy distance varies: no fixed offset predicts it
    with pytest.raises(ValueError, match="span"):
        repeat_windows(g, 2, 32, pool, span=(4, 20))


def test_pretraining_refuses_an_init_that_is_not_a_saved_model(tmp_path, capsys):
    from lsa_kernels.train.pretrain_recall import main

    assert main(["--recipe", "induction-phase2", "--init", str(tmp_path), "--steps", "2",
                 "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--init" in err[0] and "model.safetensors" in err[0]
    assert not (tmp_path / "r.json").exists()


def test_the_base_recipe_reproduces_its_recorded_first_steps():
    """The recall base's first stage (docs/recall_testbed.md) rerun for a few steps gives the losses recorded in
    its committed run: same initial weights, same windows, same updates (up to the CPU's float rounding)."""
    import json
    import os

    from lsa_kernels.train.pretrain_recall import pretrain

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "benchmarks", "results", "recall_pilot", "induction-fullpool-L2.json")) as f:
        rec = json.load(f)
    assert rec["config"]["batch"] == 64 and rec["seed"] == 0
    n = 4
    res = pretrain("induction-fullpool", steps=n, seed=0, batch=64, probe_every=n, probe_n=2, layers=2,
                   max_positions=64, log=lambda s: None)
    got = [r["synth"] for r in res["loss_curve"]]
    want = [r["synth"] for r in rec["loss_curve"][:n]]
    assert got == pytest.approx(want, abs=2e-3), (got, want)
    # and a different seed gives a different start: the comparison can fail
    other = pretrain("induction-fullpool", steps=1, seed=1, batch=64, probe_every=1, probe_n=2, layers=2,
                     max_positions=64, log=lambda s: None)
    assert abs(other["loss_curve"][0]["synth"] - want[0]) > 2e-3


def test_longppl_keys_with_an_in_window_evaluator_find_the_answers(env):  # noqa: F811
    """Blind LongPPL key tokens (relative threshold, short context 128-256 tokens) from an in-context copier cover
    the answers whose source lies beyond the short context and are mostly answers (the copier also copies text
    that recurs far back, which LongPPL rightly counts), and a unigram model picks none."""
    tok, test, pool, _ = env
    b = DR.recall_batch(512, 4, pool, test, tok)
    copier = FakeLM(lookup_oracle(tok.vocab_size))
    nll = {}
    DR.length_metrics(copier, {512: b}, nll_out=nll)
    short = DR.short_context_nll(copier, b.ids, short=128)
    assert short.shape == nll[512].shape and torch.isnan(short[:, :128]).all() and torch.isfinite(short[:, 128:]).all()
    keys = DR.longppl_keys(nll[512], short)
    answer = torch.zeros_like(keys)
    far = torch.zeros_like(keys)
    for a in b.answers:
        answer[a.window, a.pos - 1] = True
        if a.distance > 256:  # the source is outside even the longest short context
            far[a.window, a.pos - 1] = True
    assert far.any() and keys.any()
    base_rate = answer.float().mean()
    assert bool((keys & answer).sum() >= 5 * base_rate * keys.sum())  # precision far above the answers' share
    assert bool(keys[far].float().mean() >= 0.8)  # coverage of the answers the short context cannot see
    uni = FakeLM(unigram_predictor(tok.vocab_size))
    nu = {}
    DR.length_metrics(uni, {512: b}, nll_out=nu)
    assert not DR.longppl_keys(nu[512], DR.short_context_nll(uni, b.ids, short=128)).any()


def test_the_shipped_base_matches_its_checksums_and_passes_the_gate(tmp_path):
    """The base `make demo` starts from: its files match SHA256SUMS, it retrieves in its own window (the gate),
    and a corrupted copy is refused before use."""
    import shutil

    from lsa_kernels.train.config import ConfigError
    from lsa_kernels.train.demo_recall import _data, _load
    from lsa_kernels.train.recall_base import SHIPPED_BASE, verify

    verify(SHIPPED_BASE)
    tok, test, pool = _data()
    res = DR.gate(_load(SHIPPED_BASE), pool, test, tok, length=64)
    assert res["passed"], res["line"]
    bad = tmp_path / "base"
    shutil.copytree(SHIPPED_BASE, bad)
    with open(bad / "config.json", "a") as f:
        f.write(" ")
    with pytest.raises(ConfigError, match="config.json"):
        verify(str(bad))


def test_demo_stops_before_any_arm_when_the_base_does_not_retrieve(tmp_path, capsys):
    """A base that cannot copy (random weights) fails the gate: exit code 3, the gate's line on stderr,
    gate.json written, no fine-tuning run and no table."""
    from lsa_kernels.train.config import TrainConfig
    from lsa_kernels.train.data import load_tokenizer
    from lsa_kernels.train.demo import demo_main
    from lsa_kernels.train.model import build_model

    torch.manual_seed(0)
    cfg = TrainConfig(n_layer=1, n_embd=32, n_head=2, n_kv_head=1, ffn=64, max_positions=64)
    base = tmp_path / "random_base"
    build_model(cfg, load_tokenizer().vocab_size, torch.device("cpu")).save_pretrained(base)
    capsys.readouterr()
    out = tmp_path / "demo"
    rc = demo_main(["--base-model", str(base), "--out", str(out), "--quick", "--quiet"])
    assert rc == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stopped before any arm" in err[0] and "-> FAIL" in err[0]
    assert (out / "gate.json").exists() and not (out / "table.md").exists() and not (out / "runs").exists()
