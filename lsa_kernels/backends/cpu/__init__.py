"""The cpu backend: chunked, never more than one chunk of logits alive (contract: ..contract).

Maths: docs/maths.md §3 (CE) and §5 (pairs), evaluated chunk by chunk: :mod:`.loop` forms a chunk's logits
with one GEMM, a per-chunk function reduces them to per-row statistics and — when the gradient
coefficients are known — turns them in place into ``dz``, and two more GEMMs give ``dx = dz W`` and
``dW += dzᵀ x``. The per-chunk functions come in two implementations with the same calls: the compiled
ops of ``lsa_kernels._C`` (:mod:`.ext`, used when built and not disabled: ``LSA_DISABLE_EXT=1`` or
``lsa_kernels._ext.disable()``) and plain ATen (:mod:`.aten`; also every fp64 call, for gradcheck).

Forward and backward in one pass (``caps.fused_forward_backward``): given the coefficients, the forward
also writes the gradient, which saves the backward's logits GEMM. Long-short's CE-only rows run in the same
chunks as the pairs (one set of GEMMs per chunk for all of them).

A second head (contract; distillation, docs/maths.md §12): view q's logits from its own ``wq``/``bq`` — the
chunk loop runs one logits GEMM per head into the same chunk buffer and gives each head its own ``dx``/``dW``
GEMMs; a frozen view p without CE (detach="p") gets no gradient GEMM at all. A view with CE off (no target)
runs the per-chunk functions with ``ignore_index`` targets and zero CE coefficients.

Long-short's per-view extras (contract; docs/maths.md §4): each view's entropy / argmax come from ATen helpers
(:func:`.aten.view_extras`) run on the chunk's raw logits before the per-chunk function (compiled or ATen, unchanged)
reads them, and the entropy's gradient term (:func:`.aten.entropy_grad`) is added to the dz that function wrote:
the same chunks and GEMMs, the compiled path kept for the rest; the rows per chunk count the extras' buffers.

Dense targets (contract: ``ce_dense_*``; probability targets and class-weighted label smoothing, docs/maths.md
§11): the same chunk loop with the compiled ``dense_chunk`` op (:func:`.ext.dense_chunk`: t read in its own dtype
next to the logits, 2-3 sweeps per row, K = ext.k_dense, 1 or 2) when ``_C`` is used, else
:func:`.aten.dense_chunk` (K = aten.k_dense, up to 4). The fused forward+backward forms A and the lse coefficient
inside the chunk (the chunk holds whole rows).

Half-precision inputs: x and W are promoted to fp32 before the GEMM (CPU ATen has no bf16 × bf16 → fp32
GEMM), so logits are never rounded to bf16: W once per call (a ``[V, H]`` fp32 copy), x chunk by chunk.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Optional

import torch

from ... import _ext
from ...maths import Stat
from ...options import N_PAIR_STATS, CEOptions, PairOptions
from ..contract import Capabilities, CEOut, DenseOut, DenseTarget, Grads, PairCoefs, PairGrads, PairOut, PairRows
from . import aten, ext, loop
from .loop import acc_dtype, chunk_rows

Tensor = torch.Tensor

__all__ = ["backend", "CpuBackend", "use_ext", "impl", "k_buffers", "chunk_rows"]


def use_ext(x: Tensor) -> bool:
    """Whether a call with input ``x`` runs the compiled per-chunk functions: not fp64, ``_C`` available."""
    return x.dtype != torch.float64 and _ext.available()


def impl(x: Tensor) -> ModuleType:
    """The per-chunk implementation a call with input ``x`` takes: :mod:`.ext` or :mod:`.aten`."""
    return ext if use_ext(x) else aten


def k_buffers(pair: bool, x: Tensor) -> int:
    """``K`` of the path a call with input ``x`` takes: fp32 ``[rows, V]`` buffers alive per chunk row."""
    m = impl(x)
    return m.K_PAIR if pair else m.K_CE


def _empty(n: int, like: Tensor, *cols: int) -> Tensor:
    return torch.empty(n, *cols, dtype=acc_dtype(like), device=like.device)


def _ce(x: Tensor, w: Tensor, b: Optional[Tensor], y: Tensor, opts: CEOptions, *, lse: Optional[Tensor] = None,
        coef: Optional[Tensor] = None, grads: Grads = Grads(), coef_entropy: Optional[Tensor] = None,
        entropy: Optional[Tensor] = None) -> CEOut:
    """Forward (``coef`` None), forward + gradient, or gradient from the saved ``lse``. Per-token extras
    (``opts.entropy`` / ``opts.argmax``, the entropy's gradient) take the ATen chunk function on every path."""
    extras = opts.entropy or opts.argmax or coef_entropy is not None
    fns = aten if extras else impl(x)
    N = x.shape[0]
    loss_all, lse_all = _empty(N, x), (_empty(N, x) if lse is None else lse)
    ent_all = _empty(N, x) if (extras and opts.entropy and lse is None) else None
    am_all = torch.empty(N, dtype=torch.int64, device=x.device) if (extras and opts.argmax and lse is None) else None

    def step(z, sl):
        (s,) = sl
        args = (z[0], y[s], opts, None if lse is None else lse[s], None if coef is None else coef[s])
        if extras:
            lr, lsr, er, ar = aten.ce_chunk_ext(*args, None if entropy is None else entropy[s],
                                                None if coef_entropy is None else coef_entropy[s])
            if ent_all is not None:
                ent_all[s] = er
            if am_all is not None:
                am_all[s] = ar
        else:
            lr, lsr = fns.ce_chunk(*args)
        loss_all[s] = lr
        if lse is None:
            lse_all[s] = lsr

    rows = chunk_rows(w.shape[0], aten.K_CE_EXT if extras else fns.K_CE, opts.chunk_bytes)
    loop.run([loop.Part(x, grads.dx)], w, b, rows, step, backward=coef is not None, dw=grads.dw, db=grads.db)
    return CEOut(loss_all, lse_all, ent_all, am_all)


def _dense(x: Tensor, w: Tensor, b: Optional[Tensor], y: Optional[Tensor], T: DenseTarget, opts: CEOptions, *,
           lse: Optional[Tensor] = None, coef_p: Optional[Tensor] = None, coef: Optional[Tensor] = None,
           grads: Grads = Grads(), dt: Optional[Tensor] = None, fused: bool = False) -> Optional[DenseOut]:
    """Dense-target forward (``coef`` None), forward + gradient (``fused``), or gradient from the saved ``lse``
    and ``coef_p`` (module docstring; contract)."""
    fns = impl(x)
    N = x.shape[0]
    fwd = lse is None
    outs = [_empty(N, x) for _ in range(5)] if fwd else None
    if dt is not None and dt.dtype != acc_dtype(x):
        raise ValueError(f"dt must be {acc_dtype(x)} (the accumulation dtype), got {dt.dtype}")

    def step(z, sl):
        (s,) = sl
        r = fns.dense_chunk(z[0], None if y is None else y[s], T.rows(s), opts, None if fwd else lse[s],
                             None if coef_p is None else coef_p[s], None if coef is None else coef[s],
                             None if dt is None else dt[s], fused)
        if fwd:
            for o, v in zip(outs, r):
                if v is not None:
                    o[s] = v

    inplace = coef is not None and not opts.has_softcap and dt is None  # aten.dense_chunk works in z itself
    rows = chunk_rows(w.shape[0], fns.k_dense(T, acc_dtype(x), opts, inplace), opts.chunk_bytes)
    loop.run([loop.Part(x, grads.dx)], w, b, rows, step, backward=coef is not None, dw=grads.dw, db=grads.db)
    if not fwd:
        return None
    lse_, tz, tm, cz, zy = outs
    zero = torch.zeros_like(lse_)
    return DenseOut(lse_, tz if T.t is not None else zero, tm if T.t is not None else zero,
                    cz if T.beta != 0 else zero, zy if y is not None else zero)


def _check_qhead(rows: PairRows, w: Tensor, wq: Optional[Tensor], bq: Optional[Tensor]) -> None:
    """Shapes of a second head (contract: view q's own ``wq``/``bq``); raises ValueError naming the argument."""
    if wq is None:
        if bq is not None:
            raise ValueError("bq is the bias of view q's own head: pass wq with it (or b for a shared head)")
        return
    if wq.dim() != 2 or wq.shape[0] != w.shape[0]:
        raise ValueError(f"wq must be [V, Hq] with the V of w ({w.shape[0]}), got {tuple(wq.shape)}")
    if rows.xq.shape[1] != wq.shape[1]:
        raise ValueError(f"xq must be [N, Hq] with the Hq of wq ({wq.shape[1]}), got {tuple(rows.xq.shape)}")
    if bq is not None and tuple(bq.shape) != (w.shape[0],):
        raise ValueError(f"bq must be [V] = [{w.shape[0]}], got {tuple(bq.shape)}")
    if rows.has_unpaired:
        raise ValueError("CE-only rows (xu) are not supported with a second head")


def _pair(rows: PairRows, w: Tensor, b: Optional[Tensor], opts: PairOptions, *, saved: Optional[PairOut] = None,
          coefs: Optional[PairCoefs] = None, grads: PairGrads = PairGrads(), wq: Optional[Tensor] = None,
          bq: Optional[Tensor] = None) -> PairOut:
    """Forward (``coefs`` None), forward + gradient, or gradient from the ``saved`` statistics. ``wq``/``bq``:
    view q's own head (contract); a view without target or CE coefficient takes no CE."""
    _check_qhead(rows, w, wq, bq)
    fns = impl(rows.xp)
    N, like = rows.xp.shape[0], rows.xp
    fwd = saved is None
    acc = acc_dtype(like)
    zeros = torch.zeros(N, dtype=acc, device=like.device)
    # CE per view (contract): on when with_ce and the view has a target (and, in backward, a coefficient);
    # the per-chunk functions take both views' targets, so a view without CE gets ignore_index everywhere
    ce_p_on = opts.with_ce and rows.yp is not None and (coefs is None or coefs.ce_p is not None)
    ce_q_on = opts.with_ce and rows.yq is not None and (coefs is None or coefs.ce_q is not None)
    with_ce = ce_p_on or ce_q_on
    if with_ce != opts.with_ce:
        opts = dataclasses.replace(opts, with_ce=with_ce)
    no_y = torch.full((N,), opts.ce.ignore_index, dtype=torch.long, device=like.device) if with_ce else None
    yp = rows.yp if ce_p_on else no_y
    yq = rows.yq if ce_q_on else no_y
    if coefs is not None and with_ce:
        coefs = dataclasses.replace(coefs, ce_p=coefs.ce_p if ce_p_on else zeros, ce_q=coefs.ce_q if ce_q_on else zeros)
    ce_p = _empty(N, like) if (fwd and ce_p_on) else zeros
    ce_q = _empty(N, like) if (fwd and ce_q_on) else zeros
    stats = _empty(N, like, N_PAIR_STATS) if fwd else saved.stats
    div_all = _empty(N, like) if fwd else saved.div
    unpaired = rows.has_unpaired
    M = rows.xu.shape[0] if unpaired else 0
    ce_u = _empty(M, like) if unpaired else None
    lse_u = (_empty(M, like) if fwd else saved.lse_u) if unpaired else None
    two = wq is not None
    # per-view extras (contract; docs/maths.md §4): the ATen helpers on each view's raw chunk before the
    # per-chunk function (compiled or ATen) reads it; the entropy's gradient term is added to its dz after
    want_ent, want_am = fwd and opts.ce.entropy, fwd and opts.ce.argmax
    ent_grad = coefs is not None and (coefs.entropy is not None or coefs.entropy_u is not None)
    if (want_ent or want_am or ent_grad) and two:
        raise ValueError("per-view entropy / argmax are not supported with a second head")
    for cname, sname in (("entropy", "entropy"), ("entropy_u", "entropy_u")):
        if coefs is not None and getattr(coefs, cname) is not None and (saved is None or getattr(saved, sname) is None):
            raise ValueError(f"coefs.{cname} needs the forward's entropy: pass it in saved.{sname}")
    ent = _empty(N, like, 2) if want_ent else None
    am = torch.empty(N, 2, dtype=torch.int64, device=like.device) if want_am else None
    ent_u = _empty(M, like) if (want_ent and unpaired) else None
    am_u = torch.empty(M, dtype=torch.int64, device=like.device) if (want_am and unpaired) else None
    parts = [loop.Part(rows.xp, grads.dxp, ce_p_on or opts.grad_p),
             loop.Part(rows.xq, grads.dxq, ce_q_on or opts.grad_q, head=1 if two else 0)]
    if unpaired:
        parts.append(loop.Part(rows.xu, grads.dxu))
    heads = [loop.Head(wq, bq, grads.dwq, grads.dbq if bq is not None else None)] if two else []

    def sl_(t, s):
        return None if t is None else t[s]

    def extras(zk, e, a, idx, s, lse, h, ce_):
        """Forward: the extras of one view's chunk into e / a (column idx); backward: its entropy term."""
        if want_ent or want_am:
            er, ar = aten.view_extras(zk, opts.ce, want_ent, want_am)
            if want_ent:
                e[s, idx] = er
            if want_am:
                a[s, idx] = ar
        if ent_grad and ce_ is not None:
            return aten.entropy_grad(zk, opts.ce, lse[s], h[s, idx], ce_[s, idx])
        return None

    ent_saved = None if fwd else saved.entropy
    ce_ent = None if coefs is None else coefs.entropy
    ce_ent_u = None if coefs is None or coefs.entropy_u is None else coefs.entropy_u.unsqueeze(1)

    def step(z, sl):
        s = sl[0]
        c = None if coefs is None else PairCoefs(coefs.div[s], sl_(coefs.ce_p, s), sl_(coefs.ce_q, s))
        tp = extras(z[0], ent, am, 0, s, stats[:, Stat.LSE_P], ent_saved, ce_ent)
        tq = extras(z[1], ent, am, 1, s, stats[:, Stat.LSE_Q], ent_saved, ce_ent)
        cp, cq, st, dv = fns.pair_chunk(z[0], z[1], sl_(yp, s), sl_(yq, s), opts, None if fwd else stats[s], c)
        for zk, t in ((z[0], tp), (z[1], tq)):
            if t is not None:
                zk.add_(t)
        del tp, tq
        if fwd:
            stats[s] = st
            div_all[s] = dv
            if ce_p_on:
                ce_p[s] = cp
            if ce_q_on:
                ce_q[s] = cq
        if unpaired:
            u = sl[2]
            tu = None
            if want_ent or want_am or (ent_grad and ce_ent_u is not None):
                eu = None if ent_u is None else ent_u.unsqueeze(1)
                tu = extras(z[2], eu, None if am_u is None else am_u.unsqueeze(1), 0, u, lse_u,
                            None if fwd else saved.entropy_u.unsqueeze(1), ce_ent_u)
            lu, lsu = fns.ce_chunk(z[2], rows.yu[u], opts.ce, None if fwd else lse_u[u],
                                   None if coefs is None else coefs.ce_u[u])
            ce_u[u] = lu
            if fwd:
                lse_u[u] = lsu
            if tu is not None:
                z[2].add_(tu)

    k = fns.K_PAIR
    if want_ent or want_am:
        k = max(k, aten.K_VIEW_EXTRAS_FWD)
    if ent_grad:
        k = max(k + aten.K_PAIR_EXTRA, aten.K_VIEW_EXTRAS_BWD)
    n_rows = chunk_rows(w.shape[0], k, opts.ce.chunk_bytes)
    loop.run(parts, w, b, max(n_rows, 2 + unpaired), step, backward=coefs is not None, dw=grads.dw,
             db=grads.db, heads=heads)
    return PairOut(ce_p, ce_q, div_all, stats, ce_u, lse_u, ent, am, ent_u,
                   am_u)


class CpuBackend:
    """The cpu backend object (module docstring; methods: lsa_kernels.backends.contract)."""

    name = "cpu"
    caps = Capabilities(fused_forward_backward=True, js_partial=True)

    def ce_forward(self, x, w, b, y, opts: CEOptions) -> CEOut:
        return _ce(x, w, b, y, opts)

    def ce_forward_backward(self, x, w, b, y, opts: CEOptions, coef: Tensor, grads: Grads) -> CEOut:
        return _ce(x, w, b, y, opts, coef=coef, grads=grads)

    def ce_backward(self, x, w, b, y, lse, coef, opts: CEOptions, grads: Grads, *, coef_entropy=None,
                    entropy=None) -> None:
        _ce(x, w, b, y, opts, lse=lse, coef=coef, grads=grads, coef_entropy=coef_entropy, entropy=entropy)

    def ce_dense_forward(self, x, w, b, y, T: DenseTarget, opts: CEOptions) -> DenseOut:
        return _dense(x, w, b, y, T, opts)

    def ce_dense_backward(self, x, w, b, y, T: DenseTarget, lse, coef_p, coef, opts: CEOptions, grads: Grads, *,
                          dt=None) -> None:
        _dense(x, w, b, y, T, opts, lse=lse, coef_p=coef_p, coef=coef, grads=grads, dt=dt)

    def ce_dense_forward_backward(self, x, w, b, y, T: DenseTarget, opts: CEOptions, coef, grads: Grads, *,
                                  dt=None) -> DenseOut:
        return _dense(x, w, b, y, T, opts, coef=coef, grads=grads, dt=dt, fused=True)

    def pair_forward(self, rows: PairRows, w, b, opts: PairOptions, *, wq=None, bq=None) -> PairOut:
        return _pair(rows, w, b, opts, wq=wq, bq=bq)

    def pair_forward_backward(self, rows: PairRows, w, b, opts: PairOptions, coefs: PairCoefs,
                              grads: PairGrads, *, wq=None, bq=None) -> PairOut:
        return _pair(rows, w, b, opts, coefs=coefs, grads=grads, wq=wq, bq=bq)

    def pair_backward(self, rows: PairRows, w, b, saved: PairOut, coefs: PairCoefs, opts: PairOptions,
                      grads: PairGrads, *, wq=None, bq=None) -> None:
        _pair(rows, w, b, opts, saved=saved, coefs=coefs, grads=grads, wq=wq, bq=bq)

    def pair_js_partial(self, xp, xq, w, b, lset, opts: PairOptions, *, wq=None, bq=None) -> Tensor:
        """ATen chunks on every input dtype (contract)."""
        _check_qhead(PairRows(xp, xq), w, wq, bq)
        out = _empty(xp.shape[0], xp, 2)

        def step(z, sl):
            s = sl[0]
            out[s] = aten.js_partial_chunk(z[0], z[1], lset[s], opts)

        rows = chunk_rows(w.shape[0], aten.K_PAIR, opts.ce.chunk_bytes)
        two = wq is not None
        loop.run([loop.Part(xp), loop.Part(xq, head=1 if two else 0)], w, b, max(rows, 2), step, backward=False,
                 heads=[loop.Head(wq, bq)] if two else [])
        return out


backend = CpuBackend()
