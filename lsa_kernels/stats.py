"""Per-row statistics shared by every backend: their meaning, and the divergence value they give.

A pair forward (CPU chunk or Triton tile loop) reduces each row pair to eight fp32 numbers
(columns of a ``[N, 8]`` tensor, indices in :mod:`lsa_kernels.options`):

    LSE_P, LSE_Q    lse(z_p), lse(z_q)            z = softcap(x W^T + b), used by CE
    LSET_P, LSET_Q  lse(a), lse(b)                a = z_p / τ, b = z_q / τ, used by the divergence
    X, Y, X2, Y2    divergence-specific expectations, with p = softmax(a), q = softmax(b), u = a - b
                    (X2, Y2 are used by sym_kl only and are 0 otherwise):

    divergence   X              Y              X2               Y2              value D
    sce          E_p[b]         E_q[a]                                          lse_a + lse_b - X - Y
    kl           E_p[u]         E_p[expm1(-u)]                                  X + log1p(Y)
    kl_reverse   E_q[expm1(u)]  E_q[u]                                          log1p(X) - Y
    sym_kl       E_p[u]         E_q[u]         E_p[expm1(-u)]   E_q[expm1(u)]   (X + log1p(X2)) + (log1p(Y2) - Y)
    js           KL(p || m)     KL(q || m)                                      (X + Y) / 2,   m = (p + q) / 2

Why ``expm1``: ``KL(p||q) = E_p[u] - (lse_a - lse_b)`` is a small difference of large numbers when
p ≈ q. ``lse_b - lse_a = log E_p[e^{-u}] = log1p(E_p[expm1(-u)])`` is formed from per-element
differences instead, so the KL of two close distributions keeps its relative precision (docs/maths.md §5).
sym_kl is the sum of the two KLs formed that way, never ``E_p[u] - E_q[u]`` (which cancels when p ≈ q).

The expm1 form is for close distributions. Backends clamp the argument of expm1 at ``EXPM1_CLAMP``
(e^80 is finite in fp32; an unclamped e^{-u} overflows where p ≈ 0 and gives 0·inf = NaN). Each row
then uses ``log1p(E[expm1(∓u)])`` where it agrees with the plain ``lse_b - lse_a`` to within the plain
form's own rounding (``EXPM1_AGREE·(1 + |lse_a| + |lse_b|)``) — close distributions, where it is the
precise one — and the plain difference elsewhere (far-apart rows, where the clamp may have bitten and
there is no cancellation to fear).
"""

from __future__ import annotations

import torch

from .options import STAT_LSET_P, STAT_LSET_Q, STAT_X, STAT_X2, STAT_Y, STAT_Y2


EXPM1_CLAMP = 80.0
EXPM1_AGREE = 1e-6


def _log_ratio(stats: torch.Tensor, e_col: torch.Tensor, sign: float) -> torch.Tensor:
    """``sign·(lse_b - lse_a)`` from ``log1p(E[expm1(∓u)])`` where that agrees with the lse columns."""
    la, lb = stats[:, STAT_LSET_P], stats[:, STAT_LSET_Q]
    direct = sign * (lb - la)
    ok = torch.isfinite(e_col) & (e_col > -1.0)
    via = torch.log1p(torch.where(ok, e_col, torch.zeros_like(e_col)))
    agree = ok & ((via - direct).abs() <= EXPM1_AGREE * (1.0 + la.abs() + lb.abs()))
    return torch.where(agree, via, direct)


def divergence_from_stats(stats: torch.Tensor, divergence: str) -> torch.Tensor:
    """Per-row divergence value ``[N]`` from the ``[N, 8]`` statistics of a pair forward."""
    X, Y = stats[:, STAT_X], stats[:, STAT_Y]
    if divergence == "sce":
        return stats[:, STAT_LSET_P] + stats[:, STAT_LSET_Q] - X - Y
    if divergence == "kl":  # E_p[u] + (lse_b - lse_a)
        return X + _log_ratio(stats, Y, 1.0)
    if divergence == "kl_reverse":  # (lse_a - lse_b) - E_q[u]
        return _log_ratio(stats, X, -1.0) - Y
    if divergence == "sym_kl":
        return (X + _log_ratio(stats, stats[:, STAT_X2], 1.0)) + (_log_ratio(stats, stats[:, STAT_Y2], -1.0) - Y)
    if divergence == "js":
        return 0.5 * (X + Y)
    raise ValueError(f"unknown divergence {divergence!r}")
