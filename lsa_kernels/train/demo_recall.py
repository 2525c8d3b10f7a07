"""The recall testbed's evaluation for ``lsa demo --data recall``: the pilot gate and the per-length metrics.

Held-out windows of the shipped corpus with recall structure written in (:mod:`.recall_data`: repeated spans of
rare tokens and "NAME's number is DDDD." facts, each queried ``d`` tokens later), so that the tokens that need
distant context are known by construction — the *key tokens* are the answers; no reference model picks them.

- :func:`gate`: before any arm runs, the base must retrieve in its own window (:func:`run_gate`: the base
  unextended; the extended base's score is recorded beside it). On windows of the base's own length (distances
  inside them), its teacher-forced exact match of the answers must be >= ``GATE_EXACT`` for
  spans and for facts, and with each answer's window cut right after its source (the source excluded) its
  per-token accuracy must fall to chance (<= ``2 x chance + 0.02``). The demo stops with this verdict instead of
  writing a table when it fails.
- :func:`length_metrics`: per evaluated length L, on ``n`` windows of L tokens (the same windows for every
  model): natural-token perplexity (every target that is filler text), key-token perplexity (the answers),
  recall exact match and per-token accuracy by kind and by distance bucket, the bucket boundaries being absolute
  distances (:data:`BUCKETS`) so that a bucket means the same at every length.
- LongPPL as a secondary check (:func:`evaluate_models`): the first model evaluated (the extended base, whose
  configured positions cover every evaluated length: an in-window evaluator) picks key tokens blind, with a
  relative threshold (:func:`longppl_keys`: full-context loss <= 0.5 x the loss with 128-256 tokens of context,
  :func:`short_context_nll`); every model's perplexity on them is ``LongPPL(rel)@L``, and the evaluator's picks are
  checked against the known answers (``LongPPL key precision`` / ``coverage``).
"""

from __future__ import annotations

import math
import json
import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .recall_data import RecallBatch, RecallWindows
from .recall_eval import chance, lm_logits_fn, recall_scores

__all__ = ["BUCKETS", "GATE_EXACT", "LONGPPL_RATIO", "LONGPPL_SHORT", "short_context_nll", "longppl_keys", "answer_mask", "buckets_for", "recall_batch", "gate", "length_metrics", "metric_names",
           "verdict_metrics", "run_gate", "evaluate_models", "plot_recall"]

# absolute distance buckets (inclusive): near / mid fit the 256-token training window's short half, far the rest
# of it, beyond and farthest exist only at 512 and 1024 tokens
BUCKETS = (("near", 16, 64), ("mid", 65, 128), ("far", 129, 240), ("beyond", 241, 496), ("farthest", 497, 1008))
GATE_EXACT = 0.5
EVAL_SEED = 4321


def buckets_for(length: int):
    """The :data:`BUCKETS` a window of ``length`` tokens can hold (a fact is up to 15 tokens long)."""
    return tuple(b for b in BUCKETS if b[2] + 16 <= length)


def recall_batch(length: int, n: int, pool, corpus, tok, buckets=None, seed: int = EVAL_SEED) -> RecallBatch:
    """``n`` held-out windows of ``length`` tokens, 2 spans and 2 facts each, distances cycled over ``buckets``."""
    w = RecallWindows(length, pool, seed=seed, corpus=corpus, tok=tok, n_spans=2, n_facts=2,
                      buckets=buckets or buckets_for(length))
    return w.batch(0, n)


