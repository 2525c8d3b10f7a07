"""Shared pieces of the Triton kernels: jit maths helpers, the logits tile, launch configuration.

Maths helpers (all fp32, no libdevice so they run under the interpreter and compile everywhere):

    tanh(x)   = 2·sigmoid(2x) − 1                  (softcap: z = c·tanh(z_raw/c), z' = 1 − tanh²)
    expm1(x)  = degree-9 Taylor series for |x| < ½, else exp(x) − 1   (relative error ≲ 3e-7)
    log1p(x)  = x                     if fl(1 + x) == 1
              = log(u)·x / (u − 1)    u = fl(1 + x)     (Goldberg's trick: cancels the rounding of 1 + x)
    log(p/m)  for m = (p + q)/2, d = log q − log p:
              = −log1p(expm1(d)/2)              d ≤ 1  (relative precision as p → q)
              = −d + log 2 − log1p(e^{−d})      d > 1  (no overflow for d ≫ 1)

The logits tile of a row block × V tile is ``Σ_h x[rows, h]·W[cols, h]`` with fp32 accumulation; every
row / column index is cast to int64 before it multiplies a stride, so N·H and V·H may pass 2^31.
``UPCAST`` casts bf16/fp16 operands to fp32 right after the load (required by the interpreter, which
stores bf16 as uint16); on a GPU bf16 operands go to the tensor cores as they are (bf16·bf16 products are
exact in fp32, the accumulation is fp32 either way). fp32 inputs use ``tf32x3`` on a GPU (≈ fp32 accuracy
on tensor cores).

The gradient GEMMs of the backward take dz rounded to the input dtype (:func:`dot_operand_`), as a
GPU's bf16/fp16 tensor cores need; under the interpreter the same rounding is done explicitly (round to
nearest even, the interpreter's own bf16 cast truncates) so that interpreter tests check the numbers a
GPU computes.

Launches: every launcher runs inside :func:`device_guard` of its tensors' device (Triton launches on
the *current* CUDA device and stream; a head on ``cuda:1`` while ``cuda:0`` is current would fail or use
the wrong stream). Block sizes come from one table per GPU family (:data:`GPU_TABLE`, chosen by
:func:`arch_class`); compute capabilities below 8.0 are refused (:class:`UnsupportedDevice`).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, replace
from typing import Iterator, Optional

import torch
import triton
import triton.language as tl

from .._env import interpreting

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------- jit helpers


@triton.jit
def tanh_(x):
    """tanh via the sigmoid: saturates cleanly to ±1 (exp overflow gives 1/(1+inf) = 0)."""
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def expm1_(x):
    """exp(x) − 1 with relative precision for small |x|."""
    small = tl.abs(x) < 0.5
    s = tl.where(small, x, 0.0)
    poly = 1.0 / 362880.0
    poly = poly * s + 1.0 / 40320.0
    poly = poly * s + 1.0 / 5040.0
    poly = poly * s + 1.0 / 720.0
    poly = poly * s + 1.0 / 120.0
    poly = poly * s + 1.0 / 24.0
    poly = poly * s + 1.0 / 6.0
    poly = poly * s + 0.5
    poly = poly * s + 1.0
    return tl.where(small, poly * s, tl.exp(x) - 1.0)


@triton.jit
def log1p_(x):
    """log(1 + x) for x ≥ −1 with relative precision for small |x| (Goldberg)."""
    u = 1.0 + x
    d = u - 1.0
    safe_d = tl.where(d == 0.0, 1.0, d)
    big = u > 1.0e30
    r = tl.where(big, tl.log(u), tl.log(u) * (x / safe_d))
    return tl.where(d == 0.0, x, r)


@triton.jit
def log_ratio_to_mid_(d):
    """log(p / m) with m = (p + q)/2 and d = log q − log p (finite)."""
    dc = tl.minimum(d, 1.0)
    r_small = -log1p_(0.5 * expm1_(dc))
    dl = tl.maximum(d, 1.0)
    r_large = -dl + 0.6931471805599453 - log1p_(tl.exp(-dl))
    return tl.where(d > 1.0, r_large, r_small)


@triton.jit
def round_bf16_(x):
    """fp32 → the nearest bf16 (ties to even), returned as fp32 (finite x). Bit arithmetic, because the
    interpreter's own fp32 → bf16 cast truncates instead of rounding."""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def dot_operand_(t, like_ptr, UPCAST: tl.constexpr):
    """fp32 ``t`` (dz) as an operand of the gradient GEMMs: rounded to the input dtype (``like_ptr``'s
    element type) as the tensor cores take it on a GPU; under the interpreter (UPCAST) the same rounding,
    kept in fp32. fp32 inputs: unchanged."""
    if UPCAST:
        if like_ptr.dtype.element_ty == tl.bfloat16:
            r = round_bf16_(t)
        else:
            r = t.to(like_ptr.dtype.element_ty).to(tl.float32)
    else:
        r = t.to(like_ptr.dtype.element_ty)
    return r


