"""The Triton kernels COMPILED on a CUDA GPU against the reference: every op and option, bf16 and fp32.

Runs in its own pytest process with the interpreter off (``make test`` does this when CUDA exists;
``benchmarks/gpu_run.sh`` runs it right after its preflight, split over parallel processes by
``python -m benchmarks.gpu_tests``):

    TRITON_INTERPRET=0 python -m pytest -q tests/backends/test_cuda.py

Without CUDA (or with TRITON_INTERPRET=1, as in the main test process) every test is skipped.
``LSA_CUDA_TEST_ON_CPU=1`` together with TRITON_INTERPRET=1 runs the same tests on CPU tensors under the
interpreter with small shapes: it checks the test code, not the GPU (``python -m benchmarks.gpu_tests --cpu``
does this and counts the kernel specialisations the tests launch; tests/tooling/test_gpu_run_script.py runs
it in CI through ``DRY_RUN=1 benchmarks/gpu_run.sh``).

Truth: the reference on float64 copies of the (already rounded) inputs. Rule, per output and gradient
(CCE's, taken over the whole tensor because two independent roundings of dz to bf16 — ours and torch's
— land on different elements): ‖ours − truth‖ ≤ 2·‖torch same-dtype − truth‖ + rtol·‖truth‖, and the
same with max-abs norms. Shapes are odd (no block multiple).

Accuracy (argmax == target): the kernels' logits are fp32-accumulated, the truth's fp64, so a row may flip
only at a near tie: |max_j z_j − z_target| ≤ 1e-4·max_j |z_j| in the fp64 truth, for at most 1 % of the rows
(at least one); ignored rows are False.

NaN rows: a row whose input holds a NaN has a NaN loss, lse and entropy and a non-finite dx row; every other
row's outputs and dx are those of the same call without the NaN; dW / db and the NaN row's accuracy are
unspecified (on a GPU ``max.f32`` drops NaN operands, the interpreter's numpy reductions do not, and its
argmax over an all-NaN tile raises — so accuracy is asked for with a NaN row only on a GPU).
"""

from __future__ import annotations

import os

import pytest
import torch

import lsa_kernels as L

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
ON_CPU = INTERP and os.environ.get("LSA_CUDA_TEST_ON_CPU") == "1"
if torch.cuda.is_available() and not INTERP:
    DEV = torch.device("cuda")
elif ON_CPU:
    DEV = torch.device("cpu")
else:
    pytest.skip("needs CUDA with TRITON_INTERPRET unset/0 (or LSA_CUDA_TEST_ON_CPU=1 under the interpreter)",
                allow_module_level=True)

needs_gpu = pytest.mark.skipif(DEV.type != "cuda", reason="needs a real CUDA device")
N, H, V = (515, 255, 10007) if DEV.type == "cuda" else (37, 61, 503)
B, T, LX = (3, 211, 37) if DEV.type == "cuda" else (2, 19, 5)
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}
IGN = -100
TIE_RTOL = 1e-4  # near-tie allowance of the accuracy, relative to the row's largest |logit|


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=_gen(seed)) * scale


def _targets(shape, seed, n_ignored=3):
    y = torch.randint(0, V, shape, generator=_gen(seed))
    flat = y.view(-1)
    flat[torch.randperm(flat.numel(), generator=_gen(seed + 1))[:n_ignored]] = IGN
    return y


def _close(name, ours, truth, lowp, dtype):
    ours, truth, lowp = ours.double().cpu(), truth.double().cpu(), lowp.double().cpu()
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    rtol = RTOL[dtype]
    for norm in (lambda t: t.norm(), lambda t: t.abs().max()):
        e_ours, e_low, scale = norm(ours - truth).item(), norm(lowp - truth).item(), norm(truth).item()
        assert e_ours <= 2.0 * e_low + rtol * scale + 1e-12, (
            f"{name}: error {e_ours:.3e} > 2 x torch {dtype} error {e_low:.3e} + {rtol:g} x {scale:.3e}")


def _leaves(tensors, dtype):
    """Differentiable copies on DEV in ``dtype`` (None stays None)."""
    return [None if t is None else t.to(DEV, dtype).detach().requires_grad_() for t in tensors]


