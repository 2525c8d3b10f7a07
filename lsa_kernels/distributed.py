"""Vocabulary-parallel losses: the LM head sharded over the vocabulary across a process group.

Rank r holds ``W_r = W[s_r : s_r + V_r]`` (and ``b_r``). Every per-row statistic the losses need is
a log-sum-exp or an expectation under a softmax, and those merge exactly across shards:

    lse      = log Σ_r exp(lse_r)                                 (same for lse of z/τ)
    E_p[f]   = Σ_r ω_r E_{p_r}[f],   ω_r = exp(lseT_r − lseT)      p_r = softmax over shard r
    z_y      = the owner's softcap(x·W[y] + b[y]),   Σ_v z_v = Σ_r (Σ_{v∈r} z_v)
    js       X = Σ_r Σ_{v∈r} p_v log(p_v/m_v) with the GLOBAL p, q (a second exchange, below)

So :class:`VocabParallel` wraps a local backend (cpu or triton) into a backend that satisfies the same
contract (:mod:`lsa_kernels.backends`): forward = local pass over the shard + ONE all-gather of a few
fp32 scalars per row + the merge; backward = the local backend's backward with the merged statistics
(its gradient is then exactly the shard's slice of the full gradient), dW and db stay local, and dX is
all-reduced. No rows × V tensor is ever communicated.

``js`` cannot merge per-shard expectations (log m needs both GLOBAL normalisers per element), so its
forward is two rounds: the local pass yields the shard's lse values, they are merged as above, then the
local backend's ``pair_js_partial`` computes the shard's share of X and Y with the merged normalisers
(one more pass over the shard) and an all-reduce of ``[N, 2]`` sums them.

Label smoothing needs Σ_v z_v of the softcapped logits (not linear in W when there is a softcap). The
local forward runs with ε = 1 and λ = 0, so its per-row loss ``lse_r − Σ_{v∈r} z_v / V_r`` carries the
shard's sum, which is recovered as ``V_r·(lse_r − loss_r)`` (one rounding of lse_r; no extra pass).

Bytes on the wire per op and rank (N rows, H hidden, R ranks, fp32), against gathering the logits:

    forward  all_gather  R·N·k·4   (k = 3 for CE; 8 (+ 4 with CE) for a pair)    vs  R·N·V_r·4
             js only: + all_reduce of N·2·4
    backward all_reduce  ≈ 2·N·H·4 per input (ring)                               (same for any TP head)

Targets are global ids. On each rank a target outside the shard becomes ``V_r`` ("valid row, its
class lives on another shard": the backends add no one-hot for it), ``ignore_index`` stays.
"""

from __future__ import annotations

import dataclasses
import weakref
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
from .maths import ce_row_loss, divergence_from_stats

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


# (id(group), vocab_start, V_r) -> (weak reference to the group, the Shard without its group). The cache
# never keeps a process group alive: a group object that outlives destroy_process_group() is destroyed at
# interpreter exit, when gloo's worker threads can no longer take the GIL (an abort at exit).
_SHARDS: Dict[Tuple[int, int, int], Tuple["weakref.ref", "Shard"]] = {}


