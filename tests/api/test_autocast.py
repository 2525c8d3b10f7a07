"""Autocast is honoured like ``F.linear`` by the three public ops, on every backend.

Under ``torch.autocast("cpu", torch.bfloat16)`` an op given fp32 input / weight / bias computes what it
computes outside autocast for the same tensors cast to bf16 first (statistics and accumulation fp32 inside),
but returns the loss in float32, as torch's loss functions do under autocast, rounded once from the fp32
accumulation: rounded to bf16 it is exactly the bf16 call's loss, and (fused backends) it is not itself a bf16
value. The gradients reaching the fp32 leaves must be those of the bf16 copies.
Backends: cpu, triton (the interpreter, TRITON_INTERPRET=1 from conftest) and reference. float64 is not
cast (autocast leaves fp64 alone), and a backward run inside the autocast region gives the same
gradients as one run outside it (the autograd Functions switch autocast off; today's backends use only
in-place / out= GEMMs that autocast leaves alone, so that test guards future backends rather than
catching a present bug).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lsa_kernels as L

N, H, V = 10, 16, 37
B, T, LX = 2, 6, 2
BACKENDS = ["cpu", "triton", "reference"]


def _leaves(*shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*s, generator=g, dtype=dtype) * (0.5 if len(s) == 2 and s[0] == V else 1.0))
            .requires_grad_() for s in shapes]


def _grads(out, leaves):
    return torch.autograd.grad(out.float().sum(), leaves)


def _call(op, tensors, backend, kind):
    if kind == "ce":
        x, w, b, y = tensors
        return op(x, w, y, linear_bias=b, backend=backend, label_smoothing=0.1, softcap=20.0)
    if kind == "div":
        xp, xq, w, b = tensors
        return op(xp, xq, w, linear_bias=b, backend=backend, divergence="sym_kl", temperature=1.5)
    hl, hs, w, b, yl, ys = tensors
    return op(hl, hs, w, yl, ys, l_extra=LX, linear_bias=b, backend=backend, alpha=0.5).loss


def _case(kind):
    g = torch.Generator().manual_seed(3)
    if kind == "ce":
        x, w, b = _leaves((N, H), (V, H), (V,))
        y = torch.randint(0, V, (N,), generator=g)
        y[2] = -100
        return L.linear_cross_entropy, [x, w, b], [y]
    if kind == "div":
        xp, xq, w, b = _leaves((N, H), (N, H), (V, H), (V,))
        return L.linear_divergence, [xp, xq, w, b], []
    hl, hs, w, b = _leaves((B, T, H), (B, T, H), (V, H), (V,))
    yl, ys = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
    return L.long_short_loss, [hl, hs, w, b], [yl, ys]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["ce", "div", "ls"])
def test_autocast_equals_inputs_cast_first(kind, backend):
    op, leaves, rest = _case(kind)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _call(op, leaves + rest, backend, kind)
    g_got = _grads(got, leaves)
    want = _call(op, [t.to(torch.bfloat16) for t in leaves] + rest, backend, kind)
    g_want = _grads(want, leaves)
    assert got.dtype == torch.float32 and want.dtype == torch.bfloat16
    assert torch.equal(got.to(torch.bfloat16), want), (got, want)
    if backend != "reference":  # not rounded to bf16 on the way (the reference rounds first, then casts)
        rows = _rows(op, leaves + rest, backend, kind)
        assert rows.dtype == torch.float32 and not torch.equal(rows.to(torch.bfloat16).float(), rows)
    for a, b in zip(g_got, g_want):
        assert a.dtype == torch.float32
        assert torch.equal(a, b)
    # and autocast made a difference: the fp32 loss is not the bf16 one
    fp32 = _call(op, leaves + rest, backend, kind)
    assert fp32.dtype == torch.float32 and not torch.equal(fp32.to(torch.bfloat16).float(), fp32)


def _rows(op, tensors, backend, kind):
    """Per-row values (reduction "none"; long-short: ce, misalign and the per-view lse / entropy) under bf16
    autocast: many values, so "none of them was rounded to bf16" is a real check."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if kind == "ce":
            x, w, b, y = tensors
            return op(x, w, y, linear_bias=b, backend=backend, reduction="none").detach()
        if kind == "div":
            xp, xq, w, b = tensors
            return op(xp, xq, w, linear_bias=b, backend=backend, reduction="none").detach()
        hl, hs, w, b, yl, ys = tensors
        out = op(hl, hs, w, yl, ys, l_extra=LX, linear_bias=b, backend=backend, return_lse=True,
                 return_entropy=True)
        assert all(t.dtype == torch.float32 for t in (out.loss, out.ce, out.misalign, out.long.lse,
                                                         out.short.entropy))
        return torch.cat([out.long.lse.flatten(), out.short.entropy.flatten(), out.ce.reshape(1)]).detach()


def _ls_all_outputs(leaves, rest, backend):
    hl, hs, w, b = leaves
    yl, ys = rest
    out = L.long_short_loss(hl, hs, w, yl, ys, l_extra=LX, linear_bias=b, backend=backend, alpha=0.5)
    return out.loss + out.ce + 2 * out.misalign  # gradients into ce / misalign: the backward kernels run


def _ce_rows(leaves, rest, backend):
    x, w, b = leaves
    return L.linear_cross_entropy(x, w, rest[0], linear_bias=b, backend=backend, reduction="none")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("kind", ["ce", "ls"])
def test_backward_inside_autocast_region(kind, backend):
    """backward inside the autocast block: the Functions' backward runs with autocast off."""
    op, leaves, rest = _case(kind)
    fn = _ce_rows if kind == "ce" else _ls_all_outputs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(leaves, rest, backend)
        inside = _grads(out, leaves)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(leaves, rest, backend)
    outside = _grads(out, leaves)
    want = _grads(fn([t.to(torch.bfloat16) for t in leaves], rest, backend), leaves)
    for a, b, c in zip(inside, outside, want):
        assert torch.equal(a, b)
        assert torch.equal(a, c)


def test_float64_not_cast():
    x, w = _leaves((N, H), (V, H), dtype=torch.float64)
    y = torch.randint(0, V, (N,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = L.linear_cross_entropy(x, w, y, backend="cpu")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, L.linear_cross_entropy(x, w, y, backend="cpu"))


def test_mixed_dtypes_accepted_under_autocast_only():
    """Like F.linear: an fp32 weight with a bf16 input is fine under autocast (both cast), an error outside."""
    x = torch.randn(N, H, dtype=torch.bfloat16)
    w = torch.randn(V, H)
    y = torch.randint(0, V, (N,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = L.linear_cross_entropy(x, w, y, backend="cpu")
        want = F.cross_entropy(F.linear(x, w), y)
    assert out.dtype == want.dtype == torch.float32  # torch's loss under autocast: float32, whatever the input
    with pytest.raises(TypeError, match="linear_weight has dtype"):
        L.linear_cross_entropy(x, w, y, backend="cpu")


def test_autocast_of_other_device_type_ignored():
    """CUDA autocast does not touch CPU tensors (nothing to do on a CPU-only build either)."""
    op, leaves, rest = _case("ce")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_available()):
        out = _call(op, leaves + rest, "cpu", "ce")
    assert out.dtype == torch.float32
