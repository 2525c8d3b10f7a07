"""The recall testbed: seeded windows with known long-range answers, the copy probe and the recall metric.

Checked with hand-built predictors: a suffix-match lookup (a perfect in-context copier) recovers every answer
from the full window and only chance once the source is cut out; the probe gives such a copier a large gap and
a context-free (unigram) predictor none."""

import math

import pytest
import torch

from lsa_kernels.train.data import DataError, load_corpus, load_tokenizer
from lsa_kernels.train.recall_data import (DIGITS, RecallWindows, copy_windows, default_buckets, fact_tokens,
                                           rare_pool)
from lsa_kernels.train.recall_eval import chance, copy_probe, copy_probe_windows, recall_scores


@pytest.fixture(scope="module")
def env():
    tok = load_tokenizer()
    test = load_corpus(tok, "test")
    train = load_corpus(tok, "train")
    digits = fact_tokens(tok)[1]
    pool = rare_pool(train, tok.vocab_size, exclude=[tok.eos_id] + digits)
    return tok, test, pool, digits


def lookup_oracle(vocab: int, k_max: int = 8, p_hit: float = 0.9, fallback: int = 0):
    """Predict the token that followed the latest earlier occurrence of the longest matching suffix (up to k_max
    tokens) — an in-context copier with no knowledge outside the sequence. Log-probabilities: p_hit on the
    prediction, the rest uniform; no match -> ``fallback`` token."""

    def fn(ids):
        B, T = ids.shape
        out = torch.full((B, T, vocab), math.log((1 - p_hit) / (vocab - 1)))
        for b in range(B):
            x = ids[b]
            pred = torch.full((T,), fallback, dtype=torch.long)
            found = torch.zeros(T, dtype=torch.bool)
            for k in range(k_max, 0, -1):
                if T < k + 1:
                    continue
                G = x.unfold(0, k, 1)  # G[i] = x[i : i + k], ending at j = i + k - 1
                eq = (G[:, None, :] == G[None, :, :]).all(-1)
                eq &= torch.ones_like(eq).tril(-1)  # an earlier end position only
                ends = torch.arange(G.shape[0])
                cand = torch.where(eq, ends[None, :], torch.full_like(eq, -1, dtype=torch.long)).max(1).values
                t = ends + k - 1  # the position whose next token is predicted
                ok = (cand >= 0) & ~found[t]
                pred[t[ok]] = x[cand[ok] + k]
                found[t[ok]] = True
            out[b, torch.arange(T), pred] = math.log(p_hit)
        return out

    return fn


def unigram_predictor(vocab: int, seed: int = 0):
    logp = torch.log_softmax(torch.randn(vocab, generator=torch.Generator().manual_seed(seed)), 0)
    return lambda ids: logp.expand(ids.shape[0], ids.shape[1], vocab).clone()


def test_windows_are_a_function_of_the_seed(env):
    tok, test, pool, _ = env
    a = RecallWindows(256, pool, seed=3, corpus=test, tok=tok).batch(5, 8)
    b = RecallWindows(256, pool, seed=3, corpus=test, tok=tok).batch(5, 8)
    c = RecallWindows(256, pool, seed=4, corpus=test, tok=tok).batch(5, 8)
    d = RecallWindows(256, pool, seed=3, corpus=test, tok=tok).batch(6, 8)
    assert torch.equal(a.ids, b.ids)
    assert [(x.window, x.kind, x.pos.tolist(), x.src.tolist(), x.cut) for x in a.answers] == \
           [(x.window, x.kind, x.pos.tolist(), x.src.tolist(), x.cut) for x in b.answers]
    assert not torch.equal(a.ids, c.ids) and not torch.equal(a.ids, d.ids)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(copy_windows(g1, 4, 128, pool), copy_windows(g2, 4, 128, pool))


def test_answers_repeat_their_source_at_the_bucket_distance(env):
    tok, test, pool, digits = env
    rw = RecallWindows(256, pool, seed=0, corpus=test, tok=tok, n_spans=1, n_facts=2)
    batch = rw.batch(0, 24)
    buckets = {n: (lo, hi) for n, lo, hi in default_buckets(256)}
    assert len(batch.answers) == 24 * 3
    seen = set()
    for a in batch.answers:
        lo, hi = buckets[a.bucket]
        assert lo <= a.distance <= hi
        assert torch.equal(batch.ids[a.window, a.pos], batch.ids[a.window, a.src])
        assert torch.equal(a.pos - a.src, torch.full_like(a.pos, a.distance))
        assert a.cut <= int(a.pos[0]) - 1 and a.cut > int(a.src[-1])
        if a.kind == "fact":
            assert len(a.pos) == 4 and set(batch.ids[a.window, a.pos].tolist()) <= set(digits)
        else:
            assert len(a.pos) == 7 and set(batch.ids[a.window, a.pos].tolist()) <= set(pool.tolist())
        seen.add((a.kind, a.bucket))
    assert seen == {(k, b) for k in ("span", "fact") for b in buckets}
    text = tok.decode(batch.ids[0].tolist())
    assert "'s number is " in text


