"""Compile the production Triton configs for real GPU targets — no GPU needed.

The interpreter accepts code a GPU rejects, so each config of lsa_kernels.kernels.configs is compiled
for real by the compile check (benchmarks/compile_check.py: ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))``) in a subprocess with TRITON_INTERPRET unset (the flag breaks real compilation; conftest sets it for this process) and
under a timeout (oversized tiles can keep ptxas busy for minutes). Checks per config and arch:

* ``metadata.shared`` ≤ 227 KB (sm_90) / 163 KB (sm_80);
* ``ptxas -v`` (``/usr/local/bin/ptxas``; skipped if absent): assembles, 0 bytes spilled;
* 64-bit offset arithmetic: i64 multiplies in the Triton IR and wide / s64 multiplies in the PTX;
* atomic kernels (ce_bwd, pair_bwd, dense_bwd): every atom/red is ``.relaxed``, no membar / non-proxy fence in the
  PTX, and no GPU-scope MEMBAR, ERRBAR or CCTL in the SASS (nvdisasm shipped with Triton); a flag set with an
  accumulated output holds atomics, one without (the dense backward's dt only) holds none.

Compiles run a few at a time (a session fixture), each test then reads its report. By default one config
per kernel × dtype class (configs.SMOKE) for sm_80 and sm_90, and the heaviest configs for the other
families' tables (sm_86: 99 KB shared memory, sm_100, sm_120); LSA_SLOW=1 compiles the full production
list for all five. Every flag combination the dispatch can emit (configs.dispatch_configs, ~86.4k
specialisations: `len(configs.dispatch_configs())`) is compiled by the documented sweep command, not in CI:

    python -m benchmarks.compile_check sweep --arch 80 90 --jobs 16 --out sweep.jsonl [--shard K/N]

or, as a slow-marked test taking the same arguments from LSA_SWEEP (skipped when it is unset):

    LSA_SWEEP="--arch 80 90 --jobs 16 --shard 0/8" python -m pytest -m slow tests/backends/test_triton_compile.py -k sweep
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the tool is the repo's benchmarks/compile_check.py; lsa_kernels stays the one found
    sys.path.append(str(ROOT))  # first (an installed copy under `make test-oldest`)

from benchmarks.compile_check import (_tile, atomic_problems, configs_from, nvdisasm_path, ptxas_path,  # noqa: E402
                                      report_problems, summary)
from lsa_kernels.kernels._common import CLASS_ARCH, SHARED_LIMIT  # noqa: E402
from lsa_kernels.kernels.configs import (ATOMIC_KINDS, FAMILY_SMOKE, SMOKE, KernelConfig, by_name,  # noqa: E402
                                        production_configs)

MAIN_ARCHS = (80, 90)
FAMILY_ARCHS = tuple(a for a in sorted(CLASS_ARCH.values()) if a not in MAIN_ARCHS)  # 86, 100, 120
TIMEOUT_S = int(os.environ.get("LSA_COMPILE_TIMEOUT", "420"))
ALL_NAMES = [c.name for c in production_configs()]
ATOMIC = {c.name for c in production_configs() if c.atomic}
# the full list takes ~10 min per arch on 2 cores; by default one config per kernel × dtype class
# (heaviest flags) on sm_80 / sm_90 and the heaviest few on the other families
FULL = os.environ.get("LSA_SLOW") == "1"
JOBS = [(n, MAIN_ARCHS + (FAMILY_ARCHS if FULL or n in FAMILY_SMOKE else ()))
        for n in ALL_NAMES if FULL or n in SMOKE or n in FAMILY_SMOKE]
CASES = [(n, a) for n, archs in JOBS for a in archs]


def _compile(job) -> dict:
    name, archs = job
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    try:
        r = subprocess.run(
            [sys.executable, "-m", "benchmarks.compile_check", name, *map(str, archs)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return {a: {"error": f"compile timed out after {TIMEOUT_S}s"} for a in archs}
    out = {}
    for line in r.stdout.splitlines():
        if line.startswith("REPORT "):
            rep = json.loads(line[len("REPORT "):])
            out[rep["arch"]] = rep
    err = {"error": f"rc={r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"}
    return {a: out.get(a, err) for a in archs}


@pytest.fixture(scope="session")
def reports():
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as ex:
        results = list(ex.map(_compile, JOBS))
    out = {(n, a): res[a] for (n, archs), res in zip(JOBS, results) for a in archs}
    summary = ROOT / ".pytest_cache" / "triton_compile_report.json"
    summary.parent.mkdir(exist_ok=True)
    summary.write_text(json.dumps({f"{n}@sm_{a}": r for (n, a), r in out.items()}, indent=1))
    return out


@pytest.mark.parametrize("name,arch", CASES, ids=[f"{n}-sm{a}" for n, a in CASES])
def test_compiles(reports, name, arch):
    rep = reports[(name, arch)]
    assert "error" not in rep, rep.get("error")
    assert rep["shared"] <= SHARED_LIMIT[arch], f"shared memory {rep['shared']} B > {SHARED_LIMIT[arch]} B"
    assert rep["ttir_i64_mul"], "no 64-bit offset multiply in the Triton IR"
    assert rep["wide_mul"], "no 64-bit (mul.wide / s64) offset arithmetic in the PTX"
    assert rep["ptx_maxnreg"] == by_name(name).launch(arch).maxnreg, "the table's register cap is not in the PTX"
    if ptxas_path() is None:
        pytest.skip("ptxas not found: shared memory and IR checked only")
    assert rep["ptxas_rc"] == 0, rep.get("ptxas_log")
    assert rep["spill_bytes"] == 0, f"{rep['spill_bytes']} bytes spilled ({rep['registers']} registers)"


ATOMIC_CASES = [(n, a) for n, a in CASES if n in ATOMIC]


@pytest.mark.parametrize("name,arch", ATOMIC_CASES, ids=[f"{n}-sm{a}" for n, a in ATOMIC_CASES])
def test_atomics_relaxed_without_fences(reports, name, arch):
    """Accumulating atomics compile to plain reductions (REDG), with no fence or cache invalidation."""
    rep = reports[(name, arch)]
    assert "error" not in rep, rep.get("error")
    assert atomic_problems(rep) == []
    if nvdisasm_path() is not None:
        assert any(op.startswith("RED") for op in rep["sass_sync"]), rep["sass_sync"]


def test_tile_option_takes_an_optional_register_cap():
    import argparse

    t = _tile("32,64,32,8,3,255")
    assert (t.BLOCK_N, t.BLOCK_V, t.BLOCK_H, t.num_warps, t.num_stages, t.maxnreg) == (32, 64, 32, 8, 3, 255)
    assert _tile("32,64,32,8,3").maxnreg is None
    for bad in ("32,64,32,8,3,256", "32,64,32,8,3,16", "32,64,32,8", "32,64,32,8,3,255,1"):
        with pytest.raises(argparse.ArgumentTypeError):
            _tile(bad)


def _sweep_line(name, arch, regs, spill, problems=(), maxnreg=None, triton="3.8.0"):
    return json.dumps({"name": name, "kernel": "pair_dz", "dtype": "fp32", "flags": {"DIV": 0, "GRAD_P": True},
                       "arch": arch, "triton": triton, "blocks": [32, 64, 32], "num_warps": 8, "num_stages": 3,
                       "maxnreg": maxnreg, "registers": regs, "spill_bytes": spill, "problems": list(problems)})


def test_sweep_from_and_summary(tmp_path):
    """``sweep --from`` takes an earlier sweep's flag sets once each, in order; ``summary`` counts per group."""
    old = tmp_path / "old.jsonl"
    old.write_text("\n".join([_sweep_line("b", 80, 128, 8, ["8 bytes spilled"]), _sweep_line("a", 80, 170, 0),
                              _sweep_line("b", 90, 128, 0)]) + "\n")
    cfgs = configs_from(str(old))
    assert [c.name for c in cfgs] == ["b", "a"] and cfgs[0].flags == {"DIV": 0, "GRAD_P": True}
    new = tmp_path / "new.jsonl"
    new.write_text("\n".join([_sweep_line("b", 80, 255, 0, maxnreg=255), _sweep_line("a", 80, 180, 0, maxnreg=255),
                              _sweep_line("b", 80, 212, 0, maxnreg=255, triton="3.6.0")]) + "\n")
    rows = summary([str(old), str(new)]).splitlines()[2:]
    assert rows == [
        "| pair_dz | fp32 | sm_80 | 3.6.0 | 32x64x32 w8 s3 maxnreg 255 | 1 | 0 | 0 | 212-212 |",
        "| pair_dz | fp32 | sm_80 | 3.8.0 | 32x64x32 w8 s3 | 2 | 1 | 8 | 128-170 |",
        "| pair_dz | fp32 | sm_80 | 3.8.0 | 32x64x32 w8 s3 maxnreg 255 | 2 | 0 | 0 | 180-255 |",
        "| pair_dz | fp32 | sm_90 | 3.8.0 | 32x64x32 w8 s3 | 1 | 0 | 0 | 128-128 |",
    ], rows
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_sweep_line("a", 80, 1, 0) + "\n" + '{"name": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        configs_from(str(bad))


