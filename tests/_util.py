"""Shared helpers for the tests: inputs, fp64 truth, and CCE's low-precision comparison rule."""

from __future__ import annotations

import importlib.util
import os

import torch

IGN = -100


def triton_available() -> bool:
    """Whether the tests run the Triton backend: triton is installed and LSA_TEST_BACKENDS (default
    ``cpu,triton``) names it. When it is installed the kernels must import: an error there is raised
    (a failed collection), never turned into a silent skip of every Triton test."""
    if "triton" not in os.environ.get("LSA_TEST_BACKENDS", "cpu,triton"):
        return False
    if importlib.util.find_spec("triton") is None:
        return False
    from lsa_kernels import kernels  # noqa: F401

    return True


def backends(triton: bool = True):
    out = ["cpu"]
    if triton and triton_available():
        out.append("triton")
    return out


def has(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def leaf(t: torch.Tensor, dtype=None) -> torch.Tensor:
    t = t.detach().clone()
    if dtype is not None:
        t = t.to(dtype)
    return t.requires_grad_(True)


def targets(shape, V: int, p_ignore: float = 0.15, gen=None) -> torch.Tensor:
    y = torch.randint(0, V, shape, generator=gen)
    y[torch.rand(shape, generator=gen) < p_ignore] = IGN
    return y


def grads(out, inputs):
    """Gradients of ``out`` w.r.t. ``inputs`` (zeros where unused)."""
    gs = torch.autograd.grad(out, [i for i in inputs], allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for g, i in zip(gs, inputs)]


def assert_close_rule(ours, torch_same, truth, *, rtol=0.0, atol=1e-5, name=""):
    """CCE's rule (docs/maths.md §7): per element ``|ours - truth| <= |torch_same - truth| + tol``."""
    ours, torch_same, truth = ours.double(), torch_same.double(), truth.double()
    err = (ours - truth).abs()
    allowed = (torch_same - truth).abs() + atol + rtol * truth.abs()
    bad = err > allowed
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements break the rule; first at {i}: "
            f"ours {ours.flatten()[i].item():.6g}, torch {torch_same.flatten()[i].item():.6g}, "
            f"truth {truth.flatten()[i].item():.6g}; max err {err.max().item():.3g}"
        )



def assert_ce_rule(ours, grads_ours, same, grads_same, truth, grads_truth, dtype, backend):
    """A CE value and its (dx, dw, db) against the fp64 truth by CCE's rule, with torch's same-dtype result as the
    yardstick (tol 1e-5 fp32, 1e-3 bf16; gradients 10x tighter in atol). Triton's gradient GEMMs take dz rounded to
    bf16 as the GPU's tensor cores do: one bf16 half-ulp at the gradient's scale on top of the rule (the cpu paths
    keep fp32 dz and the tighter rule)."""
    assert ours.dtype == dtype and ours.shape == truth.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    assert_close_rule(ours, same, truth, atol=tol, rtol=tol, name="loss")
    for name, o, s, t in zip(["dx", "dw", "db"], grads_ours, grads_same, grads_truth):
        extra = 2.0**-8 * t.abs().max().item() if (backend == "triton" and dtype != torch.float32) else 0.0
        assert_close_rule(o, s, t, atol=tol * 0.1 + extra, rtol=tol, name=name)

def _gloo_entry(rank, world, port, errfile, body, args):
    import traceback

    import torch.distributed as dist

    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        torch.set_num_threads(1)
        body(rank, world, *args)
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        with open(errfile, "a") as f:
            f.write(f"rank {rank}:\n{traceback.format_exc()}\n")
        raise


def run_gloo(body, world: int, tmp_path, *args) -> None:
    """``body(rank, world, *args)`` on ``world`` gloo processes (module-level ``body``: it is pickled); a failure
    on any rank fails the calling test with that rank's traceback."""
    import socket

    import pytest
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    errfile = str(tmp_path / "errors.txt")
    try:
        mp.spawn(_gloo_entry, args=(world, port, errfile, body, args), nprocs=world, join=True)
    except Exception:
        pytest.fail(open(errfile).read() if os.path.exists(errfile) else "(no error file)")


