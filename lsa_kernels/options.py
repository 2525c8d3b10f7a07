"""Option dataclasses: every non-tensor argument of an op family travels in one frozen object.

Backends and autograd Functions receive one of these instead of long positional argument lists.
Validation of user-facing values happens in :mod:`lsa_kernels._checks` (called by the public ops) before an options object is
built; the constructors here only check invariants that would make a kernel silently wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .maths import DIVERGENCES, IGNORE_INDEX, N_PAIR_STATS, Stat  # noqa: F401  (re-exported: the one definition is in maths.py)

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "cpu", "reference")
POSITIONS = ("overlap", "last")
#: long_short_loss's weighting of the CE rows: "none", or "longce" (docs/maths.md §13)
CE_WEIGHTINGS = ("none", "longce")

# Column indices of the per-row statistics (their meaning: lsa_kernels.maths).
STAT_LSE_P, STAT_LSE_Q, STAT_LSET_P, STAT_LSET_Q, STAT_X, STAT_Y, STAT_X2, STAT_Y2 = (int(c) for c in Stat)


@dataclass(frozen=True)
class CEOptions:
    """Options of the linear cross-entropy (docs/maths.md §3)."""

    ignore_index: int = IGNORE_INDEX
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
    #: per-token extras of the CE forward, in the same pass over V (docs/maths.md §3): the entropy of
    #: softmax(z) and the argmax of z per row (CEOut.entropy / CEOut.argmax)
    entropy: bool = False
    argmax: bool = False

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
    ce: CEOptions = field(default_factory=CEOptions)  # not a shared instance: torch 2.11's dynamo cannot wrap one

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
