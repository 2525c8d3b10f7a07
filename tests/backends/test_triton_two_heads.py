"""Two heads and per-token outputs in the Triton kernels (TRITON_INTERPRET=1): two heads for the pair ops (docs/maths.md §12) and the
per-token outputs of the CE forward (entropy, argmax; §3).

Truth: plain torch on materialised logits in float64 (lsa_kernels.reference for logits / divergences,
torch.softmax for the entropy, torch.argmax), gradients by autograd of ``Σ coef·per_row``. fp32 inputs:
allclose; bf16 inputs: CCE's rule, |ours − truth| ≤ |torch bf16 − truth| + tol (docs/maths.md §7). Shapes are
odd (N = 37, Hp = 61, Hq = 45, V = 1003: no block multiple) and small (the interpreter pays per tile step).
"""

from __future__ import annotations

import pytest
import torch

from lsa_kernels import reference as R
from lsa_kernels.kernels import pair_backward, pair_forward, pair_js_partial
from lsa_kernels.kernels._common import LaunchConfig, override_config
from lsa_kernels.maths import Stat
from lsa_kernels.options import CEOptions, PairOptions
from _util import assert_within, grad_or_zeros, leaf_or_none, row_coef

N, HP, HQ, V = 37, 61, 45, 1003
IGN = -100
DIVS = ["sce", "kl", "kl_reverse", "sym_kl", "js"]
SMALL_BLOCKS = LaunchConfig(32, 256, 32, SPLIT_V=3, GROUP=2)
GRADS = ("dxp", "dxq", "dw", "db", "dwq", "dbq")


def _inputs(dtype, bias_p, bias_q, *, seed=0):
    """Teacher (view p: xp [N, HP], w [V, HP]) and student (view q: xq [N, HQ], wq [V, HQ]) with correlated
    logits (the student's head is a noisy projection of the teacher's), targets with ignored rows."""
    g = torch.Generator().manual_seed(seed)
    xp = torch.randn(N, HP, generator=g)
    w = torch.randn(V, HP, generator=g) * (1.5 / HP**0.5)
    proj = torch.randn(HP, HQ, generator=g) / HP**0.5
    xq = xp @ proj + 0.3 * torch.randn(N, HQ, generator=g)
    wq = w @ proj * 1.2 + 0.2 * torch.randn(V, HQ, generator=g) / HQ**0.5
    b = torch.randn(V, generator=g) * 0.5 if bias_p else None
    bq = torch.randn(V, generator=g) * 0.5 if bias_q else None
    yp = torch.randint(0, V, (N,), generator=g)
    yq = torch.randint(0, V, (N,), generator=g)
    yp[[2, 11, 30]] = IGN
    yq[[5, 11]] = IGN
    cast = lambda t: None if t is None else t.to(dtype).contiguous()  # noqa: E731
    return dict(xp=cast(xp), xq=cast(xq), w=cast(w), b=cast(b), wq=cast(wq), bq=cast(bq), yp=yp, yq=yq)


_coef, _leaf, _grad = row_coef, leaf_or_none, grad_or_zeros  # tests/_util.py


_close = assert_within  # tests/_util.py


# ----------------------------------------------------------------------------------------- two heads


def _pair2_ref(t, cp, cq, cd, opts: PairOptions, dtype):
    """Plain torch on the materialised logits of both heads (cp / cq None: no CE on that view)."""
    L = {k: _leaf(t[k], dtype) for k in ("xp", "xq", "w", "b", "wq", "bq")}
    za = R.logits(L["xp"], L["w"], L["b"], opts.softcap)
    zb = R.logits(L["xq"], L["wq"], L["bq"], opts.softcap)
    a = za.detach() if opts.detach == "p" else za
    bb = zb.detach() if opts.detach == "q" else zb
    div = R.divergence_from_logits(a, bb, opts.divergence, opts.temperature)
    total = (div.double() * cd.double()).sum()
    out = dict(div=div.detach(), ce_p=torch.zeros(N), ce_q=torch.zeros(N))
    kw = dict(ignore_index=opts.ce.ignore_index, label_smoothing=opts.ce.label_smoothing, z_loss=opts.ce.z_loss)
    for view, z, y, c in (("p", za, t["yp"], cp), ("q", zb, t["yq"], cq)):
        if opts.with_ce and c is not None:
            ce = R.cross_entropy_from_logits(z, y, **kw)
            total = total + (ce.double() * c.double()).sum()
            out[f"ce_{view}"] = ce.detach()
    total.backward()
    out.update(dxp=_grad(L["xp"]), dxq=_grad(L["xq"]), dw=_grad(L["w"]), db=_grad(L["b"]), dwq=_grad(L["wq"]),
               dbq=_grad(L["bq"]))
    return out


