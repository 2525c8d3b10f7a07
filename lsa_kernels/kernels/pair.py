"""Launchers of the fused two-view loss: CE(p), CE(q) and the divergence D(p, q) (docs/maths.md §3, §5, §14).

The maths lives with the kernels; this module only schedules them:

    pair_forward     phase 1 (kernels/pair_phase1.py) → merge (kernels/merge.py) → for js, phase 2
                     (kernels/pair_js.py) with the merged lse_a, lse_b → D = maths.divergence_from_stats,
                     CE rows = maths.ce_row_loss
    pair_forward_ext pair_forward plus each view's entropy / argmax of z (τ = 1) from phase 1's same pass
                     (long-short's per-view outputs, docs/maths.md §4; merge.merge_extras per view)
    pair_js_partial  phase 2 alone for given normalisers (a vocab shard's share of js's X, Y)
    pair_backward    kernels/pair_bwd.py: the atomic kernel, or (deterministic) per row chunk the dz
                     kernel followed by torch GEMMs (kernels/deterministic.py)

Two heads (docs/maths.md §12, distillation: teacher = view p, student = view q): every launcher takes
``wq`` / ``bq`` keyword arguments; with ``wq`` view q's logits are ``x_q W_qᵀ + b_q`` (x_q [N, Hq], W_q
[V, Hq], the same V and dtype as view p's head), the backward sends view p's weight gradient to
``dw_out`` / ``db_out`` and view q's to ``dwq_out`` / ``dbq_out``. Without ``wq`` the kernels are the
one-head specialisations (TWO_HEADS=False). CE on one view only: ``yp=None`` (forward) and
``coef_ce_p=None`` (backward) drop view p's CE (``ce_p`` is zeros; CE_P=False), likewise for q; with
``detach="p"`` and no CE on p, no p-side gradient work is done at all (USE_GP=False). The per-view entropy's
gradient: ``pair_backward(..., coef_entropy=[N, 2], entropy=[N, 2])`` (HAS_ENTROPY; one head only).

Every launch runs with the tensors' device current (``on_tensor_device``). The kernels are looked up as
attributes of their modules at each call, so tests can replace one (``monkeypatch.setattr``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton

from ..maths import Divergence, Stat, divergence_from_stats
from ..options import N_PAIR_STATS, PairOptions
from . import deterministic as det
from . import pair_bwd as bwd
from . import pair_js as js
from . import pair_phase1 as phase1
from ._common import launch_options, on_tensor_device, pick_config, softcap_args, split_ranges, upcast_and_prec
from .merge import N_PAIR_PARTS, PairPart, ce_rows, merge_extras, pair_stats

# ----------------------------------------------------------------------------------------- heads


def _heads(xp, xq, w, b, wq, bq):
    """Pointer and size arguments of view q's head: (wq, bq, Hq, stride_wq, TWO_HEADS, HAS_BIAS_Q).
    One head: view p's (the kernels then compile exactly as without the argument). Raises on bad input."""
    if wq is None:
        if bq is not None:
            raise ValueError("bq is the bias of view q's own head: pass wq with it (or b for a shared head)")
        if xq.shape[1] != w.shape[1]:
            raise ValueError(f"xq has hidden size {xq.shape[1]} but w has {w.shape[1]}: pass view q's own "
                             "head as wq for different hidden sizes")
        bb = b if b is not None else w
        return w, bb, w.shape[1], w.stride(0), False, b is not None
    if wq.dim() != 2 or wq.shape[0] != w.shape[0]:
        raise ValueError(f"wq must be [V, Hq] with the V of w ({w.shape[0]}), got {tuple(wq.shape)}")
    if xq.dim() != 2 or xq.shape[1] != wq.shape[1]:
        raise ValueError(f"xq must be [N, Hq] with the Hq of wq ({wq.shape[1]}), got {tuple(xq.shape)}")
    if xq.shape[0] != xp.shape[0]:
        raise ValueError(f"xq has {xq.shape[0]} rows but xp has {xp.shape[0]}")
    if wq.dtype != xp.dtype or xq.dtype != xp.dtype:
        raise ValueError(f"wq and xq must have xp's dtype {xp.dtype} (got {wq.dtype}, {xq.dtype}): cast the "
                         "teacher's operands to the student's dtype first")
    if wq.device != w.device:
        raise ValueError(f"wq is on {wq.device} but w is on {w.device}")
    if bq is not None and (bq.shape != (w.shape[0],) or bq.dtype != xp.dtype):
        raise ValueError(f"bq must be [V] = [{w.shape[0]}] of dtype {xp.dtype}, got {tuple(bq.shape)} {bq.dtype}")
    return wq, (bq if bq is not None else wq), wq.shape[1], wq.stride(0), True, bq is not None


