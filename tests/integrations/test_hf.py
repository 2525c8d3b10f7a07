"""The transformers adapter: fused loss == the model's own loss, for several families, without logits."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lsa_kernels import reference  # noqa: E402
from lsa_kernels.integrations import hf  # noqa: E402

V = 1000
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)


def _config(family):
    T = transformers
    if family == "llama":
        return T.LlamaConfig(**COMMON)
    if family == "qwen2":
        return T.Qwen2Config(**COMMON)
    if family == "mistral":
        return T.MistralConfig(**COMMON)
    if family == "gpt2":
        return T.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0)
    if family == "gemma2":
        return T.Gemma2Config(**COMMON, head_dim=16)  # final_logit_softcapping = 30
    if family == "cohere":
        return T.CohereConfig(**COMMON, logit_scale=0.25)
    raise KeyError(family)


_MODELS = {}


def _model(family):
    if family not in _MODELS:
        torch.manual_seed(0)
        m = hf.load_causal_lm(_config(family), dtype=torch.float32).eval()
        with torch.no_grad():  # make the head matter: random, larger logits
            for p in m.parameters():
                p.add_(0.02 * torch.randn_like(p))
        _MODELS[family] = m
    return _MODELS[family]


FAMILIES = ["llama", "qwen2", "mistral", "gpt2", "gemma2", "cohere"]


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_lm_loss_equals_model_loss(family):
    m = _model(family)
    x = torch.randint(0, V, (2, 33))
    labels = x.clone()
    labels[0, :5] = -100
    labels[1, 20] = -100
    want = m(input_ids=x, labels=labels).loss
    got = hf.causal_lm_loss(m, x, labels)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (family, got.item(), want.item())
    head = hf.output_head(m)
    if family == "gemma2":
        assert head.softcap == 30.0
    if family == "cohere":
        assert head.scale == 0.25


def test_no_logits_tensor_is_created():
    """With a small chunk budget no tensor of shape [>= N/2, V] exists during forward + backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    m = _model("llama")
    x = torch.randint(0, V, (4, 64))
    N = x.numel()  # 256 rows: [N/2, V] is larger than the [H, V] weight views
    big = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == V and t.numel() >= N * V // 2:
                    big.append((str(func), tuple(t.shape)))
            return out

    with Watch():
        loss = hf.causal_lm_loss(m, x, x, backend="cpu", chunk_bytes=64 * 1024)
        loss.backward()
    m.zero_grad(set_to_none=True)
    assert not big, big


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_long_short_step_matches_materialised_logits(family):
    m = _model(family)
    l_train, l_extra, B = 24, 7, 2
    window = torch.randint(0, V, (B, l_train + l_extra + 1))
    got = hf.long_short_step(m, window, l_extra, alpha=0.3, divergence="sce")
    got.loss.backward()
    g_got = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)

    # ground truth from the model's own logits, two separate forwards
    long, short = window[:, : l_train + 1], window[:, l_extra:]
    zl = m(input_ids=long[:, :-1]).logits.float()
    zs = m(input_ids=short[:, :-1]).logits.float()
    ce = torch.cat([
        reference.cross_entropy_from_logits(zl.reshape(-1, V), long[:, 1:].reshape(-1)),
        reference.cross_entropy_from_logits(zs.reshape(-1, V), short[:, 1:].reshape(-1)),
    ]).mean()
    mis = reference.divergence_from_logits(zl[:, l_extra:], zs[:, : l_train - l_extra], "sce").mean()
    want = ce + 0.3 * mis
    want.backward()
    for a, b in ((got.loss, want), (got.ce, ce), (got.misalign, mis)):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-5), (family, a.item(), b.item())
    for n, p in m.named_parameters():
        if p.grad is not None:
            assert torch.allclose(g_got[n], p.grad, atol=1e-5, rtol=1e-4), n
    m.zero_grad(set_to_none=True)


def test_alpha_zero_objective_is_plain_ce():
    m = _model("qwen2")
    window = torch.randint(0, V, (2, 17))
    out = hf.LongShortObjective(m)(window, 0, 0.0)
    want = m(input_ids=window[:, :-1], labels=window[:, :-1].clone()).loss  # not the same targets: check below
    ref = torch.nn.functional.cross_entropy(m(input_ids=window[:, :-1]).logits.reshape(-1, V), window[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, ref, atol=1e-5) and out.misalign.item() == 0.0
    assert not torch.allclose(out.loss, want)


def _ce_on(m, ids):
    """Plain CE of the model's own logits, inputs ``ids[:, :-1]``, targets ``ids[:, 1:]``."""
    return torch.nn.functional.cross_entropy(m(input_ids=ids[:, :-1]).logits.reshape(-1, V), ids[:, 1:].reshape(-1))


def test_alpha_zero_reads_the_long_view_of_a_long_short_window_at_both_entry_points():
    """One window convention at alpha = 0: ``[B, l_train + l_extra + 1]``, CE on ``window[:, :l_train + 1]``,
    whether through LongShortObjective or a patched model's ``lsa_long_short`` (what LongShortTrainer calls)."""
    m = _model("llama")
    l_train, l_extra = 12, 4
    window = torch.randint(0, V, (2, l_train + l_extra + 1), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = _ce_on(m, window[:, : l_train + 1])
        whole = _ce_on(m, window)
    assert not torch.allclose(want, whole)  # the last l_extra tokens would change the loss
    got = hf.plain_ce_step(m, window, l_extra)
    obj = hf.LongShortObjective(m)(window, l_extra, 0.0)
    # the pre-sliced long view with l_extra = 0 is the same call (how the training loop passes its baseline)
    sliced = hf.LongShortObjective(m)(window[:, : l_train + 1], 0, 0.0)
    hf.patch(m)
    try:
        patched = m(input_ids=window, lsa_long_short={"l_extra": l_extra, "alpha": 0.0})
    finally:
        hf.unpatch(m)
    for out in (got, obj, sliced, patched):
        assert torch.allclose(out.loss, want, atol=1e-5), (out.loss, want)
        assert torch.equal(out.ce, out.loss) and out.misalign.item() == 0.0


def test_alpha_zero_both_views_is_ce_over_the_long_short_rows():
    m = _model("llama")
    l_extra = 4
    window = torch.randint(0, V, (2, 17), generator=torch.Generator().manual_seed(4))
    long, short = window[:, :-l_extra], window[:, l_extra:]
    with torch.no_grad():
        logits = torch.cat([m(input_ids=long[:, :-1]).logits, m(input_ids=short[:, :-1]).logits], 0)
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, V), torch.cat([long[:, 1:], short[:, 1:]]).reshape(-1))
    out = hf.LongShortObjective(m)(window, l_extra, 0.0, views=2)
    assert torch.allclose(out.loss, want, atol=1e-5) and out.misalign.item() == 0.0
    assert torch.allclose(hf.plain_ce_step(m, window, l_extra, both_views=True).loss, want, atol=1e-5)


