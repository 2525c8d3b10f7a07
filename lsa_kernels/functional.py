"""The public ops: validate, pick a backend, hand off to the autograd layer.

    linear_cross_entropy(input, linear_weight, target, ...)          docs/maths.md §3
    linear_divergence(input_p, input_q, linear_weight, ...)          docs/maths.md §5
    long_short_loss(hidden_long, hidden_short, linear_weight, ...)   docs/maths.md §4

Every check in :mod:`lsa_kernels._checks` runs before any kernel. ``backend="auto"`` picks Triton for
CUDA tensors and the chunked cpu path for CPU tensors; ``"reference"`` materialises the logits.

Autocast: like ``F.linear``, under ``torch.autocast(device_type, dtype)`` each op casts its input(s),
weight and bias (floating, not float64, on an autocast-enabled device type) to the autocast dtype first,
then runs with autocast off (statistics and accumulation stay fp32 inside the backends; gradients reach fp32
master weights through the cast). The loss and the per-token values come back in float32 under autocast, as
torch's loss functions return them (``F.cross_entropy`` is on autocast's fp32 list), and in the input's dtype
otherwise; either way they are rounded once, from the backends' fp32 (fp64) accumulation
(``backend="reference"`` rounds to the autocast dtype first, then casts to float32).

float64 on CUDA: the Triton kernels take fp32/bf16/fp16 only (``tl.dot`` has no fp64 tensor-core path),
so ``backend="auto"`` sends float64 CUDA tensors to ``"reference"`` (materialised logits: meant for
gradcheck-sized problems) and ``backend="triton"`` refuses float64 with a ValueError. GPUs below
compute capability 8.0 are refused by the Triton backend (``UnsupportedDevice``, a ValueError).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _checks, dispatch, reference
from .dispatch import resolve_backend  # noqa: F401  (re-exported)
from .maths import IGNORE_INDEX, acc_dtype
from .options import CrossEntropyArgs, DivergenceArgs, LongShortArgs
from .outputs import CrossEntropyOutput, LongShortLoss, LongShortLossOutput, PerToken  # noqa: F401  (re-exported)
from .pairing import pair_mask

__all__ = [
    "linear_cross_entropy", "linear_divergence", "long_short_loss", "resolve_backend", "CrossEntropyOutput",
    "LongShortLossOutput", "PerToken",
]


@dispatch.op("input", "linear_weight", "linear_bias")
def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    token_weight: Optional[torch.Tensor] = None,
    backend: str = "auto",
    chunk_bytes: Optional[int] = None,
    deterministic: bool = False,
    check_targets: bool = True,
    process_group=None,
    vocab_start: int = 0,
    return_lse: bool = False,
    return_entropy: bool = False,
    return_accuracy: bool = False,
):
    """Cross-entropy of ``softcap(input @ linear_weight.T + linear_bias)`` against ``target``, fused.

    Args mirror :func:`torch.nn.functional.linear_cross_entropy`. ``input [..., H]``, ``linear_weight [V, H]``,
    ``linear_bias [V]``; ``target`` is either class indices ``[...]`` (any integer dtype, read as int64; already
    aligned: no internal shift; ``ignore_index``, default -100, skips a row) or probabilities: a float tensor of the logits' shape
    ``[..., V]`` (docs/maths.md §11; no row is ignored, ``ignore_index`` may not be given; read tile by tile in
    the CE pass, any ``softcap``; a target that requires grad gets ∂loss/∂target).
    ``weight [V]``: torch's class weights — row i counts ``weight[target_i]`` times and ``mean`` divides by
    their sum over counted rows; with ``label_smoothing`` the smoothing term is weighted per class as in torch.
    ``token_weight [...]`` (float, >= 0, no gradient): row i counts ``token_weight_i``
    times (``mean`` = Σ w ℓ / Σ w; a total weight of 0 gives 0 with zero gradients).
    ``z_loss`` adds ``z_loss * lse²`` per row (times the row's class weight); ``softcap`` applies
    ``c * tanh(z / c)`` to the logits. ``reduction="mean"`` averages over counted rows and returns 0 (zero
    gradients) when there are none. ``chunk_bytes`` bounds the logits the cpu backend holds at once (default
    64 MiB; the rows per chunk follow from V; a positive int). ``check_targets=False`` skips the host syncs that
    check target values (in [0, V) or ``ignore_index``) and weight values (finite, >= 0): the caller then
    guarantees them, and with a target outside that set the result is undefined — the loss and gradients may be
    any finite number (the cpu backend reads some other row's logit; target = V and target = -1 can give the
    same loss), NaN, an index error (``backend="reference"``), or on CUDA an out-of-bounds read — as it is with an infinite or negative
    weight. ``process_group``/``vocab_start``: ``linear_weight`` is this rank's shard ``W[vocab_start :
    vocab_start + V_r]`` of a vocab-parallel head (:mod:`lsa_kernels.backends.vocab_parallel`); targets are
    global ids, ``weight`` covers the whole vocabulary, a probability target is the full ``[..., V]`` or this
    rank's columns ``[..., V_r]`` (docs/maths.md §15).
    Returns a scalar, or a tensor of ``input.shape[:-1]`` for ``reduction="none"`` (then ``-loss`` is each row's
    log-probability of its target when ``label_smoothing = z_loss = 0``). Honours autocast like ``F.linear``
    (module docstring).
    Per-token outputs, in the same pass over V (docs/maths.md §3; class-index targets; none of them with
    probability targets or class-weighted smoothing; all of them under ``process_group``, §15):
    ``return_lse`` (log-normaliser per row, no gradient), ``return_entropy`` (entropy of softmax(z) per row,
    every row; differentiable, e.g. for an entropy bonus), ``return_accuracy`` (argmax == target, bool, False
    on ignored rows). With any of them the result is a :class:`CrossEntropyOutput` ``(loss, lse, entropy,
    accuracy)`` with None for what was not asked. ``return_lse`` and ``return_accuracy`` keep the cpu backend's
    fused forward+backward; the entropy costs a separate backward pass there (its coefficient is known only in
    backward); entropy and accuracy run the ATen chunk function.
    """
    opts = CrossEntropyArgs(
        reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
        softcap=softcap, backend=backend, chunk_bytes=chunk_bytes, deterministic=deterministic,
        check_targets=check_targets, process_group=process_group, vocab_start=vocab_start, return_lse=return_lse,
        return_entropy=return_entropy, return_accuracy=return_accuracy,
    )
    target = _checks.index_target(target)
    prob = _checks.check_ce(input, linear_weight, target, opts, bias=linear_bias, weight=weight,
                            token_weight=token_weight)
    ignore, extras = opts.ignore, opts.extras
    be = dispatch.select_backend(opts, linear_weight, input.device, input.dtype,
                                 [] if prob else [("target", target)], ignore)
    if opts.parallel and weight is not None:
        _checks.check_class_weight(weight, be.shard.vocab_total, input.device, check_targets)
    if opts.parallel and prob:  # [..., V] (full) or [..., V_r] (this rank's columns): docs/maths.md §15
        _checks.check_prob_target_shard(target, be.shard.vocab_total, be.shard.vocab_size, be.shard.vocab_start)
    linear_path = prob or (weight is not None and label_smoothing > 0)
    _checks.check_per_token(opts, linear_path)
    if be == "reference":
        return reference.linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=weight, reduction=reduction,
            ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
            token_weight=token_weight, check_targets=check_targets, return_lse=extras[0], return_entropy=extras[1],
            return_accuracy=extras[2],
        )
    H = input.shape[-1]
    rows_shape = input.shape[:-1]
    x = input.reshape(-1, H)
    tw = None if token_weight is None else token_weight.reshape(-1)
    if linear_path:
        from .weights import linear_target_loss

        y = target.reshape(-1, target.shape[-1]) if prob else target.reshape(-1)
        out = linear_target_loss(
            x, linear_weight, linear_bias, y, prob=prob, class_weight=weight, token_weight=tw, reduction=reduction,
            ignore_index=ignore, label_smoothing=label_smoothing, z_loss=z_loss, opts=opts.ce_options(),
            backend=be, shard=be.shard if opts.parallel else None,
        )
        return out.reshape(rows_shape) if reduction == "none" else out
    from .autograd import linear_cross_entropy_fused

    y = target.reshape(-1)
    rw = tw
    if weight is not None:  # class weights without smoothing: the row weight weight[y] (docs/maths.md §11)
        cw = weight[torch.where(y != ignore, y, torch.zeros_like(y))]
        rw = cw if rw is None else rw * cw
    ce_opts = opts.ce_options(entropy=extras[1], argmax=extras[2])
    loss, lse, ent, am = linear_cross_entropy_fused(x, linear_weight, linear_bias, y, reduction, ce_opts, be, rw=rw)
    loss = loss.reshape(rows_shape) if reduction == "none" else loss
    if not any(extras):
        return loss
    acc = (am == y) & (y != ignore) if extras[2] else None
    return CrossEntropyOutput(
        loss,
        lse.reshape(rows_shape) if extras[0] else None,
        ent.reshape(rows_shape) if extras[1] else None,
        acc.reshape(rows_shape) if extras[2] else None,
    )


@dispatch.op("input_p", "input_q", "linear_weight", "linear_bias")
def linear_divergence(
    input_p: torch.Tensor,
    input_q: torch.Tensor,
    linear_weight: torch.Tensor,
    *,
    linear_bias: Optional[torch.Tensor] = None,
    divergence: str = "sce",
    temperature: float = 1.0,
    detach: Optional[str] = None,
    reduction: str = "mean",
    mask: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    token_weight: Optional[torch.Tensor] = None,
    backend: str = "auto",
    chunk_bytes: Optional[int] = None,
    deterministic: bool = False,
    process_group=None,
    vocab_start: int = 0,
) -> torch.Tensor:
    """Divergence ``D(softmax(a/τ), softmax(b/τ))`` between the logits of two aligned sets of rows.

    ``a = softcap(input_p W^T + b)``, ``b`` likewise from ``input_q``; both through the same head and
    never materialised. ``divergence`` is one of ``sce`` (default), ``sym_kl``, ``kl`` (KL(p‖q)),
    ``kl_reverse`` (KL(q‖p)), ``js``. ``detach="p"`` / ``"q"`` stops the gradient into that side.
    ``mask [...]`` (bool) selects rows; ``mean`` averages over selected rows (0 when none).
    ``token_weight [...]`` (float, >= 0, no gradient): row i counts ``token_weight_i`` times (``mean`` =
    Σ w·D / Σ w over selected rows, 0 with zero gradients when that is 0; docs/maths.md §11).
    Honours autocast like ``F.linear`` (module docstring).
    """
    opts = DivergenceArgs(
        divergence=divergence, temperature=temperature, detach=detach, reduction=reduction, softcap=softcap,
        backend=backend, chunk_bytes=chunk_bytes, deterministic=deterministic, process_group=process_group,
        vocab_start=vocab_start,
    )
    _checks.check_divergence(input_p, input_q, linear_weight, opts, bias=linear_bias, mask=mask,
                             token_weight=token_weight)
    be = dispatch.select_backend(opts, linear_weight, input_p.device, input_p.dtype)
    if be == "reference":
        return reference.linear_divergence(
            input_p, input_q, linear_weight, linear_bias=linear_bias, divergence=divergence,
            temperature=temperature, detach=detach, reduction=reduction, mask=mask, softcap=softcap,
            token_weight=token_weight,
        )
    from .autograd import pair_loss_fused, row_coefficients

    H = input_p.shape[-1]
    xp, xq = input_p.reshape(-1, H), input_q.reshape(-1, H)
    sel = torch.ones(xp.shape[0], dtype=torch.bool, device=xp.device) if mask is None else mask.reshape(-1)
    tw = None if token_weight is None else token_weight.reshape(-1)
    div_w = row_coefficients(sel, tw, reduction, acc_dtype(xp))
    mode = "none" if reduction == "none" else "weighted"
    out = pair_loss_fused(xp, xq, linear_weight, linear_bias, None, None, sel, div_w, opts.pair_options(), be, mode)
    return out.reshape(input_p.shape[:-1]) if reduction == "none" else out


@dispatch.op("hidden_long", "hidden_short", "linear_weight", "linear_bias")
def long_short_loss(
    hidden_long: torch.Tensor,
    hidden_short: torch.Tensor,
    linear_weight: torch.Tensor,
    labels_long: torch.Tensor,
    labels_short: torch.Tensor,
    *,
    l_extra: int,
    alpha: float = 0.1,
    divergence: str = "sce",
    temperature: float = 1.0,
    detach: Optional[str] = None,
    positions: str = "overlap",
    ignore_index: int = IGNORE_INDEX,
    linear_bias: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    backend: str = "auto",
    chunk_bytes: Optional[int] = None,
    deterministic: bool = False,
    check_targets: bool = True,
    process_group=None,
    vocab_start: int = 0,
    token_weight_long: Optional[torch.Tensor] = None,
    token_weight_short: Optional[torch.Tensor] = None,
    ce_weighting: str = "none",
    longce_gamma: float = 5.0,
    return_lse: bool = False,
    return_entropy: bool = False,
    return_accuracy: bool = False,
):
    """Long-short alignment loss (docs/maths.md §4): ``loss = ce + alpha * misalign``, fused, no logits in memory.

    ``hidden_long``/``hidden_short`` ``[B, T, H]`` are the final hidden states of the two views of one
    window (long = ``x[:T]``, short = ``x[l_extra:l_extra+T]``), ``labels_*`` ``[B, T]`` their
    next-token targets aligned to rows. Rows pair as ``hidden_long[:, l_extra+i] <-> hidden_short[:, i]``.
    ``ce`` is the mean token CE over all valid rows of both views; ``misalign`` the mean divergence over
    pairs whose targets are both valid (``positions="last"``: only each sequence's last such pair).
    ``detach="long"`` makes the long view a fixed teacher for the divergence, ``"short"`` the reverse.
    ``token_weight_long`` / ``token_weight_short`` ``[B, T]`` (float, >= 0, no gradient) weight each view's CE
    rows (``ce`` = Σ w·ℓ / Σ w over valid rows of both views), and a pair's divergence by its LONG row's weight
    (docs/maths.md §11). ``ce_weighting="longce"`` (LongCE, §13) weights each paired long row's CE by
    ``min(exp(ce_short − ce_long), longce_gamma)`` (detached; unpaired rows 1; still divided by the number —
    or token weight — of valid rows); it runs forward then backward (no fused forward+backward).
    ``check_targets=False`` skips the host syncs of the label and token-weight value checks; labels outside [0, V)
    other than ``ignore_index`` then give an undefined result (as in :func:`linear_cross_entropy`).
    Returns ``LongShortLoss(loss, ce, misalign)``; each is differentiable. Honours autocast like ``F.linear``
    (module docstring).
    Per-view per-token outputs, in the same pass over V as the loss (docs/maths.md §4 per-view outputs; of each
    view's logits z at temperature 1, whatever ``temperature``): ``return_lse`` (log-normaliser per row, no
    gradient), ``return_entropy`` (entropy of softmax(z) per row, every row, ignored ones included;
    differentiable, e.g. for an entropy bonus), ``return_accuracy`` (argmax of z == label, bool, False on
    ignored rows, ties to the lowest index). With any of them the result is a
    ``LongShortLossOutput(loss, ce, misalign, long, short)`` whose ``long`` / ``short`` are ``PerToken(lse,
    entropy, accuracy)`` of shape ``[B, T]`` (rows as in ``hidden_long`` / ``hidden_short``; None where not
    asked). With ``return_entropy`` it runs forward then backward (no fused forward+backward; lse and accuracy
    alone keep it). Also under ``process_group`` (docs/maths.md §15).
    """
    opts = LongShortArgs(
        l_extra=l_extra, alpha=alpha, divergence=divergence, temperature=temperature, detach=detach,
        positions=positions, ignore_index=ignore_index, softcap=softcap, label_smoothing=label_smoothing,
        z_loss=z_loss, ce_weighting=ce_weighting, longce_gamma=longce_gamma, return_lse=return_lse,
        return_entropy=return_entropy, return_accuracy=return_accuracy, backend=backend, chunk_bytes=chunk_bytes,
        deterministic=deterministic, check_targets=check_targets, process_group=process_group,
        vocab_start=vocab_start,
    )
    labels_long, labels_short = _checks.index_target(labels_long), _checks.index_target(labels_short)
    weights_kw = dict(token_weight_long=token_weight_long, token_weight_short=token_weight_short)
    _checks.check_long_short(hidden_long, hidden_short, linear_weight, labels_long, labels_short, opts,
                             bias=linear_bias, **weights_kw)
    extras = opts.extras
    be = dispatch.select_backend(opts, linear_weight, hidden_long.device, hidden_long.dtype,
                                 [("labels_long", labels_long), ("labels_short", labels_short)], ignore_index)
    if be == "reference":
        return reference.long_short_loss(
            hidden_long, hidden_short, linear_weight, labels_long, labels_short, l_extra=l_extra, alpha=alpha,
            divergence=divergence, temperature=temperature, detach=detach, positions=positions,
            ignore_index=ignore_index, linear_bias=linear_bias, softcap=softcap,
            label_smoothing=label_smoothing, z_loss=z_loss, check_targets=check_targets, ce_weighting=ce_weighting,
            longce_gamma=longce_gamma, return_lse=extras[0], return_entropy=extras[1], return_accuracy=extras[2],
            **weights_kw,
        )
    from .autograd import long_short_fused

    sel = pair_mask(labels_long, labels_short, l_extra, positions, ignore_index)
    gamma = float(longce_gamma) if ce_weighting == "longce" else None
    # per-view outputs (docs/maths.md §4): lse from the statistics, entropy / argmax from the same pass
    loss, ce, mis, lse_l, lse_s, ent_l, ent_s, am_l, am_s = long_short_fused(
        hidden_long, hidden_short, linear_weight, linear_bias, labels_long, labels_short, l_extra, float(alpha),
        sel, opts.pair_options(), be, longce_gamma=gamma, **weights_kw,
    )
    if not any(extras):
        return LongShortLoss(loss, ce, mis)

    def view(lse, ent, am, y) -> PerToken:
        acc = (am == y) & (y != ignore_index) if extras[2] else None
        return PerToken(lse if extras[0] else None, ent if extras[1] else None, acc)

    return LongShortLossOutput(loss, ce, mis, view(lse_l, ent_l, am_l, labels_long), view(lse_s, ent_s, am_s,
                                                                                       labels_short))
