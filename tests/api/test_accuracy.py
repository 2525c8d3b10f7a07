"""Per-token accuracy of linear_cross_entropy and long_short_loss: argmax ties go to the lowest index (as
torch.argmax), and ignored rows are False also when ignore_index is a real token id (0) that the argmax hits."""

import pytest
import torch

import lsa_kernels as L
from lsa_kernels import _ext

from _util import triton_available

PATHS = ["cpu", "cpu-aten", "reference"] + (["triton"] if triton_available() else [])
N, V = 12, 8


def _backend(path):
    return {"cpu-aten": "cpu"}.get(path, path)


def _ce(path, *a, **k):
    with _ext.disable(path == "cpu-aten"):
        return L.linear_cross_entropy(*a, backend=_backend(path), return_accuracy=True, **k)


def _rows(argmax, scale=8.0):
    """Hidden states and a head whose logits are exactly ``scale`` at ``argmax[i]`` and 0 elsewhere (integer
    values: exact in every backend's GEMM)."""
    x = torch.nn.functional.one_hot(argmax, V).float() * scale
    return x, torch.eye(V)


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("path", PATHS)
def test_ce_accuracy_ties_go_to_the_lowest_index(path, softcap, grad):
    """Rows of W 2 and 5 are equal and give every row's maximum: the argmax is 2 (the lower), so target 2 is
    right and target 5 wrong, in every chunk (a small chunk budget: several chunks of rows)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (N, 4), generator=g).float()
    w = torch.randint(-2, 3, (V, 4), generator=g).float()
    w[2] = w[5] = 0.0
    b = torch.zeros(V)
    b[2] = b[5] = 40.0  # the tied maximum (integers: exact ties)
    y = torch.tensor([2, 5] * (N // 2))
    xs = x.clone().requires_grad_(grad)
    kw = dict(linear_bias=b, softcap=softcap)
    if path != "reference":
        kw["chunk_bytes"] = 4 * V * 4 * 4  # a few rows per chunk
    out = _ce(path, xs, w, y, **kw)
    assert torch.equal(out.accuracy, y == 2)
    assert torch.equal(torch.argmax(x @ w.T + b, -1), torch.full((N,), 2))  # torch's rule, on these logits
    if grad:
        out.loss.backward()
        assert xs.grad is not None


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("path", PATHS)
def test_ce_accuracy_with_ignore_index_a_real_token(path, reduction):
    """ignore_index=0: rows whose target is 0 are ignored, so their accuracy is False even where the argmax
    is 0; the other rows are right exactly where the argmax is their target."""
    am = torch.tensor([0, 0, 3, 3, 5, 0, 7, 1, 0, 2, 6, 4])
    y = torch.tensor([0, 0, 3, 4, 5, 3, 7, 2, 0, 2, 0, 4])  # rows 0, 1, 8, 10 ignored (0, 1, 8 with argmax 0)
    x, w = _rows(am)
    out = _ce(path, x, w, y, ignore_index=0, reduction=reduction)
    want = (am == y) & (y != 0)
    assert want.sum() == 5 and ((am == y) & (y == 0)).sum() == 3  # the test needs both kinds of rows
    assert torch.equal(out.accuracy, want)
    ref = L.reference.linear_cross_entropy(x, w, y, ignore_index=0, reduction=reduction)
    torch.testing.assert_close(out.loss, ref)  # and the loss skips those rows


@pytest.mark.parametrize("path", PATHS)
def test_long_short_accuracy_with_ignore_index_a_real_token(path):
    """long_short_loss with ignore_index=0: both views' ignored rows are False although the argmax is 0 there."""
    B, T = 2, 6
    am_l = torch.tensor([[0, 1, 0, 3, 4, 0], [2, 0, 0, 5, 6, 7]])
    am_s = torch.tensor([[0, 0, 3, 4, 0, 1], [0, 5, 6, 7, 0, 0]])
    yl = torch.tensor([[0, 1, 0, 3, 2, 0], [2, 0, 1, 5, 6, 7]])
    ys = torch.tensor([[0, 0, 3, 5, 0, 1], [0, 5, 6, 7, 0, 3]])
    (hl, w), (hs, _) = _rows(am_l), _rows(am_s)
    with _ext.disable(path == "cpu-aten"):
        out = L.long_short_loss(hl, hs, w, yl, ys, l_extra=2, ignore_index=0, backend=_backend(path),
                                return_accuracy=True)
    for view, am, y in ((out.long, am_l, yl), (out.short, am_s, ys)):
        assert ((am == y) & (y == 0)).any()
        assert torch.equal(view.accuracy, (am == y) & (y != 0))
