"""The backend contract (lsa_kernels/backends/contract.py), checked the same way on every backend: the cpu
backend's compiled and ATen paths and the Triton backend (interpreter). Each promise of the contract's
docstring is one test: per-row outputs against plain torch on materialised fp64 logits, ``dx`` buffers
OVERWRITTEN, ``dw``/``db`` ACCUMULATED into, targets ``y >= V`` = "valid row, class in another shard"
(softmax gradient, no one-hot), the optional methods exactly when ``caps`` says so and equal to forward then
backward, and the Protocol itself. Odd shapes (not block multiples), ignored rows, bias and softcap."""

from __future__ import annotations

import contextlib

import pytest
import torch

from lsa_kernels import _ext, maths
from lsa_kernels import backends as B
from lsa_kernels import reference as R
from lsa_kernels.maths import Stat
from lsa_kernels.options import CEOptions, PairOptions
from _util import IGN, assert_within, fp32_gemm_atol, triton_available

N, H, V = 19, 23, 157


def _backends():
    out = [pytest.param(("cpu", "aten"), id="cpu-aten")]
    out.append(pytest.param(("cpu", "ext"), id="cpu-ext",
                            marks=pytest.mark.skipif(not _ext.built(), reason="lsa_kernels._C not built")))
    if triton_available():
        out.append(pytest.param(("triton", None), id="triton"))
    return out


@pytest.fixture(params=_backends())
def be(request):
    name, path = request.param
    ctx = _ext.disable(path == "aten") if name == "cpu" else contextlib.nullcontext()
    with ctx:
        yield B.get(name)


def _data(seed=0, softcap=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g)
    xq = x + 0.3 * torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) / H**0.5 * 3
    b = torch.randn(V, generator=g) * 0.5
    y = torch.randint(0, V, (N,), generator=g)
    y[[2, 7, 11]] = IGN
    y[5] = V + 3  # a class of another vocab shard
    yq = y.roll(3)
    return x, xq, w, b, y, yq


def _logits64(x, w, b, cap):
    return R.logits(x.double(), w.double(), b.double(), cap)


def _ce_truth(x, w, b, y, cap, coef):
    """Per-row loss, lse and the gradients of Σ coef·loss, with the shard rule for y >= V (no one-hot)."""
    xx, ww, bb = (t.double().requires_grad_() for t in (x, w, b))
    z = R.logits(xx, ww, bb, cap)
    lse = torch.logsumexp(z, 1)
    here = (y != IGN) & (y < V)
    zy = z.gather(1, torch.where(here, y, 0)[:, None])[:, 0]
    loss = torch.where(here, lse - zy, torch.zeros_like(lse))
    # rows of another shard: the contract leaves their loss value unspecified but gives them the softmax
    # gradient (coef · softmax), i.e. the gradient of coef·lse
    total = (coef.double() * torch.where(y != IGN, lse - torch.where(here, zy, 0.0), torch.zeros_like(lse))).sum()
    total.backward()
    return loss.detach(), lse.detach(), xx.grad, ww.grad, bb.grad


def test_protocol_and_capabilities(be):
    assert isinstance(be, B.Backend)
    assert isinstance(be.caps, B.Capabilities)
    assert be.name in ("cpu", "triton")


def _tol(x, w, k):
    """``k`` roundings of this machine's fp32 logits GEMM at its largest (_util.fp32_gemm_atol): an lse or CE
    loss moves by at most the largest logit error, a divergence by a few; the gradients get the same unit."""
    return fp32_gemm_atol(x, w, k)


@pytest.mark.precision
@pytest.mark.parametrize("cap", [None, 7.0])
def test_ce_forward_backward_promises(be, cap):
    x, _, w, b, y, _ = _data(1, cap)
    tol = _tol(x, w, 4)
    opts = CEOptions(softcap=cap)
    out = be.ce_forward(x, w, b, y, opts)
    coef = torch.rand(N, generator=torch.Generator().manual_seed(2)) * (y != IGN)
    loss_t, lse_t, dx_t, dw_t, db_t = _ce_truth(x, w, b, y, cap, coef)
    here = (y != IGN) & (y < V)
    assert_within(out.lse, lse_t, atol=tol, name="lse")
    assert_within(torch.where(here, out.loss, 0.0), loss_t, atol=tol, name="loss")
    assert (out.loss[y == IGN] == 0).all()
    # dx overwritten (NaN before), dw/db accumulated into (random before)
    dw0, db0 = torch.randn(V, H), torch.randn(V)
    g = B.Grads(dx=torch.full((N, H), float("nan")), dw=dw0.clone(), db=db0.clone())
    be.ce_backward(x, w, b, y, out.lse, coef, opts, g)
    assert_within(g.dx, dx_t, atol=tol, name="dx")
    assert_within(g.dw - dw0, dw_t, atol=tol, name="dw")
    assert_within(g.db - db0, db_t, atol=tol, name="db")
    if be.caps.fused_forward_backward:
        g2 = B.Grads(dx=torch.full((N, H), float("nan")), dw=dw0.clone(), db=db0.clone())
        out2 = be.ce_forward_backward(x, w, b, y, opts, coef, g2)
        torch.testing.assert_close(out2.lse, out.lse, rtol=1e-6, atol=1e-6)
        for a, c in ((g2.dx, g.dx), (g2.dw, g.dw), (g2.db, g.db)):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    else:
        with pytest.raises(NotImplementedError):
            be.ce_forward_backward(x, w, b, y, opts, coef, B.Grads())


