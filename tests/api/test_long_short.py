"""long_short_loss and linear_divergence: every backend vs the reference, identities, oracles."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import lsa_kernels as L
from lsa_kernels import reference as R
from lsa_kernels.options import DIVERGENCES

from _util import (IGN, assert_close_rule, backends, first_order_effect, fp32_logits_error, grads, has, leaf,
                   targets)

B, T, H, V = 2, 9, 61, 1003


def _views(dtype=torch.float32, seed=0, bias=True, correlated=True):
    g = torch.Generator().manual_seed(seed)
    hl = torch.randn(B, T, H, generator=g)
    hs = torch.randn(B, T, H, generator=g)
    if correlated:  # views of one text: the short view's hidden states resemble the long one's
        hs = 0.7 * hs + 0.7 * hl
    w = torch.randn(V, H, generator=g) / H**0.5 * 2
    b = torch.randn(V, generator=g) * 0.1 if bias else None
    yl = targets((B, T), V, gen=g)
    ys = targets((B, T), V, gen=g)
    return [None if t is None else t.to(dtype).float() for t in (hl, hs, w, b)] + [yl, ys]


def _ls(fn, hl, hs, w, b, yl, ys, dtype, weights=(1.0, 0.0, 0.0), **kw):
    ins = [leaf(hl, dtype), leaf(hs, dtype), leaf(w, dtype)] + ([leaf(b, dtype)] if b is not None else [])
    out = fn(ins[0], ins[1], ins[2], yl, ys, linear_bias=ins[3] if b is not None else None, **kw)
    scalar = sum(c * o.double() for c, o in zip(weights, out))
    return out, grads(scalar, ins)


def _check(backend, dtype, kw, weights=(1.0, 0.0, 0.0), bias=True, seed=0):
    hl, hs, w, b, yl, ys = _views(dtype, seed=seed, bias=bias)
    truth = _ls(R.long_short_loss, hl, hs, w, b, yl, ys, torch.float64, weights, **kw)
    same = _ls(R.long_short_loss, hl, hs, w, b, yl, ys, dtype, weights, **kw)
    ours = _ls(L.long_short_loss, hl, hs, w, b, yl, ys, dtype, weights, backend=backend, **kw)
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    for name, o, s, t in zip(["loss", "ce", "misalign"], ours[0], same[0], truth[0]):
        assert o.dtype == dtype
        assert_close_rule(o, s, t, atol=tol, rtol=tol, name=name)
    for name, o, s, t in zip(["d_long", "d_short", "dw", "db"], ours[1], same[1], truth[1]):
        assert_close_rule(o, s, t, atol=tol * 0.1, rtol=tol, name=name)


# full cross product on the cpu backend (fp32), a covering subset on triton and for bf16
# (softcap, positions) vary together: each value of each option meets every divergence × detach × τ
FULL = [
    (d, det, tau, cap, pos)
    for d, det, tau, (cap, pos) in itertools.product(
        DIVERGENCES, [None, "long", "short"], [1.0, 0.7], [(None, "overlap"), (3.0, "last")]
    )
]


@pytest.mark.parametrize("divergence,detach,temperature,softcap,positions", FULL)
def test_cpu_fp32_every_option(divergence, detach, temperature, softcap, positions):
    kw = dict(l_extra=3, alpha=0.3, divergence=divergence, detach=detach, temperature=temperature,
              softcap=softcap, positions=positions)
    _check("cpu", torch.float32, kw)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backends_dtypes(backend, divergence, dtype):
    kw = dict(l_extra=4, alpha=0.5, divergence=divergence, temperature=0.8, softcap=5.0, detach="short",
              label_smoothing=0.1, z_loss=1e-3)
    _check(backend, dtype, kw)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("l_extra", [1, T - 1])
@pytest.mark.parametrize("weights", [(1.0, 0.0, 0.0), (0.5, 2.0, -3.0), (0.0, 0.0, 1.0)])
def test_l_extra_edges_and_output_weights(backend, l_extra, weights):
    """l_extra = 1 and T-1; gradients through loss, ce and misalign in any combination."""
    _check(backend, torch.float32, dict(l_extra=l_extra, divergence="sce"), weights=weights, bias=False)


@pytest.mark.parametrize("backend", backends())
def test_no_valid_pairs_gives_zero_misalign(backend):
    hl, hs, w, b, yl, ys = _views()
    ys = torch.full_like(ys, IGN)
    out = L.long_short_loss(leaf(hl), leaf(hs), leaf(w), yl, ys, l_extra=2, backend=backend)
    assert out.misalign.item() == 0.0 and torch.isfinite(out.loss)
    yl = torch.full_like(yl, IGN)
    ins = [leaf(hl), leaf(hs), leaf(w)]
    out = L.long_short_loss(*ins, yl, ys, l_extra=2, backend=backend)
    assert out.loss.item() == 0.0
    assert all(torch.all(g == 0) for g in grads(out.loss, ins))


def test_gradcheck_cpu_float64():
    g = torch.Generator().manual_seed(5)
    hl = torch.randn(2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    hs = torch.randn(2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    yl = torch.tensor([[1, 2, IGN, 4, 5], [6, 0, 1, 2, 3]])
    ys = torch.tensor([[2, IGN, 4, 5, 6], [1, 2, 3, 4, 5]])
    for div in DIVERGENCES:
        def fn(hl, hs, w, b):
            r = L.long_short_loss(hl, hs, w, yl, ys, l_extra=2, divergence=div, temperature=0.9, softcap=3.0,
                                  label_smoothing=0.1, z_loss=0.01, linear_bias=b, backend="cpu")
            return r.loss, r.ce, r.misalign

        assert torch.autograd.gradcheck(fn, (hl, hs, w, b)), div
        assert torch.autograd.gradcheck(
            lambda hl, hs, w, b: L.reference.long_short_loss(hl, hs, w, yl, ys, l_extra=2, divergence=div,
                                                             linear_bias=b).loss, (hl, hs, w, b))


# ------------------------------------------------------------------------------ linear_divergence


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction,detach,masked", [("mean", None, False), ("none", "p", True), ("sum", "q", True)])
def test_linear_divergence(backend, divergence, reduction, detach, masked):
    g = torch.Generator().manual_seed(7)
    xp = torch.randn(5, 7, H, generator=g)
    xq = 0.6 * xp + 0.8 * torch.randn(5, 7, H, generator=g)
    w = torch.randn(V, H, generator=g) / H**0.5 * 2
    b = torch.randn(V, generator=g) * 0.1
    mask = torch.rand(5, 7, generator=g) > 0.3 if masked else None
    kw = dict(divergence=divergence, reduction=reduction, detach=detach, mask=mask, temperature=1.5, softcap=4.0)

    def run(fn, dtype, **extra):
        ins = [leaf(t, dtype) for t in (xp, xq, w, b)]
        out = fn(ins[0], ins[1], ins[2], linear_bias=ins[3], **kw, **extra)
        return out, grads(out.double().sum(), ins)

    truth, same, ours = run(R.linear_divergence, torch.float64), run(R.linear_divergence, torch.float32), run(
        L.linear_divergence, torch.float32, backend=backend)
    assert ours[0].shape == truth[0].shape
    assert_close_rule(ours[0], same[0], truth[0], atol=2e-5, rtol=2e-5, name="value")
    for name, o, s, t in zip(["dxp", "dxq", "dw", "db"], ours[1], same[1], truth[1]):
        assert_close_rule(o, s, t, atol=2e-6, rtol=2e-5, name=name)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("divergence", ["kl", "kl_reverse", "sym_kl", "js"])
def test_identical_views_zero_divergence_and_gradient(backend, divergence):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(6, H, generator=g) * 2
    w = torch.randn(V, H, generator=g) / H**0.5 * 3
    xp, xq, ws = leaf(x), leaf(x), leaf(w)
    out = L.linear_divergence(xp, xq, ws, divergence=divergence, backend=backend)
    assert abs(out.item()) < 1e-6
    for gr in grads(out, [xp, xq, ws]):
        assert gr.abs().max() < 1e-6


def test_identities_between_divergences():
    """sce = H(p) + H(q) + sym_kl;  sym_kl = kl + kl_reverse (per row, fp64, cpu backend)."""
    g = torch.Generator().manual_seed(9)
    xp, xq = torch.randn(2, 11, 13, generator=g, dtype=torch.float64).unbind(0)
    w = torch.randn(50, 13, generator=g, dtype=torch.float64)
    d = {k: L.linear_divergence(xp, xq, w, divergence=k, reduction="none", backend="cpu") for k in DIVERGENCES}
    lp, lq = torch.log_softmax(xp @ w.T, -1), torch.log_softmax(xq @ w.T, -1)
    ent = -(lp.exp() * lp).sum(-1) - (lq.exp() * lq).sum(-1)
    torch.testing.assert_close(d["sce"], ent + d["sym_kl"])
    torch.testing.assert_close(d["sym_kl"], d["kl"] + d["kl_reverse"])


def _close_views(shift: float = 0.0):
    """Two nearly equal views (KLs 4e-10 .. 2e-6) with large logits; ``shift`` adds a common offset to every
    logit of view q (a bias column: softmax ignores it, the KL sums see it)."""
    g = torch.Generator().manual_seed(10)
    H2, V2 = 32, 4000
    x = torch.randn(8, H2, generator=g, dtype=torch.float64)
    w = torch.randn(V2, H2, generator=g, dtype=torch.float64) * 2  # large logits
    xq = x + 1e-4 * torch.randn(8, H2, generator=g, dtype=torch.float64)
    if shift:
        x, xq = F.pad(x, (0, 1), value=0.0), F.pad(xq, (0, 1), value=1.0)
        w = F.pad(w, (0, 1), value=shift)
    return x.float(), xq.float(), w.float()


@pytest.mark.precision
@pytest.mark.parametrize("path", ["ext", "aten"])
@pytest.mark.parametrize("shift", [0.0, 0.25])
def test_kl_of_close_distributions_keeps_relative_precision(path, shift):
    """docs/maths.md §5: KL between nearly equal distributions, on both cpu paths, per row at least as precise
    as the materialised fp32 reference, and within what this machine's fp32 GEMM rounding of the logits
    allows (its first-order effect on each row's value, from the measured logit errors)."""
    from lsa_kernels import _ext

    if path == "ext" and not _ext.built():
        pytest.skip("lsa_kernels._C not built")
    x, xq, w = _close_views(shift)
    a, b = x.double() @ w.double().T, xq.double() @ w.double().T  # the truth of the fp32 inputs
    da, db = fp32_logits_error(x, w), fp32_logits_error(xq, w)
    for k in ("kl", "kl_reverse", "sym_kl"):
        t = R.divergence_from_logits(a, b, k)
        with _ext.disable(path == "aten"):
            ours = L.linear_divergence(x, xq, w, divergence=k, reduction="none", backend="cpu")
        naive = R.linear_divergence(x, xq, w, divergence=k, reduction="none")  # materialised fp32
        floor = first_order_effect(lambda a_, b_: R.divergence_from_logits(a_, b_, k), (a, b), (da, db))
        err, err_naive = (ours.double() - t).abs(), (naive.double() - t).abs()
        msg = (k, (err / t).tolist(), (err_naive / t).tolist(), (floor / t).tolist())
        assert (err <= torch.maximum(err_naive, floor)).all(), msg
        assert (err <= floor).all(), msg  # nothing lost beyond the GEMM's own rounding


def test_sce_oracle_soft_target_cross_entropy():
    """Independent oracle for sce: torch's soft-target cross-entropy on materialised logits, both ways."""
    hl, hs, w, b, yl, ys = _views(bias=False)
    a = (hl[:, 3:].reshape(-1, H) @ w.T)
    bb = (hs[:, : T - 3].reshape(-1, H) @ w.T)
    mask = L.pairing.pair_mask(yl, ys, 3).reshape(-1)
    oracle = (F.cross_entropy(bb, a.softmax(-1), reduction="none") + F.cross_entropy(a, bb.softmax(-1), reduction="none"))
    oracle = oracle[mask].mean()
    ours = L.long_short_loss(hl, hs, w, yl, ys, l_extra=3, alpha=1.0, backend="cpu").misalign
    torch.testing.assert_close(ours, oracle, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not has("liger_kernel"), reason="liger-kernel not installed")
@pytest.mark.parametrize("backend", backends(triton=False))
def test_js_against_liger_fused_linear_jsd(backend, monkeypatch):
    """Oracle: Liger's fused linear JSD (student = short/q, teacher = long/p detached), under the interpreter.

    Liger's β-weighted JSD with β = 0.5 equals our js: ½KL(p‖m) + ½KL(q‖m). Liger takes the student
    input first and averages over rows with a valid label.
    """
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from liger_kernel.transformers.functional import liger_fused_linear_jsd

    g = torch.Generator().manual_seed(11)
    N, H2, V2 = 16, 32, 256
    xt = torch.randn(N, H2, generator=g)
    xs = leaf(0.5 * xt + torch.randn(N, H2, generator=g) * 0.5)
    w = torch.randn(V2, H2, generator=g) / H2**0.5 * 2
    theirs = liger_fused_linear_jsd(xs, w, xt, w, None, 0.5, -100, 1.0)
    (g_theirs,) = grads(theirs, [xs])
    xs2 = leaf(xs)
    ours = L.linear_divergence(xt, xs2, w, divergence="js", detach="p", backend=backend)
    (g_ours,) = grads(ours, [xs2])
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-3, atol=1e-5)


def test_sample_l_extra_range_and_module():
    g = torch.Generator().manual_seed(0)
    draws = {L.sample_l_extra(10, generator=g) for _ in range(300)}
    assert draws == {1, 2, 3, 4, 5}
    hl, hs, w, b, yl, ys = _views(bias=False)
    mod = L.LongShortAlignmentLoss(alpha=0.2, divergence="kl")
    out = mod(hl, hs, w, yl, ys, 3)
    ref = R.long_short_loss(hl, hs, w, yl, ys, l_extra=3, alpha=0.2, divergence="kl")
    torch.testing.assert_close(out.loss, ref.loss)
