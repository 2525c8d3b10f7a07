"""Numerics at the edges: logits up to ±1e4, probabilities that underflow, empty batches."""

import pytest
import torch

import lsa_kernels as L
from lsa_kernels import reference as R
from lsa_kernels.options import DIVERGENCES

from _util import IGN, backends, grads


def _huge(seed=0, N=13, H=16, V=257, scale=1e4):
    """Logits of magnitude up to ~scale: one direction of x aligned with W rows."""
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.functional.normalize(torch.randn(V, H, generator=g, dtype=torch.float64), dim=1)
    x = torch.nn.functional.normalize(torch.randn(N, H, generator=g, dtype=torch.float64), dim=1) * scale
    return x, w


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_ce_logits_1e4(backend, softcap):
    x, w = _huge()
    y = torch.randint(0, w.shape[0], (x.shape[0],))
    y[0] = IGN
    xs, ws = x.float().requires_grad_(True), w.float().requires_grad_(True)
    ours = L.linear_cross_entropy(xs, ws, y, backend=backend, softcap=softcap, z_loss=1e-6, label_smoothing=0.1)
    go = grads(ours, [xs, ws])
    xt, wt = x.float().double().requires_grad_(True), w.float().double().requires_grad_(True)
    ref = R.linear_cross_entropy(xt, wt, y, softcap=softcap, z_loss=1e-6, label_smoothing=0.1)
    gt = grads(ref, [xt, wt])
    assert torch.isfinite(ours) and all(torch.isfinite(g).all() for g in go)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-2)
    for a, b in zip(go, gt):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-3 * b.abs().max().item())


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_divergence_underflowing_probabilities(backend, divergence):
    """Two views whose distributions put mass on different classes: p_v, q_v underflow to 0 for most v
    (log p down to -2e4). No NaN/inf; values and gradients match the fp64 reference."""
    xp, w = _huge(1, scale=2e3)
    xq, _ = _huge(2, scale=2e3)
    a, b = xp.float().requires_grad_(True), xq.float().requires_grad_(True)
    ours = L.linear_divergence(a, b, w.float(), divergence=divergence, reduction="none", backend=backend)
    go = grads(ours.sum(), [a, b])
    at, bt = xp.float().double().requires_grad_(True), xq.float().double().requires_grad_(True)
    ref = R.linear_divergence(at, bt, w.float().double(), divergence=divergence, reduction="none")
    gt = grads(ref.sum(), [at, bt])
    assert torch.isfinite(ours).all() and all(torch.isfinite(g).all() for g in go)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-2)
    for g1, g2 in zip(go, gt):
        torch.testing.assert_close(g1.double(), g2, rtol=1e-3, atol=1e-3 * (1 + g2.abs().max().item()))


@pytest.mark.parametrize("backend", backends(triton=False))
def test_empty_batches(backend):
    w = torch.randn(11, 8, requires_grad=True)
    x = torch.randn(0, 8, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    for red in ("mean", "sum"):
        out = L.linear_cross_entropy(x, w, y, reduction=red, backend=backend)
        assert out.item() == 0.0
        gx, gw = grads(out, [x, w])
        assert gx.shape == x.shape and torch.all(gw == 0)
    assert L.linear_cross_entropy(x, w, y, reduction="none", backend=backend).shape == (0,)
    d = L.linear_divergence(x, x.detach().clone(), w, backend=backend)
    assert d.item() == 0.0
    hl = torch.randn(0, 5, 8)
    out = L.long_short_loss(hl, hl.clone(), w, torch.zeros(0, 5, dtype=torch.long),
                            torch.zeros(0, 5, dtype=torch.long), l_extra=2, backend=backend)
    assert out.loss.item() == 0.0
