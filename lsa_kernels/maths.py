"""The shared definitions of docs/maths.md as code: one place for every fact more than one backend uses.

Every backend (the cpu ATen and C++ paths, the Triton kernels, the vocab-parallel wrapper) takes its
divergence ids, statistic columns, CE row loss and divergence-from-statistics from here.
:mod:`lsa_kernels.reference` does NOT: it is the independent ground truth and computes everything from
materialised logits with plain torch, so a mistake here cannot hide in both sides of a test.
csrc/lsa_cpu.cpp repeats the ids and columns (C++ cannot import Python); tests/backends/test_maths_defs.py pins
them to this module.

Contents
    Divergence        ids of the five divergences (docs/maths.md §5), as the kernels and C++ see them
    DIVERGENCES       their user-facing names, in id order
    Stat, N_PAIR_STATS columns of the [N, 8] per-row statistics a pair forward hands to its backward
    ce_row_loss       the CE row loss of docs/maths.md §3 from lse, z_y and the mean logit
    divergence_from_stats   the value D of each divergence from the per-row statistics (§5)
    EXPM1_CLAMP, EXPM1_AGREE  the precision constants of the expm1 forms (§5, §7)

Statistics (columns of ``[N, 8]`` fp32; p = softmax(a), q = softmax(b), a = z_p/τ, b = z_q/τ, u = a − b;
X2, Y2 are used by sym_kl only and are 0 otherwise):

    LSE_P, LSE_Q    lse(z_p), lse(z_q)            z = softcap(x Wᵀ + b), used by CE
    LSET_P, LSET_Q  lse(a), lse(b)                used by the divergence

    divergence   X              Y              X2               Y2              value D
    sce          E_p[b]         E_q[a]                                          lse_a + lse_b − X − Y
    kl           E_p[u]         E_p[expm1(−u)]                                  X + log1p(Y)
    kl_reverse   E_q[expm1(u)]  E_q[u]                                          log1p(X) − Y
    sym_kl       E_p[u]         E_q[u]         E_p[expm1(−u)]   E_q[expm1(u)]   (X + log1p(X2)) + (log1p(Y2) − Y)
    js           KL(p ‖ m)      KL(q ‖ m)                                       (X + Y) / 2,   m = (p + q) / 2

Why ``expm1`` (docs/maths.md §5): ``KL(p‖q) = E_p[u] − (lse_a − lse_b)`` is a small difference of
large numbers when p ≈ q. ``lse_b − lse_a = log E_p[e^{−u}] = log1p(E_p[expm1(−u)])`` is formed from
per-element differences instead, so the KL of two close distributions keeps its relative precision.
sym_kl is the sum of the two KLs formed that way, never ``E_p[u] − E_q[u]`` (which cancels when p ≈ q).
Backends clamp the argument of expm1 at ``EXPM1_CLAMP`` (e^80 is finite in fp32; an unclamped e^{−u}
overflows where p ≈ 0 and gives 0·inf = NaN). Each row then uses ``log1p(E[expm1(∓u)])`` where it agrees
with the plain ``lse_b − lse_a`` to within the plain form's own rounding
(``EXPM1_AGREE·(1 + |lse_a| + |lse_b|)``) and the plain difference elsewhere (far-apart rows, where the
clamp may have bitten and there is no cancellation to fear).
"""

from __future__ import annotations

import enum

import torch

# torch's and transformers' default ignore_index: a target row with this value is skipped (docs/maths.md §3).
# reference.py keeps its own literal on purpose (the ground truth imports nothing it checks).
IGNORE_INDEX = -100

__all__ = [
    "Divergence",
    "DIVERGENCES",
    "Stat",
    "N_PAIR_STATS",
    "UNDER_P",
    "UNDER_Q",
    "EXPM1_CLAMP",
    "EXPM1_AGREE",
    "ce_row_loss",
    "acc_dtype",
    "mean_scale",
    "divergence_from_stats",
]


class Divergence(enum.IntEnum):
    """Divergence ids (docs/maths.md §5); the Triton ``DIV`` constexpr and the C++ ``enum Div``."""

    SCE = 0
    KL = 1
    KL_REVERSE = 2
    SYM_KL = 3
    JS = 4

    @property
    def label(self) -> str:
        """The user-facing name (``"sce"``, ``"kl_reverse"``, ...)."""
        return self.name.lower()

    @classmethod
    def of(cls, name: str) -> "Divergence":
        """The id of a user-facing name; ValueError naming the choices otherwise."""
        try:
            return cls[name.upper()]
        except (KeyError, AttributeError):
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {name!r}") from None


