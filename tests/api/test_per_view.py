"""Per-view per-token outputs of long_short_loss (docs/maths.md §4 per-view outputs): each view's lse, entropy
(with its gradient) and accuracy, from the same pass over V as the loss, on every path (cpu compiled, cpu ATen,
Triton under the interpreter) against the fp64 reference on materialised logits: fp64 tight, fp32 and bf16 by
CCE's rule; odd shapes, ignored rows in both views (paired and unpaired), every divergence, both positions,
detach, softcap / smoothing / z-loss / temperature; gradients of a loss mixing loss, ce, misalign and Σ
entropy·random weights."""

import pytest
import torch

import lsa_kernels as L
from lsa_kernels import _ext
from lsa_kernels import reference as R
from lsa_kernels.pairing import LongShortLoss, LongShortLossOutput, PerToken

from _util import IGN, assert_close_rule, grads, leaf, triton_available

B, T, H, V, LX = 2, 9, 13, 37, 3
DIVS = ["sce", "kl", "kl_reverse", "sym_kl", "js"]
PATHS = ["cpu", "cpu-aten"] + (["triton"] if triton_available() else [])
ALL = dict(softcap=4.0, label_smoothing=0.1, z_loss=1e-2, temperature=1.7)


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    hl = torch.randn(B, T, H, generator=g)
    hs = torch.randn(B, T, H, generator=g)
    hl[0, 4] *= 6  # a confident row: small entropy
    w = torch.randn(V, H, generator=g) / H**0.5 * 2
    b = torch.randn(V, generator=g) * 0.1
    yl = torch.randint(0, V, (B, T), generator=g)
    ys = torch.randint(0, V, (B, T), generator=g)
    yl[0, 1] = IGN  # unpaired long row (t < LX)
    yl[1, 5] = IGN  # paired long row
    ys[0, T - 1] = IGN  # unpaired short row (t >= T - LX)
    ys[1, 2] = IGN  # paired short row
    return hl, hs, w, b, yl, ys


def _backend(path):
    return "triton" if path == "triton" else "cpu"


def _run(fn, data, dtype, **kw):
    hl, hs, w, b, yl, ys = data
    leaves = [leaf(t, dtype) for t in (hl, hs, w, b)]
    out = fn(leaves[0], leaves[1], leaves[2], yl, ys, l_extra=LX, linear_bias=leaves[3], return_lse=True,
             return_entropy=True, return_accuracy=True, **kw)
    g = torch.Generator().manual_seed(7)
    # bf16-representable upstream weights of the entropies (an entropy bonus per row and view)
    rl, rs = (torch.randn(B, T, generator=g).to(torch.bfloat16).double() for _ in range(2))
    scalar = (out.loss.double() * 0.75 + out.ce.double() * 0.25 - out.misalign.double() * 0.5
              + (out.long.entropy.double() * rl).sum() + (out.short.entropy.double() * rs).sum())
    return out, grads(scalar, leaves)


def _check(ours, same, truth, go, gs, gt, dtype, path):
    assert isinstance(ours, LongShortLossOutput)
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-3}[dtype]
    for name in ("loss", "ce", "misalign"):
        assert_close_rule(getattr(ours, name), getattr(same, name), getattr(truth, name), atol=tol, rtol=tol,
                          name=name)
    for view in ("long", "short"):
        o, s, t = getattr(ours, view), getattr(same, view), getattr(truth, view)
        for name in ("lse", "entropy"):
            a = getattr(o, name)
            assert a.dtype == dtype and a.shape == (B, T), (view, name)
            assert_close_rule(a, getattr(s, name), getattr(t, name), atol=tol, rtol=tol, name=f"{view}.{name}")
        assert o.lse.requires_grad is False and o.accuracy.dtype == torch.bool
        assert torch.equal(o.accuracy, t.accuracy), view
    for name, o, s, t in zip(["d_hidden_long", "d_hidden_short", "dw", "db"], go, gs, gt):
        extra = 2.0**-8 * t.abs().max().item() if (path == "triton" and dtype != torch.float32) else 0.0
        assert_close_rule(o, s, t, atol=tol * 0.1 + extra, rtol=tol, name=name)


def _compare(path, dtype, seed=0, **kw):
    data = _data(seed)
    if dtype != torch.float64:
        data = tuple(t.to(dtype).float() if t.is_floating_point() else t for t in data)
    truth, gt = _run(R.long_short_loss, data, torch.float64, **kw)
    same, gs = _run(R.long_short_loss, data, dtype, **kw)
    with _ext.disable(path == "cpu-aten"):
        ours, go = _run(L.long_short_loss, data, dtype, backend=_backend(path), **kw)
    _check(ours, same, truth, go, gs, gt, dtype, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("divergence", DIVS)
def test_every_divergence(path, divergence):
    dtype = torch.float32
    _compare(path, dtype, divergence=divergence, alpha=0.7)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["all", "last_detach_long", "detach_short_js"])
