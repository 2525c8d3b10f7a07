"""The Triton backend (lsa_kernels.kernels) under TRITON_INTERPRET=1 against the float64 reference.

Every test calls the four contract functions directly. Truth: lsa_kernels.reference on float64 copies of
the (already rounded) inputs, gradients by autograd of ``Σ coef·per_row``. fp32 inputs: allclose.
bf16 inputs: CCE's rule per element, |ours − truth| ≤ |torch bf16 reference − truth| + tol (docs/maths.md §7).
Shapes are odd (37 × 61 × 1003: no block multiple) and small: the interpreter pays per tile step.
"""

from __future__ import annotations

import pytest
import torch

from lsa_kernels import reference as R
from lsa_kernels.kernels import ce_backward, ce_forward, pair_backward, pair_forward
from lsa_kernels.kernels._common import LaunchConfig, override_config
from lsa_kernels.options import CEOptions, PairOptions

from _util import assert_within, confident_ce_inputs, grad_or_zeros, leaf_or_none, row_coef

N, H, V = 37, 61, 1003
IGN = -100
# several row blocks, H chunks and V splits: exercises every merge / mask path
SMALL_BLOCKS = LaunchConfig(32, 256, 32, SPLIT_V=3, GROUP=2)


def _inputs(dtype, bias, *, n=N, h=H, v=V, seed=0, close=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g)
    xq = x + 0.3 * torch.randn(n, h, generator=g) if close else torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * (1.5 / h**0.5)
    b = torch.randn(v, generator=g) * 0.5 if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    yq = torch.randint(0, v, (n,), generator=g)
    y[[2, 11, 30]] = IGN
    yq[[5, 11]] = IGN
    cast = lambda t: None if t is None else t.to(dtype).contiguous()  # noqa: E731
    return cast(x), cast(xq), cast(w), cast(b), y, yq


def _coef(y, seed=1, p_zero=0.0):
    return row_coef(N if y is None else y.shape[0], seed, y, p_zero)


_leaf, _grad = leaf_or_none, grad_or_zeros  # tests/_util.py


# ----------------------------------------------------------------------------------------- references


def _ce_ref(x, w, b, y, coef, opts: CEOptions, dtype):
    xd, wd, bd = _leaf(x, dtype), _leaf(w, dtype), _leaf(b, dtype)
    z = R.logits(xd, wd, bd, opts.softcap)
    rows = R.cross_entropy_from_logits(z, y, ignore_index=opts.ignore_index,
                                       label_smoothing=opts.label_smoothing, z_loss=opts.z_loss)
    (rows.double() * coef.double()).sum().backward()
    lse = torch.logsumexp(z.double(), -1)
    return dict(loss=rows.detach(), lse=lse.detach(), dx=_grad(xd), dw=_grad(wd), db=_grad(bd))


def _pair_ref(xp, xq, w, b, yp, yq, cp, cq, cd, opts: PairOptions, dtype):
    xpd, xqd, wd, bd = _leaf(xp, dtype), _leaf(xq, dtype), _leaf(w, dtype), _leaf(b, dtype)
    za = R.logits(xpd, wd, bd, opts.softcap)
    zb = R.logits(xqd, wd, bd, opts.softcap)
    a = za.detach() if opts.detach == "p" else za
    bb = zb.detach() if opts.detach == "q" else zb
    div = R.divergence_from_logits(a, bb, opts.divergence, opts.temperature)
    total = (div.double() * cd.double()).sum()
    out = dict(div=div.detach())
    if opts.with_ce:
        kw = dict(ignore_index=opts.ce.ignore_index, label_smoothing=opts.ce.label_smoothing, z_loss=opts.ce.z_loss)
        ce_p = R.cross_entropy_from_logits(za, yp, **kw)
        ce_q = R.cross_entropy_from_logits(zb, yq, **kw)
        total = total + (ce_p.double() * cp.double()).sum() + (ce_q.double() * cq.double()).sum()
        out.update(ce_p=ce_p.detach(), ce_q=ce_q.detach())
    total.backward()
    out.update(dxp=_grad(xpd), dxq=_grad(xqd), dw=_grad(wd), db=_grad(bd))
    return out


