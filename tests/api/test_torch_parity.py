"""Parity with torch's own ``F.linear_cross_entropy``: every one of torch's OpInfo sample inputs
(``sample_inputs_linear_cross_entropy``) through our op on both backends. Each sample either matches torch
(value and every gradient; bf16 by CCE's rule against an fp64 truth) or is a DOCUMENTED refusal: a clear
exception whose message says what to do. torch's error inputs must be refused by us too.

Supported (docs/maths.md §11): class weights (``weight=``, with and without label smoothing),
probability targets (a float target of the logits' shape), and both together. Refused: K-dimensional linear
weights ``[C, d1, ..., H]`` (the message says how to loop over d)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("expecttest", reason="torch's OpInfo database imports expecttest (the test extra)")
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402

import lsa_kernels as L  # noqa: E402
from _util import assert_close_rule, backends  # noqa: E402

OP = next((o for o in op_db if o.name == "nn.functional.linear_cross_entropy"), None)
if OP is None:  # the op and its OpInfo are newer than the oldest supported torch
    pytest.skip(f"torch {torch.__version__} has no F.linear_cross_entropy OpInfo", allow_module_level=True)
DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _kind(sample) -> str:
    w, t = sample.args
    if w.dim() > 2:
        return "k_dim_weight"
    kind = "prob_target" if t.is_floating_point() else "plain"
    return kind + ("+class_weight" if "weight" in sample.kwargs else "")


# What we refuse and the message that says so.
REFUSED = {
    "k_dim_weight": (ValueError, "linear_weight must be 2-D .* loop over the positions d"),
}


def _samples():
    out = []
    for dt in DTYPES:
        for i, s in enumerate(OP.sample_inputs("cpu", dt, requires_grad=True)):
            out.append(pytest.param(s, dt, id=f"{str(dt)[6:]}-{i}-{_kind(s)}"))
    return out


SAMPLES = _samples()
CENSUS = {"plain": 60, "plain+class_weight": 48, "prob_target": 48, "prob_target+class_weight": 48,
          "k_dim_weight": 153}


def test_sample_census():
    """The sample set is what the test was written against (a torch upgrade that changes it is noticed)."""
    kinds = {}
    for p in SAMPLES:
        k = _kind(p.values[0])
        kinds[k] = kinds.get(k, 0) + 1
    assert sum(kinds.values()) == 357, kinds
    assert kinds == CENSUS, kinds


def _leaves(sample, dtype):
    x = sample.input.detach().to(dtype).requires_grad_(True)
    w = sample.args[0].detach().to(dtype).requires_grad_(True)
    t = sample.args[1].detach()
    t = t.to(dtype) if t.is_floating_point() else t
    kw = {}
    for k, v in sample.kwargs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().to(dtype)
            if k == "linear_bias":
                v.requires_grad_(True)
        kw[k] = v
    return x, w, t, kw


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("sample,dtype", SAMPLES)
def test_torch_sample(sample, dtype, backend):
    kind = _kind(sample)
    x, w, t, kw = _leaves(sample, dtype)
    if kind in REFUSED or (backend == "triton" and dtype == torch.float64):
        # the Triton kernels have no fp64 path: backend='triton' refuses float64 (functional's docstring)
        exc, msg = REFUSED.get(kind, (ValueError, "float64"))
        with pytest.raises(exc, match=msg):
            L.linear_cross_entropy(x, w, t, backend=backend, **kw)
        return
    got = L.linear_cross_entropy(x, w, t, backend=backend, **kw)
    inputs = [x, w] + ([kw["linear_bias"]] if "linear_bias" in kw else [])
    g = torch.randn_like(got.detach().float()).to(got.dtype) if got.dim() else None
    gg = torch.autograd.grad(got, inputs, grad_outputs=g, allow_unused=True)
    same = F.linear_cross_entropy(x, w, t, **kw)
    gs = torch.autograd.grad(same, inputs, grad_outputs=g, allow_unused=True)
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    kw64 = {k: (v.detach().double().requires_grad_(k == "linear_bias") if isinstance(v, torch.Tensor)
                and v.is_floating_point() else v) for k, v in kw.items()}
    # the truth's target: the sample's own (bf16 probabilities are the values both sides were given)
    truth = F.linear_cross_entropy(x64, w64, t.double() if t.is_floating_point() else t, **kw64)
    in64 = [x64, w64] + ([kw64["linear_bias"]] if "linear_bias" in kw64 else [])
    gt = torch.autograd.grad(truth, in64, grad_outputs=None if g is None else g.double(), allow_unused=True)
    assert got.shape == same.shape and got.dtype == same.dtype
    tol = 1e-5 if dtype != torch.bfloat16 else 2e-2
    assert_close_rule(got.detach(), same.detach(), truth.detach(), atol=tol, rtol=tol, name="loss")
    for name, a, b, c in zip(("dx", "dw", "db"), gg, gs, gt):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_close_rule(a, b, c, atol=tol, rtol=tol, name=name)


@pytest.mark.parametrize("backend", backends())
def test_torch_error_inputs_are_refused(backend):
    """Every input torch refuses, we refuse too, with an exception naming the argument."""
    n = 0
    for e in OP.error_inputs("cpu"):
        s = e.sample_input
        with pytest.raises((TypeError, ValueError, RuntimeError)):
            L.linear_cross_entropy(s.input, *s.args, backend=backend, **s.kwargs)
        n += 1
    assert n == 6
