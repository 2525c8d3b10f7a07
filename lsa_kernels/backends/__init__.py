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
        from .triton import backend

        return backend
    raise ValueError(f"no compute backend named {name!r}")
