"""Large shapes and determinism.

* N·V > 2^31 on the cpu backend: per-row losses, dX and dW against the reference evaluated block by
  block (rows are independent), so no 8 GiB logits tensor is ever built. Marked `large`; CI runs it
  (about a minute on 2 cores); deselect it with -m 'not large'.
* deterministic: two runs give bit-identical losses and gradients.
"""

import os

import pytest
import torch

import lsa_kernels as L
from lsa_kernels import reference as R

from _util import IGN, assert_close_rule, targets


@pytest.mark.large
def test_cpu_rows_times_vocab_beyond_int32():
    """Only the first and the last 1024 rows have valid targets: every row still runs through the
    kernels (so offsets past 2^31 are exercised), but the reference needs only those rows."""
    N, H, V = 65_600, 4, 32_768
    assert N * V > 2**31
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g)
    y = torch.full((N,), IGN)
    k = 1024
    y[:k] = torch.randint(0, V, (k,), generator=g)
    y[-k:] = torch.randint(0, V, (k,), generator=g)
    y[-1] = V - 1  # the very last logit of the whole problem
    xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    per_row = L.linear_cross_entropy(xs, ws, y, reduction="none", backend="cpu")
    per_row.sum().backward()

    rows = torch.cat([torch.arange(k), torch.arange(N - k, N)])
    assert torch.all(per_row[k : N - k] == 0) and torch.all(xs.grad[k : N - k] == 0)

    def ref(dtype):
        xb = x[rows].to(dtype).requires_grad_(True)
        wb = w.to(dtype).requires_grad_(True)
        out = R.linear_cross_entropy(xb, wb, y[rows], reduction="none")
        out.sum().backward()
        return out.detach(), xb.grad, wb.grad

    truth, same = ref(torch.float64), ref(torch.float32)
    # dX sums 32768 fp32 products per element: allow 1e-4 beyond torch's own fp32 error (mean error is
    # within 4 % of torch's; single elements differ by up to ~1.5e-5 where torch happens to be exact)
    for name, o, s, t, tol in zip(["loss", "dx", "dw"], (per_row[rows], xs.grad[rows], ws.grad), same, truth,
                                  (1e-5, 1e-4, 1e-4)):
        assert_close_rule(o, s, t, atol=tol, rtol=1e-5, name=name)


def _run_all(seed, backend, device="cpu", B=3, T=11, H=24, V=301):
    g = torch.Generator().manual_seed(seed)
    hl, hs = torch.randn(2, B, T, H, generator=g).unbind(0)
    w = torch.randn(V, H, generator=g)
    yl, ys = targets((B, T), V, gen=g).to(device), targets((B, T), V, gen=g).to(device)
    ins = [t.to(device).requires_grad_(True) for t in (hl, hs, w)]
    out = L.long_short_loss(*ins, yl, ys, l_extra=4, divergence="js", backend=backend, deterministic=True,
                            chunk_bytes=V * 4 * 20)
    ce = L.linear_cross_entropy(ins[0], ins[2], yl, backend=backend, deterministic=True, chunk_bytes=V * 4 * 7)
    (out.loss + ce).backward()
    return [out.loss, ce] + [t.grad for t in ins]


def test_deterministic_bit_identical_cpu():
    """The cpu backend reduces in a fixed order (no atomics): a regression check of that. Which Triton kernels
    a deterministic call launches is checked in tests/backends/test_triton_kernels.py (the interpreter runs programs in
    order, so bit-identity cannot tell the paths apart there)."""
    a, b = _run_all(3, "cpu"), _run_all(3, "cpu")
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs CUDA and compiled Triton kernels (run with TRITON_INTERPRET=0)")
def test_deterministic_bit_identical_cuda():
    """On a GPU the atomic backward's summation order varies from run to run; deterministic=True must not.
    Shapes with many row blocks and V tiles, so that an atomic path would race."""
    kw = dict(device="cuda", B=4, T=512, H=256, V=8191)
    a, b = _run_all(3, "triton", **kw), _run_all(3, "triton", **kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_ignore_index_other_than_default():
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(9, 8, generator=g), torch.randn(20, 8, generator=g)
    y = torch.randint(0, 20, (9,), generator=g)
    y[::2] = 7  # a valid class id used as ignore_index
    ours = L.linear_cross_entropy(x, w, y, ignore_index=7, backend="cpu")
    ref = R.linear_cross_entropy(x.double(), w.double(), y, ignore_index=7)
    torch.testing.assert_close(ours.double(), ref)
    assert IGN != 7