def gate(model, pool, corpus, tok, length: int, n: int = 64, exact: float = GATE_EXACT) -> dict:
    """The pilot gate on ``model`` at ``n`` windows of ``length`` tokens (its trained length) holding one span and
    ``n`` holding one fact, at distances 12 .. length - 20: ``{"passed", "line",
    "full": recall_scores, "truncated": recall_scores, "chance": ...}``."""
    bk = (("near", 12, length // 4), ("mid", length // 4 + 1, length - 20))
    fn = lm_logits_fn(model)
    full, cut = {}, {}
    for k, (ns, nf) in enumerate(((1, 0), (0, 1))):  # one item per window: a span and a fact need not fit together
        b = RecallWindows(length, pool, seed=EVAL_SEED + k, corpus=corpus, tok=tok, n_spans=ns, n_facts=nf,
                          buckets=bk).batch(0, n)
        full.update(recall_scores(fn, b))
        cut.update(recall_scores(fn, b, truncated=True))
    ch = {k: chance(k, int(pool.numel())) for k in ("span", "fact")}
    ok_full = all(full[f"{k}/all"]["exact"] >= exact for k in ch)
    ok_cut = all(cut[f"{k}/all"]["token_acc"] <= 2 * ch[k]["token_acc"] + 0.02 for k in ch)
    parts = ", ".join(f"{k} exact {full[f'{k}/all']['exact']:.2f} (truncated token accuracy "
                      f"{cut[f'{k}/all']['token_acc']:.3f}, chance {ch[k]['token_acc']:.3g})" for k in ch)
    line = (f"gate at {length} tokens: {parts} -> {'PASS' if ok_full and ok_cut else 'FAIL'} (needs exact >= "
            f"{exact:g} for spans and facts with the source in the window, and chance without it)")
    return {"passed": bool(ok_full and ok_cut), "line": line, "exact_needed": exact, "full": full, "truncated": cut, "chance": ch,
            "length": length, "n_windows": n}


def answer_mask(b: RecallBatch) -> torch.Tensor:
    """``[n, L - 1]`` bool over the logit positions: True where the next token is an answer (a key token)."""
    mask = torch.zeros(b.ids.shape[0], b.ids.shape[1] - 1, dtype=torch.bool)
    for a in b.answers:
        mask[a.window, a.pos - 1] = True
    return mask


@torch.no_grad()
def length_metrics(model, batches: Dict[int, RecallBatch], parts: Optional[dict] = None,
                   nll_out: Optional[dict] = None) -> Dict[str, float]:
    """``{"natPPL@L", "keyPPL@L", "recall@L", "recall(span)@L", "recall(fact)@L", "recall@L/BUCKET"}`` for every
    length L of ``batches`` (recall = teacher-forced exact match, over spans and facts).

    ``parts`` (a dict, filled in): per window, the additive pieces of the pooled metrics, ``{"natPPL@L": {"kind":
    "ppl", "num": [NLL sum per window], "den": [token count per window]}, "keyPPL@L": ..., "recall@L": {"kind":
    "frac", "num": [exact answers], "den": [answers]}}``: a metric is ``exp(sum num / sum den)`` (ppl) or ``sum num
    / sum den`` (frac) over any set of windows, which is what a bootstrap over windows resamples
    (:func:`~lsa_kernels.train.demo_stats.bootstrap_ci`). ``nll_out`` (a dict, filled in): ``{L: [n, L - 1]}`` the
    loss of every target with the full context."""
    fn = lm_logits_fn(model)
    out: Dict[str, float] = {}
    for L, b in batches.items():
        logits = fn(b.ids)
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b.ids[:, 1:].reshape(-1),
                              reduction="none").view(b.ids.shape[0], -1)
        natural = ~b.inserted[:, 1:]
        key = answer_mask(b)
        if nll_out is not None:
            nll_out[L] = nll
        out[f"natPPL@{L}"] = math.exp(float(nll[natural].mean()))
        out[f"keyPPL@{L}"] = math.exp(float(nll[key].mean()))
        sc = recall_scores(lambda ids, _lg=logits: _lg, b)
        if parts is not None:
            for name, mask in (("natPPL", natural), ("keyPPL", key)):
                parts[f"{name}@{L}"] = {"kind": "ppl", "num": (nll * mask).sum(1).tolist(),
                                        "den": mask.sum(1).tolist()}
            hits, n_ans = [0.0] * b.ids.shape[0], [0.0] * b.ids.shape[0]
            for a in b.answers:
                n_ans[a.window] += 1.0
                hits[a.window] += float((logits[a.window, a.pos - 1].argmax(-1) == b.ids[a.window, a.pos]).all())
            parts[f"recall@{L}"] = {"kind": "frac", "num": hits, "den": n_ans}
        out[f"recall@{L}"] = _pooled(sc, ("span/all", "fact/all"))
        for kind in ("span", "fact"):
            out[f"recall({kind})@{L}"] = sc[f"{kind}/all"]["exact"]
        for name, _, _ in buckets_for(L):
            out[f"recall@{L}/{name}"] = _pooled(sc, (f"span/{name}", f"fact/{name}"))
    return out


def _pooled(sc: dict, keys: Sequence[str]) -> float:
    ks = [k for k in keys if k in sc]
    n = sum(sc[k]["n"] for k in ks)
    return sum(sc[k]["exact"] * sc[k]["n"] for k in ks) / n if n else math.nan


def metric_names(lengths: Sequence[int]) -> List[str]:
    """The table's columns for the recall testbed, in order (LongPPL(rel): the secondary check, at the longest length)."""
    return ([f"natPPL@{L}" for L in lengths] + [f"keyPPL@{L}" for L in lengths] + [f"recall@{L}" for L in lengths]
            + ["copy gap d96", f"LongPPL(rel)@{lengths[-1]}"])


def verdict_metrics(lengths: Sequence[int]) -> List[str]:
    """The metrics the verdict lines are computed for (pre-registered in docs/demo.md)."""
    L0, Lmax = lengths[0], lengths[-1]
    return list(dict.fromkeys([f"natPPL@{Lmax}", f"keyPPL@{Lmax}", f"recall@{L0}", f"recall@{Lmax}"]))


def _data():
    from .data import load_corpus, load_tokenizer
    from .recall_data import fact_tokens, rare_pool

    tok = load_tokenizer()
    train, test = load_corpus(tok, "train"), load_corpus(tok, "test")
    return tok, test, rare_pool(train, tok.vocab_size, exclude=[tok.eos_id] + fact_tokens(tok)[1])


def _load(path: str):
    from .config import TrainConfig
    from .model import build_model

    return build_model(TrainConfig(), 0, torch.device("cpu"), path=path).eval()


def run_gate(base_model: str, extended: str, out: str, exact=None) -> dict:
    """The gate on the base in its own window (unextended, at its ``max_position_embeddings``), written to
    ``out/gate.json`` with the same gate on ``extended`` (the base RoPE-extended as the arms receive it, before
    any fine-tuning) beside it as a diagnostic (``"extended"``: what the extension alone costs; it does not
    decide). The shipped base's checksums are verified first."""
    from .recall_base import SHIPPED_BASE, verify

    if os.path.abspath(base_model) == os.path.abspath(SHIPPED_BASE):
        verify(base_model)
    with open(os.path.join(base_model, "config.json")) as f:
        length = int(json.load(f)["max_position_embeddings"])
    tok, test, pool = _data()
    ex = GATE_EXACT if exact is None else exact
    res = gate(_load(base_model), pool, test, tok, length, exact=ex)
    ext = gate(_load(extended), pool, test, tok, length, exact=ex)
    res["extended"] = {k: ext[k] for k in ("passed", "line", "full", "truncated")}
    res["line"] = res["line"] + f"; the extended base before fine-tuning (diagnostic): {ext['line'].split(': ', 1)[1]}"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gate.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


LONGPPL_RATIO = 0.5  # a LongPPL key token: the full-context loss is at most this fraction of the short-context loss
LONGPPL_SHORT = 128  # the short context (tokens) the reference sees in the key-token test


@torch.no_grad()
def short_context_nll(model, ids: torch.Tensor, short: int = LONGPPL_SHORT) -> torch.Tensor:
    """``[n, L - 1]``: the loss of each target ``ids[:, t]`` (t >= 1) with a context cut to between ``short`` and
    ``2 short`` tokens (blocks of ``short`` logit positions, each fed its own block and the one before it: one
    forward of <= ``2 short`` tokens per block instead of one per target); NaN where the full context is no longer
    than that (positions < ``short``)."""
    fn = lm_logits_fn(model)
    n, L = ids.shape
    out = torch.full((n, L - 1), math.nan)
    for c in range(1, (L - 1 + short - 1) // short):
        lo, hi = c * short, min((c + 1) * short, L - 1)  # logit positions lo..hi-1 predict targets lo+1..hi
        start = (c - 1) * short
        lg = fn(ids[:, start:hi])[:, lo - start :]
        tgt = ids[:, lo + 1 : hi + 1]
        out[:, lo:hi] = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), reduction="none").view(tgt.shape)
    return out


