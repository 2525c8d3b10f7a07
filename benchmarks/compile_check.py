"""Compile the production Triton kernels for real GPU targets, no GPU needed: the compile check.

Each :class:`lsa_kernels.kernels.configs.KernelConfig` (one specialisation the launchers can emit, with the
block sizes of its arch's table) is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda",
cc, 32))`` and checked: shared memory against the arch's limit, register spills (``ptxas -v``, the ptxas
Triton bundles), 64-bit offset arithmetic and, for a kernel that accumulates with atomics, that every
atomic is a relaxed reduction with no fence (PTX, and SASS via nvdisasm). tests/backends/test_triton_compile.py
runs it on the production list; every dispatchable flag set (``dispatch_configs``, a few thousand per
dtype and arch) is the sweep (hours of CPU; shard it). Both need TRITON_INTERPRET unset:

    python -m benchmarks.compile_check NAME ARCH [ARCH ...] [--tile BN,BV,BH,WARPS,STAGES[,MAXNREG]]
    python -m benchmarks.compile_check sweep --arch 80 86 90 100 120 --jobs 16 --out sweep.jsonl \
        [--dtypes bf16,fp32] [--kinds ce_fwd,pair_bwd] [--shard K/N] [--limit M] [--from old_sweep.jsonl]

The first prints one ``REPORT {json}`` line per arch (``--tile``: other block sizes than the table's, to
try a tile); the sweep appends one JSON line per (config, arch) to ``--out``, skips those already there (a
stopped sweep resumes) and exits 1 if any has a problem; ``--from`` compiles the flag sets of an earlier
sweep's output (in its order) instead of enumerating them, to re-check them after a table change.
``python -m benchmarks.compile_check summary SWEEP.jsonl [...]`` prints a markdown table of sweep outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Dict, List

from lsa_kernels import _env
from lsa_kernels.kernels._common import MIN_ARCH, SHARED_LIMIT, LaunchConfig, launch_options
from lsa_kernels.kernels.configs import KernelConfig, by_name, dispatch_configs, kernel_fn, production_configs

_FLOAT_SCALARS = {"cap", "inv_cap", "inv_temp", "one_minus_eps", "eps_over_v", "two_zloss"}
_INPUT_PTRS = {"x_ptr", "w_ptr", "b_ptr", "xp_ptr", "xq_ptr", "wq_ptr", "bq_ptr", "dz_ptr", "dzp_ptr",
               "dzq_ptr"}  # the input dtype
_TARGET_PTRS = {"y_ptr", "yp_ptr", "yq_ptr"}
_INT32_PTRS = {"am_ptr"}  # the CE forward's argmax partials
_DIVISIBLE_INTS = {"H", "Hq", "stride_x", "stride_w", "stride_wq", "stride_xp", "stride_xq", "stride_dx",
                   "stride_dxp", "stride_dxq", "stride_dw", "stride_dwq", "stride_dz"}


def _dot_constexprs(dtype: str) -> Dict[str, Any]:
    # production (GPU) values of upcast_and_prec()
    return {"UPCAST": dtype == "fp32", "DOT_PREC": "tf32x3" if dtype == "fp32" else "tf32"}


def ast_source_args(cfg: KernelConfig, arch: int, launch: LaunchConfig | None = None):
    """(fn, signature, constexprs, attrs) for triton.compiler.ASTSource; ``launch``: other block sizes than
    the production table's."""
    fn = kernel_fn(cfg.kernel)
    L = launch or cfg.launch(arch)
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
            elif a in _INT32_PTRS:
                signature[a] = "*i32"
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


def nvdisasm_path() -> str | None:
    """nvdisasm shipped with Triton's NVIDIA backend (SASS of a cubin), else one on PATH."""
    try:
        import triton

        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
        if os.path.exists(p):
            return p
    except ImportError:
        pass
    return shutil.which("nvdisasm")


