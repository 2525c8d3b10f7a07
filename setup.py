"""The optional C++ extension lsa_kernels._C (csrc/); all other metadata is in pyproject.toml.

The extension is compiled against the torch that is importable while building, so it is built only
without build isolation, into an environment that already has torch (and a C++ compiler with OpenMP):

    pip install --no-build-isolation -e .          (a clone; `make install` does this with the pinned stack)
    pip install --no-build-isolation .

A plain `pip install .` builds in an isolated environment without torch: the extension is skipped (a line
says so in pip's verbose output) and, at run time, the package warns once and runs its chunked ATen path.

Switches: LSA_NO_EXT=1 skips the extension; LSA_NATIVE=0 drops -march=native (for a binary that must run
on other CPUs than the one that built it).
"""

import glob
import os
import sys

from setuptools import setup

SKIP_HINT = (
    "lsa_kernels: building WITHOUT the C++ extension lsa_kernels._C ({why}); the package will use its "
    "chunked ATen path. To build it against your installed torch: "
    "pip install --no-build-isolation <this source tree>"
)


# setup.py runs once per PEP 517 hook (requirements, metadata, wheel): say it only in the one that builds
_BUILDING = any(cmd in sys.argv for cmd in ("build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"))


def _skip(why: str) -> None:
    if _BUILDING:
        print(SKIP_HINT.format(why=why), file=sys.stderr)


def _extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return [], {}
    if os.environ.get("LSA_NO_EXT") == "1":
        _skip("LSA_NO_EXT=1")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # build isolation: no torch in the build environment
        _skip(f"torch is not importable in the build environment: {exc}")
        return [], {}
    flags = ["-O3", "-fopenmp", "-std=c++20", "-fno-trapping-math", "-fno-math-errno"]
    if os.environ.get("LSA_NATIVE", "1") == "1":
        flags.append("-march=native")
    ext = CppExtension(
        "lsa_kernels._C",
        sources,
        depends=sorted(glob.glob(os.path.join("csrc", "*.h"))),  # rebuild on header changes; shipped in the sdist
        extra_compile_args={"cxx": flags},
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()

setup(ext_modules=ext_modules, cmdclass=cmdclass, zip_safe=False)