_close = assert_within  # tests/_util.py


# ----------------------------------------------------------------------------------------- runners


def _run_ce(x, w, b, y, coef, opts, *, dx=True, dw=True, db=True, dw_init=None):
    loss, lse = ce_forward(x, w, b, y, opts)
    dx_out = torch.full(x.shape, float("nan")) if dx else None  # must be overwritten
    dw_out = (dw_init.clone() if dw_init is not None else torch.zeros(w.shape)) if dw else None
    db_out = torch.zeros(w.shape[0]) if (db and b is not None) else None
    ce_backward(x, w, b, y, lse, coef, opts, dx_out, dw_out, db_out)
    return dict(loss=loss, lse=lse, dx=dx_out, dw=dw_out, db=db_out)


def _run_pair(xp, xq, w, b, yp, yq, cp, cq, cd, opts):
    ce_p, ce_q, div, stats = pair_forward(xp, xq, w, b, yp, yq, opts)
    dxp = torch.full(xp.shape, float("nan"))
    dxq = torch.full(xq.shape, float("nan"))
    dw = torch.zeros(w.shape)
    db = torch.zeros(w.shape[0]) if b is not None else None
    pair_backward(xp, xq, w, b, yp, yq, stats, cp if opts.with_ce else None, cq if opts.with_ce else None, cd,
                  opts, dxp, dxq, dw, db)
    return dict(ce_p=ce_p, ce_q=ce_q, div=div, stats=stats, dxp=dxp, dxq=dxq, dw=dw, db=db)


GRADS = ("dx", "dxp", "dxq", "dw", "db")


def _grad_atol(k, truth, atol, lowp):
    """Low-precision inputs: the gradient GEMMs take dz rounded to the input dtype, as the GPU's tensor cores
    do (and the interpreter emulates): one bf16 half-ulp at the gradient's scale, 2^-8·max|truth|, on top
    of CCE's rule. The confident-target tests below keep a norm check that this does not loosen."""
    if lowp is None or k not in GRADS:
        return atol
    return atol + 2.0**-8 * truth[k].abs().max().item()


def _check_ce(ours, truth, lowp=None, atol=2e-5):
    for k in ("loss", "lse", "dx", "dw", "db"):
        if ours[k] is None:
            continue
        assert ours[k].dtype == torch.float32, k
        _close(ours[k], truth[k], atol=_grad_atol(k, truth, atol, lowp),
               lowp=None if lowp is None or k == "lse" else lowp[k], name=k)


def _check_pair(ours, truth, opts, lowp=None, atol=2e-5):
    keys = ["div", "dxp", "dxq", "dw", "db"] + (["ce_p", "ce_q"] if opts.with_ce else [])
    for k in keys:
        if ours[k] is None:
            continue
        assert ours[k].dtype == torch.float32, k
        _close(ours[k], truth[k], atol=_grad_atol(k, truth, atol, lowp), lowp=None if lowp is None else lowp[k],
               name=k)
    if not opts.with_ce:
        assert torch.equal(ours["ce_p"], torch.zeros(N)) and torch.equal(ours["ce_q"], torch.zeros(N))


# ----------------------------------------------------------------------------------------- CE


CE_CASES = {
    "plain": dict(),
    "smoothing": dict(label_smoothing=0.1),
    "zloss": dict(z_loss=1e-3),
    "softcap": dict(softcap=4.0),
    "all": dict(label_smoothing=0.2, z_loss=1e-2, softcap=6.0),
}