_PTX_SYNC = re.compile(r"^\s*(?:@!?%\w+\s+)?((?:atom|red|fence|membar)\b(?:\.[\w:]+)*)", re.M)
# (not the SYNCS.CCTL.* of the mbarrier unit that sm_100's tcgen05 pipelines use: hence the lookbehind)
_SASS_SYNC = re.compile(r"(?<![\w.])((?:MEMBAR|ERRBAR|CCTL|ATOMG?|REDG?|FENCE)(?:\.[\w]+)*)\b")


def memory_ops(ptx: str, cubin: bytes | None) -> Dict[str, Any]:
    """Atomics, fences and barriers of a compiled kernel: PTX instructions and (when nvdisasm is there)
    the SASS opcodes, each as a sorted list of distinct names."""
    found = sorted(set(_PTX_SYNC.findall(ptx)))
    rep: Dict[str, Any] = {
        "ptx_atomics": [i for i in found if i.startswith(("atom", "red"))],
        "ptx_fences": [i for i in found if i.startswith(("fence", "membar"))],
    }
    nvd = nvdisasm_path()
    if nvd is not None and cubin:
        with tempfile.TemporaryDirectory() as d:
            cf = os.path.join(d, "k.cubin")
            with open(cf, "wb") as f:
                f.write(cubin)
            r = subprocess.run([nvd, "-c", cf], capture_output=True, text=True, timeout=120)
        if r.returncode == 0:
            rep["sass_sync"] = sorted(set(_SASS_SYNC.findall(r.stdout)) - {"REDUX"})
    return rep


def atomic_problems(rep: Dict[str, Any], accumulates: bool = True) -> List[str]:
    """Why a report of an atomic kernel's flag set is wrong ([] when it is fine).

    ``accumulates`` (:attr:`KernelConfig.writes_atomically`): the flag set adds into an output (dx, dW,
    db), so its PTX must hold atomics; without one (the dense backward asked for dt only, stored
    plainly) it must hold none. PTX: every atom/red carries ``.relaxed`` (the default acq_rel makes ptxas
    put a GPU-wide MEMBAR before and an L1 invalidation after each one); no membar; the only fences are the
    async-proxy fences wgmma needs (``fence.proxy.async``). SASS: no GPU/system-scope MEMBAR, no ERRBAR,
    no CCTL."""
    out = []
    if accumulates and not rep["ptx_atomics"]:
        out.append("no atomics in the PTX of a flag set that accumulates with atomics")
    if not accumulates and rep["ptx_atomics"]:
        out.append(f"atomics in a flag set with no accumulated output: {rep['ptx_atomics']}")
    out += [f"PTX atomic without .relaxed: {a}" for a in rep["ptx_atomics"] if ".relaxed" not in a]
    out += [f"PTX fence/barrier: {f}" for f in rep["ptx_fences"] if not f.startswith("fence.proxy.async")]
    for op in rep.get("sass_sync", []):
        if op.startswith(("ERRBAR", "CCTL")) or (op.startswith("MEMBAR") and not op.endswith(".CTA")):
            out.append(f"SASS {op}")
    return out


