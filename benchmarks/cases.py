"""The implementations under test and the case lists (one :class:`Case` = one fresh process).

Implementations (``impl``):

    lsa_cpu        lsa_kernels, backend="cpu" (chunked; CPU tensors only)
    lsa_triton     lsa_kernels, backend="triton" (CUDA only)
    naive          plain torch on materialised logits: F.linear + F.cross_entropy for CE,
                   lsa_kernels.reference.long_short_loss for long-short
    torch_chunked  torch's own F.linear_cross_entropy with options=LinearCrossEntropyOptions() (CE only)
    cce            Cut Cross-Entropy (apple/ml-cross-entropy): impl="torch_compile" on CPU, "cce" on CUDA (CE only)
    liger          Liger-Kernel fused linear CE (CE); for long-short with divergence "js": fused linear CE on
                   both views + fused linear JSD on the pairs (CUDA only; Liger's JSD sends no gradient
                   into the teacher = long view)
    gemm           the bare GEMMs the op needs, into preallocated outputs: the floor.
                   CE: logits x·Wᵀ (fwd); + dH = G·W, dW = Gᵀ·x (fwd_bwd). Long-short: the same per view,
                   two views (2 GEMMs fwd, 6 fwd_bwd). Run in the input dtype.

Modes: ``fwd`` (no autograd graph: inputs do not require grad, under torch.no_grad) and ``fwd_bwd``
(x and W require grad; loss.backward()). Every implementation is called with ``reduction="mean"``,
no bias, no softcap, no ignored targets. Long-short shapes: ``N`` is rows per view, ``B=2`` sequences
of ``T=N/2`` tokens, ``l_extra=T/4``, ``alpha=0.1``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPS = ("ce", "long_short")
MODES = ("fwd", "fwd_bwd")
DIVERGENCES = ("sce", "kl", "sym_kl", "js")
ALL_IMPLS = ("lsa_cpu", "lsa_triton", "naive", "torch_chunked", "cce", "liger", "gemm")

# the two goal shapes (printed as PASS/MISS lines by the runner)
GOAL_CE = dict(op="ce", mode="fwd_bwd", dtype="fp32", N=4096, H=512, V=32768, divergence="")
GOAL_LS = dict(op="long_short", mode="fwd_bwd", dtype="fp32", N=4096, H=512, V=32768, divergence="sce")


@dataclass(frozen=True)
class Case:
    op: str
    impl: str
    mode: str
    dtype: str
    N: int  # rows (ce) or rows per view (long_short)
    H: int
    V: int
    divergence: str = ""  # long_short only
    device: str = "cpu"

    @property
    def shape_key(self) -> Tuple:
        """Everything but the implementation: the cases one table row compares."""
        return (self.op, self.divergence, self.dtype, self.mode, self.N, self.H, self.V)

    def label(self) -> str:
        d = f"/{self.divergence}" if self.divergence else ""
        return f"{self.op}{d} {self.impl} {self.mode} {self.dtype} N={self.N} H={self.H} V={self.V}"

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: Dict) -> "Case":
        names = {f.name for f in dataclasses.fields(Case)}
        return Case(**{k: (int(v) if k in ("N", "H", "V") else v) for k, v in d.items() if k in names})


# ------------------------------------------------------------------------------------- availability


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def skip_reason(case: Case) -> Optional[str]:
    """Why ``case`` cannot run here (None when it can). Cheap: imports only what the check needs."""
    on_cuda = case.device == "cuda"
    if on_cuda and not _has_cuda():
        return "no CUDA device"
    if case.impl == "lsa_cpu" and on_cuda:
        return "lsa_cpu runs on CPU tensors only"
    if case.impl == "lsa_triton" and not on_cuda:
        return "lsa_triton needs CUDA (the Triton interpreter is not a benchmark)"
    if case.impl in ("torch_chunked", "cce") and case.op != "ce":
        return f"{case.impl} has no long-short / divergence op"
    if case.impl == "torch_chunked" and not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"torch {torch.__version__} has no chunked F.linear_cross_entropy"
    if case.impl == "liger":
        if not on_cuda:
            return "Liger kernels are Triton, GPU only"
        if case.op == "long_short" and case.divergence != "js":
            return f"Liger has a fused linear JSD only, no {case.divergence}"
        try:
            import liger_kernel  # noqa: F401
        except Exception as e:  # pragma: no cover
            return f"liger_kernel not importable: {e}"
    if case.impl == "cce":
        try:
            import cut_cross_entropy  # noqa: F401
        except Exception as e:  # pragma: no cover
            return f"cut_cross_entropy not importable: {e}"
    if case.op == "long_short" and (case.N % 2 or case.N < 8):
        return "long_short needs an even N >= 8 (B=2 sequences)"
    return None


# ------------------------------------------------------------------------------------------ inputs


def make_inputs(case: Case, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Inputs in the case's dtype on its device; logits come out ~N(0, 1)-ish."""
    dt, dev = DTYPES[case.dtype], torch.device(case.device)
    g = torch.Generator(device=dev).manual_seed(seed)  # generated on the device: a [V, H] head is big
    N, H, V = case.N, case.H, case.V

    def randn(*shape, scale=1.0):
        t = torch.randn(*shape, generator=g, device=dev)
        return (t.mul_(scale) if scale != 1.0 else t).to(dt)

    w = randn(V, H, scale=1.0 / math.sqrt(H))
    if case.op == "ce":
        return {"x": randn(N, H), "w": w, "y": torch.randint(0, V, (N,), generator=g, device=dev)}
    B, T = 2, N // 2
    hl = randn(B, T, H)
    # the short view sees less context: a perturbed copy of the long view's hidden states
    hs = (hl.float() + 0.3 * torch.randn(B, T, H, generator=g, device=dev)).to(dt)
    y = torch.randint(0, V, (B, T), generator=g, device=dev)
    return {"hl": hl, "hs": hs, "w": w, "yl": y.clone(), "ys": y.clone(), "l_extra": torch.tensor(max(1, T // 4))}


# --------------------------------------------------------------------------------- implementations


class Prepared:
    """One implementation bound to its inputs. ``step()`` runs one measured call; ``reset()`` drops
    gradients/outputs between calls (outside the timed region)."""

    def __init__(self, step: Callable[[], object], params: List[torch.Tensor], note: str = ""):
        self._step, self.params, self.note = step, params, note
        self.out = None

    def reset(self) -> None:
        self.out = None
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        self.out = self._step()


def _ce_fn(case: Case) -> Tuple[Callable, str]:
    """``f(x, w, y) -> scalar loss`` for one CE implementation."""
    impl, dev = case.impl, case.device
    if impl in ("lsa_cpu", "lsa_triton"):
        import lsa_kernels

        be = "cpu" if impl == "lsa_cpu" else "triton"
        return (lambda x, w, y: lsa_kernels.linear_cross_entropy(x, w, y, backend=be, check_targets=False)), ""
    if impl == "naive":
        return (lambda x, w, y: F.cross_entropy(F.linear(x, w).float(), y)), "logits upcast to fp32 before CE"
    if impl == "torch_chunked":
        opts = torch.nn.LinearCrossEntropyOptions()
        return (lambda x, w, y: F.linear_cross_entropy(x, w, y, options=opts)), "LinearCrossEntropyOptions() (auto)"
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy as cce_lce

        cimpl = "cce" if dev == "cuda" else "torch_compile"
        # CCE's order is (embeddings, classifier, targets); shift=False is its default, reduction mean
        return (lambda x, w, y: cce_lce(x, w, y, shift=False, reduction="mean", impl=cimpl)), f"impl={cimpl}"
    if impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return (lambda x, w, y: liger_fused_linear_cross_entropy(x, w, y, reduction="mean")), ""
    raise ValueError(f"no CE implementation {impl!r}")


def _ls_fn(case: Case) -> Tuple[Callable, str]:
    """``f(hl, hs, w, yl, ys, l_extra) -> scalar loss`` for one long-short implementation."""
    impl, div = case.impl, case.divergence or "sce"
    if impl in ("lsa_cpu", "lsa_triton"):
        import lsa_kernels

        be = "cpu" if impl == "lsa_cpu" else "triton"

        def f(hl, hs, w, yl, ys, l_extra):
            return lsa_kernels.long_short_loss(
                hl, hs, w, yl, ys, l_extra=l_extra, divergence=div, backend=be, check_targets=False
            ).loss

        return f, ""
    if impl == "naive":
        from lsa_kernels import reference

        def f(hl, hs, w, yl, ys, l_extra):
            return reference.long_short_loss(hl, hs, w, yl, ys, l_extra=l_extra, divergence=div).loss

        return f, "lsa_kernels.reference.long_short_loss"
    if impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy, liger_fused_linear_jsd

        def f(hl, hs, w, yl, ys, l_extra):
            B, T, H = hl.shape
            ce = liger_fused_linear_cross_entropy(
                torch.cat([hl.reshape(-1, H), hs.reshape(-1, H)]), w, torch.cat([yl.reshape(-1), ys.reshape(-1)])
            )
            a = hl[:, l_extra:].reshape(-1, H)  # long view = teacher
            b = hs[:, : T - l_extra].reshape(-1, H)  # short view = student
            return ce + 0.1 * liger_fused_linear_jsd(b, w, a, w, jsd_beta=0.5)

        return f, "fused linear CE (both views) + fused linear JSD; no gradient into the teacher (long) view"
    raise ValueError(f"no long-short implementation {impl!r}")


def _gemm_step(case: Case, inp: Dict[str, torch.Tensor]) -> Callable[[], object]:
    w = inp["w"]
    xs = [inp["x"]] if case.op == "ce" else [inp["hl"].reshape(-1, case.H), inp["hs"].reshape(-1, case.H)]
    N, V, H = xs[0].shape[0], case.V, case.H
    z = torch.empty(N, V, dtype=w.dtype, device=w.device)
    bwd = case.mode == "fwd_bwd"
    G = torch.randn(N, V, dtype=w.dtype, device=w.device) if bwd else None
    dx = torch.empty(N, H, dtype=w.dtype, device=w.device) if bwd else None
    dw = torch.empty(V, H, dtype=w.dtype, device=w.device) if bwd else None

    def step():
        for x in xs:
            torch.mm(x, w.t(), out=z)
            if bwd:
                torch.mm(G, w, out=dx)
                torch.mm(G.t(), x, out=dw)
        return z

    return step


def prepare(case: Case, inp: Dict[str, torch.Tensor]) -> Prepared:
    """Bind ``case.impl`` to ``inp`` (from :func:`make_inputs`)."""
    bwd = case.mode == "fwd_bwd"
    if case.impl == "gemm":
        n = "2 GEMMs/view" if case.op == "long_short" else "1 GEMM"
        if bwd:
            n = "6 GEMMs (3 per view)" if case.op == "long_short" else "3 GEMMs"
        return Prepared(_gemm_step(case, inp), [], f"{n} into preallocated outputs")
    if case.op == "ce":
        fn, note = _ce_fn(case)
        x, w, y = inp["x"], inp["w"], inp["y"]
        params = [x, w]
        args = (x, w, y)
    else:
        fn, note = _ls_fn(case)
        x, w = inp["hl"], inp["w"]
        params = [inp["hl"], inp["hs"], w]
        args = (inp["hl"], inp["hs"], w, inp["yl"], inp["ys"], int(inp["l_extra"]))
    if bwd:
        for p in params:
            p.requires_grad_(True)

        def step():
            loss = fn(*args)
            loss.backward()
            return loss.detach()

    else:
        for p in params:
            p.requires_grad_(False)

        def step():
            with torch.no_grad():
                return fn(*args)

    return Prepared(step, params if bwd else [], note)


# --------------------------------------------------------------------------------------- case lists


def default_impls(device: str, op: str) -> List[str]:
    ours = ["lsa_triton"] if device == "cuda" else ["lsa_cpu"]
    if op == "ce":
        return ours + ["naive", "torch_chunked", "cce", "liger", "gemm"]
    return ours + ["naive", "liger", "gemm"]


def _grid(op, device, dtypes, modes, shapes, divs, impls) -> List[Case]:
    out = []
    for dt in dtypes:
        for mode in modes:
            for div in divs:
                for N, H, V in shapes:
                    for impl in impls:
                        out.append(Case(op, impl, mode, dt, N, H, V, div, device))
    return out


def build_cases(
    device: str = "cpu",
    quick: bool = False,
    dtypes=("fp32", "bf16"),
    ops=OPS,
    impls: Optional[List[str]] = None,
) -> List[Case]:
    """The suite, in priority order: the goal shapes first (full CPU run), then the row sweeps (cheap
    to dear), forward-only, the other divergences, the vocabulary sweep, then bf16. A run cut short by
    ``--deadline`` keeps the most useful part. CPU shapes are sized for 2 cores (bf16 GEMMs without
    AVX512-BF16 are ~50x slower than fp32 there: tiny bf16 shapes only)."""
    cpu = device == "cpu"
    blocks: List[Tuple[str, str, str, List[Tuple[int, int, int]], Tuple[str, ...]]] = []  # op, dtype, mode, shapes, divs

    def add(op, dt, mode, shapes, divs=None):
        if op in ops and dt in dtypes and shapes:
            blocks.append((op, dt, mode, shapes, divs or (("sce",) if op == "long_short" else ("",))))

    other_divs = tuple(d for d in DIVERGENCES if d != "sce")
    if quick:
        for op in OPS:
            add(op, "fp32", "fwd_bwd", [(256, 512, 4096), (1024, 512, 4096)] if cpu else [(2048, 1024, 32768), (8192, 1024, 32768)])
            add(op, "bf16", "fwd_bwd", [(128, 128, 4096)] if cpu else [(4096, 2048, 65536)])
    elif cpu:
        g = (4096, 512, 32768)
        for op in OPS:
            add(op, "fp32", "fwd_bwd", [g])
        for op in OPS:
            add(op, "fp32", "fwd_bwd", [(n, 512, 32768) for n in (512, 1024, 2048)])
        for op in OPS:
            add(op, "fp32", "fwd", [(1024, 512, 32768), (4096, 512, 32768)])
        add("long_short", "fp32", "fwd_bwd", [(1024, 512, 32768)], other_divs)
        for op in OPS:
            add(op, "fp32", "fwd_bwd", [(1024, 512, v) for v in (8192, 16384, 65536)])
        for op in OPS:
            add(op, "bf16", "fwd_bwd", [(128, 256, 8192), (256, 256, 8192)])
        add("long_short", "bf16", "fwd_bwd", [(128, 256, 8192)], other_divs)
    else:  # cuda: sized for < 6 min on one H200 (about 70 processes)
        add("ce", "bf16", "fwd_bwd", [(n, 4096, 128256) for n in (4096, 8192, 16384)])
        add("long_short", "bf16", "fwd_bwd", [(n, 4096, 128256) for n in (2048, 4096, 8192)])
        for op in OPS:
            add(op, "bf16", "fwd", [(8192, 4096, 128256)])
        add("long_short", "bf16", "fwd_bwd", [(4096, 4096, 128256)], other_divs)
        add("ce", "bf16", "fwd_bwd", [(8192, 4096, v) for v in (32768, 256000)])
        for op in OPS:
            add(op, "fp32", "fwd_bwd", [(8192, 4096, 128256)])
        for op in OPS:  # the CPU goal shapes, for the record
            add(op, "fp32", "fwd_bwd", [(4096, 512, 32768)])
    cases: List[Case] = []
    for op, dt, mode, shapes, divs in blocks:
        imp = impls or default_impls(device, op)
        cases += _grid(op, device, [dt], [mode], shapes, divs, imp)
    seen, uniq = set(), []
    for c in cases:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    return uniq


def goal_cases(device: str = "cpu", impls: Optional[List[str]] = None) -> List[Case]:
    """Only the two goal shapes (``--goal``)."""
    out = []
    for g in (GOAL_CE, GOAL_LS):
        imp = impls or default_impls(device, g["op"])
        out += [Case(g["op"], i, g["mode"], g["dtype"], g["N"], g["H"], g["V"], g["divergence"], device) for i in imp]
    return out


def parse_list(s: Optional[str]) -> Optional[List[str]]:
    if s is None or s == "":
        return None
    return [p.strip() for p in s.split(",") if p.strip()]


def env_threads() -> int:
    return torch.get_num_threads() if os.environ.get("OMP_NUM_THREADS") is None else int(os.environ["OMP_NUM_THREADS"])


# ------------------------------------------------------------------------------ GPU correctness check


def _rel(a: torch.Tensor, truth: torch.Tensor) -> float:
    a, truth = a.double(), truth.double()
    return float((a - truth).norm() / truth.norm().clamp(min=1e-300))


def correctness(device: str = "cuda", quick: bool = False) -> List[Dict]:
    """Compiled Triton kernels (``backend="triton"``) against the reference at real sizes, fwd+bwd.

    Rule (docs/maths.md §7, from Cut Cross-Entropy): for the loss and every gradient, the error of ours against
    an fp64 truth (reference on fp64 copies of the same inputs, TF32 off) must be ≤ 1.5 × the error of
    torch's same-dtype reference + tol (relative Frobenius norms; tol 2e-3 for bf16, 1e-4 for fp32). An
    fp64 truth also for fp32 inputs: an fp32 truth would be the same-dtype reference itself (its error 0).
    The per-element form ``|ours − truth| ≤ |ref − truth| + 1e-2·max|truth|`` is reported as the
    fraction of elements that violate it. Returns one dict per check (``ok`` says pass/fail).
    """
    import time as _time

    import lsa_kernels
    from lsa_kernels import reference

    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    be = "triton" if device == "cuda" else "cpu"
    checks = [
        ("ce", "", "bf16", 8192, 4096, 128256),
        ("ce", "", "bf16", 4093, 4096, 128257),  # not block multiples
        ("ce", "", "fp32", 2048, 4096, 128256),
        ("long_short", "sce", "bf16", 8192, 4096, 128256),  # 2 x 4096 rows per view
        ("long_short", "js", "bf16", 4096, 4096, 128256),
        ("long_short", "kl", "bf16", 4096, 4096, 128256),
    ]
    if quick:  # CPU smoke test of this function itself
        checks = [("ce", "", "fp32", 64, 32, 300), ("ce", "", "bf16", 64, 32, 300),
                  ("long_short", "sce", "fp32", 32, 32, 300), ("long_short", "js", "bf16", 32, 32, 300)]
    results = []
    for op, div, dt, N, H, V in checks:
        case = Case(op, "lsa_" + be, "fwd_bwd", dt, N, H, V, div, device)
        rec = {"op": op, "divergence": div, "dtype": dt, "N": N, "H": H, "V": V, "backend": be}
        try:
            inp = make_inputs(case, seed=1)
            names = ["x", "w"] if op == "ce" else ["hl", "hs", "w"]

            def run(fn, cast):
                leaves = {k: inp[k].detach().to(cast, copy=True).requires_grad_(True) for k in names}
                if op == "ce":
                    loss = fn(leaves["x"], leaves["w"], inp["y"])
                else:
                    loss = fn(leaves["hl"], leaves["hs"], leaves["w"], inp["yl"], inp["ys"], int(inp["l_extra"]))
                loss.backward()
                keep = torch.float64 if cast == torch.float64 else torch.float32
                return [loss.detach().to(keep).reshape(1)] + [leaves[k].grad.to(keep) for k in names]

            if op == "ce":
                ours_fn = lambda x, w, y: lsa_kernels.linear_cross_entropy(x, w, y, backend=be)  # noqa: E731
                ref_fn = lambda x, w, y: reference.linear_cross_entropy(x, w, y)  # noqa: E731
            else:
                ours_fn = lambda hl, hs, w, yl, ys, le: lsa_kernels.long_short_loss(  # noqa: E731
                    hl, hs, w, yl, ys, l_extra=le, divergence=div, backend=be).loss
                ref_fn = lambda hl, hs, w, yl, ys, le: reference.long_short_loss(  # noqa: E731
                    hl, hs, w, yl, ys, l_extra=le, divergence=div).loss
            dtype = DTYPES[dt]
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = _time.perf_counter()
            ours = run(ours_fn, dtype)
            if device == "cuda":
                torch.cuda.synchronize()
            rec["ours_first_call_s"] = round(_time.perf_counter() - t0, 3)
            same = run(ref_fn, dtype)
            truth = run(ref_fn, torch.float64)
            rec["truth"] = "fp64"
            tol = 1e-4 if dt == "fp32" else 2e-3
            ok = True
            for name, o, s, t in zip(["loss"] + names, ours, same, truth):
                eo, es = _rel(o, t), _rel(s, t)
                atol = 1e-2 * float(t.abs().max())
                o, s = o.double(), s.double()
                viol = float(((o - t).abs() > (s - t).abs() + atol).float().mean())
                good = math.isfinite(eo) and eo <= 1.5 * es + tol
                ok &= good
                rec[name] = {"err_ours": eo, "err_torch_same_dtype": es, "elem_violations": viol, "ok": good}
            rec["ok"] = ok
            del ours, same, truth
        except Exception as e:  # recorded, the run goes on
            rec["ok"] = False
            rec["error"] = f"{type(e).__name__}: {e}"[:400]
        if device == "cuda":
            torch.cuda.empty_cache()
        results.append(rec)
        print(("PASS " if rec["ok"] else "FAIL ") + json_line(rec), flush=True)
    return results


def json_line(d: Dict) -> str:
    import json

    return json.dumps(d, default=lambda v: round(v, 6) if isinstance(v, float) else str(v))