def _run_pair2(t, cp, cq, cd, opts, *, teacher_grads=True, dw0=None):
    yp = t["yp"] if cp is not None else None
    yq = t["yq"] if cq is not None else None
    ce_p, ce_q, div, stats = pair_forward(t["xp"], t["xq"], t["w"], t["b"], yp, yq, opts, wq=t["wq"], bq=t["bq"])
    f32 = lambda *s: torch.zeros(s)  # noqa: E731
    out = dict(ce_p=ce_p, ce_q=ce_q, div=div, stats=stats, dxq=torch.full(t["xq"].shape, float("nan")),
               dwq=f32(*t["wq"].shape), dbq=f32(V) if t["bq"] is not None else None)
    if dw0 is not None:
        out["dwq"] += dw0
    if teacher_grads:
        out.update(dxp=torch.full(t["xp"].shape, float("nan")), dw=f32(*t["w"].shape),
                   db=f32(V) if t["b"] is not None else None)
    else:
        out.update(dxp=None, dw=None, db=None)
    pair_backward(t["xp"], t["xq"], t["w"], t["b"], yp, yq, stats, cp, cq, cd, opts,
                  out["dxp"], out["dxq"], out["dw"], out["db"], wq=t["wq"], bq=t["bq"], dwq_out=out["dwq"],
                  dbq_out=out["dbq"])
    return out


def _check2(ours, truth, lowp=None, atol=2e-5):
    for k in ("div", "ce_p", "ce_q") + GRADS:
        if ours.get(k) is None:
            continue
        assert ours[k].dtype == torch.float32, k
        a = atol
        if lowp is not None and k in GRADS:  # dz rounded to bf16 for the gradient GEMMs (test_triton_kernels)
            a = atol + 2.0**-8 * truth[k].abs().max().item()
        _close(ours[k], truth[k], atol=a, lowp=None if lowp is None else lowp[k], name=k)