def test_options(path, dtype, case):
    kw = {"all": dict(ALL, divergence="sym_kl"),
          "last_detach_long": dict(ALL, positions="last", detach="long", divergence="kl"),
          "detach_short_js": dict(softcap=4.0, detach="short", divergence="js")}[case]
    _compare(path, dtype, alpha=0.4, **kw)


@pytest.mark.parametrize("path", [p for p in PATHS if p != "triton"])  # fp64: the cpu backend (ATen) only
def test_fp64_tight(path):
    _compare(path, torch.float64, divergence="sce", **ALL)


@pytest.mark.parametrize("path", PATHS)
def test_longce_and_token_weights(path):
    g = torch.Generator().manual_seed(3)
    tw = dict(token_weight_long=torch.rand(B, T, generator=g), token_weight_short=torch.rand(B, T, generator=g))
    _compare(path, torch.float32, ce_weighting="longce", longce_gamma=2.0, **tw)


@pytest.mark.parametrize("path", PATHS)
def test_entropy_alone_and_selection(path):
    """Only an entropy in the graph (an entropy bonus of one view); outputs not asked are None; none asked: the
    plain LongShortLoss; the values agree with the plain call."""
    hl, hs, w, b, yl, ys = _data()
    res = []
    for fn, dt, kw in ((L.long_short_loss, torch.float32, dict(backend=_backend(path))),
                       (R.long_short_loss, torch.float64, {})):
        lv = [leaf(t, dt) for t in (hl, hs, w)]
        with _ext.disable(path == "cpu-aten"):
            out = fn(*lv, yl, ys, l_extra=LX, return_entropy=True, **kw)
            assert out.long.lse is None and out.long.accuracy is None and out.short.entropy is not None
            res.append(grads(out.short.entropy.double().sum(), lv))
    for o, r in zip(*res):
        torch.testing.assert_close(o.double(), r, rtol=1e-4, atol=1e-6)
    assert res[0][0].abs().max() == 0  # the short view's entropy does not reach hidden_long
    plain = L.long_short_loss(hl, hs, w, yl, ys, l_extra=LX, backend=_backend(path))
    assert type(plain) is LongShortLoss
    only = L.long_short_loss(hl, hs, w, yl, ys, l_extra=LX, backend=_backend(path), return_accuracy=True)
    assert isinstance(only.long, PerToken) and only.long.entropy is None and only.long.lse is None
    for a, c in zip(only[:3], plain):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("path", PATHS + ["reference"])
def test_accuracy_ignored_rows_and_ties(path):
    """accuracy is False on ignored rows (paired and unpaired, both views) and argmax ties go to the lowest
    index: rows 3 and 11 of W are equal and dominate every logit (with softcap too)."""
    hl, hs, w, b, yl, ys = _data(1)
    w = w.clone()
    w[3] = w[11] = 0.0
    b = torch.zeros(V)
    b[3] = b[11] = 50.0  # the tied maximum of every row
    yl = torch.full((B, T), 3)
    ys = torch.full((B, T), 11)
    yl[0, 0] = yl[1, 6] = IGN
    ys[0, T - 1] = ys[1, 0] = IGN
    backend = "reference" if path == "reference" else _backend(path)
    with _ext.disable(path == "cpu-aten"):
        out = L.long_short_loss(hl, hs, w, yl, ys, l_extra=LX, linear_bias=b, softcap=60.0, backend=backend,
                                return_accuracy=True, return_lse=True)
    assert torch.equal(out.long.accuracy, yl != IGN)  # argmax = 3 (the lower of the tie) everywhere
    assert not out.short.accuracy.any()  # 11 never wins the tie; ignored rows False anyway


