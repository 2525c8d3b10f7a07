"""Per-token outputs of linear_cross_entropy (docs/maths.md §3): lse, entropy (with its gradient) and accuracy,
on every backend against the fp64 reference on materialised logits (fp32, bf16 by CCE's rule), odd shapes."""

import pytest
import torch

import lsa_kernels as L
from lsa_kernels import reference as R
from lsa_kernels.functional import CrossEntropyOutput

from _util import IGN, assert_close_rule, backends, grads, leaf, targets

N, H, V = 29, 41, 307


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g)
    x[5] *= 8  # a confident row: small entropy
    w = torch.randn(V, H, generator=g) / H**0.5 * 2
    b = torch.randn(V, generator=g) * 0.1
    y = targets((N,), V, gen=g)
    return x, w, b, y


def _run(fn, x, w, b, y, dtype, **kw):
    xs, ws, bs = leaf(x, dtype), leaf(w, dtype), leaf(b, dtype)
    out = fn(xs, ws, y, linear_bias=bs, return_lse=True, return_entropy=True, return_accuracy=True, **kw)
    ge = torch.linspace(-1, 1, N).to(torch.bfloat16).double()  # bf16-representable upstream gradient
    scalar = out.loss.double().sum() * 0.75 + (out.entropy.double() * ge).sum()
    return out, grads(scalar, [xs, ws, bs])


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("opts", [{}, dict(softcap=3.0, label_smoothing=0.1, z_loss=1e-2)], ids=["plain", "all"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(backend, opts, reduction, dtype):
    x, w, b, y = _data()
    x, w, b = (t.to(dtype).float() for t in (x, w, b))
    truth, gt = _run(R.linear_cross_entropy, x, w, b, y, torch.float64, reduction=reduction, **opts)
    same, gs = _run(R.linear_cross_entropy, x, w, b, y, dtype, reduction=reduction, **opts)
    ours, go = _run(L.linear_cross_entropy, x, w, b, y, dtype, reduction=reduction, backend=backend, **opts)
    assert isinstance(ours, CrossEntropyOutput)
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    for name in ("loss", "lse", "entropy"):
        o, s, t = getattr(ours, name), getattr(same, name), getattr(truth, name)
        assert o.dtype == dtype and o.shape == t.shape, name
        assert_close_rule(o, s, t, atol=tol, rtol=tol, name=name)
    assert ours.lse.requires_grad is False and ours.accuracy.dtype == torch.bool
    # argmax ties cannot happen with these random logits; ignored rows are False
    assert torch.equal(ours.accuracy, truth.accuracy) and not ours.accuracy[y == IGN].any()
    for name, o, s, t in zip(["dx", "dw", "db"], go, gs, gt):
        extra = 2.0**-8 * t.abs().max().item() if (backend == "triton" and dtype != torch.float32) else 0.0
        assert_close_rule(o, s, t, atol=tol * 0.1 + extra, rtol=tol, name=name)


@pytest.mark.parametrize("backend", backends())
def test_entropy_alone_and_selection(backend):
    """Only the entropy in the graph (an entropy bonus); outputs not asked are None; none asked: a tensor."""
    x, w, b, y = _data()
    res = []
    for fn, kw in ((L.linear_cross_entropy, dict(backend=backend)), (R.linear_cross_entropy, {})):
        xs, ws = leaf(x, torch.float64 if fn is R.linear_cross_entropy else torch.float32), leaf(w, None)
        ws = ws.to(xs.dtype).detach().requires_grad_(True)
        out = fn(xs, ws, y, return_entropy=True, **kw)
        assert out.lse is None and out.accuracy is None and out.entropy is not None
        res.append(grads(out.entropy.double().sum(), [xs, ws]))
    for o, r in zip(*res):
        torch.testing.assert_close(o.double(), r, rtol=1e-4, atol=1e-6)
    plain = L.linear_cross_entropy(x, w, y, backend=backend)
    assert isinstance(plain, torch.Tensor)
    acc = L.linear_cross_entropy(x, w, y, backend=backend, return_accuracy=True)
    assert acc.entropy is None and acc.accuracy.shape == y.shape
    torch.testing.assert_close(acc.loss, plain)


def test_log_prob_is_minus_loss():
    """The per-token log-probability of the target is −loss with reduction='none' (docs/maths.md §3)."""
    x, w, b, y = _data()
    lp = -L.linear_cross_entropy(x, w, y, linear_bias=b, reduction="none", backend="cpu")
    want = torch.log_softmax(x @ w.T + b, -1).gather(1, y.clamp(min=0)[:, None]).squeeze(1)
    torch.testing.assert_close(lp[y != IGN], want[y != IGN], rtol=1e-5, atol=1e-5)


def test_refusals():
    x, w, b, y = _data()
    with pytest.raises(ValueError, match="return_entropy .*probability targets"):
        L.linear_cross_entropy(x, w, torch.softmax(x @ w.T, -1), return_entropy=True)
    with pytest.raises(ValueError, match="return_lse"):
        L.linear_cross_entropy(x, w, y, weight=torch.ones(V), label_smoothing=0.1, return_lse=True)


@pytest.mark.parametrize("extras,expect", [
    (dict(return_lse=True), ["ce_forward_backward"]),
    (dict(return_accuracy=True), ["ce_forward_backward"]),
    (dict(return_entropy=True), ["ce_forward", "ce_backward"]),
])
def test_lse_keeps_the_fused_forward_backward(monkeypatch, extras, expect):
    """return_lse and return_accuracy cost no pass: the cpu backend still folds the gradient into the forward (one
    pass over V per chunk); the entropy runs forward then backward. lse, accuracy and dX equal the truth's."""
    from lsa_kernels.backends.cpu import CpuBackend

    calls = []
    for name in ("ce_forward_backward", "ce_forward", "ce_backward"):
        orig = getattr(CpuBackend, name)
        monkeypatch.setattr(CpuBackend, name, lambda self, *a, _o=orig, _n=name, **k: (calls.append(_n), _o(self, *a, **k))[1])
    x, w, b, y = _data(4)
    z = x.double() @ w.double().T + b.double()
    y[::3] = torch.where(y[::3] == IGN, y[::3], z.argmax(-1)[::3])  # some rows right: accuracy can fail
    xs = x.clone().requires_grad_(True)
    out = L.linear_cross_entropy(xs, w, y, linear_bias=b, backend="cpu", **extras)
    out.loss.backward()
    assert calls == expect, calls
    if "return_lse" in extras:
        torch.testing.assert_close(out.lse.double(), torch.logsumexp(z, -1), rtol=1e-5, atol=1e-5)
    if "return_accuracy" in extras:
        want = (z.argmax(-1) == y) & (y != IGN)
        assert want.any() and not want.all() and torch.equal(out.accuracy, want)
    xd = x.double().requires_grad_(True)
    torch.nn.functional.cross_entropy(xd @ w.double().T + b.double(), y, ignore_index=IGN).backward()
    torch.testing.assert_close(xs.grad.double(), xd.grad, rtol=1e-4, atol=1e-6)
