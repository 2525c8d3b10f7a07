"""The deterministic backward's GEMMs (kernels/deterministic.py) on a torch without ``mm`` / ``addmm(out_dtype=)``.

On CUDA the bf16 / fp16 GEMMs first ask torch for an fp32 result from the operands as they are; a torch
build without that overload for the device and dtypes (NotImplementedError) or without the keyword at all
(TypeError) must get the same products from fp32 operands. CPU builds have no such kernel, so forcing the
CUDA route on CPU tensors runs the fallback for real; a wrapper that refuses the keyword stands in for an
older torch.
"""

from __future__ import annotations

import pytest
import torch

from lsa_kernels.kernels import deterministic as det


def _operands(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(7, 13, generator=g).to(dtype)
    b = torch.randn(13, 5, generator=g).to(dtype)
    return a, b


def _no_keyword(real):
    """torch.mm / torch.addmm of a torch that does not know ``out_dtype``."""
    def fn(*args, **kwargs):
        if "out_dtype" in kwargs:
            raise TypeError(f"{real.__name__}() got an unexpected keyword argument 'out_dtype'")
        return real(*args, **kwargs)
    return fn


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("refusal", ["no_kernel", "no_keyword"])
def test_gemms_fall_back_to_fp32_operands(dtype, refusal, monkeypatch):
    monkeypatch.setattr(det, "native_out_dtype", lambda device: True)  # the CUDA route on CPU tensors
    if refusal == "no_keyword":
        monkeypatch.setattr(torch, "mm", _no_keyword(torch.mm))
        monkeypatch.setattr(torch, "addmm", _no_keyword(torch.addmm))
    else:
        with pytest.raises(RuntimeError):  # what makes this case the fallback's: no CPU kernel for out_dtype=
            torch.mm(*_operands(dtype), out_dtype=torch.float32)
    a, b = _operands(dtype)
    want = a.double() @ b.double()  # products of 8-bit-mantissa values: exact in fp32, sums to fp32 rounding

    out = torch.full((7, 5), float("nan"))
    det.mm_into(out, a, b)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)

    acc = torch.ones(7, 5)
    det.addmm_into(acc, a, b)
    det.addmm_into(acc, a, b)
    torch.testing.assert_close(acc.double(), 1 + 2 * want, rtol=1e-6, atol=1e-5)


def test_fp32_operands_take_plain_gemms(monkeypatch):
    """fp32 operands never ask for out_dtype (a torch without it runs them unchanged)."""
    monkeypatch.setattr(det, "native_out_dtype", lambda device: True)
    monkeypatch.setattr(torch, "mm", _no_keyword(torch.mm))
    a, b = _operands(torch.float32, seed=1)
    out = torch.empty(7, 5)
    det.mm_into(out, a, b)
    torch.testing.assert_close(out, a @ b)
    acc = torch.zeros(7, 5)
    det.addmm_into(acc, a, b)
    torch.testing.assert_close(acc, a @ b)


def test_cpu_tensors_upcast_without_asking():
    """CPU operands go straight to fp32 (no exception raised and caught per GEMM)."""
    assert det.native_out_dtype(torch.device("cpu")) is False
    assert det.native_out_dtype(torch.device("cuda", 0)) is True