def _pair_truth(rows, w, b, opts: PairOptions, coefs: B.PairCoefs):
    """Statistics, divergence, CE of both views and the gradients, from materialised fp64 logits."""
    tau, cap = opts.temperature, opts.softcap
    xp, xq, ww, bb = (t.double().requires_grad_() for t in (rows.xp, rows.xq, w, b))
    zp, zq = R.logits(xp, ww, bb, cap), R.logits(xq, ww, bb, cap)
    a, bq = zp / tau, zq / tau
    la, lb = torch.log_softmax(a, 1), torch.log_softmax(bq, 1)
    p, q = la.exp(), lb.exp()
    u = a - bq
    st = torch.zeros(N, maths.N_PAIR_STATS, dtype=torch.float64)
    st[:, Stat.LSE_P], st[:, Stat.LSE_Q] = torch.logsumexp(zp, 1), torch.logsumexp(zq, 1)
    st[:, Stat.LSET_P], st[:, Stat.LSET_Q] = torch.logsumexp(a, 1), torch.logsumexp(bq, 1)
    d = maths.Divergence.of(opts.divergence)
    if d == maths.Divergence.SCE:
        X, Y = (p * bq).sum(1), (q * a).sum(1)
    elif d == maths.Divergence.KL:
        X, Y = (p * u).sum(1), (p * torch.expm1(-u)).sum(1)
    else:  # kl_reverse
        X, Y = (q * torch.expm1(u)).sum(1), (q * u).sum(1)
    st[:, Stat.X], st[:, Stat.Y] = X.detach(), Y.detach()
    div = R.divergence_from_logits(zp.detach() if opts.detach == "p" else zp,
                                   zq.detach() if opts.detach == "q" else zq, opts.divergence, tau)
    ce_p = R.cross_entropy_from_logits(zp, rows.yp)
    ce_q = R.cross_entropy_from_logits(zq, rows.yq)
    total = (coefs.div.double() * div).sum() + (coefs.ce_p.double() * ce_p).sum() + (coefs.ce_q.double() * ce_q).sum()
    total.backward()
    return st, div.detach(), ce_p.detach(), ce_q.detach(), xp.grad, xq.grad, ww.grad, bb.grad


@pytest.mark.precision
@pytest.mark.parametrize("divergence,detach", [("sce", None), ("kl", "p"), ("kl_reverse", None)])
def test_pair_forward_backward_promises(be, divergence, detach):
    x, xq, w, b, y, yq = _data(3)
    tol = _tol(torch.cat([x, xq]), w, 6)
    y, yq = y.clamp(max=V - 1), yq.clamp(max=V - 1)  # no shard sentinels in the two-view op
    y[y == V - 1 - 0] = IGN
    opts = PairOptions(divergence=divergence, temperature=1.5, detach=detach)
    rows = B.PairRows(xp=x, xq=xq, yp=y, yq=yq)
    out = be.pair_forward(rows, w, b, opts)
    g = torch.Generator().manual_seed(4)
    coefs = B.PairCoefs(div=torch.rand(N, generator=g), ce_p=torch.rand(N, generator=g) * (y != IGN),
                        ce_q=torch.rand(N, generator=g) * (yq != IGN))
    st_t, div_t, cep_t, ceq_t, dxp_t, dxq_t, dw_t, db_t = _pair_truth(rows, w, b, opts, coefs)
    for col in Stat:
        if col in (Stat.X2, Stat.Y2):
            continue
        assert_within(out.stats[:, col], st_t[:, col], atol=tol, rtol=1e-4, name=col.name)
    assert_within(out.div, div_t, atol=tol, rtol=1e-4, name="div")
    torch.testing.assert_close(maths.divergence_from_stats(out.stats, divergence), out.div, rtol=1e-5, atol=1e-6)
    assert_within(out.ce_p, cep_t, atol=tol, name="ce_p")
    assert_within(out.ce_q, ceq_t, atol=tol, name="ce_q")
    dw0, db0 = torch.randn(V, H), torch.randn(V)
    grads = B.PairGrads(dxp=torch.full((N, H), float("nan")), dxq=torch.full((N, H), float("nan")),
                        dw=dw0.clone(), db=db0.clone())
    be.pair_backward(rows, w, b, out, coefs, opts, grads)
    assert_within(grads.dxp, dxp_t, atol=tol, rtol=1e-4, name="dxp")
    assert_within(grads.dxq, dxq_t, atol=tol, rtol=1e-4, name="dxq")
    assert_within(grads.dw - dw0, dw_t, atol=tol, rtol=1e-4, name="dw")
    assert_within(grads.db - db0, db_t, atol=tol, rtol=1e-4, name="db")
    if be.caps.fused_forward_backward:
        g2 = B.PairGrads(dxp=torch.full((N, H), float("nan")), dxq=torch.full((N, H), float("nan")),
                         dw=dw0.clone(), db=db0.clone())
        out2 = be.pair_forward_backward(rows, w, b, opts, coefs, g2)
        torch.testing.assert_close(out2.div, out.div, rtol=1e-5, atol=1e-6)
        for a, c in ((g2.dxp, grads.dxp), (g2.dxq, grads.dxq), (g2.dw, grads.dw), (g2.db, grads.db)):
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)


