"""Token weights, class weights, probability targets (docs/maths.md §11) and LongCE (§13): every backend against
the fp64 reference on materialised logits (odd shapes; fp32 and bf16 by CCE's rule), values and every gradient,
the zero-weight edge, vocab-parallel, and bad input (CASES feed scripts/bad_input_table.py)."""


import pytest
import torch
import torch.distributed as dist

import lsa_kernels as L
from lsa_kernels import reference as R

from _util import IGN, assert_ce_rule, assert_close_rule, backends, grads, leaf, run_gloo, targets

N, H, V = 23, 37, 203


def _data(bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) / H**0.5 * 2
    b = torch.randn(V, generator=g) * 0.1 if bias else None
    y = targets((N,), V, gen=g)
    tw = torch.rand(N, generator=g) * 2
    tw[3] = 0.0
    cw = torch.rand(V, generator=g) + 0.1
    t = torch.softmax(torch.randn(N, V, generator=g) * 2, -1)
    return x, w, b, y, tw, cw, t


CE_CASES = {
    "token": lambda d: dict(token_weight=d["tw"]),
    "token_softcap_zloss": lambda d: dict(token_weight=d["tw"], softcap=3.0, z_loss=1e-2, label_smoothing=0.1),
    "class": lambda d: dict(weight=d["cw"]),
    "class_token_zloss_softcap": lambda d: dict(weight=d["cw"], token_weight=d["tw"], z_loss=1e-2, softcap=3.0),
    "class_smoothing": lambda d: dict(weight=d["cw"], label_smoothing=0.2, z_loss=1e-2),
    "prob": lambda d: dict(target=d["t"]),
    "prob_all": lambda d: dict(target=d["t"], weight=d["cw"], label_smoothing=0.3, token_weight=d["tw"], z_loss=1e-2),
    # softcap with the dense-target path (docs/maths.md §11: T read tile by tile next to the capped logits)
    "class_smoothing_softcap": lambda d: dict(weight=d["cw"], label_smoothing=0.2, z_loss=1e-2, softcap=3.0,
                                              token_weight=d["tw"]),
    "prob_softcap": lambda d: dict(target=d["t"], softcap=2.5),
    "prob_all_softcap": lambda d: dict(target=d["t"], weight=d["cw"], label_smoothing=0.3, z_loss=1e-2, softcap=3.0),
}


def _ce(fn, x, w, b, y, dtype, **kw):
    xs, ws = leaf(x, dtype), leaf(w, dtype)
    bs = None if b is None else leaf(b, dtype)
    target = kw.pop("target", y)
    if target.is_floating_point():
        target = target.to(dtype)
    out = fn(xs, ws, target, linear_bias=bs, **kw)
    ins = [xs, ws] + ([bs] if bs is not None else [])
    g = _upstream(out)
    return out, grads((out.double() * g).sum(), ins)


def _upstream(out):
    """An upstream gradient for a per-row output, bf16-representable (a bf16 output rounds it on the way in; the
    fp64 truth must see the same values)."""
    if not out.dim():
        return 1.0
    return torch.linspace(-1, 1, out.numel()).to(torch.bfloat16).double().reshape(out.shape)


