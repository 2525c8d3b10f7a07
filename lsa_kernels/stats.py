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
differences instead, so the KL of two close distributions keeps its relative precision (SPEC §5).
sym_kl is the sum of the two KLs formed that way, never ``E_p[u] - E_q[u]`` (which cancels when p ≈ q).

Gradients (per unit of a and b; multiply by 1/τ for z, then by softcap'(z_raw) = 1 - tanh²(z_raw/c)):

    sce          dD/da = p - q - p ⊙ (b - X)            dD/db = q - p - q ⊙ (a - Y)
    kl           dD/da = p ⊙ (u - X)                    dD/db = q - p
    kl_reverse   dD/da = p - q                          dD/db = q ⊙ (Y - u)
    sym_kl       dD/da = p ⊙ (u - X) + p - q            dD/db = q ⊙ (Y - u) + q - p
    js           dD/da = ½ p ⊙ (log p - log m - X)      dD/db = ½ q ⊙ (log q - log m - Y)
"""

from __future__ import annotations

import torch

from .options import STAT_LSET_P, STAT_LSET_Q, STAT_X, STAT_X2, STAT_Y, STAT_Y2


def divergence_from_stats(stats: torch.Tensor, divergence: str) -> torch.Tensor:
    """Per-row divergence value ``[N]`` from the ``[N, 8]`` statistics of a pair forward."""
    X, Y = stats[:, STAT_X], stats[:, STAT_Y]
    if divergence == "sce":
        return stats[:, STAT_LSET_P] + stats[:, STAT_LSET_Q] - X - Y
    if divergence == "kl":
        return X + torch.log1p(Y)
    if divergence == "kl_reverse":
        return torch.log1p(X) - Y
    if divergence == "sym_kl":
        return (X + torch.log1p(stats[:, STAT_X2])) + (torch.log1p(stats[:, STAT_Y2]) - Y)
    if divergence == "js":
        return 0.5 * (X + Y)
    raise ValueError(f"unknown divergence {divergence!r}")
