"""lsa_kernels: fused long-short alignment and linear cross-entropy losses (work in progress)."""
from . import reference
from .pairing import LongShortLoss, sample_l_extra