def test_module_and_reference_backend():
    hl, hs, w, b, yl, ys = _data()
    mod = L.LongShortAlignmentLoss(backend="cpu", return_lse=True)
    out = mod(hl, hs, w, yl, ys, LX)
    ref = L.long_short_loss(hl, hs, w, yl, ys, l_extra=LX, backend="reference", return_lse=True)
    assert isinstance(out, LongShortLossOutput) and isinstance(ref, LongShortLossOutput)
    torch.testing.assert_close(out.long.lse, ref.long.lse)
    torch.testing.assert_close(out.short.lse, ref.short.lse)
    # rows line up with the hidden states: the lse of hidden_long[b, t] is logsumexp of its own logits
    torch.testing.assert_close(out.long.lse, torch.logsumexp(hl @ w.T, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.short.lse, torch.logsumexp(hs @ w.T, -1), rtol=1e-5, atol=1e-5)


# per-view entropy / accuracy under process_group= are merged over the shards (no longer refused):
# tests/backends/test_vocab_parallel_options.py::test_long_short_per_view_under_process_group


@pytest.mark.memory
@pytest.mark.parametrize("path", ["cpu", "cpu-aten"])
def test_cpu_within_chunk_budget(path):
    """The per-view extras (forward temporaries, the entropy terms kept across the pair chunk function) stay
    within the cpu backend's chunk budget on both of its paths (the tracker of tests/backends/test_memory.py)."""
    from backends.test_memory import LiveLogitBytes

    if path == "cpu" and not _ext.built():
        pytest.skip("lsa_kernels._C not built")
    Bm, Tm, Hm, Vm, budget = 2, 192, 24, 1501, 1 << 19
    assert Bm * Tm * Vm * 4 >= 4 * budget
    g = torch.Generator().manual_seed(0)
    hl, hs = leaf(torch.randn(Bm, Tm, Hm, generator=g)), leaf(torch.randn(Bm, Tm, Hm, generator=g))
    w = leaf(torch.randn(Vm, Hm, generator=g))
    yl, ys = (torch.randint(0, Vm, (Bm, Tm), generator=g) for _ in range(2))
    mode = LiveLogitBytes(Vm)
    with _ext.disable(path == "cpu-aten"), mode:
        out = L.long_short_loss(hl, hs, w, yl, ys, l_extra=Tm // 3, softcap=3.0, temperature=0.7, backend="cpu",
                                chunk_bytes=budget, return_entropy=True, return_accuracy=True)
        (out.loss + out.long.entropy.sum() - out.short.entropy.sum()).backward()
    assert 0 < mode.peak <= budget, f"peak live logits {mode.peak} B > budget {budget} B"


def test_cpu_backend_bad_input():
    """The contract's per-view extras: not with a second head; an entropy coefficient needs the forward's."""
    from lsa_kernels.backends import PairCoefs, PairGrads, PairOut, PairRows, cpu
    from lsa_kernels.options import CEOptions, PairOptions

    hl, hs, w, b, yl, ys = _data()
    xp, xq = hl.reshape(-1, H), hs.reshape(-1, H)
    n = xp.shape[0]
    opts = PairOptions(with_ce=False, ce=CEOptions(entropy=True))
    with pytest.raises(ValueError, match="second head"):
        cpu.backend.pair_forward(PairRows(xp, xq), w, None, opts, wq=w.clone())
    saved = cpu.backend.pair_forward(PairRows(xp, xq), w, None, PairOptions(with_ce=False))
    coefs = PairCoefs(torch.ones(n), entropy=torch.ones(n, 2))
    with pytest.raises(ValueError, match="saved.entropy"):
        cpu.backend.pair_backward(PairRows(xp, xq), w, None, PairOut(None, None, None, saved.stats), coefs,
                                  PairOptions(with_ce=False), PairGrads(dxp=torch.empty(n, H)))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("which", ["loss", "loss+ce"])
def test_lse_accuracy_gradients(path, which):
    """Without the entropy the cpu backend folds loss's gradient into the forward (as the plain call does);
    gradients of loss alone (folded) and of loss + ce (recomputed) equal the reference's, twice over a retained
    graph, and lse / accuracy equal the reference's."""
    hl, hs, w, b, yl, ys = _data(4)
    kw = dict(divergence="kl", softcap=4.0, temperature=1.3, label_smoothing=0.1)
    res = []
    for fn, dt, extra in ((L.long_short_loss, torch.float32, dict(backend=_backend(path))),
                          (R.long_short_loss, torch.float64, {})):
        lv = [leaf(t, dt) for t in (hl, hs, w, b)]
        with _ext.disable(path == "cpu-aten"):
            out = fn(lv[0], lv[1], lv[2], yl, ys, l_extra=LX, linear_bias=lv[3], return_lse=True,
                     return_accuracy=True, **kw, **extra)
            total = 0.7 * out.loss if which == "loss" else 0.7 * out.loss + 0.3 * out.ce
            g1 = grads(total.double(), lv) if fn is R.long_short_loss else [
                t.double() for t in torch.autograd.grad(total, lv, retain_graph=True)]
            if fn is L.long_short_loss:
                g2 = torch.autograd.grad(total, lv)
                for a, c in zip(g1, g2):
                    torch.testing.assert_close(a, c.double(), rtol=0, atol=0)
        res.append((out, g1))
    (ours, go), (truth, gt) = res
    for view in ("long", "short"):
        o, t = getattr(ours, view), getattr(truth, view)
        assert o.entropy is None
        torch.testing.assert_close(o.lse.double(), t.lse, rtol=1e-5, atol=2e-5)
        assert torch.equal(o.accuracy, t.accuracy)
    for a, t in zip(go, gt):
        torch.testing.assert_close(a, t, rtol=1e-4, atol=2e-5)