def _run(fn, tensors, dtype, backend):
    leaves = _leaves(tensors, dtype)
    outs = fn(leaves, backend)
    total = sum((o.double() * (k + 1)).sum() for k, o in enumerate(outs))
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(total, present, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(present, grads)]
    return [o.detach() for o in outs], grads


def _compare(fn, tensors, dtype, names=None):
    """ours (triton, dtype) vs truth (reference, fp64 of the dtype-rounded inputs) vs lowp (reference, dtype)."""
    rounded = [None if t is None else t.to(dtype) for t in tensors]
    ours = _run(fn, rounded, dtype, "triton")
    truth = _run(fn, rounded, torch.float64, "reference")
    lowp = _run(fn, rounded, dtype, "reference")
    for kind, (o_list, t_list, l_list) in (("out", (ours[0], truth[0], lowp[0])), ("grad", (ours[1], truth[1], lowp[1]))):
        for i, (o, t, lo) in enumerate(zip(o_list, t_list, l_list)):
            _close(f"{kind}[{i}]", o, t, lo, dtype)
    return ours


# ------------------------------------------------------------------------------------------- CE

CE_CASES = {
    "plain": dict(),
    "all": dict(bias=True, label_smoothing=0.1, z_loss=1e-3, softcap=15.0, reduction="sum"),
    "none": dict(reduction="none"),
}


def _ce_fn(opts, y):
    def fn(leaves, backend):
        x, w, b = leaves
        return [L.linear_cross_entropy(x, w, y.to(DEV), linear_bias=b, backend=backend, **opts)]
    return fn


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", list(CE_CASES))
def test_ce(case, dtype):
    kw = dict(CE_CASES[case])
    bias = kw.pop("bias", False)
    x, w = _rand(N, H, seed=1), _rand(V, H, seed=2, scale=2.0 / H**0.5)
    b = _rand(V, seed=3, scale=0.5) if bias else None
    _compare(_ce_fn(kw, _targets((N,), 4)), [x, w, b], dtype)