@pytest.mark.parametrize("l_extra", [-1, 16, 2.0, True])
def test_alpha_zero_refuses_an_l_extra_the_window_cannot_hold(l_extra):
    m = _model("llama")
    window = torch.randint(0, V, (2, 17))
    with pytest.raises(ValueError, match=r"l_extra: expected an int in \[0, 15\]"):
        hf.plain_ce_step(m, window, l_extra)
    with pytest.raises(ValueError, match="l_extra"):
        hf.LongShortObjective(m)(window, l_extra, 0.0)


def test_unknown_logit_transform_is_refused():
    torch.manual_seed(0)
    m = hf.load_causal_lm(_config("llama"), dtype=torch.float32).eval()
    m.config.logit_scale = 3.0  # the config claims a scale that LlamaForCausalLM does not apply
    with pytest.raises(hf.UnsupportedModel, match="do not reproduce"):
        hf.output_head(m)


def test_attn_implementation_on_cpu():
    assert hf.attn_implementation("cpu") == "sdpa"
    assert _model("llama").config._attn_implementation == "sdpa"
    assert _model("gemma2").config._attn_implementation in ("sdpa", "eager")


@pytest.mark.parametrize("positions", ["overlap", "last"])
@pytest.mark.parametrize("divergence", ["sce", "kl", "js"])
def test_long_short_step_with_ignored_labels(positions, divergence):
    """``labels`` with ignored positions (padding at the end of one window, a masked prompt, holes): the
    expected loss is written out here from the model's logits, row by row, without lsa_kernels.pairing."""
    m = _model("llama")
    l_train, l_extra, B = 20, 6, 3
    W = l_train + l_extra + 1
    torch.manual_seed(3)
    window = torch.randint(0, V, (B, W))
    labels = window.clone()
    labels[0, -4:] = -100        # padded tail: the last pairs of sequence 0 are invalid ("last" must skip them)
    labels[1, :9] = -100         # a masked prompt: long-only rows and the first pairs are invalid
    labels[2, [8, 13, 14]] = -100  # holes inside the overlap
    got = hf.long_short_step(m, window, l_extra, alpha=0.7, divergence=divergence, positions=positions, labels=labels)
    got.loss.backward()
    g_got = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)

    zl = m(input_ids=window[:, :l_train]).logits.float()           # long rows t predict window[t + 1]
    zs = m(input_ids=window[:, l_extra:W - 1]).logits.float()      # short rows i predict window[l_extra + i + 1]
    ce_terms, pairs = [], []
    for s in range(B):
        for t in range(l_train):
            if labels[s, t + 1] != -100:
                ce_terms.append(torch.nn.functional.cross_entropy(zl[s, t], labels[s, t + 1]))
            if labels[s, l_extra + t + 1] != -100:
                ce_terms.append(torch.nn.functional.cross_entropy(zs[s, t], labels[s, l_extra + t + 1]))
        valid = [i for i in range(l_train - l_extra) if labels[s, l_extra + i + 1] != -100]
        if positions == "last":
            valid = valid[-1:]
        pairs += [(s, i) for i in valid]
    ce = torch.stack(ce_terms).mean()
    mis = torch.stack([
        reference.divergence_from_logits(zl[s, l_extra + i][None], zs[s, i][None], divergence)[0] for s, i in pairs
    ]).mean()
    want = ce + 0.7 * mis
    want.backward()
    assert len(pairs) < B * (l_train - l_extra) and len(ce_terms) < 2 * B * l_train
    for a, b in ((got.loss, want), (got.ce, ce), (got.misalign, mis)):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-5), (a.item(), b.item())
    for n, p in m.named_parameters():
        if p.grad is not None:
            assert torch.allclose(g_got[n], p.grad, atol=1e-5, rtol=1e-4), n
    m.zero_grad(set_to_none=True)


def test_long_short_step_labels_shape_is_checked():
    window = torch.randint(0, V, (2, 20))
    with pytest.raises(ValueError, match="labels must have the window's shape"):
        hf.long_short_step(_model("llama"), window, 4, labels=window[:, :-1])
