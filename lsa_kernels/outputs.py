"""The public ops' result types, in one place (re-exported where they were always imported from).

    CrossEntropyOutput     linear_cross_entropy with a per-token output        docs/maths.md §3
    LongShortLoss          long_short_loss                                     docs/maths.md §4
    PerToken               one view's per-token outputs                        docs/maths.md §4
    LongShortLossOutput    long_short_loss with a per-token output             docs/maths.md §4
    DistillationLoss       linear_distillation                                 docs/maths.md §12
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

Tensor = torch.Tensor

__all__ = ["CrossEntropyOutput", "DistillationLoss", "LongShortLoss", "LongShortLossOutput", "PerToken"]


class CrossEntropyOutput(NamedTuple):
    """:func:`linear_cross_entropy`'s return when a per-token output is asked (docs/maths.md §3): the loss, and
    per row (the input's leading shape) ``lse`` (no gradient), ``entropy`` of softmax(z) (differentiable) and
    ``accuracy`` (argmax of z == target; False on ignored rows; no gradient); None where not asked."""

    loss: Tensor
    lse: Optional[Tensor]
    entropy: Optional[Tensor]
    accuracy: Optional[Tensor]


class LongShortLoss(NamedTuple):
    """Result of :func:`lsa_kernels.long_short_loss`: ``loss = ce + alpha * misalign``."""

    loss: Tensor
    ce: Tensor
    misalign: Tensor


class PerToken(NamedTuple):
    """Per-token outputs of one view ``[B, T]`` (docs/maths.md §4 per-view outputs), None where not asked:
    ``lse`` (log-normaliser of the view's logits z at temperature 1; no gradient), ``entropy`` (of softmax(z),
    every row, ignored ones included; differentiable) and ``accuracy`` (argmax of z == target, ties to the
    lowest index; False on ignored rows; bool, no gradient)."""

    lse: Optional[Tensor]
    entropy: Optional[Tensor]
    accuracy: Optional[Tensor]


class LongShortLossOutput(NamedTuple):
    """Result of :func:`lsa_kernels.long_short_loss` when a per-token output is asked (``return_lse``,
    ``return_entropy``, ``return_accuracy``): :class:`LongShortLoss`'s three values, then each view's
    :class:`PerToken` (rows aligned with ``hidden_long`` / ``hidden_short``)."""

    loss: Tensor
    ce: Tensor
    misalign: Tensor
    long: PerToken
    short: PerToken


class DistillationLoss(NamedTuple):
    """``loss = hard_loss_weight · hard + soft_loss_weight · soft``; ``hard`` the student's CE against the
    target (0 without one), ``soft`` the (τ²-scaled) divergence term; each reduced like ``loss`` and each
    differentiable."""

    loss: Tensor
    hard: Tensor
    soft: Tensor