@pytest.mark.parametrize(
    "case,bias",
    [("plain", False), ("smoothing", True), ("zloss", False), ("softcap", True), ("all", False), ("all", True)],
)
def test_ce_fp32(case, bias):
    x, _, w, b, y, _ = _inputs(torch.float32, bias)
    coef = _coef(y)
    opts = CEOptions(**CE_CASES[case])
    _check_ce(_run_ce(x, w, b, y, coef, opts), _ce_ref(x, w, b, y, coef, opts, torch.float64))


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
def test_ce_small_blocks_splits(deterministic):
    """Several row blocks, H chunks, V splits; dW accumulates into a non-zero buffer."""
    x, _, w, b, y, _ = _inputs(torch.float32, True, seed=3)
    coef = _coef(y, p_zero=0.3)
    # deterministic: dz buffer of 16 rows (3 row chunks of the 37 rows, the last one short)
    opts = CEOptions(label_smoothing=0.1, z_loss=1e-3, softcap=5.0, deterministic=deterministic,
                     chunk_bytes=16 * V * 4)
    dw0 = torch.randn(w.shape)
    with override_config(SMALL_BLOCKS):
        ours = _run_ce(x, w, b, y, coef, opts, dw_init=dw0)
    truth = _ce_ref(x, w, b, y, coef, opts, torch.float64)
    truth["dw"] = truth["dw"] + dw0.double()
    _check_ce(ours, truth)


@pytest.mark.parametrize("case", ["plain", "all"])
def test_ce_bf16(case):
    x, _, w, b, y, _ = _inputs(torch.bfloat16, case == "all", seed=4)
    coef = _coef(y)
    opts = CEOptions(**CE_CASES[case])
    ours = _run_ce(x, w, b, y, coef, opts)
    truth = _ce_ref(x, w, b, y, coef, opts, torch.float64)
    lowp = _ce_ref(x, w, b, y, coef, opts, torch.bfloat16)
    _check_ce(ours, truth, lowp=lowp, atol=1e-4)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
def test_ce_bf16_confident_target(deterministic):
    """p_y in [0.99, 0.999] with bf16 inputs: the true-class gradient p_y − 1 (1e-3..1e-2) must not be
    rounded away (Liger regression). The true dx is up to ≈ 4e-3 per element, so a zero gradient, or one
    from a softmax rounded to bf16 (≈ 20 % off), fails: per-element CCE rule with 0.5 % of the largest
    true element, relative Frobenius error < 1 % (torch's bf16 reference: ≈ 2 %)."""
    x, w, y, p_y = confident_ce_inputs(N, 64, 257, seed=5)
    assert 0.985 <= p_y.min() and p_y.max() <= 0.9995
    x, w = x.to(torch.bfloat16), w.to(torch.bfloat16)
    coef = torch.ones(N)
    opts = CEOptions(deterministic=deterministic)
    ours = _run_ce(x, w, None, y, coef, opts)
    truth = _ce_ref(x, w, None, y, coef, opts, torch.float64)
    lowp = _ce_ref(x, w, None, y, coef, opts, torch.bfloat16)
    for k in ("dx", "dw"):
        t = truth[k].double()
        assert t.abs().max() > 1e-3
        _close(ours[k], t, atol=5e-3 * t.abs().max().item(), rtol=0.0, lowp=lowp[k], name=k)
        rel = ((ours[k].double() - t).norm() / t.norm()).item()
        assert rel < 1e-2, (k, rel)


def test_ce_all_ignored():
    x, _, w, b, _, _ = _inputs(torch.float32, True)
    y = torch.full((N,), IGN)
    loss, lse = ce_forward(x, w, b, y, CEOptions())
    assert torch.equal(loss, torch.zeros(N)) and torch.isfinite(lse).all()
    dx = torch.full(x.shape, float("nan"))
    dw0 = torch.randn(w.shape)
    dw = dw0.clone()
    db = torch.zeros(V)
    # coefficients are zero on ignored rows by contract; the kernel also masks them itself
    ce_backward(x, w, b, y, lse, torch.ones(N), CEOptions(), dx, dw, db)
    assert torch.equal(dx, torch.zeros_like(dx)) and torch.equal(dw, dw0) and torch.equal(db, torch.zeros(V))


