"""Per-chunk functions of the cpu backend on the compiled ops ``torch.ops.lsa_kernels`` (csrc/lsa_cpu.cpp).

Same calls and the same maths as :mod:`.aten` (docs/maths.md §3, §5; the C++ file opens with the formulas
it implements): a chunk of raw fp32 logits is softcapped, reduced to its per-row statistics and, given
coefficients, overwritten in place with ``dz``. Each op is one parallel-for over rows that sweeps a row
(two for pairs) 2-4 times while it sits in L2, and allocates no ``[c, V]`` tensor: the chunk's own buffer
is the only one (``K = 1`` per chunk row). fp32 only (the loop promotes bf16/fp16 chunks; fp64 takes the
ATen path). Dense targets (docs/maths.md §11, :func:`.aten.dense_chunk`'s calls and outputs): one op that reads
the target rows ``t`` in their own dtype (fp32/fp64/bf16/fp16) next to the logits and sweeps each row 2-3
times (softcap + max + Σ t c z, Σ t c, Σ c z; the lse; the gradient, plus dt's write when asked): ``K = 1``
(:func:`k_dense`; +1 only for a ``t`` of another dtype or with a non-unit stride along V, copied per chunk).
js's partial sums (vocab-parallel js only) have no compiled op: :func:`.aten.js_partial_chunk`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ... import _ext
from ...options import CEOptions, PairOptions
from ..contract import DenseTarget, PairCoefs

Tensor = torch.Tensor

K_CE = 1
K_PAIR = 1
K_DENSE = 2

_T_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)  # t read in place by the op


def _t_copied(t: Optional[Tensor]) -> bool:
    return t is not None and (t.dtype not in _T_DTYPES or t.stride(-1) != 1)


def k_dense(T: DenseTarget, acc: torch.dtype, opts: CEOptions, inplace: bool = False) -> int:
    """fp32 ``[rows, V]`` buffers :func:`dense_chunk` keeps alive per chunk row (the calls of
    :func:`.aten.k_dense`): the chunk only, + 1 when ``t`` must be copied (another dtype, or strided along V)."""
    return 1 + _t_copied(T.t)


def _softcap_arg(opts: CEOptions) -> float:
    return float(opts.softcap) if opts.has_softcap else 0.0


def ce_chunk(z: Tensor, y: Tensor, opts: CEOptions, lse: Optional[Tensor] = None,
             coef: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """As :func:`.aten.ce_chunk`."""
    return _ext.ops().ce_chunk(z, y, lse, coef, opts.ignore_index, opts.label_smoothing, opts.z_loss,
                               _softcap_arg(opts), opts.vocab_total or 0)


def pair_chunk(za: Tensor, zb: Tensor, yp: Optional[Tensor], yq: Optional[Tensor], opts: PairOptions,
               stats: Optional[Tensor] = None,
               coefs: Optional[PairCoefs] = None) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """As :func:`.aten.pair_chunk` (the divergence per row from the op's centred sweep)."""
    ce = opts.ce
    with_ce = opts.with_ce
    ce_p, ce_q, st, div = _ext.ops().pair_chunk(
        za, zb, yp if with_ce else None, yq if with_ce else None, stats,
        coefs.ce_p if coefs is not None and with_ce else None,
        coefs.ce_q if coefs is not None and with_ce else None,
        None if coefs is None else coefs.div,
        _ext.DIVERGENCE_CODES[opts.divergence], float(opts.temperature), opts.grad_p, opts.grad_q, with_ce,
        ce.ignore_index, ce.label_smoothing, ce.z_loss, _softcap_arg(ce), ce.vocab_total or 0,
    )
    return ce_p, ce_q, st, (div if stats is None else None)


def dense_chunk(z: Tensor, y: Optional[Tensor], T: DenseTarget, opts: CEOptions, lse: Optional[Tensor] = None,
                coef_p: Optional[Tensor] = None, coef: Optional[Tensor] = None, dt: Optional[Tensor] = None,
                fused: bool = False):
    """As :func:`.aten.dense_chunk` -> (lse, tz, tm, cz, zy), None where that function gives None."""
    t = T.t
    if _t_copied(t):
        t = torch.empty(t.shape, dtype=t.dtype if t.dtype in _T_DTYPES else torch.float32, device=t.device).copy_(t)
    cs = T.c_sum
    cs_t = cs if isinstance(cs, Tensor) else None
    cs_f = 0.0 if cs_t is not None else float(cs)
    fwd = lse is None
    r = _ext.ops().dense_chunk(z, y, t, T.c, T.alpha, T.omega, lse, coef_p, coef, dt, cs_t, cs_f, float(T.kappa),
                               float(T.beta), fused, opts.ignore_index, opts.z_loss, _softcap_arg(opts))
    if not fwd:
        return lse, None, None, None, None
    lse_, tz, tm, cz, zy = r
    has_t = T.t is not None
    return (lse_, tz if has_t else None, tm if has_t else None, cz if T.beta != 0 else None,
            zy if y is not None else None)
