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

    forward  all_gather  R·N·k·4   (k = 3 for CE, +1 entropy, +2 argmax; 8 (+ 4 with CE) for a pair)
                                                                                 vs  R·N·V_r·4
             js only: + all_reduce of N·2·4
             dense targets (ce_dense_forward): R·N·5·4
    backward all_reduce  ≈ 2·N·H·4 per input (ring)                               (same for any TP head)

A second head (``wq``/``bq``, distillation: docs/maths.md §12) is view q's own shard of ITS head, split
over the ranks exactly as ``w`` (the same ``vocab_start`` and ``V_r`` on every rank); everything above holds
per view, with view q's target logit read from ``wq``/``bq``.

Targets are global ids. On each rank a target outside the shard becomes ``V_r`` ("valid row, its
class lives on another shard": the local backends add no one-hot for it), ``ignore_index`` stays.

Per-token outputs of the CE (docs/maths.md §15), in the same exchange (+1 column for the entropy, +2 the argmax):

    entropy  H = Σ_r ω_r (H_r + lse − lse_r)        (H_r the shard's own entropy; every term ≥ 0)
             gradient: the local ce_backward with coef_entropy and the MERGED lse and H is the shard's slice
    argmax   each shard's (max_{v∈r} z_v, its global id): the max read back at the local argmax by a row-wise
             dot (as z_y); the largest wins, ties -> the lowest global id (torch.argmax); the id rides in the
             float exchange while V ≤ 2^24 (fp32; else one all-gather of int64 ids)

and the long-short per-view extras (PairOut.entropy / .argmax, columns p and q; the CE-only rows xu through
:meth:`VocabParallel.ce_forward`) the same way in the pair forward's exchange, each view from its own lse(z).

Dense targets (probability targets, class-weighted label smoothing; contract ``ce_dense_*``, lsa_kernels.weights,
docs/maths.md §11, §15): each rank runs the local dense op on its columns of t (the full ``[N, V]`` sliced, or
this rank's ``[N, V_r]`` as given) and of c, with its local targets; the sums Σ t c z, Σ t c, Σ c z and z_y
add over the shards and lse merges as above, in ONE all-gather of ``[N, 5]``. Backward: the local dense
backward with the merged lse (and the caller's per-row coefficients), dx all-reduced; a full t's gradient is
the shards' columns put in place and all-reduced (``[N, V]``, only when t requires grad).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

from ..maths import N_PAIR_STATS, UNDER_P, UNDER_Q, Divergence, Stat, acc_dtype, ce_row_loss, divergence_from_stats
from ..options import CEOptions, PairOptions
from .contract import Backend, Capabilities, CEOut, DenseOut, DenseTarget, Grads, PairCoefs, PairGrads, PairOut, PairRows

if TYPE_CHECKING:
    from ..distributed import Shard

Tensor = torch.Tensor

def _gather_rows(t: Tensor, shard: "Shard") -> Tensor:
    """``[N, k]`` on each rank -> ``[R, N, k]`` on every rank."""
    parts = [torch.empty_like(t) for _ in range(shard.world)]
    dist.all_gather(parts, t.contiguous(), group=shard.group)
    return torch.stack(parts)


def _col(t: Optional[Tensor], j: int) -> Optional[Tensor]:
    """Column ``j`` of a per-view ``[N, 2]`` tensor (None stays None)."""
    return None if t is None else t[:, j]


def _merge_lse(lse_r: Tensor) -> Tensor:
    """``[R, N]`` -> ``[N]``."""
    return torch.logsumexp(lse_r, dim=0)


# the largest vocabulary whose ids a float of this dtype holds exactly (2^mantissa+1)
_EXACT_INT = {torch.float32: 1 << 24, torch.float64: 1 << 53}


def merge_entropy(lse_r: Tensor, lse: Tensor, ent_r: Tensor) -> Tensor:
    """``[R, N]`` shard lse and entropies, ``[N]`` merged lse -> the entropy of the whole row ``[N]``:
    ``H = Σ_r ω_r (H_r + lse − lse_r)``, ω_r = exp(lse_r − lse) (docs/maths.md §15; every term ≥ 0)."""
    d = lse.unsqueeze(0) - lse_r
    return (torch.exp(-d) * (ent_r + d)).sum(0)


def merge_argmax(val_r: Tensor, idx_r: Tensor) -> Tensor:
    """``[R, N]`` (max logit of each shard, its global id) -> the global argmax ``[N]``: the shard with the
    largest max, ties -> the lowest global id (as torch.argmax; docs/maths.md §15)."""
    best = val_r.amax(0, keepdim=True)
    cand = torch.where(val_r == best, idx_r, torch.full_like(idx_r, torch.iinfo(torch.int64).max))
    return cand.amin(0)


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

    @staticmethod
    def _row_logit(x: Tensor, w: Tensor, b: Optional[Tensor], idx: Tensor, opts: CEOptions) -> Tensor:
        """``[N]``: the (softcapped) logit ``z_i[idx_i]`` of each row for LOCAL indices ``idx`` (a row-wise dot)."""
        acc = acc_dtype(x)
        z = (x.to(acc) * w[idx].to(acc)).sum(-1)
        if b is not None:
            z = z + b[idx].to(acc)
        if opts.has_softcap:
            z = opts.softcap * torch.tanh(z / opts.softcap)
        return z

    def _target_logit(self, x: Tensor, w: Tensor, b: Optional[Tensor], y: Tensor, opts: CEOptions) -> Tensor:
        """``[N]``: the (softcapped) target logit z_y where this shard owns y, else 0 (sums to z_y over ranks);
        zeros for a view without targets (``y`` None)."""
        if y is None:
            return torch.zeros(x.shape[0], dtype=acc_dtype(x), device=x.device)
        yl = self._local_targets(y, opts.ignore_index)
        here = (yl >= 0) & (yl < self.shard.vocab_size) & (y != opts.ignore_index)
        zy = self._row_logit(x, w, b, torch.where(here, yl, torch.zeros_like(yl)), opts)
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
    def _packed(self, dt: torch.dtype) -> bool:
        """Whether the global ids ride in the float exchange exactly (V ≤ 2^24 in fp32)."""
        return self.shard.vocab_total <= _EXACT_INT[dt]

    def _extra_cols(self, x, w, b, ent, am, opts: CEOptions, dt):
        """The per-token extras' columns of one view for the exchange (module docstring): ``[H_r]`` with
        opts.entropy, ``[max_{v∈r} z_v (, its global id)]`` with opts.argmax; and the global ids ``[N]``."""
        cols, ids = [], None
        if opts.entropy:
            cols.append(ent.to(dt))
        if opts.argmax:
            am = am.to(torch.int64)
            ids = am + self.shard.vocab_start
            cols.append(self._row_logit(x, w, b, am, opts).to(dt))
            if self._packed(dt):
                cols.append(ids.to(dt))
        return cols, ids

    def _merge_extras(self, g: Tensor, k: int, lse_col: int, lse: Tensor, ids, opts: CEOptions):
        """(entropy, argmax, next column) of one view from the gathered ``g [R, N, ·]`` whose extras start at
        column ``k`` (:meth:`_extra_cols`); ``lse_col`` is the view's shard-lse column, ``lse`` its merge."""
        ent = am = None
        if opts.entropy:
            ent = merge_entropy(g[:, :, lse_col], lse, g[:, :, k])
            k += 1
        if opts.argmax:
            packed = self._packed(g.dtype)
            idx = g[:, :, k + 1].to(torch.int64) if packed else _gather_rows(ids.unsqueeze(1), self.shard)[:, :, 0]
            am = merge_argmax(g[:, :, k], idx)
            k += 2 if packed else 1
        return ent, am, k

    def ce_forward(self, x, w, b, y, opts: CEOptions) -> CEOut:
        out = self.local.ce_forward(x, w, b, self._local_targets(y, opts.ignore_index),
                                    self._smoothing_opts(self._opts(opts)))
        dt = out.lse.dtype
        extra, ids = self._extra_cols(x, w, b, out.entropy, out.argmax, opts, dt)
        cols = [out.lse, self._target_logit(x, w, b, y, opts).to(dt), self._zsum(out.loss, out.lse, opts)] + extra
        g = _gather_rows(torch.stack(cols, dim=1), self.shard)  # [R, N, 3 (+1 entropy) (+2 argmax)]
        lse = _merge_lse(g[:, :, 0])
        loss = self._ce_from(lse, g[:, :, 1].sum(0), g[:, :, 2].sum(0), y, opts)
        ent, am, _ = self._merge_extras(g, 3, 0, lse, ids, opts)
        return CEOut(loss, lse, ent, am)

    def ce_backward(self, x, w, b, y, lse, coef, opts: CEOptions, grads: Grads, *, coef_entropy=None, entropy=None,
                    reduce_dx: bool = True) -> None:
        """The local backward with the MERGED ``lse`` (and merged ``entropy``): its dz is exactly this shard's
        slice of the full dz (module docstring). ``reduce_dx=False`` leaves ``grads.dx`` as this shard's share
        (for a caller that all-reduces it together with other per-shard terms: lsa_kernels.weights)."""
        kw = {} if coef_entropy is None else dict(coef_entropy=coef_entropy, entropy=entropy)
        self.local.ce_backward(x, w, b, self._local_targets(y, opts.ignore_index), lse, coef, self._opts(opts), grads,
                               **kw)
        if reduce_dx:
            self._all_reduce(grads.dx)

    # ----------------------------------------------------------------------------- dense targets
    def _local_dense(self, T: DenseTarget) -> DenseTarget:
        s, v = self.shard.vocab_start, self.shard.vocab_size
        t = T.t
        if t is not None and t.shape[-1] != v:
            t = t[:, s : s + v]
        c = None if T.c is None else T.c[s : s + v]
        return dataclasses.replace(T, t=t, c=c)

    def ce_dense_forward(self, x, w, b, y, T: DenseTarget, opts: CEOptions) -> DenseOut:
        yl = None if y is None else self._local_targets(y, opts.ignore_index)
        out = self.local.ce_dense_forward(x, w, b, yl, self._local_dense(T), self._opts(opts))
        g = _gather_rows(torch.stack([out.lse, out.tz, out.tm, out.cz, out.zy], dim=1), self.shard)  # [R, N, 5]
        s = g[:, :, 1:].sum(0)
        return DenseOut(_merge_lse(g[:, :, 0]), s[:, 0], s[:, 1], s[:, 2], s[:, 3])

    def ce_dense_backward(self, x, w, b, y, T: DenseTarget, lse, coef_p, coef, opts: CEOptions, grads: Grads, *,
                          dt=None) -> None:
        yl = None if y is None else self._local_targets(y, opts.ignore_index)
        Tl = self._local_dense(T)
        full = dt is not None and T.t is not None and T.t.shape[-1] != self.shard.vocab_size
        dtl = None
        if dt is not None:
            dtl = torch.empty(Tl.t.shape, dtype=dt.dtype, device=dt.device) if full else dt
        self.local.ce_dense_backward(x, w, b, yl, Tl, lse, coef_p, coef, self._opts(opts), grads, dt=dtl)
        self._all_reduce(grads.dx)
        if full:
            dt.zero_()
            dt[:, self.shard.vocab_start : self.shard.vocab_start + self.shard.vocab_size] = dtl
            self._all_reduce(dt)

    def ce_dense_forward_backward(self, x, w, b, y, T, opts, coef, grads, *, dt=None):
        raise NotImplementedError("VocabParallel has no fused forward+backward (caps.fused_forward_backward)")

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
        k_extra = sum(c.shape[1] for c in cols)
        ex = opts.ce.entropy or opts.ce.argmax  # per-view extras (docs/maths.md §4, §15): merged like the CE's
        if ex:
            ex_p, ids_p = self._extra_cols(rows.xp, w, b, _col(loc.entropy, 0), _col(loc.argmax, 0), opts.ce, st.dtype)
            ex_q, ids_q = self._extra_cols(rows.xq, wq_, bq_, _col(loc.entropy, 1), _col(loc.argmax, 1), opts.ce,
                                           st.dtype)
            cols += [torch.stack(ex_p + ex_q, dim=1)]
        g = _gather_rows(torch.cat(cols, dim=1), self.shard)  # [R, N, 8 (+4 CE) (+ extras)]
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
        ent = am = None
        if ex:
            e_p, a_p, k = self._merge_extras(g, k_extra, Stat.LSE_P, merged[:, Stat.LSE_P], ids_p, opts.ce)
            e_q, a_q, _ = self._merge_extras(g, k, Stat.LSE_Q, merged[:, Stat.LSE_Q], ids_q, opts.ce)
            ent = None if e_p is None else torch.stack([e_p, e_q], 1)
            am = None if a_p is None else torch.stack([a_p, a_q], 1)
        ce_u = lse_u = ent_u = am_u = None
        if rows.has_unpaired:  # the CE's own merge, extras included
            u = self.ce_forward(rows.xu, w, b, rows.yu, opts.ce)
            ce_u, lse_u, ent_u, am_u = u.loss, u.lse, u.entropy, u.argmax
        return PairOut(ce_p, ce_q, div, merged, ce_u, lse_u, ent, am, ent_u, am_u)

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