def longppl_keys(full_nll: torch.Tensor, short_nll: torch.Tensor, ratio: float = LONGPPL_RATIO) -> torch.Tensor:
    """LongPPL's key tokens with a relative threshold: the evaluator's full-context loss is at most ``ratio`` x
    its short-context loss (long context removes at least ``1 - ratio`` of the token's loss), whatever the
    model's loss scale (the published thresholds, 2 nats, are tuned for 7B models)."""
    return (full_nll <= ratio * short_nll) & torch.isfinite(short_nll)


def evaluate_models(models: Sequence[str], labels: Sequence[str], lengths: Sequence[int], n_windows: int,
                    quiet: bool = False, probe_distance: int = 96, parts: Optional[dict] = None) -> Dict[str, Dict[str, float]]:
    """:func:`length_metrics` and the copy-probe gap at ``probe_distance`` (held-out text filler, 256-token
    windows) of every model, on the same windows for all: ``{label: {metric: value}}``; ``parts`` (a dict, filled
    in): ``{label: per-window pieces}`` (:func:`length_metrics`)."""
    from tqdm import tqdm

    from .recall_eval import copy_probe, copy_probe_windows

    tok, test, pool = _data()
    batches = {L: recall_batch(L, n_windows, pool, test, tok) for L in lengths}
    probe = copy_probe_windows(pool, (probe_distance,), n=n_windows, length=256, corpus=test)
    out, keys = {}, {}
    for i, (path, label) in enumerate(tqdm(list(zip(models, labels)), desc="recall evaluation", disable=quiet,
                                           dynamic_ncols=True)):
        m = _load(path)
        full = {}
        res = length_metrics(m, batches, parts=parts.setdefault(label, {}) if parts is not None else None,
                             nll_out=full)
        res[f"copy gap d{probe_distance}"] = copy_probe(lm_logits_fn(m), probe)[probe_distance]["gap"]
        for L, b in batches.items():
            nll = full[L]
            if i == 0:  # the first model is the evaluator (the extended base: every length inside its positions)
                keys[L] = longppl_keys(nll, short_context_nll(m, b.ids))
                answer = answer_mask(b)
                nk = int(keys[L].sum())
                res[f"LongPPL keys@{L}"] = float(nk)
                res[f"LongPPL key precision@{L}"] = float((keys[L] & answer).sum()) / nk if nk else math.nan
                res[f"LongPPL key coverage@{L}"] = float((keys[L] & answer).sum()) / max(1, int(answer.sum()))
            res[f"LongPPL(rel)@{L}"] = math.exp(float(nll[keys[L]].mean())) if keys[L].any() else math.nan
        out[label] = res
    return out


