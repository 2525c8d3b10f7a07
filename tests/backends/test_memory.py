"""The cpu backend never holds more than its chunk budget of logits, on both of its paths.

A TorchDispatchMode sees every tensor every ATen op returns; it keeps a live count of the bytes of
storages shaped like logits (2-D, last dim V, more than one row) and records the peak. W and dW are
[V, H] with H != V, so they do not count; a materialised [N, V] logits tensor would.

Each test runs on the compiled path (``lsa_kernels._C``) and on the ATen fallback (what ``LSA_NO_EXT=1``
or a failed build gives), and checks the peak against the budget AND against the path's own claim in
lsa_kernels/backends/cpu: at most ``K`` fp32 ``[R, V]`` buffers alive at once (aten.K_CE = 3, aten.K_PAIR = 5;
ext: 1 and 1), with ``R`` the rows per chunk (all views together) that cpu.chunk_rows gives for that K.
"""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import lsa_kernels as L
from lsa_kernels import _ext
from lsa_kernels.backends import cpu
from lsa_kernels import reference as R

from _util import leaf, targets

pytestmark = pytest.mark.memory


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
# the ATen path makes ~4.5x more chunks (K = 9 vs 2) and the tracker pays per op: fewer rows there, whose
# logits still exceed the budget 4x (one materialised [rows, V] tensor would break it)
N_ATEN = 384


@pytest.fixture(params=["ext", "aten"])
def path(request):
    if request.param == "ext" and not _ext.built():
        pytest.skip("lsa_kernels._C not built: the ATen path is the only one")
    with _ext.disable(request.param == "aten"):
        assert cpu.use_ext(torch.zeros(1)) == (request.param == "ext")
        yield request.param


def _claimed_bytes(pair: bool) -> int:
    """K · R · V · 4 for the path in force: the most bytes of [R, V] buffers the cpu backend says a chunk holds."""
    x = torch.zeros(1)
    out = cpu.k_buffers(False, x) * cpu.chunk_rows(V, cpu.k_buffers(False, x), BUDGET) * V * 4
    if pair:
        k = cpu.k_buffers(True, x)
        out = max(out, k * cpu.chunk_rows(V, k, BUDGET) * V * 4)
    return out


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
    "reduction,opts", [("mean", dict()), ("sum", dict(softcap=3.0)),
                       ("none", dict(softcap=3.0, label_smoothing=0.1, z_loss=1e-3))],
    ids=["mean-plain", "sum-softcap", "none-all"],  # folded without / with a softcap, and the recompute path
)
def test_ce_within_chunk_budget(path, reduction, opts):
    n = N if path == "ext" else N_ATEN
    assert n * V * 4 >= 4 * BUDGET
    x, w = leaf(torch.randn(n, H)), leaf(torch.randn(V, H))
    y = targets((n,), V)

    def run():
        out = L.linear_cross_entropy(x, w, y, reduction=reduction, backend="cpu", chunk_bytes=BUDGET, **opts)
        out.sum().backward()

    peak = _measure(run)
    assert 0 < peak <= BUDGET, f"peak live logits {peak} B > budget {BUDGET} B"
    assert peak <= _claimed_bytes(pair=False), f"{path}: peak {peak} B > K_CE chunks {_claimed_bytes(False)} B"