def _rounded(dtype, *ts):
    return [None if t is None else t.to(dtype).float() for t in ts]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("case", list(CE_CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ce_matches_reference(backend, case, reduction, dtype):
    if backend == "triton" and reduction == "sum":
        pytest.skip("interpreter time: mean and none cover the kernels' paths")
    x, w, b, y, tw, cw, t = _data()
    x, w, b, t = _rounded(dtype, x, w, b, t)  # the truth sees the rounded inputs
    d = dict(tw=tw, cw=cw, t=t)
    kw = dict(CE_CASES[case](d), reduction=reduction)
    truth, gt = _ce(R.linear_cross_entropy, x, w, b, y, torch.float64, **dict(kw))
    same, gs = _ce(R.linear_cross_entropy, x, w, b, y, dtype, **dict(kw))
    ours, go = _ce(L.linear_cross_entropy, x, w, b, y, dtype, backend=backend, **dict(kw))
    assert_ce_rule(ours, go, same, gs, truth, gt, dtype, backend)


@pytest.mark.parametrize("case", ["class", "class_smoothing", "prob", "prob_all"])
def test_reference_matches_torch(case):
    """The reference's class weights and probability targets are torch's (F.cross_entropy on the logits)."""
    import torch.nn.functional as F

    x, w, b, y, tw, cw, t = (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                             for v in _data())
    kw = CE_CASES[case](dict(tw=None, cw=cw, t=t))
    kw.pop("token_weight", None)
    kw.pop("z_loss", None)
    target = kw.pop("target", y)
    for red in ("mean", "sum", "none"):
        ours = R.linear_cross_entropy(x, w, target, linear_bias=b, reduction=red, **kw)
        theirs = F.cross_entropy(x @ w.T + b, target, reduction=red, **kw)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", backends())
def test_probability_target_gradient(backend):
    """A probability target that requires grad gets ∂ℓ/∂t = −log p (times the class weight), as in torch."""
    x, w, b, y, tw, cw, t = _data()
    out = {}
    for name, fn, kw in (("ours", L.linear_cross_entropy, dict(backend=backend)), ("ref", R.linear_cross_entropy, {})):
        tt = leaf(t)
        loss = fn(leaf(x), leaf(w), tt, linear_bias=leaf(b), weight=cw, label_smoothing=0.1, **kw)
        out[name] = torch.autograd.grad(loss, tt)[0]
    torch.testing.assert_close(out["ours"], out["ref"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("case", ["token", "class", "class_smoothing", "prob_all"])
def test_zero_total_weight(backend, case):
    """A mean whose total weight is 0 is 0 with zero gradients (docs/maths.md §11)."""
    x, w, b, y, tw, cw, t = _data()
    d = dict(tw=torch.zeros(N), cw=torch.zeros(V), t=t)
    kw = CE_CASES[case](d)
    if case == "prob_all":
        kw["token_weight"] = torch.zeros(N)
    if case == "class_smoothing":
        kw["label_smoothing"] = 0.0  # with smoothing the other classes' weights would still count (torch: nan)
    xs, ws, bs = leaf(x), leaf(w), leaf(b)
    out = L.linear_cross_entropy(xs, ws, kw.pop("target", y), linear_bias=bs, backend=backend, **kw)
    assert out.item() == 0.0
    for g in grads(out, [xs, ws, bs]):
        assert torch.all(g == 0)


# ------------------------------------------------------------------------------------------ divergence


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("divergence", ["sce", "kl", "js"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_divergence_token_weight(backend, divergence, reduction):
    if backend == "triton" and reduction == "sum":
        pytest.skip("interpreter time")
    x, w, b, y, tw, cw, t = _data()
    xq = 0.7 * x + 0.5 * torch.randn(N, H)
    mask = torch.rand(N) > 0.2
    res = {}
    for name, fn, dt, kw in (("truth", R.linear_divergence, torch.float64, {}),
                             ("ours", L.linear_divergence, torch.float32, dict(backend=backend))):
        ins = [leaf(x, dt), leaf(xq, dt), leaf(w, dt), leaf(b, dt)]
        out = fn(ins[0], ins[1], ins[2], linear_bias=ins[3], divergence=divergence, reduction=reduction, mask=mask,
                 token_weight=tw, temperature=1.3, **kw)
        g = _upstream(out)
        res[name] = (out, grads((out.double() * g).sum(), ins))
    torch.testing.assert_close(res["ours"][0].double(), res["truth"][0], rtol=1e-4, atol=1e-5)
    for o, r in zip(res["ours"][1], res["truth"][1]):
        torch.testing.assert_close(o.double(), r, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ long-short

B, T = 2, 9


def _ls_data(seed=1):
    g = torch.Generator().manual_seed(seed)
    hl = torch.randn(B, T, H, generator=g)
    hs = 0.6 * torch.randn(B, T, H, generator=g) + 0.8 * hl
    w = torch.randn(V, H, generator=g) / H**0.5 * 2
    b = torch.randn(V, generator=g) * 0.1
    yl = targets((B, T), V, gen=g)
    ys = yl.roll(-3, dims=1)  # the short view's labels: the same tokens, three rows earlier
    ys[1, 2] = IGN
    wl, ws = torch.rand(B, T, generator=g), torch.rand(B, T, generator=g)
    return hl, hs, w, b, yl, ys, wl, ws


LS_CASES = {
    "token": lambda wl, ws: dict(token_weight_long=wl, token_weight_short=ws),
    "token_long_only": lambda wl, ws: dict(token_weight_long=wl, divergence="kl", detach="long"),
    "longce": lambda wl, ws: dict(ce_weighting="longce"),
    "longce_gamma_token": lambda wl, ws: dict(ce_weighting="longce", longce_gamma=1.2, token_weight_long=wl,
                                              token_weight_short=ws, label_smoothing=0.1, divergence="js"),
}


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("case", list(LS_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_short_matches_reference(backend, case, dtype):
    hl, hs, w, b, yl, ys, wl, ws = _ls_data()
    hl, hs, w, b = _rounded(dtype, hl, hs, w, b)
    kw = dict(LS_CASES[case](wl, ws), l_extra=3, alpha=0.3)
    res = {}
    for name, fn, dt, extra in (("truth", R.long_short_loss, torch.float64, {}),
                                ("same", R.long_short_loss, dtype, {}),
                                ("ours", L.long_short_loss, dtype, dict(backend=backend))):
        ins = [leaf(hl, dt), leaf(hs, dt), leaf(w, dt), leaf(b, dt)]
        outs = fn(ins[0], ins[1], ins[2], yl, ys, linear_bias=ins[3], **kw, **extra)
        # every output gets a gradient: loss + 2·ce + 3·misalign
        scalar = sum((i + 1) * o.double() for i, o in enumerate(outs))
        res[name] = (outs, grads(scalar, ins))
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    for i in range(3):
        assert_close_rule(res["ours"][0][i], res["same"][0][i], res["truth"][0][i], atol=tol, rtol=tol, name=f"out{i}")
    for name, o, s, tr in zip(["dhl", "dhs", "dw", "db"], res["ours"][1], res["same"][1], res["truth"][1]):
        extra = 2.0**-8 * tr.abs().max().item() if (backend == "triton" and dtype != torch.float32) else 0.0
        assert_close_rule(o, s, tr, atol=tol * 0.1 + extra, rtol=tol, name=name)


def test_longce_by_hand():
    """LongCE's ce written out per row (docs/maths.md §13), and the weight carries no gradient."""
    hl, hs, w, b, yl, ys, wl, ws = (t.double() if t.is_floating_point() else t for t in _ls_data())
    l_extra, gamma = 3, 1.5
    out = L.long_short_loss(hl, hs, w, yl, ys, l_extra=l_extra, ce_weighting="longce", longce_gamma=gamma,
                            backend="cpu")
    ce_l = torch.nn.functional.cross_entropy((hl @ w.T).transpose(1, 2), yl, reduction="none")
    ce_s = torch.nn.functional.cross_entropy((hs @ w.T).transpose(1, 2), ys, reduction="none")
    f = torch.ones(B, T, dtype=torch.float64)
    for bi in range(B):
        for i in range(T - l_extra):
            if yl[bi, l_extra + i] != IGN and ys[bi, i] != IGN:
                f[bi, l_extra + i] = min(float(torch.exp(ce_s[bi, i] - ce_l[bi, l_extra + i])), gamma)
    n = (yl != IGN).sum() + (ys != IGN).sum()
    want = ((ce_l * f).sum() + ce_s.sum()) / n
    torch.testing.assert_close(out.ce, want, rtol=1e-12, atol=1e-12)
    assert (f != 1).any() and (f == gamma).any()


def test_modules_pass_weights():
    x, w, b, y, tw, cw, t = _data()
    m = L.LinearCrossEntropyLoss(weight=cw, backend="cpu")
    got = m(x, w, y, token_weight=tw)
    torch.testing.assert_close(got, R.linear_cross_entropy(x, w, y, weight=cw, token_weight=tw))
    assert "weight" in dict(m.named_buffers())
    got = L.LinearCrossEntropyLoss(backend="cpu")(x, w, t)  # probability targets through the module
    torch.testing.assert_close(got, R.linear_cross_entropy(x, w, t))
    hl, hs, w2, b2, yl, ys, wl, ws = _ls_data()
    ls = L.LongShortAlignmentLoss(backend="cpu", ce_weighting="longce")
    got = ls(hl, hs, w2, yl, ys, 3, token_weight_long=wl)
    want = R.long_short_loss(hl, hs, w2, yl, ys, l_extra=3, ce_weighting="longce", token_weight_long=wl)
    torch.testing.assert_close(got.loss, want.loss)


# ------------------------------------------------------------------------------------------ vocab-parallel


def _vp_body(rank, world):
    s, n = [(0, 80), (80, V - 80)][rank]  # uneven shards
    x, w, b, y, tw, cw, t = _data()
    x, w, b = x.double(), w.double(), b.double()
    hl, hs, w2, b2, yl, ys, wl, ws = _ls_data()
    hl, hs, w2, b2 = hl.double(), hs.double(), w2.double(), b2.double()
    grp = dict(process_group=dist.group.WORLD, vocab_start=s)
    cases = [
        ("ce", dict(token_weight=tw, label_smoothing=0.1, z_loss=1e-3)),
        ("ce", dict(weight=cw.double(), token_weight=tw, softcap=3.0, reduction="none")),
        ("div", dict(token_weight=tw, divergence="kl", temperature=0.8)),
        ("ls", dict(token_weight_long=wl, token_weight_short=ws, ce_weighting="longce", divergence="sce")),
    ]
    for kind, kw in cases:
        res = []
        for ref in (True, False):
            if kind == "ls":
                ins = [leaf(v) for v in (hl, hs, w2 if ref else w2[s:s + n], b2 if ref else b2[s:s + n])]
                outs = (R.long_short_loss if ref else L.long_short_loss)(
                    ins[0], ins[1], ins[2], yl, ys, linear_bias=ins[3], l_extra=3, alpha=0.3, **kw,
                    **({} if ref else grp))
                outs = list(outs)
            else:
                ins = [leaf(v) for v in (x, 0.5 * x + 0.3, w if ref else w[s:s + n], b if ref else b[s:s + n])]
                if kind == "ce":
                    outs = [(R.linear_cross_entropy if ref else L.linear_cross_entropy)(
                        ins[0], ins[2], y, linear_bias=ins[3], **kw, **({} if ref else grp))]
                else:
                    outs = [(R.linear_divergence if ref else L.linear_divergence)(
                        ins[0], ins[1], ins[2], linear_bias=ins[3], **kw, **({} if ref else grp))]
            scalar = sum((i + 1) * o.sum() for i, o in enumerate(outs))
            res.append((outs, grads(scalar, ins)))
        (ro, rg), (oo, og) = res
        for a, e in zip(oo, ro):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)
        rg = [rg[0], rg[1], rg[2][s:s + n], rg[3][s:s + n]]
        for a, e in zip(og, rg):
            torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-10)
    # per-token lse over the shards (docs/maths.md §3); entropy / accuracy, probability targets and class-weighted
    # smoothing under process_group=: tests/backends/test_vocab_parallel_options.py
    got = L.linear_cross_entropy(x, w[s:s + n], y, linear_bias=b[s:s + n], return_lse=True, **grp)
    want = R.linear_cross_entropy(x, w, y, linear_bias=b, return_lse=True)
    torch.testing.assert_close(got.lse, want.lse, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-12, atol=1e-12)


def test_vocab_parallel_weights(tmp_path):
    run_gloo(_vp_body, 2, tmp_path)


# ------------------------------------------------------------------------------------------ bad input

_x, _w = torch.randn(6, 8), torch.randn(11, 8)
_y = torch.randint(0, 11, (6,))
_hl = torch.randn(2, 5, 8)
_yl = torch.randint(0, 11, (2, 5))


def _ce_call(**kw):
    target = kw.pop("target", _y)
    return lambda: L.linear_cross_entropy(_x, _w, target, **kw)


def _ls_call(**kw):
    return lambda: L.long_short_loss(_hl, _hl.clone(), _w, _yl, _yl.clone(), l_extra=2, **kw)


CASES = [
    # (id, call, exception, words the message must contain)
    ("ce token_weight shape", _ce_call(token_weight=torch.ones(7)), ValueError, ["token_weight", "(6,)"]),
    ("ce token_weight int", _ce_call(token_weight=torch.ones(6, dtype=torch.int64)), TypeError,
     ["token_weight", "float"]),
    ("ce token_weight < 0", _ce_call(token_weight=-torch.ones(6)), ValueError, ["token_weight", ">= 0"]),
    ("ce token_weight nan", _ce_call(token_weight=torch.full((6,), float("nan"))), ValueError,
     ["token_weight", "NaN"]),
    ("ce weight shape", _ce_call(weight=torch.ones(12)), ValueError, ["weight", "[V=11]"]),
    ("ce weight int", _ce_call(weight=torch.ones(11, dtype=torch.int64)), TypeError, ["weight", "float"]),
    ("ce weight < 0", _ce_call(weight=-torch.ones(11)), ValueError, ["weight", ">= 0"]),
    ("ce weight requires grad", _ce_call(weight=torch.ones(11, requires_grad=True)), ValueError,
     ["weight", "requires grad", "detach()"]),
    ("ce probabilities + ignore_index", _ce_call(target=torch.rand(6, 11), ignore_index=-100), ValueError,
     ["ignore_index", "probability"]),
    ("ce probabilities shape", _ce_call(target=torch.rand(6, 12)), TypeError, ["target", "(6, 11)"]),
    ("ce K-dim weight", lambda: L.linear_cross_entropy(_x, torch.randn(3, 2, 8), torch.randint(0, 3, (6, 2))),
     ValueError, ["linear_weight", "K-dimensional", "loop"]),
    ("div token_weight shape", lambda: L.linear_divergence(_x, _x.clone(), _w, token_weight=torch.ones(6, 1)),
     ValueError, ["token_weight", "(6,)"]),
    ("ls token_weight_long shape", _ls_call(token_weight_long=torch.ones(2, 4)), ValueError,
     ["token_weight_long", "(2, 5)"]),
    ("ls token_weight_short < 0", _ls_call(token_weight_short=-torch.ones(2, 5)), ValueError,
     ["token_weight_short", ">= 0"]),
    ("ls ce_weighting", _ls_call(ce_weighting="long"), ValueError, ["ce_weighting", "'longce'"]),
    ("ls longce_gamma <= 0", _ls_call(ce_weighting="longce", longce_gamma=0.0), ValueError, ["longce_gamma", "> 0"]),
]


@pytest.mark.parametrize("name,call,exc,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, call, exc, words):
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    for word in words:
        assert word in msg, f"{name}: {word!r} not in {msg!r}"


# ------------------------------------------------------------------------------------------ lsa train


def test_train_longce_flag_reaches_the_loss(tmp_path, monkeypatch):
    """``lsa train --ce-weighting longce --longce-gamma 5``: the loss of every step gets them."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from _util import write_corpus_texts
    from lsa_kernels.integrations import hf
    from lsa_kernels.train.config import ConfigError, config_from_args, validate
    from lsa_kernels.train.loop import train_main

    seen = []
    real = hf.long_short_loss

    def spy(*a, **kw):
        seen.append((kw.get("ce_weighting"), kw.get("longce_gamma")))
        return real(*a, **kw)

    monkeypatch.setattr(hf, "long_short_loss", spy)
    texts = write_corpus_texts(tmp_path)
    tiny = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--n-kv-head", "1", "--ffn", "64",
            "--max-positions", "64", "--l-train", "16", "--batch-size", "2", "--steps", "2", "--quiet"]
    assert train_main(tiny + ["--train-files", *texts["train"], "--out", str(tmp_path / "run"), "--alpha", "0.1",
                              "--ce-weighting", "longce", "--longce-gamma", "5"]) == 0
    assert seen and all(s == ("longce", 5.0) for s in seen), seen
    with pytest.raises(ConfigError, match="--ce-weighting longce"):
        validate(config_from_args(["--alpha", "0", "--ce-weighting", "longce"]))
