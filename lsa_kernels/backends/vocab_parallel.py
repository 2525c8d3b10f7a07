"""The vocabulary-parallel backend: a local backend (cpu or triton) over this rank's shard of the LM head.

Rank r holds ``W_r = W[s_r : s_r + V_r]`` (and ``b_r``); :func:`lsa_kernels.distributed.shard_info` finds
the shards. Every per-row statistic of docs/maths.md §3 and §5 is a log-sum-exp or an expectation under a
softmax, and those merge exactly across shards:

    lse      = log Σ_r exp(lse_r)                                 (same for lse of z/τ)
    E_p[f]   = Σ_r ω_r E_{p_r}[f],   ω_r = exp(lseT_r − lseT)      p_r = softmax over shard r
    z_y      = the owner's softcap(x·W[y] + b[y]),   Σ_v z_v = Σ_r (Σ_{v∈r} z_v)
    CE row   = lsa_kernels.maths.ce_row_loss(lse, z_y, Σ_v z_v / V, ...)   from the merged values
    js       X = Σ_r Σ_{v∈r} p_v log(p_v/m_v) with the GLOBAL p, q (a second exchange, below)

So :class:`VocabParallel` satisfies the same contract (:mod:`.contract`): forward = the local pass over
the shard + ONE all-gather of a few fp32 scalars per row + the merge; backward = the local backend's
backward with the merged statistics (its gradient is then exactly the shard's slice of the full
gradient), dW and db stay local, and every dx is all-reduced. No rows × V tensor is ever communicated.

``js`` cannot merge per-shard expectations (log m needs both GLOBAL normalisers per element), so its
forward is two rounds: the local pass yields the shard's lse values, they are merged as above, then the
local backend's ``pair_js_partial`` (capability ``js_partial``) computes the shard's share of X and Y
with the merged normalisers (one more pass over the shard) and an all-reduce of ``[N, 2]`` sums them.

Label smoothing needs Σ_v z_v of the softcapped logits (not linear in W when there is a softcap). The
local forward runs with ε = 1 and λ = 0, so its per-row loss ``lse_r − Σ_{v∈r} z_v / V_r`` carries the
shard's sum, which is recovered as ``V_r·(lse_r − loss_r)`` (one rounding of lse_r; no extra pass).

Bytes on the wire per op and rank (N rows, H hidden, R ranks, fp32), against gathering the logits:

    forward  all_gather  R·N·k·4   (k = 3 for CE; 8 (+ 4 with CE) for a pair)    vs  R·N·V_r·4
             js only: + all_reduce of N·2·4
    backward all_reduce  ≈ 2·N·H·4 per input (ring)                               (same for any TP head)

A second head (``wq``/``bq``, distillation: docs/maths.md §12) is view q's own shard of ITS head, split
over the ranks exactly as ``w`` (the same ``vocab_start`` and ``V_r`` on every rank); everything above holds
per view, with view q's target logit read from ``wq``/``bq``.

Targets are global ids. On each rank a target outside the shard becomes ``V_r`` ("valid row, its
class lives on another shard": the local backends add no one-hot for it), ``ignore_index`` stays.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

from ..maths import N_PAIR_STATS, UNDER_P, UNDER_Q, Divergence, Stat, acc_dtype, ce_row_loss, divergence_from_stats
from ..options import CEOptions, PairOptions
from .contract import Backend, Capabilities, CEOut, Grads, PairCoefs, PairGrads, PairOut, PairRows

if TYPE_CHECKING:
    from ..distributed import Shard

Tensor = torch.Tensor

def _gather_rows(t: Tensor, shard: "Shard") -> Tensor:
    """``[N, k]`` on each rank -> ``[R, N, k]`` on every rank."""
    parts = [torch.empty_like(t) for _ in range(shard.world)]
    dist.all_gather(parts, t.contiguous(), group=shard.group)
    return torch.stack(parts)


def _merge_lse(lse_r: Tensor) -> Tensor:
    """``[R, N]`` -> ``[N]``."""
    return torch.logsumexp(lse_r, dim=0)


class VocabParallel:
    """A backend over a vocab-sharded head (module docstring)."""

    name = "vocab_parallel"
    caps = Capabilities(fused_forward_backward=False, js_partial=False)

    def __init__(self, local: Backend, shard: "Shard"):
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

    def _local_rows(self, rows: PairRows, ignore_index: int) -> PairRows:
        t = self._local_targets
        return dataclasses.replace(rows, yp=t(rows.yp, ignore_index), yq=t(rows.yq, ignore_index),
                                   yu=t(rows.yu, ignore_index))

    def _opts(self, opts):
        if isinstance(opts, PairOptions):
            return dataclasses.replace(opts, ce=self._opts(opts.ce))
        return dataclasses.replace(opts, vocab_total=self.shard.vocab_total)

    def _target_logit(self, x: Tensor, w: Tensor, b: Optional[Tensor], y: Tensor, opts: CEOptions) -> Tensor:
        """``[N]``: the (softcapped) target logit z_y where this shard owns y, else 0 (sums to z_y over ranks);
        zeros for a view without targets (``y`` None)."""
        acc = acc_dtype(x)
        if y is None:
            return torch.zeros(x.shape[0], dtype=acc, device=x.device)
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

    def _ce_from(self, lse: Tensor, zy: Tensor, zsum: Tensor, y: Optional[Tensor], opts: CEOptions) -> Tensor:
        if y is None:  # a view without CE (contract)
            return torch.zeros_like(lse)
        return ce_row_loss(lse, zy, zsum / self.shard.vocab_total, y != opts.ignore_index, opts.label_smoothing,
                           opts.z_loss)

    def _all_reduce(self, *ts: Optional[Tensor]) -> None:
        for t in ts:
            if t is not None:
                dist.all_reduce(t, group=self.shard.group)

    # ------------------------------------------------------------------------------------- CE
    def ce_forward(self, x, w, b, y, opts: CEOptions) -> CEOut:
        out = self.local.ce_forward(x, w, b, self._local_targets(y, opts.ignore_index),
                                    self._smoothing_opts(self._opts(opts)))
        parts = torch.stack([out.lse, self._target_logit(x, w, b, y, opts).to(out.lse.dtype),
                             self._zsum(out.loss, out.lse, opts)], dim=1)
        g = _gather_rows(parts, self.shard)  # [R, N, 3]
        lse = _merge_lse(g[:, :, 0])
        return CEOut(self._ce_from(lse, g[:, :, 1].sum(0), g[:, :, 2].sum(0), y, opts), lse)

    def ce_backward(self, x, w, b, y, lse, coef, opts: CEOptions, grads: Grads) -> None:
        self.local.ce_backward(x, w, b, self._local_targets(y, opts.ignore_index), lse, coef, self._opts(opts), grads)
        self._all_reduce(grads.dx)

    # ----------------------------------------------------------------------------------- pairs
    def pair_forward(self, rows: PairRows, w, b, opts: PairOptions, *, wq=None, bq=None) -> PairOut:
        if wq is not None and rows.has_unpaired:
            raise ValueError("CE-only rows (xu) are not supported with a second head")
        wq_, bq_ = (w, b) if wq is None else (wq, bq)  # view q's head: its own shard with the same vocab split
        ign = opts.ce.ignore_index
        js = opts.divergence == "js"
        if js and not self.local.caps.js_partial:
            raise ValueError(f"divergence='js' over a vocab-parallel head needs pair_js_partial; the "
                             f"{self.local.name} backend has none")
        lo = self._opts(opts)
        # js's sums need the global normalisers: the first pass only collects the lse (as sce, the cheapest)
        lo = dataclasses.replace(lo, ce=self._smoothing_opts(lo.ce), divergence="sce" if js else opts.divergence)
        pair_rows = PairRows(rows.xp, rows.xq, rows.yp, rows.yq)
        loc = self.local.pair_forward(self._local_rows(pair_rows, ign), w, b, lo, wq=wq, bq=bq)
        st = loc.stats
        cols = [st]
        if opts.with_ce:
            cols += [torch.stack([self._target_logit(rows.xp, w, b, rows.yp, opts.ce).to(st.dtype),
                                  self._zsum(loc.ce_p, st[:, Stat.LSE_P], opts.ce),
                                  self._target_logit(rows.xq, wq_, bq_, rows.yq, opts.ce).to(st.dtype),
                                  self._zsum(loc.ce_q, st[:, Stat.LSE_Q], opts.ce)], dim=1)]
        g = _gather_rows(torch.cat(cols, dim=1), self.shard)  # [R, N, 8 (+4)]
        merged = torch.zeros_like(st)
        for c in (Stat.LSE_P, Stat.LSE_Q, Stat.LSET_P, Stat.LSET_Q):
            merged[:, c] = _merge_lse(g[:, :, c])
        if js:  # second exchange: every shard's Σ p log(p/m), Σ q log(q/m) under the global p, q
            part = self.local.pair_js_partial(
                rows.xp, rows.xq, w, b, merged[:, Stat.LSET_P : Stat.LSET_Q + 1].contiguous(), lo, wq=wq, bq=bq
            ).to(st.dtype).contiguous()
            dist.all_reduce(part, group=self.shard.group)
            merged[:, Stat.X], merged[:, Stat.Y] = part[:, 0], part[:, 1]
        else:
            sp = torch.exp(g[:, :, Stat.LSET_P] - merged[:, Stat.LSET_P])  # [R, N]: each shard's share of the view's normaliser (not the heads wq)
            sq = torch.exp(g[:, :, Stat.LSET_Q] - merged[:, Stat.LSET_Q])
            for c in UNDER_P[Divergence.of(opts.divergence)]:
                merged[:, c] = (sp * g[:, :, c]).sum(0)
            for c in UNDER_Q[Divergence.of(opts.divergence)]:
                merged[:, c] = (sq * g[:, :, c]).sum(0)
        div = divergence_from_stats(merged, opts.divergence)
        if opts.with_ce:
            k = N_PAIR_STATS
            ce_p = self._ce_from(merged[:, Stat.LSE_P], g[:, :, k].sum(0), g[:, :, k + 1].sum(0), rows.yp, opts.ce)
            ce_q = self._ce_from(merged[:, Stat.LSE_Q], g[:, :, k + 2].sum(0), g[:, :, k + 3].sum(0), rows.yq, opts.ce)
        else:
            ce_p = ce_q = torch.zeros_like(div)
        ce_u = lse_u = None
        if rows.has_unpaired:
            u = self.ce_forward(rows.xu, w, b, rows.yu, opts.ce)
            ce_u, lse_u = u.loss, u.lse
        return PairOut(ce_p, ce_q, div, merged, ce_u, lse_u)

    def pair_backward(self, rows: PairRows, w, b, saved: PairOut, coefs: PairCoefs, opts: PairOptions,
                      grads: PairGrads, *, wq=None, bq=None) -> None:
        self.local.pair_backward(self._local_rows(rows, opts.ce.ignore_index), w, b, saved, coefs, self._opts(opts),
                                 grads, wq=wq, bq=bq)
        self._all_reduce(grads.dxp, grads.dxq, grads.dxu if rows.has_unpaired else None)

    def pair_js_partial(self, xp, xq, w, b, lset, opts, *, wq=None, bq=None):
        raise NotImplementedError("VocabParallel has no pair_js_partial (caps.js_partial)")

    def ce_forward_backward(self, x, w, b, y, opts, coef, grads):
        raise NotImplementedError("VocabParallel has no fused forward+backward (caps.fused_forward_backward)")

    def pair_forward_backward(self, rows, w, b, opts, coefs, grads, *, wq=None, bq=None):
        raise NotImplementedError("VocabParallel has no fused forward+backward (caps.fused_forward_backward)")