def test_ce_none_buffers():
    """None outputs are skipped; the others are still right."""
    x, _, w, b, y, _ = _inputs(torch.float32, True, seed=6)
    coef = _coef(y)
    opts = CEOptions(z_loss=1e-3)
    truth = _ce_ref(x, w, b, y, coef, opts, torch.float64)
    only_dx = _run_ce(x, w, b, y, coef, opts, dw=False, db=False)
    _close(only_dx["dx"], truth["dx"], atol=2e-5, name="dx")
    for det in (False, True):
        only_dw = _run_ce(x, w, b, y, coef, CEOptions(z_loss=1e-3, deterministic=det), dx=False)
        _close(only_dw["dw"], truth["dw"], atol=2e-5, name="dw")
        _close(only_dw["db"], truth["db"], atol=2e-5, name="db")


def test_ce_deterministic_bit_identical():
    x, _, w, b, y, _ = _inputs(torch.bfloat16, True, seed=7)
    coef = _coef(y)
    opts = CEOptions(label_smoothing=0.1, softcap=5.0, deterministic=True)
    r1 = _run_ce(x, w, b, y, coef, opts)
    r2 = _run_ce(x, w, b, y, coef, opts)
    for k in r1:
        assert torch.equal(r1[k], r2[k]), k


# ----------------------------------------------------------------------------------------- pairs


DIVS = ["sce", "kl", "kl_reverse", "sym_kl", "js"]


# every divergence × every detach mode × both temperature paths (τ == 1 shares the CE softmax)
DETACH_TEMPS = [(None, 1.0), (None, 0.7), ("p", 0.7), ("q", 1.0)]


@pytest.mark.parametrize("detach,temperature", DETACH_TEMPS, ids=["both-t1", "both-t07", "detp-t07", "detq-t1"])
@pytest.mark.parametrize("divergence", DIVS)
def test_pair_fp32(divergence, detach, temperature):
    bias = detach == "p"
    xp, xq, w, b, yp, yq = _inputs(torch.float32, bias, seed=8, close=True)
    cp, cq, cd = _coef(yp, 1), _coef(yq, 2), _coef(None, 3, p_zero=0.2)
    ce = CEOptions(label_smoothing=0.1 if detach == "q" else 0.0, softcap=5.0 if temperature != 1.0 else None)
    opts = PairOptions(divergence=divergence, temperature=temperature, detach=detach, with_ce=True, ce=ce)
    ours = _run_pair(xp, xq, w, b, yp, yq, cp, cq, cd, opts)
    truth = _pair_ref(xp, xq, w, b, yp, yq, cp, cq, cd, opts, torch.float64)
    _check_pair(ours, truth, opts)


@pytest.mark.parametrize("divergence", DIVS)
def test_pair_divergence_only(divergence):
    """with_ce=False (linear_divergence): yp/yq None, zero CE rows; several blocks / splits."""
    xp, xq, w, b, _, _ = _inputs(torch.float32, True, seed=9, close=True)
    cd = _coef(None, 3, p_zero=0.2)
    detach = {"kl": "q", "kl_reverse": "p"}.get(divergence)
    opts = PairOptions(divergence=divergence, temperature=0.7, detach=detach, with_ce=False,
                       ce=CEOptions(softcap=8.0))
    with override_config(SMALL_BLOCKS):
        ours = _run_pair(xp, xq, w, b, None, None, None, None, cd, opts)
    truth = _pair_ref(xp, xq, w, b, None, None, None, None, cd, opts, torch.float64)
    _check_pair(ours, truth, opts)


