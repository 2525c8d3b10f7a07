"""Fused knowledge distillation between two heads: ``linear_distillation`` (docs/maths.md §12).

A student with hidden states ``h_s [N, H_s]`` and head ``W_s [V, H_s]`` (+ ``b_s``), a teacher with ``h_t [N, H_t]``
and ``W_t [V, H_t]`` (+ ``b_t``), one vocabulary:

    z_s = softcap(h_s W_sᵀ + b_s),  z_t = softcap(h_t W_tᵀ + b_t)
    q = softmax(z_s/τ) (student),   p = softmax(z_t/τ) (teacher)
    hard_i = CE(z_s,i, y_i)                          (docs/maths.md §3; 0 on ignored rows / without target)
    soft_i = s · D(p_i, q_i),  s = τ² (temperature_scaling) or 1        (D: docs/maths.md §5, teacher = view p)
    loss   = hard_loss_weight · hard + soft_loss_weight · soft

Gradients (§5 with the chain rule's 1/τ, §3 for the CE):

    ∂loss/∂z_s = c_hard,i · w_hard · ∂CE/∂z_s + c_soft,i · w_soft · s/τ · ∂D/∂b     (b = z_s/τ)
    ∂loss/∂z_t = c_soft,i · w_soft · s/τ · ∂D/∂a                                     (train_teacher only)
    ∂/∂h = ∂z · W,  ∂/∂W = ∂zᵀ h,  ∂/∂b = Σ_rows ∂z           (each head its own)

with ``c_*,i`` the reduction's weight of row i (``mean``: 1/count over the rows that count, ``sum``: 1,
``none``: the upstream gradient of row i). It runs as the two-view pair op of the backends with the teacher
as view p (``w``/``b``) and the student as view q (the second head ``wq``/``bq`` of
:mod:`lsa_kernels.backends.contract`): one pass over V per row tile, each tile of both heads' logits formed
once; the teacher frozen is ``detach="p"`` with no CE on p, so no teacher gradient is formed at all.

Its non-tensor arguments travel as one :class:`~lsa_kernels.options.DistillationArgs`; autocast, the backend
choice and the vocab-parallel wrap are :mod:`lsa_kernels.dispatch`'s, as for every op; the autograd Function
over the backends' second-head calls is its own.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _checks, backends, dispatch, reference
from .autograd import save_with_grads, saved_with_grads
from .backends import PairCoefs, PairGrads, PairOut, PairRows
from .dispatch import autocast_off
from .maths import IGNORE_INDEX, acc_dtype, mean_scale
from .options import DistillationArgs, PairOptions
from .outputs import DistillationLoss

Tensor = torch.Tensor

__all__ = ["DistillationLoss", "linear_distillation"]

_acc = acc_dtype  # lsa_kernels.maths


# ------------------------------------------------------------------------------------------ autograd


class _Distill(torch.autograd.Function):
    """Inputs: student ``xs [N, Hs], ws, bs``, teacher ``xt [N, Ht], wt, bt`` (teacher detached unless
    trained), ``y [N]`` or None. Forward: per-row CE and divergence from the backend's pair op (teacher =
    view p, student = view q with its own head), reduced. Backward: per-row coefficients, as in
    :mod:`lsa_kernels.autograd` (the gradient is folded into the forward when the backend can and only
    ``loss`` gets a gradient)."""

    @staticmethod
    @autocast_off
    def forward(ctx, xs, ws, bs, xt, wt, bt, y, rw, hard_w: float, soft_w: float, scale: float, reduction: str,
                opts: PairOptions, backend):
        ctx.set_materialize_grads(False)
        be = backends.get(backend)
        acc = _acc(xs)
        N = xs.shape[0]
        rows = PairRows(xt, xs, None, y)
        valid = (y != opts.ce.ignore_index).to(acc) if y is not None else torch.ones(N, dtype=acc, device=xs.device)
        if rw is not None:  # token weights (docs/maths.md §11): a row counts rw_i times in both terms
            valid = valid * rw.to(acc)
        if reduction == "mean":
            c = mean_scale(valid.sum())
        else:
            c = torch.ones((), dtype=acc, device=xs.device)
        need_s = ctx.needs_input_grad[:3]
        need_t = ctx.needs_input_grad[3:6]
        ctx.need = (need_s, need_t)
        ctx.meta = (hard_w, soft_w, scale, reduction, opts, backend)
        pre = None
        has_y = y is not None
        if reduction != "none" and (any(need_s) or any(need_t)) and be.caps.fused_forward_backward:
            pre = _grads(xs, ws, bs, xt, wt, bt, need_s, need_t)
            coefs = _coefs(valid, has_y, c * hard_w, c * (soft_w * scale))
            out = be.pair_forward_backward(rows, wt, bt, opts, coefs, pre, wq=ws, bq=bs)
        else:
            out = be.pair_forward(rows, wt, bt, opts, wq=ws, bq=bs)
        save_with_grads(ctx, pre, xs, ws, bs, xt, wt, bt, y, valid, c, out.stats)
        hard_rows = (out.ce_q if rw is None else out.ce_q * rw.to(acc)) if has_y else torch.zeros(N, dtype=acc, device=xs.device)
        soft_rows = out.div * valid * scale
        if reduction == "none":
            hard, soft = hard_rows, soft_rows
        else:
            hard, soft = hard_rows.sum() * c, soft_rows.sum() * c
        return hard_w * hard + soft_w * soft, hard, soft

    @staticmethod
    @autocast_off
    def backward(ctx, g_loss, g_hard, g_soft):
        hard_w, soft_w, scale, reduction, opts, backend = ctx.meta
        (xs, ws, bs, xt, wt, bt, y, valid, c, stats), pre = saved_with_grads(ctx)
        need_s, need_t = ctx.need
        nones = (None,) * 8
        if g_loss is None and g_hard is None and g_soft is None:
            return (None,) * 6 + nones
        acc = _acc(xs)
        if pre is not None and g_hard is None and g_soft is None:
            grads, sc = pre, g_loss.to(acc)
        else:
            zero = torch.zeros((), dtype=acc, device=xs.device)
            gl = zero if g_loss is None else g_loss.to(acc)
            gh = hard_w * gl + (zero if g_hard is None else g_hard.to(acc))
            gs = soft_w * gl + (zero if g_soft is None else g_soft.to(acc))
            grads, sc = _grads(xs, ws, bs, xt, wt, bt, need_s, need_t), None
            coefs = _coefs(valid, y is not None, c * gh, c * gs * scale)
            saved = PairOut(None, None, None, stats)
            backends.get(backend).pair_backward(PairRows(xt, xs, None, y), wt, bt, saved, coefs, opts, grads,
                                                wq=ws, bq=bs)

        def cast(g, like):
            if g is None or like is None:
                return None
            return (g * sc if sc is not None else g).to(like.dtype)

        return (cast(grads.dxq, xs), cast(grads.dwq, ws), cast(grads.dbq, bs),
                cast(grads.dxp, xt), cast(grads.dw, wt), cast(grads.db, bt), *nones)


def _grads(xs, ws, bs, xt, wt, bt, need_s, need_t) -> PairGrads:
    """Out buffers: student = view q (``dxq``, ``dwq``, ``dbq``), teacher = view p (``dxp``, ``dw``, ``db``)."""
    f = dict(dtype=_acc(xs), device=xs.device)
    return PairGrads(
        dxp=torch.empty(xt.shape, **f) if need_t[0] else None,
        dxq=torch.empty(xs.shape, **f) if need_s[0] else None,
        dw=torch.zeros(wt.shape, **f) if need_t[1] else None,
        db=torch.zeros(wt.shape[0], **f) if (need_t[2] and bt is not None) else None,
        dwq=torch.zeros(ws.shape, **f) if need_s[1] else None,
        dbq=torch.zeros(ws.shape[0], **f) if (need_s[2] and bs is not None) else None,
    )


def _coefs(valid: Tensor, has_y: bool, c_hard: Tensor, c_soft: Tensor) -> PairCoefs:
    """Per-row coefficients: the student's CE on valid rows (view q), the divergence on the rows that count."""
    return PairCoefs(div=valid * c_soft, ce_p=None, ce_q=valid * c_hard if has_y else None)