def test_atomic_check_catches_acq_rel():
    """The rule itself: what Triton emits for the default sem (acq_rel), PTX and SASS, is rejected."""
    old = {"ptx_atomics": ["atom.global.gpu.acq_rel.add.v4.f32"], "ptx_fences": ["fence.proxy.async.shared::cta"],
           "sass_sync": ["ATOMG.E.ADD.F32x4.FTZ.RN.STRONG.GPU", "CCTL.IVALL", "ERRBAR", "MEMBAR.ALL.GPU"]}
    assert len(atomic_problems(old)) == 4
    new = {"ptx_atomics": ["atom.global.gpu.relaxed.add.v4.f32"], "ptx_fences": ["fence.proxy.async.shared::cta"],
           "sass_sync": ["FENCE.VIEW.ASYNC.S", "MEMBAR.ALL.CTA", "REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU"]}
    assert atomic_problems(new) == []


def test_atomic_check_follows_the_flag_set():
    """A flag set that accumulates must hold atomics; one that only stores (the dense backward's dt) must hold
    none, and is not reported for having none."""
    dense = {"HAS_BIAS": False, "HAS_SOFTCAP": False, "HAS_Y": False, "HAS_T": True, "HAS_C": False, "HAS_CB": False}
    dt_only = KernelConfig("dt_only", "dense_bwd", "fp32", dict(dense, NEED_DT=True, NEED_DX=False, NEED_DW=False,
                                                                NEED_DB=False))
    db_only = KernelConfig("db_only", "dense_bwd", "fp32", dict(dense, NEED_DT=False, NEED_DX=False, NEED_DW=False,
                                                                NEED_DB=True))
    assert not dt_only.writes_atomically and db_only.writes_atomically and dt_only.atomic
    assert not KernelConfig("fwd", "dense_fwd", "fp32", {"NEED_DX": True}).writes_atomically
    none = {"name": "x", "arch": 90, "shared": 0, "spill_bytes": 0, "ptxas_rc": 0,
            "ptx_atomics": [], "ptx_fences": [], "sass_sync": []}
    relaxed = dict(none, ptx_atomics=["red.global.gpu.relaxed.add.f32"], sass_sync=["REDG.E.ADD.F32.FTZ.RN.STRONG.GPU"])
    assert report_problems(none, dt_only) == []
    assert report_problems(relaxed, db_only) == []
    assert report_problems(none, db_only) == ["no atomics in the PTX of a flag set that accumulates with atomics"]
    assert report_problems(relaxed, dt_only) == [
        "atomics in a flag set with no accumulated output: ['red.global.gpu.relaxed.add.f32']"]
    acq_rel = dict(relaxed, ptx_atomics=["red.global.gpu.acq_rel.add.f32"], sass_sync=["MEMBAR.SC.GPU"])
    assert report_problems(acq_rel, db_only) == ["PTX atomic without .relaxed: red.global.gpu.acq_rel.add.f32",
                                                 "SASS MEMBAR.SC.GPU"]
    assert report_problems(dict(none, spill_bytes=8), dt_only) == ["8 bytes spilled"]