@pytest.mark.parametrize("divergence", DIVS)
def test_pair_bf16(divergence):
    xp, xq, w, b, yp, yq = _inputs(torch.bfloat16, divergence == "sce", seed=10, close=True)
    cp, cq, cd = _coef(yp, 1), _coef(yq, 2), _coef(None, 3)
    opts = PairOptions(divergence=divergence, temperature=0.7 if divergence in ("kl", "js") else 1.0,
                       ce=CEOptions(z_loss=1e-3, softcap=10.0 if divergence == "sym_kl" else None))
    ours = _run_pair(xp, xq, w, b, yp, yq, cp, cq, cd, opts)
    truth = _pair_ref(xp, xq, w, b, yp, yq, cp, cq, cd, opts, torch.float64)
    lowp = _pair_ref(xp, xq, w, b, yp, yq, cp, cq, cd, opts, torch.bfloat16)
    _check_pair(ours, truth, opts, lowp=lowp, atol=1e-4)


@pytest.mark.parametrize("divergence", ["kl", "sym_kl", "js"])
def test_pair_close_distributions_relative_precision(divergence):
    """p ≈ q: the divergence is tiny and must keep relative precision (expm1 / log-ratio forms)."""
    xp, _, w, _, _, _ = _inputs(torch.float32, False, seed=11)
    xq = (xp + 1e-3 * torch.randn(xp.shape)).contiguous()
    opts = PairOptions(divergence=divergence, with_ce=False)
    _, _, div, _ = pair_forward(xp, xq, w, None, None, None, opts)
    truth = R.divergence_from_logits(R.logits(xp.double(), w.double(), None, None),
                                     R.logits(xq.double(), w.double(), None, None), divergence)
    assert (truth > 0).all()
    rel = ((div.double() - truth).abs() / truth).max().item()
    assert rel < 2e-2, rel


def test_pair_all_ignored_and_unselected():
    xp, xq, w, b, _, _ = _inputs(torch.float32, True, seed=12)
    y = torch.full((N,), IGN)
    opts = PairOptions(divergence="sce")
    ce_p, ce_q, div, stats = pair_forward(xp, xq, w, b, y, y, opts)
    assert torch.equal(ce_p, torch.zeros(N)) and torch.equal(ce_q, torch.zeros(N))
    assert torch.isfinite(div).all() and torch.isfinite(stats).all()
    dxp, dxq = torch.full(xp.shape, float("nan")), torch.full(xq.shape, float("nan"))
    dw0 = torch.randn(w.shape)
    dw, db = dw0.clone(), torch.zeros(V)
    z = torch.zeros(N)
    pair_backward(xp, xq, w, b, y, y, stats, z, z, z, opts, dxp, dxq, dw, db)
    assert torch.equal(dxp, torch.zeros_like(dxp)) and torch.equal(dxq, torch.zeros_like(dxq))
    assert torch.equal(dw, dw0) and torch.equal(db, torch.zeros(V))


def test_pair_stats_layout():
    """stats columns are what lsa_kernels.stats documents."""
    xp, xq, w, _, yp, yq = _inputs(torch.float32, False, seed=13, close=True)
    opts = PairOptions(divergence="sce", temperature=0.5)
    _, _, _, st = pair_forward(xp, xq, w, None, yp, yq, opts)
    za = R.logits(xp.double(), w.double(), None, None)
    zb = R.logits(xq.double(), w.double(), None, None)
    la, lb = torch.log_softmax(za / 0.5, -1), torch.log_softmax(zb / 0.5, -1)
    expect = torch.stack([
        torch.logsumexp(za, -1), torch.logsumexp(zb, -1), torch.logsumexp(za / 0.5, -1),
        torch.logsumexp(zb / 0.5, -1), (la.exp() * zb / 0.5).sum(-1), (lb.exp() * za / 0.5).sum(-1),
    ], 1)
    _close(st[:, :6], expect, atol=2e-5, name="stats")
    assert torch.equal(st[:, 6:], torch.zeros_like(st[:, 6:]))  # X2, Y2: sym_kl only


