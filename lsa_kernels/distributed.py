"""Vocabulary-parallel losses: the LM head sharded over the vocabulary across a process group.

Rank r holds ``W_r = W[s_r : s_r + V_r]`` (and ``b_r``). Every per-row statistic the losses need is
a log-sum-exp or an expectation under a softmax, and those merge exactly across shards:

    lse      = log Σ_r exp(lse_r)                                 (same for lse of z/τ)
    E_p[f]   = Σ_r ω_r E_{p_r}[f],   ω_r = exp(lseT_r − lseT)      p_r = softmax over shard r
    z_y      = the owner's x·W[y] + b[y] (softcapped);   Σ_v z_v = Σ_r x·(Σ_{v∈r} W_v) + Σ b

So :class:`VocabParallel` wraps a local backend (cpu or triton) into a backend that satisfies the same
contract (:mod:`lsa_kernels.backends`): forward = local pass over the shard + ONE all-gather of a few
fp32 scalars per row + the merge; backward = the local backend's backward with the merged statistics
(its gradient is then exactly the shard's slice of the full gradient), dW and db stay local, and dX is
all-reduced. No rows × V tensor is ever communicated.

Bytes on the wire per op and rank (N rows, H hidden, R ranks, fp32), against gathering the logits:

    forward  all_gather  R·N·k·4   (k = 3 for CE; 8 + 6 for a pair with CE)      vs  R·N·V_r·4
    backward all_reduce  ≈ 2·N·H·4 per input (ring)                               (same for any TP head)

Targets are global ids. On each rank a target outside the shard becomes ``V_r`` ("valid row, its
class lives on another shard": the backends add no one-hot for it), ``ignore_index`` stays.

Not supported: ``js`` (it needs log m per element with the global normalisers: a second exchange per
V tile) and ``label_smoothing`` together with ``softcap`` (Σ_v softcap(z_v) is not linear in W);
both raise a ValueError naming the combination.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from .options import (
    N_PAIR_STATS,
    STAT_LSE_P,
    STAT_LSE_Q,
    STAT_LSET_P,
    STAT_LSET_Q,
    STAT_X,
    STAT_X2,
    STAT_Y,
    STAT_Y2,
    CEOptions,
    PairOptions,
)
from .stats import divergence_from_stats

Tensor = torch.Tensor

# which expectation columns are under p (long view) and which under q, per divergence
_P_COLS = {"sce": (STAT_X,), "kl": (STAT_X, STAT_Y), "kl_reverse": (), "sym_kl": (STAT_X, STAT_X2)}
_Q_COLS = {"sce": (STAT_Y,), "kl": (), "kl_reverse": (STAT_X, STAT_Y), "sym_kl": (STAT_Y, STAT_Y2)}


@dataclass(frozen=True)
class Shard:
    """This rank's slice of the vocabulary and the group it belongs to."""

    group: object
    rank: int
    world: int
    vocab_start: int
    vocab_size: int  # V_r
    vocab_total: int  # V


_SHARDS: Dict[Tuple[int, int, int], Shard] = {}


