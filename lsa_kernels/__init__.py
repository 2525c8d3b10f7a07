"""lsa_kernels: fused long-short alignment and linear cross-entropy losses for long-context LLM training.

Public API:
    linear_cross_entropy(input, linear_weight, target, ...)            fused linear CE (one view)
    linear_divergence(input_p, input_q, linear_weight, ...)            fused divergence of two views
    long_short_loss(hidden_long, hidden_short, linear_weight, ...)     CE of both views + α·divergence
    linear_distillation(student_input, student_weight, teacher_input, teacher_weight, target=None, ...)
                                                                       fused KD between two heads
    LinearCrossEntropyLoss, LinearDivergenceLoss, LongShortAlignmentLoss,
    LinearDistillationLoss                                             nn.Module wrappers
    sample_l_extra(l_train), LongShortLoss, DistillationLoss
    reference                                                          the plain-torch ground truth
"""

from . import reference
from .distillation import linear_distillation
from .functional import linear_cross_entropy, linear_divergence, long_short_loss
from .modules import LinearCrossEntropyLoss, LinearDistillationLoss, LinearDivergenceLoss, LongShortAlignmentLoss
from .outputs import DistillationLoss, LongShortLoss, LongShortLossOutput, PerToken
from .pairing import sample_l_extra

__version__ = "0.1.0"

__all__ = [
    "linear_cross_entropy",
    "linear_divergence",
    "long_short_loss",
    "linear_distillation",
    "DistillationLoss",
    "LinearCrossEntropyLoss",
    "LinearDivergenceLoss",
    "LongShortAlignmentLoss",
    "LinearDistillationLoss",
    "LongShortLoss",
    "LongShortLossOutput",
    "PerToken",
    "sample_l_extra",
    "reference",
]
