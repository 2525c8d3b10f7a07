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

The op has its own argument set (two inputs, two heads, two dtypes), its own named-tuple result and its own
autograd Function over the second-head backend calls; it shares only the backend layer with the other ops.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import _checks, backends, reference
from .autograd import _autocast_off
from .backends import PairCoefs, PairGrads, PairOut, PairRows
from .functional import _autocast_cast, _device_of, _finish, _result_dtype, _vocab_parallel, no_autocast, resolve_backend
from .maths import DIVERGENCES, IGNORE_INDEX, acc_dtype, mean_scale
from .options import REDUCTIONS, CEOptions, PairOptions

Tensor = torch.Tensor

__all__ = ["DistillationLoss", "linear_distillation"]


class DistillationLoss(NamedTuple):
    """``loss = hard_loss_weight · hard + soft_loss_weight · soft``; ``hard`` the student's CE against the
    target (0 without one), ``soft`` the (τ²-scaled) divergence term; each reduced like ``loss`` and each
    differentiable."""

    loss: Tensor
    hard: Tensor
    soft: Tensor


_acc = acc_dtype  # lsa_kernels.maths


def _check(xs, ws, bs, xt, wt, bt, target, divergence, temperature, hard_w, soft_w, softcap, ignore_index,
           reduction, chunk_bytes, check_values: bool) -> None:
    """Bad input raises before any kernel, naming the argument (README's bad-input table)."""
    for name, t in (("student_input", xs), ("student_weight", ws), ("teacher_input", xt), ("teacher_weight", wt)):
        _checks._tensor(name, t)
    for name, w, x, xname in (("student_weight", ws, xs, "student_input"), ("teacher_weight", wt, xt, "teacher_input")):
        if w.dim() != 2:
            raise ValueError(f"{name} must be 2-D [V, H], got shape {tuple(w.shape)}")
        if x.dim() < 1 or x.shape[-1] != w.shape[1]:
            raise ValueError(f"{xname} must have last dim H={w.shape[1]} to match {name} [V={w.shape[0]}, "
                             f"H={w.shape[1]}], got shape {tuple(x.shape)}")
        if w.shape[1] < 1:
            raise ValueError(f"{xname} must have last dim (the hidden size H) >= 1, got shape {tuple(x.shape)}")
        if x.device != xs.device or w.device != xs.device:
            raise ValueError(f"{name} / {xname} are on {w.device} / {x.device} but student_input is on {xs.device}")
    if ws.shape[0] < 1:
        raise ValueError("student_weight must have at least one row (V >= 1)")
    if wt.shape[0] != ws.shape[0]:
        raise ValueError(f"teacher_weight has V={wt.shape[0]} rows but student_weight has V={ws.shape[0]}: the "
                         "teacher and the student must share one vocabulary")
    if ws.dtype != xs.dtype:
        raise TypeError(f"student_weight has dtype {ws.dtype} but student_input has {xs.dtype}; they must match")
    if xt.shape[:-1] != xs.shape[:-1]:
        raise ValueError(f"teacher_input must have the rows of student_input {tuple(xs.shape[:-1])} (leading "
                         f"dims), got {tuple(xt.shape[:-1])}")
    for name, b, w in (("student_bias", bs, ws), ("teacher_bias", bt, wt)):
        if b is not None:
            _checks._tensor(name, b)
            if tuple(b.shape) != (w.shape[0],):
                raise ValueError(f"{name} must have shape [V={w.shape[0]}], got {tuple(b.shape)}")
            if b.device != xs.device:
                raise ValueError(f"{name} is on {b.device} but student_input is on {xs.device}")
    if bs is not None and bs.dtype != xs.dtype:
        raise TypeError(f"student_bias has dtype {bs.dtype} but student_input has {xs.dtype}; they must match")
    _checks._choice("divergence", divergence, DIVERGENCES)
    _checks._choice("reduction", reduction, REDUCTIONS)
    _checks._real("temperature", temperature, lo=0.0, lo_open=True)
    for name, v in (("hard_loss_weight", hard_w), ("soft_loss_weight", soft_w)):
        _checks._real(name, v, lo=0.0)
    _checks._softcap(softcap)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    _checks.check_chunk_bytes(chunk_bytes)
    if target is None:
        if float(hard_w) > 0:
            raise ValueError(f"hard_loss_weight={hard_w} needs a target (the student's CE term)")
        return
    _checks._targets("target", target, xs.shape[:-1], ws.shape[0], ignore_index, xs.device, check_values)


# ------------------------------------------------------------------------------------------ autograd


