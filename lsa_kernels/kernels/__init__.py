"""Triton backend of lsa_kernels: the functions of the contract in :mod:`lsa_kernels.backends`.

    ce_forward, ce_backward        fused linear cross-entropy            (kernels/ce.py)
    pair_forward, pair_backward    two views + divergence in one V pass  (kernels/pair.py)
    pair_js_partial                js's X, Y for given normalisers       (kernels/pair.py; vocab-parallel js)

Tests run them on CPU tensors under ``TRITON_INTERPRET=1``; production launches take CUDA tensors.
"""

from .ce import ce_backward, ce_forward
from .pair import pair_backward, pair_forward, pair_js_partial

__all__ = ["ce_forward", "ce_backward", "pair_forward", "pair_backward", "pair_js_partial"]
