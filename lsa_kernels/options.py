"""Option dataclasses: every non-tensor argument of an op family travels in one frozen object.

Backends and autograd Functions receive one of these instead of long positional argument lists.
Validation of user-facing values happens in :mod:`lsa_kernels.functional` before an options object is
built; the constructors here only check invariants that would make a kernel silently wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

REDUCTIONS = ("mean", "sum", "none")
DIVERGENCES = ("sce", "sym_kl", "kl", "kl_reverse", "js")
BACKENDS = ("auto", "triton", "cpu", "reference")
POSITIONS = ("overlap", "last")

# Per-row statistics a pair forward hands to its backward (columns of a [N, 8] fp32 tensor).
#   LSE_P, LSE_Q   : lse of the (softcapped) logits of each view, used by CE
#   LSET_P, LSET_Q : lse of logits / temperature, used by the divergence
#   X, Y           : divergence expectations, meaning depends on the divergence:
#       sce                 X = E_p[b],      Y = E_q[a]
#       kl/kl_reverse/sym_kl X = E_p[a - b],  Y = E_q[a - b]
#       js                  X = KL(p || m),  Y = KL(q || m)
#   X2, Y2         : only sym_kl: E_p[expm1(-u)], E_q[expm1(u)] (see lsa_kernels.stats); 0 otherwise
STAT_LSE_P, STAT_LSE_Q, STAT_LSET_P, STAT_LSET_Q, STAT_X, STAT_Y, STAT_X2, STAT_Y2 = range(8)
N_PAIR_STATS = 8


@dataclass(frozen=True)
class CEOptions:
    """Options of the linear cross-entropy (docs/maths.md §3)."""

    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: Optional[float] = None
    #: bytes of fp32 logits the cpu backend may hold at once (per view); ``None`` picks from the shapes
    chunk_bytes: Optional[int] = None
    #: force a reproducible reduction order (no atomics in Triton; the cpu path is always deterministic)
    deterministic: bool = False
    #: the full vocabulary size when ``linear_weight`` is one shard of it (vocab-parallel heads); the
    #: label-smoothing term spreads ε over this many classes. None: the weight's own V.
    vocab_total: Optional[int] = None

    @property
    def has_softcap(self) -> bool:
        return self.softcap is not None and self.softcap > 0


@dataclass(frozen=True)
class PairOptions:
    """Options of the fused two-view op: CE on each view (optional) + a divergence between them (docs/maths.md §5)."""

    divergence: str = "sce"
    temperature: float = 1.0
    #: None, "p" (no gradient into the p/long view from the divergence) or "q"
    detach: Optional[str] = None
    #: compute CE of both views in the same pass (long_short_loss) or the divergence alone (linear_divergence)
    with_ce: bool = True
    ce: CEOptions = CEOptions()

    @property
    def softcap(self) -> Optional[float]:
        return self.ce.softcap

    @property
    def has_softcap(self) -> bool:
        return self.ce.has_softcap

    @property
    def grad_p(self) -> bool:
        return self.detach != "p"

    @property
    def grad_q(self) -> bool:
        return self.detach != "q"
