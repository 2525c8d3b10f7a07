"""Option dataclasses: every non-tensor argument of an op travels in one frozen object.

Two kinds. A public op's record (:class:`CrossEntropyArgs`, :class:`DivergenceArgs`, :class:`LongShortArgs`,
:class:`DistillationArgs`, each a :class:`RunOptions`) holds its arguments as the caller gave them, built once
by keyword at the boundary; :mod:`lsa_kernels._checks` validates it with the tensors, and only then does it
build the backends' record (:class:`CEOptions`, :class:`PairOptions`) that the autograd Functions, backends and
kernels receive instead of long positional argument lists. Nothing here validates user input.
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


# ------------------------------------------------------------------------------ the public ops' arguments
# Each public op gathers its non-tensor arguments, as the caller gave them, into one of the records below
# (by keyword, once, at the boundary) and passes it whole: to the checks (lsa_kernels._checks), to the
# dispatch (lsa_kernels.dispatch) and, once checked, to the backend record it builds (CEOptions / PairOptions).


@dataclass(frozen=True)
class RunOptions:
    """How an op runs (shared by every public op): backend, cpu chunk budget, reduction order, value checks,
    and the vocab-parallel group (docs/maths.md §15)."""

    backend: str = "auto"
    chunk_bytes: Optional[int] = None
    deterministic: bool = False
    #: check target and weight values (one host sync each on CPU, a device-side assert on CUDA)
    check_targets: bool = True
    process_group: object = None
    vocab_start: int = 0

    @property
    def parallel(self) -> bool:
        return self.process_group is not None

    @property
    def check_values(self) -> bool:
        """Value checks before dispatch; a vocab-parallel head checks its global target ids once the shards are
        known (lsa_kernels.dispatch.select_backend)."""
        return bool(self.check_targets) and self.process_group is None

    def _ce(self, ignore_index, label_smoothing=0.0, z_loss=0.0, softcap=None, **extras) -> CEOptions:
        return CEOptions(ignore_index=int(ignore_index), label_smoothing=float(label_smoothing), z_loss=float(z_loss),
                         softcap=None if softcap is None else float(softcap), chunk_bytes=self.chunk_bytes,
                         deterministic=bool(self.deterministic), **extras)


@dataclass(frozen=True)
class CrossEntropyArgs(RunOptions):
    """:func:`lsa_kernels.linear_cross_entropy`'s non-tensor arguments (docs/maths.md §3, §11)."""

    reduction: str = "mean"
    #: None: the default IGNORE_INDEX, and not "given" (probability targets refuse a given one)
    ignore_index: Optional[int] = None
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: Optional[float] = None
    return_lse: bool = False
    return_entropy: bool = False
    return_accuracy: bool = False

    @property
    def ignore(self) -> int:
        """The ignore index in force."""
        return IGNORE_INDEX if self.ignore_index is None else self.ignore_index

    @property
    def extras(self) -> tuple:
        """(return_lse, return_entropy, return_accuracy) as bools."""
        return bool(self.return_lse), bool(self.return_entropy), bool(self.return_accuracy)

    def ce_options(self, **extras) -> CEOptions:
        return self._ce(self.ignore, self.label_smoothing, self.z_loss, self.softcap, **extras)


@dataclass(frozen=True)
class DivergenceArgs(RunOptions):
    """:func:`lsa_kernels.linear_divergence`'s non-tensor arguments (docs/maths.md §5, §11)."""

    divergence: str = "sce"
    temperature: float = 1.0
    detach: Optional[str] = None
    reduction: str = "mean"
    softcap: Optional[float] = None

    def pair_options(self) -> PairOptions:
        return PairOptions(divergence=self.divergence, temperature=float(self.temperature), detach=self.detach,
                           with_ce=False, ce=self._ce(IGNORE_INDEX, softcap=self.softcap))


@dataclass(frozen=True)
class LongShortArgs(RunOptions):
    """:func:`lsa_kernels.long_short_loss`'s non-tensor arguments (docs/maths.md §4, §11, §13)."""

    l_extra: int = 1
    alpha: float = 0.1
    divergence: str = "sce"
    temperature: float = 1.0
    #: None, "long" or "short"
    detach: Optional[str] = None
    positions: str = "overlap"
    ignore_index: int = IGNORE_INDEX
    softcap: Optional[float] = None
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    ce_weighting: str = "none"
    longce_gamma: float = 5.0
    return_lse: bool = False
    return_entropy: bool = False
    return_accuracy: bool = False

    @property
    def extras(self) -> tuple:
        """(return_lse, return_entropy, return_accuracy) as bools."""
        return bool(self.return_lse), bool(self.return_entropy), bool(self.return_accuracy)

    def pair_options(self) -> PairOptions:
        return PairOptions(
            divergence=self.divergence, temperature=float(self.temperature),
            detach={None: None, "long": "p", "short": "q"}[self.detach], with_ce=True,
            ce=self._ce(self.ignore_index, self.label_smoothing, self.z_loss, self.softcap,
                        entropy=self.extras[1], argmax=self.extras[2]),
        )


@dataclass(frozen=True)
class DistillationArgs(RunOptions):
    """:func:`lsa_kernels.linear_distillation`'s non-tensor arguments (docs/maths.md §12)."""

    divergence: str = "kl"
    temperature: float = 1.0
    hard_loss_weight: float = 0.0
    soft_loss_weight: float = 1.0
    softcap: Optional[float] = None
    ignore_index: int = IGNORE_INDEX
    reduction: str = "mean"
    temperature_scaling: bool = True
    train_teacher: bool = False

    def pair_options(self, with_ce: bool) -> PairOptions:
        """The teacher is view p (frozen: ``detach="p"``), the student view q; CE on the student when a target is
        given."""
        return PairOptions(divergence=self.divergence, temperature=float(self.temperature),
                           detach=None if self.train_teacher else "p", with_ce=with_ce,
                           ce=self._ce(self.ignore_index, softcap=self.softcap))