# every divergence × (both views trained, τ = 1, shared softcap) and (distillation: frozen teacher, τ = 2,
# CE on the student only)
MODES = {
    "both-t1": dict(detach=None, temperature=1.0, ce_p=True, softcap=5.0, bias=(True, False)),
    "distill-t2": dict(detach="p", temperature=2.0, ce_p=False, softcap=None, bias=(False, True)),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("divergence", DIVS)
def test_two_heads_fp32(divergence, mode):
    m = MODES[mode]
    t = _inputs(torch.float32, *m["bias"], seed=1)
    cp = _coef(N, 1, t["yp"]) if m["ce_p"] else None
    cq, cd = _coef(N, 2, t["yq"]), _coef(N, 3, p_zero=0.2)
    opts = PairOptions(divergence=divergence, temperature=m["temperature"], detach=m["detach"],
                       ce=CEOptions(softcap=m["softcap"], label_smoothing=0.1 if m["ce_p"] else 0.0))
    ours = _run_pair2(t, cp, cq, cd, opts)
    truth = _pair2_ref(t, cp, cq, cd, opts, torch.float64)
    _check2(ours, truth)
    if m["detach"] == "p":  # frozen teacher: no gradient on its side at all
        for k in ("dxp", "dw", "db"):
            if ours[k] is not None:
                assert torch.equal(ours[k], torch.zeros_like(ours[k])), k


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
@pytest.mark.parametrize("divergence", ["kl", "js"])
def test_two_heads_small_blocks(divergence, deterministic):
    """Several row blocks, H chunks (both hidden sizes), V splits, row chunks of the dz buffer (16 rows: 3
    chunks); dW_q accumulates into a non-zero buffer; both heads biased, z-loss, softcap, τ ≠ 1."""
    t = _inputs(torch.float32, True, True, seed=2)
    cp, cq, cd = _coef(N, 4, t["yp"], p_zero=0.3), _coef(N, 5, t["yq"]), _coef(N, 6, p_zero=0.2)
    opts = PairOptions(divergence=divergence, temperature=0.7,
                       ce=CEOptions(softcap=6.0, z_loss=1e-3, deterministic=deterministic, chunk_bytes=2 * 16 * V * 4))
    dw0 = torch.randn(V, HQ)
    with override_config(SMALL_BLOCKS):
        ours = _run_pair2(t, cp, cq, cd, opts, dw0=dw0)
    truth = _pair2_ref(t, cp, cq, cd, opts, torch.float64)
    truth["dwq"] = truth["dwq"] + dw0.double()
    _check2(ours, truth)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
@pytest.mark.parametrize("divergence", ["sce", "kl", "js"])
def test_two_heads_bf16(divergence, deterministic):
    t = _inputs(torch.bfloat16, True, True, seed=3)
    cp, cq, cd = None, _coef(N, 2, t["yq"]), _coef(N, 3)
    opts = PairOptions(divergence=divergence, temperature=2.0, detach="p", ce=CEOptions(deterministic=deterministic))
    ours = _run_pair2(t, cp, cq, cd, opts, teacher_grads=False)
    truth = _pair2_ref(t, cp, cq, cd, opts, torch.float64)
    lowp = _pair2_ref(t, cp, cq, cd, opts, torch.bfloat16)
    _check2(ours, truth, lowp=lowp, atol=1e-4)


def test_two_heads_bf16_both_trained():
    t = _inputs(torch.bfloat16, True, False, seed=4)
    cp, cq, cd = _coef(N, 1, t["yp"]), _coef(N, 2, t["yq"]), _coef(N, 3)
    opts = PairOptions(divergence="sym_kl", ce=CEOptions(softcap=8.0))
    ours = _run_pair2(t, cp, cq, cd, opts)
    truth = _pair2_ref(t, cp, cq, cd, opts, torch.float64)
    lowp = _pair2_ref(t, cp, cq, cd, opts, torch.bfloat16)
    _check2(ours, truth, lowp=lowp, atol=1e-4)


def test_two_heads_same_as_shared_when_heads_equal():
    """wq = w, bq = b, Hq = Hp: the two-head specialisation gives the shared-head results (dW_p + dW_q = dW)."""
    t = _inputs(torch.float32, True, True, seed=5)
    t["xq"] = t["xp"] + 0.3 * torch.randn(N, HP)
    t["wq"], t["bq"] = t["w"], t["b"]
    cp, cq, cd = _coef(N, 1, t["yp"]), _coef(N, 2, t["yq"]), _coef(N, 3)
    opts = PairOptions(divergence="kl", temperature=0.7, ce=CEOptions(softcap=5.0))
    two = _run_pair2(t, cp, cq, cd, opts)
    f = lambda *s: torch.zeros(s)  # noqa: E731
    ce_p, ce_q, div, stats = pair_forward(t["xp"], t["xq"], t["w"], t["b"], t["yp"], t["yq"], opts)
    one = dict(dxp=f(N, HP), dxq=f(N, HP), dw=f(V, HP), db=f(V))
    pair_backward(t["xp"], t["xq"], t["w"], t["b"], t["yp"], t["yq"], stats, cp, cq, cd, opts,
                  one["dxp"], one["dxq"], one["dw"], one["db"])
    for k, v in (("ce_p", ce_p), ("ce_q", ce_q), ("div", div), ("stats", stats)):
        torch.testing.assert_close(two[k], v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(two["dxp"], one["dxp"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(two["dxq"], one["dxq"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(two["dw"] + two["dwq"], one["dw"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(two["db"] + two["dbq"], one["db"], rtol=1e-5, atol=1e-6)


def test_two_heads_js_partial():
    t = _inputs(torch.float32, True, True, seed=6)
    opts = PairOptions(divergence="js", temperature=1.5, ce=CEOptions(softcap=7.0))
    _, _, _, stats = pair_forward(t["xp"], t["xq"], t["w"], t["b"], None, None, opts, wq=t["wq"], bq=t["bq"])
    lset = stats[:, Stat.LSET_P:Stat.LSET_Q + 1]
    part = pair_js_partial(t["xp"], t["xq"], t["w"], t["b"], lset, opts, wq=t["wq"], bq=t["bq"])
    d = {k: (None if v is None else v.double()) for k, v in t.items()}
    a = R.logits(d["xp"], d["w"], d["b"], 7.0) / 1.5
    b = R.logits(d["xq"], d["wq"], d["bq"], 7.0) / 1.5
    p, q = torch.softmax(a, -1), torch.softmax(b, -1)
    m = 0.5 * (p + q)
    _close(part[:, 0], (p * (p / m).log()).sum(-1), atol=1e-6, name="X")
    _close(part[:, 1], (q * (q / m).log()).sum(-1), atol=1e-6, name="Y")


# ----------------------------------------------------------------------------------------- CE on one view


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
def test_ce_on_student_only_equals_all_ignored_teacher(deterministic):
    """yp=None / coef_ce_p=None (no teacher CE, CE_P=False) gives the same numbers as yp with every row =
    ignore_index (ce_p = 0, no CE gradient on the teacher); with detach="p" neither path touches the teacher's
    gradient buffers beyond zero-filling dx_p."""
    t = _inputs(torch.float32, True, True, seed=7)
    cq, cd = _coef(N, 2, t["yq"]), _coef(N, 3)
    opts = PairOptions(divergence="kl", temperature=2.0, detach="p", ce=CEOptions(deterministic=deterministic))
    flag = _run_pair2(t, None, cq, cd, opts)
    t_ign = dict(t, yp=torch.full((N,), IGN))
    ign = _run_pair2(t_ign, torch.ones(N), cq, cd, opts)
    assert torch.equal(ign["ce_p"], torch.zeros(N)) and torch.equal(flag["ce_p"], torch.zeros(N))
    for k in ("ce_q", "div", "stats", "dxq", "dwq", "dbq"):
        torch.testing.assert_close(flag[k], ign[k], rtol=1e-6, atol=1e-7)
    for out in (flag, ign):
        assert torch.equal(out["dxp"], torch.zeros(N, HP))
        assert torch.equal(out["dw"], torch.zeros(V, HP)) and torch.equal(out["db"], torch.zeros(V))
    _check2(flag, _pair2_ref(t, None, cq, cd, opts, torch.float64))


def test_shared_head_ce_on_one_view():
    """One shared head, CE on view q only (coef_ce_p=None): matches the reference with no p-side CE."""
    t = _inputs(torch.float32, True, False, seed=8)
    t["xq"] = t["xp"] + 0.3 * torch.randn(N, HP)
    cq, cd = _coef(N, 2, t["yq"]), _coef(N, 3)
    opts = PairOptions(divergence="sce", temperature=0.7, ce=CEOptions(label_smoothing=0.1))
    ce_p, ce_q, div, stats = pair_forward(t["xp"], t["xq"], t["w"], t["b"], None, t["yq"], opts)
    g = dict(dxp=torch.zeros(N, HP), dxq=torch.zeros(N, HP), dw=torch.zeros(V, HP), db=torch.zeros(V))
    pair_backward(t["xp"], t["xq"], t["w"], t["b"], None, t["yq"], stats, None, cq, cd, opts,
                  g["dxp"], g["dxq"], g["dw"], g["db"])
    truth = _pair2_ref(dict(t, wq=t["w"], bq=t["b"]), None, cq, cd, opts, torch.float64)
    truth["dw"] = truth["dw"] + truth["dwq"]
    truth["db"] = truth["db"] + truth["dbq"]
    _check2(dict(ce_p=ce_p, ce_q=ce_q, div=div, **g), {k: truth[k] for k in ("ce_p", "ce_q", "div", *g)})


# ----------------------------------------------------------------------------------------- frozen teacher


def test_frozen_teacher_launches_no_p_side_work(monkeypatch):
    """detach="p" without teacher CE: the backward kernels are specialised with USE_GP=False (no p-side dz,
    no p-side GEMM), the deterministic dz buffer holds the student's rows only."""
    from lsa_kernels.kernels import pair_bwd

    seen = []
    for name in ("pair_bwd_kernel", "pair_dz_kernel"):
        k = getattr(pair_bwd, name)

        class Rec:
            def __getitem__(self, grid, _k=k, _n=name):
                def run(*a, **kw):
                    seen.append((_n, kw))
                    return _k[grid](*a, **kw)
                return run
        monkeypatch.setattr(pair_bwd, name, Rec())
    t = _inputs(torch.float32, True, True, seed=9)
    for det in (False, True):
        opts = PairOptions(divergence="kl", temperature=2.0, detach="p", ce=CEOptions(deterministic=det))
        _run_pair2(t, None, _coef(N, 2, t["yq"]), _coef(N, 3), opts)
    assert [n for n, _ in seen] == ["pair_bwd_kernel", "pair_dz_kernel"]
    for _, kw in seen:
        assert kw["TWO_HEADS"] and not kw["USE_GP"] and kw["USE_GQ"] and not kw["CE_P"] and kw["CE_Q"], kw
        assert not kw["NEED_DB"] and kw["NEED_DBQ"], kw
    assert not seen[0][1]["NEED_DXP"] and not seen[0][1]["NEED_DW"] and seen[0][1]["NEED_DWQ"]


# ----------------------------------------------------------------------------------------- bad input


def test_two_heads_bad_input():
    t = _inputs(torch.float32, True, True, seed=10)
    opts = PairOptions(divergence="kl")
    args = (t["xp"], t["xq"], t["w"], t["b"], t["yp"], t["yq"], opts)
    with pytest.raises(ValueError, match="wq"):
        pair_forward(*args, wq=t["wq"][:-1])
    with pytest.raises(ValueError, match="xq"):
        pair_forward(t["xp"], t["xq"][:, :-1], *args[2:], wq=t["wq"])
    with pytest.raises(ValueError, match="xq has 36 rows"):
        pair_forward(t["xp"], t["xq"][:-1], *args[2:], wq=t["wq"])
    with pytest.raises(ValueError, match="dtype"):
        pair_forward(*args, wq=t["wq"].double())
    with pytest.raises(ValueError, match="bq"):
        pair_forward(*args, wq=t["wq"], bq=t["bq"][:-1])
    with pytest.raises(ValueError, match="bq"):
        pair_forward(*args, bq=t["bq"])
    with pytest.raises(ValueError, match="hidden size"):
        pair_forward(*args)  # Hq ≠ Hp with one shared head
    stats = torch.zeros(N, 8)
    with pytest.raises(ValueError, match="dwq_out"):
        pair_backward(t["xp"], t["xp"], t["w"], t["b"], t["yp"], t["yq"], stats, None, None, torch.ones(N), opts,
                      None, None, None, None, dwq_out=torch.zeros(V, HP))
    with pytest.raises(ValueError, match="dwq_out"):  # the shape of view p's head, not view q's
        pair_backward(t["xp"], t["xq"], t["w"], t["b"], t["yp"], t["yq"], stats, None, None, torch.ones(N), opts,
                      None, None, None, None, wq=t["wq"], dwq_out=torch.zeros(V, HP))


# ----------------------------------------------------------------------------------------- per-token outputs


CE_CASES = {
    "plain": dict(bias=False, opts=dict()),
    "all": dict(bias=True, opts=dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0)),
}


def _ce_inputs(dtype, bias, seed):
    t = _inputs(dtype, bias, False, seed=seed)
    return t["xp"], t["w"], t["b"], t["yp"]


def _entropy_ref(x, w, b, y, coef, cent, opts: CEOptions, dtype):
    """Plain torch: CE rows, H = −Σ p log p of the materialised logits, gradients of Σ coef·ce + Σ cent·H."""
    xd, wd, bd = _leaf(x, dtype), _leaf(w, dtype), _leaf(b, dtype)
    z = R.logits(xd, wd, bd, opts.softcap)
    ce = R.cross_entropy_from_logits(z, y, ignore_index=opts.ignore_index, label_smoothing=opts.label_smoothing,
                                     z_loss=opts.z_loss)
    logp = torch.log_softmax(z.double() if dtype == torch.float64 else z, -1)
    h = -(logp.exp() * logp).sum(-1)
    total = (ce.double() * coef.double()).sum()
    if cent is not None:
        total = total + (h.double() * cent.double()).sum()
    total.backward()
    return dict(loss=ce.detach(), entropy=h.detach(), z=z.detach(), dx=_grad(xd), dw=_grad(wd), db=_grad(bd))


@pytest.mark.parametrize("blocks", ["default", "small"])
@pytest.mark.parametrize("case", list(CE_CASES))
def test_ce_forward_ext_fp32(case, blocks):
    from lsa_kernels.kernels import ce_forward, ce_forward_ext

    c = CE_CASES[case]
    x, w, b, y = _ce_inputs(torch.float32, c["bias"], seed=11)
    opts = CEOptions(**c["opts"])
    with override_config(SMALL_BLOCKS) if blocks == "small" else _nullcontext():
        out = ce_forward_ext(x, w, b, y, opts, entropy=True, argmax=True)
        only_h = ce_forward_ext(x, w, b, y, opts, entropy=True)
        only_a = ce_forward_ext(x, w, b, y, opts, argmax=True)
        loss, lse = ce_forward(x, w, b, y, opts)
    assert torch.equal(out.loss, loss) and torch.equal(out.lse, lse)
    assert only_h.argmax is None and only_a.entropy is None
    assert torch.equal(only_h.entropy, out.entropy) and torch.equal(only_a.argmax, out.argmax)
    assert out.entropy.dtype == torch.float32 and out.argmax.dtype == torch.int64
    truth = _entropy_ref(x, w, b, y, torch.zeros(N), None, opts, torch.float64)
    _close(out.entropy, truth["entropy"], atol=2e-6, rtol=1e-5, name="entropy")
    z = truth["z"].double()
    top2 = z.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4
    assert clear.sum() > N // 2
    assert torch.equal(out.argmax[clear], z.argmax(-1)[clear])
    assert (z.gather(1, out.argmax[:, None]).squeeze(1) >= top2[:, 0] - 1e-4).all()


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def test_ce_argmax_ties_lowest_index():
    """Exact ties (identical rows of W in different V tiles and splits): the lowest index, as torch.argmax."""
    from lsa_kernels.kernels import ce_forward_ext

    x, w, _, y = _ce_inputs(torch.float32, False, seed=12)
    w = w.clone()
    big = x.mean(0) * 10.0  # a row of W every x agrees with: the max of most rows
    for v in (900, 300, 301, 777):
        w[v] = big
    z = x.double() @ w.double().T
    rows = z.argmax(-1) == 300
    assert rows.sum() > N // 2
    for blocks in (None, SMALL_BLOCKS, LaunchConfig(16, 16, 16, SPLIT_V=7)):
        with override_config(blocks) if blocks is not None else _nullcontext():
            out = ce_forward_ext(x, w, None, y, CEOptions(), argmax=True)
        assert (out.argmax[rows] == 300).all(), out.argmax[rows]
        torch.testing.assert_close(out.argmax, (x @ w.T).argmax(-1), rtol=0, atol=0)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
@pytest.mark.parametrize("case", list(CE_CASES))
def test_ce_entropy_gradient_fp32(case, deterministic):
    """dz = coef·∂CE/∂z + coef_entropy·∂H/∂z in the same dz; the entropy coefficient also on ignored rows
    (whose CE coefficient is 0), negative and zero coefficients, several blocks / splits / row chunks."""
    from lsa_kernels.kernels import ce_backward, ce_forward_ext

    c = CE_CASES[case]
    x, w, b, y = _ce_inputs(torch.float32, c["bias"], seed=13)
    opts = CEOptions(**c["opts"], deterministic=deterministic, chunk_bytes=16 * V * 4)
    coef = _coef(N, 1, y, p_zero=0.2)
    cent = _coef(N, 2, p_zero=0.2) - 0.9  # both signs
    with override_config(SMALL_BLOCKS):
        out = ce_forward_ext(x, w, b, y, opts, entropy=True)
        dx = torch.full(x.shape, float("nan"))
        dw, db = torch.zeros(w.shape), (torch.zeros(V) if b is not None else None)
        ce_backward(x, w, b, y, out.lse, coef, opts, dx, dw, db, coef_entropy=cent, entropy=out.entropy)
    truth = _entropy_ref(x, w, b, y, coef, cent, opts, torch.float64)
    for k, v in (("dx", dx), ("dw", dw), ("db", db)):
        if v is not None:
            _close(v, truth[k], atol=2e-5, name=k)


def test_ce_entropy_gradient_only():
    """Every CE coefficient 0 (all targets ignored): the entropy gradient alone (rows stay live)."""
    from lsa_kernels.kernels import ce_backward, ce_forward_ext

    x, w, b, _ = _ce_inputs(torch.float32, True, seed=14)
    y = torch.full((N,), IGN)
    opts = CEOptions(softcap=4.0)
    out = ce_forward_ext(x, w, b, y, opts, entropy=True)
    assert torch.equal(out.loss, torch.zeros(N))
    cent = torch.ones(N)
    dx, dw, db = torch.zeros(x.shape), torch.zeros(w.shape), torch.zeros(V)
    ce_backward(x, w, b, y, out.lse, torch.ones(N), opts, dx, dw, db, coef_entropy=cent, entropy=out.entropy)
    truth = _entropy_ref(x, w, b, y, torch.zeros(N), cent, opts, torch.float64)
    assert truth["dx"].abs().max() > 1e-3
    for k, v in (("dx", dx), ("dw", dw), ("db", db)):
        _close(v, truth[k], atol=2e-5, name=k)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
def test_ce_entropy_bf16(deterministic):
    from lsa_kernels.kernels import ce_backward, ce_forward_ext

    x, w, b, y = _ce_inputs(torch.bfloat16, True, seed=15)
    opts = CEOptions(softcap=6.0, deterministic=deterministic)
    coef, cent = _coef(N, 1, y), _coef(N, 2) * 0.5
    out = ce_forward_ext(x, w, b, y, opts, entropy=True, argmax=True)
    dx, dw, db = torch.zeros(x.shape), torch.zeros(w.shape), torch.zeros(V)
    ce_backward(x, w, b, y, out.lse, coef, opts, dx, dw, db, coef_entropy=cent, entropy=out.entropy)
    truth = _entropy_ref(x, w, b, y, coef, cent, opts, torch.float64)
    lowp = _entropy_ref(x, w, b, y, coef, cent, opts, torch.bfloat16)
    _close(out.entropy, truth["entropy"], atol=1e-4, lowp=lowp["entropy"], name="entropy")
    for k, v in (("dx", dx), ("dw", dw), ("db", db)):
        _close(v, truth[k], atol=1e-4 + 2.0**-8 * truth[k].abs().max().item(), lowp=lowp[k], name=k)
    z = truth["z"].double()
    top2 = z.topk(2, dim=-1).values
    assert (z.gather(1, out.argmax[:, None]).squeeze(1) >= top2[:, 0] - 1e-4).all()


def test_ce_entropy_bad_input():
    from lsa_kernels.kernels import ce_backward

    x, w, b, y = _ce_inputs(torch.float32, False, seed=16)
    lse = torch.zeros(N)
    with pytest.raises(ValueError, match="coef_entropy and entropy"):
        ce_backward(x, w, b, y, lse, torch.ones(N), CEOptions(), None, None, None, coef_entropy=torch.ones(N))
    with pytest.raises(ValueError, match="entropy must be"):
        ce_backward(x, w, b, y, lse, torch.ones(N), CEOptions(), torch.zeros(x.shape), None, None,
                    coef_entropy=torch.ones(N), entropy=torch.ones(N - 1))
