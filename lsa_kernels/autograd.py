"""Autograd Functions tying the backends (cpu, triton) to the public API.

Each Function takes its non-tensor options as one dataclass (:mod:`lsa_kernels.options`) and a
backend name, runs the backend's per-row forward, reduces, and in backward turns the upstream
gradient into per-row coefficients for the backend's backward (contract in :mod:`.backends`).

Gradient folded into the forward: for ``mean``/``sum`` reductions the per-row coefficients are known
before backward (up to the scalar upstream gradient), so a backend that offers
``*_forward_backward`` computes dX/dW in the same pass over the logits (one GEMM per view saved on the
CPU); backward then only scales them. When an auxiliary output (``ce``/``misalign`` of the long-short
loss) also receives a gradient, backward recomputes with the combined coefficients instead.
Nothing here syncs with the host: counts stay tensors.

Autocast: the public ops cast their operands to the autocast dtype themselves (:mod:`.functional`); the
Functions' forward and backward run with autocast OFF (:func:`_autocast_off`), so a backward called
inside an autocast region cannot turn the backends' fp32 accumulations (dW, db, statistics) into bf16 GEMMs.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch

from . import backends
from .options import CEOptions, PairOptions
from .pairing import LongShortLoss

Tensor = torch.Tensor


@contextlib.contextmanager
def _autocast_off_ctx():
    with contextlib.ExitStack() as stack:
        for dev in ("cpu", "cuda"):
            if torch.is_autocast_enabled(dev):
                stack.enter_context(torch.autocast(dev, enabled=False))
        yield


def _autocast_off(fn):
    """Run an autograd Function's forward / backward with autocast disabled (module docstring)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _autocast_off_ctx():
            return fn(*args, **kwargs)

    return wrapper