@pytest.mark.parametrize("divergence,small", [("sce", False), ("js", True)])
def test_pair_deterministic(divergence, small):
    """Bit-identical twice, and right; ``small``: several blocks and row chunks of 10 rows (dz buffer budget)."""
    xp, xq, w, b, yp, yq = _inputs(torch.bfloat16, True, seed=14, close=True)
    cp, cq, cd = _coef(yp, 1), _coef(yq, 2), _coef(None, 3)
    opts = PairOptions(divergence=divergence, temperature=0.7,
                       ce=CEOptions(label_smoothing=0.1, z_loss=1e-3, softcap=5.0, deterministic=True,
                                    chunk_bytes=2 * 10 * V * 2 if small else None))
    if small:
        with override_config(SMALL_BLOCKS):
            r1 = _run_pair(xp, xq, w, b, yp, yq, cp, cq, cd, opts)
            r2 = _run_pair(xp, xq, w, b, yp, yq, cp, cq, cd, opts)
    else:
        r1 = _run_pair(xp, xq, w, b, yp, yq, cp, cq, cd, opts)
        r2 = _run_pair(xp, xq, w, b, yp, yq, cp, cq, cd, opts)
    for k in r1:
        assert torch.equal(r1[k], r2[k]), k
    truth = _pair_ref(xp, xq, w, b, yp, yq, cp, cq, cd, opts, torch.float64)
    lowp = _pair_ref(xp, xq, w, b, yp, yq, cp, cq, cd, opts, torch.bfloat16)
    _check_pair(r1, truth, opts, lowp=lowp, atol=1e-4)


@pytest.mark.parametrize("divergence,detach", [("kl", "q"), ("kl_reverse", "p")])
def test_pair_deterministic_one_view(divergence, detach):
    """linear_divergence with detach, deterministic: only one view has a dz (one-view buffer, one dW GEMM);
    row chunks of 8 rows, several blocks."""
    xp, xq, w, b, _, _ = _inputs(torch.float32, True, seed=19, close=True)
    cd = _coef(None, 3, p_zero=0.2)
    opts = PairOptions(divergence=divergence, temperature=0.7, detach=detach, with_ce=False,
                       ce=CEOptions(softcap=8.0, deterministic=True, chunk_bytes=8 * V * 4))
    with override_config(SMALL_BLOCKS):
        ours = _run_pair(xp, xq, w, b, None, None, None, None, cd, opts)
    truth = _pair_ref(xp, xq, w, b, None, None, None, None, cd, opts, torch.float64)
    _check_pair(ours, truth, opts)


def test_pair_none_buffers():
    xp, xq, w, b, yp, yq = _inputs(torch.float32, True, seed=15, close=True)
    cp, cq, cd = _coef(yp, 1), _coef(yq, 2), _coef(None, 3)
    opts = PairOptions(divergence="kl")
    truth = _pair_ref(xp, xq, w, b, yp, yq, cp, cq, cd, opts, torch.float64)
    _, _, _, stats = pair_forward(xp, xq, w, b, yp, yq, opts)
    dw = torch.zeros(w.shape)
    pair_backward(xp, xq, w, b, yp, yq, stats, cp, cq, cd, opts, None, None, dw, None)
    _close(dw, truth["dw"], atol=2e-5, name="dw")
    dxq = torch.empty(xq.shape)
    pair_backward(xp, xq, w, b, yp, yq, stats, cp, cq, cd, opts, None, dxq, None, None)
    _close(dxq, truth["dxq"], atol=2e-5, name="dxq")


@pytest.mark.parametrize("divergence", ["kl", "kl_reverse", "sym_kl"])
def test_pair_far_distributions_finite(divergence):
    """Logits ~±100 apart: expm1 arguments are clamped (maths.EXPM1_CLAMP), no 0·inf, D still right."""
    g = torch.Generator().manual_seed(16)
    xp, xq = torch.randn(8, 32, generator=g) * 6, torch.randn(8, 32, generator=g) * 6
    w = torch.randn(300, 32, generator=g)
    _, _, div, stats = pair_forward(xp, xq, w, None, None, None, PairOptions(divergence=divergence, with_ce=False))
    assert torch.isfinite(stats).all()
    truth = R.divergence_from_logits(R.logits(xp.double(), w.double(), None, None),
                                     R.logits(xq.double(), w.double(), None, None), divergence)
    _close(div, truth, atol=1e-4, rtol=1e-5, name="div")