DENSE_CASES = {  # docs/maths.md §11: the target read tile by tile (kernels/dense.py)
    "prob_all": dict(label_smoothing=0.1, z_loss=1e-3, softcap=15.0),
    "prob_none_det": dict(reduction="none", deterministic=True),
    "cw_ls_cap": dict(label_smoothing=0.2, softcap=15.0, reduction="none"),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", list(DENSE_CASES))
def test_ce_dense_targets(case, dtype):
    """Probability targets (their gradient too) and class-weighted smoothing, with and without softcap."""
    kw = dict(DENSE_CASES[case])
    x, w, b = _rand(N, H, seed=31), _rand(V, H, seed=32, scale=2.0 / H**0.5), _rand(V, seed=33, scale=0.5)
    cw = torch.rand(V, generator=_gen(34)) + 0.2
    if case.startswith("prob"):
        t = torch.softmax(_rand(N, V, seed=35, scale=2.0), -1)

        def fn(leaves, backend):
            x_, w_, b_, t_ = leaves
            return [L.linear_cross_entropy(x_, w_, t_, linear_bias=b_, weight=cw.to(DEV, x_.dtype), backend=backend,
                                           **kw)]
        _compare(fn, [x, w, b, t], dtype)
    else:
        y = _targets((N,), 36)

        def fn(leaves, backend):
            x_, w_, b_ = leaves
            return [L.linear_cross_entropy(x_, w_, y.to(DEV), linear_bias=b_, weight=cw.to(DEV, x_.dtype),
                                           backend=backend, **kw)]
        _compare(fn, [x, w, b], dtype)


def test_ce_fp16():
    x, w = _rand(N, H, seed=5), _rand(V, H, seed=6, scale=2.0 / H**0.5)
    _compare(_ce_fn({}, _targets((N,), 7)), [x, w, None], torch.float16)


def test_ce_confident_bf16():
    """p_y → 1 with bf16 inputs: the true-class gradient p_y − 1 must survive (Liger's regression)."""
    x, w = _rand(N, H, seed=8), _rand(V, H, seed=9, scale=1.0 / H**0.5)
    y = _targets((N,), 10)
    valid = y != IGN
    x[valid] += 6.0 * w[y[valid]] / w[y[valid]].norm(dim=1, keepdim=True) * H**0.5 / 4
    _compare(_ce_fn({}, y), [x, w, None], torch.bfloat16)


@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "chunks"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_ce_deterministic_bit_identical(dtype, chunked):
    """dz kernel + torch GEMMs (docs/maths.md §14.3); ``chunks``: a dz budget of 100 rows (several row chunks)."""
    x, w, b = _rand(N, H, seed=11), _rand(V, H, seed=12, scale=2.0 / H**0.5), _rand(V, seed=13)
    budget = 100 * V * (4 if dtype == torch.float32 else 2) if chunked else None
    fn = _ce_fn(dict(deterministic=True, softcap=20.0, label_smoothing=0.05, chunk_bytes=budget), _targets((N,), 14))
    first = _compare(fn, [x, w, b], dtype)
    again = _run(fn, [t.to(dtype) for t in (x, w, b)], dtype, "triton")
    for a, c in zip(first[0] + first[1], again[0] + again[1]):
        assert torch.equal(a, c)


def _truth_logits(x, w, b=None, softcap=None):
    """fp64 logits of the (already rounded) inputs, on the CPU: the accuracy's truth."""
    z = x.detach().double().cpu() @ w.detach().double().cpu().T
    if b is not None:
        z = z + b.detach().double().cpu()
    return softcap * torch.tanh(z / softcap) if softcap else z


def _check_accuracy(name, acc, z64, y):
    """``acc`` (argmax == target) against the fp64 truth with the near-tie allowance of the module docstring."""
    acc, y = acc.detach().cpu().reshape(-1), y.cpu().reshape(-1)
    z64 = z64.reshape(-1, z64.shape[-1])
    assert acc.dtype == torch.bool, f"{name}: dtype {acc.dtype}"
    valid = y != IGN
    assert not acc[~valid].any(), f"{name}: an ignored row counts as correct"
    yc = y.clamp(min=0)
    truth = (z64.argmax(-1) == yc) & valid
    diff = acc != truth
    gap = z64.max(-1).values - z64.gather(-1, yc[:, None])[:, 0]
    far = diff & (gap > TIE_RTOL * z64.abs().amax(-1))
    assert not far.any(), f"{name}: rows {far.nonzero()[:5, 0].tolist()} differ from the truth away from a near tie"
    assert int(diff.sum()) <= max(1, int(valid.sum()) // 100), f"{name}: {int(diff.sum())} rows flip at near ties"


PER_TOKEN_CASES = {  # (dtype, options); the deterministic one with a dz budget of 100 rows (several chunks)
    "plain_bf16": (torch.bfloat16, dict()),
    "all_fp32": (torch.float32, dict(bias=True, softcap=15.0, label_smoothing=0.1, z_loss=1e-3, reduction="none")),
    "det_bf16": (torch.bfloat16, dict(deterministic=True, softcap=20.0, chunk_bytes=100 * V * 2)),
}


@pytest.mark.parametrize("case", list(PER_TOKEN_CASES))
def test_ce_per_token_outputs(case):
    """return_lse / return_entropy / return_accuracy: the forward's per-token outputs (the extended forward
    kernel) and the entropy's gradient in the backward (atomic kernel, or the deterministic dz kernel)."""
    dtype, kw = PER_TOKEN_CASES[case]
    kw = dict(kw)
    bias = kw.pop("bias", False)
    x, w = _rand(N, H, seed=80), _rand(V, H, seed=81, scale=2.0 / H**0.5)
    x[7] *= 8  # a confident row: small entropy
    b = _rand(V, seed=82, scale=0.5) if bias else None
    y = _targets((N,), 83)

    def fn(leaves, backend):
        x_, w_, b_ = leaves
        out = L.linear_cross_entropy(x_, w_, y.to(DEV), linear_bias=b_, backend=backend, return_lse=True,
                                     return_entropy=True, **kw)
        assert out.accuracy is None
        return [out.loss, out.entropy, out.lse]

    _compare(fn, [x, w, b], dtype)
    xr, wr, br = (None if t is None else t.to(DEV, dtype) for t in (x, w, b))
    with torch.no_grad():
        out = L.linear_cross_entropy(xr, wr, y.to(DEV), linear_bias=br, backend="triton", return_accuracy=True, **kw)
    assert out.lse is None and out.entropy is None
    _check_accuracy("accuracy", out.accuracy, _truth_logits(xr, wr, br, kw.get("softcap")), y)


def test_nan_row_rule():
    """The NaN-row rule of the module docstring, CE with every per-token output."""
    x, w = _rand(N, H, seed=90), _rand(V, H, seed=91, scale=2.0 / H**0.5)
    y = _targets((N,), 92)
    bad = 3
    y[bad] = 5
    x_nan = x.clone()
    x_nan[bad, H // 2] = float("nan")
    want_acc = DEV.type == "cuda"

    def run(xin):
        xl = xin.to(DEV, torch.bfloat16).requires_grad_()
        out = L.linear_cross_entropy(xl, w.to(DEV, torch.bfloat16), y.to(DEV), reduction="none", backend="triton",
                                     return_lse=True, return_entropy=True, return_accuracy=want_acc)
        (gx,) = torch.autograd.grad(out.loss.float().sum() + out.entropy.float().sum(), [xl])
        return out, gx.float().cpu()

    (clean, g_clean), (dirty, g_dirty) = run(x), run(x_nan)
    keep = torch.arange(N) != bad
    for name in ("loss", "lse", "entropy"):
        d, c = getattr(dirty, name).float().cpu(), getattr(clean, name).float().cpu()
        assert not torch.isfinite(d[bad]), f"{name}: the NaN row gives {d[bad].item()}"
        assert torch.equal(d[keep], c[keep]), f"{name}: a NaN in one row changed other rows (forward rows are independent)"
    assert not torch.isfinite(g_dirty[bad]).all(), "dx of the NaN row is finite"
    torch.testing.assert_close(g_dirty[keep], g_clean[keep], rtol=2e-2, atol=1e-3)  # bf16 dx, atomic order
    if want_acc:
        assert torch.equal(dirty.accuracy.cpu()[keep], clean.accuracy.cpu()[keep])


# ----------------------------------------------------------------------------------- divergence


def _div_fn(opts, mask=None):
    def fn(leaves, backend):
        xp, xq, w, b = leaves
        return [L.linear_divergence(xp, xq, w, linear_bias=b, backend=backend,
                                    mask=None if mask is None else mask.to(DEV), **opts)]
    return fn


def _div_inputs(seed, bias=False):
    xp = _rand(N, H, seed=seed)
    xq = xp + 0.5 * _rand(N, H, seed=seed + 1)
    w = _rand(V, H, seed=seed + 2, scale=2.0 / H**0.5)
    return [xp, xq, w, _rand(V, seed=seed + 3, scale=0.3) if bias else None]


@pytest.mark.parametrize("divergence", ["sce", "kl", "kl_reverse", "sym_kl", "js"])
def test_divergence_bf16(divergence):
    _compare(_div_fn(dict(divergence=divergence)), _div_inputs(20), torch.bfloat16)


@pytest.mark.parametrize("divergence", ["sce", "js"])
def test_divergence_fp32(divergence):
    _compare(_div_fn(dict(divergence=divergence)), _div_inputs(21), torch.float32)


def test_divergence_options_bf16():
    mask = torch.rand(N, generator=_gen(22)) > 0.3
    opts = dict(divergence="kl", temperature=2.0, detach="p", softcap=10.0, reduction="sum")
    _compare(_div_fn(opts, mask), _div_inputs(23, bias=True), torch.bfloat16)


def test_divergence_none_reduction_deterministic():
    opts = dict(divergence="sym_kl", reduction="none", deterministic=True, detach="q")
    _compare(_div_fn(opts), _div_inputs(24), torch.bfloat16)


# ----------------------------------------------------------------------------------- long-short


def _ls_fn(opts, yl, ys):
    def fn(leaves, backend):
        hl, hs, w, b = leaves
        out = L.long_short_loss(hl, hs, w, yl.to(DEV), ys.to(DEV), l_extra=LX, linear_bias=b, backend=backend,
                                **opts)
        return [out.loss, out.ce, out.misalign]
    return fn


def _ls_inputs(seed, bias=False):
    hl = _rand(B, T, H, seed=seed)
    hs = hl.clone()
    hs[:, : T - LX] = hl[:, LX:] + 0.4 * _rand(B, T - LX, H, seed=seed + 1)
    w = _rand(V, H, seed=seed + 2, scale=2.0 / H**0.5)
    b = _rand(V, seed=seed + 3, scale=0.3) if bias else None
    return [hl, hs, w, b], _targets((B, T), seed + 4, 5), _targets((B, T), seed + 5, 5)


LS_CASES = {
    "sce_bf16": (torch.bfloat16, dict(divergence="sce")),
    "js_all_bf16": (torch.bfloat16, dict(divergence="js", temperature=1.5, softcap=20.0, label_smoothing=0.1,
                                         z_loss=1e-3, positions="last", detach="long", bias=True)),
    "kl_fp32": (torch.float32, dict(divergence="kl", detach="short")),
    # deterministic with a dz budget of 100 rows per view: several row chunks (docs/maths.md §14.3)
    "sym_kl_det_bf16": (torch.bfloat16, dict(divergence="sym_kl", deterministic=True, alpha=0.5,
                                             chunk_bytes=2 * 100 * V * 2)),
    "kl_reverse_fp16": (torch.float16, dict(divergence="kl_reverse")),
}


@pytest.mark.parametrize("case", list(LS_CASES))
def test_long_short(case):
    dtype, opts = LS_CASES[case]
    opts = dict(opts)
    bias = opts.pop("bias", False)
    tensors, yl, ys = _ls_inputs(30, bias)
    _compare(_ls_fn(opts, yl, ys), tensors, dtype)


LS_PER_VIEW_CASES = {
    "sce_bf16": (torch.bfloat16, dict(divergence="sce")),
    # deterministic with a dz budget of 100 rows per view: several row chunks
    "js_det_fp32": (torch.float32, dict(divergence="js", softcap=20.0, deterministic=True, chunk_bytes=2 * 100 * V * 4)),
}


@pytest.mark.parametrize("case", list(LS_PER_VIEW_CASES))
def test_long_short_per_view_outputs(case):
    """Per-view lse / entropy / accuracy of long_short_loss (the extended pair forward kernel) and the entropy's
    gradient in the pair backward (atomic, or the deterministic dz kernel)."""
    dtype, opts = LS_PER_VIEW_CASES[case]
    tensors, yl, ys = _ls_inputs(100)

    def fn(leaves, backend):
        hl, hs, w, b = leaves
        out = L.long_short_loss(hl, hs, w, yl.to(DEV), ys.to(DEV), l_extra=LX, linear_bias=b, backend=backend,
                                return_lse=True, return_entropy=True, **opts)
        return [out.loss, out.ce, out.misalign, out.long.entropy, out.short.entropy, out.long.lse, out.short.lse]

    _compare(fn, tensors, dtype)
    hl, hs, w = (t.to(DEV, dtype) for t in tensors[:3])
    with torch.no_grad():
        out = L.long_short_loss(hl, hs, w, yl.to(DEV), ys.to(DEV), l_extra=LX, backend="triton",
                                return_accuracy=True, **opts)
    for view, h, y in (("long", hl, yl), ("short", hs, ys)):
        acc = getattr(out, view).accuracy
        assert acc.shape == y.shape, f"{view}: shape {tuple(acc.shape)}"
        _check_accuracy(f"{view} accuracy", acc, _truth_logits(h.reshape(-1, H), w, None, opts.get("softcap")), y)


# ---------------------------------------------------------------------------------- distillation

H_T = H + 34 if DEV.type == "cuda" else H - 16  # the teacher's hidden size differs from the student's

DISTILL_CASES = {  # (dtype, options); "det": deterministic with a dz budget of 100 rows (several chunks)
    "frozen_kl_bf16": (torch.bfloat16, dict(divergence="kl", temperature=2.0, hard_loss_weight=0.5, softcap=20.0,
                                            bias=True)),
    "trained_js_bf16": (torch.bfloat16, dict(divergence="js", train_teacher=True, hard_loss_weight=0.3)),
    "frozen_sym_kl_det_fp32": (torch.float32, dict(divergence="sym_kl", deterministic=True,
                                                   chunk_bytes=2 * 100 * V * 4)),
    "trained_kl_det_bf16": (torch.bfloat16, dict(divergence="kl", train_teacher=True, deterministic=True,
                                                 temperature=1.5, chunk_bytes=2 * 100 * V * 2)),
}


@pytest.mark.parametrize("case", list(DISTILL_CASES))
def test_linear_distillation_two_heads(case):
    """linear_distillation: student and teacher heads of different hidden sizes (the two-head kernels), the
    teacher frozen (no teacher gradient) or trained; the deterministic cases bit-identical when run again."""
    dtype, opts = DISTILL_CASES[case]
    opts = dict(opts)
    bias = opts.pop("bias", False)
    xs, ws = _rand(N, H, seed=110), _rand(V, H, seed=111, scale=2.0 / H**0.5)
    xt = _rand(N, H_T, seed=112)
    wt = _rand(V, H_T, seed=113, scale=2.0 / H_T**0.5)
    bs, bt = (_rand(V, seed=114, scale=0.3), _rand(V, seed=115, scale=0.3)) if bias else (None, None)
    y = _targets((N,), 116)

    def fn(leaves, backend):
        xs_, ws_, xt_, wt_, bs_, bt_ = leaves
        out = L.linear_distillation(xs_, ws_, xt_, wt_, y.to(DEV), student_bias=bs_, teacher_bias=bt_,
                                    backend=backend, **opts)
        return [out.loss, out.hard, out.soft]

    tensors = [xs, ws, xt, wt, bs, bt]
    first = _compare(fn, tensors, dtype)
    teacher_grads = first[1][2:4]
    if not opts.get("train_teacher"):
        assert all(not g.any() for g in teacher_grads), "a frozen teacher received a gradient"
    else:
        assert all(g.abs().sum() > 0 for g in teacher_grads), "a trained teacher received no gradient"
    if opts.get("deterministic"):
        again = _run(fn, [None if t is None else t.to(dtype) for t in tensors], dtype, "triton")
        for a, c in zip(first[0] + first[1], again[0] + again[1]):
            assert torch.equal(a, c)


# ------------------------------------------------------------------------------ GPU-only behaviour


@needs_gpu
def test_float64_auto_goes_to_reference_and_triton_refuses():
    x = _rand(N, H, seed=40).to(DEV, torch.float64).requires_grad_()
    w = _rand(V, H, seed=41, scale=1 / H**0.5).to(DEV, torch.float64)
    y = _targets((N,), 42).to(DEV)
    out = L.linear_cross_entropy(x, w, y)
    ref = L.linear_cross_entropy(x, w, y, backend="reference")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="float64"):
        L.linear_cross_entropy(x, w, y, backend="triton")


@needs_gpu
def test_autocast_cuda_equals_inputs_cast_first():
    tensors, yl, ys = _ls_inputs(50, bias=True)
    fn = _ls_fn(dict(divergence="sce"), yl, ys)
    leaves = _leaves(tensors, torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = fn(leaves, "triton")
    want = fn([t.to(torch.bfloat16) for t in leaves], "triton")
    for a, b in zip(got, want):  # forward: no atomics, so bit-identical
        assert a.dtype == torch.bfloat16
        assert torch.equal(a, b)


@needs_gpu
def test_other_device_and_stream():
    """The head on the last GPU while GPU 0 is current, on a side stream: same numbers as on GPU 0."""
    n_dev = torch.cuda.device_count()
    x, w = _rand(N, H, seed=60), _rand(V, H, seed=61, scale=2.0 / H**0.5)
    y = _targets((N,), 62)
    base = _run(_ce_fn({}, y), [x.bfloat16(), w.bfloat16(), None], torch.bfloat16, "triton")
    dev = torch.device("cuda", n_dev - 1)
    torch.cuda.set_device(0)
    s = torch.cuda.Stream(device=dev)
    with torch.cuda.stream(s):
        xl = x.to(dev, torch.bfloat16).requires_grad_()
        wl = w.to(dev, torch.bfloat16).requires_grad_()
        out = L.linear_cross_entropy(xl, wl, y.to(dev), deterministic=False)
        gx, gw = torch.autograd.grad(out.double(), [xl, wl])
    s.synchronize()
    torch.testing.assert_close(out.cpu().float(), base[0][0].cpu().float(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(gx.cpu().float(), base[1][0].cpu().float(), rtol=2e-2, atol=1e-3)
    assert torch.cuda.current_device() == 0


@needs_gpu
def test_int64_offsets_rows_past_2_31_elements():
    """N·H > 2^31: the last rows' loss and dx match the reference on those rows."""
    torch.cuda.empty_cache()  # what earlier tests left in torch's cache is not free to mem_get_info
    free, _ = torch.cuda.mem_get_info()
    Hb, Vb = 4096, 512
    Nb = (2**31) // Hb + 77
    if free < 40 * 2**30:
        pytest.skip("needs ~40 GB of free GPU memory")
    g = torch.Generator(device=DEV).manual_seed(70)
    x = torch.randn(Nb, Hb, device=DEV, dtype=torch.bfloat16, generator=g).requires_grad_()
    w = (torch.randn(Vb, Hb, device=DEV, generator=g) / Hb**0.5).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, Vb, (Nb,), device=DEV, generator=g)
    rows = L.linear_cross_entropy(x, w, y, reduction="none")
    (gx,) = torch.autograd.grad(rows.float().sum(), [x])
    tail = slice(Nb - 64, Nb)
    xt = x.detach()[tail].double().requires_grad_()
    ref = L.linear_cross_entropy(xt, w.detach().double(), y[tail], reduction="none", backend="reference")
    (gt,) = torch.autograd.grad(ref.sum(), [xt])
    torch.testing.assert_close(rows[tail].double(), ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx[tail].double(), gt, rtol=5e-2, atol=2e-3)


@needs_gpu
def test_dense_targets_rows_past_2_31_elements():
    """Probability targets with N·V > 2^31 (the target is read tile by tile at 64-bit offsets): the last rows'
    loss and dx match the reference on those rows."""
    torch.cuda.empty_cache()  # what earlier tests left in torch's cache is not free to mem_get_info
    free, _ = torch.cuda.mem_get_info()
    Hb, Vb = 256, 32768
    Nb = (2**31) // Vb + 77
    if free < 24 * 2**30:
        pytest.skip("needs ~24 GB of free GPU memory")
    g = torch.Generator(device=DEV).manual_seed(72)
    x = torch.randn(Nb, Hb, device=DEV, dtype=torch.bfloat16, generator=g).requires_grad_()
    w = (torch.randn(Vb, Hb, device=DEV, generator=g) / Hb**0.5).to(torch.bfloat16).requires_grad_()
    t = torch.rand(Nb, Vb, device=DEV, dtype=torch.bfloat16, generator=g)
    for r0 in range(0, Nb, 4096):  # rows normalised in slices: no fp32 copy of the whole target
        blk = t[r0:r0 + 4096]
        blk.div_(blk.float().sum(-1, keepdim=True).to(torch.bfloat16))
    rows = L.linear_cross_entropy(x, w, t, reduction="none")
    (gx,) = torch.autograd.grad(rows.float().sum(), [x])
    tail = slice(Nb - 64, Nb)
    xt = x.detach()[tail].double().requires_grad_()
    ref = L.linear_cross_entropy(xt, w.detach().double(), t[tail].double(), reduction="none", backend="reference")
    (gt,) = torch.autograd.grad(ref.sum(), [xt])
    torch.testing.assert_close(rows[tail].double(), ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx[tail].double(), gt, rtol=5e-2, atol=2e-3)
