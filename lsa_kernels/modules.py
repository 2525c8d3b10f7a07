"""nn.Module wrappers: hold the options, call the functional ops. The head weight is passed per call
(it usually belongs to the model: ``model.get_output_embeddings().weight``)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import functional as LF
from .maths import IGNORE_INDEX
from .pairing import LongShortLoss


class LinearCrossEntropyLoss(nn.Module):
    """``loss(input, linear_weight, target, linear_bias=None, token_weight=None)`` — see
    :func:`lsa_kernels.linear_cross_entropy`. ``weight`` (class weights ``[V]``) is held as a buffer, as in
    ``nn.CrossEntropyLoss``; ``ignore_index=None`` means -100 for class-index targets (and allows probability
    targets)."""

    def __init__(self, *, weight: Optional[torch.Tensor] = None, reduction: str = "mean",
                 ignore_index: Optional[int] = None, label_smoothing: float = 0.0, z_loss: float = 0.0,
                 softcap: Optional[float] = None, backend: str = "auto", **kw):
        super().__init__()
        self.register_buffer("weight", weight)
        self.kw = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
                       z_loss=z_loss, softcap=softcap, backend=backend, **kw)

    def forward(self, input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor,
                linear_bias: Optional[torch.Tensor] = None, token_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return LF.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
                                       token_weight=token_weight, **self.kw)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kw.items())


class LinearDivergenceLoss(nn.Module):
    """``loss(input_p, input_q, linear_weight, linear_bias=None, mask=None)`` — see :func:`lsa_kernels.linear_divergence`."""

    def __init__(self, *, divergence: str = "sce", temperature: float = 1.0, detach: Optional[str] = None,
                 reduction: str = "mean", softcap: Optional[float] = None, backend: str = "auto", **kw):
        super().__init__()
        self.kw = dict(divergence=divergence, temperature=temperature, detach=detach, reduction=reduction,
                       softcap=softcap, backend=backend, **kw)

    def forward(self, input_p, input_q, linear_weight, linear_bias=None, mask=None, token_weight=None) -> torch.Tensor:
        return LF.linear_divergence(input_p, input_q, linear_weight, linear_bias=linear_bias, mask=mask,
                                    token_weight=token_weight, **self.kw)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kw.items())


class LongShortAlignmentLoss(nn.Module):
    """``loss(hidden_long, hidden_short, linear_weight, labels_long, labels_short, l_extra, linear_bias=None,
    token_weight_long=None, token_weight_short=None)`` -> :class:`LongShortLoss` — see
    :func:`lsa_kernels.long_short_loss` (``ce_weighting="longce"``, ``longce_gamma`` go to the constructor; so do
    ``return_lse`` / ``return_entropy`` / ``return_accuracy``, which make it return a LongShortLossOutput)."""

    def __init__(self, *, alpha: float = 0.1, divergence: str = "sce", temperature: float = 1.0,
                 detach: Optional[str] = None, positions: str = "overlap", ignore_index: int = IGNORE_INDEX,
                 softcap: Optional[float] = None, label_smoothing: float = 0.0, z_loss: float = 0.0,
                 backend: str = "auto", **kw):
        super().__init__()
        self.kw = dict(alpha=alpha, divergence=divergence, temperature=temperature, detach=detach,
                       positions=positions, ignore_index=ignore_index, softcap=softcap,
                       label_smoothing=label_smoothing, z_loss=z_loss, backend=backend, **kw)

    def forward(self, hidden_long, hidden_short, linear_weight, labels_long, labels_short, l_extra: int,
                linear_bias=None, token_weight_long=None, token_weight_short=None):
        return LF.long_short_loss(hidden_long, hidden_short, linear_weight, labels_long, labels_short,
                                  l_extra=l_extra, linear_bias=linear_bias, token_weight_long=token_weight_long,
                                  token_weight_short=token_weight_short, **self.kw)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kw.items())


class LinearDistillationLoss(nn.Module):
    """``loss(student_input, student_weight, teacher_input, teacher_weight, target=None, student_bias=None,
    teacher_bias=None)`` -> :class:`~lsa_kernels.distillation.DistillationLoss` — see
    :func:`lsa_kernels.linear_distillation` (options go to the constructor)."""

    def __init__(self, *, divergence: str = "kl", temperature: float = 1.0, hard_loss_weight: float = 0.0,
                 soft_loss_weight: float = 1.0, softcap: Optional[float] = None, ignore_index: int = IGNORE_INDEX,
                 reduction: str = "mean", temperature_scaling: bool = True, train_teacher: bool = False,
                 backend: str = "auto", **kw):
        super().__init__()
        self.kw = dict(divergence=divergence, temperature=temperature, hard_loss_weight=hard_loss_weight,
                       soft_loss_weight=soft_loss_weight, softcap=softcap, ignore_index=ignore_index,
                       reduction=reduction, temperature_scaling=temperature_scaling, train_teacher=train_teacher,
                       backend=backend, **kw)

    def forward(self, student_input, student_weight, teacher_input, teacher_weight, target=None,
                student_bias=None, teacher_bias=None, token_weight=None):
        from .distillation import linear_distillation

        return linear_distillation(student_input, student_weight, teacher_input, teacher_weight, target,
                                   student_bias=student_bias, teacher_bias=teacher_bias, token_weight=token_weight,
                                   **self.kw)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kw.items())