def plot_recall(stats: dict, lengths: Sequence[int], path: str, reference_rows=None, runs: Sequence[dict] = ()) -> None:
    """Recall (exact match, mean over seeds) as a heat map of length x distance bucket per arm (the reference
    row first), and natural- / key-token perplexity vs length per arm. The per-bucket recall is averaged over
    ``runs`` (``[{"arm", "metrics"}]``; the table's summary holds only its own columns). Skipped without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = dict((k, v) for k, v in (reference_rows or {}).items())
    for arm in stats["arms"]:
        row = {m: v["mean"] for m, v in stats["summary"][arm].items()}
        per = [r["metrics"] for r in runs if r.get("arm") == arm]
        for m in {k for p in per for k in p if k.startswith("recall@") and "/" in k}:
            vals = [p[m] for p in per if p.get(m) is not None and p[m] == p[m]]
            row[m] = sum(vals) / len(vals) if vals else math.nan
        rows[arm] = row
    names = [b[0] for b in BUCKETS if any(f"recall@{L}/{b[0]}" in r for r in rows.values() for L in lengths)]
    n = len(rows)
    fig, axes = plt.subplots(1, n + 1, figsize=(2.6 * n + 5, 3.4), squeeze=False)
    for ax, (name, r) in zip(axes[0], rows.items()):
        grid = [[r.get(f"recall@{L}/{b}", math.nan) for b in names] for L in lengths]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=45, fontsize=7)
        ax.set_yticks(range(len(lengths)), [str(L) for L in lengths], fontsize=7)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v == v:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.5 else "k")
    axes[0][0].set_ylabel("window length")
    fig.colorbar(im, ax=axes[0][n - 1], fraction=0.05)
    ax = axes[0][n]
    for i, (name, r) in enumerate(rows.items()):
        for kind, style in (("natPPL", "-"), ("keyPPL", "--")):
            ax.plot(lengths, [r.get(f"{kind}@{L}", math.nan) for L in lengths], style, color=f"C{i}", marker="o",
                    label=f"{name} {kind}" if kind == "keyPPL" else name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("window length")
    ax.set_title("natural (solid) / key-token (dashed) PPL", fontsize=9)
    ax.legend(fontsize=5, ncol=2)
    fig.suptitle("recall (teacher-forced exact match) by window length x distance bucket", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
