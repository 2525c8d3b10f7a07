"""Dense targets in the CE pass (docs/maths.md §11; contract ``ce_dense_*``): probability targets and class-weighted
label smoothing, T = κ·t⊙c + β·c + α·onehot(y) read tile by tile next to the logits, softcap allowed.

Against the fp64 reference on materialised logits (odd shapes), fp32 and bf16 by CCE's rule, on the cpu backend
(compiled ext enabled: the compiled dense_chunk op, and disabled: the ATen chunk function; op-level checks against
the ATen spec in tests/backends/test_cpu_ext.py), with one chunk and with several, its
fused forward+backward (mean/sum) and separate passes (none), and the Triton kernels under the interpreter
(atomic and deterministic backward); ∂/∂t where t requires grad; the user's t is never written; no [N, V]
tensor besides t and its gradient. (Further cases: tests/api/test_weights.py; under process_group=:
tests/backends/test_vocab_parallel_options.py.)"""

import pytest
import torch

import lsa_kernels as L
from lsa_kernels import _ext
from lsa_kernels import reference as R

from _util import assert_close_rule, backends, leaf, targets

N, H, V = 19, 29, 157


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) / H**0.5 * 2
    b = torch.randn(V, generator=g) * 0.1
    y = targets((N,), V, gen=g)
    t = torch.softmax(torch.randn(N, V, generator=g) * 2, -1)
    t[2] *= 0.4  # mass != 1
    tw = torch.rand(N, generator=g) * 2
    cw = torch.rand(V, generator=g) + 0.1
    return x, w, b, y, t, tw, cw


CASES = {
    "prob": dict(target="t"),
    "prob_cap": dict(target="t", softcap=2.0),
    "prob_all_cap": dict(target="t", weight="cw", label_smoothing=0.25, z_loss=1e-2, token_weight="tw", softcap=3.0),
    "prob_cw_nobias": dict(target="t", weight="cw", bias=False),
    "cw_ls": dict(weight="cw", label_smoothing=0.2),
    "cw_ls_cap_zl": dict(weight="cw", label_smoothing=0.1, z_loss=1e-2, softcap=2.5, token_weight="tw"),
}


def _call(fn, d, case, dtype, reduction, grad_t, **extra):
    x, w, b, y, t, tw, cw = d
    kw = dict(CASES[case])
    bias = kw.pop("bias", True)
    tname = kw.pop("target", "y")
    for k, v in (("weight", cw), ("token_weight", tw)):
        if kw.get(k) is not None:
            kw[k] = v
    xs, ws = leaf(x, dtype), leaf(w, dtype)
    bs = leaf(b, dtype) if bias else None
    ins = [xs, ws] + ([bs] if bias else [])
    if tname == "t":
        target = t.to(dtype)
        if grad_t:
            target = leaf(target)
            ins.append(target)
    else:
        target = y
    out = fn(xs, ws, target, linear_bias=bs, reduction=reduction, **kw, **extra)
    up = 1.0 if not out.dim() else torch.linspace(-1, 1, out.numel()).to(torch.bfloat16).double()
    gs = torch.autograd.grad((out.double() * up).sum(), ins)
    return out, gs


def _rounded(d, dtype):
    return tuple(v.to(dtype).float() if v.is_floating_point() else v for v in d)


def _check(backend, case, reduction, dtype, grad_t=False, **extra):
    d = _rounded(_data(), dtype)
    truth, gt = _call(R.linear_cross_entropy, d, case, torch.float64, reduction, grad_t)
    same, gs = _call(R.linear_cross_entropy, d, case, dtype, reduction, grad_t)
    ours, go = _call(L.linear_cross_entropy, d, case, dtype, reduction, grad_t, backend=backend, **extra)
    assert ours.dtype == dtype and ours.shape == truth.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    assert_close_rule(ours, same, truth, atol=tol, rtol=tol, name=f"{case} loss")
    for name, o, s, tr in zip(["dx", "dw", "db", "dt"][: len(go)], go, gs, gt):
        assert tr.abs().max() > 1e-6, f"{case} {name}: a zero gradient cannot catch a bug"
        extra_tol = 2.0**-8 * tr.abs().max().item() if (backend == "triton" and dtype != torch.float32) else 0.0
        assert_close_rule(o, s, tr, atol=tol * 0.1 + extra_tol, rtol=tol, name=f"{case} {name}")


