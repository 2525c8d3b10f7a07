"""The Triton backend: the contract (..contract) over the fused kernels of :mod:`lsa_kernels.kernels`.

Maths: docs/maths.md §3 (CE) and §5 (pairs), evaluated tile by tile over the vocabulary as described in
docs/maths.md §14; this module only translates the contract's dataclasses into the kernels' launchers
(their names and signatures belong to lsa_kernels.kernels). Long-short's CE-only rows are a separate CE
launch (with ``opts.ce.entropy`` / ``argmax`` its per-token extras, kernels.ce_forward_ext; the paired rows'
per-view extras come from the pair forward's own pass, kernels.pair.pair_forward_ext, docs/maths.md §4).
A second head (``wq``/``bq``, docs/maths.md §12) goes to the kernels' two-head specialisation
(``dwq``/``dbq`` of :class:`~.contract.PairGrads` to ``dwq_out``/``dbq_out``). The kernels recompute logits in backward from the saved statistics, so a fused forward+backward
would save nothing here (``caps.fused_forward_backward`` is False). Dense targets (``ce_dense_*``: probability
targets, class-weighted smoothing, docs/maths.md §11) go to kernels/dense.py.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..options import CEOptions, PairOptions
from .contract import Capabilities, CEOut, DenseOut, DenseTarget, Grads, PairCoefs, PairGrads, PairOut, PairRows

Tensor = torch.Tensor


class TritonBackend:
    """The Triton backend object (module docstring)."""

    name = "triton"
    caps = Capabilities(fused_forward_backward=False, js_partial=True)

    def ce_forward(self, x, w, b, y, opts: CEOptions) -> CEOut:
        if opts.entropy or opts.argmax:  # per-token extras in the same pass (kernels.ce_forward_ext)
            out = kernels.ce_forward_ext(x, w, b, y, opts, entropy=opts.entropy, argmax=opts.argmax)
            am = None if out.argmax is None else out.argmax.to(torch.int64)
            return CEOut(out.loss, out.lse, out.entropy, am)
        loss, lse = kernels.ce_forward(x, w, b, y, opts)
        return CEOut(loss, lse)

    def ce_backward(self, x, w, b, y, lse, coef, opts: CEOptions, grads: Grads, *, coef_entropy=None,
                    entropy=None) -> None:
        kernels.ce_backward(x, w, b, y, lse, coef, opts, grads.dx, grads.dw, grads.db, coef_entropy=coef_entropy,
                            entropy=entropy)

    def ce_dense_forward(self, x, w, b, y, T: DenseTarget, opts: CEOptions) -> DenseOut:
        return kernels.dense_forward(x, w, b, y, T, opts)

    def ce_dense_backward(self, x, w, b, y, T: DenseTarget, lse, coef_p, coef, opts: CEOptions, grads: Grads, *,
                          dt=None) -> None:
        kernels.dense_backward(x, w, b, y, T, lse, coef_p, coef, opts, grads.dx, grads.dw, grads.db, dt)

    def ce_dense_forward_backward(self, x, w, b, y, T, opts, coef, grads, *, dt=None) -> DenseOut:
        raise NotImplementedError("the triton backend has no fused forward+backward (caps.fused_forward_backward)")

    def pair_forward(self, rows: PairRows, w, b, opts: PairOptions, *, wq=None, bq=None) -> PairOut:
        if wq is not None and rows.has_unpaired:
            raise ValueError("CE-only rows (xu) are not supported with a second head")
        extras = opts.ce.entropy or opts.ce.argmax
        ent = am = None
        if extras:  # per-view entropy / argmax from phase 1's pass (kernels.pair.pair_forward_ext)
            if wq is not None:
                raise ValueError("per-view entropy / argmax are not supported with a second head")
            ce_p, ce_q, div, stats, ent, am = kernels.pair.pair_forward_ext(
                rows.xp, rows.xq, w, b, rows.yp, rows.yq, opts, entropy=opts.ce.entropy, argmax=opts.ce.argmax)
        else:
            ce_p, ce_q, div, stats = kernels.pair_forward(rows.xp, rows.xq, w, b, rows.yp, rows.yq, opts, wq=wq,
                                                          bq=bq)
        ce_u = lse_u = ent_u = am_u = None
        if rows.has_unpaired:  # the CE launch, with the per-token extras when asked (kernels.ce_forward_ext)
            out = self.ce_forward(rows.xu, w, b, rows.yu, opts.ce)
            ce_u, lse_u, ent_u, am_u = out.loss, out.lse, out.entropy, out.argmax
        return PairOut(ce_p, ce_q, div, stats, ce_u, lse_u, ent, am, ent_u, am_u)

    def pair_backward(self, rows: PairRows, w, b, saved: PairOut, coefs: PairCoefs, opts: PairOptions,
                      grads: PairGrads, *, wq=None, bq=None) -> None:
        two = wq is not None
        ent = {} if coefs.entropy is None else dict(coef_entropy=coefs.entropy, entropy=saved.entropy)
        kernels.pair_backward(rows.xp, rows.xq, w, b, rows.yp, rows.yq, saved.stats, coefs.ce_p, coefs.ce_q,
                              coefs.div, opts, grads.dxp, grads.dxq, grads.dw, grads.db, wq=wq, bq=bq,
                              dwq_out=grads.dwq if two else None, dbq_out=grads.dbq if two else None, **ent)
        if rows.has_unpaired:
            ent_u = {} if coefs.entropy_u is None else dict(coef_entropy=coefs.entropy_u, entropy=saved.entropy_u)
            self.ce_backward(rows.xu, w, b, rows.yu, saved.lse_u, coefs.ce_u, opts.ce,
                             Grads(grads.dxu, grads.dw, grads.db), **ent_u)

    def pair_js_partial(self, xp, xq, w, b, lset, opts: PairOptions, *, wq=None, bq=None) -> Tensor:
        return kernels.pair_js_partial(xp, xq, w, b, lset, opts, wq=wq, bq=bq)

    def ce_forward_backward(self, x, w, b, y, opts, coef, grads) -> CEOut:
        raise NotImplementedError("the triton backend has no fused forward+backward (caps.fused_forward_backward)")

    def pair_forward_backward(self, rows, w, b, opts, coefs, grads, *, wq=None, bq=None) -> PairOut:
        raise NotImplementedError("the triton backend has no fused forward+backward (caps.fused_forward_backward)")


backend = TritonBackend()