def shard_info(group, vocab_start: int, vocab_size: int, device: torch.device) -> Shard:
    """Exchange (start, size) of every rank once per (group, shard) and check that they tile [0, V).

    The exchange is a collective (and a host sync); it is cached, so training steps do not repeat it.
    """
    key = (id(group), int(vocab_start), int(vocab_size))
    hit = _SHARDS.get(key)
    if hit is not None:
        return hit
    world = dist.get_world_size(group)
    mine = torch.tensor([vocab_start, vocab_size], dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    spans = sorted((int(p[0]), int(p[1])) for p in parts)
    pos = 0
    for start, size in spans:
        if start != pos or size < 1:
            raise ValueError(
                f"vocab shards must tile [0, V) without gaps or overlaps; got (vocab_start, V_r) per rank {spans}"
            )
        pos += size
    shard = Shard(group, dist.get_rank(group), world, int(vocab_start), int(vocab_size), pos)
    _SHARDS[key] = shard
    return shard


def _gather_rows(t: Tensor, shard: Shard) -> Tensor:
    """``[N, k]`` on each rank -> ``[R, N, k]`` on every rank."""
    parts = [torch.empty_like(t) for _ in range(shard.world)]
    dist.all_gather(parts, t.contiguous(), group=shard.group)
    return torch.stack(parts)


def _merge_lse(lse_r: Tensor) -> Tensor:
    """``[R, N]`` -> ``[N]``."""
    return torch.logsumexp(lse_r, dim=0)


class VocabParallel:
    """A backend (same contract as cpu / triton) over a vocab-sharded head. See the module docstring."""

    def __init__(self, local, shard: Shard):
        self.local = local
        self.shard = shard

    # -------------------------------------------------------------------------------- helpers
    def _local_targets(self, y: Optional[Tensor], ignore_index: int) -> Optional[Tensor]:
        if y is None:
            return None
        s, v = self.shard.vocab_start, self.shard.vocab_size
        inside = (y >= s) & (y < s + v)
        out = torch.where(inside, y - s, torch.full_like(y, v))
        return torch.where(y == ignore_index, y, out)

    def _opts(self, opts):
        if isinstance(opts, PairOptions):
            return dataclasses.replace(opts, ce=self._opts(opts.ce))
        return dataclasses.replace(opts, vocab_total=self.shard.vocab_total)

    def _ce_parts(self, x: Tensor, w: Tensor, b: Optional[Tensor], y: Tensor, opts: CEOptions) -> Tensor:
        """``[N, 2]``: this shard's contribution to (z_y, Σ_v z_v); zero where not applicable."""
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        x32, w32 = x.to(acc), w.to(acc)
        b32 = None if b is None else b.to(acc)
        yl = self._local_targets(y, opts.ignore_index)
        here = (yl >= 0) & (yl < self.shard.vocab_size) & (y != opts.ignore_index)
        idx = torch.where(here, yl, torch.zeros_like(yl))
        zy = (x32 * w32[idx]).sum(-1)
        if b32 is not None:
            zy = zy + b32[idx]
        if opts.has_softcap:
            zy = opts.softcap * torch.tanh(zy / opts.softcap)
        zy = torch.where(here, zy, torch.zeros_like(zy))
        if opts.label_smoothing > 0:
            zsum = x32 @ w32.sum(0)
            if b32 is not None:
                zsum = zsum + b32.sum()
        else:
            zsum = torch.zeros_like(zy)
        return torch.stack([zy, zsum], dim=1)

    @staticmethod
    def _ce_from(lse: Tensor, zy: Tensor, zsum: Tensor, y: Tensor, opts: CEOptions, V: int) -> Tensor:
        eps = opts.label_smoothing
        loss = (1.0 - eps) * (lse - zy)
        if eps > 0:
            loss = loss + eps * (lse - zsum / V)
        if opts.z_loss > 0:
            loss = loss + opts.z_loss * lse * lse
        return torch.where(y != opts.ignore_index, loss, torch.zeros_like(loss))

    # ------------------------------------------------------------------------------------- CE
    def ce_forward(self, x, w, b, y, opts: CEOptions):
        _, lse_r = self.local.ce_forward(x, w, b, self._local_targets(y, opts.ignore_index), self._opts(opts))
        parts = torch.cat([lse_r.unsqueeze(1), self._ce_parts(x, w, b, y, opts).to(lse_r.dtype)], dim=1)
        g = _gather_rows(parts, self.shard)  # [R, N, 3]
        lse = _merge_lse(g[:, :, 0])
        zy, zsum = g[:, :, 1].sum(0), g[:, :, 2].sum(0)
        return self._ce_from(lse, zy, zsum, y, opts, self.shard.vocab_total), lse

    def ce_backward(self, x, w, b, y, lse, coef, opts: CEOptions, dx_out, dw_out, db_out) -> None:
        self.local.ce_backward(
            x, w, b, self._local_targets(y, opts.ignore_index), lse, coef, self._opts(opts), dx_out, dw_out, db_out
        )
        if dx_out is not None:
            dist.all_reduce(dx_out, group=self.shard.group)

    # ----------------------------------------------------------------------------------- pairs
    def pair_forward(self, xp, xq, w, b, yp, yq, opts: PairOptions):
        ign = opts.ce.ignore_index
        _, _, _, st = self.local.pair_forward(
            xp, xq, w, b, self._local_targets(yp, ign), self._local_targets(yq, ign), self._opts(opts)
        )
        cols = [st]
        if opts.with_ce:
            cols += [self._ce_parts(xp, w, b, yp, opts.ce).to(st.dtype), self._ce_parts(xq, w, b, yq, opts.ce).to(st.dtype)]
        g = _gather_rows(torch.cat(cols, dim=1), self.shard)  # [R, N, 8 (+4)]
        merged = torch.empty_like(st)
        for c in (STAT_LSE_P, STAT_LSE_Q, STAT_LSET_P, STAT_LSET_Q):
            merged[:, c] = _merge_lse(g[:, :, c])
        wp = torch.exp(g[:, :, STAT_LSET_P] - merged[:, STAT_LSET_P])  # [R, N]
        wq = torch.exp(g[:, :, STAT_LSET_Q] - merged[:, STAT_LSET_Q])
        merged[:, STAT_X2] = 0.0
        merged[:, STAT_Y2] = 0.0
        for c in _P_COLS[opts.divergence]:
            merged[:, c] = (wp * g[:, :, c]).sum(0)
        for c in _Q_COLS[opts.divergence]:
            merged[:, c] = (wq * g[:, :, c]).sum(0)
        div = divergence_from_stats(merged, opts.divergence)
        V = self.shard.vocab_total
        if opts.with_ce:
            base = N_PAIR_STATS
            ce_p = self._ce_from(merged[:, STAT_LSE_P], g[:, :, base].sum(0), g[:, :, base + 1].sum(0), yp, opts.ce, V)
            ce_q = self._ce_from(merged[:, STAT_LSE_Q], g[:, :, base + 2].sum(0), g[:, :, base + 3].sum(0), yq, opts.ce, V)
        else:
            ce_p = ce_q = torch.zeros_like(div)
        return ce_p, ce_q, div, merged

    def pair_backward(self, xp, xq, w, b, yp, yq, stats, coef_ce_p, coef_ce_q, coef_div, opts: PairOptions,
                      dxp_out, dxq_out, dw_out, db_out) -> None:
        ign = opts.ce.ignore_index
        self.local.pair_backward(
            xp, xq, w, b, self._local_targets(yp, ign), self._local_targets(yq, ign), stats, coef_ce_p, coef_ce_q,
            coef_div, self._opts(opts), dxp_out, dxq_out, dw_out, db_out,
        )
        for d in (dxp_out, dxq_out):
            if d is not None:
                dist.all_reduce(d, group=self.shard.group)


def check_supported(divergence: Optional[str], label_smoothing: float, softcap: Optional[float]) -> None:
    """Raise for the combinations the vocab-parallel path does not compute (module docstring)."""
    if divergence == "js":
        raise ValueError("divergence='js' is not supported with process_group= (vocab-parallel heads); "
                         "use 'sce', 'kl', 'kl_reverse' or 'sym_kl'")
    if label_smoothing > 0 and softcap is not None:
        raise ValueError("label_smoothing > 0 together with softcap is not supported with process_group= "
                         "(the mean of softcapped logits does not merge across vocab shards)")