# ------------------------------------------------------------------------------------------ public op


@dispatch.op("student_input", "student_weight", "student_bias", "teacher_input", "teacher_weight", "teacher_bias")
def linear_distillation(
    student_input: Tensor,
    student_weight: Tensor,
    teacher_input: Tensor,
    teacher_weight: Tensor,
    target: Optional[Tensor] = None,
    *,
    divergence: str = "kl",
    temperature: float = 1.0,
    hard_loss_weight: float = 0.0,
    soft_loss_weight: float = 1.0,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    softcap: Optional[float] = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    temperature_scaling: bool = True,
    train_teacher: bool = False,
    chunk_bytes: Optional[int] = None,
    deterministic: bool = False,
    backend: str = "auto",
    check_targets: bool = True,
    process_group=None,
    vocab_start: int = 0,
    token_weight: Optional[Tensor] = None,
) -> DistillationLoss:
    """Knowledge distillation from a teacher head to a student head, fused: no ``[N, V]`` logits in memory.

    ``student_input [..., Hs]`` with ``student_weight [V, Hs]`` (+ ``student_bias [V]``), ``teacher_input
    [..., Ht]`` with ``teacher_weight [V, Ht]`` (+ ``teacher_bias [V]``): the hidden sizes may differ, V and
    the leading (row) dims must match. Logits ``z = softcap(h Wᵀ + b)`` for each; ``q = softmax(z_s/τ)``
    (student), ``p = softmax(z_t/τ)`` (teacher) (docs/maths.md §12):

        loss = hard_loss_weight · CE(z_s, target) + soft_loss_weight · τ² · D(p, q)

    ``divergence`` (docs/maths.md §5, teacher = p): ``"kl"`` (default) = KL(teacher ‖ student), the usual
    forward KD; ``"kl_reverse"`` = KL(student ‖ teacher); ``"sym_kl"`` = the sum of both; ``"sce"`` =
    CE(p, q) + CE(q, p) (symmetric); ``"js"`` = Jensen-Shannon with m = (p + q)/2 (symmetric).
    ``temperature_scaling=True`` multiplies the soft term by τ² (Hinton et al.; keeps its gradient scale
    independent of τ); False leaves D unscaled. The CE term is at temperature 1.

    Rows that count: without ``target`` every row is in the soft term and there is no hard term
    (``hard_loss_weight > 0`` then raises); with ``target`` (the rows' shape, integer, already aligned: no
    shift) only rows whose target is not ``ignore_index`` count, in BOTH terms. ``reduction="mean"`` divides
    each term by the number of rows that count (0 with zero gradients when none), ``"sum"`` adds them,
    ``"none"`` returns per-row values of the rows' shape (0 on rows that do not count). ``token_weight``
    (float, the rows' shape, >= 0, no gradient): row i counts ``token_weight_i`` times in both terms (``mean``
    divides by the total weight of the rows that count; 0 with zero gradients when it is 0; docs/maths.md §11).

    The teacher is frozen by default: its inputs are detached and no teacher gradient is computed or stored
    (its logits are recomputed per tile, nothing else). ``train_teacher=True`` sends the gradient of the
    soft term to ``teacher_input`` / ``teacher_weight`` / ``teacher_bias`` as well.

    dtypes: the teacher's operands are cast to the student's dtype before the op (a bf16 student rounds an
    fp32 teacher's hidden states and head to bf16; a gradient to the teacher comes back through the cast in
    the teacher's dtype); the student's input, weight and bias must share one dtype. Statistics and
    accumulation are fp32 (fp64 for fp64 inputs). Honours autocast like ``F.linear``.

    ``backend``: ``"auto"`` (Triton on CUDA, the chunked cpu path on CPU), ``"cpu"``, ``"triton"``, or
    ``"reference"`` (materialised logits, small problems only). ``chunk_bytes`` bounds the cpu backend's
    logits buffer; ``deterministic`` as in :func:`lsa_kernels.linear_cross_entropy`;
    ``check_targets=False`` skips the host sync of the target range check. ``process_group`` /
    ``vocab_start``: both weights (and biases) are this rank's shards ``W[vocab_start : vocab_start + V_r]`` of
    vocab-parallel heads split the same way (:mod:`lsa_kernels.backends.vocab_parallel`); targets are global ids.

    Returns :class:`DistillationLoss` ``(loss, hard, soft)`` with ``soft`` the τ²-scaled term (each
    differentiable; ``loss = hard_loss_weight·hard + soft_loss_weight·soft``).
    """
    opts = DistillationArgs(
        divergence=divergence, temperature=temperature, hard_loss_weight=hard_loss_weight,
        soft_loss_weight=soft_loss_weight, softcap=softcap, ignore_index=ignore_index, reduction=reduction,
        temperature_scaling=temperature_scaling, train_teacher=train_teacher, chunk_bytes=chunk_bytes,
        deterministic=deterministic, backend=backend, check_targets=check_targets, process_group=process_group,
        vocab_start=vocab_start,
    )
    xs, ws, bs, xt, wt, bt = student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias
    target = _checks.index_target(target)
    _checks.check_distillation(xs, ws, xt, wt, target, opts, student_bias=bs, teacher_bias=bt,
                               token_weight=token_weight)
    rw = None if token_weight is None else token_weight.detach().reshape(-1)
    if not train_teacher:
        xt, wt = xt.detach(), wt.detach()
        bt = None if bt is None else bt.detach()
    dt = xs.dtype
    xt, wt = xt.to(dt), wt.to(dt)
    bt = None if bt is None else bt.to(dt)
    be = dispatch.select_backend(opts, ws, xs.device, dt, [("target", target)], ignore_index)
    scale = float(temperature) ** 2 if temperature_scaling else 1.0
    lead = xs.shape[:-1]
    Hs, Ht = xs.shape[-1], xt.shape[-1]
    y = None if target is None else target.reshape(-1).long()
    if be == "reference":
        out = _materialised(xs.reshape(-1, Hs), ws, bs, xt.reshape(-1, Ht), wt, bt, y, rw, scale, opts)
    else:
        out = _Distill.apply(xs.reshape(-1, Hs).contiguous(), ws.contiguous(),
                             None if bs is None else bs.contiguous(), xt.reshape(-1, Ht).contiguous(),
                             wt.contiguous(), None if bt is None else bt.contiguous(),
                             None if y is None else y.contiguous(), None if rw is None else rw.contiguous(),
                             float(hard_loss_weight), float(soft_loss_weight), scale, reduction,
                             opts.pair_options(with_ce=y is not None), be)
    if reduction == "none":
        out = tuple(t.reshape(lead) for t in out)
    return DistillationLoss(*out)