def test_pair_js_partial_on_own_normalisers_is_js(be):
    if not be.caps.js_partial:
        with pytest.raises(NotImplementedError):
            be.pair_js_partial(*_data(5)[:2], *_data(5)[2:4], torch.zeros(N, 2), PairOptions(divergence="js"))
        return
    x, xq, w, b, _, _ = _data(5)
    tau = 2.0
    a, bq = _logits64(x, w, b, None) / tau, _logits64(xq, w, b, None) / tau
    lset = torch.stack([torch.logsumexp(a, 1), torch.logsumexp(bq, 1)], 1).float()
    got = be.pair_js_partial(x, xq, w, b, lset, PairOptions(divergence="js", temperature=tau, with_ce=False))
    la, lb = torch.log_softmax(a, 1), torch.log_softmax(bq, 1)
    lm = torch.logaddexp(la, lb) - torch.log(torch.tensor(2.0, dtype=torch.float64))
    want = torch.stack([(la.exp() * (la - lm)).sum(1), (lb.exp() * (lb - lm)).sum(1)], 1)
    assert_within(got, want, atol=2e-6, rtol=1e-4, name="js partial")


@pytest.mark.precision
def test_unpaired_rows_take_ce_only(be):
    """PairRows.xu: CE-only rows in the same call (long-short's unpaired rows); their ce_u / lse_u and dxu."""
    x, xq, w, b, y, yq = _data(6)
    tol = _tol(x * 1.7, w, 4)
    y, yq = y.clamp(max=V - 1), yq.clamp(max=V - 1)
    xu, yu = x[:5] * 1.7, y[:5].clone()
    yu[1] = IGN
    rows = B.PairRows(xp=x, xq=xq, yp=y, yq=yq, xu=xu, yu=yu)
    opts = PairOptions(divergence="sce")
    out = be.pair_forward(rows, w, b, opts)
    loss_t, lse_t, dx_t, _, _ = _ce_truth(xu, w, b, yu, None, torch.ones(5) * (yu != IGN))
    assert_within(out.lse_u, lse_t, atol=tol, name="lse_u")
    assert_within(out.ce_u, loss_t, atol=tol, name="ce_u")
    coefs = B.PairCoefs(div=torch.zeros(N), ce_p=torch.zeros(N), ce_q=torch.zeros(N), ce_u=(yu != IGN).float())
    grads = B.PairGrads(dxp=torch.empty(N, H), dxq=torch.empty(N, H), dxu=torch.full((5, H), float("nan")))
    be.pair_backward(rows, w, b, out, coefs, opts, grads)
    assert_within(grads.dxu, dx_t, atol=tol, name="dxu")
    assert (grads.dxp == 0).all() and (grads.dxq == 0).all()  # zero coefficients: overwritten with zeros


@pytest.mark.parametrize("detach", ["p", "q"])
def test_detached_view_dx_is_overwritten_with_zeros(be, detach):
    """A view without gradient (detach, no CE) whose dx buffer is still given: overwritten with zeros, never left
    as it was (the buffers come from torch.empty)."""
    x, xq, w, b, _, _ = _data(7)
    opts = PairOptions(divergence="kl", detach=detach, with_ce=False)
    rows = B.PairRows(xp=x, xq=xq)
    out = be.pair_forward(rows, w, b, opts)
    grads = B.PairGrads(dxp=torch.full((N, H), float("nan")), dxq=torch.full((N, H), float("nan")))
    be.pair_backward(rows, w, b, out, B.PairCoefs(div=torch.ones(N)), opts, grads)
    frozen, live = (grads.dxp, grads.dxq) if detach == "p" else (grads.dxq, grads.dxp)
    assert (frozen == 0).all()
    assert torch.isfinite(live).all() and live.abs().sum() > 0