# ----------------------------------------------------------------------------------------- forward


def _forward_plan(xp, xq, w, b, wq, bq, opts: PairOptions, kind: str):
    """(grid, n_split, pointers after b, scalar args after the pointers, launch kwargs shared by both phases)."""
    N, H = xp.shape
    V = w.shape[0]
    wq_, bq_, Hq, stride_wq, two, has_bq = _heads(xp, xq, w, b, wq, bq)
    cfg = pick_config(kind, N, V, max(H, Hq), xp.device, xp.dtype)
    per, n_split = split_ranges(V, cfg.BLOCK_V, cfg.SPLIT_V)
    has_cap, cap, inv_cap = softcap_args(opts.softcap)
    upcast, prec = upcast_and_prec(xp.dtype)
    shared = dict(
        TEMP_ONE=float(opts.temperature) == 1.0, HAS_BIAS=b is not None, HAS_SOFTCAP=has_cap,
        TWO_HEADS=two, HAS_BIAS_Q=has_bq,
        UPCAST=upcast, DOT_PREC=prec, BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_H=cfg.BLOCK_H,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    dims = (N, V, H, Hq, xp.stride(0), xq.stride(0), w.stride(0), stride_wq, per, cap, inv_cap,
            1.0 / float(opts.temperature))
    return (triton.cdiv(N, cfg.BLOCK_N), n_split), n_split, (wq_, bq_), dims, shared


@on_tensor_device
def pair_js_partial(xp, xq, w, b, lset, opts: PairOptions, *, wq=None, bq=None) -> torch.Tensor:
    """``[N, 2]`` fp32: ``Σ_v p_v log(p_v/m_v)`` and ``Σ_v q_v log(q_v/m_v)`` over the rows of ``w``, with
    p = exp(a − lset[:, 0]), q = exp(b − lset[:, 1]) for GIVEN normalisers ``lset [N, 2]`` (js phase 2).

    With the lse of the whole vocabulary these are one vocab shard's share of js's X and Y
    (:mod:`lsa_kernels.distributed` sums them over the ranks). ``wq`` / ``bq``: view q's own head."""
    grid, n_split, qhead, dims, shared = _forward_plan(xp, xq, w, b, wq, bq, opts, "pair_js")
    N = dims[0]
    lset = lset.float().contiguous()
    part = torch.empty((n_split, N, js.N_JS_PARTS), device=xp.device, dtype=torch.float32)
    if N > 0:
        js.pair_js_kernel[grid](xp, xq, w, b if b is not None else w, *qhead, lset, part, *dims, **shared)
    return part.sum(0)


class PairForwardExt(NamedTuple):
    """:func:`pair_forward_ext`'s per-row outputs: those of :func:`pair_forward`, then the extras asked for
    (else None): each view's entropy of softmax(z) (fp32 [N, 2]) and argmax of z (int64 [N, 2]), columns p, q."""

    ce_p: torch.Tensor
    ce_q: torch.Tensor
    div: torch.Tensor
    stats: torch.Tensor
    entropy: Optional[torch.Tensor]
    argmax: Optional[torch.Tensor]


@on_tensor_device
def pair_forward(xp, xq, w, b, yp, yq, opts: PairOptions, *, wq=None, bq=None):
    """(ce_p [N], ce_q [N], div [N], stats [N, 8]), fp32 (see lsa_kernels.backends / lsa_kernels.maths).

    ``wq`` / ``bq``: view q's own head (module docstring). With ``opts.with_ce``, a view whose target is
    None gets no CE (zeros)."""
    return tuple(_pair_forward(xp, xq, w, b, yp, yq, opts, wq, bq, False, False)[:4])


@on_tensor_device
def pair_forward_ext(xp, xq, w, b, yp, yq, opts: PairOptions, *, entropy: bool = False,
                     argmax: bool = False) -> PairForwardExt:
    """:func:`pair_forward` plus, in phase 1's pass over V, each view's entropy of softmax(z) and / or argmax of
    z at temperature 1 (docs/maths.md §4 per-view outputs; one head). The entropy's gradient:
    ``pair_backward(..., coef_entropy=, entropy=)``."""
    return _pair_forward(xp, xq, w, b, yp, yq, opts, None, None, bool(entropy), bool(argmax))


def _pair_forward(xp, xq, w, b, yp, yq, opts: PairOptions, wq, bq, entropy: bool, argmax: bool) -> PairForwardExt:
    N = xp.shape[0]
    V = w.shape[0]
    dev = xp.device
    div = Divergence.of(opts.divergence)
    ce_p_on = bool(opts.with_ce) and yp is not None
    ce_q_on = bool(opts.with_ce) and yq is not None
    with_ce = ce_p_on or ce_q_on
    kind = "pair_fwd_ext" if (entropy or argmax) else "pair_fwd"  # the extras take their own block sizes
    grid, n_split, qhead, dims, shared = _forward_plan(xp, xq, w, b, wq, bq, opts, kind)
    part = torch.empty((n_split, N, N_PAIR_PARTS), device=dev, dtype=torch.float32)
    stats = torch.zeros((N, N_PAIR_STATS), device=dev, dtype=torch.float32)
    ent = torch.empty((n_split, N, 2), device=dev, dtype=torch.float32) if entropy else None
    am = torch.empty((n_split, N, 2), device=dev, dtype=torch.int32) if argmax else None
    if N > 0:
        yp_ptr = yp if ce_p_on else (yq if with_ce else part)  # a view without CE: its z_y is discarded
        yq_ptr = yq if ce_q_on else (yp if with_ce else part)
        phase1.pair_phase1_kernel[grid](
            xp, xq, w, b if b is not None else w, *qhead, yp_ptr, yq_ptr, part, ent if entropy else part,
            am if argmax else part, *dims,
            DIV=int(div), WITH_CE=with_ce, HAS_SMOOTHING=opts.ce.label_smoothing > 0, ENTROPY=entropy,
            ARGMAX=argmax, **shared,
        )
    pair_stats(part, div, float(opts.temperature) == 1.0, stats)
    if div == Divergence.JS:  # second pass with the final lse of a and b
        stats[:, Stat.X:Stat.Y + 1] = pair_js_partial(xp, xq, w, b, stats[:, Stat.LSET_P:Stat.LSET_Q + 1], opts,
                                                      wq=wq, bq=bq)
    d = divergence_from_stats(stats, div)
    c = opts.ce
    zeros = lambda: torch.zeros(N, device=dev, dtype=torch.float32)  # noqa: E731
    ce_p = ce_rows(stats[:, Stat.LSE_P], part[..., PairPart.ZY_P], part[..., PairPart.SZ_P], yp, V,
                   c.ignore_index, c.label_smoothing, c.z_loss) if ce_p_on else zeros()
    ce_q = ce_rows(stats[:, Stat.LSE_Q], part[..., PairPart.ZY_Q], part[..., PairPart.SZ_Q], yq, V,
                   c.ignore_index, c.label_smoothing, c.z_loss) if ce_q_on else zeros()
    h = idx = None
    if entropy or argmax:  # per view: the CE columns (m_z, s_z, ...) of PairPart are laid out as CEPart's
        views = [merge_extras(part[..., k:k + 4], stats[:, col], None if ent is None else ent[..., i],
                              None if am is None else am[..., i])
                 for i, (k, col) in enumerate(((PairPart.M_P, Stat.LSE_P), (PairPart.M_Q, Stat.LSE_Q)))]
        h = torch.stack([v[0] for v in views], 1) if entropy else None
        idx = torch.stack([v[1] for v in views], 1) if argmax else None
    return PairForwardExt(ce_p, ce_q, d, stats, h, idx)


# ----------------------------------------------------------------------------------------- backward


@on_tensor_device
def pair_backward(
    xp, xq, w, b, yp, yq, stats, coef_ce_p, coef_ce_q, coef_div, opts: PairOptions,
    dxp_out: Optional[torch.Tensor], dxq_out: Optional[torch.Tensor],
    dw_out: Optional[torch.Tensor], db_out: Optional[torch.Tensor],
    *, wq=None, bq=None, dwq_out: Optional[torch.Tensor] = None, dbq_out: Optional[torch.Tensor] = None,
    coef_entropy: Optional[torch.Tensor] = None, entropy: Optional[torch.Tensor] = None,
) -> None:
    """dx_p, dx_q ← (overwritten); dW, db += (see lsa_kernels.backends). With ``wq``: dw_out / db_out get view
    p's head's gradient and dwq_out / dbq_out view q's (accumulated). A view's CE term is on when
    ``opts.with_ce`` and its coefficient and target are given. With ``coef_entropy [N, 2]`` (and ``entropy [N,
    2]``, :func:`pair_forward_ext`'s) each view's dz also carries ``coef_entropy·∂H/∂z`` (one head only)."""
    N, H = xp.shape
    V = w.shape[0]
    if (coef_entropy is None) != (entropy is None):
        raise ValueError("coef_entropy and entropy go together: pass the forward's entropy with its coefficient")
    has_ent = coef_entropy is not None
    if has_ent:
        if wq is not None:
            raise ValueError("coef_entropy (per-view entropies) is not supported with a second head (wq)")
        for name, t in (("coef_entropy", coef_entropy), ("entropy", entropy)):
            if tuple(t.shape) != (N, 2):
                raise ValueError(f"{name} must be [N, 2] = [{N}, 2] (columns: view p, view q), got {tuple(t.shape)}")
        ent_buf = entropy.to(torch.float32).contiguous()
        cent_buf = coef_entropy.to(torch.float32).contiguous()
    wq_, bq_, Hq, stride_wq, two, has_bq = _heads(xp, xq, w, b, wq, bq)
    if not two and (dwq_out is not None or dbq_out is not None):
        raise ValueError("dwq_out / dbq_out are the gradients of view q's own head: pass wq (and bq)")
    if dwq_out is not None and (dwq_out.shape != wq_.shape or dwq_out.dtype != torch.float32):
        raise ValueError(f"dwq_out must be fp32 of wq's shape {tuple(wq_.shape)}, got {tuple(dwq_out.shape)} "
                         f"{dwq_out.dtype}")
    if dbq_out is not None and (dbq_out.shape != (V,) or dbq_out.dtype != torch.float32):
        raise ValueError(f"dbq_out must be fp32 [V] = [{V}], got {tuple(dbq_out.shape)} {dbq_out.dtype}")
    for d in (dxp_out, dxq_out):
        if d is not None:
            d.zero_()
    if db_out is not None and b is None:
        db_out = None
    if dbq_out is not None and not has_bq:
        dbq_out = None
    ce_p_on = bool(opts.with_ce) and coef_ce_p is not None and yp is not None
    ce_q_on = bool(opts.with_ce) and coef_ce_q is not None and yq is not None
    with_ce = ce_p_on or ce_q_on
    grad_p, grad_q = opts.grad_p, opts.grad_q
    use_gp, use_gq = ce_p_on or grad_p or has_ent, ce_q_on or grad_q or has_ent
    need_dxp = dxp_out is not None and use_gp
    need_dxq = dxq_out is not None and use_gq
    if two:
        need_dw, need_db = dw_out is not None and use_gp, db_out is not None and use_gp
        need_dwq, need_dbq = dwq_out is not None and use_gq, dbq_out is not None and use_gq
    else:
        need_dw = dw_out is not None and (use_gp or use_gq)
        need_db = db_out is not None and (use_gp or use_gq)
        need_dwq = need_dbq = False
    if N == 0 or not (need_dxp or need_dxq or need_dw or need_db or need_dwq or need_dbq):
        return
    stats = stats.to(torch.float32).contiguous()
    cd = coef_div.to(torch.float32).contiguous()
    cp = coef_ce_p.to(torch.float32).contiguous() if ce_p_on else cd
    cq = coef_ce_q.to(torch.float32).contiguous() if ce_q_on else cd
    ypp = yp if ce_p_on else cd
    yqp = yq if ce_q_on else cd
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
        CE_P=ce_p_on, CE_Q=ce_q_on, TWO_HEADS=two, HAS_BIAS_Q=has_bq, HAS_ENTROPY=has_ent,
    )
    bb = b if b is not None else w
    heads = (w, bb, wq_, bq_, H, Hq, stride_wq)
    ents = (ent_buf, cent_buf) if has_ent else (cd, cd)
    if opts.ce.deterministic:
        _pair_backward_gemm(xp, xq, heads, ypp, yqp, stats, cp, cq, cd, ents, opts, scal, flags,
                            dxp_out if need_dxp else None, dxq_out if need_dxq else None,
                            dw_out if need_dw else None, db_out if need_db else None,
                            dwq_out if need_dwq else None, dbq_out if need_dbq else None)
        return
    dummy = cd
    buf = lambda t: t if t is not None else dummy  # noqa: E731
    stride = lambda t: t.stride(0) if t is not None else 0  # noqa: E731
    cfg = pick_config("pair_bwd", N, V, max(H, Hq), xp.device, xp.dtype)
    grid = (triton.cdiv(N, cfg.BLOCK_N) * triton.cdiv(V, cfg.BLOCK_V),)
    bwd.pair_bwd_kernel[grid](
        xp, xq, w, bb, wq_, bq_, ypp, yqp, stats, cp, cq, cd, *ents,
        buf(dxp_out), buf(dxq_out), buf(dw_out), buf(db_out), buf(dwq_out), buf(dbq_out),
        N, V, H, Hq, xp.stride(0), xq.stride(0), w.stride(0), stride_wq,
        stride(dxp_out), stride(dxq_out), stride(dw_out), stride(dwq_out), *scal, **flags,
        NEED_DXP=need_dxp, NEED_DXQ=need_dxq, NEED_DW=need_dw, NEED_DB=need_db,
        NEED_DWQ=need_dwq, NEED_DBQ=need_dbq,
        BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_H=cfg.BLOCK_H, GROUP=cfg.GROUP,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _pair_backward_gemm(xp, xq, heads, ypp, yqp, stats, cp, cq, cd, ents, opts: PairOptions, scal, flags,
                        dxp_out, dxq_out, dw_out, db_out, dwq_out, dbq_out) -> None:
    """deterministic=True: per row chunk, pair_dz_kernel writes dz_p / dz_q (input dtype) into one buffer
    ([dz_p; dz_q] rows), then torch GEMMs: dx_p = dz_p W, dx_q = dz_q W, dW += [dz_p; dz_q]ᵀ [x_p; x_q]
    (one GEMM over both views), db += the kernel's fp32 column sums (docs/maths.md §14.3). Two heads:
    dx_q = dz_q W_q, dW_p += dz_pᵀ x_p, dW_q += dz_qᵀ x_q, db_p / db_q from separate column sums."""
    w, bb, wq, bq, H, Hq, stride_wq = heads
    two = flags["TWO_HEADS"]
    N = xp.shape[0]
    V = w.shape[0]
    use_gp, use_gq = flags["USE_GP"], flags["USE_GQ"]
    n_views = int(use_gp) + int(use_gq)
    cfg = pick_config("pair_dz", N, V, max(H, Hq), xp.device, xp.dtype)
    C = det.chunk_rows(N, V, n_views, xp.dtype, opts.ce.chunk_bytes)
    dz = torch.empty((n_views * C, V), device=xp.device, dtype=xp.dtype)
    n_blocks = triton.cdiv(C, cfg.BLOCK_N)
    need_db, need_dbq = db_out is not None, dbq_out is not None
    f32 = lambda: torch.empty((n_blocks, V), device=xp.device, dtype=torch.float32)  # noqa: E731
    dbpart = f32() if need_db else cd
    dbqpart = f32() if need_dbq else cd
    xcat = torch.empty((n_views * C, H), device=xp.device, dtype=xp.dtype) if (dw_out is not None and not two) \
        else None
    w_op = det.gemm_operand(w) if (dxp_out is not None or (dxq_out is not None and not two)) else None
    wq_op = det.gemm_operand(wq) if (dxq_out is not None and two) else w_op
    for r0 in range(0, N, C):
        n = min(C, N - r0)
        rows = slice(r0, r0 + n)
        dz_p = dz[:n] if use_gp else None
        dz_q = dz[n * int(use_gp): n * n_views] if use_gq else None
        grid = (triton.cdiv(n, cfg.BLOCK_N), triton.cdiv(V, cfg.BLOCK_V))
        bwd.pair_dz_kernel[grid](
            xp[rows], xq[rows], w, bb, wq, bq, ypp[rows], yqp[rows], stats[rows], cp[rows], cq[rows], cd[rows],
            *(e[rows] for e in ents), dz_p if dz_p is not None else dz, dz_q if dz_q is not None else dz,
            dbpart, dbqpart,
            n, V, H, Hq, xp.stride(0), xq.stride(0), w.stride(0), stride_wq, dz.stride(0), *scal, **flags,
            NEED_DB=need_db, NEED_DBQ=need_dbq,
            BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_H=cfg.BLOCK_H, **launch_options(cfg),
        )
        if dxp_out is not None:
            det.mm_into(dxp_out[rows], dz_p, w_op)
        if dxq_out is not None:
            det.mm_into(dxq_out[rows], dz_q, wq_op)
        if two:
            if dw_out is not None:
                det.addmm_into(dw_out, dz_p.t(), det.gemm_operand(xp[rows]))
            if dwq_out is not None:
                det.addmm_into(dwq_out, dz_q.t(), det.gemm_operand(xq[rows]))
        elif dw_out is not None:
            if use_gp:
                xcat[:n].copy_(xp[rows])
            if use_gq:
                xcat[n * int(use_gp): n * n_views].copy_(xq[rows])
            det.addmm_into(dw_out, dz[: n * n_views].t(), det.gemm_operand(xcat[: n * n_views]))
        if need_db:
            db_out += dbpart[: grid[0]].sum(0)
        if need_dbq:
            dbq_out += dbqpart[: grid[0]].sum(0)