def _acc(x: Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _empty_acc(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=_acc(x), device=x.device)


def _grad_buffers(x: Tensor, w: Tensor, b: Optional[Tensor], need_x: bool, need_w: bool, need_b: bool):
    f32 = dict(dtype=_acc(x), device=x.device)
    dx = torch.empty(x.shape, **f32) if need_x else None
    dw = torch.zeros(w.shape, **f32) if need_w else None
    db = torch.zeros(w.shape[0], **f32) if (need_b and b is not None) else None
    return dx, dw, db


def _cast(g: Optional[Tensor], like: Optional[Tensor], scale=None) -> Optional[Tensor]:
    if g is None or like is None:
        return None
    if scale is not None:
        g = g * scale
    return g.to(like.dtype)


def _contig(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


# --------------------------------------------------------------------------------------------- CE


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    @_autocast_off
    def forward(ctx, x, w, b, y, reduction: str, opts: CEOptions, backend):
        be = backends.get(backend)
        x, w, b, y = _contig(x), _contig(w), _contig(b), _contig(y)
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        valid = (y != opts.ignore_index).to(_acc(w))
        ctx.opts, ctx.backend, ctx.reduction, ctx.pre = opts, backend, reduction, None
        if reduction == "none":
            loss_row, lse = be.ce_forward(x, w, b, y, opts)
            ctx.save_for_backward(x, w, b, y, lse)
            return loss_row.to(x.dtype)
        weight = valid / valid.sum().clamp(min=1.0) if reduction == "mean" else valid
        if (need_x or need_w or need_b) and hasattr(be, "ce_forward_backward"):
            dx, dw, db = _grad_buffers(x, w, b, need_x, need_w, need_b)
            loss_row, _ = be.ce_forward_backward(x, w, b, y, opts, weight, dx, dw, db)
            ctx.pre = (dx, dw, db)
            ctx.save_for_backward(x, w, b)
        else:
            loss_row, lse = be.ce_forward(x, w, b, y, opts)
            ctx.save_for_backward(x, w, b, y, lse, weight)
        return (loss_row * weight).sum().to(x.dtype)

    @staticmethod
    @_autocast_off
    def backward(ctx, g):
        if ctx.pre is not None:
            x, w, b = ctx.saved_tensors
            dx, dw, db = ctx.pre
            g = g.to(_acc(w))
            return _cast(dx, x, g), _cast(dw, w, g), _cast(db, b, g), None, None, None, None
        be = backends.get(ctx.backend)
        if ctx.reduction == "none":
            x, w, b, y, lse = ctx.saved_tensors
            coef = g.to(_acc(w)).reshape(-1) * (y != ctx.opts.ignore_index).to(_acc(w))
        else:
            x, w, b, y, lse, weight = ctx.saved_tensors
            coef = weight * g.to(_acc(w))
        dx, dw, db = _grad_buffers(x, w, b, *ctx.needs_input_grad[:3])
        be.ce_backward(x, w, b, y, lse, coef, ctx.opts, dx, dw, db)
        return _cast(dx, x), _cast(dw, w), _cast(db, b), None, None, None, None


def linear_cross_entropy_fused(x, w, b, y, reduction: str, opts: CEOptions, backend) -> Tensor:
    """``x [N, H]``, ``y [N]``: the fused CE with ``reduction`` (validated by the caller)."""
    return _LinearCrossEntropy.apply(x, w, b, y, reduction, opts, backend)


# ------------------------------------------------------------------------------------ divergence


class _LinearDivergence(torch.autograd.Function):
    @staticmethod
    @_autocast_off
    def forward(ctx, xp, xq, w, b, sel, div_w, opts: PairOptions, backend, mode: str):
        be = backends.get(backend)
        xp, xq, w, b = _contig(xp), _contig(xq), _contig(w), _contig(b)
        need_p, need_q, need_w, need_b = ctx.needs_input_grad[:4]
        need_p, need_q = need_p and opts.grad_p, need_q and opts.grad_q
        ctx.opts, ctx.backend, ctx.mode, ctx.pre = opts, backend, mode, None
        ctx.need = (need_p, need_q, need_w, need_b)
        sel_f = sel.to(_acc(w))
        if mode == "weighted" and any(ctx.need) and hasattr(be, "pair_forward_backward"):
            dxp, dw, db = _grad_buffers(xp, w, b, need_p, need_w, need_b)
            dxq = _empty_acc(xq) if need_q else None
            _, _, div, _ = be.pair_forward_backward(
                xp, xq, w, b, None, None, opts, None, None, div_w, dxp, dxq, dw, db
            )
            ctx.pre = (dxp, dxq, dw, db)
            ctx.save_for_backward(xp, xq, w, b)
        else:
            _, _, div, stats = be.pair_forward(xp, xq, w, b, None, None, opts)
            ctx.save_for_backward(xp, xq, w, b, stats, sel_f if mode == "none" else div_w)
        if mode == "none":
            return (div * sel_f).to(xp.dtype)
        return (div * div_w).sum().to(xp.dtype)

    @staticmethod
    @_autocast_off
    def backward(ctx, g):
        nones = (None,) * 5
        if ctx.pre is not None:
            xp, xq, w, b = ctx.saved_tensors
            dxp, dxq, dw, db = ctx.pre
            g = g.to(_acc(w))
            return _cast(dxp, xp, g), _cast(dxq, xq, g), _cast(dw, w, g), _cast(db, b, g), *nones
        xp, xq, w, b, stats, weight = ctx.saved_tensors
        need_p, need_q, need_w, need_b = ctx.need
        if not any(ctx.need):
            return (None,) * 9
        coef = weight * (g.to(_acc(w)).reshape(-1) if ctx.mode == "none" else g.to(_acc(w)))
        dxp, dw, db = _grad_buffers(xp, w, b, need_p, need_w, need_b)
        dxq = _empty_acc(xq) if need_q else None
        backends.get(ctx.backend).pair_backward(
            xp, xq, w, b, None, None, stats, None, None, coef, ctx.opts, dxp, dxq, dw, db
        )
        return _cast(dxp, xp), _cast(dxq, xq), _cast(dw, w), _cast(db, b), *nones


def pair_loss_fused(xp, xq, w, b, yp, yq, sel, div_w, opts: PairOptions, backend, mode: str) -> Tensor:
    """The fused divergence of :func:`lsa_kernels.linear_divergence`.

    ``mode="weighted"``: returns ``Σ div_i · div_w_i``; ``mode="none"``: per-row ``div_i · sel_i``.
    """
    if div_w is None:
        div_w = sel.to(_acc(w))
    return _LinearDivergence.apply(xp, xq, w, b, sel, div_w, opts, backend, mode)


# ------------------------------------------------------------------------------------ long-short


def _split_views(hl: Tensor, hs: Tensor, l_extra: int):
    """(paired long rows, paired short rows, unpaired rows of both views) as contiguous [*, H]."""
    B, T, H = hl.shape
    xp = hl[:, l_extra:].reshape(-1, H).contiguous()
    xq = hs[:, : T - l_extra].reshape(-1, H).contiguous()
    xu = torch.cat([hl[:, :l_extra].reshape(-1, H), hs[:, T - l_extra :].reshape(-1, H)]).contiguous()
    return xp, xq, xu


def _merge_views(dxp, dxq, dxu, B: int, T: int, l_extra: int):
    H = dxu.shape[-1]
    n_u = B * l_extra
    dhl = torch.empty(B, T, H, dtype=dxu.dtype, device=dxu.device)
    dhs = torch.empty_like(dhl)
    dhl[:, l_extra:] = dxp.view(B, T - l_extra, H)
    dhl[:, :l_extra] = dxu[:n_u].view(B, l_extra, H)
    dhs[:, : T - l_extra] = dxq.view(B, T - l_extra, H)
    dhs[:, T - l_extra :] = dxu[n_u:].view(B, l_extra, H)
    return dhl, dhs


class _LongShort(torch.autograd.Function):
    @staticmethod
    @_autocast_off
    def forward(ctx, hl, hs, w, b, yl, ys, sel, l_extra: int, alpha: float, opts: PairOptions, backend):
        ctx.set_materialize_grads(False)
        be = backends.get(backend)
        B, T, H = hl.shape
        w, b = _contig(w), _contig(b)
        ign = opts.ce.ignore_index
        xp, xq, xu = _split_views(hl, hs, l_extra)
        yp, yq, yu = _split_views(yl.unsqueeze(-1), ys.unsqueeze(-1), l_extra)
        yp, yq, yu = yp.view(-1), yq.view(-1), yu.view(-1)
        selp = sel.reshape(-1).to(_acc(w))
        n_valid = ((yl != ign).sum() + (ys != ign).sum()).to(_acc(w)).clamp(min=1.0)
        n_sel = selp.sum().clamp(min=1.0)
        # coefficients of the per-row CE and divergence in `loss` (ce/misalign are these without alpha)
        c_ce = 1.0 / n_valid
        c_div = 1.0 / n_sel
        need_l, need_s, need_w, need_b = ctx.needs_input_grad[:4]
        ctx.meta = (B, T, l_extra, alpha, opts, backend)
        ctx.need = (need_l or need_s, need_w, need_b)
        ctx.pre = None
        grads = (need_l or need_s or need_w or need_b) and hasattr(be, "pair_forward_backward")
        if grads:
            need_x = need_l or need_s
            dxp, dw, db = _grad_buffers(xp, w, b, need_x, need_w, need_b)
            dxq = _empty_acc(xq) if need_x else None
            dxu = _empty_acc(xu) if need_x else None
            vp, vq, vu = ((y != ign).to(_acc(w)) * c_ce for y in (yp, yq, yu))
            ce_p, ce_q, div, _ = be.pair_forward_backward(
                xp, xq, w, b, yp, yq, opts, vp, vq, selp * (alpha * c_div), dxp, dxq, dw, db
            )
            ce_u, _ = be.ce_forward_backward(xu, w, b, yu, opts.ce, vu, dxu, dw, db)
            ctx.pre = (dxp, dxq, dxu, dw, db)
            ctx.save_for_backward(xp, xq, xu, w, b, yp, yq, yu, selp, c_ce, c_div, None, None)
        else:
            ce_p, ce_q, div, stats = be.pair_forward(xp, xq, w, b, yp, yq, opts)
            ce_u, lse_u = be.ce_forward(xu, w, b, yu, opts.ce)
            ctx.save_for_backward(xp, xq, xu, w, b, yp, yq, yu, selp, c_ce, c_div, stats, lse_u)
        ce = (ce_p.sum() + ce_q.sum() + ce_u.sum()) * c_ce
        mis = (div * selp).sum() * c_div
        dt = hl.dtype
        return (ce + alpha * mis).to(dt), ce.to(dt), mis.to(dt)

    @staticmethod
    @_autocast_off
    def backward(ctx, g_loss, g_ce, g_mis):
        B, T, l_extra, alpha, opts, backend = ctx.meta
        xp, xq, xu, w, b, yp, yq, yu, selp, c_ce, c_div, stats, lse_u = ctx.saved_tensors
        need_x, need_w, need_b = ctx.need
        nones = (None,) * 7
        if g_loss is None and g_ce is None and g_mis is None:
            return (None,) * 11
        if ctx.pre is not None and g_ce is None and g_mis is None:
            dxp, dxq, dxu, dw, db = ctx.pre
            g = g_loss.to(_acc(w))
        else:
            be = backends.get(backend)
            zero = torch.zeros((), dtype=torch.float32, device=xp.device)
            gl = zero if g_loss is None else g_loss.to(_acc(w))
            g_ce_tot = gl + (zero if g_ce is None else g_ce.to(_acc(w)))
            g_div_tot = alpha * gl + (zero if g_mis is None else g_mis.to(_acc(w)))
            ign = opts.ce.ignore_index
            vp, vq, vu = ((y != ign).to(_acc(w)) * (c_ce * g_ce_tot) for y in (yp, yq, yu))
            cdiv = selp * (c_div * g_div_tot)
            dxp, dw, db = _grad_buffers(xp, w, b, need_x, need_w, need_b)
            dxq = _empty_acc(xq) if need_x else None
            dxu = _empty_acc(xu) if need_x else None
            if stats is None:  # the forward folded gradients for `loss` only: recompute statistics
                _, _, _, stats = be.pair_forward(xp, xq, w, b, yp, yq, opts)
                _, lse_u = be.ce_forward(xu, w, b, yu, opts.ce)
            be.pair_backward(xp, xq, w, b, yp, yq, stats, vp, vq, cdiv, opts, dxp, dxq, dw, db)
            be.ce_backward(xu, w, b, yu, lse_u, vu, opts.ce, dxu, dw, db)
            g = None
        dhl = dhs = None
        if need_x:
            dhl, dhs = _merge_views(dxp, dxq, dxu, B, T, l_extra)
            if g is not None:
                dhl, dhs = dhl.mul_(g), dhs.mul_(g)
            dt = xp.dtype
            dhl, dhs = dhl.to(dt), dhs.to(dt)
            dhl = dhl if ctx.needs_input_grad[0] else None
            dhs = dhs if ctx.needs_input_grad[1] else None
        return dhl, dhs, _cast(dw, w, g), _cast(db, b, g), *nones


def long_short_fused(hl, hs, w, b, yl, ys, l_extra, alpha, sel, opts: PairOptions, backend) -> LongShortLoss:
    """The fused :func:`lsa_kernels.long_short_loss` (validated by the caller)."""
    loss, ce, mis = _LongShort.apply(hl, hs, w, b, yl, ys, sel, l_extra, alpha, opts, backend)
    return LongShortLoss(loss, ce, mis)
