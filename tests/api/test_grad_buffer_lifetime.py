"""The fused ops compute their gradient in the forward (when the backend can) into fp32 buffers: ``dL/dX [N, H]``,
``dL/dW [V, H]`` (and for probability targets ``dL/dT``). Those buffers must die as soon as the loss's own backward
node has run, not live as long as the graph: in a training step the model's whole backward runs below the loss,
and an fp32 ``[V, H]`` plus ``[N, H]`` held through it is memory for nothing (two hidden-state copies for the
long-short pair).

A probe Function sits between the leaf inputs and the op: its backward runs after the op's, and checks, through
weak references to every fp32 ``[N, H]`` / ``[V, H]`` / ``[N, V]`` tensor an ``empty``/``zeros`` created during
the op's forward, that all of them are gone. With ``retain_graph=True`` they must still be there, and a second
backward must give the same gradients.
"""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lsa_kernels as L
from lsa_kernels import backends as B

from _util import backends, leaf, targets

N, H, V = 13, 24, 67


class BufferRefs(TorchDispatchMode):
    """Weak references to the tensors of the given shapes that allocating ops create."""

    ALLOC = {"empty", "zeros", "empty_strided", "zeros_like", "empty_like", "new_empty", "new_zeros"}

    def __init__(self, shapes):
        super().__init__()
        self.shapes = {tuple(s) for s in shapes}
        self.refs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__.rstrip("_")
        if name in self.ALLOC and isinstance(out, torch.Tensor) and out.dtype == torch.float32 \
                and tuple(out.shape) in self.shapes:
            self.refs.append(weakref.ref(out))
        return out


class Probe(torch.autograd.Function):
    """Identity on the op's input; in backward, record how many of ``refs`` are still alive."""

    @staticmethod
    def forward(ctx, x, box):
        ctx.box = box
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.box["alive"].append(sum(r() is not None for r in ctx.box["refs"]))
        return g, None


def _ops(backend):
    g = torch.Generator().manual_seed(0)
    x, xq = torch.randn(N, H, generator=g), torch.randn(N, H, generator=g)
    w, w2 = torch.randn(V, H, generator=g) * 0.3, torch.randn(V, H, generator=g) * 0.3
    y = targets((N,), V, gen=g)
    t = torch.softmax(torch.randn(N, V, generator=g), -1)
    hl, hs = torch.randn(1, N, H, generator=g), torch.randn(1, N, H, generator=g)
    yl, ys = targets((1, N), V, gen=g), targets((1, N), V, gen=g)
    return {
        "ce": ([x, w], lambda a, b: L.linear_cross_entropy(a, b, y, backend=backend)),
        "ce_probability_target": ([x, w], lambda a, b: L.linear_cross_entropy(a, b, t, backend=backend)),
        "divergence": ([x, xq, w], lambda a, c, b: L.linear_divergence(a, c, b, backend=backend)),
        "long_short": ([hl, hs, w], lambda a, c, b: L.long_short_loss(a, c, b, yl, ys, l_extra=3,
                                                                         backend=backend).loss),
        "distillation": ([x, w, xq, w2], lambda a, b, c, d: L.linear_distillation(a, b, c, d, y,
                                                                                  backend=backend).loss),
    }


CASES = ["ce", "ce_probability_target", "divergence", "long_short", "distillation"]
FOLDING = [b for b in backends() if B.get(b).caps.fused_forward_backward]  # the others allocate in backward


def _run(backend, case, retain):
    inputs, op = _ops(backend)[case]
    leaves = [leaf(t) for t in inputs]
    box = {"refs": [], "alive": []}
    # the probe on every input: the first of their backwards runs right after the op's node
    probed = [Probe.apply(t, box) for t in leaves]
    with BufferRefs([(N, H), (V, H), (N, V)]) as mode:
        loss = op(*probed)
    box["refs"] = mode.refs
    loss.backward(retain_graph=retain)
    return box, loss, leaves


@pytest.mark.parametrize("backend", FOLDING)
@pytest.mark.parametrize("case", CASES)
def test_gradient_buffers_freed_after_the_loss_backward(backend, case):
    box, _, _ = _run(backend, case, retain=False)
    assert box["refs"], f"{case}: no fp32 gradient buffer was allocated in the forward (the probe sees nothing)"
    assert max(box["alive"]) == 0, (
        f"{case} ({backend}): {max(box['alive'])} of {len(box['refs'])} fp32 buffers of the forward still alive "
        "while the backward below the loss runs")


@pytest.mark.parametrize("backend", FOLDING)
@pytest.mark.parametrize("case", CASES)
def test_retained_graph_keeps_them_and_repeats_the_gradient(backend, case):
    box, loss, leaves = _run(backend, case, retain=True)
    assert min(box["alive"]) > 0, f"{case}: the buffers died although the graph is retained"
    first = [None if t.grad is None else t.grad.clone() for t in leaves]  # a frozen teacher has none
    assert any(g is not None for g in first)
    for t in leaves:
        t.grad = None
    loss.backward()
    for a, t in zip(first, leaves):
        if a is None:
            assert t.grad is None
        else:
            torch.testing.assert_close(t.grad, a, rtol=0, atol=0)