DIVERGENCES = tuple(d.label for d in Divergence)


class Stat(enum.IntEnum):
    """Columns of the ``[N, N_PAIR_STATS]`` per-row statistics (table in this module's docstring)."""

    LSE_P = 0
    LSE_Q = 1
    LSET_P = 2
    LSET_Q = 3
    X = 4
    Y = 5
    X2 = 6
    Y2 = 7


N_PAIR_STATS = len(Stat)

#: Which softmax weights each accumulated expectation (the table above): the statistics listed under
#: UNDER_P are expectations under p = softmax(a), those under UNDER_Q under q = softmax(b). A split of the
#: vocabulary (Triton's split-V partials, a vocab-parallel shard) is merged by rescaling each with its own
#: view's normaliser. js is absent: its X, Y are formed in a second pass with the final normalisers.
UNDER_P = {
    Divergence.SCE: (Stat.X,),
    Divergence.KL: (Stat.X, Stat.Y),
    Divergence.KL_REVERSE: (),
    Divergence.SYM_KL: (Stat.X, Stat.X2),
}
UNDER_Q = {
    Divergence.SCE: (Stat.Y,),
    Divergence.KL: (),
    Divergence.KL_REVERSE: (Stat.X, Stat.Y),
    Divergence.SYM_KL: (Stat.Y, Stat.Y2),
}

EXPM1_CLAMP = 80.0
EXPM1_AGREE = 1e-6


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The accumulation dtype of docs/maths.md §7: fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 (gradcheck)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def mean_scale(total: torch.Tensor) -> torch.Tensor:
    """``1 / total`` for a ``mean`` over counted weight ``total``; 1 when it is 0 (the loss is then 0 with zero
    gradients, docs/maths.md §3, §11). Never a clamp at 1: token weights may sum to less than one row."""
    return 1.0 / torch.where(total > 0, total, torch.ones_like(total))


def ce_row_loss(lse: torch.Tensor, zy: torch.Tensor, zmean: torch.Tensor | None, valid: torch.Tensor,
                label_smoothing: float, z_loss: float) -> torch.Tensor:
    """docs/maths.md §3: ``(1−ε)(lse − z_y) + ε(lse − mean_v z) + λ·lse²``, 0 where not ``valid``.

    ``zmean`` (the mean of the softcapped logits over the FULL vocabulary) is only read when ε > 0.
    """
    loss = (1.0 - label_smoothing) * (lse - zy)
    if label_smoothing > 0:
        loss = loss + label_smoothing * (lse - zmean)
    if z_loss > 0:
        loss = loss + z_loss * lse * lse
    return torch.where(valid, loss, torch.zeros_like(loss))


def _log_ratio(stats: torch.Tensor, e_col: torch.Tensor, sign: float) -> torch.Tensor:
    """``sign·(lse_b − lse_a)`` from ``log1p(E[expm1(∓u)])`` where that agrees with the lse columns."""
    la, lb = stats[:, Stat.LSET_P], stats[:, Stat.LSET_Q]
    direct = sign * (lb - la)
    ok = torch.isfinite(e_col) & (e_col > -1.0)
    via = torch.log1p(torch.where(ok, e_col, torch.zeros_like(e_col)))
    agree = ok & ((via - direct).abs() <= EXPM1_AGREE * (1.0 + la.abs() + lb.abs()))
    return torch.where(agree, via, direct)


def divergence_from_stats(stats: torch.Tensor, divergence: str | Divergence) -> torch.Tensor:
    """Per-row divergence value ``[N]`` from the ``[N, 8]`` statistics of a pair forward."""
    d = divergence if isinstance(divergence, Divergence) else Divergence.of(divergence)
    X, Y = stats[:, Stat.X], stats[:, Stat.Y]
    if d == Divergence.SCE:
        return stats[:, Stat.LSET_P] + stats[:, Stat.LSET_Q] - X - Y
    if d == Divergence.KL:  # E_p[u] + (lse_b − lse_a)
        return X + _log_ratio(stats, Y, 1.0)
    if d == Divergence.KL_REVERSE:  # (lse_a − lse_b) − E_q[u]
        return _log_ratio(stats, X, -1.0) - Y
    if d == Divergence.SYM_KL:
        return (X + _log_ratio(stats, stats[:, Stat.X2], 1.0)) + (_log_ratio(stats, stats[:, Stat.Y2], -1.0) - Y)
    return 0.5 * (X + Y)  # js
