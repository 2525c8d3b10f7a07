"""lsa_kernels: fused long-short alignment and linear cross-entropy losses for long-context LLM training.

Public API:
    linear_cross_entropy(input, linear_weight, target, ...)            fused linear CE (one view)
    linear_divergence(input_p, input_q, linear_weight, ...)            fused divergence of two views
    long_short_loss(hidden_long, hidden_short, linear_weight, ...)     CE of both views + α·divergence
    LinearCrossEntropyLoss, LinearDivergenceLoss, LongShortAlignmentLoss   nn.Module wrappers
    sample_l_extra(l_train), LongShortLoss
    reference                                                          the plain-torch ground truth
"""

from . import reference
from .functional import linear_cross_entropy, linear_divergence, long_short_loss
from .modules import LinearCrossEntropyLoss, LinearDivergenceLoss, LongShortAlignmentLoss
from .pairing import LongShortLoss, sample_l_extra

__version__ = "0.1.0"

__all__ = [
    "linear_cross_entropy",
    "linear_divergence",
    "long_short_loss",
    "LinearCrossEntropyLoss",
    "LinearDivergenceLoss",
    "LongShortAlignmentLoss",
    "LongShortLoss",
    "sample_l_extra",
    "reference",
]
