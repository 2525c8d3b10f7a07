"""Autograd Functions tying the backends (cpu, triton, vocab-parallel) to the public API.

Each Function takes its non-tensor options as one dataclass (:mod:`lsa_kernels.options`) and a backend
name or object, runs the backend's per-row forward, reduces, and in backward turns the upstream gradient
into per-row coefficients for the backend's backward (contract: :mod:`lsa_kernels.backends.contract`).
The reductions and coefficients are docs/maths.md §3 (CE: mean over valid rows, sum, none) and §4 (the
long-short loss ``ce + α·misalign``: CE over every valid row of both views, the divergence over the
selected pairs).

Gradient folded into the forward: for ``mean``/``sum`` reductions the per-row coefficients are known
before backward (up to the scalar upstream gradient), so a backend with
``caps.fused_forward_backward`` computes dX/dW in the same pass over the logits (one GEMM per view saved
on the CPU); backward then only scales them. Those buffers are saved tensors of the Function
(:func:`save_with_grads`), so they are freed as soon as the loss's backward ran, not kept through the model's
backward below it. Otherwise — no such capability, ``reduction="none"``, or
an auxiliary output (``ce``/``misalign`` of the long-short loss) that also receives a gradient — the
backward runs the backend's backward from the statistics the forward saved (always saved: a few floats
per row). Nothing here syncs with the host: counts stay tensors.

Autocast: the public ops cast their operands to the autocast dtype themselves (:mod:`.dispatch`); the
Functions' forward and backward run with autocast OFF (:func:`lsa_kernels.dispatch.autocast_off`), so a
backward called inside an autocast region cannot turn the backends' fp32 accumulations (dW, db, statistics)
into bf16 GEMMs.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from . import backends
from .backends import Grads, PairCoefs, PairGrads, PairOut, PairRows
from .dispatch import autocast_off
from .maths import Stat, acc_dtype, mean_scale
from .options import CEOptions, PairOptions

Tensor = torch.Tensor


_acc = acc_dtype  # lsa_kernels.maths


def _empty_acc(x: Tensor, want: bool = True) -> Optional[Tensor]:
    return torch.empty(x.shape, dtype=_acc(x), device=x.device) if want else None


def grad_buffers(x: Tensor, w: Tensor, b: Optional[Tensor], need_x: bool, need_w: bool, need_b: bool) -> Grads:
    f32 = dict(dtype=_acc(x), device=x.device)
    return Grads(
        dx=_empty_acc(x, need_x),
        dw=torch.zeros(w.shape, **f32) if need_w else None,
        db=torch.zeros(w.shape[0], **f32) if (need_b and b is not None) else None,
    )


def cast_grad(g: Optional[Tensor], like: Optional[Tensor], scale=None) -> Optional[Tensor]:
    """``g`` (times ``scale``; not in place: a retained graph may run backward again) in ``like``'s dtype."""
    if g is None or like is None:
        return None
    if scale is not None:
        g = g * scale
    return g.to(like.dtype)


def save_with_grads(ctx, pre, *tensors) -> None:
    """``ctx.save_for_backward(*tensors, *pre)``: the forward's gradient buffers ``pre`` (a ``Grads`` /
    ``PairGrads``, or None when the gradient is not folded into the forward) travel as saved tensors, restored by
    :func:`saved_with_grads`. Not as attributes of ``ctx``: the engine frees a node's saved tensors as soon as its
    backward ran (unless the graph is retained) and saved-tensor hooks (activation offload) apply to them, whereas
    an attribute lives as long as the graph, i.e. through the whole backward of the model below the loss (an fp32
    ``[rows, H]`` and, when the head trains, an fp32 ``[V, H]`` held for nothing)."""
    ctx.pre_type, ctx.n_saved = (None if pre is None else type(pre)), len(tensors)
    bufs = () if pre is None else tuple(getattr(pre, f.name) for f in dataclasses.fields(pre))
    ctx.save_for_backward(*tensors, *bufs)


def saved_with_grads(ctx):
    """``(tensors, pre)`` as :func:`save_with_grads` saved them."""
    s = ctx.saved_tensors
    return s[: ctx.n_saved], (None if ctx.pre_type is None else ctx.pre_type(*s[ctx.n_saved:]))