def row_coef(n: int, seed: int = 1, y=None, p_zero: float = 0.0) -> torch.Tensor:
    """Per-row gradient coefficients in [0.5, 1.5) (a share ``p_zero`` set to 0; 0 on ignored rows of ``y``)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(n, generator=g) + 0.5
    if p_zero:
        c = c * (torch.rand(n, generator=g) > p_zero)
    return c * (y != IGN) if y is not None else c


def leaf_or_none(t, dtype):
    """A differentiable copy of ``t`` in ``dtype``; None stays None."""
    return None if t is None else t.detach().to(dtype).requires_grad_()


def grad_or_zeros(t):
    """``t.grad``, zeros if it got none; None for None."""
    if t is None:
        return None
    return t.grad if t.grad is not None else torch.zeros_like(t)


def assert_within(ours, truth, *, atol, rtol=1e-4, lowp=None, name=""):
    """Per element ``|ours − truth| ≤ atol + rtol·|truth|`` (+ ``|lowp − truth|`` when the same computation in
    the low-precision dtype is given: CCE's rule), all finite."""
    ours, truth = ours.double(), truth.double()
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    if lowp is not None:
        assert_close_rule(ours, lowp, truth, atol=atol, rtol=rtol, name=name)
        return
    err = (ours - truth).abs()
    bound = atol + rtol * truth.abs()
    bad = err > bound
    assert not bad.any(), (f"{name}: {int(bad.sum())} elements off, max err {err.max().item():.3e}, "
                           f"max excess {(err - bound).max().item():.3e}")


EPS32 = torch.finfo(torch.float32).eps


def fp32_logits_error(x: torch.Tensor, w: torch.Tensor, b=None) -> torch.Tensor:
    """``δz [N, V]`` (fp64): this machine's fp32 logits ``x Wᵀ + b`` (one fp32 GEMM, as the cpu backend forms
    them) minus the exact logits of the same fp32-rounded inputs: the GEMM's own rounding, whatever BLAS kernel
    and CPU code path run it. Precision bounds scale from it instead of constants tuned on one CPU."""
    x32, w32 = x.detach().float(), w.detach().float()
    b32 = None if b is None else b.detach().float()
    got = torch.mm(x32, w32.t()) if b32 is None else torch.addmm(b32, x32, w32.t())
    exact = x32.double() @ w32.double().t()
    if b32 is not None:
        exact = exact + b32.double()
    return got.double() - exact


def fp32_gemm_rho(x: torch.Tensor, w: torch.Tensor) -> float:
    """The machine's normalised fp32 GEMM error for ``x Wᵀ``: ``max |δz| / (|x| |W|ᵀ)`` (a few ``EPS32``: the
    accumulation order of the BLAS kernel decides how many), at least ``EPS32 / 2``. A tolerance written as
    ``k · fp32_gemm_rho(x, w) · |x| |W|ᵀ`` is ``k`` GEMM roundings on any CPU."""
    d = fp32_logits_error(x, w)
    scale = x.detach().float().double().abs() @ w.detach().float().double().abs().t()
    return max(float((d.abs() / scale.clamp_min(1e-300)).max()), EPS32 / 2)


def fp32_gemm_atol(a: torch.Tensor, b: torch.Tensor, k: float) -> float:
    """``k`` fp32 GEMM roundings of the product ``a bᵀ`` at its largest (``k · rho · max |a| |b|ᵀ``, rho of
    :func:`fp32_gemm_rho` measured on ``a``, ``b`` themselves): an absolute tolerance for an fp32 result whose
    error the GEMM bounds (an lse or a CE loss moves by at most the largest logit error; ``dx = dz W``, ``dW = dzᵀ x``
    with ``a``, ``b`` = the truth's ``dz`` and W or x)."""
    a64, b64 = a.detach().double(), b.detach().double()
    return k * fp32_gemm_rho(a64, b64) * float((a64.abs() @ b64.abs().t()).max())


def first_order_effect(f, zs, deltas) -> torch.Tensor:
    """Per row ``Σ_v Σ_k |∂f/∂z_k,v|·|δz_k,v|``: a first-order bound of how far the rounding ``deltas`` of the
    logits ``zs`` (fp64 ``[N, V]`` each) can move the per-row values ``f(*zs) [N]`` (rows independent)."""
    zz = [z.detach().double().clone().requires_grad_(True) for z in zs]
    gs = torch.autograd.grad(f(*zz).sum(), zz)
    return sum((g.abs() * d.abs()).sum(-1) for g, d in zip(gs, deltas))


def assert_close(a, b, *, rtol=1e-5, atol=1e-6, name=""):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def write_corpus_texts(directory, n_train: int = 2, train_chars: int = 6000, test_chars: int = 8000) -> dict:
    """Small train / held-out text files cut from the shipped corpus: ``{"train": [paths], "test": [paths]}``."""
    import json
    import lzma

    from lsa_kernels.train import data as D

    with lzma.open(D.DEFAULT_CORPUS, "rt", encoding="utf-8") as f:
        works = [json.loads(line) for line in f]
    docs = {
        "train": [w["text"][:train_chars] for w in works if w["split"] == "train"][:n_train],
        "test": [w["text"][:test_chars] for w in works if w["split"] == "test"][:1],
    }
    paths = {"train": [], "test": []}
    for split, texts in docs.items():
        for i, t in enumerate(texts):
            p = os.path.join(str(directory), f"{split}{i}.txt")
            with open(p, "w", encoding="utf-8") as f:
                f.write(t)
            paths[split].append(p)
    return paths


def confident_ce_inputs(N: int, H: int, V: int, p_lo: float = 0.99, p_hi: float = 0.999, seed: int = 0):
    """Rows whose target probability lies in ``[p_lo, p_hi]`` (where bf16 rounding of ``p_y`` or of
    ``1 − p_y`` is what decides the true-class gradient ``p_y − 1``), with bf16-representable x and W.

    Row i is ``x_i = α_i·w_{y_i}`` with α_i found by bisection (in fp64) so that ``softmax(x_i Wᵀ)_{y_i}``
    hits a target spread over ``[p_lo, p_hi]``; x and W are then rounded to bf16 and returned as fp32
    tensors holding bf16 values, with the fp64 ``p_y`` of the rounded inputs (the caller checks the range).
    """
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(V, H, generator=g) / H**0.5).bfloat16().double()
    y = torch.randint(0, V, (N,), generator=g)
    want = torch.linspace(p_lo, p_hi, N, dtype=torch.float64)
    d = w[y]
    lo, hi = torch.zeros(N, dtype=torch.float64), torch.full((N,), 1e3, dtype=torch.float64)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        p_y = torch.softmax((mid[:, None] * d) @ w.T, -1).gather(1, y[:, None]).squeeze(1)
        low = p_y < want
        lo, hi = torch.where(low, mid, lo), torch.where(low, hi, mid)
    x = (lo[:, None] * d).bfloat16().double()
    p_y = torch.softmax(x @ w.T, -1).gather(1, y[:, None]).squeeze(1)
    return x.float(), w.float(), y, p_y


class CountFusedCE:
    """Counts the fused CE calls ``hf.patch`` makes (``integrations.patched_forward.linear_cross_entropy``), so an
    equal result cannot come from the unpatched path: ``with CountFusedCE() as ce: ...; ce.calls``."""

    def __enter__(self):
        from lsa_kernels.integrations import patched_forward

        self.calls, self._module, self._orig = 0, patched_forward, patched_forward.linear_cross_entropy

        def counting(*a, **k):
            self.calls += 1
            return self._orig(*a, **k)

        patched_forward.linear_cross_entropy = counting
        return self

    def __exit__(self, *exc):
        self._module.linear_cross_entropy = self._orig


def read_train_log(out) -> list:
    """The rows of a training run's ``<out>/log.jsonl``."""
    import json
    import os

    with open(os.path.join(str(out), "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
