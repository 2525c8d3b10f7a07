"""Merging the partial per-row results of V-split forward launches (plain torch, no host sync).

A forward launch may split the vocabulary of each row block over S programs (``LaunchConfig.SPLIT_V``);
each writes its partial statistics to an ``[S, N, k]`` fp32 scratch whose column layout is named here
(:class:`CEPart`, :class:`PairPart`). Merging (docs/maths.md §14.1): for running maxima m_s and sums
s_s = Σ_{v in split s} e^{z_v − m_s},

    lse = M + log Σ_s s_s e^{m_s − M},   M = max_s m_s
    E[f] = Σ_s acc_s e^{m_s − M} / Σ_s s_s e^{m_s − M},   acc_s = Σ_{v in split s} e^{z_v − m_s} f_v

and plain sums (z_y, Σ_v z) add. The CE forward's per-token extras (kernels/ce.py, docs/maths.md §3):
with acc_s = Σ_{v in split s} e^{z_v − m_s}(z_v − m_s) and r_s = e^{m_s − M},

    H = (lse − M) − Σ_s r_s (acc_s + (m_s − M) s_s) / Σ_s r_s s_s          (entropy, both terms ≥ 0)
    argmax = the argmax of the first split s (in V order) with m_s = M      (ties → lowest index)
 The CE row loss is then :func:`lsa_kernels.maths.ce_row_loss` (§3) and the
divergence :func:`lsa_kernels.maths.divergence_from_stats` (§5).
"""

from __future__ import annotations

import enum

import torch

from ..maths import UNDER_P, Divergence, Stat, ce_row_loss


class CEPart(enum.IntEnum):
    """Columns of the CE forward's ``[S, N, 4]`` partials."""

    M = 0  # running max of z
    S = 1  # Σ e^{z − M}
    ZY = 2  # z at the target column (0 when the target is not in the split)
    SZ = 3  # Σ_v z (label smoothing only)


N_CE_PARTS = len(CEPart)


class PairPart(enum.IntEnum):
    """Columns of the pair phase-1 forward's ``[S, N, 16]`` partials (kernels/pair_phase1.py)."""

    M_P = 0  # CE statistics of view p: max, sum, z_y, Σz of z_p
    S_P = 1
    ZY_P = 2
    SZ_P = 3
    M_Q = 4  # the same for view q
    S_Q = 5
    ZY_Q = 6
    SZ_Q = 7
    M_A = 8  # max and sum of a = z_p/τ (equal to M_P, S_P when τ == 1)
    S_A = 9
    M_B = 10  # max and sum of b = z_q/τ
    S_B = 11
    X = 12  # the weighted sums behind the statistics X, Y, X2, Y2 (lsa_kernels.maths)
    Y = 13
    X2 = 14
    Y2 = 15


N_PAIR_PARTS = len(PairPart)

# Which softmax weights each accumulated statistic: lsa_kernels.maths.UNDER_P (the others are under q).


def merge_lse(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """lse from per-split running (max, sum) of shape ``[S, N]`` (S may be 1)."""
    if m.shape[0] == 1:
        return m[0] + torch.log(s[0])
    M = m.max(dim=0).values
    return M + torch.log((s * torch.exp(m - M)).sum(dim=0))


def merge_weighted(m: torch.Tensor, s: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """``Σ_s acc_s e^{m_s} / Σ_s s_s e^{m_s}`` from ``[S, N]`` partials: an expectation under the softmax."""
    if m.shape[0] == 1:
        return acc[0] / s[0]
    M = m.max(dim=0).values
    r = torch.exp(m - M)
    return (acc * r).sum(0) / (s * r).sum(0)


def ce_rows(lse: torch.Tensor, zy_parts: torch.Tensor, sz_parts: torch.Tensor, y: torch.Tensor, V: int,
            ignore_index: int, label_smoothing: float, z_loss: float) -> torch.Tensor:
    """The CE row loss from the merged lse and the ``[S, N]`` partial sums of z_y and Σ_v z."""
    zmean = sz_parts.sum(0) / V if label_smoothing > 0 else None
    return ce_row_loss(lse, zy_parts.sum(0), zmean, y != ignore_index, float(label_smoothing), float(z_loss))


def merge_ce(part: torch.Tensor, y: torch.Tensor, V: int, ignore_index: int, label_smoothing: float,
             z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_row, lse), both ``[N]``, from the CE forward's ``[S, N, 4]`` partials."""
    lse = merge_lse(part[..., CEPart.M], part[..., CEPart.S])
    loss = ce_rows(lse, part[..., CEPart.ZY], part[..., CEPart.SZ], y, V, ignore_index, label_smoothing, z_loss)
    return loss, lse


def merge_extras(part: torch.Tensor, lse: torch.Tensor, ent: torch.Tensor | None, am: torch.Tensor | None):
    """(entropy fp32 [N] or None, argmax int64 [N] or None) from the CE forward's partials ``[S, N, 4]``,
    the merged lse and the ``[S, N]`` extras (module docstring)."""
    m, s = part[..., CEPart.M], part[..., CEPart.S]
    M = m.max(dim=0).values
    h = idx = None
    if ent is not None:
        r = torch.exp(m - M)
        ez = (r * (ent + (m - M) * s)).sum(0) / (r * s).sum(0)  # E_p[z − M] ≤ 0
        h = (lse - M) - ez
    if am is not None:
        first = (m == M).to(torch.int32).argmax(dim=0)  # the first split holding the max
        idx = am.gather(0, first[None]).squeeze(0).to(torch.int64)
    return h, idx


def pair_stats(part: torch.Tensor, div: Divergence, temp_one: bool, stats: torch.Tensor) -> None:
    """Fill the columns of ``stats [N, 8]`` that phase 1 determines (for js: the lse columns only; its X, Y
    come from the second pass, kernels/pair_js.py)."""
    P = PairPart
    stats[:, Stat.LSE_P] = merge_lse(part[..., P.M_P], part[..., P.S_P])
    stats[:, Stat.LSE_Q] = merge_lse(part[..., P.M_Q], part[..., P.S_Q])
    if temp_one:  # a = z_p, b = z_q: the kernel stored the CE maxima and sums in the a, b columns too
        stats[:, Stat.LSET_P] = stats[:, Stat.LSE_P]
        stats[:, Stat.LSET_Q] = stats[:, Stat.LSE_Q]
    else:
        stats[:, Stat.LSET_P] = merge_lse(part[..., P.M_A], part[..., P.S_A])
        stats[:, Stat.LSET_Q] = merge_lse(part[..., P.M_B], part[..., P.S_B])
    if div == Divergence.JS:
        return
    cols = {Stat.X: P.X, Stat.Y: P.Y}
    if div == Divergence.SYM_KL:
        cols.update({Stat.X2: P.X2, Stat.Y2: P.Y2})
    for stat, col in cols.items():
        m, s = (P.M_A, P.S_A) if stat in UNDER_P[div] else (P.M_B, P.S_B)
        stats[:, stat] = merge_weighted(part[..., m], part[..., s], part[..., col])