def test_lookup_recovers_answers_only_from_context(env):
    tok, test, pool, _ = env
    batch = RecallWindows(256, pool, seed=1, corpus=test, tok=tok, n_spans=1, n_facts=2).batch(0, 30)
    oracle = lookup_oracle(tok.vocab_size)
    full = recall_scores(oracle, batch)
    assert full["fact/all"]["exact"] == 1.0
    assert full["span/all"]["exact"] >= 0.95
    for b in ("near", "mid", "far"):
        assert full[f"fact/{b}"]["exact"] == 1.0
    cut = recall_scores(oracle, batch, truncated=True)
    # without its source, no in-context lookup beats chance (another fact's digit is right 1 time in 10)
    assert cut["fact/all"]["token_acc"] < chance("fact", pool.numel())["token_acc"] + 0.06
    assert cut["fact/all"]["exact"] < 0.03
    assert cut["span/all"]["token_acc"] < 0.02 and cut["span/all"]["exact"] == 0.0


def test_answer_digits_are_uniform_and_independent_of_other_facts(env):
    tok, test, pool, digits = env
    batch = RecallWindows(256, pool, seed=2, corpus=test, tok=tok, n_spans=0, n_facts=3).batch(0, 200)
    per_window = {}
    for a in batch.answers:
        per_window.setdefault(a.window, []).append(batch.ids[a.window, a.pos])
    vals = torch.stack([torch.stack(v) for v in per_window.values()])  # [windows, facts, 4]
    idx = torch.tensor([digits.index(int(t)) for t in vals.flatten()]).view(vals.shape)
    counts = torch.bincount(idx.flatten(), minlength=10).double()
    exp = idx.numel() / 10
    assert float(((counts - exp) ** 2 / exp).sum()) < 30  # chi-square, 9 dof: p < 1e-3 at 27.9
    # a fact's digit agrees with the same digit of another fact in its window at the chance rate 1/10
    agree = (idx[:, 0] == idx[:, 1]).double().mean()
    assert abs(float(agree) - 0.1) < 0.05


def test_probe_gap_is_large_for_a_copier_and_zero_without_context(env):
    tok, test, pool, _ = env
    for corpus in (test, None):
        probe = copy_probe_windows(pool, (32, 96, 200), n=16, corpus=corpus, seed=7)
        for d in probe.distances:
            w, wo = probe.with_copy[d], probe.without_copy[d]
            assert torch.equal(w[:, 256 - 8 - d : 256 - d], w[:, 256 - 8 :])
            assert torch.equal(w[:, : 256 - 8 - d], wo[:, : 256 - 8 - d]) and torch.equal(w[:, 256 - 8 :], wo[:, 256 - 8 :])
            assert not torch.equal(w, wo)
        copier = copy_probe(lookup_oracle(tok.vocab_size), probe)
        uni = copy_probe(unigram_predictor(tok.vocab_size), probe)
        for d in probe.distances:
            assert copier[d]["gap"] > 5.0, (d, copier[d])
            assert abs(uni[d]["gap"]) < 1e-5


def test_bad_input_is_refused(env):
    tok, test, pool, _ = env
    with pytest.raises(DataError, match="span_len"):
        RecallWindows(256, pool, span_len=1, tok=tok)
    with pytest.raises(DataError, match="facts need the tokenizer"):
        RecallWindows(256, pool)
    with pytest.raises(DataError, match="length must be >= 160"):
        RecallWindows(128, pool, tok=tok)
    with pytest.raises(DataError, match="could not place"):
        RecallWindows(256, pool, tok=tok, n_spans=10, n_facts=10, corpus=test).batch(0, 4)
    with pytest.raises(DataError, match="distance 300"):
        copy_probe_windows(pool, (300,), n=2)
    with pytest.raises(DataError, match="p_copy"):
        copy_windows(torch.Generator(), 1, 64, pool, p_copy=1.0)
    assert len(DIGITS) == 10


def test_pilot_pretraining_is_reproducible_and_refuses_bad_input(tmp_path):
    from lsa_kernels.train.config import ConfigError
    from lsa_kernels.train.pretrain_recall import pretrain

    kw = dict(steps=2, batch=2, probe_every=1, probe_n=2, log=lambda s: None)
    a = pretrain("mixed", out=str(tmp_path / "a.json"), **kw)
    b = pretrain("mixed", **kw)
    untimed = lambda rows: [{k: v for k, v in r.items() if k not in ("train_s", "cpu_s")} for r in rows]  # noqa: E731
    assert a["loss_curve"] == b["loss_curve"] and untimed(a["probe_curve"]) == untimed(b["probe_curve"])
    assert [r["L"] for r in a["loss_curve"]] == [64, 128] and a["complete"] and a["steps_done"] == 2
    assert (tmp_path / "a.json").exists()
    with pytest.raises(ConfigError, match="--recipe"):
        pretrain("nope", steps=1)
    with pytest.raises(ConfigError, match="--steps"):
        pretrain("synth", steps=0)