def shard_info(group, vocab_start: int, vocab_size: int, device: torch.device) -> Shard:
    """Exchange (start, size) of every rank once per (group, shard) and check that they tile [0, V).

    The exchange is a collective (and a host sync); it is cached, so training steps do not repeat it.
    """
    key = (id(group), int(vocab_start), int(vocab_size))
    hit = _SHARDS.get(key)
    if hit is not None and hit[0]() is group:
        return dataclasses.replace(hit[1], group=group)
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
    _SHARDS[key] = (weakref.ref(group), dataclasses.replace(shard, group=None))
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

    def _target_logit(self, x: Tensor, w: Tensor, b: Optional[Tensor], y: Tensor, opts: CEOptions) -> Tensor:
        """``[N]``: the (softcapped) target logit z_y where this shard owns y, else 0 (sums to z_y over ranks)."""
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        yl = self._local_targets(y, opts.ignore_index)
        here = (yl >= 0) & (yl < self.shard.vocab_size) & (y != opts.ignore_index)
        idx = torch.where(here, yl, torch.zeros_like(yl))
        zy = (x.to(acc) * w[idx].to(acc)).sum(-1)
        if b is not None:
            zy = zy + b[idx].to(acc)
        if opts.has_softcap:
            zy = opts.softcap * torch.tanh(zy / opts.softcap)
        return torch.where(here, zy, torch.zeros_like(zy))

    @staticmethod
    def _smoothing_opts(opts: CEOptions) -> CEOptions:
        """Options for the LOCAL forward: with ε > 0 it runs with ε = 1 and λ = 0, so that its per-row loss
        is ``lse_r − Σ_{v∈r} z_v / V_r`` and carries the shard's sum of (softcapped) logits."""
        if opts.label_smoothing > 0:
            return dataclasses.replace(opts, label_smoothing=1.0, z_loss=0.0)
        return opts

    def _zsum(self, loss_r: Tensor, lse_r: Tensor, opts: CEOptions) -> Tensor:
        """``[N]``: this shard's Σ_v z_v, recovered from the ε = 1 local loss (0 without label smoothing)."""
        if opts.label_smoothing > 0:
            return (lse_r - loss_r) * self.shard.vocab_size
        return torch.zeros_like(lse_r)

    @staticmethod
    def _ce_from(lse: Tensor, zy: Tensor, zsum: Tensor, y: Tensor, opts: CEOptions, V: int) -> Tensor:
        return ce_row_loss(lse, zy, zsum / V, y != opts.ignore_index, opts.label_smoothing, opts.z_loss)

    # ------------------------------------------------------------------------------------- CE
    def ce_forward(self, x, w, b, y, opts: CEOptions):
        loss_r, lse_r = self.local.ce_forward(
            x, w, b, self._local_targets(y, opts.ignore_index), self._smoothing_opts(self._opts(opts))
        )
        parts = torch.stack([lse_r, self._target_logit(x, w, b, y, opts).to(lse_r.dtype),
                             self._zsum(loss_r, lse_r, opts)], dim=1)
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
        js = opts.divergence == "js"
        lo = self._opts(opts)
        # js's sums need the global normalisers: the first pass only collects the lse (as sce, the cheapest)
        lo = dataclasses.replace(lo, ce=self._smoothing_opts(lo.ce), divergence="sce" if js else opts.divergence)
        ce_pr, ce_qr, _, st = self.local.pair_forward(
            xp, xq, w, b, self._local_targets(yp, ign), self._local_targets(yq, ign), lo
        )
        cols = [st]
        if opts.with_ce:
            cols += [torch.stack([self._target_logit(xp, w, b, yp, opts.ce).to(st.dtype),
                                  self._zsum(ce_pr, st[:, STAT_LSE_P], opts.ce),
                                  self._target_logit(xq, w, b, yq, opts.ce).to(st.dtype),
                                  self._zsum(ce_qr, st[:, STAT_LSE_Q], opts.ce)], dim=1)]
        g = _gather_rows(torch.cat(cols, dim=1), self.shard)  # [R, N, 8 (+4)]
        merged = torch.zeros_like(st)
        for c in (STAT_LSE_P, STAT_LSE_Q, STAT_LSET_P, STAT_LSET_Q):
            merged[:, c] = _merge_lse(g[:, :, c])
        if js:  # second exchange: every shard's Σ p log(p/m), Σ q log(q/m) under the global p, q
            part = self.local.pair_js_partial(
                xp, xq, w, b, merged[:, STAT_LSET_P : STAT_LSET_Q + 1].contiguous(), lo
            ).to(st.dtype).contiguous()
            dist.all_reduce(part, group=self.shard.group)
            merged[:, STAT_X], merged[:, STAT_Y] = part[:, 0], part[:, 1]
        else:
            wp = torch.exp(g[:, :, STAT_LSET_P] - merged[:, STAT_LSET_P])  # [R, N]
            wq = torch.exp(g[:, :, STAT_LSET_Q] - merged[:, STAT_LSET_Q])
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
