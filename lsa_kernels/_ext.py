"""The compiled CPU kernels ``lsa_kernels._C`` (csrc/): loading, an off switch, and fake impls.

``available()`` is True when the extension is built, importable and not disabled. When it is not built
(a plain ``pip install``, whose isolated build has no torch to compile against) or does not load (built
against another torch), the package warns once, naming the command that builds it
(``pip install --no-build-isolation ...``, see docs/install.md), and the cpu backend runs its ATen code.
Disable it (to compare or to test the ATen path) with ``LSA_DISABLE_EXT=1`` in the environment, or for a
block of code with ``with lsa_kernels._ext.disable(): ...``.

The kernels are torch custom ops (``torch.ops.lsa_kernels.ce_chunk`` / ``pair_chunk`` / ``dense_chunk``, schemas in
csrc/lsa_cpu.cpp) with fake (meta) implementations registered here, so torch.compile treats them as
opaque ops.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from . import _env
from .maths import Divergence

MISSING_MESSAGE = "lsa_kernels._C not built; using the chunked ATen path"
BUILD_HINT = (
    "To compile it against the installed torch (needs a C++ compiler with OpenMP): "
    "`pip install --no-build-isolation -e .` in a clone, or "
    "`pip install --no-build-isolation --no-deps --force-reinstall <source dir>`; "
    "LSA_DISABLE_EXT=1 selects the ATen path without this warning"
)

DIVERGENCE_CODES = {d.label: int(d) for d in Divergence}  # the C++ enum Div (pinned by tests/backends/test_maths_defs.py)

_module = None
_load_error: Exception | None = None
_tried = False
_warned = False
_disabled = _env.ext_disabled_by_env()


def _register_fakes() -> None:
    @torch.library.register_fake("lsa_kernels::ce_chunk")
    def _ce_chunk_fake(z, y, lse, coef, ignore_index, label_smoothing, z_loss, softcap, vocab_total=0):
        C = z.shape[0]
        return z.new_empty(C), z.new_empty(C)

    @torch.library.register_fake("lsa_kernels::pair_chunk")
    def _pair_chunk_fake(za, zb, yp, yq, stats, coef_ce_p, coef_ce_q, coef_div, divergence, temperature,
                         grad_p, grad_q, with_ce, ignore_index, label_smoothing, z_loss, softcap, vocab_total=0):
        C = za.shape[0]
        return za.new_empty(C), za.new_empty(C), za.new_empty(C, 8), za.new_empty(0 if stats is not None else C)

    @torch.library.register_fake("lsa_kernels::dense_chunk")
    def _dense_chunk_fake(z, y, t, c, alpha, omega, lse, coef_p, coef, dt, c_sum, c_sum_f, kappa, beta, fused,
                          ignore_index, z_loss, softcap):
        C = z.shape[0]
        return tuple(z.new_empty(C) for _ in range(5))

    @torch.library.register_fake("lsa_kernels::fastmath")
    def _fastmath_fake(x, which):
        return torch.empty_like(x, dtype=torch.float32)


def _load():
    global _module, _load_error, _tried
    if _tried:
        return _module
    _tried = True
    try:
        from . import _C  # noqa: F401  (registers torch.ops.lsa_kernels.*)

        _register_fakes()
        _module = _C
    except Exception as exc:  # not built, or built against another torch
        # kept without its traceback (nor the exceptions it chains): a traceback holds the frames of the first
        # call that tried the import (through each frame's caller), and with them every tensor of that call
        _load_error = exc.with_traceback(None)
        _load_error.__context__ = _load_error.__cause__ = None
        _module = None
    return _module


def built() -> bool:
    """True when ``lsa_kernels._C`` imports (whether or not it is disabled)."""
    return _load() is not None


def available() -> bool:
    """True when the cpu backend should call the compiled kernels (built and not disabled)."""
    global _warned
    if _disabled:
        return False
    if _load() is None:
        if not _warned:
            _warned = True
            # a missing module is the plain "not built"; anything else (e.g. an undefined symbol: built against
            # another torch) is shown
            err = _load_error
            detail = f" ({type(err).__name__}: {err})" if err is not None and not isinstance(err, ModuleNotFoundError) else ""
            warnings.warn(f"{MISSING_MESSAGE}{detail}. {BUILD_HINT}", RuntimeWarning, stacklevel=3)
        return False
    return True


def simd() -> str | None:
    """The vector ISA the extension was compiled for ('avx512', 'avx2', 'sse2'), or None if not built."""
    m = _load()
    return None if m is None else getattr(m, "simd", None)


@contextlib.contextmanager
def disable(flag: bool = True):
    """Within the block, the cpu backend uses (``flag=True``) or does not force off the ATen path."""
    global _disabled
    old = _disabled
    _disabled = bool(flag)
    try:
        yield
    finally:
        _disabled = old


def ops():
    """``torch.ops.lsa_kernels`` (call only when :func:`available` is True)."""
    return torch.ops.lsa_kernels