def contig(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


# --------------------------------------------------------------------------------------------- CE


class _LinearCrossEntropy(torch.autograd.Function):
    """The CE (docs/maths.md §3) and its per-token outputs: (loss, lse, entropy, argmax). lse and argmax carry no
    gradient; the entropy does (its coefficient goes to the backend's ``coef_entropy``). For a scalar reduction
    without the entropy the gradient is folded into the forward when the backend can (module
    docstring); otherwise forward then backward (the entropy's coefficient is only known in backward). Outputs
    not asked for (opts.entropy / opts.argmax) are empty tensors."""

    @staticmethod
    @autocast_off
    def forward(ctx, x, w, b, y, rw, reduction: str, opts: CEOptions, backend):
        ctx.set_materialize_grads(False)
        be = backends.get(backend)
        x, w, b, y = contig(x), contig(w), contig(b), contig(y)
        need = ctx.needs_input_grad[:3]
        weight = row_coefficients(y != opts.ignore_index, rw, reduction, _acc(w))
        ctx.opts, ctx.backend, ctx.reduction = opts, backend, reduction
        empty = x.new_empty(0)
        if reduction != "none" and any(need) and be.caps.fused_forward_backward and not opts.entropy:
            pre = grad_buffers(x, w, b, *need)
            out = be.ce_forward_backward(x, w, b, y, opts, weight, pre)
            save_with_grads(ctx, pre, x, w, b)
        else:
            out = be.ce_forward(x, w, b, y, opts)
            save_with_grads(ctx, None, x, w, b, y, out.lse, weight, out.entropy if opts.entropy else empty)
        ent = out.entropy if opts.entropy else empty
        am = out.argmax if opts.argmax else empty.to(torch.int64)
        loss = (out.loss if rw is None else out.loss * weight) if reduction == "none" else (out.loss * weight).sum()
        lse = out.lse
        ctx.mark_non_differentiable(lse, am)
        return loss, lse, ent.to(lse.dtype), am

    @staticmethod
    @autocast_off
    def backward(ctx, g, g_lse, g_ent, g_am):
        nones = (None,) * 5
        g_ent = g_ent if ctx.opts.entropy else None
        if g is None and g_ent is None:
            return (None,) * 8
        saved, pre = saved_with_grads(ctx)
        if pre is not None:
            x, w, b = saved
            g = g.to(_acc(w))
            return cast_grad(pre.dx, x, g), cast_grad(pre.dw, w, g), cast_grad(pre.db, b, g), *nones
        x, w, b, y, lse, weight, ent = saved
        acc = _acc(w)
        if g is None:
            coef = torch.zeros_like(weight)
        else:
            coef = weight * (g.to(acc).reshape(-1) if ctx.reduction == "none" else g.to(acc))
        kw = {}
        if g_ent is not None:
            kw = dict(coef_entropy=g_ent.to(acc).reshape(-1).contiguous(), entropy=ent)
        grads = grad_buffers(x, w, b, *ctx.needs_input_grad[:3])
        backends.get(ctx.backend).ce_backward(x, w, b, y, lse, coef, ctx.opts, grads, **kw)
        return cast_grad(grads.dx, x), cast_grad(grads.dw, w), cast_grad(grads.db, b), *nones


def linear_cross_entropy_fused(x, w, b, y, reduction: str, opts: CEOptions, backend, rw=None):
    """``x [N, H]``, ``y [N]``: the fused CE with ``reduction`` (validated by the caller) → (loss, lse, entropy,
    argmax) (opts.entropy / opts.argmax say which extras the backend computes; lse always comes); ``rw [N]``
    optional per-row weights (token weights times class weights of the targets, docs/maths.md §11; no
    gradient)."""
    rw = None if rw is None else rw.detach()
    return _LinearCrossEntropy.apply(x, w, b, y, rw, reduction, opts, backend)


def row_coefficients(counted: Tensor, rw: Optional[Tensor], reduction: str, dtype: torch.dtype) -> Tensor:
    """Per-row weights of a reduction (docs/maths.md §3, §11): ``m = counted·rw`` (rw: token × class weights,
    None = 1); ``mean``: ``m / Σm`` (all zeros when ``Σm = 0``: a loss of 0 with zero gradients), else ``m``."""
    m = counted.to(dtype)
    if rw is not None:
        m = m * rw.to(dtype)
    if reduction != "mean":
        return m
    return m * mean_scale(m.sum())


# ------------------------------------------------------------------------------------ divergence


def _pair_grads(xp, xq, w, b, need_p: bool, need_q: bool, need_w: bool, need_b: bool, xu=None) -> PairGrads:
    """Out buffers of a pair gradient; ``xu`` (long-short's CE-only rows) gets a dx with the views' (need_p)."""
    g = grad_buffers(xp, w, b, need_p, need_w, need_b)
    dxu = None if xu is None else _empty_acc(xu, need_p)
    return PairGrads(dxp=g.dx, dxq=_empty_acc(xq, need_q), dxu=dxu, dw=g.dw, db=g.db)


class _LinearDivergence(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, xp, xq, w, b, sel, div_w, opts: PairOptions, backend, mode: str):
        be = backends.get(backend)
        rows = PairRows(contig(xp), contig(xq))
        w, b = contig(w), contig(b)
        need_p, need_q, need_w, need_b = ctx.needs_input_grad[:4]
        ctx.need = (need_p and opts.grad_p, need_q and opts.grad_q, need_w, need_b)
        ctx.opts, ctx.backend, ctx.mode = opts, backend, mode
        weight = div_w
        if mode == "weighted" and any(ctx.need) and be.caps.fused_forward_backward:
            pre = _pair_grads(rows.xp, rows.xq, w, b, *ctx.need)
            out = be.pair_forward_backward(rows, w, b, opts, PairCoefs(div=div_w), pre)
            save_with_grads(ctx, pre, rows.xp, rows.xq, w, b)
        else:
            out = be.pair_forward(rows, w, b, opts)
            save_with_grads(ctx, None, rows.xp, rows.xq, w, b, out.stats, weight)
        if mode == "none":
            return out.div * weight
        return (out.div * div_w).sum()

    @staticmethod
    @autocast_off
    def backward(ctx, g):
        nones = (None,) * 5
        if not any(ctx.need):
            return (None,) * 9
        saved, pre = saved_with_grads(ctx)
        if pre is not None:
            xp, xq, w, b = saved
            g = g.to(_acc(w))
            return cast_grad(pre.dxp, xp, g), cast_grad(pre.dxq, xq, g), cast_grad(pre.dw, w, g), cast_grad(pre.db, b, g), *nones
        xp, xq, w, b, stats, weight = saved
        coef = weight * (g.to(_acc(w)).reshape(-1) if ctx.mode == "none" else g.to(_acc(w)))
        grads = _pair_grads(xp, xq, w, b, *ctx.need)
        saved = PairOut(None, None, None, stats)
        backends.get(ctx.backend).pair_backward(PairRows(xp, xq), w, b, saved, PairCoefs(div=coef), ctx.opts, grads)
        return cast_grad(grads.dxp, xp), cast_grad(grads.dxq, xq), cast_grad(grads.dw, w), cast_grad(grads.db, b), *nones


def pair_loss_fused(xp, xq, w, b, yp, yq, sel, div_w, opts: PairOptions, backend, mode: str) -> Tensor:
    """The fused divergence of :func:`lsa_kernels.linear_divergence`.

    ``mode="weighted"``: returns ``Σ div_i · div_w_i``; ``mode="none"``: per-row ``div_i · div_w_i``
    (``div_w`` None: ``sel`` as 0/1; token weights enter through ``div_w``, docs/maths.md §11).
    """
    div_w = sel.to(_acc(w)) if div_w is None else div_w.detach().to(_acc(w))
    return _LinearDivergence.apply(xp, xq, w, b, sel, div_w, opts, backend, mode)


# ------------------------------------------------------------------------------------ long-short


def _split_views(hl: Tensor, hs: Tensor, l_extra: int):
    """(paired long rows, paired short rows, unpaired rows of both views) as contiguous [*, H] (§4: long row
    ``l_extra + i`` pairs with short row ``i``; the long view's first and the short view's last ``l_extra``
    rows have no partner)."""
    B, T, H = hl.shape
    xp = hl[:, l_extra:].reshape(-1, H).contiguous()
    xq = hs[:, : T - l_extra].reshape(-1, H).contiguous()
    xu = torch.cat([hl[:, :l_extra].reshape(-1, H), hs[:, T - l_extra :].reshape(-1, H)]).contiguous()
    return xp, xq, xu


def _merge_views(grads: PairGrads, B: int, T: int, l_extra: int, scale=None):
    """(d hidden_long, d hidden_short) ``[B, T, H]`` from the per-part dx (times ``scale``)."""
    dxp, dxq, dxu = grads.dxp, grads.dxq, grads.dxu
    H = dxp.shape[-1]
    n_u = B * l_extra
    dhl = torch.empty(B, T, H, dtype=dxp.dtype, device=dxp.device)
    dhs = torch.empty_like(dhl)
    dhl[:, l_extra:] = dxp.view(B, T - l_extra, H)
    dhl[:, :l_extra] = dxu[:n_u].view(B, l_extra, H)
    dhs[:, : T - l_extra] = dxq.view(B, T - l_extra, H)
    dhs[:, T - l_extra :] = dxu[n_u:].view(B, l_extra, H)
    if scale is not None:
        dhl.mul_(scale)
        dhs.mul_(scale)
    return dhl, dhs


def _ls_rows(hl, hs, yl, ys, sel, wl, ws, l_extra: int, opts: PairOptions, dtype):
    """(rows, (cp, cq, cu, dv)): the paired / unpaired rows of both views and each row's coefficient in ``ce`` /
    ``misalign`` (docs/maths.md §4, §11)."""
    xp, xq, xu = _split_views(hl, hs, l_extra)
    yp, yq, yu = (y.view(-1) for y in _split_views(yl.unsqueeze(-1), ys.unsqueeze(-1), l_extra))
    rows = PairRows(xp, xq, yp, yq, xu, yu)
    return rows, _ls_coefs(rows, opts.ce.ignore_index, sel.reshape(-1), wl, ws, l_extra, dtype)


def _longce(out: PairOut, rows: PairRows, cp: Tensor, ign: int, gamma: float) -> Tensor:
    """§13: the long row's CE coefficient × min(exp(ce_short − ce_long), γ) on paired valid rows, detached."""
    paired = (rows.yp != ign) & (rows.yq != ign)
    lsd = torch.where(paired, out.ce_q - out.ce_p, torch.zeros_like(out.ce_p))
    return cp * torch.where(paired, lsd.exp().clamp(max=gamma), torch.ones_like(lsd))


def _ls_backward_coefs(dv, cp, cq, cu, alpha: float, g_loss, g_ce, g_mis, like: Tensor, **entropy) -> PairCoefs:
    """The backend's coefficients for upstream gradients of (loss, ce, misalign) (None: no gradient);
    ``entropy``: PairCoefs' entropy / entropy_u."""
    acc = like.dtype
    zero = torch.zeros((), dtype=acc, device=like.device)
    gl = zero if g_loss is None else g_loss.to(acc)
    g_ce_tot = gl + (zero if g_ce is None else g_ce.to(acc))
    g_div_tot = alpha * gl + (zero if g_mis is None else g_mis.to(acc))
    return PairCoefs(dv * g_div_tot, cp * g_ce_tot, cq * g_ce_tot, cu * g_ce_tot, **entropy)


def _join_views(p: Tensor, q: Tensor, u: Tensor, B: int, T: int, l_extra: int):
    """(long [B, T], short [B, T]) from per-row values of the paired p, q rows and the unpaired rows (the
    inverse of :func:`_split_views` for one value per row)."""
    n_u = B * l_extra
    long = torch.empty(B, T, dtype=p.dtype, device=p.device)
    short = torch.empty_like(long)
    long[:, l_extra:] = p.view(B, T - l_extra)
    long[:, :l_extra] = u[:n_u].view(B, l_extra)
    short[:, : T - l_extra] = q.view(B, T - l_extra)
    short[:, T - l_extra :] = u[n_u:].view(B, l_extra)
    return long, short


class _LongShort(torch.autograd.Function):
    """The long-short loss (docs/maths.md §4) and its per-view per-token outputs (§4 per-view outputs): (loss, ce,
    misalign, lse_long, lse_short, entropy_long, entropy_short, argmax_long, argmax_short), the last six
    ``[B, T]``. lse and argmax carry no gradient; the entropies do (their coefficients go to the backend's
    ``coefs.entropy`` / ``coefs.entropy_u``). With the entropy or LongCE: forward then backward, like
    :class:`_LinearCrossEntropy` (their coefficients are known only in backward / after the forward); otherwise
    the gradient of ``loss`` is folded into the forward when the backend can (module docstring). Outputs not asked
    for are empty tensors."""

    @staticmethod
    @autocast_off
    def forward(ctx, hl, hs, w, b, yl, ys, sel, wl, ws, l_extra: int, alpha: float, opts: PairOptions, backend,
                longce_gamma: Optional[float]):
        ctx.set_materialize_grads(False)
        be = backends.get(backend)
        B, T, H = hl.shape
        w, b = contig(w), contig(b)
        rows, (cp, cq, cu, dv) = _ls_rows(hl, hs, yl, ys, sel, wl, ws, l_extra, opts, _acc(w))
        ctx.meta = (B, T, l_extra, alpha, opts, backend)
        need_l, need_s, need_w, need_b = ctx.needs_input_grad[:4]
        ctx.need = (need_l or need_s, need_w, need_b)
        pre = None
        if (not opts.ce.entropy and longce_gamma is None and any(ctx.need)
                and be.caps.fused_forward_backward):  # loss's gradient folded into the forward
            pre = _pair_grads(rows.xp, rows.xq, w, b, ctx.need[0], ctx.need[0], need_w, need_b, xu=rows.xu)
            out = be.pair_forward_backward(rows, w, b, opts, PairCoefs(alpha * dv, cp, cq, cu), pre)
        else:
            out = be.pair_forward(rows, w, b, opts)
            if longce_gamma is not None:
                cp = _longce(out, rows, cp, opts.ce.ignore_index, longce_gamma)

        def empty(dtype=hl.dtype):  # distinct tensors: an output may not alias another
            return hl.new_empty(0, dtype=dtype)

        if opts.ce.entropy:
            ent, ent_u = out.entropy, out.entropy_u
            ent_l, ent_s = _join_views(ent[:, 0], ent[:, 1], ent_u, B, T, l_extra)
        else:
            ent, ent_u, ent_l, ent_s = empty(), empty(), empty(), empty()
        save_with_grads(ctx, pre, rows.xp, rows.xq, rows.xu, w, b, rows.yp, rows.yq, rows.yu, cp, cq, cu, dv,
                        out.stats, out.lse_u, ent, ent_u)
        lse_l, lse_s = _join_views(out.stats[:, Stat.LSE_P], out.stats[:, Stat.LSE_Q], out.lse_u, B, T, l_extra)
        if opts.ce.argmax:
            am_l, am_s = _join_views(out.argmax[:, 0], out.argmax[:, 1], out.argmax_u, B, T, l_extra)
        else:
            am_l, am_s = empty(torch.int64), empty(torch.int64)
        ce = (out.ce_p * cp).sum() + (out.ce_q * cq).sum() + (out.ce_u * cu).sum()
        mis = (out.div * dv).sum()
        ctx.mark_non_differentiable(lse_l, lse_s, am_l, am_s)
        return ce + alpha * mis, ce, mis, lse_l, lse_s, ent_l.to(ce.dtype), ent_s.to(ce.dtype), am_l, am_s

    @staticmethod
    @autocast_off
    def backward(ctx, g_loss, g_ce, g_mis, g_lse_l, g_lse_s, g_ent_l, g_ent_s, g_am_l, g_am_s):
        B, T, l_extra, alpha, opts, backend = ctx.meta
        saved, pre = saved_with_grads(ctx)
        xp, xq, xu, w, b, yp, yq, yu, cp, cq, cu, dv, stats, lse_u, ent, ent_u = saved
        need_l, need_s, need_w, need_b = ctx.needs_input_grad[:4]
        g_ent_on = opts.ce.entropy and (g_ent_l is not None or g_ent_s is not None)
        if (g_loss is None and g_ce is None and g_mis is None and not g_ent_on) or not any(ctx.need):
            return (None,) * 14
        if pre is not None and g_ce is None and g_mis is None:  # the folded gradient of `loss`, scaled
            scale = g_loss.to(_acc(w))
            dhl, dhs = _merge_views(pre, B, T, l_extra, scale) if ctx.need[0] else (None, None)
            return (cast_grad(dhl, xp) if need_l else None, cast_grad(dhs, xp) if need_s else None,
                    cast_grad(pre.dw, w, scale), cast_grad(pre.db, b, scale), *(None,) * 10)
        acc = _acc(w)
        c_ent = c_ent_u = None
        if g_ent_on:
            zl = torch.zeros(B, T, dtype=acc, device=xp.device)
            el = zl if g_ent_l is None else g_ent_l.to(acc)
            es = zl if g_ent_s is None else g_ent_s.to(acc)
            ep, eq, eu = (t.reshape(-1) for t in _split_views(el.unsqueeze(-1), es.unsqueeze(-1), l_extra))
            c_ent, c_ent_u = torch.stack([ep, eq], 1).contiguous(), eu.contiguous()
        rows = PairRows(xp, xq, yp, yq, xu, yu)
        coefs = _ls_backward_coefs(dv, cp, cq, cu, alpha, g_loss, g_ce, g_mis, cp, entropy=c_ent, entropy_u=c_ent_u)
        need_x = need_l or need_s
        grads = _pair_grads(xp, xq, w, b, need_x, need_x, need_w, need_b, xu=xu)
        saved = PairOut(None, None, None, stats, None, lse_u, ent if g_ent_on else None, None,
                        ent_u if g_ent_on else None)
        backends.get(backend).pair_backward(rows, w, b, saved, coefs, opts, grads)
        dhl = dhs = None
        if need_x:
            dhl, dhs = _merge_views(grads, B, T, l_extra)
            dhl = dhl.to(xp.dtype) if need_l else None
            dhs = dhs.to(xp.dtype) if need_s else None
        return dhl, dhs, cast_grad(grads.dw, w), cast_grad(grads.db, b), *(None,) * 10


def _ls_coefs(rows: PairRows, ign: int, sel: Tensor, wl: Optional[Tensor], ws: Optional[Tensor], l_extra: int,
              dtype: torch.dtype):
    """(cp, cq, cu, dv): each CE row's weight in ``ce`` (valid × token weight / Σ of those over both views) and
    each pair's in ``misalign`` (selected × the LONG row's token weight / Σ of those), docs/maths.md §11."""
    valid = [(y != ign).to(dtype) for y in (rows.yp, rows.yq, rows.yu)]
    dsel = sel.to(dtype)
    if wl is not None or ws is not None:
        ones = torch.ones(rows.yp.shape[0] + rows.yu.shape[0] // 2, dtype=dtype, device=sel.device)
        B = rows.yu.shape[0] // (2 * l_extra)
        wl = ones.view(B, -1) if wl is None else wl.to(dtype)
        ws = ones.view(B, -1) if ws is None else ws.to(dtype)
        tw = [t.reshape(-1) for t in _split_views(wl.unsqueeze(-1), ws.unsqueeze(-1), l_extra)]
        valid = [v * t for v, t in zip(valid, tw)]
        dsel = dsel * tw[0]
    tot = sum(v.sum() for v in valid)
    c_ce = 1.0 / torch.where(tot > 0, tot, torch.ones_like(tot))
    dtot = dsel.sum()
    return (*(v * c_ce for v in valid), dsel / torch.where(dtot > 0, dtot, torch.ones_like(dtot)))


def long_short_fused(hl, hs, w, b, yl, ys, l_extra, alpha, sel, opts: PairOptions, backend, *, token_weight_long=None,
                     token_weight_short=None, longce_gamma: Optional[float] = None):
    """The fused :func:`lsa_kernels.long_short_loss` (validated by the caller): (loss, ce, misalign, lse_l, lse_s,
    ent_l, ent_s, argmax_l, argmax_s), the last six ``[B, T]`` per-view outputs (docs/maths.md §4);
    ``opts.ce.entropy`` / ``opts.ce.argmax`` say which extras the backend computes (the others are empty tensors;
    lse always comes, from the statistics). ``token_weight_*`` ``[B, T]`` (§11); ``longce_gamma``: LongCE
    weighting of the long view's paired CE rows (§13), forward then backward (its coefficients depend on the
    forward's values)."""
    wl = None if token_weight_long is None else token_weight_long.detach()
    ws = None if token_weight_short is None else token_weight_short.detach()
    return _LongShort.apply(hl, hs, w, b, yl, ys, sel, wl, ws, l_extra, alpha, opts, backend, longce_gamma)
