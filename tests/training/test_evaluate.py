"""`lsa eval`: same-target perplexity vs length, LongPPL key tokens, LSM per divergence, pass-key retrieval,
context-extended (RoPE-scaled) checkpoints, bad inputs. Tiny models built from configs; stubs where the
right answer must be known exactly."""

import json
import math
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")
from _util import write_corpus_texts  # noqa: E402

from lsa_kernels.integrations.hf import OutputHead, hidden_states, load_causal_lm, output_head  # noqa: E402
from lsa_kernels.reference import divergence_from_logits  # noqa: E402
from lsa_kernels.maths import DIVERGENCES  # noqa: E402
from lsa_kernels.train import eval_metrics as E  # noqa: E402
from lsa_kernels.train import passkey as PK  # noqa: E402
from lsa_kernels.train.evaluate import eval_main, evaluate, markdown_table  # noqa: E402

V = 4096  # the shipped tokenizer
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.3)  # peaked distributions


def _save(path, config, seed=0):
    torch.manual_seed(seed)
    load_causal_lm(config, dtype=torch.float32).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import LlamaConfig, MistralConfig

    d = tmp_path_factory.mktemp("eval")
    texts = write_corpus_texts(d, n_train=1, train_chars=2000, test_chars=6000)
    return {
        "dir": d, "test": texts["test"],
        "base": _save(d / "base", LlamaConfig(**SMALL, max_position_embeddings=64)),
        # the same weights, RoPE extended 4x by linear interpolation (what `lsa train` writes after extension)
        "linear4": _save(d / "linear4", LlamaConfig(**SMALL, max_position_embeddings=256, rope_parameters={
            "rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})),
        "yarn4": _save(d / "yarn4", LlamaConfig(**SMALL, max_position_embeddings=256, rope_parameters={
            "rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 64})),
        # dynamic NTK as `lsa train` writes it: max_position_embeddings stays n0 = 64, 4 * 64 positions allowed
        "dynamic4": _save(d / "dynamic4", LlamaConfig(**SMALL, max_position_embeddings=64, rope_parameters={
            "rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0})),
        # attention sees only the last 4 tokens: its losses cannot depend on how long the context is
        "window4": _save(d / "window4", MistralConfig(**SMALL, max_position_embeddings=256, sliding_window=4)),
    }


def _eval(setup, runs, name, **kw):
    kw = {"l_train": 16, "multipliers": (1, 2, 4), "n_windows": 3, "lsm_samples": 6, "eval_files": setup["test"],
          "backend": "cpu", "quiet": True, **kw}
    return evaluate([setup[r] if r in setup else r for r in runs], str(setup["dir"] / name), **kw)


# ------------------------------------------------------------------------------------------ stubs
def _stub(fn, V_):
    """(hidden_fn, head) with an identity head: the stub's hidden states ARE its logits."""
    head = OutputHead(torch.eye(V_), None)
    return fn, head


def test_same_targets_at_every_length():
    # a "model" that predicts from the current token only: if every length scores the same targets (with the
    # same last inputs) its per-token losses are identical at every length; scoring any other tokens breaks it
    Vs, n, N, S = 64, 3, 41, 5
    g = torch.Generator().manual_seed(0)
    bigram = torch.randn(Vs, Vs, generator=g) * 3
    fn, head = _stub(lambda ids: bigram[ids], Vs)
    windows = torch.randint(0, Vs, (n, N), generator=g)
    losses = E.length_losses(fn, head, windows, [5, 10, 20, 40], S, 64, "cpu")
    for L in (10, 20, 40):
        torch.testing.assert_close(losses[L], losses[5], rtol=0, atol=0)
    truth = torch.nn.functional.cross_entropy(bigram[windows[:, -S - 1 : -1]].reshape(-1, Vs),
                                              windows[:, -S:].reshape(-1), reduction="none").reshape(n, S)
    torch.testing.assert_close(losses[40], truth.double(), rtol=1e-5, atol=1e-5)


def test_same_targets_real_model(setup):
    # a sliding-window (4 tokens) Mistral: PPL identical at all lengths; a full-attention Llama: not
    res = _eval(setup, ["window4", "base"], "same", multipliers=(1, 2, 3))
    ppl = {k: [r["ppl"][str(L)]["ppl"] for L in res["lengths"]] for k, r in res["runs"].items()}
    assert res["score_tokens"] == 8 and res["lengths"] == [16, 32, 48]
    assert max(ppl["window4"]) == pytest.approx(min(ppl["window4"]), rel=1e-5)
    assert max(ppl["base"]) / min(ppl["base"]) - 1 > 1e-5


# ----------------------------------------------------------------------------------------- LongPPL
def _copy_stub(P, Vs, scale):
    """Predicts the token P positions back (a perfect copier of period-P text), uniform when its context is
    shorter than P; ``scale`` sets its confidence."""
    def fn(ids):
        B, T = ids.shape
        z = torch.zeros(B, T, Vs)
        if T >= P:
            j = torch.arange(P - 1, T)
            z[:, j] = torch.nn.functional.one_hot(ids[:, j + 1 - P], Vs).float() * scale
        return z
    return _stub(fn, Vs)


def test_longppl_key_tokens_constructed():
    Vs, P, n, N, S = 1000, 12, 4, 97, 40
    g = torch.Generator().manual_seed(1)
    base = torch.randint(0, Vs, (n, P), generator=g)
    windows = base.repeat(1, N // P + 1)[:, :N].clone()
    noisy = torch.rand(n, N, generator=g) < 0.2
    windows[noisy] = torch.randint(0, Vs, (int(noisy.sum()),), generator=g)
    t = torch.arange(N - S, N)
    copyable = windows[:, t] == windows[:, t - P]  # the copier is right exactly there (full context)

    fn, head = _copy_stub(P, Vs, 20.0)  # confident: loss ~0 when right, ~20 when wrong, log V with short context
    full = E.length_losses(fn, head, windows, [N - 1], S, 256, "cpu")[N - 1]
    short = E.truncated_losses(fn, head, windows, S, P - 2, 256, "cpu")  # too short to copy: uniform
    torch.testing.assert_close(short, torch.full_like(short, math.log(Vs)), rtol=1e-5, atol=1e-5)
    key = E.key_tokens(full, short, 2.0, 2.0)
    assert 0 < int(key.sum()) < key.numel()
    assert torch.equal(key, copyable)
    # with a context of P tokens the copier already succeeds: nothing gained from long context, no key token
    short_p = E.truncated_losses(fn, head, windows, S, P, 256, "cpu")
    assert not E.key_tokens(full, short_p, 2.0, 2.0).any()

    # a less confident copier (loss 3 nats when right): the gap holds (log 1000 - 3 > 2) but the max-loss
    # criterion excludes them unless it is raised
    s = math.log((Vs - 1) / (math.exp(3.0) - 1))
    fn, head = _copy_stub(P, Vs, s)
    full = E.length_losses(fn, head, windows, [N - 1], S, 256, "cpu")[N - 1]
    short = E.truncated_losses(fn, head, windows, S, P - 2, 256, "cpu")
    assert not E.key_tokens(full, short, 2.0, 2.0).any()
    assert torch.equal(E.key_tokens(full, short, 2.0, 4.0), copyable)
    assert not E.key_tokens(full, short, 4.0, 4.0).any()  # gap 3.9 nats < 4


def test_truncated_context_is_exact(setup):
    # each scored target is fed exactly its last `short` tokens: equals feeding them one by one
    m = load_causal_lm(setup["base"], dtype=torch.float32).eval()
    fn, head = (lambda ids: hidden_states(m, ids)), output_head(m)
    windows = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(0))
    got = E.truncated_losses(fn, head, windows, 4, 7, 16, "cpu")
    with torch.no_grad():
        for b in range(2):
            for j, t in enumerate(range(26, 30)):
                z = m(windows[b : b + 1, t - 7 : t]).logits[0, -1]
                want = torch.nn.functional.cross_entropy(z[None], windows[b, t : t + 1])
                assert got[b, j].item() == pytest.approx(want.item(), rel=1e-4, abs=1e-4)


def test_longppl_end_to_end(setup):
    # a random model gains nothing from long context: no key token, longppl null (not NaN, no crash)
    res = _eval(setup, ["base"], "lp0")
    assert res["longppl"]["n_key"] == 0 and res["runs"]["base"]["n_key"] == 0
    assert all(v["longppl"] is None for v in res["runs"]["base"]["ppl"].values())
    assert json.load(open(setup["dir"] / "lp0" / "results.json"))["runs"]["base"]["ppl"]["16"]["longppl"] is None
    assert "LongPPL is not reported" in markdown_table(res)
    # every scored token a key token (thresholds opened wide): LongPPL must equal PPL at every length; the
    # reference is another model, so the key tokens come from it, not from the run judged
    res = _eval(setup, ["base", "window4"], "lpall", longppl_gap=-1e9, longppl_max_loss=1e9,
                longppl_reference=setup["linear4"])
    assert res["longppl"]["n_key"] == 3 * 8 and res["longppl"]["reference"] == setup["linear4"]
    for r in res["runs"].values():
        for v in r["ppl"].values():
            assert v["longppl"] == pytest.approx(v["ppl"], rel=1e-9)
    assert "LongPPL@16" in markdown_table(res)


# --------------------------------------------------------------------------------------------- LSM
def test_lsm_against_materialised_logits():
    from transformers import LlamaConfig

    torch.manual_seed(0)
    m = load_causal_lm(LlamaConfig(**SMALL, max_position_embeddings=64), dtype=torch.float32).eval()
    fn, head = (lambda ids: hidden_states(m, ids)), output_head(m)
    win = torch.randint(0, V, (3, 16), generator=torch.Generator().manual_seed(0))
    divs = list(DIVERGENCES)
    # identical suffixes: every divergence but sce (a cross-entropy, 2 H(p) for p = q) is exactly 0
    same = E.lsm_values(fn, head, win, [(0, 9, 9), (1, 12, 12), (2, 16, 16)], divs, 64, "cpu")
    for d in ("sym_kl", "kl", "kl_reverse", "js"):
        assert abs(same[d]["lsm"]) < 1e-6, d
    samples = [(0, 8, 16), (1, 13, 9), (2, 10, 15), (0, 16, 8)]
    got = E.lsm_values(fn, head, win, samples, divs, 64, "cpu")
    with torch.no_grad():
        zp = torch.stack([m(win[i : i + 1, -a:]).logits[0, -1] for i, a, _ in samples]).double()
        zq = torch.stack([m(win[i : i + 1, -b:]).logits[0, -1] for i, _, b in samples]).double()
    for d in divs:
        want = divergence_from_logits(zp, zq, d)
        assert got[d]["lsm"] == pytest.approx(want.mean().item(), rel=1e-4), d
        assert got[d]["lsm_std"] == pytest.approx(want.std().item(), rel=1e-3), d
        assert got[d]["lsm_n"] == 4
    assert got["sym_kl"]["lsm"] > 0.1  # a real signal, not ~0 from near-uniform distributions
    assert got["kl"]["lsm"] != pytest.approx(got["kl_reverse"]["lsm"], rel=1e-2)  # p and q are not swapped
    assert got["sym_kl"]["lsm"] == pytest.approx(got["kl"]["lsm"] + got["kl_reverse"]["lsm"], rel=1e-5)
    # the sample lengths: l ~ U{l_train/2 .. l_train}, the same for every run with the same l_train
    fr = torch.rand(200, 2, generator=torch.Generator().manual_seed(0))
    s = E.lsm_samples_for(16, fr)
    ls = [l for _, a, b in s for l in (a, b)]
    assert min(ls) == 8 and max(ls) == 16 and s == E.lsm_samples_for(16, fr)


def test_lsm_divergences_in_results(setup):
    res = _eval(setup, ["base", "base"], "lsm", labels=["a", "b"], lsm_divergences=("js", "kl", "sce"))
    assert res["lsm"]["divergences"] == ["js", "kl", "sce"]
    a, b = res["runs"]["a"], res["runs"]["b"]
    assert list(a["lsm"]) == ["js", "kl", "sce"] and a["lsm"] == b["lsm"]  # the same samples for every run
    assert all(a["lsm"][d]["lsm_n"] == 6 and a["lsm"][d]["lsm"] > 0 for d in a["lsm"])
    assert a["ppl"] == b["ppl"]
    assert "LSM js | LSM kl | LSM sce" in markdown_table(res)


# ------------------------------------------------------------------------------------------ pass key
def test_passkey_prompts():
    from lsa_kernels.train.data import load_tokenizer

    tok = load_tokenizer()
    ps = PK.passkey_prompts(tok, [80, 160], [0.0, 0.5, 1.0], 3, seed=7)
    assert len(ps) == 2 * 3 * 3 and ps[0].key != ps[1].key
    assert [p.key for p in ps] == [p.key for p in PK.passkey_prompts(tok, [80, 160], [0.0, 0.5, 1.0], 3, seed=7)]
    for p in ps:
        text = tok.decode(p.ids)
        assert p.length - 6 <= len(p.ids) <= p.length  # whole filler sentences, as many as fit
        assert text.endswith(f"{PK.PASSKEY_QUESTION} {p.key}") and tok.decode(p.ids[-p.n_answer:]).strip() == p.key
        key_sentence = PK.PASSKEY_SENTENCE.format(key=p.key)
        where = text.index(key_sentence) / max(1, text.index(PK.PASSKEY_QUESTION) - len(key_sentence) - 1)
        assert abs(where - p.depth) < 0.15, (p.depth, text)
        assert len(p.key) == 5 and text.count(p.key) == 3


def test_passkey_scoring_is_greedy_decoding(setup):
    m = load_causal_lm(setup["base"], dtype=torch.float32).eval()
    fn, head = (lambda ids: hidden_states(m, ids)), output_head(m)
    prompt = torch.randint(0, V, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        gen = m.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)[0, 20:].tolist()
    ids = prompt[0].tolist() + gen
    wrong = ids[:-1] + [(ids[-1] + 1) % V]
    ps = [PK.PasskeyPrompt(24, 0.0, 0, "k", ids, 4), PK.PasskeyPrompt(24, 0.0, 1, "k", wrong, 4),
          PK.PasskeyPrompt(24, 0.0, 2, "k", ids[:-1], 3)]
    (ok, lp), (bad, lp_bad), (ok3, _) = PK.passkey_scores(fn, head, ps, 64)
    assert ok and not bad and ok3
    assert lp > lp_bad and lp < 0


def test_passkey_depth_grid_with_a_short_sighted_oracle():
    # an oracle that retrieves the key only when the key sentence lies within its last 50 tokens: accuracy 1
    # exactly in the cells where the key is near the end (depth 1, or any depth in a prompt with no room for
    # filler: 48 tokens hold only the key sentence, the question and the key)
    from lsa_kernels.train.data import load_tokenizer

    tok = load_tokenizer()
    lengths, depths = [48, 200], [0.0, 0.5, 1.0]
    ps = PK.passkey_prompts(tok, lengths, depths, 2, seed=0)
    full = {tuple(p.ids[:-1]): p for p in ps}
    marker = tok.encode_batch([" pass key is"])[0]

    def fn(ids):
        z = torch.zeros(ids.shape[0], ids.shape[1], V)
        for r in range(ids.shape[0]):
            p = full[tuple(ids[r].tolist())]
            row = p.ids
            pos = next(i for i in range(len(row)) if row[i : i + len(marker)] == marker)
            sees = len(row) - pos <= 50
            for j in range(ids.shape[1]):
                z[r, j, row[j + 1] if sees else (row[j + 1] + 1) % V] = 30.0
        return z

    grid = PK.passkey_grid(ps, PK.passkey_scores(fn, OutputHead(torch.eye(V), None), ps, 256), lengths, depths)
    assert grid["accuracy_grid"] == [[1.0, 1.0, 1.0], [0.0, 0.0, 1.0]]
    assert grid["accuracy"] == pytest.approx(4 / 6)
    assert grid["key_logprob_grid"][0][0] > -1e-6 > grid["key_logprob_grid"][1][0]


def test_passkey_end_to_end(setup):
    # default pass-key lengths = the PPL lengths (16, 48, 64), less those too short for the prompt (16)
    res = _eval(setup, ["base", "linear4"], "pk", multipliers=(1, 3, 4), passkey=True, passkey_depths=[0, 1],
                passkey_trials=2)
    out = setup["dir"] / "pk"
    pk = json.load(open(out / "passkey.json"))
    assert pk["lengths"] == [48, 64] and pk["skipped_lengths"] == [16] and pk["depths"] == [0.0, 1.0]
    assert pk["trials"] == 2 and res["passkey"]["lengths"] == [48, 64]
    for name in ("base", "linear4"):
        g = pk["runs"][name]
        assert len(g["accuracy_grid"]) == 2 and len(g["accuracy_grid"][0]) == 2
        assert 0 <= g["accuracy"] <= 1 and g["key_logprob"] < 0
        assert res["runs"][name]["passkey"] == g
    assert (out / "passkey.png").stat().st_size > 1000 and (out / "ppl_vs_length.png").stat().st_size > 1000
    assert "pass-key acc" in markdown_table(res)


# ---------------------------------------------------------------------------------- extended RoPE
def test_extended_rope_checkpoint(setup, capsys):
    # base: 64 positions; the same weights with linear x4 RoPE: 256 positions, evaluated at 128
    ev = setup["dir"] / "ext"
    assert eval_main(["--runs", setup["linear4"], setup["yarn4"], setup["dynamic4"], "--l-train", "16", "--lengths", "2", "4", "8",
                      "--out", str(ev), "--eval-files", *setup["test"], "--n-windows", "2", "--lsm-samples", "4",
                      "--backend", "cpu", "--quiet"]) == 0
    res = json.load(open(ev / "results.json"))
    assert res["lengths"] == [32, 64, 128]
    assert res["runs"]["linear4"]["rope"] == {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    assert res["runs"]["yarn4"]["rope"]["original_max_position_embeddings"] == 64
    assert res["runs"]["dynamic4"]["rope"]["rope_type"] == "dynamic"
    assert res["runs"]["dynamic4"]["max_positions"] == 256 and res["runs"]["dynamic4"]["max_position_embeddings"] == 64
    assert res["runs"]["linear4"]["max_position_embeddings"] == 256
    assert all(math.isfinite(v["ppl"]) for r in res["runs"].values() for v in r["ppl"].values())
    assert "linear x4" in capsys.readouterr().out
    # the RoPE scaling is really applied (same weights, different PPL than the base at a length both allow)
    both = _eval(setup, ["base", "linear4"], "ext2", multipliers=(1, 2))
    assert both["runs"]["base"]["rope"] is None
    assert both["runs"]["base"]["ppl"]["32"]["ppl"] != pytest.approx(both["runs"]["linear4"]["ppl"]["32"]["ppl"], rel=1e-4)
    # the unextended base is refused at 128
    bad = setup["dir"] / "ext_bad"
    assert eval_main(["--runs", setup["base"], "--l-train", "16", "--lengths", "2", "4", "8", "--out", str(bad),
                      "--eval-files", *setup["test"]]) == 2
    err = capsys.readouterr().err
    assert "exceeds max_position_embeddings=64" in err and err.count("\n") == 1
    assert eval_main(["--runs", setup["dynamic4"], "--l-train", "16", "--lengths", "32", "--out", str(bad),
                      "--eval-files", *setup["test"]]) == 2
    assert "exceeds the 256 positions it allows (max_position_embeddings=64)" in capsys.readouterr().err
    assert not bad.exists()


def test_default_lengths_stay_within_the_positions(setup, capsys):
    # l_train 32: the default multiples 1 2 4 8 give 32..256; linear4 allows 256, the base only 64 -> 32 64, said once
    common = ["--l-train", "32", "--eval-files", *setup["test"], "--n-windows", "2", "--lsm-samples", "4", "--quiet"]
    out = setup["dir"] / "default_lengths"
    assert eval_main(["--runs", setup["linear4"], setup["base"], "--out", str(out), *common]) == 0
    assert json.load(open(out / "results.json"))["lengths"] == [32, 64]
    err = capsys.readouterr().err
    assert "lengths 128 256 left out (past the 64 positions of " in err and setup["base"] in err
    out = setup["dir"] / "default_lengths_ext"
    assert eval_main(["--runs", setup["linear4"], "--out", str(out), *common]) == 0
    assert json.load(open(out / "results.json"))["lengths"] == [32, 64, 128, 256]
    assert "left out" not in capsys.readouterr().err
    # given lengths are never dropped; an already extended model is not told to extend its RoPE
    bad = setup["dir"] / "default_lengths_bad"
    assert eval_main(["--runs", setup["linear4"], "--lengths", "16", "--out", str(bad), *common]) == 2
    err = capsys.readouterr().err
    assert "exceeds max_position_embeddings=256" in err and "RoPE extended" not in err and not bad.exists()


# --------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("args, msg", [
    (["--lsm-divergence", "sce", "hellinger"], "--lsm-divergence: unknown 'hellinger'"),
    (["--score-tokens", "17"], "--score-tokens must be in [1, 16]"),
    (["--longppl-reference", "/nonexistent/ref"], "'/nonexistent/ref' does not exist"),
    (["--longppl-short", "64"], "--longppl-short must be in"),
    (["--lengths", "1", "8"], "exceeds max_position_embeddings=64"),
    (["--passkey", "--passkey-lengths", "12"], "--passkey-lengths: 12 tokens cannot hold"),
    (["--passkey", "--passkey-depths", "1.5"], "argument --passkey-depths: must be a finite number in [0, 1]"),
    (["--passkey"], "--passkey: every length (16, 32) is too short"),
    (["--labels", "x", "x"], "share the name 'x'"),
])
def test_bad_inputs(setup, capsys, args, msg):
    out = setup["dir"] / "bad"
    runs = [setup["base"], setup["window4"]]
    assert eval_main(["--runs", *runs, "--l-train", "16", "--lengths", "1", "2", "--out", str(out),
                      "--eval-files", *setup["test"], "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lsa eval: error: ") and msg in err and err.count("\n") == 1, err
    assert not out.exists()


# ------------------------------------------------------------------------------------------- figure
@pytest.mark.parametrize("ppl", [
    [[3842.88, 3842.90, 3842.95, 3842.91], [3842.89, 3842.92, 3842.97, 3842.93]],  # runs a few 0.01 apart
    [[38.4288, 38.4290, 38.4300, 38.4295]],
    [[12.0, 30.0, 300.0, 3000.0], [11.0, 25.0, 200.0, 2500.0]],  # three decades
])
def test_ppl_plot_axis_labels_are_plain_and_distinct(ppl):
    """The perplexity axis stays readable whatever the spread: its visible labels are plain decimals (no
    offset, no "x10^3", no mathtext), at least two, all different."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from lsa_kernels.train.eval_plots import ppl_figure

    lengths = [16, 32, 64, 128]
    res = {"l_train": 16, "score_tokens": 8, "runs": {
        f"r{i}": {"ppl": {str(L): {"ppl": p, "longppl": None} for L, p in zip(lengths, row)}, "lsm": {}}
        for i, row in enumerate(ppl)}}
    fig = ppl_figure(res)
    try:
        fig.canvas.draw()
        ax = fig.axes[0]
        lo, hi = ax.get_ylim()
        major = [t.get_text() for t in ax.get_yticklabels() if lo <= t.get_position()[1] <= hi and t.get_text()]
        minor = [t.get_text() for t in ax.yaxis.get_minorticklabels() if t.get_text()]
        assert ax.yaxis.get_offset_text().get_text() == ""
    finally:
        plt.close(fig)
    assert len(major) >= 2 and len(set(major)) == len(major), major
    assert not minor, minor
    for text in major:
        float(text)  # a plain number: "3842.90", not "$\\mathdefault{3.84290\\times10^{3}}$"
