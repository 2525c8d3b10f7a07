"""Does a model use distant context? The copy-from-context probe and the recall metric.

Both take a ``logits_fn``: ``ids [batch, T] int64 -> logits [batch, T, vocab]`` (for a transformers causal
LM, :func:`lm_logits_fn`), so they can be checked with hand-built predictors.

- **Copy probe** (:func:`copy_probe_windows`, :func:`copy_probe`): a random span of ``span_len`` rare tokens
  at the end of a window and a first copy of it ``d`` tokens earlier; the loss of the second copy's tokens
  after its first (mean NLL, nats) with the first copy, and with the first copy replaced by other random rare
  tokens (same filler, same second copy). The gap ``loss_without - loss_with`` is what the first copy is worth:
  about ``log(pool size)`` for a perfect copier, 0 for a model that does not look back ``d`` tokens.
- **Recall** (:func:`recall_scores`): teacher-forced exact match of the answer tokens of
  :class:`~lsa_kernels.train.recall_data.RecallBatch` windows (greedy decoding reproduces the answer iff the
  argmax at every answer position is the answer token), per-token accuracy and answer NLL, by kind and distance
  bucket; ``truncated=True`` scores each answer on the window cut to start right after its source, where only
  chance remains (:func:`chance`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from .data import Corpus, DataError, eval_windows
from .recall_data import N_DIGITS, RecallBatch

__all__ = ["LogitsFn", "lm_logits_fn", "CopyProbe", "copy_probe_windows", "copy_probe", "recall_scores", "chance"]

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def lm_logits_fn(model, chunk: int = 32) -> LogitsFn:
    """``logits_fn`` of a transformers causal LM (eval mode, no grad, ``chunk`` rows per forward)."""

    @torch.no_grad()
    def fn(ids: torch.Tensor) -> torch.Tensor:
        dev = next(model.parameters()).device
        outs = [model(input_ids=ids[i : i + chunk].to(dev)).logits.float().cpu() for i in range(0, ids.shape[0], chunk)]
        return torch.cat(outs)

    return fn


@dataclass
class CopyProbe:
    distances: tuple
    with_copy: Dict[int, torch.Tensor]  # d -> [n, length]
    without_copy: Dict[int, torch.Tensor]
    span_len: int

    @property
    def length(self) -> int:
        return int(next(iter(self.with_copy.values())).shape[1])


def copy_probe_windows(pool: torch.Tensor, distances: Sequence[int] = (32, 96, 200), n: int = 64, length: int = 256,
                       span_len: int = 8, corpus: Optional[Corpus] = None, seed: int = 1234) -> CopyProbe:
    """``n`` probe windows of ``length`` tokens per distance: filler (``corpus`` windows, fixed by ``seed``, the same
    for every d; None: random ``pool`` tokens), the span at ``[length - span_len, length)``, its first copy at
    ``[length - span_len - d, length - d)`` — or, in the "without" windows, other random pool tokens there."""
    if not 1 <= n:
        raise DataError(f"n must be >= 1, got {n}")
    if not 2 <= span_len <= 64:
        raise DataError(f"span_len must be in [2, 64], got {span_len}")
    for d in distances:
        if not span_len <= d <= length - span_len:
            raise DataError(f"distance {d} must be in [{span_len}, {length - span_len}] (span_len, length - span_len)")
    g = torch.Generator().manual_seed(seed)
    if corpus is not None:
        filler = eval_windows(corpus, length, n, seed=seed)
    else:
        filler = pool[torch.randint(0, pool.numel(), (n, length), generator=g)]
    w, wo = {}, {}
    for d in distances:
        span = pool[torch.randint(0, pool.numel(), (n, span_len), generator=g)]
        other = pool[torch.randint(0, pool.numel(), (n, span_len), generator=g)]
        a = filler.clone()
        a[:, length - span_len :] = span
        b = a.clone()
        a[:, length - span_len - d : length - d] = span
        b[:, length - span_len - d : length - d] = other
        w[int(d)], wo[int(d)] = a, b
    return CopyProbe(tuple(int(d) for d in distances), w, wo, span_len)


def _span_nll(logits_fn: LogitsFn, ids: torch.Tensor, span_len: int) -> torch.Tensor:
    """Per-window mean NLL of the tokens at ``[L - span_len + 1, L)`` (the copy's tokens after its first)."""
    L = ids.shape[1]
    logits = logits_fn(ids)[:, L - span_len : L - 1].float()
    tgt = ids[:, L - span_len + 1 :]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none").view(tgt.shape).mean(1)


def copy_probe(logits_fn: LogitsFn, probe: CopyProbe) -> Dict[int, dict]:
    """``{d: {"gap", "loss_with", "loss_without", "gap_se"}}`` (nats; gap_se: standard error over windows)."""
    out = {}
    for d in probe.distances:
        lw = _span_nll(logits_fn, probe.with_copy[d], probe.span_len)
        lwo = _span_nll(logits_fn, probe.without_copy[d], probe.span_len)
        diff = lwo - lw
        se = float(diff.std() / diff.numel() ** 0.5) if diff.numel() > 1 else float("nan")
        out[d] = {"gap": float(diff.mean()), "loss_with": float(lw.mean()), "loss_without": float(lwo.mean()),
                  "gap_se": se}
    return out


def chance(kind: str, pool_size: int) -> dict:
    """Per-token accuracy and exact match of a predictor that knows the answer distribution but not the source:
    a fact digit is uniform over 10, a span token uniform over the pool."""
    if kind == "fact":
        return {"token_acc": 0.1, "exact": 0.1 ** N_DIGITS}
    if kind == "span":
        return {"token_acc": 1.0 / pool_size, "exact": 0.0}
    raise DataError(f"kind must be 'fact' or 'span', got {kind!r}")


def recall_scores(logits_fn: LogitsFn, batch: RecallBatch, truncated: bool = False) -> Dict[str, dict]:
    """Recall of ``batch``'s answers: ``{"KIND/BUCKET": {"n", "exact", "token_acc", "nll"}}`` plus ``"KIND/all"``.

    Full context: one forward per window. ``truncated``: each answer on its window cut to ``[cut, last answer
    position]`` (the source excluded), one forward per answer."""
    per: Dict[str, list] = defaultdict(list)
    if not truncated:
        logits = logits_fn(batch.ids)
    for a in batch.answers:
        if truncated:
            ids = batch.ids[a.window, a.cut : int(a.pos[-1]) + 1].unsqueeze(0)
            lg = logits_fn(ids)[0]
            pos = a.pos - a.cut
            tgt = ids[0, pos]
        else:
            lg = logits[a.window]
            pos = a.pos
            tgt = batch.ids[a.window, pos]
        lp = torch.log_softmax(lg[pos - 1].float(), dim=-1)
        hit = lp.argmax(-1) == tgt
        rec = (float(hit.all()), float(hit.float().mean()), float(-lp.gather(1, tgt[:, None]).mean()))
        per[f"{a.kind}/{a.bucket}"].append(rec)
        per[f"{a.kind}/all"].append(rec)
    out = {}
    for k, v in sorted(per.items()):
        t = torch.tensor(v)
        out[k] = {"n": len(v), "exact": float(t[:, 0].mean()), "token_acc": float(t[:, 1].mean()),
                  "nll": float(t[:, 2].mean())}
    return out