# ------------------------------------------------------------------------------- dense targets (ce_dense_*)


@pytest.mark.parametrize("cap", [None, 7.0])
@pytest.mark.parametrize("form", ["prob", "index"])
def test_dense_ops(be, cap, form):
    """contract ce_dense_*: the per-row sums (lse, Σtcz, Σtc, Σcz, z_y with no z_y for y >= V or ignored), and the
    backward's dz = (coef_p·p − coef·T)·cap' (dx overwritten, dW/db accumulated) and dt = coef·κ·c(lse − z),
    against autograd on materialised fp64 logits; the fused op equals forward then backward."""
    from lsa_kernels.backends.contract import DenseTarget, Grads

    x, _, w, b, y, _ = _data(3)
    g = torch.Generator().manual_seed(9)
    t = torch.softmax(torch.randn(N, V, generator=g), -1)
    c = torch.rand(V, generator=g) + 0.2
    coef = torch.rand(N, generator=g)
    A_like = torch.rand(N, generator=g) + 0.5  # any lse coefficient: coef_p = coef·A_like
    alpha = torch.rand(N, generator=g)
    if form == "prob":
        T, yy = DenseTarget(t, c, 0.7, 0.3 / V, None, None, c.sum()), None
    else:
        T, yy = DenseTarget(None, c, 0.0, 0.2 / V, alpha, None, c.sum()), y
    o = CEOptions(softcap=cap)
    out = be.ce_dense_forward(x, w, b, yy, T, o)
    xx, ww, bb = (v.double().requires_grad_() for v in (x, w, b))
    tt = t.double().requires_grad_()
    z = R.logits(xx, ww, bb, cap)
    lse = torch.logsumexp(z, 1)
    cd = c.double()
    tz, tm = (tt * cd * z).sum(1), (tt * cd).sum(1)
    cz = (z * cd).sum(1)
    here = (y != IGN) & (y < V)
    zy = torch.where(here, z.gather(1, torch.where(here, y, 0)[:, None])[:, 0], torch.zeros_like(lse))
    want = dict(lse=lse, tz=tz, tm=tm, cz=cz, zy=zy)
    for k in ("lse", "tz", "tm", "cz") + (("zy",) if form == "index" else ()):
        if form == "index" and k in ("tz", "tm"):
            continue
        assert_within(getattr(out, k), want[k].detach(), atol=2e-5, rtol=2e-5, name=k)
    # gradient of Σ coef·((A_like + κ·Σtc)·lse − Σ T z) (T's one-hot weight alpha for index targets): dz =
    # coef·((A_like + κ·Σtc)·p − T), dt = coef·κ·c·(lse − z) — the contract's, with coef_p = coef·(A_like + κ·Σtc)
    L = T.kappa * tz + T.beta * cz + (alpha.double() * zy if form == "index" else 0.0)
    total = (coef.double() * ((A_like.double() + T.kappa * tm) * lse - L)).sum()
    gx, gw, gb, gt = torch.autograd.grad(total, [xx, ww, bb, tt], allow_unused=True)
    grads = Grads(dx=torch.full((N, H), 7.0), dw=torch.ones(V, H), db=torch.ones(V))
    dt = torch.full((N, V), 5.0) if form == "prob" else None
    be.ce_dense_backward(x, w, b, yy, T, out.lse, coef * (A_like + T.kappa * out.tm), coef, o, grads, dt=dt)
    assert_within(grads.dx, gx, atol=2e-5, rtol=1e-4, name="dx (overwritten)")
    assert_within(grads.dw, gw + 1, atol=2e-5, rtol=1e-4, name="dw (accumulated)")
    assert_within(grads.db, gb + 1, atol=2e-5, rtol=1e-4, name="db (accumulated)")
    if form == "prob":
        assert_within(dt, gt, atol=2e-5, rtol=1e-4, name="dt")
    if be.caps.fused_forward_backward:  # coef_p formed inside: A = κ·tm + β·Σc + α (no z-loss here)
        A = T.kappa * out.tm + T.beta * T.c_sum + (alpha if form == "index" else 0.0)
        g1 = Grads(dx=torch.empty(N, H), dw=torch.zeros(V, H), db=torch.zeros(V))
        be.ce_dense_backward(x, w, b, yy, T, out.lse, coef * A, coef, o, g1)
        g2 = Grads(dx=torch.empty(N, H), dw=torch.zeros(V, H), db=torch.zeros(V))
        fo = be.ce_dense_forward_backward(x, w, b, yy, T, o, coef, g2)
        torch.testing.assert_close(fo.lse, out.lse)
        for a_, b_ in zip((g1.dx, g1.dw, g1.db), (g2.dx, g2.dw, g2.db)):
            torch.testing.assert_close(a_, b_, rtol=1e-5, atol=1e-6)
