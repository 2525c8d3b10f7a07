"""Launchers of the fused two-view loss: CE(p), CE(q) and the divergence D(p, q) (docs/maths.md §3, §5, §14).

The maths lives with the kernels; this module only schedules them:

    pair_forward     phase 1 (kernels/pair_phase1.py) → merge (kernels/merge.py) → for js, phase 2
                     (kernels/pair_js.py) with the merged lse_a, lse_b → D = maths.divergence_from_stats,
                     CE rows = maths.ce_row_loss
    pair_js_partial  phase 2 alone for given normalisers (a vocab shard's share of js's X, Y)
    pair_backward    kernels/pair_bwd.py: the atomic kernel, or (deterministic) per row chunk the dz
                     kernel followed by torch GEMMs (kernels/deterministic.py)

Every launch runs with the tensors' device current (``on_tensor_device``). The kernels are looked up as
attributes of their modules at each call, so tests can replace one (``monkeypatch.setattr``).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton

from ..maths import Divergence, Stat, divergence_from_stats
from ..options import N_PAIR_STATS, PairOptions
from . import deterministic as det
from . import pair_bwd as bwd
from . import pair_js as js
from . import pair_phase1 as phase1
from ._common import on_tensor_device, pick_config, softcap_args, split_ranges, upcast_and_prec
from .merge import N_PAIR_PARTS, PairPart, ce_rows, pair_stats

# ----------------------------------------------------------------------------------------- forward


def _forward_plan(xp, w, b, opts: PairOptions, kind: str):
    """(cfg, grid, n_split, scalar args after the pointers, launch kwargs shared by both phases)."""
    N, H = xp.shape
    V = w.shape[0]
    cfg = pick_config(kind, N, V, H, xp.device, xp.dtype)
    per, n_split = split_ranges(V, cfg.BLOCK_V, cfg.SPLIT_V)
    has_cap, cap, inv_cap = softcap_args(opts.softcap)
    upcast, prec = upcast_and_prec(xp.dtype)
    shared = dict(
        TEMP_ONE=float(opts.temperature) == 1.0, HAS_BIAS=b is not None, HAS_SOFTCAP=has_cap,
        UPCAST=upcast, DOT_PREC=prec, BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_H=cfg.BLOCK_H,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return (triton.cdiv(N, cfg.BLOCK_N), n_split), n_split, (N, V, H, per, cap, inv_cap), shared


@on_tensor_device
def pair_js_partial(xp, xq, w, b, lset, opts: PairOptions) -> torch.Tensor:
    """``[N, 2]`` fp32: ``Σ_v p_v log(p_v/m_v)`` and ``Σ_v q_v log(q_v/m_v)`` over the rows of ``w``, with
    p = exp(a − lset[:, 0]), q = exp(b − lset[:, 1]) for GIVEN normalisers ``lset [N, 2]`` (js phase 2).

    With the lse of the whole vocabulary these are one vocab shard's share of js's X and Y
    (:mod:`lsa_kernels.distributed` sums them over the ranks)."""
    grid, n_split, (N, V, H, per, cap, inv_cap), shared = _forward_plan(xp, w, b, opts, "pair_js")
    lset = lset.float().contiguous()
    part = torch.empty((n_split, N, js.N_JS_PARTS), device=xp.device, dtype=torch.float32)
    if N > 0:
        js.pair_js_kernel[grid](
            xp, xq, w, b if b is not None else w, lset, part,
            N, V, H, xp.stride(0), xq.stride(0), w.stride(0), per, cap, inv_cap, 1.0 / float(opts.temperature),
            **shared,
        )
    return part.sum(0)


@on_tensor_device
def pair_forward(xp, xq, w, b, yp, yq, opts: PairOptions):
    """(ce_p [N], ce_q [N], div [N], stats [N, 8]), fp32 (see lsa_kernels.backends / lsa_kernels.maths)."""
    N = xp.shape[0]
    V = w.shape[0]
    dev = xp.device
    div = Divergence.of(opts.divergence)
    with_ce = bool(opts.with_ce)
    grid, n_split, (_, _, H, per, cap, inv_cap), shared = _forward_plan(xp, w, b, opts, "pair_fwd")
    part = torch.empty((n_split, N, N_PAIR_PARTS), device=dev, dtype=torch.float32)
    stats = torch.zeros((N, N_PAIR_STATS), device=dev, dtype=torch.float32)
    if N > 0:
        phase1.pair_phase1_kernel[grid](
            xp, xq, w, b if b is not None else w, yp if with_ce else part, yq if with_ce else part, part,
            N, V, H, xp.stride(0), xq.stride(0), w.stride(0), per, cap, inv_cap, 1.0 / float(opts.temperature),
            DIV=int(div), WITH_CE=with_ce, HAS_SMOOTHING=opts.ce.label_smoothing > 0, **shared,
        )
    pair_stats(part, div, float(opts.temperature) == 1.0, stats)
    if div == Divergence.JS:  # second pass with the final lse of a and b
        stats[:, Stat.X:Stat.Y + 1] = pair_js_partial(xp, xq, w, b, stats[:, Stat.LSET_P:Stat.LSET_Q + 1], opts)
    d = divergence_from_stats(stats, div)
    if with_ce:
        c = opts.ce
        ce_p = ce_rows(stats[:, Stat.LSE_P], part[..., PairPart.ZY_P], part[..., PairPart.SZ_P], yp, V,
                       c.ignore_index, c.label_smoothing, c.z_loss)
        ce_q = ce_rows(stats[:, Stat.LSE_Q], part[..., PairPart.ZY_Q], part[..., PairPart.SZ_Q], yq, V,
                       c.ignore_index, c.label_smoothing, c.z_loss)
    else:
        ce_p = torch.zeros(N, device=dev, dtype=torch.float32)
        ce_q = torch.zeros(N, device=dev, dtype=torch.float32)
    return ce_p, ce_q, d, stats


# ----------------------------------------------------------------------------------------- backward


@on_tensor_device
def pair_backward(
    xp, xq, w, b, yp, yq, stats, coef_ce_p, coef_ce_q, coef_div, opts: PairOptions,
    dxp_out: Optional[torch.Tensor], dxq_out: Optional[torch.Tensor],
    dw_out: Optional[torch.Tensor], db_out: Optional[torch.Tensor],
) -> None:
    """dx_p, dx_q ← (overwritten); dW, db += (see lsa_kernels.backends)."""
    N, H = xp.shape
    V = w.shape[0]
    for d in (dxp_out, dxq_out):
        if d is not None:
            d.zero_()
    if db_out is not None and b is None:
        db_out = None
    with_ce = bool(opts.with_ce) and coef_ce_p is not None and coef_ce_q is not None
    grad_p, grad_q = opts.grad_p, opts.grad_q
    use_gp, use_gq = with_ce or grad_p, with_ce or grad_q
    need_dxp = dxp_out is not None and use_gp
    need_dxq = dxq_out is not None and use_gq
    need_dw = dw_out is not None and (use_gp or use_gq)
    need_db = db_out is not None and (use_gp or use_gq)
    if N == 0 or not (need_dxp or need_dxq or need_dw or need_db):
        return
    stats = stats.to(torch.float32).contiguous()
    cd = coef_div.to(torch.float32).contiguous()
    cp = coef_ce_p.to(torch.float32).contiguous() if with_ce else cd
    cq = coef_ce_q.to(torch.float32).contiguous() if with_ce else cd
    ypp = yp if with_ce else cd
    yqp = yq if with_ce else cd
    has_cap, cap, inv_cap = softcap_args(opts.softcap)
    upcast, prec = upcast_and_prec(xp.dtype)
    eps = float(opts.ce.label_smoothing)
    temp = float(opts.temperature)
    scal = (stats.stride(0), opts.ce.ignore_index, cap, inv_cap, 1.0 / temp, 1.0 - eps,
            eps / (opts.ce.vocab_total or V), 2.0 * float(opts.ce.z_loss))
    flags = dict(
        DIV=int(Divergence.of(opts.divergence)), TEMP_ONE=temp == 1.0, GRAD_P=grad_p, GRAD_Q=grad_q,
        WITH_CE=with_ce, HAS_BIAS=b is not None, HAS_SOFTCAP=has_cap, HAS_SMOOTHING=eps > 0,
        HAS_ZLOSS=opts.ce.z_loss > 0, UPCAST=upcast, DOT_PREC=prec, USE_GP=use_gp, USE_GQ=use_gq,
    )
    bb = b if b is not None else w
    if opts.ce.deterministic:
        _pair_backward_gemm(xp, xq, w, bb, ypp, yqp, stats, cp, cq, cd, opts, scal, flags,
                            dxp_out if need_dxp else None, dxq_out if need_dxq else None,
                            dw_out if need_dw else None, db_out if need_db else None)
        return
    dummy = cd
    cfg = pick_config("pair_bwd", N, V, H, xp.device, xp.dtype)
    grid = (triton.cdiv(N, cfg.BLOCK_N) * triton.cdiv(V, cfg.BLOCK_V),)
    bwd.pair_bwd_kernel[grid](
        xp, xq, w, bb, ypp, yqp, stats, cp, cq, cd,
        dxp_out if dxp_out is not None else dummy, dxq_out if dxq_out is not None else dummy,
        dw_out if dw_out is not None else dummy, db_out if db_out is not None else dummy,
        N, V, H, xp.stride(0), xq.stride(0), w.stride(0),
        dxp_out.stride(0) if dxp_out is not None else 0, dxq_out.stride(0) if dxq_out is not None else 0,
        dw_out.stride(0) if dw_out is not None else 0, *scal, **flags,
        NEED_DXP=need_dxp, NEED_DXQ=need_dxq, NEED_DW=need_dw, NEED_DB=need_db,
        BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_H=cfg.BLOCK_H, GROUP=cfg.GROUP,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _pair_backward_gemm(xp, xq, w, bb, ypp, yqp, stats, cp, cq, cd, opts: PairOptions, scal, flags,
                        dxp_out, dxq_out, dw_out, db_out) -> None:
    """deterministic=True: per row chunk, pair_dz_kernel writes dz_p / dz_q (input dtype) into one buffer
    ([dz_p; dz_q] rows), then torch GEMMs: dx_p = dz_p W, dx_q = dz_q W, dW += [dz_p; dz_q]ᵀ [x_p; x_q]
    (one GEMM over both views), db += the kernel's fp32 column sums (docs/maths.md §14.3)."""
    N, H = xp.shape
    V = w.shape[0]
    use_gp, use_gq = flags["USE_GP"], flags["USE_GQ"]
    n_views = int(use_gp) + int(use_gq)
    cfg = pick_config("pair_dz", N, V, H, xp.device, xp.dtype)
    C = det.chunk_rows(N, V, n_views, xp.dtype, opts.ce.chunk_bytes)
    dz = torch.empty((n_views * C, V), device=xp.device, dtype=xp.dtype)
    need_db = db_out is not None
    dbpart = torch.empty((triton.cdiv(C, cfg.BLOCK_N), V), device=xp.device, dtype=torch.float32) if need_db else cd
    xcat = torch.empty((n_views * C, H), device=xp.device, dtype=xp.dtype) if dw_out is not None else None
    w_op = det.gemm_operand(w) if (dxp_out is not None or dxq_out is not None) else None
    for r0 in range(0, N, C):
        n = min(C, N - r0)
        rows = slice(r0, r0 + n)
        dz_p = dz[:n] if use_gp else None
        dz_q = dz[n * int(use_gp): n * n_views] if use_gq else None
        grid = (triton.cdiv(n, cfg.BLOCK_N), triton.cdiv(V, cfg.BLOCK_V))
        bwd.pair_dz_kernel[grid](
            xp[rows], xq[rows], w, bb, ypp[rows], yqp[rows], stats[rows], cp[rows], cq[rows], cd[rows],
            dz_p if dz_p is not None else dz, dz_q if dz_q is not None else dz, dbpart,
            n, V, H, xp.stride(0), xq.stride(0), w.stride(0), dz.stride(0), *scal, **flags, NEED_DB=need_db,
            BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_H=cfg.BLOCK_H,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if dxp_out is not None:
            det.mm_into(dxp_out[rows], dz_p, w_op)
        if dxq_out is not None:
            det.mm_into(dxq_out[rows], dz_q, w_op)
        if dw_out is not None:
            if use_gp:
                xcat[:n].copy_(xp[rows])
            if use_gq:
                xcat[n * int(use_gp): n * n_views].copy_(xq[rows])
            det.addmm_into(dw_out, dz[: n * n_views].t(), det.gemm_operand(xcat[: n * n_views]))
        if need_db:
            db_out += dbpart[: grid[0]].sum(0)