@pytest.mark.parametrize(
    "divergence,temperature,softcap", [("sce", 1.0, None), ("sym_kl", 0.7, 3.0), ("js", 0.7, 3.0)]
)
def test_long_short_within_chunk_budget(path, divergence, temperature, softcap):
    B, T = 2, (N if path == "ext" else N_ATEN) // 2
    assert B * T * V * 4 >= 4 * BUDGET
    hl, hs = leaf(torch.randn(B, T, H)), leaf(torch.randn(B, T, H))
    w = leaf(torch.randn(V, H))
    yl, ys = targets((B, T), V), targets((B, T), V)

    def run():
        out = L.long_short_loss(hl, hs, w, yl, ys, l_extra=T // 3, divergence=divergence, temperature=temperature,
                                softcap=softcap, label_smoothing=0.1, backend="cpu", chunk_bytes=BUDGET)
        (out.loss + out.ce).backward()  # both the folded and the recompute paths run

    peak = _measure(run)
    assert 0 < peak <= BUDGET, f"peak live logits {peak} B > budget {BUDGET} B"
    assert peak <= _claimed_bytes(pair=True), f"{path}: peak {peak} B > K chunks {_claimed_bytes(True)} B"


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_long_short_per_view_extras_within_chunk_budget(path, softcap):
    """return_entropy / return_accuracy (docs/maths.md §4): the extras' buffers and, in backward, the entropy
    gradient's are counted in the rows per chunk (aten.K_VIEW_EXTRAS_FWD / _BWD, K_PAIR_EXTRA)."""
    B, T = 2, (N if path == "ext" else N_ATEN) // 2
    hl, hs = leaf(torch.randn(B, T, H)), leaf(torch.randn(B, T, H))
    w = leaf(torch.randn(V, H))
    yl, ys = targets((B, T), V), targets((B, T), V)
    g = torch.randn(B, T)

    def run():
        out = L.long_short_loss(hl, hs, w, yl, ys, l_extra=T // 3, divergence="sym_kl", softcap=softcap,
                                return_entropy=True, return_accuracy=True, backend="cpu", chunk_bytes=BUDGET)
        (out.loss + (out.long.entropy * g).sum() + (out.short.entropy * g).sum()).backward()

    peak = _measure(run)
    assert 0 < peak <= BUDGET, f"peak live logits {peak} B > budget {BUDGET} B"


@pytest.mark.parametrize(
    "case", ["prob-mean", "prob-cw-ls-softcap-sum", "prob-bf16-none", "cw-ls-softcap-mean"],
)
def test_dense_targets_within_chunk_budget(case):
    """Probability targets and class-weighted smoothing (docs/maths.md §11: ext.dense_chunk or aten.dense_chunk):
    besides the user's t, at most the path's k_dense(...) fp32 [R, V] buffers alive, within the budget."""
    from lsa_kernels.backends.contract import DenseTarget
    from lsa_kernels.options import CEOptions

    n = N_ATEN
    g = torch.Generator().manual_seed(0)
    x, w = leaf(torch.randn(n, H, generator=g)), leaf(torch.randn(V, H, generator=g))
    cw = torch.rand(V, generator=g)
    t = torch.softmax(torch.randn(n, V, generator=g), -1)
    kw, red, target = {}, "mean", t
    if case == "prob-cw-ls-softcap-sum":
        kw, red = dict(weight=cw, label_smoothing=0.1, softcap=3.0), "sum"
    elif case == "prob-bf16-none":
        target, red = t.to(torch.bfloat16), "none"
    elif case == "cw-ls-softcap-mean":
        target, kw = targets((n,), V, gen=g), dict(weight=cw, label_smoothing=0.1, softcap=3.0, z_loss=1e-3)

    mode = LiveLogitBytes(V)
    with mode:
        out = L.linear_cross_entropy(x, w, target, reduction=red, backend="cpu", chunk_bytes=BUDGET, **kw)
        out.sum().backward()
    # t's storage is seen through its row slices: the user's tensor, not a buffer of ours
    peak = mode.peak - (0 if not target.is_floating_point() else target.untyped_storage().nbytes())
    T = DenseTarget(target if target.is_floating_point() else None, cw if "weight" in kw else None,
                    beta=0.1 if "label_smoothing" in kw else 0.0)
    # the forward (none) or fused pass and the backward each choose their rows from their own k
    k_dense = cpu.impl(x).k_dense  # the compiled op's (ext) or the ATen chunk function's
    ks = [k_dense(T, torch.float32, CEOptions(softcap=kw.get("softcap")), inplace) for inplace in (False, True)]
    claimed = max(k * cpu.chunk_rows(V, k, BUDGET) * V * 4 for k in ks)
    assert 0 < peak <= BUDGET, f"{case}: peak live logits {peak} B > budget {BUDGET} B"
    assert peak <= claimed, f"{case}: peak {peak} B > k_dense = {ks} chunks ({claimed} B)"
