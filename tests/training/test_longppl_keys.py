"""`lsa eval`'s LongPPL key tokens come from the reference model's losses at the LONGEST evaluated context (its
full context), not from any shorter length: a test whose key tokens differ between lengths."""

import math

import pytest
import torch

pytest.importorskip("transformers")
from _util import write_corpus_texts  # noqa: E402

from lsa_kernels.integrations.hf import load_causal_lm  # noqa: E402
from lsa_kernels.train import evaluate as EV  # noqa: E402
from lsa_kernels.train import eval_metrics as E  # noqa: E402

V = 4096  # the shipped tokenizer
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.3, max_position_embeddings=64)


def test_key_tokens_are_chosen_from_the_longest_context(tmp_path, monkeypatch):
    from transformers import LlamaConfig

    texts = write_corpus_texts(tmp_path, n_train=1, train_chars=2000, test_chars=6000)
    torch.manual_seed(0)
    ckpt = tmp_path / "base"
    load_causal_lm(LlamaConfig(**SMALL), dtype=torch.float32).save_pretrained(ckpt)

    seen = {}  # the reference run's per-length losses and its truncated-context losses, as evaluate computes them
    orig_len, orig_trunc = EV.length_losses, EV.truncated_losses

    def spy_len(*a, **k):
        out = orig_len(*a, **k)
        seen.setdefault("losses", out)
        return out

    def spy_trunc(*a, **k):
        out = orig_trunc(*a, **k)
        seen["trunc"] = out
        return out

    monkeypatch.setattr(EV, "length_losses", spy_len)
    monkeypatch.setattr(EV, "truncated_losses", spy_trunc)
    # gap 0 and no loss ceiling: a key token is any scored token whose loss drops with the full context, so
    # which tokens are keys depends on which length is taken as the full context
    res = EV.evaluate([str(ckpt)], str(tmp_path / "out"), l_train=16, multipliers=(1, 2, 4), n_windows=4,
                      lsm_samples=2, eval_files=texts["test"], backend="cpu", quiet=True, longppl_gap=0.0,
                      longppl_max_loss=1e9)
    losses, trunc = seen["losses"], seen["trunc"]
    assert sorted(losses) == [16, 32, 64]
    want = E.key_tokens(losses[64], trunc, 0.0, 1e9)
    shortest = E.key_tokens(losses[16], trunc, 0.0, 1e9)
    assert not torch.equal(want, shortest), "the test needs key tokens that depend on the length used"
    assert 0 < int(want.sum()) < want.numel()
    assert res["longppl"]["n_key"] == int(want.sum())
    assert res["longppl"]["reference_ce_full"] == pytest.approx(losses[64].mean().item(), rel=1e-6)
    for L in (16, 32, 64):
        got = res["runs"]["base"]["ppl"][str(L)]["longppl"]
        assert got == pytest.approx(math.exp(losses[L][want].mean().item()), rel=1e-6)
