"""Property-based tests (hypothesis): random shapes — 1 row, V=1, H=1 included — options, dtypes, masks
and chunk budgets, every public op against the fp64 reference, values and every gradient (dx, dW, db).

What each example draws:
* the compute path: the cpu backend's compiled kernels or its ATen fallback (the Triton backend, under the
  interpreter, has its own tests with fewer examples), and a chunk budget that is either the default or
  small enough (``chunk_bytes`` of 1..24 rows of fp32 logits) that the rows run in several chunks;
* fp32 or bf16 inputs. fp32 is judged against the fp64 truth with a tolerance relative to the largest true
  value; bf16 by CCE's rule (docs/maths.md §7): per element ``|ours − truth| ≤ |torch's bf16 reference − truth|``
  plus one bf16 rounding of the output (``2^-8·|truth|``) and ``1e-3·max|truth|``;
* every divergence is its own test case (a pytest parameter), so each gets the same number of examples.

Profiles (``LSA_HYPOTHESIS_PROFILE``): ``ci`` (default) is derandomized — the same examples every run, so
a CI failure reproduces — with 30 CE examples and 12 per divergence on the cpu backend, 4 CE and 2 per
divergence on Triton (interpreter); ``nightly`` draws fresh examples (500 CE and 200 per divergence on cpu,
60 and 30 on Triton) and keeps hypothesis' example database, e.g.
``LSA_HYPOTHESIS_PROFILE=nightly .venv/bin/python -m pytest -q tests/api/test_properties.py``.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lsa_kernels as L
from lsa_kernels import _ext
from lsa_kernels import reference as R
from lsa_kernels.options import DIVERGENCES

from _util import IGN, assert_close_rule, triton_available

settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True, database=None,
                          suppress_health_check=list(HealthCheck), print_blob=True)
settings.register_profile("nightly", max_examples=500, deadline=None, suppress_health_check=list(HealthCheck),
                          print_blob=True)
PROFILE = os.environ.get("LSA_HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
CPU_EXAMPLES = settings.default.max_examples
CI = PROFILE == "ci"

cpu_settings = settings(max_examples=CPU_EXAMPLES)  # CE: one test case
per_div_settings = settings(max_examples=max(3, CPU_EXAMPLES * 2 // 5))  # x 5 divergences
triton_settings = settings(max_examples=4 if CI else 60)
per_div_triton_settings = settings(max_examples=2 if CI else 30)
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton not installed or LSA_TEST_BACKENDS=cpu")

CPU_PATHS = ["aten"] + (["ext"] if _ext.built() else [])

dims = st.fixed_dictionaries(
    {"N": st.integers(1, 40), "H": st.integers(1, 24), "V": st.integers(1, 300), "seed": st.integers(0, 2**16)}
)
scales = st.sampled_from([0.1, 1.0, 4.0])
softcaps = st.one_of(st.none(), st.floats(0.5, 30.0))
chunk_rows = st.one_of(st.none(), st.integers(1, 24))  # None: the default budget (one chunk here)


def _chunk_bytes(rows, V):
    """A budget of ``rows`` rows of fp32 logits: 1..24 rows per chunk on the compiled path, fewer (at least
    one) on the ATen path, whose K buffers share the budget."""
    return None if rows is None else rows * V * 4


def _tensors(d, scale, dtype):
    g = torch.Generator().manual_seed(d["seed"])
    x = (torch.randn(d["N"], d["H"], generator=g) * scale).to(dtype)
    w = (torch.randn(d["V"], d["H"], generator=g) * scale).to(dtype)
    b = (torch.randn(d["V"], generator=g) * scale).to(dtype)
    y = torch.randint(0, d["V"], (d["N"],), generator=g)
    y[torch.rand(d["N"], generator=g) < 0.3] = IGN
    return x, w, b, y, g


def _leaves(ts, dtype):
    return [None if t is None else t.detach().to(dtype).requires_grad_(True) for t in ts]


def _grads(out, ins):
    live = [t for t in ins if t is not None]
    gs = iter(torch.autograd.grad(out, live, allow_unused=True))
    res = []
    for t in ins:
        if t is None:
            res.append(None)
        else:
            g = next(gs)
            res.append(torch.zeros_like(t) if g is None else g)
    return res


def _judge(ours, same, truth, dtype, name, tol=1e-4, extra=0.0):
    """fp32: within ``tol`` (relative to the largest truth value, + ``extra``) of the fp64 truth, or no worse
    than torch's own fp32 reference where that is further off (huge logits). bf16: CCE's rule (module doc)."""
    ours, same, truth = ours.double(), same.double(), truth.double()
    assert torch.isfinite(ours).all(), f"{name}: non-finite"
    big = truth.abs().max().item() if truth.numel() else 0.0
    if dtype == torch.float32:
        assert_close_rule(ours, same, truth, atol=tol * (1 + big) + extra, rtol=tol, name=name)
    else:
        assert_close_rule(ours, same, truth, atol=1e-3 * (1 + big) + extra, rtol=2.0**-8, name=name)


def _on_path(path):
    """The cpu path in force for a call: a context manager."""
    return _ext.disable(path == "aten")


# ------------------------------------------------------------------------------------------------ CE


def _ce_case(backend, path, d, scale, softcap, bias, eps, zl, reduction, half, rows):
    dtype = torch.bfloat16 if half else torch.float32
    x, w, b, y, _ = _tensors(d, scale, dtype)
    b = b if bias else None
    kw = dict(reduction=reduction, label_smoothing=eps, z_loss=zl, softcap=softcap)

    def run(fn, dt, **extra):
        ins = _leaves([x, w, b], dt)
        out = fn(ins[0], ins[1], y, linear_bias=ins[2], **kw, **extra)
        return out, _grads(out.double().sum(), ins)

    truth = run(R.linear_cross_entropy, torch.float64)
    same = run(R.linear_cross_entropy, dtype)
    with _on_path(path):
        ours = run(L.linear_cross_entropy, dtype, backend=backend, chunk_bytes=_chunk_bytes(rows, d["V"]))
    assert ours[0].dtype == dtype and ours[0].shape == truth[0].shape
    _judge(ours[0], same[0], truth[0], dtype, "loss")
    for name, o, s, t in zip(("dx", "dw", "db"), ours[1], same[1], truth[1]):
        if t is not None:
            _judge(o, s, t, dtype, name)


ce_args = dict(d=dims, scale=scales, softcap=softcaps, bias=st.booleans(), eps=st.sampled_from([0.0, 0.1]),
               zl=st.sampled_from([0.0, 1e-3]), reduction=st.sampled_from(["mean", "sum", "none"]),
               half=st.booleans(), rows=chunk_rows)


@cpu_settings
@given(path=st.sampled_from(CPU_PATHS), **ce_args)
def test_ce_property(path, d, scale, softcap, bias, eps, zl, reduction, half, rows):
    _ce_case("cpu", path, d, scale, softcap, bias, eps, zl, reduction, half, rows)


@needs_triton
@triton_settings
@given(**ce_args)
def test_ce_property_triton(d, scale, softcap, bias, eps, zl, reduction, half, rows):
    _ce_case("triton", "ext", d, scale, softcap, bias, eps, zl, reduction, half, None)


# ------------------------------------------------------------------------------------------------ divergence


def _div_case(backend, path, div, d, scale, softcap, tau, detach, reduction, masked, bias, half, rows):
    dtype = torch.bfloat16 if half else torch.float32
    x, w, b, _, g = _tensors(d, scale, torch.float32)
    xq = x + torch.randn(x.shape, generator=g) * scale
    x, xq, w, b = (t.to(dtype) for t in (x, xq, w, b))
    b = b if bias else None
    mask = (torch.rand(d["N"], generator=g) < 0.7) if masked else None
    kw = dict(divergence=div, temperature=tau, detach=detach, reduction=reduction, mask=mask, softcap=softcap)

    def run(fn, dt, **extra):
        ins = _leaves([x, xq, w, b], dt)
        out = fn(ins[0], ins[1], ins[2], linear_bias=ins[3], **kw, **extra)
        return out, _grads(out.double().sum(), ins)

    truth = run(R.linear_divergence, torch.float64)
    same = run(R.linear_divergence, dtype)
    with _on_path(path):
        ours = run(L.linear_divergence, dtype, backend=backend, chunk_bytes=_chunk_bytes(rows, d["V"]))
    _judge(ours[0], same[0], truth[0], dtype, "value", tol=2e-4)
    # the statistics form (stats.py) stores E_p[b] as an fp32 number: the gradient's absolute error per unit
    # of dz is bounded by a few ulps of max|z/τ|; dx multiplies it by max|W|, dW and db by the rows' |x| sums
    xd, xqd, wd = x.double(), xq.double(), w.double()
    zmax = max((xd @ wd.T).abs().max().item(), (xqd @ wd.T).abs().max().item()) / tau + (
        0.0 if b is None else b.double().abs().max().item() / tau)
    unit = 8 * torch.finfo(torch.float32).eps * zmax
    rows_x = max(xd.abs().sum(0).max().item(), xqd.abs().sum(0).max().item())
    extra = {"dxp": unit * wd.abs().max().item(), "dxq": unit * wd.abs().max().item(),
             "dw": 2 * unit * rows_x, "db": 2 * unit * d["N"]}
    for name, o, s, t in zip(("dxp", "dxq", "dw", "db"), ours[1], same[1], truth[1]):
        if t is not None:
            _judge(o, s, t, dtype, name, tol=2e-4, extra=extra[name])


div_args = dict(d=dims, scale=scales, softcap=softcaps, tau=st.sampled_from([1.0, 0.5, 2.0]),
                detach=st.sampled_from([None, "p", "q"]), reduction=st.sampled_from(["mean", "sum", "none"]),
                masked=st.booleans(), bias=st.booleans(), half=st.booleans(), rows=chunk_rows)


@pytest.mark.parametrize("div", DIVERGENCES)
@per_div_settings
@given(path=st.sampled_from(CPU_PATHS), **div_args)
def test_divergence_property(div, path, d, scale, softcap, tau, detach, reduction, masked, bias, half, rows):
    _div_case("cpu", path, div, d, scale, softcap, tau, detach, reduction, masked, bias, half, rows)


@needs_triton
@pytest.mark.parametrize("div", DIVERGENCES)
@per_div_triton_settings
@given(**div_args)
def test_divergence_property_triton(div, d, scale, softcap, tau, detach, reduction, masked, bias, half, rows):
    _div_case("triton", "ext", div, d, scale, softcap, tau, detach, reduction, masked, bias, half, None)


# ------------------------------------------------------------------------------------------------ long-short


def _ls_case(backend, path, div, B, T, H, V, seed, positions, detach, tau, softcap, bias, half, rows, data):
    dtype = torch.bfloat16 if half else torch.float32
    l_extra = data.draw(st.integers(1, T - 1), label="l_extra")
    g = torch.Generator().manual_seed(seed)
    hl, hs = torch.randn(2, B, T, H, generator=g).unbind(0)
    hs = 0.6 * hs + 0.8 * hl  # the two views of one text look alike
    w = torch.randn(V, H, generator=g)
    bb = torch.randn(V, generator=g) * 0.5 if bias else None
    yl, ys = torch.randint(0, V, (2, B, T), generator=g).unbind(0)
    # ignored labels on either view independently: one-sided pairs, and sometimes none valid at all
    yl = torch.where(torch.rand(B, T, generator=g) < 0.25, torch.full_like(yl, IGN), yl)
    ys = torch.where(torch.rand(B, T, generator=g) < 0.25, torch.full_like(ys, IGN), ys)
    hl, hs, w, bb = (None if t is None else t.to(dtype) for t in (hl, hs, w, bb))  # the truth sees these values
    kw = dict(l_extra=l_extra, alpha=0.3, divergence=div, positions=positions, detach=detach, temperature=tau,
              softcap=softcap)

    def run(fn, dt, **extra):
        ins = _leaves([hl, hs, w, bb], dt)
        out = fn(ins[0], ins[1], ins[2], yl, ys, linear_bias=ins[3], **kw, **extra)
        # loss, ce and misalign each with their own weight: each one's gradient is checked
        return out, _grads(out.loss.double() + 0.5 * out.ce.double() - 2.0 * out.misalign.double(), ins)

    truth = run(R.long_short_loss, torch.float64)
    same = run(R.long_short_loss, dtype)
    with _on_path(path):
        ours = run(L.long_short_loss, dtype, backend=backend, chunk_bytes=_chunk_bytes(rows, V))
    for name, o, s, t in zip(("loss", "ce", "misalign"), ours[0], same[0], truth[0]):
        _judge(o, s, t, dtype, name, tol=2e-4)
    for name, o, s, t in zip(("d_long", "d_short", "dw", "db"), ours[1], same[1], truth[1]):
        if t is not None:
            _judge(o, s, t, dtype, name, tol=2e-4)


ls_args = dict(B=st.integers(1, 3), T=st.integers(2, 12), H=st.integers(1, 16), V=st.integers(1, 120),
               seed=st.integers(0, 2**16), positions=st.sampled_from(["overlap", "last"]),
               detach=st.sampled_from([None, "long", "short"]), tau=st.sampled_from([1.0, 0.7]),
               softcap=st.one_of(st.none(), st.just(5.0)), bias=st.booleans(), half=st.booleans(),
               rows=chunk_rows, data=st.data())


@pytest.mark.parametrize("div", DIVERGENCES)
@per_div_settings
@given(path=st.sampled_from(CPU_PATHS), **ls_args)
def test_long_short_property(div, path, B, T, H, V, seed, positions, detach, tau, softcap, bias, half, rows, data):
    _ls_case("cpu", path, div, B, T, H, V, seed, positions, detach, tau, softcap, bias, half, rows, data)


@needs_triton
@pytest.mark.parametrize("div", DIVERGENCES)
@per_div_triton_settings
@given(**ls_args)
def test_long_short_property_triton(div, B, T, H, V, seed, positions, detach, tau, softcap, bias, half, rows, data):
    _ls_case("triton", "ext", div, B, T, H, V, seed, positions, detach, tau, softcap, bias, half, None, data)


def test_small_budgets_make_several_chunks():
    """The budgets drawn above really split the rows: a dispatch count of the logits GEMMs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMM(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.mm.out,
                        torch.ops.aten.addmm.out):
                CountMM.n += 1
            return func(*args, **(kwargs or {}))

    x, w, y = torch.randn(40, 8), torch.randn(300, 8), torch.randint(0, 300, (40,))
    for path in CPU_PATHS:
        for rows, chunks in ((None, 1), (24, 2), (1, 40)):
            CountMM.n = 0
            with _on_path(path), CountMM():
                L.linear_cross_entropy(x, w, y, reduction="none", backend="cpu", chunk_bytes=_chunk_bytes(rows, 300))
            if rows is None:
                assert CountMM.n == 1, (path, CountMM.n)
            else:  # at least `chunks` forward GEMMs (ATen: K = 3 buffers share the budget, so more)
                assert CountMM.n >= chunks, (path, rows, CountMM.n)