@pytest.mark.parametrize("ext", [True, False], ids=["ext", "aten"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_matches_reference(ext, case, reduction, dtype):
    if ext and not _ext.available():
        pytest.skip("lsa_kernels._C not built")
    grad_t = CASES[case].get("target") == "t"
    if ext:
        _check("cpu", case, reduction, dtype, grad_t)
    else:
        with _ext.disable():
            _check("cpu", case, reduction, dtype, grad_t)


@pytest.mark.parametrize("ext", [True, False], ids=["ext", "aten"])
@pytest.mark.parametrize("case", ["prob_all_cap", "cw_ls_cap_zl", "prob_cw_nobias"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_several_chunks(ext, case, reduction, dtype):
    """A small chunk budget (3 rows per chunk on the compiled path, 1-3 on ATen's): chunk boundaries, odd V and N,
    fp16 as well; the compiled dense op (ext) and the ATen chunk function (aten) against the fp64 reference."""
    if ext and not _ext.available():
        pytest.skip("lsa_kernels._C not built")
    grad_t = CASES[case].get("target") == "t"
    with _ext.disable(not ext):
        _check("cpu", case, reduction, dtype, grad_t, chunk_bytes=3 * V * 4)


@pytest.mark.skipif("triton" not in backends(), reason="triton not available")
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_reference(case, reduction, dtype):
    _check("triton", case, reduction, dtype, grad_t=CASES[case].get("target") == "t")


@pytest.mark.skipif("triton" not in backends(), reason="triton not available")
@pytest.mark.parametrize("case", ["prob_all_cap", "cw_ls_cap_zl"])
def test_triton_deterministic(case):
    _check("triton", case, "mean", torch.float32, grad_t=True, deterministic=True)


@pytest.mark.parametrize("backend", backends())
def test_target_is_not_written(backend):
    """The backward's T term must not scale the user's t in place (fp32 t is read without a copy)."""
    x, w, b, y, t, tw, cw = _data()
    for kw in (dict(), dict(weight=cw), dict(label_smoothing=0.1, softcap=3.0)):
        for red in ("mean", "none"):
            t0 = t.clone()
            xs = leaf(x)
            out = L.linear_cross_entropy(xs, leaf(w), t, linear_bias=leaf(b), reduction=red, backend=backend, **kw)
            out.sum().backward()
            assert torch.equal(t, t0), (kw, red)


@pytest.mark.parametrize("grad_t", [False, True])
@pytest.mark.parametrize("case", ["prob_all_cap", "cw_ls_cap_zl"])
def test_no_second_logits_tensor(grad_t, case):
    """With a small chunk budget no tensor with last dim V and >= N/2 rows is created in forward + backward, other
    than the gradient of t when t requires grad (the output the user asked for)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    n, vb = 256, 1000
    g = torch.Generator().manual_seed(0)
    x, w = leaf(torch.randn(n, 24, generator=g)), leaf(torch.randn(vb, 24, generator=g) * 0.2)
    b = leaf(torch.randn(vb, generator=g) * 0.1)
    t = torch.softmax(torch.randn(n, vb, generator=g), -1)
    y = targets((n,), vb, gen=g)
    kw = dict(CASES[case])
    kw.pop("target", None)
    for k, v in (("weight", torch.rand(vb, generator=g)), ("token_weight", torch.rand(n, generator=g))):
        if k in kw:
            kw[k] = v
    target = (leaf(t) if grad_t else t) if CASES[case].get("target") == "t" else y
    big, seen = [], {target.untyped_storage().data_ptr()}

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for r in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(r, torch.Tensor) and r.dim() >= 1 and r.shape[-1] == vb and r.numel() >= n * vb // 2:
                    ptr = r.untyped_storage().data_ptr()
                    if ptr not in seen:  # a view of t or of a tensor already counted is no new buffer
                        seen.add(ptr)
                        big.append((str(func), tuple(r.shape)))
            return out

    with Watch():
        out = L.linear_cross_entropy(x, w, target, linear_bias=b, backend="cpu", chunk_bytes=64 * 1024, **kw)
        out.backward()
    # with grad_t: the fp32 dt the fused pass writes and its product with the upstream gradient (not in place:
    # a retained graph may run backward again), which becomes t.grad
    want = 2 if (grad_t and target.is_floating_point()) else 0
    assert len(big) <= want, big