class _Distill(torch.autograd.Function):
    """Inputs: student ``xs [N, Hs], ws, bs``, teacher ``xt [N, Ht], wt, bt`` (teacher detached unless
    trained), ``y [N]`` or None. Forward: per-row CE and divergence from the backend's pair op (teacher =
    view p, student = view q with its own head), reduced. Backward: per-row coefficients, as in
    :mod:`lsa_kernels.autograd` (the gradient is folded into the forward when the backend can and only
    ``loss`` gets a gradient)."""

    @staticmethod
    @_autocast_off
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
        ctx.pre = None
        has_y = y is not None
        if reduction != "none" and (any(need_s) or any(need_t)) and be.caps.fused_forward_backward:
            ctx.pre = _grads(xs, ws, bs, xt, wt, bt, need_s, need_t)
            coefs = _coefs(valid, has_y, c * hard_w, c * (soft_w * scale))
            out = be.pair_forward_backward(rows, wt, bt, opts, coefs, ctx.pre, wq=ws, bq=bs)
        else:
            out = be.pair_forward(rows, wt, bt, opts, wq=ws, bq=bs)
        ctx.save_for_backward(xs, ws, bs, xt, wt, bt, y, valid, c, out.stats)
        hard_rows = (out.ce_q if rw is None else out.ce_q * rw.to(acc)) if has_y else torch.zeros(N, dtype=acc, device=xs.device)
        soft_rows = out.div * valid * scale
        if reduction == "none":
            hard, soft = hard_rows, soft_rows
        else:
            hard, soft = hard_rows.sum() * c, soft_rows.sum() * c
        return hard_w * hard + soft_w * soft, hard, soft

    @staticmethod
    @_autocast_off
    def backward(ctx, g_loss, g_hard, g_soft):
        hard_w, soft_w, scale, reduction, opts, backend = ctx.meta
        xs, ws, bs, xt, wt, bt, y, valid, c, stats = ctx.saved_tensors
        need_s, need_t = ctx.need
        nones = (None,) * 8
        if g_loss is None and g_hard is None and g_soft is None:
            return (None,) * 6 + nones
        acc = _acc(xs)
        if ctx.pre is not None and g_hard is None and g_soft is None:
            grads, sc = ctx.pre, g_loss.to(acc)
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
    dt = _result_dtype(student_input)
    student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias = _autocast_cast(
        student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias)
    with no_autocast(_device_of(student_input)):
        out = _linear_distillation(
            student_input, student_weight, teacher_input, teacher_weight, target, divergence, temperature,
            hard_loss_weight, soft_loss_weight, student_bias, teacher_bias, softcap, ignore_index, reduction,
            temperature_scaling, train_teacher, chunk_bytes, deterministic, backend, check_targets, process_group,
            vocab_start, token_weight,
        )
    return _finish(out, dt)


def _linear_distillation(xs, ws, xt, wt, target, divergence, temperature, hard_w, soft_w, bs, bt, softcap,
                         ignore_index, reduction, temperature_scaling, train_teacher, chunk_bytes, deterministic,
                         backend, check_targets, process_group, vocab_start, token_weight=None) -> DistillationLoss:
    target = _checks.index_target(target)
    _check(xs, ws, bs, xt, wt, bt, target, divergence, temperature, hard_w, soft_w, softcap, ignore_index,
           reduction, chunk_bytes, check_targets and process_group is None)
    _checks.check_token_weight("token_weight", token_weight, xs.shape[:-1], xs.device, check_targets)
    rw = None if token_weight is None else token_weight.detach().reshape(-1)
    if not train_teacher:
        xt, wt = xt.detach(), wt.detach()
        bt = None if bt is None else bt.detach()
    dt = xs.dtype
    xt, wt = xt.to(dt), wt.to(dt)
    bt = None if bt is None else bt.to(dt)
    be = resolve_backend(backend, xs.device, dt)
    be = _vocab_parallel(process_group, vocab_start, ws, be, [("target", target)], ignore_index, check_targets)
    scale = float(temperature) ** 2 if temperature_scaling else 1.0
    lead = xs.shape[:-1]
    Hs, Ht = xs.shape[-1], xt.shape[-1]
    y = None if target is None else target.reshape(-1).long()
    if be == "reference":
        out = _materialised(xs.reshape(-1, Hs), ws, bs, xt.reshape(-1, Ht), wt, bt, y, rw, divergence,
                            float(temperature), float(hard_w), float(soft_w), scale, softcap, ignore_index,
                            reduction)
    else:
        opts = PairOptions(
            divergence=divergence, temperature=float(temperature), detach=None if train_teacher else "p",
            with_ce=y is not None,
            ce=CEOptions(ignore_index=int(ignore_index), softcap=None if softcap is None else float(softcap),
                         chunk_bytes=chunk_bytes, deterministic=bool(deterministic)),
        )
        out = _Distill.apply(xs.reshape(-1, Hs).contiguous(), ws.contiguous(),
                             None if bs is None else bs.contiguous(), xt.reshape(-1, Ht).contiguous(),
                             wt.contiguous(), None if bt is None else bt.contiguous(),
                             None if y is None else y.contiguous(), None if rw is None else rw.contiguous(),
                             float(hard_w), float(soft_w), scale, reduction,
                             opts, be)
    if reduction == "none":
        out = tuple(t.reshape(lead) for t in out)
    return DistillationLoss(*out)


def _materialised(xs, ws, bs, xt, wt, bt, y, rw, divergence, tau, hard_w, soft_w, scale, softcap, ignore_index,
                  reduction):
    """``backend="reference"``: the same loss from materialised logits (plain torch autograd; small problems)."""
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
    soft_rows = reference.divergence_from_logits(zt, zs, divergence, tau) * valid * scale
    if reduction == "none":
        hard, soft = hard_rows, soft_rows
    else:
        c = mean_scale(valid.sum()) if reduction == "mean" else 1.0
        hard, soft = hard_rows.sum() * c, soft_rows.sum() * c
    loss = hard_w * hard + soft_w * soft
    dt = xs.dtype
    return loss.to(dt), hard.to(dt), soft.to(dt)
