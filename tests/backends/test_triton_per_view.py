"""long_short_loss's per-view outputs in the Triton kernels (TRITON_INTERPRET=1; docs/maths.md §4 per-view
outputs, §14): phase 1's per-view entropy / argmax accumulators, their merge over V splits (merge.merge_extras
per view), the entropy gradient in pair_bwd (atomic) and pair_dz (deterministic), and the CE launch of the
unpaired rows. Truth: lsa_kernels.reference.long_short_loss on materialised logits in float64; fp32 allclose,
bf16 by CCE's rule. Odd shapes (V = 301, H = 29: no block multiple), several tiles and splits
(override_config)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import lsa_kernels as L
from lsa_kernels import reference as R
from lsa_kernels.kernels import pair
from lsa_kernels.kernels._common import LaunchConfig, override_config
from lsa_kernels.maths import Stat
from lsa_kernels.options import CEOptions, PairOptions

from _util import IGN, assert_close_rule, grads, leaf, triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not available")

B, T, H, V, LX = 2, 11, 29, 301, 4
BLOCKS = {"default": None, "split3": LaunchConfig(32, 64, 32, SPLIT_V=3, GROUP=2),
          "split7": LaunchConfig(16, 16, 16, SPLIT_V=7)}


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    hl, hs = torch.randn(B, T, H, generator=g), torch.randn(B, T, H, generator=g)
    hl[1, 6] *= 6  # a confident row
    w = torch.randn(V, H, generator=g) * (2.0 / H**0.5)
    b = torch.randn(V, generator=g) * 0.3
    yl, ys = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
    yl[0, 2] = yl[1, 7] = IGN  # unpaired and paired long rows
    ys[1, T - 2] = ys[0, 3] = IGN  # unpaired and paired short rows
    return hl, hs, w, b, yl, ys


def _ctx(blocks):
    return override_config(BLOCKS[blocks]) if BLOCKS[blocks] is not None else contextlib.nullcontext()


def _run(fn, data, dtype, **kw):
    hl, hs, w, b, yl, ys = data
    lv = [leaf(t, dtype) for t in (hl, hs, w, b)]
    out = fn(lv[0], lv[1], lv[2], yl, ys, l_extra=LX, linear_bias=lv[3], return_lse=True, return_entropy=True,
             return_accuracy=True, **kw)
    g = torch.Generator().manual_seed(5)
    rl, rs = ((torch.randn(B, T, generator=g) - 0.3).to(torch.bfloat16).double() for _ in range(2))
    total = (out.loss.double() + 0.5 * out.misalign.double() + (out.long.entropy.double() * rl).sum()
             + (out.short.entropy.double() * rs).sum())
    return out, grads(total, lv)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
@pytest.mark.parametrize("blocks", list(BLOCKS))
@pytest.mark.parametrize("kw", [dict(divergence="sce"),
                                dict(divergence="js", softcap=5.0, temperature=2.0, label_smoothing=0.1, z_loss=1e-3),
                                dict(divergence="sym_kl", positions="last", detach="long", temperature=0.7)],
                         ids=["sce", "js_all", "symkl_last_detach"])
def test_fp32_matches_reference(kw, blocks, deterministic):
    data = _data()
    truth, gt = _run(R.long_short_loss, data, torch.float64, **kw)
    with _ctx(blocks):
        ours, go = _run(L.long_short_loss, data, torch.float32, backend="triton", deterministic=deterministic,
                        chunk_bytes=8 * V * 4, **kw)
    for name in ("loss", "ce", "misalign"):
        torch.testing.assert_close(getattr(ours, name).double(), getattr(truth, name), atol=2e-5, rtol=1e-5)
    for view in ("long", "short"):
        o, t = getattr(ours, view), getattr(truth, view)
        torch.testing.assert_close(o.lse.double(), t.lse, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(o.entropy.double(), t.entropy, atol=2e-5, rtol=1e-5)
        assert torch.equal(o.accuracy, t.accuracy), view
    for name, o, t in zip(("d_hidden_long", "d_hidden_short", "dw", "db"), go, gt):
        torch.testing.assert_close(o.double(), t, atol=3e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
def test_bf16_cce_rule(deterministic):
    data = tuple(t.to(torch.bfloat16).float() if t.is_floating_point() else t for t in _data(1))
    kw = dict(divergence="kl", softcap=5.0, temperature=1.5)
    truth, gt = _run(R.long_short_loss, data, torch.float64, **kw)
    same, gs = _run(R.long_short_loss, data, torch.bfloat16, **kw)
    with _ctx("split3"):
        ours, go = _run(L.long_short_loss, data, torch.bfloat16, backend="triton", deterministic=deterministic, **kw)
    for view in ("long", "short"):
        for name in ("lse", "entropy"):
            assert_close_rule(getattr(getattr(ours, view), name), getattr(getattr(same, view), name),
                              getattr(getattr(truth, view), name), atol=2e-3, rtol=2e-3, name=f"{view}.{name}")
    for name, o, s, t in zip(("d_hidden_long", "d_hidden_short", "dw", "db"), go, gs, gt):
        assert_close_rule(o, s, t, atol=2e-4 + 2.0**-8 * t.abs().max().item(), rtol=2e-3, name=name)


def test_argmax_ties_lowest_index_across_splits():
    """Exact ties between rows of W in different V tiles and splits: the lowest index, both views (paired rows
    from phase 1, unpaired rows from the CE launch)."""
    hl, hs, w, b, yl, ys = _data(2)
    w = w.clone()
    big = torch.cat([hl, hs]).reshape(-1, H).mean(0) * 10.0
    for v in (290, 150, 151, 17):
        w[v] = big
    zl, zs = hl @ w.T, hs @ w.T
    for blocks in BLOCKS:
        with _ctx(blocks):
            out = L.long_short_loss(hl, hs, w, yl, ys, l_extra=LX, backend="triton", return_accuracy=True)
            am = pair.pair_forward_ext(hl[:, LX:].reshape(-1, H), hs[:, : T - LX].reshape(-1, H), w, None,
                                       yl[:, LX:].reshape(-1), ys[:, : T - LX].reshape(-1),
                                       PairOptions(ce=CEOptions()), argmax=True).argmax
        assert torch.equal(am[:, 0], zl[:, LX:].reshape(-1, V).argmax(-1)), blocks
        assert torch.equal(am[:, 1], zs[:, : T - LX].reshape(-1, V).argmax(-1)), blocks
        assert (am == 17).float().mean() > 0.5  # the tie is really exercised
        assert torch.equal(out.long.accuracy, (zl.argmax(-1) == yl) & (yl != IGN))
        assert torch.equal(out.short.accuracy, (zs.argmax(-1) == ys) & (ys != IGN))


def test_pair_forward_ext_matches_pair_forward():
    """The extras change nothing else; entropy-only / argmax-only launches agree with the combined one."""
    hl, hs, w, b, yl, ys = _data(3)
    xp, xq = hl.reshape(-1, H), hs.reshape(-1, H)
    yp, yq = yl.reshape(-1), ys.reshape(-1)
    opts = PairOptions(divergence="kl_reverse", temperature=1.3, ce=CEOptions(softcap=6.0))
    with _ctx("split3"):
        base = pair.pair_forward(xp, xq, w, b, yp, yq, opts)
        both = pair.pair_forward_ext(xp, xq, w, b, yp, yq, opts, entropy=True, argmax=True)
        only_h = pair.pair_forward_ext(xp, xq, w, b, yp, yq, opts, entropy=True)
        only_a = pair.pair_forward_ext(xp, xq, w, b, yp, yq, opts, argmax=True)
    for a, c in zip(base, both[:4]):
        assert torch.equal(a, c)
    assert only_h.argmax is None and only_a.entropy is None
    assert torch.equal(only_h.entropy, both.entropy) and torch.equal(only_a.argmax, both.argmax)
    assert both.entropy.shape == (B * T, 2) and both.argmax.dtype == torch.int64
    torch.testing.assert_close(both.stats[:, Stat.LSE_P], torch.logsumexp(R.logits(xp, w, b, 6.0), -1))


def test_entropy_backward_bad_input():
    hl, hs, w, b, yl, ys = _data()
    xp, xq = hl.reshape(-1, H), hs.reshape(-1, H)
    n = xp.shape[0]
    stats = torch.zeros(n, 8)
    one = torch.ones(n)
    dx = torch.zeros(xp.shape)
    with pytest.raises(ValueError, match="coef_entropy and entropy"):
        pair.pair_backward(xp, xq, w, b, None, None, stats, None, None, one, PairOptions(with_ce=False), dx, None,
                           None, None, coef_entropy=torch.ones(n, 2))
    with pytest.raises(ValueError, match=r"coef_entropy must be \[N, 2\]"):
        pair.pair_backward(xp, xq, w, b, None, None, stats, None, None, one, PairOptions(with_ce=False), dx, None,
                           None, None, coef_entropy=one, entropy=one)