def ptxas_path(arch: int = 90) -> str | None:
    """The ptxas Triton itself uses for ``arch`` (its bundled ptxas, ptxas-blackwell from sm_100: the
    PTX Triton emits for Blackwell has an ISA version older CUDA toolkits reject), else a system one."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        p = get_ptxas(arch).path
        if p and os.path.exists(p):
            return p
    except Exception:  # noqa: BLE001 - older / newer Triton layouts: fall back to the system's
        pass
    for p in ("/usr/local/bin/ptxas", shutil.which("ptxas")):
        if p and os.path.exists(p):
            return p
    return None


def compile_report(cfg: KernelConfig, arch: int, launch: LaunchConfig | None = None) -> Dict[str, Any]:
    """Compile one config for sm_<arch> (``launch``: block sizes other than the table's) and return shared
    memory, ptxas registers / spills, the offsets check and the atomics / fences found."""
    if _env.interpreting():
        raise RuntimeError("compile with TRITON_INTERPRET unset (the interpreter cannot compile for a GPU)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, signature, constexprs, attrs = ast_source_args(cfg, arch, launch)
    src = ASTSource(fn, signature, constexprs, attrs)
    L = launch or cfg.launch(arch)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=launch_options(L))
    ptx = k.asm["ptx"]
    rep: Dict[str, Any] = {
        "name": cfg.name, "arch": arch, "triton": triton.__version__, "shared": int(k.metadata.shared),
        "num_warps": L.num_warps, "num_stages": L.num_stages, "maxnreg": L.maxnreg,
        "blocks": [L.BLOCK_N, L.BLOCK_V, L.BLOCK_H],
        # 64-bit offsets: i64 multiplies in the Triton IR (row/col index × stride) and 64-bit
        # multiplies in the PTX (mul.wide.s32 = i32 × i32 → i64, or s64 multiplies)
        "ttir_i64_mul": bool(re.search(r"arith\.muli [^\n]*: tensor<[\dx]+xi64>", k.asm["ttir"])),
        "wide_mul": bool(re.search(r"mul\.wide\.[su]32|mad\.wide\.[su]32|mul\.lo\.s64|mad\.lo\.s64", ptx)),
        # the register cap as the PTX carries it (None: ptxas chooses)
        "ptx_maxnreg": int(m.group(1)) if (m := re.search(r"^\s*\.maxnreg\s+(\d+)", ptx, re.M)) else None,
        **memory_ops(ptx, k.asm.get("cubin")),
    }
    ptxas = ptxas_path(arch)
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


def _sweep_worker(args):
    cfg, arch, timeout = args
    import signal

    def _alarm(*_):
        raise TimeoutError(f"compile took more than {timeout} s")

    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        rep = compile_report(cfg, arch)
        rep.pop("ptxas_log", None)
    except Exception as e:  # noqa: BLE001 - reported, not raised: the sweep goes on
        rep = {"name": cfg.name, "arch": arch, "error": f"{type(e).__name__}: {str(e)[:500]}"}
    finally:
        signal.alarm(0)
    rep["kernel"], rep["dtype"], rep["flags"] = cfg.kernel, cfg.dtype, cfg.flags
    rep["problems"] = report_problems(rep, cfg)
    return rep


def report_problems(rep: Dict[str, Any], cfg: KernelConfig) -> List[str]:
    """Everything wrong with one compile report ([] = fine): errors, shared memory over the arch's limit,
    spills, failed ptxas, atomics that are not fence-free relaxed reductions."""
    if "error" in rep:
        return [rep["error"]]
    out = []
    limit = SHARED_LIMIT.get(rep["arch"])
    if limit is not None and rep["shared"] > limit:
        out.append(f"shared memory {rep['shared']} B > {limit} B")
    if rep.get("ptxas_rc") not in (None, 0):
        out.append(f"ptxas rc={rep['ptxas_rc']}")
    if rep.get("spill_bytes"):
        out.append(f"{rep['spill_bytes']} bytes spilled")
    if cfg.atomic:
        out += atomic_problems(rep, cfg.writes_atomically)
    return out


def configs_from(path: str) -> List[KernelConfig]:
    """The flag sets of an earlier sweep's JSON lines (name, kernel, dtype, flags), each once, in file order."""
    out: Dict[str, KernelConfig] = {}
    with open(path) as f:
        for i, line in enumerate(f, 1):
            try:
                r = json.loads(line)
                cfg = KernelConfig(r["name"], r["kernel"], r["dtype"], dict(r["flags"]))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{i}: not a sweep line with name, kernel, dtype and flags ({e})") from None
            out.setdefault(cfg.name, cfg)
    return list(out.values())


def sweep(archs: List[int], *, dtypes=("bf16", "fp16", "fp32"), shard=(0, 1), jobs: int = 2,
          out: str | None = None, timeout: int = 600, limit: int | None = None, kinds=None,
          source: str | None = None) -> int:
    """Compile every dispatchable flag set (:func:`dispatch_configs`; ``source``: instead, the flag sets of an
    earlier sweep's output, in its order) for each arch; one JSON line per (config, arch) to ``out`` (appended;
    already present lines are skipped, so a run can be resumed). Returns the number of (config, arch) pairs
    with problems."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    cfgs = configs_from(source) if source else dispatch_configs(tuple(dtypes))
    cfgs = [c for c in cfgs if c.dtype in dtypes]
    if kinds:
        cfgs = [c for c in cfgs if c.kernel in kinds]
    k, n = shard
    todo = [(c, a) for i, c in enumerate(cfgs) if i % n == k for a in archs]
    done = set()
    if out and os.path.exists(out):
        with open(out) as f:
            for line in f:
                try:
                    r = json.loads(line)
                    done.add((r["name"], r["arch"]))
                except (ValueError, KeyError):
                    pass
    todo = [(c, a) for c, a in todo if (c.name, a) not in done]
    if limit is not None:
        todo = todo[:limit]
    bad = 0
    fh = open(out, "a") if out else None
    try:
        with ProcessPoolExecutor(max_workers=jobs) as ex:
            it = ex.map(_sweep_worker, [(c, a, timeout) for c, a in todo], chunksize=1)
            for rep in tqdm(it, total=len(todo), desc=f"compile sweep (shard {k}/{n})", unit="kernel"):
                bad += bool(rep["problems"])
                if rep["problems"]:
                    print(f"PROBLEM {rep['name']} sm_{rep['arch']}: {rep['problems']}", file=sys.stderr, flush=True)
                if fh:
                    fh.write(json.dumps(rep) + "\n")
                    fh.flush()
    finally:
        if fh:
            fh.close()
    print(f"sweep: {len(todo)} compiled, {bad} with problems, {len(done)} already in {out}", flush=True)
    return bad


def summary(paths: List[str]) -> str:
    """A markdown table of sweep outputs: per kernel kind, dtype, arch, Triton version and tile, the number of
    flag sets compiled, those with a problem, the spill bytes and the registers (min-max)."""
    rows: Dict[tuple, Dict[str, Any]] = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                tile = "x".join(map(str, r.get("blocks", []))) + f" w{r.get('num_warps')} s{r.get('num_stages')}"
                if r.get("maxnreg"):
                    tile += f" maxnreg {r['maxnreg']}"
                key = (r.get("kernel"), r.get("dtype"), r["arch"], r.get("triton", "?"), tile)
                g = rows.setdefault(key, {"n": set(), "bad": set(), "spill": 0, "regs": []})
                g["n"].add(r["name"])
                if r.get("problems"):
                    g["bad"].add(r["name"])
                g["spill"] += r.get("spill_bytes") or 0
                if r.get("registers"):
                    g["regs"].append(r["registers"])
    out = ["| kernel | dtype | arch | triton | tile | flag sets | with a problem | spill bytes | registers |",
           "|---|---|---|---|---|---|---|---|---|"]
    for (kind, dt, arch, tv, tile), g in sorted(rows.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]), kv[0][2], *map(str, kv[0][3:]))):
        regs = f"{min(g['regs'])}-{max(g['regs'])}" if g["regs"] else "-"
        out.append(f"| {kind} | {dt} | sm_{arch} | {tv} | {tile} | {len(g['n'])} | {len(g['bad'])} | {g['spill']} "
                   f"| {regs} |")
    return "\n".join(out)


def _tile(text: str) -> LaunchConfig:
    try:
        vals = [int(v) for v in text.split(",")]
        if len(vals) not in (5, 6):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"five integers BN,BV,BH,WARPS,STAGES (and optionally MAXNREG) expected, "
                                         f"got {text!r}")
    bn, bv, bh, warps, stages = vals[:5]
    maxnreg = vals[5] if len(vals) == 6 else None
    if maxnreg is not None and not 24 <= maxnreg <= 255:
        raise argparse.ArgumentTypeError(f"MAXNREG (registers per thread) must be in 24..255, got {text!r}")
    for v in (bn, bv, bh):
        if v < 16 or v & (v - 1):
            raise argparse.ArgumentTypeError(f"block sizes must be powers of two >= 16, got {text!r}")
    if warps not in (1, 2, 4, 8, 16) or not 1 <= stages <= 8:
        raise argparse.ArgumentTypeError(f"WARPS in 1, 2, 4, 8, 16 and STAGES in 1..8 expected, got {text!r}")
    return LaunchConfig(bn, bv, bh, num_warps=warps, num_stages=stages, maxnreg=maxnreg)


def _arch(text: str) -> int:
    try:
        a = int(text)
    except ValueError:
        a = -1
    if a < MIN_ARCH:
        raise argparse.ArgumentTypeError(f"a compute capability >= {MIN_ARCH} as one integer (80, 86, 90, "
                                         f"100, 120), got {text!r}")
    return a


def main(argv: List[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = [c.name for c in production_configs()]
    if argv[:1] == ["summary"]:
        ap = argparse.ArgumentParser(prog="python -m benchmarks.compile_check summary",
                                     description="A markdown table of sweep outputs (JSON lines).")
        ap.add_argument("files", nargs="+", metavar="SWEEP.jsonl")
        a = ap.parse_args(argv[1:])
        missing = [p for p in a.files if not os.path.isfile(p)]
        if missing:
            ap.error(f"SWEEP.jsonl must be existing sweep outputs, not found: {missing}")
        print(summary(a.files))
        return 0
    if argv[:1] == ["sweep"]:
        ap = argparse.ArgumentParser(prog="python -m benchmarks.compile_check sweep",
                                     description="Compile every dispatchable flag set; exit 1 if any has a problem.")
        ap.add_argument("--arch", type=_arch, nargs="+", default=[80, 90])
        ap.add_argument("--dtypes", default="bf16,fp16,fp32")
        ap.add_argument("--kinds", default="", help="comma-separated kernel kinds (default: all)")
        ap.add_argument("--shard", default="0/1", help="K/N: every N-th config starting at K")
        ap.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1))
        ap.add_argument("--out", default=None, help="JSON lines, appended; present (name, arch) pairs skipped")
        ap.add_argument("--timeout", type=int, default=600, help="seconds per compile")
        ap.add_argument("--limit", type=int, default=None, help="compile at most this many this run")
        ap.add_argument("--from", dest="source", default=None, metavar="SWEEP.jsonl",
                        help="the flag sets of an earlier sweep's output (in its order) instead of every dispatchable "
                             "one: re-check them against the current tables")
        a = ap.parse_args(argv[1:])
        try:
            k, n = (int(v) for v in a.shard.split("/"))
            assert 0 <= k < n
        except (ValueError, AssertionError):
            ap.error(f"--shard is K/N with 0 <= K < N, got {a.shard!r}")
        bad = [d for d in a.dtypes.split(",") if d not in ("bf16", "fp16", "fp32")]
        if bad:
            ap.error(f"--dtypes takes a comma-separated subset of bf16,fp16,fp32, got {a.dtypes!r}")
        if a.source and not os.path.isfile(a.source):
            ap.error(f"--from must be an existing sweep output (JSON lines), got {a.source!r}")
        bad = sweep(a.arch, dtypes=a.dtypes.split(","), shard=(k, n), jobs=a.jobs, out=a.out, timeout=a.timeout,
                    limit=a.limit, kinds=[s for s in a.kinds.split(",") if s] or None, source=a.source)
        return 1 if bad else 0
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.compile_check",
        description="Compile one production config for each ARCH and print one REPORT line (JSON) per arch; "
                    "`python -m benchmarks.compile_check sweep --help`: every dispatchable flag set.",
        epilog="production configs: " + " ".join(names))
    ap.add_argument("name", metavar="NAME", help="a production config (listed below)")
    ap.add_argument("archs", metavar="ARCH", type=_arch, nargs="+", help="compute capability, e.g. 80 90")
    ap.add_argument("--tile", type=_tile, default=None, metavar="BN,BV,BH,WARPS,STAGES[,MAXNREG]",
                    help="block sizes, warps, stages (and a register cap) instead of the arch's table entry")
    a = ap.parse_args(argv)
    if a.name not in names:
        ap.error(f"NAME must be a production config (see --help), got {a.name!r}")
    cfg = by_name(a.name)
    for arch in a.archs:
        print("REPORT " + json.dumps(compile_report(cfg, arch, a.tile)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