def _materialised(xs, ws, bs, xt, wt, bt, y, rw, scale: float, opts: DistillationArgs):
    """``backend="reference"``: the same loss from materialised logits (plain torch autograd; small problems)."""
    softcap, ignore_index, reduction = opts.softcap, opts.ignore_index, opts.reduction
    hard_w, soft_w = float(opts.hard_loss_weight), float(opts.soft_loss_weight)
    zs = reference.logits(xs, ws, bs, softcap)
    zt = reference.logits(xt, wt, bt, softcap)
    acc = zs.dtype
    N = xs.shape[0]
    if y is None:
        valid = torch.ones(N, dtype=acc, device=xs.device)
        hard_rows = torch.zeros(N, dtype=acc, device=xs.device)
    else:
        valid = (y != ignore_index).to(acc)
        hard_rows = reference.cross_entropy_from_logits(zs, y, ignore_index=ignore_index)
    if rw is not None:
        valid, hard_rows = valid * rw.to(acc), hard_rows * rw.to(acc)
    soft_rows = reference.divergence_from_logits(zt, zs, opts.divergence, float(opts.temperature)) * valid * scale
    if reduction == "none":
        hard, soft = hard_rows, soft_rows
    else:
        c = mean_scale(valid.sum()) if reduction == "mean" else 1.0
        hard, soft = hard_rows.sum() * c, soft_rows.sum() * c
    loss = hard_w * hard + soft_w * soft
    dt = xs.dtype
    return loss.to(dt), hard.to(dt), soft.to(dt)
