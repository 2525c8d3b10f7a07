"""The production kernel configurations (dtype × feature flags × block sizes) and how to compile them.

Every entry is one specialisation the launchers in ce.py / pair.py can emit on a GPU, with the block
sizes of ``_common.gpu_config`` for that arch. ``tests/test_triton_compile.py`` compiles each for sm_80 and sm_90
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` — no GPU needed — and checks
shared memory, register spills (ptxas -v) and 64-bit offset arithmetic. The list is not the full cross
product of flags (that is thousands of kernels): it covers every kernel, every divergence, both dot
precisions (bf16 tensor cores, fp32 via tf32x3) and the heaviest flag combination of each kernel.

Run ``python -m lsa_kernels.kernels.configs NAME ARCH [ARCH ...]`` (with TRITON_INTERPRET unset) to
compile one config and print one JSON report line per arch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List

from ._common import LaunchConfig, gpu_config

_FLOAT_SCALARS = {"cap", "inv_cap", "inv_temp", "one_minus_eps", "eps_over_v", "two_zloss"}
_INPUT_PTRS = {"x_ptr", "w_ptr", "b_ptr", "xp_ptr", "xq_ptr"}
_TARGET_PTRS = {"y_ptr", "yp_ptr", "yq_ptr"}
_DIVISIBLE_INTS = {"H", "stride_x", "stride_w", "stride_xp", "stride_xq", "stride_dx", "stride_dxp",
                   "stride_dxq", "stride_dw"}
_TORCH_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class KernelConfig:
    name: str
    kernel: str  # key of GPU_CONFIGS and of kernel_fn()
    dtype: str  # bf16 | fp16 | fp32
    flags: Dict[str, Any] = field(default_factory=dict)

    def launch(self, arch: int) -> LaunchConfig:
        return gpu_config(self.kernel, arch, self.dtype == "fp32")


def kernel_fn(kind: str):
    from . import ce, pair

    return {
        "ce_fwd": ce._ce_fwd_kernel,
        "ce_bwd": ce._ce_bwd_kernel,
        "ce_bwd_dx": ce._ce_bwd_dx_kernel,
        "ce_bwd_dw": ce._ce_bwd_dw_kernel,
        "pair_fwd": pair._pair_fwd_kernel,
        "pair_js": pair._pair_fwd_kernel,  # phase 2 alone (pair_js_partial): its own block sizes
        "pair_bwd": pair._pair_bwd_kernel,
        "pair_bwd_dx": pair._pair_bwd_dx_kernel,
        "pair_bwd_dw": pair._pair_bwd_dw_kernel,
    }[kind]


def _dot_constexprs(dtype: str) -> Dict[str, Any]:
    # production (GPU) values of upcast_and_prec()
    return {"UPCAST": dtype == "fp32", "DOT_PREC": "tf32x3" if dtype == "fp32" else "tf32"}


_CE_ALL = dict(HAS_BIAS=True, HAS_SOFTCAP=True, HAS_SMOOTHING=True)
_CE_NONE = dict(HAS_BIAS=False, HAS_SOFTCAP=False, HAS_SMOOTHING=False)


def _ce_bwd_flags(all_on: bool, **need) -> Dict[str, Any]:
    base = dict(_CE_ALL if all_on else _CE_NONE)
    base["HAS_ZLOSS"] = all_on
    base.update(need)
    return base


def _pair_flags(div: int, *, temp_one=True, with_ce=True, extras=False, **more) -> Dict[str, Any]:
    f = dict(DIV=div, TEMP_ONE=temp_one, WITH_CE=with_ce, HAS_BIAS=extras, HAS_SOFTCAP=extras, HAS_SMOOTHING=extras)
    f.update(more)
    return f


def _pair_bwd_flags(div: int, *, grad_p=True, grad_q=True, with_ce=True, temp_one=True, extras=False,
                    **need) -> Dict[str, Any]:
    f = dict(DIV=div, TEMP_ONE=temp_one, GRAD_P=grad_p, GRAD_Q=grad_q, WITH_CE=with_ce, HAS_BIAS=extras,
             HAS_SOFTCAP=extras, HAS_SMOOTHING=extras, HAS_ZLOSS=extras)
    f.update(need)
    return f


def production_configs() -> List[KernelConfig]:
    out: List[KernelConfig] = []
    atomic_need = dict(NEED_DX=True, NEED_DW=True, NEED_DB=False)
    for dt in ("bf16", "fp32"):
        out.append(KernelConfig(f"ce_fwd_{dt}_plain", "ce_fwd", dt, dict(_CE_NONE)))
        out.append(KernelConfig(f"ce_bwd_{dt}_plain", "ce_bwd", dt, _ce_bwd_flags(False, **atomic_need)))
    out.append(KernelConfig("ce_fwd_bf16_all", "ce_fwd", "bf16", dict(_CE_ALL)))
    out.append(KernelConfig("ce_fwd_fp16_plain", "ce_fwd", "fp16", dict(_CE_NONE)))
    out.append(KernelConfig("ce_bwd_bf16_all", "ce_bwd", "bf16",
                            _ce_bwd_flags(True, NEED_DX=True, NEED_DW=True, NEED_DB=True)))
    out.append(KernelConfig("ce_bwd_dx_bf16_all", "ce_bwd_dx", "bf16", _ce_bwd_flags(True)))
    out.append(KernelConfig("ce_bwd_dw_bf16_all", "ce_bwd_dw", "bf16",
                            _ce_bwd_flags(True, NEED_DW=True, NEED_DB=True)))

    names = ["sce", "kl", "kl_reverse", "sym_kl", "js"]
    pair_need = dict(USE_GP=True, USE_GQ=True, NEED_DXP=True, NEED_DXQ=True, NEED_DW=True, NEED_DB=False)
    for div, nm in enumerate(names):
        out.append(KernelConfig(f"pair_fwd_bf16_{nm}", "pair_fwd", "bf16", _pair_flags(div, PHASE=1)))
        out.append(KernelConfig(f"pair_bwd_bf16_{nm}", "pair_bwd", "bf16", _pair_bwd_flags(div, **pair_need)))
    for dt in ("bf16", "fp32"):  # as pair_js_partial launches it, heaviest flags
        out.append(KernelConfig(f"pair_js_{dt}_phase2", "pair_js", dt,
                                _pair_flags(4, with_ce=False, temp_one=False, extras=True, PHASE=2)))
    out.append(KernelConfig("pair_fwd_bf16_kl_temp_all", "pair_fwd", "bf16",
                            _pair_flags(1, temp_one=False, extras=True, PHASE=1)))
    out.append(KernelConfig("pair_fwd_fp32_sce", "pair_fwd", "fp32", _pair_flags(0, PHASE=1)))
    out.append(KernelConfig("pair_bwd_bf16_sce_temp_all", "pair_bwd", "bf16",
                            _pair_bwd_flags(0, temp_one=False, extras=True,
                                            **{**pair_need, "NEED_DB": True})))
    out.append(KernelConfig("pair_bwd_bf16_kl_detach_nocE", "pair_bwd", "bf16",
                            _pair_bwd_flags(1, grad_p=False, with_ce=False,
                                            **{**pair_need, "USE_GP": False, "NEED_DXP": False})))
    out.append(KernelConfig("pair_bwd_fp32_sce", "pair_bwd", "fp32", _pair_bwd_flags(0, **pair_need)))
    out.append(KernelConfig("pair_bwd_dx_bf16_js_all", "pair_bwd_dx", "bf16",
                            _pair_bwd_flags(4, temp_one=False, extras=True, NEED_DXP=True, NEED_DXQ=True)))
    out.append(KernelConfig("pair_bwd_dw_bf16_js_all", "pair_bwd_dw", "bf16",
                            _pair_bwd_flags(4, temp_one=False, extras=True, USE_GP=True, USE_GQ=True,
                                            NEED_DW=True, NEED_DB=True)))
    return out


# One config per kernel × dtype class, heaviest flags: what the default compile test runs (the full list
# runs with LSA_SLOW=1; it takes ~10 minutes on 2 cores).
SMOKE = (
    "ce_fwd_bf16_all", "ce_fwd_fp32_plain", "ce_bwd_bf16_all", "ce_bwd_fp32_plain", "ce_bwd_dx_bf16_all",
    "ce_bwd_dw_bf16_all", "pair_fwd_bf16_kl_temp_all", "pair_js_bf16_phase2", "pair_fwd_fp32_sce",
    "pair_bwd_bf16_sce_temp_all", "pair_bwd_bf16_js", "pair_bwd_fp32_sce", "pair_bwd_dx_bf16_js_all",
    "pair_bwd_dw_bf16_js_all",
)


def by_name(name: str) -> KernelConfig:
    for c in production_configs():
        if c.name == name:
            return c
    raise KeyError(name)


def ast_source_args(cfg: KernelConfig, arch: int):
    """(fn, signature, constexprs, attrs) for triton.compiler.ASTSource."""
    fn = kernel_fn(cfg.kernel)
    L = cfg.launch(arch)
    constexprs: Dict[str, Any] = dict(cfg.flags)
    constexprs.update(_dot_constexprs(cfg.dtype))
    constexprs.update(BLOCK_N=L.BLOCK_N, BLOCK_V=L.BLOCK_V, BLOCK_H=L.BLOCK_H)
    if "GROUP" in fn.arg_names:
        constexprs["GROUP"] = L.GROUP
    signature: Dict[str, str] = {}
    attrs = {}
    for i, a in enumerate(fn.arg_names):
        if a in constexprs:
            signature[a] = "constexpr"
        elif a.endswith("_ptr"):
            if a in _INPUT_PTRS:
                signature[a] = "*" + cfg.dtype
            elif a in _TARGET_PTRS:
                signature[a] = "*i64"
            else:
                signature[a] = "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif a in _FLOAT_SCALARS:
            signature[a] = "fp32"
        else:
            signature[a] = "i32"
            if a in _DIVISIBLE_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    missing = set(constexprs) - set(fn.arg_names)
    if missing:
        raise ValueError(f"{cfg.name}: unknown constexprs {sorted(missing)}")
    return fn, signature, constexprs, attrs


def ptxas_path() -> str | None:
    for p in ("/usr/local/bin/ptxas", shutil.which("ptxas")):
        if p and os.path.exists(p):
            return p
    return None


def compile_report(cfg: KernelConfig, arch: int) -> Dict[str, Any]:
    """Compile one config for sm_<arch> and return shared memory, ptxas registers / spills, offsets check."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile with TRITON_INTERPRET unset")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, signature, constexprs, attrs = ast_source_args(cfg, arch)
    src = ASTSource(fn, signature, constexprs, attrs)
    L = cfg.launch(arch)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": L.num_warps, "num_stages": L.num_stages})
    ptx = k.asm["ptx"]
    rep: Dict[str, Any] = {
        "name": cfg.name, "arch": arch, "shared": int(k.metadata.shared),
        "num_warps": L.num_warps, "num_stages": L.num_stages,
        "blocks": [L.BLOCK_N, L.BLOCK_V, L.BLOCK_H],
        # 64-bit offsets: i64 multiplies in the Triton IR (row/col index × stride) and 64-bit
        # multiplies in the PTX (mul.wide.s32 = i32 × i32 → i64, or s64 multiplies)
        "ttir_i64_mul": bool(re.search(r"arith\.muli [^\n]*: tensor<[\dx]+xi64>", k.asm["ttir"])),
        "wide_mul": bool(re.search(r"mul\.wide\.[su]32|mad\.wide\.[su]32|mul\.lo\.s64|mad\.lo\.s64", ptx)),
    }
    ptxas = ptxas_path()
    if ptxas is not None:
        m = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.M)
        gpu = m.group(1) if m else f"sm_{arch}"
        with tempfile.TemporaryDirectory() as d:
            pf = os.path.join(d, "k.ptx")
            with open(pf, "w") as f:
                f.write(ptx)
            r = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", pf, "-o", os.path.join(d, "k.cubin")],
                               capture_output=True, text=True, timeout=300)
        info = r.stdout + r.stderr
        rep["ptxas_rc"] = r.returncode
        rep["ptxas_gpu"] = gpu
        mr = re.search(r"Used (\d+) registers", info)
        rep["registers"] = int(mr.group(1)) if mr else None
        spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", info)]
        rep["spill_bytes"] = sum(spills) if spills else None
        ms = re.search(r"(\d+) bytes smem", info)
        rep["ptxas_smem"] = int(ms.group(1)) if ms else None
        rep["ptxas_log"] = info[-2000:]
    return rep


def main(argv: List[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cfg = by_name(argv[0])
    for arch in argv[1:]:
        print("REPORT " + json.dumps(compile_report(cfg, int(arch))), flush=True)


if __name__ == "__main__":
    main()
