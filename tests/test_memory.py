"""The cpu backend never holds more than its chunk budget of logits.

A TorchDispatchMode sees every tensor every ATen op returns; it keeps a live count of the bytes of
storages shaped like logits (2-D, last dim V, more than one row) and records the peak. W and dW are
[V, H] with H != V, so they do not count; a materialised [N, V] logits tensor would.
"""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import lsa_kernels as L
from lsa_kernels import reference as R

from _util import leaf, targets


class LiveLogitBytes(TorchDispatchMode):
    def __init__(self, V: int):
        super().__init__()
        self.V = V
        self.refs = {}  # storage ptr -> [tensor refcount, nbytes]
        self.cur = 0
        self.peak = 0

    def _release(self, key):
        entry = self.refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.cur -= entry[1]
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[-1] == self.V and t.shape[0] > 1
                    and t.stride(-1) == 1):  # [rows, V] row-major; Wᵀ views are not logits
                st = t.untyped_storage()
                key = st.data_ptr()
                if key not in self.refs:
                    self.refs[key] = [0, st.nbytes()]
                    self.cur += st.nbytes()
                    self.peak = max(self.peak, self.cur)
                self.refs[key][0] += 1
                weakref.finalize(t, self._release, key)
        return out


N, H, V = 1024, 48, 3001  # full fp32 logits: 12.3 MB per view
BUDGET = 1 << 20  # 1 MiB: the full logits are > 10x larger


def _measure(fn):
    mode = LiveLogitBytes(V)
    with mode:
        fn()
    return mode.peak


def test_tracker_sees_materialised_logits():
    x, w = torch.randn(N, H), torch.randn(V, H)
    y = targets((N,), V)
    peak = _measure(lambda: R.linear_cross_entropy(x, w, y))
    assert peak >= N * V * 4


@pytest.mark.parametrize(
    "reduction,opts", [("mean", dict()), ("none", dict(softcap=3.0, label_smoothing=0.1, z_loss=1e-3))],
    ids=["mean-plain", "none-all"],
)
def test_ce_within_chunk_budget(reduction, opts):
    assert N * V * 4 >= 10 * BUDGET
    x, w = leaf(torch.randn(N, H)), leaf(torch.randn(V, H))
    y = targets((N,), V)

    def run():
        out = L.linear_cross_entropy(x, w, y, reduction=reduction, backend="cpu", chunk_bytes=BUDGET, **opts)
        out.sum().backward()

    peak = _measure(run)
    assert 0 < peak <= BUDGET, f"peak live logits {peak} B > budget {BUDGET} B"


@pytest.mark.parametrize(
    "divergence,temperature,softcap", [("sce", 1.0, None), ("sym_kl", 0.7, 3.0), ("js", 0.7, 3.0)]
)
def test_long_short_within_chunk_budget(divergence, temperature, softcap):
    B, T = 2, N // 2
    assert 2 * B * T * V * 4 >= 10 * BUDGET
    hl, hs = leaf(torch.randn(B, T, H)), leaf(torch.randn(B, T, H))
    w = leaf(torch.randn(V, H))
    yl, ys = targets((B, T), V), targets((B, T), V)

    def run():
        out = L.long_short_loss(hl, hs, w, yl, ys, l_extra=T // 3, divergence=divergence, temperature=temperature,
                                softcap=softcap, label_smoothing=0.1, backend="cpu", chunk_bytes=BUDGET)
        (out.loss + out.ce).backward()  # both the folded and the recompute paths run

    peak = _measure(run)
    assert 0 < peak <= BUDGET, f"peak live logits {peak} B > budget {BUDGET} B"