# ------------------------------------------------------------------------------- which kernels run
#
# Under the interpreter the programs of a grid run one after another, so two runs of the atomic backward
# give the same bits and a bit-identity test cannot tell the paths apart. These tests check instead WHICH
# backward kernels and GEMMs a call launches: deterministic=True must never launch the atomic kernels, it
# must launch its dz kernel once per row chunk followed by the torch GEMMs (docs/maths.md §14.3), and the
# kernels it launches must contain no atomic operation.

# kind → (module of lsa_kernels.kernels, kernel name)
ATOMIC = {"ce": ("ce", "ce_bwd_kernel"), "pair": ("pair_bwd", "pair_bwd_kernel")}
DZ_KERNEL = {"ce": ("ce", "ce_dz_kernel"), "pair": ("pair_bwd", "pair_dz_kernel")}


def _kmod(name):
    import importlib

    return importlib.import_module(f"lsa_kernels.kernels.{name}")


class _Recorder:
    """Stands in for a @triton.jit kernel in its module: records ``kernel[grid](...)`` launches."""

    def __init__(self, kernel, name, seen):
        self.kernel, self.name, self.seen = kernel, name, seen

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.seen.append(self.name)
            return launch(*args, **kwargs)

        return run


@pytest.fixture
def launches(monkeypatch):
    """Kernel launches and deterministic-path GEMMs, in order, as names ("ce_dz_kernel", "mm", "addmm")."""
    from lsa_kernels.kernels import deterministic

    seen = []
    for mod, name in (*ATOMIC.values(), *DZ_KERNEL.values()):
        m = _kmod(mod)
        monkeypatch.setattr(m, name, _Recorder(getattr(m, name), name, seen))
    for fn, tag in ((deterministic.mm_into, "mm"), (deterministic.addmm_into, "addmm")):
        def spy(*a, _fn=fn, _tag=tag):
            seen.append(_tag)
            return _fn(*a)
        monkeypatch.setattr(deterministic, fn.__name__, spy)
    return seen


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
def test_backward_kernels_launched(deterministic, launches):
    """Atomic: one kernel. Deterministic: per row chunk (37 rows, chunks of 16: 3 chunks) the dz kernel, then
    dx = dz W (one GEMM per view) and ONE dW GEMM over the views."""
    xp, xq, w, b, yp, yq = _inputs(torch.float32, True, seed=17, close=True)
    ce_opts = CEOptions(softcap=5.0, deterministic=deterministic, chunk_bytes=16 * V * 4)
    with override_config(SMALL_BLOCKS):  # many programs per grid
        ce_ours = _run_ce(xp, w, b, yp, _coef(yp), ce_opts)
        ce_seen = list(launches)
        launches.clear()
        pair_opts = PairOptions(divergence="js", temperature=0.7,
                                ce=CEOptions(softcap=5.0, deterministic=deterministic, chunk_bytes=2 * 16 * V * 4))
        pair_ours = _run_pair(xp, xq, w, b, yp, yq, _coef(yp, 1), _coef(yq, 2), _coef(None, 3), pair_opts)
        pair_seen = list(launches)
    if deterministic:
        assert ce_seen == ["ce_dz_kernel", "mm", "addmm"] * 3, ce_seen
        assert pair_seen == ["pair_dz_kernel", "mm", "mm", "addmm"] * 3, pair_seen
    else:
        assert ce_seen == ["ce_bwd_kernel"], ce_seen
        assert pair_seen == ["pair_bwd_kernel"], pair_seen
    _check_ce(ce_ours, _ce_ref(xp, w, b, yp, _coef(yp), ce_opts, torch.float64))
    _check_pair(pair_ours, _pair_ref(xp, xq, w, b, yp, yq, _coef(yp, 1), _coef(yq, 2), _coef(None, 3), pair_opts,
                                     torch.float64), pair_opts)