def test_configs_cover_every_kernel():
    from lsa_kernels.kernels._common import KERNEL_KINDS

    kinds = {c.kernel for c in production_configs()}
    assert kinds == set(KERNEL_KINDS)
    assert len(ALL_NAMES) == len(set(ALL_NAMES))
    assert set(SMOKE) <= set(ALL_NAMES)
    assert {c.kernel for c in production_configs() if c.name in SMOKE} == set(KERNEL_KINDS)
    assert set(FAMILY_SMOKE) <= set(ALL_NAMES)
    assert {c.kernel for c in production_configs() if c.name in ATOMIC} == set(ATOMIC_KINDS)
    assert all(c.writes_atomically for c in production_configs() if c.name in ATOMIC)


def test_production_configs_are_dispatchable():
    """Each hand-written production config is a flag set the launchers really emit (bf16/fp32 checked;
    the enumeration runs the dispatch code with recording kernels)."""
    from lsa_kernels.kernels.configs import dispatch_configs

    seen = {(c.kernel, c.dtype, tuple(sorted(c.flags.items()))) for c in dispatch_configs(("bf16", "fp16", "fp32"))}
    for c in production_configs():
        assert (c.kernel, c.dtype, tuple(sorted(c.flags.items()))) in seen, c.name


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LSA_SWEEP"),
                    reason="dispatch-wide compile sweep (~86k kernels per arch): set LSA_SWEEP to its arguments")
def test_dispatch_sweep(tmp_path):
    """Every flag set the dispatch can emit compiles with no spill, within shared memory, relaxed atomics."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = os.environ.get("LSA_SWEEP_OUT", str(tmp_path / "sweep.jsonl"))
    r = subprocess.run([sys.executable, "-m", "benchmarks.compile_check", "sweep",
                        *os.environ["LSA_SWEEP"].split(), "--out", out],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    problems = [ln for ln in r.stderr.splitlines() if ln.startswith("PROBLEM")]
    assert r.returncode == 0 and not problems, "\n".join(problems[:20]) or r.stderr[-3000:]
