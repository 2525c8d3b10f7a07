"""Launch configuration of the Triton kernels: block sizes per GPU family, the device guard, dot precisions.

No maths here (the kernels' maths: tiles.py and each kernel file's header; docs/maths.md §14).

Launches: every launcher runs inside :func:`device_guard` of its tensors' device (Triton launches on
the *current* CUDA device and stream; a head on ``cuda:1`` while ``cuda:0`` is current would fail or use
the wrong stream). Block sizes come from one table per GPU family (:data:`GPU_TABLE`, chosen by
:func:`arch_class`); compute capabilities below 8.0 are refused (:class:`UnsupportedDevice`). Kernel kinds
(the keys of a table):

    ce_fwd     kernels/ce.py            CE forward (online softmax over V tiles, V splits)
    ce_fwd_ext kernels/ce.py            the same kernel with the per-token entropy / argmax
    ce_bwd     kernels/ce.py            CE backward, atomic (default)
    ce_dz      kernels/ce.py            CE backward, deterministic: dz of a row chunk (GEMMs: deterministic.py)
    pair_fwd   kernels/pair_phase1.py   pair forward, phase 1 (CE of both views, lse, X/Y of sce/kl/...)
    pair_fwd_ext kernels/pair_phase1.py the same kernel with long-short's per-view entropy / argmax
    pair_js    kernels/pair_js.py       js's second pass (also pair_js_partial)
    pair_bwd   kernels/pair_bwd.py      pair backward, atomic (default)
    pair_dz    kernels/pair_bwd.py      pair backward, deterministic: dz of both views for a row chunk
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, replace
from typing import Iterator, Optional

import torch
import triton

from .._env import interpreting

# ----------------------------------------------------------------------------------------- launch config


@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes and launch parameters of one kernel launch.

    ``SPLIT_V`` (forward only): number of programs sharing the V range of one row block; each writes
    partial per-row statistics to an ``[SPLIT_V, N, k]`` fp32 scratch that a tiny torch step merges.
    0 = choose from the shapes (fill the GPU when N is small). ``GROUP``: row-block grouping of the
    (row block × V tile) grid of the atomic backward, for L2 reuse of W tiles. ``maxnreg``: the register cap
    per thread handed to ptxas (PTX ``.maxnreg``); None lets ptxas choose, and with 8 warps it may squeeze a
    kernel that wants 130-220 registers into 128 (two blocks per SM) at the price of a few bytes of spills."""

    BLOCK_N: int
    BLOCK_V: int
    BLOCK_H: int
    num_warps: int = 4
    num_stages: int = 1
    SPLIT_V: int = 0
    GROUP: int = 8
    maxnreg: Optional[int] = None


def launch_options(cfg: LaunchConfig) -> dict:
    """The Triton launch options of ``cfg`` (``maxnreg`` only when set: the interpreter takes none)."""
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if cfg.maxnreg is not None:
        opts["maxnreg"] = cfg.maxnreg
    return opts


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


# GPU configs, checked by tests/backends/test_triton_compile.py (shared memory ≤ the arch's limit, 0 spill bytes)
# under both ends of the supported Triton range (3.6 and 3.8: their ptxas allocate registers differently, so a
# tile is kept only when it is spill-free under both).
# sm_90 (wgmma, 64K regs, 227 KB smem) takes bigger tiles than sm_80 (mma.sync keeps operands in
# registers); fp32 inputs (tf32x3: three MMAs and 2× the operand bytes) take smaller ones.
def _lc(bn, bv, bh, warps, stages):
    return LaunchConfig(bn, bv, bh, num_warps=warps, num_stages=stages)


