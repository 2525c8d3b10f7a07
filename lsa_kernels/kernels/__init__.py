"""Triton backend of lsa_kernels: the four functions of the contract in :mod:`lsa_kernels.backends`.

    ce_forward, ce_backward        fused linear cross-entropy            (kernels/ce.py)
    pair_forward, pair_backward    two views + divergence in one V pass  (kernels/pair.py)

Tests run them on CPU tensors under ``TRITON_INTERPRET=1``; production launches take CUDA tensors.
"""

from .ce import ce_backward, ce_forward
from .pair import pair_backward, pair_forward

__all__ = ["ce_forward", "ce_backward", "pair_forward", "pair_backward"]
