"""Property-based tests (hypothesis): random shapes — 1 row, V=1, H=1 included — options, dtypes and
masks, every public op against the reference.

CI runs the "ci" profile (a few dozen examples per test); LSA_HYPOTHESIS_PROFILE=nightly runs 500+.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lsa_kernels as L
from lsa_kernels import reference as R
from lsa_kernels.options import DIVERGENCES

from _util import IGN, assert_close_rule, backends

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, database=None,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("nightly", max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("LSA_HYPOTHESIS_PROFILE", "ci"))

BACKENDS = backends(triton=os.environ.get("LSA_HYPOTHESIS_TRITON") == "1")

dims = st.fixed_dictionaries(
    {"N": st.integers(1, 19), "H": st.integers(1, 24), "V": st.integers(1, 70), "seed": st.integers(0, 2**16)}
)
scales = st.sampled_from([0.1, 1.0, 4.0])
softcaps = st.one_of(st.none(), st.floats(0.5, 30.0))


def _tensors(d, scale, dtype):
    g = torch.Generator().manual_seed(d["seed"])
    x = (torch.randn(d["N"], d["H"], generator=g) * scale).to(dtype)
    w = (torch.randn(d["V"], d["H"], generator=g) * scale).to(dtype)
    b = (torch.randn(d["V"], generator=g) * scale).to(dtype)
    y = torch.randint(0, d["V"], (d["N"],), generator=g)
    y[torch.rand(d["N"], generator=g) < 0.3] = IGN
    return x, w, b, y, g


def _compare(ours, truth, tol, same=None, extra=0.0):
    """Within ``tol`` (relative to the largest truth value) of the fp64 truth — or, where the fp32 maths of
    torch's own reference on the same inputs is further off (huge logits), CCE's rule: no worse than it."""
    ours, truth = ours.double(), truth.double()
    assert torch.isfinite(ours).all()
    slack = tol * (1 + truth.abs().max().item()) + extra
    if same is None:
        torch.testing.assert_close(ours, truth, rtol=tol, atol=slack)
    else:
        assert_close_rule(ours, same, truth, atol=slack, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@given(d=dims, scale=scales, softcap=softcaps, bias=st.booleans(), eps=st.sampled_from([0.0, 0.1]),
       zl=st.sampled_from([0.0, 1e-3]), reduction=st.sampled_from(["mean", "sum", "none"]),
       half=st.booleans())
def test_ce_property(backend, d, scale, softcap, bias, eps, zl, reduction, half):
    dtype = torch.bfloat16 if half else torch.float32
    x, w, b, y, _ = _tensors(d, scale, dtype)
    b = b if bias else None
    kw = dict(linear_bias=b, reduction=reduction, label_smoothing=eps, z_loss=zl, softcap=softcap)
    xs = x.clone().requires_grad_(True)
    ours = L.linear_cross_entropy(xs, w, y, backend=backend, **kw)
    xt = x.double().requires_grad_(True)
    truth = R.linear_cross_entropy(xt, w.double(), y, **{**kw, "linear_bias": None if b is None else b.double()})
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    _compare(ours, truth, tol)
    (g_ours,) = torch.autograd.grad(ours.double().sum(), xs)
    (g_truth,) = torch.autograd.grad(truth.sum(), xt)
    _compare(g_ours, g_truth, tol)


@pytest.mark.parametrize("backend", BACKENDS)
@given(d=dims, scale=scales, softcap=softcaps, div=st.sampled_from(DIVERGENCES),
       tau=st.sampled_from([1.0, 0.5, 2.0]), detach=st.sampled_from([None, "p", "q"]),
       reduction=st.sampled_from(["mean", "sum", "none"]), masked=st.booleans())
def test_divergence_property(backend, d, scale, softcap, div, tau, detach, reduction, masked):
    x, w, b, _, g = _tensors(d, scale, torch.float32)
    xq = x + torch.randn(x.shape, generator=g) * scale
    mask = (torch.rand(d["N"], generator=g) < 0.7) if masked else None
    kw = dict(divergence=div, temperature=tau, detach=detach, reduction=reduction, mask=mask, softcap=softcap)
    xp_o, xq_o = x.clone().requires_grad_(True), xq.clone().requires_grad_(True)
    ours = L.linear_divergence(xp_o, xq_o, w, backend=backend, **kw)
    xp_t, xq_t = x.double().requires_grad_(True), xq.double().requires_grad_(True)
    truth = R.linear_divergence(xp_t, xq_t, w.double(), **kw)
    xp_s, xq_s = x.clone().requires_grad_(True), xq.clone().requires_grad_(True)
    same = R.linear_divergence(xp_s, xq_s, w, **kw)
    _compare(ours, truth, 2e-4, same)
    go = torch.autograd.grad(ours.double().sum(), [xp_o, xq_o], allow_unused=True)
    gt = torch.autograd.grad(truth.sum(), [xp_t, xq_t], allow_unused=True)
    gs = torch.autograd.grad(same.double().sum(), [xp_s, xq_s], allow_unused=True)
    # the statistics form (stats.py) stores E_p[b] as an fp32 number: the gradient's absolute error is
    # bounded by a few ulps of max|z/τ| times max|W| (e.g. |z/τ| = 175: 2.5e-4; realistic |z| < 30: < 1e-5)
    zmax = max((x @ w.T).abs().max().item(), (xq @ w.T).abs().max().item()) / tau
    bound = 8 * torch.finfo(torch.float32).eps * zmax * w.abs().max().item()
    for a, t, sm in zip(go, gt, gs):
        if t is None:
            assert a is None or torch.all(a == 0)
        else:
            _compare(torch.zeros_like(t) if a is None else a, t, 2e-4, torch.zeros_like(t) if sm is None else sm,
                     extra=bound)


@pytest.mark.parametrize("backend", BACKENDS)
@given(B=st.integers(1, 3), T=st.integers(2, 9), H=st.integers(1, 16), V=st.integers(1, 50),
       seed=st.integers(0, 2**16), div=st.sampled_from(DIVERGENCES), positions=st.sampled_from(["overlap", "last"]),
       detach=st.sampled_from([None, "long", "short"]), data=st.data())
def test_long_short_property(backend, B, T, H, V, seed, div, positions, detach, data):
    l_extra = data.draw(st.integers(1, T - 1))
    g = torch.Generator().manual_seed(seed)
    hl, hs = torch.randn(2, B, T, H, generator=g).unbind(0)
    w = torch.randn(V, H, generator=g)
    yl, ys = torch.randint(0, V, (2, B, T), generator=g).unbind(0)
    yl = torch.where(torch.rand(B, T, generator=g) < 0.2, torch.full_like(yl, IGN), yl)
    kw = dict(l_extra=l_extra, alpha=0.3, divergence=div, positions=positions, detach=detach)
    ins_o = [t.clone().requires_grad_(True) for t in (hl, hs, w)]
    ours = L.long_short_loss(*ins_o, yl, ys, backend=backend, **kw)
    ins_t = [t.double().requires_grad_(True) for t in (hl, hs, w)]
    truth = R.long_short_loss(*ins_t, yl, ys, **kw)
    for a, t in zip(ours, truth):
        _compare(a, t, 2e-4)
    go = torch.autograd.grad(ours.loss.double(), ins_o)
    gt = torch.autograd.grad(truth.loss, ins_t)
    for a, t in zip(go, gt):
        _compare(a, t, 2e-4)
