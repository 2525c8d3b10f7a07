"""Compile every production Triton config for sm_80 and sm_90 — no GPU needed.

The interpreter accepts code a GPU rejects, so each config of lsa_kernels.kernels.configs is compiled
for real with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` in a subprocess
with TRITON_INTERPRET unset (the flag breaks real compilation; conftest sets it for this process) and
under a timeout (oversized tiles can keep ptxas busy for minutes). Checks per config and arch:

* ``metadata.shared`` ≤ 227 KB (sm_90) / 163 KB (sm_80);
* ``ptxas -v`` (``/usr/local/bin/ptxas``; skipped if absent): assembles, 0 bytes spilled;
* 64-bit offset arithmetic: i64 multiplies in the Triton IR and wide / s64 multiplies in the PTX.

Compiles run two at a time (a session fixture), each test then reads its report. By default one config
per kernel × dtype class (configs.SMOKE); LSA_SLOW=1 compiles the full production list.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lsa_kernels.kernels.configs import SMOKE, production_configs, ptxas_path

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (80, 90)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TIMEOUT_S = int(os.environ.get("LSA_COMPILE_TIMEOUT", "420"))
ALL_NAMES = [c.name for c in production_configs()]
# the full list takes ~10 min on 2 cores; by default one config per kernel × dtype class (heaviest flags)
FULL = os.environ.get("LSA_SLOW") == "1"
NAMES = ALL_NAMES if FULL else [n for n in ALL_NAMES if n in SMOKE]


def _compile(name: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    try:
        r = subprocess.run(
            [sys.executable, "-m", "lsa_kernels.kernels.configs", name, *map(str, ARCHS)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return {a: {"error": f"compile timed out after {TIMEOUT_S}s"} for a in ARCHS}
    out = {}
    for line in r.stdout.splitlines():
        if line.startswith("REPORT "):
            rep = json.loads(line[len("REPORT "):])
            out[rep["arch"]] = rep
    err = {"error": f"rc={r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"}
    return {a: out.get(a, err) for a in ARCHS}


@pytest.fixture(scope="session")
def reports():
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as ex:
        results = list(ex.map(_compile, NAMES))
    out = {(n, a): res[a] for n, res in zip(NAMES, results) for a in ARCHS}
    summary = ROOT / ".pytest_cache" / "triton_compile_report.json"
    summary.parent.mkdir(exist_ok=True)
    summary.write_text(json.dumps({f"{n}@sm_{a}": r for (n, a), r in out.items()}, indent=1))
    return out


@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm{a}" for a in ARCHS])
@pytest.mark.parametrize("name", NAMES)
def test_compiles(reports, name, arch):
    rep = reports[(name, arch)]
    assert "error" not in rep, rep.get("error")
    assert rep["shared"] <= SHARED_LIMIT[arch], f"shared memory {rep['shared']} B > {SHARED_LIMIT[arch]} B"
    assert rep["ttir_i64_mul"], "no 64-bit offset multiply in the Triton IR"
    assert rep["wide_mul"], "no 64-bit (mul.wide / s64) offset arithmetic in the PTX"
    if ptxas_path() is None:
        pytest.skip("ptxas not found: shared memory and IR checked only")
    assert rep["ptxas_rc"] == 0, rep.get("ptxas_log")
    assert rep["spill_bytes"] == 0, f"{rep['spill_bytes']} bytes spilled ({rep['registers']} registers)"


def test_configs_cover_every_kernel():
    from lsa_kernels.kernels._common import KERNEL_KINDS

    kinds = {c.kernel for c in production_configs()}
    assert kinds == set(KERNEL_KINDS)
    assert len(ALL_NAMES) == len(set(ALL_NAMES))
    assert set(SMOKE) <= set(ALL_NAMES)
    assert {c.kernel for c in production_configs() if c.name in SMOKE} == set(KERNEL_KINDS)
