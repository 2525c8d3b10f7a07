"""Triton backend of lsa_kernels: the functions of the contract in :mod:`lsa_kernels.backends`.

    ce_forward, ce_backward        fused linear cross-entropy                      (ce.py)
    ce_forward_ext                 + per-row entropy / argmax in the same pass     (ce.py)
    pair_forward, pair_backward    two views + divergence in one V pass            (pair.py: launchers;
                                   wq= / bq=: a second head, distillation)
    pair_js_partial                js's X, Y for given normalisers                 (pair.py; vocab-parallel js)
    dense_forward, dense_backward  probability targets / class-weighted smoothing:  (dense.py)
                                   the target tile read next to the logits tile

Modules (the maths each implements opens the file and cites docs/maths.md):

    tiles.py          shared @triton.jit helpers: logits tiles, online softmax step, CE gradient, expm1 / log1p
    merge.py          torch: named columns of the forward partials and their merge over V splits
    ce.py             CE forward, atomic backward, deterministic dz kernel, and their launchers
    dense.py          the same for dense targets T = κ·t⊙c + β·c + α·onehot(y) (docs/maths.md §11)
    pair_phase1.py    pair forward phase 1 (CE of both views, lse of a and b, sums of sce / kl / sym_kl)
    pair_js.py        js's second pass (needs the final lse of a and b)
    pair_bwd.py       pair backward: atomic kernel and deterministic dz kernel
    pair.py           the pair launchers (forward: phase 1 → merge → js phase 2; backward)
    deterministic.py  the deterministic backward's chunking and torch GEMMs (dx = dz W, dW += dzᵀ x)
    _common.py        launch configuration: block-size tables per GPU family, device guard, dot precision
    configs.py        the production / dispatchable kernel specialisations (compiled by benchmarks/compile_check.py)

Naming in this package: a launched kernel ends in ``_kernel``; every other @triton.jit function is a helper
with a plain name (no trailing underscore), shared ones in tiles.py. A trailing underscore means "in place",
as in torch (``dx_out.zero_()``). Raw logits before bias / softcap are ``z_raw`` / ``zraw_p``; logits are
``z``, their temperature-scaled forms ``a`` / ``b`` (``av`` / ``bv`` as tiles), log-probabilities
``logp`` / ``logq``.

Tests run them on CPU tensors under ``TRITON_INTERPRET=1``; production launches take CUDA tensors.
"""

from .ce import CEForwardExt, ce_backward, ce_forward, ce_forward_ext
from .dense import dense_backward, dense_forward
from .pair import pair_backward, pair_forward, pair_js_partial

__all__ = ["ce_forward", "ce_forward_ext", "CEForwardExt", "ce_backward", "pair_forward", "pair_backward",
           "pair_js_partial", "dense_forward", "dense_backward"]
