"""Compute backends behind the public ops, and the contract they share.

    contract.py        the Backend protocol, its capability flags and the dataclasses of its calls
    cpu/               chunked cpu backend: one chunk loop (loop.py) with ATen (aten.py) or compiled
                       (ext.py, lsa_kernels._C) per-chunk functions
    triton.py          the Triton backend: the contract over lsa_kernels.kernels
    vocab_parallel.py  a local backend over a vocab-sharded head: exact merge of per-row statistics

:func:`get` maps a name to its backend object (imported on first use).
"""

from __future__ import annotations

from .contract import Backend, Capabilities, CEOut, Grads, PairCoefs, PairGrads, PairOut, PairRows

__all__ = ["get", "Backend", "Capabilities", "CEOut", "Grads", "PairCoefs", "PairGrads", "PairOut", "PairRows"]


def get(name) -> Backend:
    """The backend object for ``name`` ('cpu' or 'triton'), imported on first use. A backend object (e.g. a
    :class:`~lsa_kernels.backends.vocab_parallel.VocabParallel`) is returned as it is."""
    if not isinstance(name, str):
        return name
    if name == "cpu":
        from .cpu import backend

        return backend
    if name == "triton":
        problem = interpreter_version_problem()
        if problem:
            raise RuntimeError(problem)
        from .triton import backend

        return backend
    raise ValueError(f"no compute backend named {name!r}")


def _major_minor(version: str) -> tuple:
    import re

    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def interpreter_version_problem() -> "str | None":
    """Why the Triton interpreter cannot run here, or None: triton < 3.7's interpreter (``TRITON_INTERPRET=1``)
    fails inside every kernel with numpy >= 2.4 (it converts 1-element arrays with ``int()``). Compiled kernels
    on a GPU are not affected, so this is checked only when interpreting."""
    from .. import _env

    if not _env.interpreting():
        return None
    try:
        import numpy
        import triton
    except ImportError:
        return None
    if _major_minor(triton.__version__) < (3, 7) and _major_minor(numpy.__version__) >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) does not work with numpy "
                f"{numpy.__version__}: it needs numpy < 2.4 (pip install \"numpy<2.4\", or the extra "
                f"lsa-kernels[triton36]) or triton >= 3.8")
    return None
