"""Packaging: one version, a torch range that keeps the user's torch, and the optional C++ extension.

The source tree is copied (its git-tracked and untracked-but-not-ignored files) into a temporary folder and
given to pip as a user would: resolving it into this environment must not replace torch, triton or numpy,
and the default (build-isolated) wheel has no ``lsa_kernels._C``, says so once while building, and warns
once at run time naming the command that builds it. `make test-oldest` does the real install into an
environment with the oldest supported torch (and checks that torch is kept and the extension compiled).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import lsa_kernels
from lsa_kernels import cli

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
pytest.importorskip("packaging", reason="packaging parses the requirement strings")
from packaging.requirements import Requirement  # noqa: E402
from packaging.version import Version  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
LINUX_X86 = {"platform_system": "Linux", "platform_machine": "x86_64"}
MAC_ARM = {"platform_system": "Darwin", "platform_machine": "arm64"}
WINDOWS = {"platform_system": "Windows", "platform_machine": "AMD64"}


def _reqs(name: str, extra: str | None = None) -> list[Requirement]:
    project = PYPROJECT["project"]
    lines = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return [r for r in map(Requirement, lines) if r.name == name]


def test_version_has_one_source():
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lsa_kernels.__version__"}
    assert "version=" not in (ROOT / "setup.py").read_text(encoding="utf-8")
    assert not [ln for ln in (ROOT / "CITATION.cff").read_text(encoding="utf-8").splitlines() if ln.startswith("version:")]
    Version(lsa_kernels.__version__)  # a valid PEP 440 version


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_lsa_version(flag, capsys):
    assert cli.main([flag]) == 0
    assert capsys.readouterr().out.strip() == f"lsa-kernels {lsa_kernels.__version__}"


def test_torch_is_a_range_that_holds_this_torch():
    (torch_req,) = _reqs("torch")
    specs = {s.operator for s in torch_req.specifier}
    assert specs == {">=", "<"}, f"torch must be a range (oldest supported, first untested), not {torch_req}"
    assert torch_req.specifier.contains(Version(torch.__version__).base_version)
    assert torch_req.specifier.contains("2.11.0")  # the oldest end, tested by `make test-oldest`
    assert not torch_req.specifier.contains("2.10.0")
    # triton is never a hard dependency (CUDA torch brings its own; it has no wheels outside Linux)
    assert not _reqs("triton")


@pytest.mark.parametrize("extra", ["triton", "triton36", "test"])
def test_triton_extras_only_where_triton_has_wheels(extra):
    (req,) = _reqs("triton", extra)
    assert req.marker is not None
    assert req.marker.evaluate(LINUX_X86)
    assert req.marker.evaluate({"platform_system": "Linux", "platform_machine": "aarch64"})
    assert not req.marker.evaluate(MAC_ARM) and not req.marker.evaluate(WINDOWS)


def test_triton36_pins_the_numpy_its_interpreter_needs():
    (tri,) = _reqs("triton", "triton36")
    (np_req,) = _reqs("numpy", "triton36")
    assert tri.specifier.contains("3.6.0") and not tri.specifier.contains("3.8.0")
    assert np_req.specifier.contains("2.3.5") and not np_req.specifier.contains("2.4.0")


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory) -> Path:
    """The tree as a clone would have it (no build outputs, no in-place lsa_kernels._C)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to list the source files")
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout.decode().split("\0")
    dst = tmp_path_factory.mktemp("src") / "lsa-kernels"
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


def _pip(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"pip {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_installing_keeps_the_installed_torch(source_copy, tmp_path):
    """pip's resolver, run for this environment (which has a supported torch), installs only the package."""
    report = tmp_path / "report.json"
    _pip("install", "--dry-run", "--quiet", "--report", str(report), str(source_copy), cwd=tmp_path)
    names = {item["metadata"]["name"].lower().replace("_", "-") for item in json.loads(report.read_text())["install"]}
    assert "lsa-kernels" in names
    assert not names & {"torch", "triton", "numpy"}, f"pip would replace the installed {sorted(names)}"


def test_isolated_build_skips_the_extension_once_and_the_package_says_how_to_build_it(source_copy, tmp_path):
    proc = _pip("wheel", "--no-deps", "-v", "-w", str(tmp_path / "dist"), str(source_copy), cwd=tmp_path)
    log = proc.stdout + proc.stderr
    skipped = [line for line in log.splitlines() if "building WITHOUT the C++ extension lsa_kernels._C" in line]
    assert len(skipped) == 1, f"expected one skip line in pip's verbose output, got {len(skipped)}"
    assert "pip install --no-build-isolation" in skipped[0]

    (wheel,) = (tmp_path / "dist").glob("lsa_kernels-*.whl")
    assert wheel.name.startswith(f"lsa_kernels-{lsa_kernels.__version__}-")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        zf.extractall(tmp_path / "site")
    assert not [n for n in names if n.startswith("lsa_kernels/_C")]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "lsa_kernels/data/tokenizer.json" in names and "lsa_kernels/data/shakespeare.jsonl.xz" in names
    assert "License-Expression: Apache-2.0" in meta
    assert any(line.startswith("Requires-Dist: torch") and "<" in line and ">=" in line for line in meta.splitlines())

    # the installed wheel (not this checkout, not its in-place lsa_kernels._C): the ATen path runs, one warning
    # (an editable install of this checkout adds a finder that would resolve lsa_kernels._C to the checkout)
    script = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
        "import warnings, torch, lsa_kernels as L\n"
        "warnings.simplefilter('always')\n"
        "print(L.__file__)\n"
        "x, w, y = torch.randn(3, 5), torch.randn(7, 5), torch.tensor([1, 2, 3])\n"
        "for _ in range(3):\n"
        "    assert torch.isfinite(L.linear_cross_entropy(x, w, y, backend='cpu'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LSA_DISABLE_EXT", "PYTHONPATH")}
    env["PYTHONPATH"] = str(tmp_path / "site")
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().startswith(str(tmp_path / "site"))
    warned = [line for line in run.stderr.splitlines() if "lsa_kernels._C not built" in line]
    assert len(warned) == 1, run.stderr[-3000:]
    assert "pip install --no-build-isolation" in warned[0]
