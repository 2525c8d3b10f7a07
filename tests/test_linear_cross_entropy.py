"""linear_cross_entropy: every backend vs the reference (fp64 truth), odd shapes, every option."""

import pytest
import torch
import torch.nn.functional as F

import lsa_kernels as L
from lsa_kernels import reference as R

from _util import IGN, assert_close_rule, backends, grads, leaf, targets

OPTION_SETS = {
    "plain": dict(),
    "bias": dict(bias=True),
    "smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=1e-3),
    "softcap": dict(softcap=2.5),
    "all": dict(bias=True, label_smoothing=0.2, z_loss=1e-2, softcap=4.0),
}


def _inputs(N, H, V, dtype, bias, scale=1.0, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(N, H, generator=g) * scale
    w = torch.randn(V, H, generator=g) / H**0.5
    b = torch.randn(V, generator=g) * 0.1 if bias else None
    y = targets((N,), V, gen=g)
    return x, w, b, y


def _run(fn, x, w, b, y, dtype, **kw):
    xs, ws = leaf(x, dtype), leaf(w, dtype)
    bs = leaf(b, dtype) if b is not None else None
    out = fn(xs, ws, y, linear_bias=bs, **kw)
    ins = [xs, ws] + ([bs] if bs is not None else [])
    gs = grads(out.double().sum(), ins)
    return out, gs


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("opt", list(OPTION_SETS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(backend, opt, reduction, dtype):
    if backend == "triton" and reduction == "sum" and opt not in ("plain", "all"):
        pytest.skip("interpreter time: sum is covered by plain/all")
    kw = dict(OPTION_SETS[opt])
    bias = kw.pop("bias", False)
    x, w, b, y = _inputs(37, 61, 1003, dtype, bias)
    x, w, b = (None if t is None else t.to(dtype).float() for t in (x, w, b))  # truth sees the rounded inputs
    kw["reduction"] = reduction
    truth, gt = _run(R.linear_cross_entropy, x, w, b, y, torch.float64, **kw)
    same, gs = _run(R.linear_cross_entropy, x, w, b, y, dtype, **kw)
    ours, go = _run(L.linear_cross_entropy, x, w, b, y, dtype, backend=backend, **kw)
    assert ours.dtype == dtype and ours.shape == truth.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    assert_close_rule(ours, same, truth, atol=tol, rtol=tol, name="loss")
    for name, o, s, t in zip(["dx", "dw", "db"], go, gs, gt):
        assert_close_rule(o, s, t, atol=tol * 0.1, rtol=tol, name=name)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(backend, reduction):
    x, w, b, _ = _inputs(9, 16, 33, torch.float32, True)
    y = torch.full((9,), IGN)
    xs, ws, bs = leaf(x), leaf(w), leaf(b)
    out = L.linear_cross_entropy(xs, ws, y, linear_bias=bs, reduction=reduction, backend=backend, label_smoothing=0.1)
    assert torch.all(out == 0) and torch.isfinite(out).all()
    for g in grads(out.sum(), [xs, ws, bs]):
        assert torch.all(g == 0)


@pytest.mark.parametrize("backend", backends(triton=False))
def test_leading_dims_noncontiguous_and_chunks(backend):
    """3-D input, non-contiguous tensors, and chunking that leaves a ragged last chunk."""
    g = torch.Generator().manual_seed(1)
    xt = torch.randn(3, 61, 7, generator=g).transpose(1, 2)  # [3, 7, 61] non-contiguous
    wt = (torch.randn(61, 1003, generator=g) / 8).t()  # [1003, 61] non-contiguous
    y = targets((3, 7), 1003, gen=g)
    assert not xt.is_contiguous() and not wt.is_contiguous()
    for chunk_bytes in (None, 4 * 1003 * 4 * 5):  # default and a 5-row chunk (21 rows → ragged)
        for red in ("mean", "none"):
            ours = L.linear_cross_entropy(xt, wt, y, reduction=red, backend=backend, chunk_bytes=chunk_bytes)
            ref = R.linear_cross_entropy(xt.double(), wt.double(), y, reduction=red)
            torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)


def test_gradcheck_cpu_float64():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, IGN, 10, 7, 2])
    for red in ("mean", "none"):
        fn = lambda x, w, b: L.linear_cross_entropy(  # noqa: E731
            x, w, y, linear_bias=b, reduction=red, label_smoothing=0.1, z_loss=0.01, softcap=3.0, backend="cpu"
        )
        assert torch.autograd.gradcheck(fn, (x, w, b))


def test_matches_torch_linear_cross_entropy():
    """Extra oracle: torch 2.13's own F.linear_cross_entropy (same argument names)."""
    x, w, b, y = _inputs(37, 61, 1003, torch.float32, True)
    for kw in (dict(), dict(label_smoothing=0.1, reduction="sum"), dict(reduction="none")):
        ours = L.linear_cross_entropy(x, w, y, linear_bias=b, backend="cpu", **kw)
        theirs = F.linear_cross_entropy(x, w, y, linear_bias=b, ignore_index=IGN, **kw)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_module_wrapper():
    x, w, b, y = _inputs(10, 8, 17, torch.float32, True)
    mod = L.LinearCrossEntropyLoss(label_smoothing=0.1)
    assert "label_smoothing=0.1" in repr(mod)
    torch.testing.assert_close(mod(x, w, y, b), R.linear_cross_entropy(x, w, y, linear_bias=b, label_smoothing=0.1))


def test_bf16_true_class_gradient_confident():
    """Liger's regression: when softmax(z_y) -> 1 the true-class gradient (p_y - 1) must not vanish in bf16."""
    H, V = 32, 257
    g = torch.Generator().manual_seed(3)
    w = torch.randn(V, H, generator=g)
    y = torch.randint(0, V, (16,), generator=g)
    x = (w[y] * 3.0).bfloat16().float()  # logits strongly favour the target: p_y close to 1
    w = w.bfloat16().float()
    xs64 = leaf(x, torch.float64)
    (gt,) = grads(R.linear_cross_entropy(xs64, w.double(), y), [xs64])
    xsb = leaf(x, torch.bfloat16)
    (gs,) = grads(R.linear_cross_entropy(xsb, w.bfloat16(), y).float(), [xsb])
    xo = leaf(x, torch.bfloat16)
    (go,) = grads(L.linear_cross_entropy(xo, w.bfloat16(), y, backend="cpu").float(), [xo])
    err_ours = (go.double() - gt).abs().max()
    err_torch = (gs.double() - gt).abs().max()
    assert err_ours <= 4 * err_torch + 1e-6