@pytest.mark.parametrize("backend_call", ["ce", "long_short"])
def test_public_api_deterministic_launches_no_atomic_kernel(backend_call, launches):
    import lsa_kernels as L

    xp, xq, w, b, yp, yq = _inputs(torch.float32, True, seed=18, close=True)
    ins = [t.clone().requires_grad_(True) for t in (xp, xq, w, b)]
    atomic_names = {name for _, name in ATOMIC.values()}
    for det in (True, False):
        launches.clear()
        if backend_call == "ce":
            out = L.linear_cross_entropy(ins[0], ins[2], yp, linear_bias=ins[3], backend="triton", deterministic=det)
        else:
            out = L.long_short_loss(ins[0].reshape(1, N, H), ins[1].reshape(1, N, H), ins[2], yp.reshape(1, N),
                                    yq.reshape(1, N), l_extra=5, linear_bias=ins[3], backend="triton",
                                    deterministic=det, divergence="kl").loss
        out.backward()
        atomics = [k for k in launches if k in atomic_names]
        assert launches, "no backward kernel recorded: the recorder does not see the launches"
        assert (atomics == []) == det, (det, launches)
        assert ("addmm" in launches) == det, (det, launches)


@pytest.mark.parametrize("maxnreg", [None, 255])
def test_dz_launch_passes_the_register_cap(maxnreg, monkeypatch):
    """The pair dz launcher hands a table entry's register cap (ptxas ``.maxnreg``) to Triton, and nothing when
    the entry has none; the interpreter ignores it (same gradients)."""
    mod = _kmod("pair_bwd")
    real, seen = mod.pair_dz_kernel, []

    class Spy:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                seen.append({k: kwargs[k] for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs})
                return real[grid](*args, **kwargs)
            return run

    monkeypatch.setattr(mod, "pair_dz_kernel", Spy())
    xp, xq, w, b, yp, yq = _inputs(torch.float32, True, seed=19, close=True)
    opts = PairOptions(divergence="sym_kl", ce=CEOptions(deterministic=True))
    cfg = LaunchConfig(32, 256, 32, num_warps=8, num_stages=3, maxnreg=maxnreg)
    with override_config(cfg):
        ours = _run_pair(xp, xq, w, b, yp, yq, _coef(yp, 1), _coef(yq, 2), _coef(None, 3), opts)
    want = {"num_warps": 8, "num_stages": 3, **({"maxnreg": maxnreg} if maxnreg else {})}
    assert seen and all(s == want for s in seen), seen
    _check_pair(ours, _pair_ref(xp, xq, w, b, yp, yq, _coef(yp, 1), _coef(yq, 2), _coef(None, 3), opts,
                                torch.float64), opts)


def test_deterministic_kernels_have_no_atomics():
    """The deterministic dz kernels, the helpers they share and the GEMM driver contain no atomic operation."""
    import inspect

    from lsa_kernels.kernels import _common, deterministic, tiles

    def src(kernel):  # a JITFunction, or the interpreter's InterpretedFunction wrapping the Python function
        return inspect.getsource(getattr(kernel, "fn", kernel))

    for kind in ("ce", "pair"):
        mod, name = DZ_KERNEL[kind]
        assert "atomic" not in src(getattr(_kmod(mod), name)), name
        mod, name = ATOMIC[kind]
        assert "atomic_add" in src(getattr(_kmod(mod), name))  # the check sees an atomic where there is one
    for m in (_common, tiles, deterministic, _kmod("pair_bwd").pair_dz_tiles, _kmod("ce").ce_dz_tile):
        assert "tl.atomic" not in src(m), m