@triton.jit
def grouped_pid_(pid, N, V, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, GROUP: tl.constexpr):
    """(row block, V tile) of program ``pid`` in a grid of row blocks × V tiles, GROUP row blocks at a time
    so that consecutive programs reuse the same W tiles from L2."""
    n_pid_n = tl.cdiv(N, BLOCK_N)
    n_pid_v = tl.cdiv(V, BLOCK_V)
    in_group = GROUP * n_pid_v
    first_n = (pid // in_group) * GROUP
    group_size = tl.minimum(n_pid_n - first_n, GROUP)
    return first_n + (pid % in_group) % group_size, (pid % in_group) // group_size


@triton.jit
def online_update_(m, s, z_masked):
    """One online-softmax step. z_masked has −inf on invalid columns.

    Returns (m_new, alpha = exp(m − m_new), e = exp(z − m_new), s_new = s·alpha + Σ e)."""
    m_new = tl.maximum(m, tl.max(z_masked, 1))
    alpha = tl.exp(m - m_new)
    e = tl.exp(z_masked - m_new[:, None])
    s_new = s * alpha + tl.sum(e, 1)
    return m_new, alpha, e, s_new


@triton.jit
def logits_tile_(
    x_ptr, w_ptr, rows64, row_mask, cols64, col_mask, H, stride_x, stride_w,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """fp32 ``x[rows] @ W[cols]ᵀ`` over H chunks (raw logits, no bias / softcap)."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        xt = tl.load(x_ptr + rows64[:, None] * stride_x + offs_h[None, :],
                     mask=row_mask[:, None] & h_mask[None, :], other=0.0)
        wt = tl.load(w_ptr + cols64[:, None] * stride_w + offs_h[None, :],
                     mask=col_mask[:, None] & h_mask[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def logits_tile2_(
    xp_ptr, xq_ptr, w_ptr, rows64, row_mask, cols64, col_mask, H, stride_xp, stride_xq, stride_w,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Both views' raw logits tiles; each W chunk is loaded once and used by both dots."""
    acc_p = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    acc_q = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        m2 = row_mask[:, None] & h_mask[None, :]
        wt = tl.load(w_ptr + cols64[:, None] * stride_w + offs_h[None, :],
                     mask=col_mask[:, None] & h_mask[None, :], other=0.0)
        xpt = tl.load(xp_ptr + rows64[:, None] * stride_xp + offs_h[None, :], mask=m2, other=0.0)
        xqt = tl.load(xq_ptr + rows64[:, None] * stride_xq + offs_h[None, :], mask=m2, other=0.0)
        if UPCAST:
            wt = wt.to(tl.float32)
            xpt = xpt.to(tl.float32)
            xqt = xqt.to(tl.float32)
        wtt = tl.trans(wt)
        acc_p = tl.dot(xpt, wtt, acc_p, input_precision=DOT_PREC)
        acc_q = tl.dot(xqt, wtt, acc_q, input_precision=DOT_PREC)
    return acc_p, acc_q


@triton.jit
def finish_logits_(acc, b_ptr, cols64, col_mask, cap, inv_cap,
                   HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """bias + softcap. Returns (z, t) with t = tanh(z_raw/c) (t = 0 without softcap)."""
    z = acc
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols64, mask=col_mask, other=0.0).to(tl.float32)
        z = z + bias[None, :]
    if HAS_SOFTCAP:
        t = tanh_(z * inv_cap)
        z = cap * t
    else:
        t = tl.zeros_like(z)
    return z, t


@triton.jit
def ce_grad_(p, z_is_target, col_mask, lse, one_minus_eps, eps_over_v, two_zloss,
             HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr):
    """∂ℓ/∂z of the CE row loss (per unit coefficient): softmax(1 + 2λ·lse) − (1−ε)·onehot − ε/V."""
    g = p
    if HAS_ZLOSS:
        g = g * (1.0 + two_zloss * lse)[:, None]
    g = g - tl.where(z_is_target, one_minus_eps, 0.0)
    if HAS_SMOOTHING:
        g = g - tl.where(col_mask[None, :], eps_over_v, 0.0)
    return g


# ----------------------------------------------------------------------------------------- launch config


@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes and launch parameters of one kernel launch.

    ``SPLIT_V`` (forward only): number of programs sharing the V range of one row block; each writes
    partial per-row statistics to an ``[SPLIT_V, N, k]`` fp32 scratch that a tiny torch step merges.
    0 = choose from the shapes (fill the GPU when N is small). ``GROUP``: row-block grouping of the
    (row block × V tile) grid of the atomic backward, for L2 reuse of W tiles."""

    BLOCK_N: int
    BLOCK_V: int
    BLOCK_H: int
    num_warps: int = 4
    num_stages: int = 1
    SPLIT_V: int = 0
    GROUP: int = 8


_OVERRIDE: Optional[LaunchConfig] = None


@contextlib.contextmanager
def override_config(cfg: LaunchConfig) -> Iterator[None]:
    """Force one LaunchConfig for every launch inside the block (tests: several tiles / splits)."""
    global _OVERRIDE
    old, _OVERRIDE = _OVERRIDE, cfg
    try:
        yield
    finally:
        _OVERRIDE = old


# GPU configs, checked by tests/test_triton_compile.py (shared memory ≤ the arch's limit, 0 spill bytes).
# sm_90 (wgmma, 64K regs, 227 KB smem) takes bigger tiles than sm_80 (mma.sync keeps operands in
# registers); fp32 inputs (tf32x3: three MMAs and 2× the operand bytes) take smaller ones.
def _lc(bn, bv, bh, warps, stages):
    return LaunchConfig(bn, bv, bh, num_warps=warps, num_stages=stages)


_SM80 = {
    "ce_fwd": _lc(64, 128, 64, 8, 3),
    "ce_bwd": _lc(64, 64, 64, 8, 2),
    "ce_bwd_dx": _lc(64, 128, 64, 8, 2),
    "ce_bwd_dw": _lc(32, 64, 64, 8, 2),  # 64×64 spilled 16-32 B with softcap (dispatch sweep)
    "pair_fwd": _lc(64, 64, 64, 8, 3),
    "pair_js": _lc(64, 16, 64, 8, 3),  # 64×32 spilled 16-88 B in 3 of 4 plain flag sets (sweep); 64×16: 0 of 16
    "pair_bwd": _lc(32, 64, 64, 8, 2),
    "pair_bwd_dx": _lc(32, 64, 64, 8, 2),
    "pair_bwd_dw": _lc(32, 64, 64, 8, 2),
}
_SM90 = {
    "ce_fwd": _lc(128, 128, 64, 8, 3),
    "ce_bwd": _lc(64, 128, 64, 8, 2),
    "ce_bwd_dx": _lc(64, 128, 64, 8, 2),
    "ce_bwd_dw": _lc(64, 128, 64, 8, 2),
    "pair_fwd": _lc(64, 64, 64, 8, 3),  # 64×128 tiles spilled 16 B for sym_kl (4 accumulators, 2 expm1)
    "pair_js": _lc(64, 64, 64, 8, 3),
    "pair_bwd": _lc(64, 64, 64, 8, 2),
    "pair_bwd_dx": _lc(64, 64, 64, 8, 2),
    "pair_bwd_dw": _lc(64, 64, 32, 8, 2),
}
_FP32 = {
    "ce_fwd": _lc(64, 64, 32, 8, 3),
    "ce_bwd": _lc(32, 64, 32, 4, 2),
    "ce_bwd_dx": _lc(32, 64, 32, 4, 2),
    "ce_bwd_dw": _lc(16, 64, 32, 4, 2),  # 32×64 spilled 8-32 B with bias / softcap / smoothing (sweep)
    "pair_fwd": _lc(32, 64, 32, 8, 3),
    "pair_js": _lc(32, 32, 32, 8, 3),
    "pair_bwd": _lc(16, 32, 32, 4, 2),
    "pair_bwd_dx": _lc(16, 32, 32, 4, 2),
    "pair_bwd_dw": _lc(16, 32, 32, 4, 2),
}

# One table per GPU family (key: arch_class(cc)) for bf16/fp16 inputs, plus ("any", True) for fp32 inputs
# (with per-family fp32 overrides where the shared one spilled).
#   sm80   A100 / A30 / Orin (sm_80, sm_87): mma.sync, 163 KB shared memory per block
#   sm86   consumer / workstation Ampere and Ada (sm_86, sm_89): mma.sync, 99 KB per block
#   sm90   H100 / H200: wgmma, 227 KB
#   sm100  B200 / GB200 / B300 (sm_100, sm_103): tcgen05, 227 KB
#   sm120  consumer Blackwell (sm_120, sm_121): mma.sync, 99 KB
GPU_TABLE = {
    ("sm80", False): _SM80,
    ("sm86", False): dict(_SM80),
    ("sm90", False): _SM90,
    # sm_100 (ptxas-blackwell, tcgen05): the sm_90 tiles spilled in five kernels (ce_fwd 136 B, ce_bwd_dw
    # 464 B, pair_fwd 64 B, pair_bwd_dx / pair_bwd_dw 944 B); these are the first spill-free candidates
    ("sm100", False): {**_SM90, "ce_fwd": _lc(128, 64, 64, 8, 3), "ce_bwd_dw": _lc(64, 64, 64, 8, 2),
                       "pair_fwd": _lc(64, 64, 32, 8, 3), "pair_bwd_dx": _lc(32, 64, 32, 8, 2),
                       "pair_bwd_dw": _lc(32, 64, 64, 8, 2)},
    # sm_120: the sm_80 tiles, except the pair forward (kl / sym_kl spilled 24 / 32 B at 64×64×64)
    ("sm120", False): {**_SM80, "pair_fwd": _lc(64, 64, 32, 8, 3)},
    ("any", True): _FP32,
    # fp32 atomic CE backward on sm_80: 4 warps spilled 16-32 B in 36 of 80 dispatchable flag sets (dW- or
    # db-only); 8 warps: 0 of 80 (dispatch sweep)
    ("sm80", True): {**_FP32, "ce_bwd": _lc(32, 64, 32, 8, 2)},
    # fp32 inputs on Blackwell: js phase 2 spilled 16 B at 32×32×32 / 8 warps / 3 stages
    ("sm100", True): {**_FP32, "pair_js": _lc(32, 32, 32, 8, 2)},
    ("sm120", True): {**_FP32, "pair_js": _lc(16, 32, 32, 4, 2)},
}
KERNEL_KINDS = tuple(_SM90)

# Shared memory per block (opt-in maximum) of each compute capability, and the archs whose tables the
# compile test checks (one representative per family, the smallest shared memory of the family).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024,
                100: 227 * 1024, 103: 227 * 1024, 120: 99 * 1024, 121: 99 * 1024}
CLASS_ARCH = {"sm80": 80, "sm86": 86, "sm90": 90, "sm100": 100, "sm120": 120}
MIN_ARCH = 80


class UnsupportedDevice(ValueError):
    """The Triton kernels cannot run on this GPU (compute capability < 8.0)."""


def arch_class(arch: int) -> str:
    """The table family of compute capability ``arch`` (e.g. 86 for sm_86); raises below sm_80.

    Unknown future capabilities take the nearest lower family (Triton compiles them the same way)."""
    if arch < MIN_ARCH:
        raise UnsupportedDevice(
            f"the Triton kernels need an NVIDIA GPU of compute capability >= 8.0 (bf16 and tf32 tensor "
            f"cores); this one is sm_{arch}. Use backend='reference' (materialises the N x V logits) or "
            "run the loss on CPU tensors (backend='cpu')"
        )
    if arch >= 120:
        return "sm120"
    if arch >= 100:
        return "sm100"
    if arch >= 90:
        return "sm90"
    if arch in (86, 88, 89):
        return "sm86"
    return "sm80"


def gpu_config(kind: str, arch: int, fp32: bool) -> LaunchConfig:
    """Production block sizes of kernel ``kind`` for compute capability ``arch`` (80, 86, 89, 90, ...)."""
    cls = arch_class(arch)
    if fp32:
        return GPU_TABLE.get((cls, True), GPU_TABLE[("any", True)])[kind]
    return GPU_TABLE[(cls, False)][kind]


def device_arch(device: torch.device) -> int:
    """Compute capability of a CUDA device as one int (sm_90 → 90)."""
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def check_device(device: torch.device) -> None:
    """Raise :class:`UnsupportedDevice` when the kernels cannot run on CUDA ``device`` (no-op elsewhere)."""
    if device.type == "cuda" and not interpreting():
        arch_class(device_arch(device))


def device_guard(device: torch.device):
    """``torch.cuda.device(device)`` for a CUDA device (Triton launches on the current device and its
    current stream), a no-op context otherwise."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def on_tensor_device(fn):
    """Run launcher ``fn`` with its first argument's device current (:func:`device_guard`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with device_guard(args[0].device):
            return fn(*args, **kwargs)

    return wrapper


def _interp_config(N: int, V: int, H: int) -> LaunchConfig:
    # The interpreter pays per tile step: big blocks, one config, no sweep.
    bn = min(64, max(16, triton.next_power_of_2(N)))
    bv = min(256, max(16, triton.next_power_of_2(V)))
    bh = min(128, max(16, triton.next_power_of_2(H)))
    return LaunchConfig(bn, bv, bh, num_warps=4, num_stages=1, SPLIT_V=1, GROUP=4)


def pick_config(kind: str, N: int, V: int, H: int, device: torch.device, dtype: torch.dtype) -> LaunchConfig:
    """Launch configuration of one kernel ``kind`` for the shapes (override > interpreter > GPU table)."""
    if _OVERRIDE is not None:
        cfg = _OVERRIDE
    elif interpreting() or device.type != "cuda":
        cfg = _interp_config(N, V, H)
    else:
        cfg = gpu_config(kind, device_arch(device), dtype == torch.float32)
    if cfg.SPLIT_V == 0:
        cfg = replace(cfg, SPLIT_V=_auto_split(N, V, cfg, device))
    return cfg


def _auto_split(N: int, V: int, cfg: LaunchConfig, device: torch.device) -> int:
    n_blocks = triton.cdiv(max(N, 1), cfg.BLOCK_N)
    n_tiles = triton.cdiv(V, cfg.BLOCK_V)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    want = triton.cdiv(2 * sms, n_blocks)  # about two waves of programs
    return max(1, min(n_tiles, want, 64))


def split_ranges(V: int, block_v: int, split: int) -> tuple[int, int]:
    """(tiles per split, number of non-empty splits)."""
    n_tiles = triton.cdiv(V, block_v)
    per = triton.cdiv(n_tiles, max(1, split))
    return per, triton.cdiv(n_tiles, per)


def upcast_and_prec(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, DOT_PREC) constexprs for an input dtype."""
    if dtype == torch.float32:
        return True, ("ieee" if interpreting() else "tf32x3")
    return interpreting(), "tf32"


def softcap_args(softcap: Optional[float]) -> tuple[bool, float, float]:
    if softcap is not None and softcap > 0:
        return True, float(softcap), 1.0 / float(softcap)
    return False, 1.0, 1.0
