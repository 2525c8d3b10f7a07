"""Device handling of the Triton backend, checked without a GPU.

* Every kernel launch happens with the tensors' device current: the guard is mocked (it sets a fake
  "current device", initially another device, as ``torch.cuda.device`` would) and each kernel is wrapped
  to record the current device at launch. Without the guard the launches would see the other device.
* ``device_guard`` of a CUDA device is ``torch.cuda.device(that device)`` (the class mocked).
* float64 on CUDA: ``auto`` routes to the reference, ``triton`` refuses with a clear error.
* Compute capabilities: every family has a table, below sm_80 is refused with a clear error.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import lsa_kernels as L
from lsa_kernels import dispatch, functional
from lsa_kernels.kernels import _common, ce, pair_bwd, pair_js, pair_phase1

KERNELS = {
    ce: ["ce_fwd_kernel", "ce_bwd_kernel", "ce_dz_kernel"],
    pair_phase1: ["pair_phase1_kernel"],
    pair_js: ["pair_js_kernel"],
    pair_bwd: ["pair_bwd_kernel", "pair_dz_kernel"],
}
OTHER = "cuda:0 (current before the call)"


class _Spy:
    def __init__(self, name, kernel, state):
        self.name, self.kernel, self.state = name, kernel, state

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kw):
            self.state["launches"].append((self.name, self.state["current"], args[0].device))
            return launch(*args, **kw)

        return run


@pytest.fixture
def spied(monkeypatch):
    state = {"current": OTHER, "launches": [], "guards": 0}

    @contextlib.contextmanager
    def fake_guard(device):
        old, state["current"] = state["current"], device
        state["guards"] += 1
        try:
            yield
        finally:
            state["current"] = old

    monkeypatch.setattr(_common, "device_guard", fake_guard)
    for mod, names in KERNELS.items():
        for n in names:
            monkeypatch.setattr(mod, n, _Spy(n, getattr(mod, n), state))
    return state


def _run_every_kernel():
    g = torch.Generator().manual_seed(0)
    N, H, V = 9, 16, 40
    x, xq = torch.randn(N, H, generator=g), torch.randn(N, H, generator=g)
    w, b = torch.randn(V, H, generator=g) * 0.3, torch.randn(V, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    leaves = [t.requires_grad_() for t in (x, xq, w, b)]
    for det in (False, True):
        L.linear_cross_entropy(x, w, y, linear_bias=b, reduction="none", backend="triton",
                               deterministic=det).sum().backward()
        for div in ("sce", "js"):
            L.linear_divergence(x, xq, w, linear_bias=b, divergence=div, reduction="none", backend="triton",
                                deterministic=det).sum().backward()
        hl, hs = x.view(1, N, H), xq.view(1, N, H)
        out = L.long_short_loss(hl, hs, w, y.view(1, N), y.view(1, N), l_extra=3, linear_bias=b,
                                backend="triton", deterministic=det)
        (out.ce + out.misalign).backward()
    return leaves


def test_every_launch_inside_the_guard(spied):
    _run_every_kernel()
    launched = {name for name, _, _ in spied["launches"]}
    assert launched == {n for names in KERNELS.values() for n in names}
    wrong = [(n, cur, dev) for n, cur, dev in spied["launches"] if cur != dev]
    assert not wrong, f"launched with another device current: {wrong[:3]}"
    assert spied["guards"] > 0 and spied["current"] == OTHER  # restored after each call


def test_guard_is_torch_cuda_device(monkeypatch):
    entered = []

    class FakeCudaDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeCudaDevice)
    with _common.device_guard(torch.device("cuda", 1)):
        pass
    assert entered == [torch.device("cuda", 1)]
    with _common.device_guard(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)]


# ------------------------------------------------------------------------------------------ float64


def test_float64_on_cuda_routes_to_reference():
    cuda = torch.device("cuda", 0)
    assert functional.resolve_backend("auto", cuda, torch.float64) == "reference"
    with pytest.raises(ValueError, match="float64"):
        functional.resolve_backend("triton", cuda, torch.float64)
    assert functional.resolve_backend("auto", torch.device("cpu"), torch.float64) == "cpu"


def test_float64_refused_by_triton_backend():
    x, w = torch.randn(4, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64)
    y = torch.randint(0, 11, (4,))
    with pytest.raises(ValueError, match="backend='triton' takes float32, bfloat16 or float16"):
        L.linear_cross_entropy(x, w, y, backend="triton")
    with pytest.raises(ValueError, match="float64"):
        L.linear_divergence(x, x, w, backend="triton")
    with pytest.raises(ValueError, match="float64"):
        L.long_short_loss(x.view(1, 4, 8), x.view(1, 4, 8), w, y.view(1, 4), y.view(1, 4), l_extra=1,
                          backend="triton")


def test_float64_auto_on_cuda_runs_the_reference(monkeypatch):
    """The public op sends float64 'cuda' tensors to the reference (device type mocked on CPU tensors)."""
    calls = []
    real = functional.reference.linear_cross_entropy

    def spy(*a, **k):
        calls.append(a[0].dtype)
        return real(*a, **k)

    real_resolve = dispatch.resolve_backend
    monkeypatch.setattr(functional.reference, "linear_cross_entropy", spy)
    monkeypatch.setattr(dispatch, "resolve_backend",
                        lambda be, dev, dt=None: real_resolve(be, torch.device("cuda", 0), dt))
    x, w = torch.randn(4, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64)
    y = torch.randint(0, 11, (4,))
    out = L.linear_cross_entropy(x, w, y)
    assert calls == [torch.float64] and out.dtype == torch.float64


# ------------------------------------------------------------------------------------ architectures


@pytest.mark.parametrize("arch,family", [(80, "sm80"), (87, "sm80"), (86, "sm86"), (89, "sm86"), (90, "sm90"),
                                         (100, "sm100"), (103, "sm100"), (110, "sm100"), (120, "sm120"),
                                         (121, "sm120")])
def test_every_family_has_a_table(arch, family):
    assert _common.arch_class(arch) == family
    for kind in _common.KERNEL_KINDS:
        for fp32 in (False, True):
            cfg = _common.gpu_config(kind, arch, fp32)
            assert cfg.BLOCK_N >= 16 and cfg.BLOCK_V >= 16 and cfg.BLOCK_H >= 16
            if cfg.maxnreg is not None:  # a register cap the block can get (64K registers per SM, 255 per thread)
                assert 24 <= cfg.maxnreg <= 255 and cfg.maxnreg * 32 * cfg.num_warps <= 65536, (kind, fp32, cfg)


@pytest.mark.parametrize("cap", [(7, 5), (7, 0), (6, 1)])
def test_old_gpus_refused(monkeypatch, cap):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    sm = f"sm_{10 * cap[0] + cap[1]}"
    for be in ("auto", "triton"):
        with pytest.raises(_common.UnsupportedDevice, match=f"compute capability >= 8.0.*{sm}"):
            functional.resolve_backend(be, torch.device("cuda", 0), torch.bfloat16)
    with pytest.raises(ValueError, match="backend='reference'"):
        _common.gpu_config("ce_fwd", 10 * cap[0] + cap[1], False)


def test_supported_gpu_accepted(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert functional.resolve_backend("auto", torch.device("cuda", 1), torch.bfloat16) == "triton"


def test_triton_interpreter_refuses_numpy_it_cannot_run_with(monkeypatch):
    """triton 3.6's interpreter crashes inside every kernel with numpy >= 2.4: the backend says so in one line,
    naming the pair and the fix, before any kernel runs; triton 3.8 with numpy 2.4 and a GPU (no interpreter)
    are not refused."""
    import numpy
    import triton

    from lsa_kernels import backends

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.1")
    with pytest.raises(RuntimeError, match=r"triton 3\.6\.0's interpreter .* numpy 2\.4\.1: it needs numpy < 2\.4"):
        backends.get("triton")
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    assert backends.interpreter_version_problem() is None
    monkeypatch.setattr(triton, "__version__", "3.8.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    assert backends.interpreter_version_problem() is None
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backends.interpreter_version_problem() is None
