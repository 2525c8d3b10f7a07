"""Peers as extra oracles on the same inputs: Cut Cross-Entropy (torch_compile impl on CPU) and
Liger-Kernel's fused linear cross-entropy (Triton, under the interpreter on CPU)."""

import os

import pytest
import torch

import lsa_kernels as L

from _util import IGN, backends, grads, has, leaf, targets

if has("triton"):
    from triton.runtime.errors import InterpreterError
else:  # the Liger tests are skipped then (Liger needs triton)
    InterpreterError = RuntimeError


def _inputs(N=37, H=61, V=1003, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) / H**0.5 * 2
    y = targets((N,), V, gen=g)
    return x, w, y


@pytest.mark.skipif(not has("cut_cross_entropy"), reason="cut-cross-entropy not installed")
@pytest.mark.parametrize("backend", backends(triton=False))
@pytest.mark.parametrize("softcap,reduction", [(None, "mean"), (5.0, "sum")])  # each case compiles: keep few
def test_cut_cross_entropy(backend, softcap, reduction):
    from cut_cross_entropy import linear_cross_entropy as cce

    x, w, y = _inputs()
    xa, wa = leaf(x), leaf(w)
    theirs = cce(xa, wa, y, ignore_index=IGN, softcap=softcap, reduction=reduction, impl="torch_compile")
    g_theirs = grads(theirs, [xa, wa])
    xb, wb = leaf(x), leaf(w)
    ours = L.linear_cross_entropy(xb, wb, y, softcap=softcap, reduction=reduction, backend=backend)
    g_ours = grads(ours, [xb, wb])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not has("liger_kernel"), reason="liger-kernel not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Liger's kernels need the Triton interpreter on CPU")
@pytest.mark.parametrize("backend", backends(triton=False))
@pytest.mark.parametrize(
    "kw",
    [dict(), dict(label_smoothing=0.1), dict(z_loss=1e-3),
     pytest.param(dict(softcap=4.0), marks=pytest.mark.xfail(
         strict=True, raises=InterpreterError,
         reason="liger-kernel 0.8.5's cross-entropy kernel cannot take a float softcap under the Triton "
                "interpreter (AttributeError: 'float' object has no attribute 'to'); strict: an XPASS "
                "(a Liger that runs it) fails here, so the mark is removed when it does")),
     dict(reduction="sum", bias=True)],
    ids=["plain", "smoothing", "z_loss", "softcap", "sum_bias"],
)
def test_liger_fused_linear_cross_entropy(backend, kw):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as liger

    kw = dict(kw)
    x, w, y = _inputs(N=24, H=32, V=300)
    b = torch.randn(300) * 0.1 if kw.pop("bias", False) else None
    xa, wa = leaf(x), leaf(w)
    theirs = liger(xa, wa, y, bias=b, ignore_index=IGN, lse_square_scale=kw.get("z_loss", 0.0),
                   label_smoothing=kw.get("label_smoothing", 0.0), reduction=kw.get("reduction", "mean"),
                   softcap=kw.get("softcap"))
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    g_theirs = grads(theirs, [xa, wa])
    xb, wb = leaf(x), leaf(w)
    ours = L.linear_cross_entropy(xb, wb, y, linear_bias=b, backend=backend, **kw)
    g_ours = grads(ours, [xb, wb])
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-4, atol=1e-5)
    for a, b_ in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b_, rtol=1e-3, atol=1e-5)