_SM80 = {
    "ce_fwd": _lc(64, 128, 64, 8, 3),
    "ce_fwd_ext": _lc(64, 128, 64, 8, 3),
    "ce_bwd": _lc(64, 64, 64, 8, 2),
    "ce_dz": _lc(64, 128, 64, 8, 3),
    "pair_fwd": _lc(64, 64, 64, 8, 3),
    "pair_fwd_ext": _lc(32, 64, 64, 8, 3),  # 64×64×64 spilled 88 B (sym_kl, all flags, entropy + argmax)
    "pair_js": _lc(64, 16, 64, 8, 3),  # 64×32 spilled 16-88 B in 3 of 4 plain flag sets (sweep); 64×16: 0 of 16
    "pair_bwd": _lc(32, 64, 64, 8, 2),
    "pair_dz": _lc(32, 64, 64, 8, 2),  # 64×64×64 / 3 stages spilled 824 B (js, all flags)
}
_SM90 = {
    "ce_fwd": _lc(128, 128, 64, 8, 3),
    "ce_fwd_ext": _lc(64, 128, 64, 8, 3),  # 128×128×64 spilled 412 B (entropy + argmax, all flags)
    "ce_bwd": _lc(64, 128, 64, 8, 2),
    "ce_dz": _lc(64, 128, 64, 8, 3),
    "pair_fwd": _lc(64, 64, 64, 8, 3),  # 64×128 tiles spilled 16 B for sym_kl (4 accumulators, 2 expm1)
    # sym_kl, all flags, entropy + argmax: 64×64×64 spilled 16 B under Triton 3.6 (0 B under 3.8), 64×64×32
    # 116 B; 32×64×64: 0 B under both
    "pair_fwd_ext": _lc(32, 64, 64, 8, 3),
    "pair_js": _lc(64, 64, 64, 8, 3),
    "pair_bwd": _lc(64, 64, 64, 8, 2),
    # js, all flags (one or two heads): 64×64×64 spilled 24 B under Triton 3.6 (3 or 2 stages; 0 B under 3.8),
    # 64×64×32 104 B with two heads; 64×32×64: 0 B under both for every production pair_dz config
    "pair_dz": _lc(64, 32, 64, 8, 3),
}
_FP32 = {
    "ce_fwd": _lc(64, 64, 32, 8, 3),
    "ce_fwd_ext": _lc(64, 64, 32, 8, 3),
    "ce_bwd": _lc(32, 64, 32, 4, 2),
    "ce_dz": _lc(64, 64, 32, 8, 3),
    "pair_fwd": _lc(32, 64, 32, 8, 3),
    "pair_fwd_ext": _lc(32, 64, 32, 8, 3),
    "pair_js": _lc(32, 32, 32, 8, 3),
    "pair_bwd": _lc(16, 32, 32, 4, 2),
    # deterministic pair dz: at 32×64×32 / 8 warps ptxas squeezed 18 % (Triton 3.8) to 29 % (3.6) of the sampled
    # (flag set, arch) pairs into 128 registers, two blocks per SM, and some of those spilled 8-16 B (1 of 85
    # sampled flag sets under 3.8, 4 under 3.6; 2 stages still squeezed flag sets into 128 under 3.6). A cap of
    # 255 registers (ptxas .maxnreg) stops the squeeze: 334 flag sets (those 85 and 245 more of the 4220, and the
    # production ones) compile with 0 B and 132-255 registers on sm_80 and sm_90 under both versions
    # (benchmarks/results/compile_sweep/DETERMINISTIC_FP32.md). Over 128 registers a block of 8 warps is alone on
    # its SM anyway, so only the flag sets ptxas squeezed lose their second block.
    "pair_dz": LaunchConfig(32, 64, 32, num_warps=8, num_stages=3, maxnreg=255),
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
    # sm_86: pair_dz (js, all flags) spilled 8 B at the sm_80 tile (32×64×64, 8 warps), 32 B with 4 warps;
    # 32×32×64: 0 B
    ("sm86", False): {**_SM80, "pair_dz": _lc(32, 32, 64, 8, 2)},
    ("sm90", False): _SM90,
    # sm_100 (ptxas-blackwell, tcgen05): the sm_90 tiles spilled in ce_fwd (136 B) and pair_fwd (64 B);
    # these are the first spill-free candidates (ce_fwd, all flags: 128×64×64 spilled 32 B under Triton 3.6,
    # 128×64×32 0 B under both). ce_dz takes the forward's tile; pair_dz (js, all flags)
    # spilled 8 B at 64×64×32 / 3 stages and at 32×64×32, 112-128 B at 4 warps or 32×32×64; 64×32×32: 0 B.
    ("sm100", False): {**_SM90, "ce_fwd": _lc(128, 64, 32, 8, 3), "ce_fwd_ext": _lc(64, 64, 64, 8, 3),
                       "ce_dz": _lc(64, 64, 64, 8, 3),
                       "pair_fwd": _lc(64, 64, 32, 8, 3), "pair_fwd_ext": _lc(64, 64, 32, 8, 3),
                       "pair_dz": _lc(64, 32, 32, 8, 2)},
    # sm_120: the sm_80 tiles, except the pair forward (kl / sym_kl spilled 24 / 32 B at 64×64×64)
    ("sm120", False): {**_SM80, "pair_fwd": _lc(64, 64, 32, 8, 3), "pair_fwd_ext": _lc(32, 64, 32, 8, 3)},
    ("any", True): _FP32,
    # fp32 atomic CE backward on sm_80: 4 warps spilled 16-32 B in 36 of 80 dispatchable flag sets (dW- or
    # db-only); 8 warps: 0 of 80 (dispatch sweep)
    ("sm80", True): {**_FP32, "ce_bwd": _lc(32, 64, 32, 8, 2)},
    # fp32 inputs on Blackwell: js phase 2 spilled 16 B at 32×32×32 / 8 warps / 3 stages
    ("sm100", True): {**_FP32, "pair_js": _lc(32, 32, 32, 8, 2)},
    ("sm120", True): {**_FP32, "pair_js": _lc(16, 32, 32, 4, 2)},
}
# dense targets (kernels/dense.py, docs/maths.md §11): the t tile is one more [BLOCK_N, BLOCK_V] fp32 operand per
# logits tile. bf16/fp16: 64×64×64 on every family — the CE tiles spilled (all flags: sm_80 forward 312 B at
# 64×128×64, sm_90 forward 3644 B at 128×128×64, sm_90 atomic backward 296 B at 64×128×64, dz 52 / 128 B at
# 64×128×64); fp32: the CE tiles (0 B), except the forward: 32×32×32 (class-weighted smoothing of index targets
# spilled 32 B on sm_80 at the CE's 64×64×32; at 32×64×32, 12 B on sm_90 / 28 B on sm_80 under Triton 3.6).
_DENSE16 = {"dense_fwd": _lc(64, 64, 64, 8, 3), "dense_bwd": _lc(64, 64, 64, 8, 2), "dense_dz": _lc(64, 64, 64, 8, 3)}
# fp32 atomic dense backward on sm_90: 4 warps (the CE's) spilled 8-24 B in 21 of 196 dispatchable flag sets
# (all with dW, most with dt); 8 warps as on sm_80: 0 B in those 21
GPU_TABLE[("sm90", True)] = {**_FP32, "dense_bwd": _lc(32, 64, 32, 8, 2)}
for (_cls, _fp32), _t in GPU_TABLE.items():
    for _dense, _ce in (("dense_fwd", "ce_fwd"), ("dense_bwd", "ce_bwd"), ("dense_dz", "ce_dz")):
        _t.setdefault(_dense, (_lc(32, 32, 32, 8, 3) if _dense == "dense_fwd" else _t[_ce]) if _fp32
                      else _DENSE16[_dense])
# sm_120: the bf16 forward (probability target, class weights, smoothing, softcap) spilled 32 B at 64×64×64
GPU_TABLE[("sm120", False)]["dense_fwd"] = _lc(64, 64, 32, 8, 3)
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
