"""Count the Triton kernel specialisations a GPU run of tests/backends/test_cuda.py compiles, on CPU.

    python -m benchmarks.gpu_specs [pytest args]

Runs tests/backends/test_cuda.py on CPU tensors under the Triton interpreter (``LSA_CUDA_TEST_ON_CPU=1``)
with every kernel of ``lsa_kernels.kernels`` wrapped by a recorder, and prints ``SPECIALISATIONS n`` and
``TESTS passed=… failed=… skipped=…``: n is the number of distinct (kernel, pointer dtypes, constexpr
flags, integer-argument classes) the tests launch — what Triton compiles once each on a GPU (the block
sizes come from the per-arch tables, so they add nothing). Tests that need a real GPU are skipped here and
their kernels not counted. benchmarks/gpu_run.sh's header multiplies this count by a measured compile time.

As a pytest plugin (``-p benchmarks.gpu_specs`` with ``LSA_SPECS_OUT=file.json``) it records in any pytest
process and writes the keys it saw to that file at the end: ``python -m benchmarks.gpu_tests --cpu`` (the
CUDA-test step of ``DRY_RUN=1 benchmarks/gpu_run.sh``) merges them over its processes. Exit status: pytest's.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import sys
from typing import Dict, Set, Tuple

TEST_FILE = "tests/backends/test_cuda.py"
LAUNCH_ONLY = {"num_warps", "num_stages", "num_ctas", "GROUP"}


def _arg_class(v) -> str:
    """How Triton specialises one argument: tensors by dtype, ints by == 1 / divisible by 16, None apart."""
    if v is None:
        return "None"
    if hasattr(v, "dtype") and hasattr(v, "data_ptr"):
        return str(v.dtype).replace("torch.", "")
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return "1" if v == 1 else ("16k" if v % 16 == 0 else "i")
    if isinstance(v, float):
        return "f"
    return type(v).__name__


class Recorder:
    """Stands in for one kernel object: ``rec[grid](*args, **kw)`` records the specialisation, then launches."""

    def __init__(self, name: str, fn, seen: Set[Tuple]):
        self.name, self.fn, self.seen = name, fn, seen

    def __getitem__(self, grid):
        launch = self.fn[grid]

        def run(*args, **kw):
            names = list(getattr(self.fn, "arg_names", []))
            pos = tuple((names[i] if i < len(names) else str(i), _arg_class(a)) for i, a in enumerate(args))
            const = tuple(sorted((k, v if isinstance(v, (bool, int, float, str)) else _arg_class(v))
                                 for k, v in kw.items() if k not in LAUNCH_ONLY and not k.startswith("BLOCK_")))
            self.seen.add((self.name, pos, const))
            return launch(*args, **kw)

        return run

    def __call__(self, *args, **kw):
        return self.fn(*args, **kw)

    def __getattr__(self, attr):
        return getattr(self.fn, attr)


def _is_kernel(obj) -> bool:
    """A launched kernel: a Triton JIT object named ``*_kernel`` (the package's convention; the ``@triton.jit``
    device functions that kernels call are left alone)."""
    fn = getattr(obj, "fn", None)
    return (type(obj).__name__ in ("JITFunction", "InterpretedFunction") and hasattr(obj, "arg_names")
            and getattr(fn, "__name__", "").endswith("_kernel"))


def install(seen: Set[Tuple]) -> Dict[str, int]:
    """Wrap every Triton kernel object found in the modules of lsa_kernels.kernels (where it is defined and
    wherever it was imported by name). Returns {kernel name: number of module attributes wrapped}."""
    import lsa_kernels.kernels as pkg

    mods = [importlib.import_module(f"{pkg.__name__}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]
    recs: Dict[int, Recorder] = {}
    count: Dict[str, int] = {}
    for mod in mods:
        for attr, obj in list(vars(mod).items()):
            if not _is_kernel(obj):
                continue
            if id(obj) not in recs:
                fn = getattr(obj, "fn", None)
                recs[id(obj)] = Recorder(getattr(fn, "__name__", attr), obj, seen)
            setattr(mod, attr, recs[id(obj)])
            count[recs[id(obj)].name] = count.get(recs[id(obj)].name, 0) + 1
    return count


class _Tally:
    def __init__(self):
        self.n = {"passed": 0, "failed": 0, "skipped": 0}

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and not report.passed):
            key = "passed" if report.passed else ("skipped" if report.skipped else "failed")
            self.n[key] += 1


_SEEN: Set[Tuple] = set()


def pytest_configure(config):
    """Plugin hook: record when LSA_SPECS_OUT names a file (else do nothing)."""
    if os.environ.get("LSA_SPECS_OUT"):
        install(_SEEN)


def pytest_unconfigure(config):
    path = os.environ.get("LSA_SPECS_OUT")
    if path:
        with open(path, "w") as f:
            json.dump(sorted(json.dumps(k) for k in _SEEN), f)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    os.environ["LSA_CUDA_TEST_ON_CPU"] = "1"
    import pytest

    seen: Set[Tuple] = set()
    wrapped = install(seen)
    if not wrapped:
        print("gpu_specs: no Triton kernel found in lsa_kernels.kernels", file=sys.stderr)
        return 2
    tally = _Tally()
    code = pytest.main(["-q", "-p", "no:cacheprovider", TEST_FILE, *argv], plugins=[tally])
    kernels = sorted({k[0] for k in seen})
    print(f"SPECIALISATIONS {len(seen)} (kernels: {', '.join(kernels)})")
    print("TESTS " + " ".join(f"{k}={v}" for k, v in tally.n.items()))
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
