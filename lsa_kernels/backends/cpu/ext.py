"""Per-chunk functions of the cpu backend on the compiled ops ``torch.ops.lsa_kernels`` (csrc/lsa_cpu.cpp).

Same calls and the same maths as :mod:`.aten` (docs/maths.md §3, §5; the C++ file opens with the formulas
it implements): a chunk of raw fp32 logits is softcapped, reduced to its per-row statistics and, given
coefficients, overwritten in place with ``dz``. Each op is one parallel-for over rows that sweeps a row
(two for pairs) 2-4 times while it sits in L2, and allocates no ``[c, V]`` tensor: the chunk's own buffer
is the only one (``K = 1`` per chunk row). fp32 only (the loop promotes bf16/fp16 chunks; fp64 takes the
ATen path). js's partial sums (vocab-parallel js only) have no compiled op: :func:`.aten.js_partial_chunk`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ... import _ext
from ...options import CEOptions, PairOptions
from ..contract import PairCoefs

Tensor = torch.Tensor

K_CE = 1
K_PAIR = 1


def _softcap_arg(opts: CEOptions) -> float:
    return float(opts.softcap) if opts.has_softcap else 0.0


def ce_chunk(z: Tensor, y: Tensor, opts: CEOptions, lse: Optional[Tensor] = None,
             coef: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """As :func:`.aten.ce_chunk`."""
    return _ext.ops().ce_chunk(z, y, lse, coef, opts.ignore_index, opts.label_smoothing, opts.z_loss,
                               _softcap_arg(opts), opts.vocab_total or 0)


def pair_chunk(za: Tensor, zb: Tensor, yp: Optional[Tensor], yq: Optional[Tensor], opts: PairOptions,
               stats: Optional[Tensor] = None, coefs: Optional[PairCoefs] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """As :func:`.aten.pair_chunk`."""
    ce = opts.ce
    with_ce = opts.with_ce
    return _ext.ops().pair_chunk(
        za, zb, yp if with_ce else None, yq if with_ce else None, stats,
        coefs.ce_p if coefs is not None and with_ce else None,
        coefs.ce_q if coefs is not None and with_ce else None,
        None if coefs is None else coefs.div,
        _ext.DIVERGENCE_CODES[opts.divergence], float(opts.temperature), opts.grad_p, opts.grad_q, with_ce,
        ce.ignore_index, ce.label_smoothing, ce.z_loss, _softcap_arg(ce), ce.vocab_total or 0,
    )
