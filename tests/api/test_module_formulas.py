"""Each core module's formulas against fp64 truth computed here (the tests that decide mutation testing's
scores: tests/mutation/REPORT.md).

Each test names the module it guards and is written against the public API only (lsa_kernels.maths,
.reference, .functional, .pairing, .modules and torch autograd), never against a backend's private
helpers, so that it survives the backends being moved. Truth is computed here, in fp64, from the
formulas of docs/maths.md (§3 CE, §4 pairing, §5 divergences), not from the module under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from lsa_kernels import maths
from lsa_kernels import reference as R

DIVS = ("sce", "kl", "kl_reverse", "sym_kl", "js")


# --------------------------------------------------------------------------------------------- maths.py


def _stats_from_logits(a: torch.Tensor, b: torch.Tensor, tau: float = 1.0, clamp: float = 80.0) -> dict:
    """The [N, 8] statistics of docs/maths.md §5 for every divergence, formed in fp64 from the table in
    lsa_kernels/maths.py's docstring (written out again here), then rounded to fp32 like a backend's."""
    a, b = a.double() / tau, b.double() / tau
    la, lb = torch.logsumexp(a, -1), torch.logsumexp(b, -1)
    lp, lq = a - la[:, None], b - lb[:, None]
    p, q = lp.exp(), lq.exp()
    u = a - b
    em_neg = torch.expm1((-u).clamp(max=clamp))  # expm1(−u), argument clamped like every backend
    em_pos = torch.expm1(u.clamp(max=clamp))
    lm = torch.logaddexp(lp, lq) - math.log(2.0)
    cols = {
        "sce": ((p * b).sum(-1), (q * a).sum(-1), 0, 0),
        "kl": ((p * u).sum(-1), (p * em_neg).sum(-1), 0, 0),
        "kl_reverse": ((q * em_pos).sum(-1), (q * u).sum(-1), 0, 0),
        "sym_kl": ((p * u).sum(-1), (q * u).sum(-1), (p * em_neg).sum(-1), (q * em_pos).sum(-1)),
        "js": ((p * (lp - lm)).sum(-1), (q * (lq - lm)).sum(-1), 0, 0),
    }
    out = {}
    for d, (X, Y, X2, Y2) in cols.items():
        st = torch.zeros(a.shape[0], 8, dtype=torch.float64)
        st[:, 0], st[:, 1] = la * tau, lb * tau  # LSE_P, LSE_Q (unused by D)
        st[:, 2], st[:, 3], st[:, 4], st[:, 5], st[:, 6], st[:, 7] = la, lb, X, Y, X2, Y2
        out[d] = st.float()
    return out


def test_maths_ids_and_columns_are_the_documented_ones():
    """maths.py: the ids and columns are those of the table (docs/maths.md §5), in that order."""
    assert [(d.label, int(d)) for d in maths.Divergence] == list(zip(DIVS, range(5)))
    assert [(s.name, int(s)) for s in maths.Stat] == [
        ("LSE_P", 0), ("LSE_Q", 1), ("LSET_P", 2), ("LSET_Q", 3), ("X", 4), ("Y", 5), ("X2", 6), ("Y2", 7)]
    assert maths.N_PAIR_STATS == 8
    assert maths.Divergence.of("sym_kl") is maths.Divergence.SYM_KL
    for bad in ("SCE ", "kld", 3):
        with pytest.raises(ValueError, match="divergence must be one of"):
            maths.Divergence.of(bad)


@pytest.mark.parametrize("div", DIVS)
def test_maths_divergence_from_stats_matches_fp64_logits(div):
    """maths.divergence_from_stats: ordinary rows, several temperatures, name and enum spellings."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(9, 17, generator=g, dtype=torch.float64) * 2
    b = 0.5 * a + torch.randn(9, 17, generator=g, dtype=torch.float64)
    for tau in (1.0, 0.7):
        truth = R.divergence_from_logits(a, b, div, tau)
        st = _stats_from_logits(a, b, tau)[div]
        for spelling in (div, maths.Divergence.of(div)):
            got = maths.divergence_from_stats(st, spelling).double()
            torch.testing.assert_close(got, truth, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("div", ["kl", "kl_reverse", "sym_kl"])
def test_maths_divergence_from_stats_keeps_the_precision_of_close_rows(div):
    """maths._log_ratio (docs/maths.md §5.2): rows with p ≈ q (KL ~ 1e-9, both signs of lse_b − lse_a) keep
    their relative precision from fp32 statistics, which the plain ``lse_b − lse_a`` (error ~1e-7) cannot."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(16, 64, generator=g, dtype=torch.float64) * 3 + 10.0  # |lse| ~ 15: fp32 ulp ~ 1e-6
    b = a + 1e-4 * torch.randn(16, 64, generator=g, dtype=torch.float64)
    b[::2] += 1e-5  # a constant shift changes lse_b but not q: rows of both signs of lse_b − lse_a
    b[1::2] -= 1e-5
    truth = R.divergence_from_logits(a, b, div)
    assert truth.max() < 1e-7 and truth.min() > 0
    got = maths.divergence_from_stats(_stats_from_logits(a, b)[div], div).double()
    torch.testing.assert_close(got, truth, rtol=2e-2, atol=0)  # the plain form is off by ~1e2 relative


@pytest.mark.parametrize("div", ["kl", "kl_reverse", "sym_kl"])
def test_maths_divergence_from_stats_far_apart_rows_use_the_lse_difference(div):
    """maths._log_ratio: where the clamp of expm1 bit (q has mass where p ≈ 0, or the reverse), the
    expm1 form is wrong by O(1) and the row must use ``lse_b − lse_a`` (the clamp never bites for close rows)."""
    a = torch.tensor([[0.0, -200.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [5.0, -300.0, 1.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, -200.0, 0.0, 0.0], [5.0, 4.0, -300.0, 2.0]], dtype=torch.float64)
    truth = R.divergence_from_logits(a, b, div)
    assert torch.isfinite(truth).all()
    got = maths.divergence_from_stats(_stats_from_logits(a, b)[div], div).double()
    torch.testing.assert_close(got, truth, rtol=1e-5, atol=1e-5)


def test_maths_divergence_from_stats_nonfinite_expm1_column_falls_back():
    """maths._log_ratio: an inf or ≤ −1 expm1 column (overflow, rounding) is never fed to log1p."""
    a = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([[0.5, 0.0, 2.5]], dtype=torch.float64)
    for div, col in (("kl", 5), ("kl_reverse", 4), ("sym_kl", 6), ("sym_kl", 7)):
        truth = R.divergence_from_logits(a, b, div)
        for bad in (float("inf"), float("nan"), -1.0, -1.5):
            st = _stats_from_logits(a, b)[div].clone()
            st[:, col] = bad
            got = maths.divergence_from_stats(st, div).double()  # sym_kl: only that half falls back
            torch.testing.assert_close(got, truth, rtol=1e-5, atol=1e-5)


def test_maths_ce_row_loss_terms_and_mask():
    """maths.ce_row_loss (docs/maths.md §3): each term on its own, zmean unused (None) when ε = 0,
    ignored rows exactly 0 even when their loss would be inf or NaN."""
    g = torch.Generator().manual_seed(7)
    z = torch.randn(6, 11, generator=g, dtype=torch.float64) * 3
    y = torch.tensor([0, 4, 10, 2, 7, 3])
    valid = torch.tensor([True, True, False, True, True, False])
    lse, zy, zmean = torch.logsumexp(z, 1), z.gather(1, y[:, None])[:, 0], z.mean(1)
    for eps, lam in ((0.0, 0.0), (0.3, 0.0), (0.0, 0.05), (1.0, 0.0), (0.3, 0.05)):
        want = (1 - eps) * (lse - zy) + eps * (lse - zmean) + lam * lse**2
        want = torch.where(valid, want, torch.zeros_like(want))
        got = maths.ce_row_loss(lse, zy, zmean if eps > 0 else None, valid, eps, lam)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    bad = lse.clone()
    bad[2], bad[5] = float("inf"), float("nan")
    got = maths.ce_row_loss(bad, zy, zmean, valid, 0.3, 0.05)
    assert got[2] == 0 and got[5] == 0 and torch.isfinite(got).all()
    bad[0] = float("inf")  # a valid row whose lse overflowed: inf, not the NaN of an added 0·inf
    assert maths.ce_row_loss(bad, zy, None, valid, 0.0, 0.0)[0] == float("inf")


def test_maths_divergence_from_stats_agreement_bound_is_inclusive():
    """maths._log_ratio: the expm1 form is used where it agrees with ``lse_b − lse_a`` to WITHIN
    ``EXPM1_AGREE·(1 + |lse_a| + |lse_b|)``, the bound included (a row exactly at the bound keeps it), and
    the plain difference just outside it."""
    for lse in (0.0, 3.0):  # lse_a = lse_b: the plain difference is 0, the bound 1e-6·(1 + 2·lse)
        la = torch.full((1,), lse)
        bound = maths.EXPM1_AGREE * (1.0 + la.abs() + la.abs())
        e = bound.clone()
        for _ in range(400):  # the fp32 expm1 column whose log1p is exactly the bound
            if torch.log1p(e).item() == bound.item():
                break
            e = torch.nextafter(e, torch.ones(1))
        assert torch.log1p(e).item() == bound.item()
        st = torch.zeros(1, 8)
        st[0, maths.Stat.LSET_P] = st[0, maths.Stat.LSET_Q] = lse
        st[0, maths.Stat.X], st[0, maths.Stat.Y] = 0.25, e.item()
        assert maths.divergence_from_stats(st, "kl").item() == (0.25 + bound).item()
        st[0, maths.Stat.Y] = math.expm1(1.2 * bound.item())  # 1.2x the bound: the plain difference (0)
        assert maths.divergence_from_stats(st, "kl").item() == torch.tensor(0.25).item()


# ------------------------------------------------------------------------ autograd.py and functional.py
# The fused ops (backend="cpu") against the reference, through every path of the autograd Functions:
# gradients folded into the forward (mean/sum) or computed in backward (none; long-short with gradients
# reaching ce/misalign), each subset of inputs needing a gradient, upstream gradients != 1. fp64 inputs
# run the cpu backend in fp64, so the comparison is tight (1e-9); one fp32 case checks dtypes.

import lsa_kernels as L  # noqa: E402

B, T, H, V, IGN = 2, 8, 6, 11, -100  # T = 8: T ^ l_extra != T - l_extra for l_extra < 8 (7 = 0b111 hid that)
TIGHT = dict(rtol=1e-9, atol=1e-9)


def _inputs(seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hl = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    hs = hl + 0.5 * torch.randn(B, T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64)
    b = 0.3 * torch.randn(V, generator=g, dtype=torch.float64)
    yl = torch.randint(0, V, (B, T), generator=g)
    ys = torch.randint(0, V, (B, T), generator=g)
    yl[0, 1], yl[1, 5], ys[0, 0], ys[1, 2], yl[0, 6] = IGN, IGN, IGN, IGN, IGN
    return [t.to(dtype) for t in (hl, hs, w, b)] + [yl, ys]


# --------------------------------------------------------------------------------------------- functional.py

from lsa_kernels.functional import resolve_backend  # noqa: E402


def test_functional_resolve_backend_choices(monkeypatch):
    cpu, cuda, meta = torch.device("cpu"), torch.device("cuda"), torch.device("meta")
    assert resolve_backend("auto", cpu, torch.float32) == "cpu"
    assert resolve_backend("auto", cpu, torch.float64) == "cpu"
    assert resolve_backend("auto", meta) == "cpu"
    assert resolve_backend("auto", cuda, torch.float64) == "reference"  # no device query on this path
    assert resolve_backend("cpu", cpu) == "cpu" and resolve_backend("reference", cpu) == "reference"
    assert resolve_backend("reference", cuda, torch.float64) == "reference"
    for name in ("cpu", "".join(["c", "pu"])):  # compared by value, not identity
        with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors"):
            resolve_backend(name, cuda, torch.float32)
    with pytest.raises(ValueError, match="float64"):
        resolve_backend("triton", cuda, torch.float64)
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("gpu", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", cpu, torch.float32) == "triton"
    assert resolve_backend("triton", meta, torch.bfloat16) == "triton"
    with pytest.raises(ValueError, match="float64"):
        resolve_backend("triton", cpu, torch.float64)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        resolve_backend("triton", cpu, torch.float32)


def test_functional_vocab_parallel_arguments_are_checked_before_any_group_use():
    hl, hs, w, _, yl, ys = _inputs(31)
    x, y = hl.reshape(-1, H), yl.reshape(-1)
    for vs in (1, 5):
        with pytest.raises(ValueError, match="vocab_start is only meaningful"):
            L.linear_cross_entropy(x, w, y, backend="cpu", vocab_start=vs)
    assert torch.equal(L.linear_cross_entropy(x, w, y, backend="cpu", vocab_start=None),
                       L.linear_cross_entropy(x, w, y, backend="cpu"))
    group = object()  # never reached: the arguments are refused first
    with pytest.raises(ValueError, match="cannot run a vocab-parallel head"):
        L.linear_cross_entropy(x, w, y, backend="reference", process_group=group)
    with pytest.raises(ValueError, match="cannot run a vocab-parallel head"):
        L.linear_divergence(x, hs.reshape(-1, H), w, backend="reference", process_group=group)
    with pytest.raises(ValueError, match="cannot run a vocab-parallel head"):
        L.long_short_loss(hl, hs, w, yl, ys, l_extra=2, backend="reference", process_group=group)
    m = [t.to("meta") for t in (x, w)]  # float64 off CUDA (a device type sorting after "cuda"): not that message
    with pytest.raises(ValueError, match="cannot run a vocab-parallel head"):
        L.linear_cross_entropy(m[0], m[1], y.to("meta"), backend="reference", process_group=group)
    for vs in (-1, True, 1.0, None):
        with pytest.raises(ValueError, match="vocab_start must be a non-negative int"):
            L.linear_cross_entropy(x, w, y, backend="cpu", process_group=group, vocab_start=vs)
    with pytest.raises(ValueError, match="vocab_start must be a non-negative int"):  # triton passes on to the check
        L.linear_cross_entropy(x.float(), w.float(), y, backend="triton", process_group=group, vocab_start=-1)


def test_functional_vocab_parallel_single_rank_group(tmp_path):
    """dispatch.select_backend with a real (1-rank gloo) group: same values as no group; the global target
    check runs unless check_targets=False."""
    import torch.distributed as dist

    hl, hs, w, _, yl, ys = _inputs(34, torch.float32)
    x, y = hl.reshape(-1, H), yl.reshape(-1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        grp = dist.group.WORLD
        torch.testing.assert_close(L.linear_cross_entropy(x, w, y, process_group=grp, backend="cpu"),
                                   L.linear_cross_entropy(x, w, y, backend="cpu"))
        got = L.long_short_loss(hl, hs, w, yl, ys, l_extra=2, process_group=grp, backend="cpu")
        for a, c in zip(got, L.long_short_loss(hl, hs, w, yl, ys, l_extra=2, backend="cpu")):
            torch.testing.assert_close(a, c)
        torch.testing.assert_close(L.linear_divergence(x, hs.reshape(-1, H), w, process_group=grp, backend="cpu"),
                                   L.linear_divergence(x, hs.reshape(-1, H), w, backend="cpu"))
        with pytest.raises(ValueError, match="tile"):  # a valid vocab_start that does not tile a 1-rank group
            L.linear_cross_entropy(x, w, y, process_group=grp, backend="cpu", vocab_start=3)
        # gradients through the group's backend (no folded forward-backward: autograd's backward paths)
        for red in ("mean", "sum"):
            xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
            ws = [w.clone().requires_grad_(), w.clone().requires_grad_()]
            (1.7 * L.linear_cross_entropy(xs[0], ws[0], y, reduction=red, process_group=grp, backend="cpu")).backward()
            (1.7 * L.linear_cross_entropy(xs[1], ws[1], y, reduction=red, backend="cpu")).backward()
            torch.testing.assert_close(xs[0].grad, xs[1].grad)
            torch.testing.assert_close(ws[0].grad, ws[1].grad)
            ps = [x.clone().requires_grad_(), x.clone().requires_grad_()]
            for k, pg in enumerate((grp, None)):
                (1.3 * L.linear_divergence(ps[k], hs.reshape(-1, H), w, reduction=red, divergence="kl",
                                           process_group=pg, backend="cpu")).backward()
            torch.testing.assert_close(ps[0].grad, ps[1].grad)
        hls = [hl.clone().requires_grad_(), hl.clone().requires_grad_()]
        for k, pg in enumerate((grp, None)):
            out = L.long_short_loss(hls[k], hs, w, yl, ys, l_extra=2, process_group=pg, backend="cpu")
            (2.0 * out.loss + 0.5 * out.ce).backward()
        torch.testing.assert_close(hls[0].grad, hls[1].grad)
        bad = y.clone()
        bad[2] = V
        with pytest.raises(ValueError, match="target"):
            L.linear_cross_entropy(x, w, bad, process_group=grp, backend="cpu")
        L.linear_cross_entropy(x, w, bad, process_group=grp, backend="cpu", check_targets=False)
        bad_l = yl.clone()
        bad_l[1, 1] = V + 2
        with pytest.raises(ValueError, match="labels_long"):
            L.long_short_loss(hl, hs, w, bad_l, ys, l_extra=2, process_group=grp, backend="cpu")
        del grp
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mod", [L, R])
def test_functional_and_reference_signatures(mod):
    """The three tensors of each op may be passed by keyword; everything after them is keyword-only."""
    hl, hs, w, b, yl, ys = _inputs(35)
    x, y = hl.reshape(-1, H), yl.reshape(-1)
    torch.testing.assert_close(mod.linear_cross_entropy(input=x, linear_weight=w, target=y),
                               mod.linear_cross_entropy(x, w, y))
    torch.testing.assert_close(mod.linear_divergence(input_p=x, input_q=hs.reshape(-1, H), linear_weight=w),
                               mod.linear_divergence(x, hs.reshape(-1, H), w))
    got = mod.long_short_loss(hidden_long=hl, hidden_short=hs, linear_weight=w, labels_long=yl, labels_short=ys,
                              l_extra=2)
    torch.testing.assert_close(got.loss, mod.long_short_loss(hl, hs, w, yl, ys, l_extra=2).loss)
    with pytest.raises(TypeError):
        mod.linear_cross_entropy(x, w, y, b)
    with pytest.raises(TypeError):
        mod.linear_divergence(x, x, w, b)
    with pytest.raises(TypeError):
        mod.long_short_loss(hl, hs, w, yl, ys, 2)


def test_functional_check_targets_switch():
    """check_targets=False skips the value check (a target >= V is then a row of another vocab shard)."""
    hl, hs, w, _, yl, ys = _inputs(32)
    x, y = hl.reshape(-1, H), yl.reshape(-1).clone()
    y[3] = V
    with pytest.raises(ValueError, match="target"):
        L.linear_cross_entropy(x, w, y, backend="cpu")
    L.linear_cross_entropy(x, w, y, backend="cpu", check_targets=False)
    yl2 = yl.clone()
    yl2[0, 3] = V + 4
    with pytest.raises(ValueError, match="labels_long"):
        L.long_short_loss(hl, hs, w, yl2, ys, l_extra=2, backend="cpu")
    L.long_short_loss(hl, hs, w, yl2, ys, l_extra=2, backend="cpu", check_targets=False)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_functional_shapes_options_and_autocast(backend):
    """reduction="none" keeps the leading shape; options reach the backend; autocast casts like F.linear."""
    hl, hs, w, b, yl, ys = _inputs(33)
    kw = dict(linear_bias=b, label_smoothing=0.1, z_loss=1e-3, softcap=2.0, ignore_index=IGN)
    got = L.linear_cross_entropy(hl, w, yl, reduction="none", backend=backend, chunk_bytes=4 * V * 8,
                                 deterministic=True, **kw)
    assert got.shape == (B, T)
    torch.testing.assert_close(got, R.linear_cross_entropy(hl, w, yl, reduction="none", **kw), **TIGHT)
    ign = int(yl[0, 0])  # a class id used as ignore_index
    y3 = yl.clone()
    y3[y3 == IGN] = ign
    torch.testing.assert_close(L.linear_cross_entropy(hl, w, y3, ignore_index=ign, backend=backend),
                               R.linear_cross_entropy(hl, w, y3, ignore_index=ign), **TIGHT)
    d = L.linear_divergence(hl, hs, w, reduction="none", backend=backend, softcap=2.0, divergence="sym_kl")
    assert d.shape == (B, T)
    torch.testing.assert_close(d, R.linear_divergence(hl, hs, w, reduction="none", softcap=2.0,
                                                      divergence="sym_kl"), **TIGHT)
    ls = L.long_short_loss(hl, hs, w, yl, ys, l_extra=2, backend=backend, positions="last", alpha=2, **kw)
    want = R.long_short_loss(hl, hs, w, yl, ys, l_extra=2, positions="last", alpha=2, **kw)
    for a, c in zip(ls, want):
        torch.testing.assert_close(a, c, **TIGHT)
    none = "".join(["no", "ne"])  # equal to "none", not the same object
    assert L.linear_cross_entropy(hl, w, yl, reduction=none, backend=backend).shape == (B, T)
    assert L.linear_divergence(hl, hs, w, reduction=none, backend=backend).shape == (B, T)
    # autocast: fp32 operands are cast to bf16 first (fp64 ones are not), the loss comes back in fp32 (as torch's)
    h32, w32, b32 = hl.float(), w.float(), b.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = L.linear_cross_entropy(h32, w32, yl, linear_bias=b32, backend=backend)
        div = L.linear_divergence(h32, hs.float(), w32, linear_bias=b32, backend=backend)
        lsl = L.long_short_loss(h32, hs.float(), w32, yl, ys, l_extra=2, linear_bias=b32, backend=backend)
        out64 = L.linear_cross_entropy(hl, w, yl, backend=backend)
    assert out.dtype == div.dtype == lsl.loss.dtype == torch.float32 and out64.dtype == torch.float64
    bf = [t.bfloat16() for t in (h32, w32, b32)]
    torch.testing.assert_close(out, R.linear_cross_entropy(bf[0], bf[1], yl, linear_bias=bf[2]).float(), rtol=2e-2,
                               atol=2e-2)
    torch.testing.assert_close(div, R.linear_divergence(bf[0], hs.bfloat16(), bf[1], linear_bias=bf[2]).float(),
                               rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out64, R.linear_cross_entropy(hl, w, yl), **TIGHT)
    # outside autocast nothing is cast
    assert L.linear_cross_entropy(h32, w32, yl, backend=backend).dtype == torch.float32


def _grads_of(fn, tensors, need, weights):
    """Run fn on leaf copies of tensors (requires_grad per `need`), backprop Σ weights·outputs."""
    leaves = [t.detach().clone().requires_grad_(n) for t, n in zip(tensors, need)]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    total = sum((o * wgt).sum() for o, wgt in zip(outs, weights) if wgt is not None)
    wanted = [t for t in leaves if t.requires_grad]
    gs = torch.autograd.grad(total, wanted, allow_unused=True) if wanted and total.requires_grad else [None] * 4
    it = iter(gs)
    return [o.detach() for o in outs], [next(it) if t.requires_grad else None for t in leaves]


def _compare(fn_ours, fn_ref, tensors, need, weights, tol=TIGHT):
    o1, g1 = _grads_of(fn_ours, tensors, need, weights)
    o2, g2 = _grads_of(fn_ref, tensors, need, weights)
    for a, b in zip(o1, o2):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, **tol)
    for i, (a, b) in enumerate(zip(g1, g2)):
        if a is None and b is None:
            continue
        # an input the outputs do not depend on gets None from the reference, zeros from the fused op
        a = torch.zeros_like(tensors[i]) if a is None else a
        b = torch.zeros_like(tensors[i]) if b is None else b
        assert a.dtype == tensors[i].dtype and a.shape == tensors[i].shape, i
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"grad of input {i}: {m}")


NEEDS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_autograd_ce_every_gradient_path(reduction):
    """autograd._LinearCrossEntropy: folded (mean/sum) and backward (none) paths, each input alone."""
    hl, _, w, b, yl, _ = _inputs(11)
    x = hl.reshape(-1, H)
    y = yl.reshape(-1)
    up = torch.linspace(0.5, 2.0, y.numel(), dtype=torch.float64) if reduction == "none" else 1.7
    cases = [(n, b, (0.2, 1e-2, 2.5)) for n in NEEDS] + [((True, True, False), None, (0.0, 0.0, None))]
    for (nx, nw, nb), bias, (ls, zl, cap) in cases:
                kw = dict(reduction=reduction, label_smoothing=ls, z_loss=zl, softcap=cap)
                ours = lambda x_, w_, b_: L.linear_cross_entropy(x_, w_, y, linear_bias=b_, backend="cpu", **kw)  # noqa: E731
                ref = lambda x_, w_, b_: R.linear_cross_entropy(x_, w_, y, linear_bias=b_, **kw)  # noqa: E731
                if bias is None:
                    _compare(lambda x_, w_: ours(x_, w_, None), lambda x_, w_: ref(x_, w_, None), [x, w],
                             [nx, nw], [up])
                else:
                    _compare(ours, ref, [x, w, bias], [nx, nw, nb], [up])


def test_autograd_ce_mean_of_all_ignored_rows_is_zero_with_zero_gradients():
    """functional/autograd: reduction="mean" with no valid row returns 0 and zero gradients (not NaN)."""
    hl, _, w, b, _, _ = _inputs(12)
    x = hl.reshape(-1, H)
    y = torch.full((x.shape[0],), IGN)
    for be in ("cpu", "reference"):
        xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = L.linear_cross_entropy(xl, wl, y, backend=be)
        out.backward()
        assert out.item() == 0 and xl.grad.abs().max() == 0 and wl.grad.abs().max() == 0


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_autograd_linear_divergence_every_gradient_path(div, reduction):
    """autograd._LinearDivergence: weighted (folded) and none (backward) modes, detach, a mask, each input alone."""
    hl, hs, w, b, _, _ = _inputs(13)
    xp, xq = hl.reshape(-1, H), hs.reshape(-1, H)
    mask = torch.arange(xp.shape[0]) % 3 != 1
    up = torch.linspace(0.5, 2.0, xp.shape[0], dtype=torch.float64) if reduction == "none" else 1.3
    cases = [(None, (True, True, True, True), mask), ("p", (True, True, False, False), None),
             ("q", (True, True, True, False), mask), (None, (False, False, False, True), None),
             (None, (True, False, False, False), mask), (None, (False, True, False, False), None)]
    for detach, need, m in cases:
        if True:
            kw = dict(divergence=div, reduction=reduction, detach=detach, mask=m, temperature=0.8, softcap=3.0)
            ours = lambda p_, q_, w_, b_: L.linear_divergence(p_, q_, w_, linear_bias=b_, backend="cpu", **kw)  # noqa: E731
            ref = lambda p_, q_, w_, b_: R.linear_divergence(p_, q_, w_, linear_bias=b_, **kw)  # noqa: E731
            _compare(ours, ref, [xp, xq, w, b], list(need), [up])


LS_WEIGHTS = [(1.0, None, None), (2.5, None, None), (None, 1.0, None), (None, None, 1.0), (1.3, 0.7, 2.1),
              (None, 0.4, -1.5)]


@pytest.mark.parametrize("div", ["sce", "kl", "js"])
@pytest.mark.parametrize("positions", ["overlap", "last"])
def test_autograd_long_short_every_gradient_path(div, positions):
    """autograd._LongShort: loss only (folded), ce / misalign receiving gradients (recomputed), each input
    alone or with the other view, detach, alpha, bias, label smoothing and z-loss."""
    hl, hs, w, b, yl, ys = _inputs(14)
    needs = [(True, True, True, True), (True, False, False, False), (False, True, False, False),
             (False, False, True, False), (False, False, False, True)]
    detaches = [(None, 2), ("long", 3), ("short", 1)]
    for i, weights in enumerate(LS_WEIGHTS):
        for j, need in enumerate(needs[: 2 if i % 2 else 5]):
            for detach, l_extra in [detaches[(i + j) % 3]]:
                kw = dict(l_extra=l_extra, alpha=0.3, divergence=div, temperature=1.2, detach=detach,
                          positions=positions, label_smoothing=0.1, z_loss=1e-3)

                def ours(a, s, w_, b_):
                    return tuple(L.long_short_loss(a, s, w_, yl, ys, linear_bias=b_, backend="cpu", **kw))

                def ref(a, s, w_, b_):
                    return tuple(R.long_short_loss(a, s, w_, yl, ys, linear_bias=b_, **kw))

                _compare(ours, ref, [hl, hs, w, b], list(need), list(weights))


def test_autograd_fused_ops_keep_fp32_dtypes():
    """autograd: fp32 inputs give fp32 losses and gradients, close to the fp64 reference."""
    hl, hs, w, b, yl, ys = _inputs(15, torch.float32)
    loose = dict(rtol=1e-4, atol=1e-5)

    def ours(a, s, w_, b_):
        return tuple(L.long_short_loss(a, s, w_, yl, ys, l_extra=2, linear_bias=b_, backend="cpu", divergence="kl"))

    def ref(a, s, w_, b_):
        out = R.long_short_loss(a.double(), s.double(), w_.double(), yl, ys, l_extra=2, linear_bias=b_.double(),
                                divergence="kl")
        return tuple(o.float() for o in out)

    for weights in ((1.0, None, None), (1.0, 0.5, 2.0)):
        _compare(ours, ref, [hl, hs, w, b], [True] * 4, list(weights), tol=loose)
    x = hl.reshape(-1, H)
    for red in ("mean", "none"):
        _compare(lambda x_, w_: L.linear_cross_entropy(x_, w_, yl.reshape(-1), reduction=red, backend="cpu"),
                 lambda x_, w_: R.linear_cross_entropy(x_.double(), w_.double(), yl.reshape(-1), reduction=red).float(),
                 [x, w], [True, True], [1.0], tol=loose)
        _compare(lambda p_, q_: L.linear_divergence(p_, q_, w, reduction=red, backend="cpu"),
                 lambda p_, q_: R.linear_divergence(p_.double(), q_.double(), w.double(), reduction=red).float(),
                 [x, hs.reshape(-1, H)], [True, True], [1.0], tol=loose)


# --------------------------------------------------------------------------------------------- reference.py
# The reference against torch's own functions (F.cross_entropy, F.kl_div) and sums written out here.

import torch.nn.functional as F  # noqa: E402


def _ce_truth(z, y, ign, eps, lam):
    valid = y != ign
    ce = F.cross_entropy(z, torch.where(valid, y, 0), reduction="none", label_smoothing=eps)
    return torch.where(valid, ce + lam * torch.logsumexp(z, -1) ** 2, torch.zeros_like(ce))


@pytest.mark.parametrize("ign", [-100, 3])
def test_reference_cross_entropy_from_logits_matches_torch(ign):
    g = torch.Generator().manual_seed(21)
    z = torch.randn(12, 9, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, 9, (12,), generator=g)
    y[[1, 5]] = ign
    for eps, lam in ((0.0, 0.0), (0.25, 0.0), (0.0, 0.02), (0.1, 1e-3)):
        got = R.cross_entropy_from_logits(z, y, ignore_index=ign, label_smoothing=eps, z_loss=lam)
        torch.testing.assert_close(got, _ce_truth(z, y, ign, eps, lam), rtol=1e-12, atol=1e-12)
    # leading dimensions [3, 4, V]: every reduction is over the last dimension
    got3 = R.cross_entropy_from_logits(z.reshape(3, 4, 9), y.reshape(3, 4), ignore_index=ign, label_smoothing=0.1,
                                       z_loss=1e-3)
    torch.testing.assert_close(got3.reshape(-1), _ce_truth(z, y, ign, 0.1, 1e-3), rtol=1e-12, atol=1e-12)
    # defaults: ignore_index=-100, no smoothing, no z-loss
    y2 = y.clone()
    y2[y2 == ign] = -100
    torch.testing.assert_close(R.cross_entropy_from_logits(z, y2), _ce_truth(z, y2, -100, 0.0, 0.0))


def _div_truth(a, b, div, tau):
    lp, lq = F.log_softmax(a / tau, -1), F.log_softmax(b / tau, -1)
    kl_pq = F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)  # KL(p‖q)
    kl_qp = F.kl_div(lp, lq, reduction="none", log_target=True).sum(-1)
    if div == "sce":
        return -(lp.exp() * lq).sum(-1) - (lq.exp() * lp).sum(-1)
    if div == "kl":
        return kl_pq
    if div == "kl_reverse":
        return kl_qp
    if div == "sym_kl":
        return kl_pq + kl_qp
    m = 0.5 * (lp.exp() + lq.exp())
    return 0.5 * F.kl_div(m.log(), lp, reduction="none", log_target=True).sum(-1) + 0.5 * F.kl_div(
        m.log(), lq, reduction="none", log_target=True).sum(-1)


@pytest.mark.parametrize("div", DIVS)
def test_reference_divergence_from_logits_matches_torch(div):
    g = torch.Generator().manual_seed(22)
    a = torch.randn(3, 5, 7, generator=g, dtype=torch.float64) * 2
    b = 0.4 * a + torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    for tau in (1.0, 0.6):
        got = R.divergence_from_logits(a, b, div, tau)
        assert got.shape == (3, 5)
        torch.testing.assert_close(got, _div_truth(a, b, div, tau), rtol=1e-10, atol=1e-12)
    if div == "sce":  # the default divergence and temperature
        torch.testing.assert_close(R.divergence_from_logits(a, b), _div_truth(a, b, "sce", 1.0))
    with pytest.raises(ValueError, match="unknown divergence"):
        R.divergence_from_logits(a, b, "kld")


def test_reference_logits_softcap_bias_and_dtype():
    g = torch.Generator().manual_seed(23)
    x, w = torch.randn(4, 5, generator=g), torch.randn(6, 5, generator=g) * 3
    b = torch.randn(6, generator=g)
    raw = x @ w.T + b
    torch.testing.assert_close(R.logits(x, w, b, None), raw)
    torch.testing.assert_close(R.logits(x, w, b, 0.0), raw)  # softcap 0 means none
    torch.testing.assert_close(R.logits(x, w, None, 2.0), 2.0 * torch.tanh((x @ w.T) / 2.0))
    for dt in (torch.bfloat16, torch.float16):
        z = R.logits(x.to(dt), w.to(dt), b.to(dt), 3.0)
        assert z.dtype == torch.float32
        want = 3.0 * torch.tanh(F.linear(x.to(dt), w.to(dt), b.to(dt)).float() / 3.0)
        torch.testing.assert_close(z, want)
    assert R.logits(x.double(), w.double(), None, None).dtype == torch.float64


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_linear_ops_reduce_and_keep_shapes(reduction):
    hl, hs, w, b, yl, _ = _inputs(24)
    z = F.linear(hl, w, b)
    per_row = _ce_truth(z.reshape(-1, V), yl.reshape(-1), IGN, 0.1, 1e-3).reshape(B, T)
    n = (yl != IGN).sum()
    want = {"mean": per_row.sum() / n, "sum": per_row.sum(), "none": per_row}[reduction]
    got = R.linear_cross_entropy(hl, w, yl, linear_bias=b, reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # all rows ignored: mean is 0, not NaN
    none = R.linear_cross_entropy(hl, w, torch.full_like(yl, IGN), reduction=reduction)
    assert torch.equal(none, torch.zeros_like(none))
    # bf16 in, bf16 out
    assert R.linear_cross_entropy(hl.bfloat16(), w.bfloat16(), yl, reduction=reduction).dtype == torch.bfloat16
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(1)) < 0.6
    zq = F.linear(hs, w, b)
    d = _div_truth(z, zq, "kl", 0.9)
    d = torch.where(mask, d, torch.zeros_like(d))
    want = {"mean": d.sum() / mask.sum(), "sum": d.sum(), "none": d}[reduction]
    got = R.linear_divergence(hl, hs, w, linear_bias=b, divergence="kl", temperature=0.9, mask=mask,
                              reduction=reduction)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    nomask = R.linear_divergence(hl, hs, w, divergence="kl", reduction=reduction)
    d = _div_truth(F.linear(hl, w), F.linear(hs, w), "kl", 1.0)
    torch.testing.assert_close(nomask, {"mean": d.mean(), "sum": d.sum(), "none": d}[reduction])
    empty = R.linear_divergence(hl, hs, w, mask=torch.zeros(B, T, dtype=torch.bool), reduction=reduction)
    assert torch.equal(empty, torch.zeros_like(empty))
    assert R.linear_divergence(hl.half(), hs.half(), w.half(), reduction=reduction).dtype == torch.float16


@pytest.mark.parametrize("detach", [None, "p", "q"])
def test_reference_linear_divergence_detach(detach):
    hl, hs, w, _, _, _ = _inputs(25)
    p, q = hl.clone().requires_grad_(), hs.clone().requires_grad_()
    R.linear_divergence(p, q, w, divergence="kl", detach=detach).backward()
    assert (p.grad is None) == (detach == "p") and (q.grad is None) == (detach == "q")
    pp, qq = hl.clone().requires_grad_(), hs.clone().requires_grad_()
    _div_truth(F.linear(pp, w), F.linear(qq, w), "kl", 1.0).mean().backward()
    if detach != "p":
        torch.testing.assert_close(p.grad, pp.grad)
    if detach != "q":
        torch.testing.assert_close(q.grad, qq.grad)


@pytest.mark.parametrize("detach", [None, "long", "short"])
def test_reference_long_short_parts_and_detach(detach):
    """reference.long_short_loss against sums written out row by row (docs/maths.md §4)."""
    hl, hs, w, b, yl, ys = _inputs(26)
    l_extra, alpha = 2, 0.35
    yl[1, 4] = IGN  # a pair whose long target is ignored
    hl_, hs_ = hl.clone().requires_grad_(), hs.clone().requires_grad_()
    out = R.long_short_loss(hl_, hs_, w, yl, ys, l_extra=l_extra, alpha=alpha, divergence="js", temperature=1.1,
                            detach=detach, linear_bias=b, label_smoothing=0.05, z_loss=1e-3)
    zl, zs = F.linear(hl, w, b), F.linear(hs, w, b)
    ce_rows = [_ce_truth(zl.reshape(-1, V), yl.reshape(-1), IGN, 0.05, 1e-3),
               _ce_truth(zs.reshape(-1, V), ys.reshape(-1), IGN, 0.05, 1e-3)]
    ce = (ce_rows[0].sum() + ce_rows[1].sum()) / ((yl != IGN).sum() + (ys != IGN).sum())
    tot, n = 0.0, 0
    for bi in range(B):
        for i in range(T - l_extra):
            if yl[bi, l_extra + i] != IGN and ys[bi, i] != IGN:
                tot = tot + _div_truth(zl[bi, l_extra + i], zs[bi, i], "js", 1.1)
                n += 1
    mis = tot / n
    torch.testing.assert_close(out.ce, ce, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.misalign, mis, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, ce + alpha * mis, rtol=1e-12, atol=1e-12)
    out.misalign.backward()
    # the detached view gets no gradient from the misalignment term
    assert (hl_.grad is None or hl_.grad.abs().max() == 0) == (detach == "long")
    assert (hs_.grad is None or hs_.grad.abs().max() == 0) == (detach == "short")
    # one valid target in all: ce is that row's CE (the count is 1, not clamped higher)
    one_l, one_s = torch.full_like(yl, IGN), torch.full_like(ys, IGN)
    one_l[1, 3] = yl[1, 3] if yl[1, 3] != IGN else 0
    z1 = R.long_short_loss(hl, hs, w, one_l, one_s, l_extra=l_extra, linear_bias=b)
    torch.testing.assert_close(z1.ce, _ce_truth(zl[1, 3][None], one_l[1, 3][None], IGN, 0.0, 0.0)[0], **TIGHT)
    # all targets ignored: every part is 0, not NaN
    allign = torch.full_like(yl, IGN)
    z = R.long_short_loss(hl, hs, w, allign, allign, l_extra=l_extra)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in z)
    assert R.long_short_loss(hl.bfloat16(), hs.bfloat16(), w.bfloat16(), yl, ys, l_extra=1).loss.dtype == torch.bfloat16
