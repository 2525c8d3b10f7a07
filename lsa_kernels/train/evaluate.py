"""Evaluate runs (context-extended or not): perplexity and LongPPL vs context length, LSM, pass-key retrieval.

    python -m lsa_kernels.train.evaluate --runs runs/ce runs/lsa --out runs/eval
    python -m lsa_kernels.train.evaluate --runs runs/yarn4 runs/linear4 --lengths 1 2 4 8 --passkey --out runs/eval

Each run is a training ``--out`` dir (its latest checkpoint is used), a checkpoint dir or any transformers
model dir. Lengths are ``--lengths`` multiples of ``l_train``; without ``--lengths``, 1 2 4 8 less those past a
model's positions (one stderr line names them). A checkpoint's RoPE scaling (``rope_parameters`` in its config.json: linear / dynamic / yarn,
``factor``, ...) is what ``from_pretrained`` rebuilds, and is recorded per run as ``"rope"`` (null when the
model has plain RoPE or none). An evaluation length past a model's ``max_position_embeddings`` (``n0 * F``
for a model extended by ``F``) is an error, never silently truncated.

* Perplexity vs length, on the SAME targets: ``n_windows`` held-out windows of ``max(lengths) + 1`` tokens
  are drawn once (seeded). At length ``L`` each window's last ``L + 1`` tokens are fed and only the final
  ``score_tokens`` targets of the window are scored, so every length scores the same tokens and only the
  context before them grows. ``ce`` = mean token CE over those targets, ``ppl = exp(ce)``.
* LongPPL (Fang et al., ICLR 2025, "What is Wrong with Perplexity for Long-context Language Modeling?"):
  key tokens are the scored targets whose loss under a REFERENCE model (``--longppl-reference``, default
  the first run) drops by more than ``--longppl-gap`` nats (2.0) when the full context (the longest
  length) is given instead of only the last ``--longppl-short`` tokens (each such target is fed exactly
  its last ``short`` tokens of context), and whose full-context loss is below ``--longppl-max-loss`` (2.0).
  They are chosen once, so every run is judged on the same tokens: LongPPL of a run at length ``L`` =
  exp(mean loss over the key tokens with context ``L``); null when there is no key token.
* LSM (docs/maths.md §6), per divergence (``--lsm-divergence``, default ``sce sym_kl``): for ``lsm_samples`` held-out
  windows and lengths ``l1, l2 ~ U[l_train/2, l_train]`` (``l_train`` = the run's training length), the
  mean divergence between the next-token distributions at the last position of ``x[-l1:]`` and ``x[-l2:]``.
  The same (window, l1, l2) samples serve every divergence and every run with the same ``l_train``.
* ``--passkey``: pass-key retrieval. A 5-digit key sentence hidden at depth ``d`` (fraction of the filler)
  in repeated filler text, then "What is the pass key? The pass key is"; accuracy = greedy decoding of the
  key's tokens reproduces them all (computed exactly with one teacher-forced forward: greedy decoding
  matches iff every teacher-forced argmax does), plus the mean log-prob of the key tokens.

Writes ``results.json`` and ``ppl_vs_length.png`` (and ``passkey.json``, ``passkey.png``) to ``--out``.
Everything is checked before ``--out`` is created; models are loaded one at a time.

This module resolves the runs, checks the inputs, orchestrates and writes the outputs (and is the CLI); the
metrics are in eval_metrics.py, the pass-key prompts and scores in passkey.py, the figures in eval_plots.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch

from .. import _cli_types as T
from .. import _env
from ..maths import DIVERGENCES
from .config import ConfigError, TrainConfig, check_device, check_out
from .eval_metrics import key_tokens, last_losses, length_losses, lsm_samples_for, lsm_values, truncated_losses
from .eval_plots import plot, plot_passkey
from .model import build_model, positions, quiet_transformers, rope_of
from .passkey import PASSKEY_FILLER, PASSKEY_QUESTION, PASSKEY_SENTENCE, passkey_grid, passkey_prompts, passkey_scores

DEFAULT_MULTIPLIERS = (1, 2, 4, 8)  # of l_train, when --lengths is not given


# ------------------------------------------------------------------------------------------- inputs
def _resolve(run: str):
    """(model dir, tokenizer path or None, l_train or None) for a run dir / ckpt dir / model dir."""
    from .checkpoint import latest_checkpoint

    if not os.path.exists(run):
        raise ConfigError(f"run {run!r} does not exist")
    ckpt = latest_checkpoint(run) or run
    if not os.path.isfile(os.path.join(ckpt, "config.json")):
        raise ConfigError(f"{run!r} holds neither a checkpoint nor a transformers model")
    l_train, tok = None, None
    for p in (os.path.join(run, "config.json"), os.path.join(ckpt, "state.json")):
        try:
            with open(p) as f:
                d = json.load(f)
            d = d.get("config", d)
            if "l_train" in d:
                l_train = int(d["l_train"])
                break
        except (OSError, ValueError, TypeError, AttributeError):
            pass
    if os.path.isfile(os.path.join(ckpt, "tokenizer.json")):
        tok = os.path.join(ckpt, "tokenizer.json")
    return ckpt, tok, l_train


def _model_config(ckpt: str, run: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(ckpt, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{run}: cannot read the model config in {ckpt!r} ({e})") from None


def _check_weights(ckpt: str, run: str) -> None:
    """Every safetensors file of the model opens (its header parses and fits the file), so a corrupted
    checkpoint is reported before any model is evaluated."""
    from safetensors import safe_open

    for name in sorted(os.listdir(ckpt)):
        if name.endswith(".safetensors"):
            try:
                with safe_open(os.path.join(ckpt, name), framework="pt") as f:
                    f.keys()
            except Exception as e:  # SafetensorError, OSError: one line, no traceback
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise ConfigError(f"{run}: cannot read {os.path.join(ckpt, name)!r} ({first}); the file is corrupted "
                                  "or incomplete") from None


# ----------------------------------------------------------------------------------------- evaluate
def _free(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate(runs: List[str], out: str, *, labels: Optional[List[str]] = None, l_train: Optional[int] = None,
             multipliers: Optional[Sequence[float]] = None, n_windows: int = 16, score_tokens: Optional[int] = None,
             lsm_samples: int = 64, lsm_divergences=("sce", "sym_kl"), longppl_reference: Optional[str] = None, longppl_gap: float = 2.0,
             longppl_max_loss: float = 2.0, longppl_short: Optional[int] = None, passkey: bool = False,
             passkey_lengths: Optional[Sequence[int]] = None, passkey_depths=(0.0, 0.25, 0.5, 0.75, 1.0),
             passkey_trials: int = 5, batch_size: int = 4, eval_files: Optional[List[str]] = None,
             tokenizer: Optional[str] = None, backend: str = "auto", seed: int = 1234, device: str = "",
             quiet: bool = False) -> dict:
    """Evaluate ``runs`` (see the module docstring); returns the results dict, also written as ``results.json``
    (+ ``ppl_vs_length.png``, and with ``passkey`` ``passkey.json`` + ``passkey.png``) to ``out``.

    Every input is checked (paths, options, lengths vs each model's positions, corpus length, pass-key
    prompts) before ``out`` is created; a bad one raises :class:`ConfigError` with one line. ``multipliers``
    (of ``l_train``) given: a length past a model's positions is an error; not given: ``DEFAULT_MULTIPLIERS``
    less those past the positions of a run (or of the LongPPL reference), which one stderr line names.
    """
    from tqdm import tqdm

    from ..integrations.hf import hidden_states, output_head
    from .checkpoint import atomic_write_text
    from .data import DEFAULT_TOKENIZER, DataError, WindowSampler, eval_windows, load_corpus, load_tokenizer

    quiet_transformers()

    # ---- options
    if not runs:
        raise ConfigError("--runs: no run given")
    if labels and len(labels) != len(runs):
        raise ConfigError(f"--labels: {len(labels)} labels for {len(runs)} runs")
    divs = list(dict.fromkeys(lsm_divergences or ()))
    bad = [d for d in divs if d not in DIVERGENCES]
    if bad or not divs:
        what = f"unknown {bad[0]!r}" if bad else "none given"
        raise ConfigError(f"--lsm-divergence: {what} (choose from {', '.join(DIVERGENCES)})")
    for name, v in (("--n-windows", n_windows), ("--lsm-samples", lsm_samples), ("--batch-size", batch_size)):
        if int(v) < 1:
            raise ConfigError(f"{name} must be >= 1, got {v}")
    for name, v in (("--longppl-gap", longppl_gap), ("--longppl-max-loss", longppl_max_loss)):
        if not math.isfinite(float(v)):
            raise ConfigError(f"{name} must be a finite number, got {v}")
    if longppl_max_loss <= 0:
        raise ConfigError(f"--longppl-max-loss must be a finite number > 0 (nats), got {longppl_max_loss}")
    if l_train is not None and l_train < 1:
        raise ConfigError(f"--l-train must be an integer >= 1, got {l_train}")
    check_out(out)
    check_device(device, backend)
    names = list(labels) if labels else [os.path.basename(os.path.normpath(r)) for r in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"runs share the name {dup[0]!r}: pass --labels to tell them apart")

    resolved = [_resolve(r) for r in runs]
    lt = l_train or next((r[2] for r in resolved if r[2]), None)
    if not lt or lt < 1:
        raise ConfigError("--l-train is needed (no run records its training length)")
    explicit = multipliers is not None
    multipliers = tuple(multipliers) if explicit else DEFAULT_MULTIPLIERS
    if any(not (isinstance(m, (int, float)) and m > 0) for m in multipliers) or not multipliers:
        raise ConfigError(f"--lengths must be positive multiples of l_train, got {list(multipliers)}")
    lengths = sorted({int(m * lt) for m in multipliers})
    if not explicit:  # the default multiples: those within every model's positions (none fits: the error below)
        models = [(run, r[0]) for run, r in zip(runs, resolved)]
        if longppl_reference:
            models.append((longppl_reference, _resolve(longppl_reference)[0]))
        limits = [(positions(_model_config(ckpt, run))[0], run) for run, ckpt in models]
        npos, who = min(((n, run) for n, run in limits if n is not None), default=(None, None))
        keep = [L for L in lengths if npos is None or L <= npos]
        if keep and len(keep) < len(lengths):
            print(f"lsa eval: lengths {' '.join(str(L) for L in lengths if L not in keep)} left out (past the {npos} "
                  f"positions of {who}); evaluating at {' '.join(map(str, keep))} (--lengths chooses)", file=sys.stderr)
            lengths = keep
    if lengths[0] < 2:
        raise ConfigError(f"--lengths: {lengths[0]} tokens is too short to evaluate")
    Lmax, Lmin = lengths[-1], lengths[0]
    S = int(score_tokens) if score_tokens is not None else max(1, Lmin // 2)
    if not 1 <= S <= Lmin:
        raise ConfigError(f"--score-tokens must be in [1, {Lmin}] (the shortest length, so every length scores the "
                          f"same targets), got {S}")
    short = int(longppl_short) if longppl_short is not None else max(1, Lmin // 2)
    if not 1 <= short < Lmax or short > Lmax + 1 - S:
        raise ConfigError(f"--longppl-short must be in [1, {min(Lmax - 1, Lmax + 1 - S)}] (shorter than the longest "
                          f"length, and the truncated contexts of the {S} scored targets must fit in a window), got {short}")
    run_lt = [r[2] or lt for r in resolved]
    pk_lengths = sorted({int(L) for L in (passkey_lengths or lengths)}) if passkey else []
    pk_depths = [float(d) for d in passkey_depths] if passkey else []
    if passkey:
        if not pk_depths or any(not 0.0 <= d <= 1.0 for d in pk_depths):
            raise ConfigError(f"--passkey-depths must be fractions in [0, 1], got {list(passkey_depths)}")
        pk_depths = list(dict.fromkeys(pk_depths))
        if passkey_trials < 1:
            raise ConfigError(f"--passkey-trials must be >= 1, got {passkey_trials}")
        if pk_lengths[0] < 1:
            raise ConfigError(f"--passkey-lengths must be positive, got {pk_lengths[0]}")

    # ---- reference model for LongPPL
    ref_path = longppl_reference or runs[0]
    ref_ckpt = _resolve(ref_path)[0] if longppl_reference else resolved[0][0]
    ref_idx = next((i for i, r in enumerate(resolved) if os.path.realpath(r[0]) == os.path.realpath(ref_ckpt)), None)

    # ---- tokenizer + corpus: all runs share one (the windows must be the same text); the first one decides
    tok_path = tokenizer or next((r[1] for r in resolved if r[1]), None) or DEFAULT_TOKENIZER
    try:
        tok = load_tokenizer(tok_path)
        corpus = load_corpus(tok, "test", eval_files)
        need = max(Lmax + 1, max(run_lt))
        if corpus.longest < need:
            raise DataError(f"held-out corpus too short: longest document {corpus.longest} tokens, "
                            f"evaluation at {Lmax} needs {Lmax + 1}")
    except DataError as e:
        raise ConfigError(str(e)) from None

    # ---- every model's config: positions, vocabulary, RoPE (no weights loaded yet)
    ropes, npos_of = [], []
    checks = [(run, ckpt, max(Lmax, max(pk_lengths, default=0), rl)) for run, (ckpt, _, _), rl in zip(runs, resolved, run_lt)]
    if ref_idx is None:
        checks.append((f"--longppl-reference {ref_path}", ref_ckpt, Lmax))
    for k, (run, ckpt, need_pos) in enumerate(checks):
        cfg = _model_config(ckpt, run)
        _check_weights(ckpt, run)
        npos, n_mpe = positions(cfg)
        rope = rope_of(cfg)
        if npos is not None and need_pos > npos:
            what = f"rope {json.dumps(rope)}" if rope else "no RoPE scaling"
            lim = f"max_position_embeddings={npos}" if npos == n_mpe else \
                f"the {npos} positions it allows (max_position_embeddings={n_mpe})"
            raise ConfigError(
                f"{run}: evaluation length {need_pos} exceeds {lim} ({what}); pass smaller "
                "--lengths / --passkey-lengths" + ("" if rope else ", or a checkpoint with its RoPE extended")
            )
        V = getattr(cfg, "vocab_size", None)
        if isinstance(V, int) and V < tok.vocab_size:
            raise ConfigError(f"{run}: the tokenizer has {tok.vocab_size} tokens but the model's vocabulary only {V}")
        if k < len(runs):
            ropes.append(rope)
            npos_of.append((npos, n_mpe))

    prompts, pk_skipped = [], []
    if passkey:  # the default lengths (the PPL ones) leave out those too short for the prompt; given ones must fit
        prompts = passkey_prompts(tok, pk_lengths, pk_depths, passkey_trials, seed + 2, skip_short=not passkey_lengths)
        pk_skipped = [L for L in pk_lengths if L not in {p.length for p in prompts}]
        pk_lengths = [L for L in pk_lengths if L not in pk_skipped]
        if not pk_lengths:
            raise ConfigError(f"--passkey: every length ({', '.join(map(str, pk_skipped))}) is too short for the key "
                              "sentence and the question; pass longer --passkey-lengths")

    # ---- fixed data
    windows = eval_windows(corpus, Lmax + 1, n_windows, seed=seed)  # [n, Lmax + 1], the same for every run
    lsm_win = WindowSampler(corpus, seed=seed + 1).windows(0, lsm_samples, max(run_lt))
    fractions = torch.rand(lsm_samples, 2, generator=torch.Generator().manual_seed(seed))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    budget = batch_size * Lmax  # tokens per forward

    def load(ckpt):
        m = build_model(TrainConfig(), tok.vocab_size, dev, path=ckpt).eval()
        head = output_head(m)
        return m, head, (lambda ids: hidden_states(m, ids))

    key = None
    ref_info = {}

    def choose_keys(hidden_fn, head, full):
        trunc = truncated_losses(hidden_fn, head, windows, S, short, budget, backend)
        k = key_tokens(full, trunc, longppl_gap, longppl_max_loss)
        ref_info.update(n_scored=int(k.numel()), ref_full_ce=full.mean().item(), ref_short_ce=trunc.mean().item())
        return k

    if ref_idx is None:  # an outside reference: load it, choose the key tokens, free it
        m, head, fn = load(ref_ckpt)
        key = choose_keys(fn, head, last_losses(fn, head, windows[:, :-1], windows[:, -S:], budget, backend))
        _free(m)
        del head, fn

    order = ([ref_idx] if ref_idx is not None else []) + [i for i in range(len(runs)) if i != ref_idx]
    per_run: Dict[int, dict] = {}
    per_losses: Dict[int, Dict[int, torch.Tensor]] = {}
    pk_out = {"lengths": pk_lengths, "depths": pk_depths, "trials": passkey_trials, "skipped_lengths": pk_skipped,
              "filler": " ".join(PASSKEY_FILLER), "key_sentence": PASSKEY_SENTENCE, "question": PASSKEY_QUESTION,
              "mean_prompt_tokens": {str(L): sum(len(p.ids) for p in prompts if p.length == L)
                                     / max(1, sum(p.length == L for p in prompts)) for L in pk_lengths},
              "runs": {}}
    for i in tqdm(order, desc="lsa eval", unit="run", disable=quiet):
        m, head, fn = load(resolved[i][0])
        losses = length_losses(fn, head, windows, lengths, S, budget, backend)
        if i == ref_idx:
            key = choose_keys(fn, head, losses[Lmax])
        per_losses[i] = losses
        r = {"run": runs[i], "rope": ropes[i], "max_positions": npos_of[i][0], "max_position_embeddings": npos_of[i][1],
             "l_train": run_lt[i], "ppl": {}}
        r["lsm"] = lsm_values(fn, head, lsm_win, lsm_samples_for(run_lt[i], fractions), divs, budget, backend)
        if passkey:
            grid = passkey_grid(prompts, passkey_scores(fn, head, prompts, budget), pk_lengths, pk_depths)
            r["passkey"] = grid
            pk_out["runs"][names[i]] = grid
        per_run[i] = r
        _free(m)
        del head, fn

    assert key is not None
    n_key = int(key.sum())
    results = {
        "l_train": lt, "lengths": lengths, "n_windows": n_windows, "score_tokens": S, "seed": seed,
        "longppl": {"reference": ref_path, "n_key": n_key, "n_scored": ref_info.get("n_scored"), "gap": longppl_gap,
                    "max_loss": longppl_max_loss, "short": short, "reference_ce_full": ref_info.get("ref_full_ce"),
                    "reference_ce_short": ref_info.get("ref_short_ce"),
                    "note": None if n_key else "no key tokens: the reference model gains less than the gap from long "
                                               "context on every scored token; longppl is null"},
        "lsm": {"samples": lsm_samples, "divergences": divs},
        "runs": {},
    }
    if passkey:
        results["passkey"] = {k: pk_out[k] for k in ("lengths", "depths", "trials", "skipped_lengths")}
    for i in range(len(runs)):
        r = per_run[i]
        for L in lengths:
            ce = per_losses[i][L]
            lp = math.exp(ce[key].mean().item()) if n_key else None
            r["ppl"][str(L)] = {"ppl": math.exp(ce.mean().item()), "ce": ce.mean().item(), "longppl": lp}
        r["n_key"] = n_key
        results["runs"][names[i]] = {k: r[k] for k in ("run", "rope", "max_positions", "max_position_embeddings", "l_train", "ppl",
                                                          "n_key", "lsm") + (("passkey",) if passkey else ())}
    if passkey:
        pk_out["runs"] = {names[i]: pk_out["runs"][names[i]] for i in range(len(runs))}

    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, "results.json"), json.dumps(results, indent=1))
    plot(results, os.path.join(out, "ppl_vs_length.png"))
    if passkey:
        atomic_write_text(os.path.join(out, "passkey.json"), json.dumps(pk_out, indent=1))
        plot_passkey(pk_out, os.path.join(out, "passkey.png"))
    return results


def _f(v, fmt="{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def markdown_table(results: dict) -> str:
    """One row per run: RoPE, PPL at each length, LongPPL at each length (when there are key tokens), LSM per
    divergence, pass-key accuracy (when evaluated)."""
    lengths = results["lengths"]
    runs = results["runs"]
    has_long = any(r["ppl"][str(L)].get("longppl") is not None for r in runs.values() for L in lengths)
    divs = (results.get("lsm") or {}).get("divergences") or list(next(iter(runs.values()), {}).get("lsm", {}))
    has_pk = any("passkey" in r for r in runs.values())
    cols = ["run", "RoPE"] + [f"PPL@{L}" for L in lengths]
    if has_long:
        cols += [f"LongPPL@{L}" for L in lengths]
    cols += [f"LSM {d}" for d in divs]
    if has_pk:
        cols += ["pass-key acc", "key log-prob"]
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, r in runs.items():
        rope = r.get("rope")
        if rope and "rope_type" in rope:
            rope_s = f"{rope['rope_type']} x{rope.get('factor', 1):g}"
        else:
            rope_s = "scaled" if rope else "–"
        cells = [name, rope_s] + [_f(r["ppl"][str(L)]["ppl"]) for L in lengths]
        if has_long:
            cells += [_f(r["ppl"][str(L)].get("longppl")) for L in lengths]
        cells += [_f((r.get("lsm") or {}).get(d, {}).get("lsm"), "{:.4f}") for d in divs]
        if has_pk:
            pk = r.get("passkey") or {}
            cells += [_f(pk.get("accuracy")), _f(pk.get("key_logprob"))]
        rows.append("| " + " | ".join(cells) + " |")
    lp = results.get("longppl") or {}
    if lp:
        rows.append("")
        rows.append(f"LongPPL: {lp.get('n_key')} key tokens of {lp.get('n_scored')} scored (reference "
                    f"{lp.get('reference')}, gap > {lp.get('gap')} nats vs {lp.get('short')}-token context, full-context "
                    f"loss < {lp.get('max_loss')})" + ("" if lp.get("n_key") else "; none, so LongPPL is not reported"))
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``lsa eval``."""
    ap = T.Parser(prog="lsa eval", description=__doc__)
    ap.add_argument("--runs", nargs="+", required=True, help="training out dirs, checkpoint dirs or model dirs")
    ap.add_argument("--labels", nargs="*", default=None, help="one name per run (default: the runs' directory names)")
    ap.add_argument("--out", default="runs/eval", help="output directory (results.json, ppl_vs_length.png)")
    ap.add_argument("--l-train", type=T.positive_int, default=None, help="default: read from the first run's config")
    ap.add_argument("--lengths", type=T.positive_float, nargs="+", default=None,
                    help="multiples of l_train (default 1 2 4 8, less those past a model's positions)")
    ap.add_argument("--n-windows", type=T.positive_int, default=16, help="held-out windows scored at every length")
    ap.add_argument("--score-tokens", type=T.positive_int, default=None,
                    help="targets scored at the end of each window, the same at every length (default: shortest length // 2)")
    ap.add_argument("--lsm-samples", type=T.positive_int, default=64, help="windows of the LSM metric")
    ap.add_argument("--lsm-divergence", nargs="+", default=["sce", "sym_kl"], metavar="DIV",
                    help=f"one or more of {', '.join(DIVERGENCES)}")
    ap.add_argument("--longppl-reference", default=None, help="model choosing the LongPPL key tokens (default: first run)")
    ap.add_argument("--longppl-gap", type=T.nonneg_float, default=2.0,
                    help="min loss drop (nats) from long context for a key token")
    ap.add_argument("--longppl-max-loss", type=T.positive_float, default=2.0, help="max full-context loss of a key token")
    ap.add_argument("--longppl-short", type=T.positive_int, default=None,
                    help="truncated context (default: shortest length // 2)")
    ap.add_argument("--passkey", action="store_true", help="pass-key retrieval (passkey.json, passkey.png)")
    ap.add_argument("--passkey-lengths", type=T.positive_int, nargs="+", default=None,
                    help="tokens (default: the PPL lengths)")
    ap.add_argument("--passkey-depths", type=T.fraction, nargs="+", default=[0, 0.25, 0.5, 0.75, 1],
                    help="where the key sits in the filler, as fractions")
    ap.add_argument("--passkey-trials", type=T.positive_int, default=5, help="prompts per (length, depth) cell")
    ap.add_argument("--batch-size", type=T.positive_int, default=4, help="windows per forward at the longest length")
    ap.add_argument("--eval-files", nargs="*", default=None, help="held-out text files (default: shipped held-out works)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json or tokenizer dir (default: the first run's)")
    ap.add_argument("--backend", default="auto", choices=["auto", "cpu", "triton", "reference"],
                    help="kernels of the fused losses (auto: triton on CUDA, cpu otherwise)")
    ap.add_argument("--device", default="", help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--seed", type=T.nonneg_int, default=1234, help="seed of the held-out windows and samples")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def eval_main(argv: Optional[List[str]] = None) -> int:
    """CLI entry: ``lsa eval``. Returns 0 on success, 2 on a bad input."""
    from ..integrations.hf import UnsupportedModel

    try:
        a = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0), or a flag argparse refused (2; its one line is on stderr already)
        return int(e.code or 0)
    _env.smoke_caps(a, "lsa eval", n_windows=2, lsm_samples=4, passkey_trials=1)
    try:
        res = evaluate(a.runs, a.out, labels=a.labels, l_train=a.l_train, multipliers=a.lengths, n_windows=a.n_windows,
                       score_tokens=a.score_tokens, lsm_samples=a.lsm_samples, lsm_divergences=a.lsm_divergence,
                       longppl_reference=a.longppl_reference, longppl_gap=a.longppl_gap,
                       longppl_max_loss=a.longppl_max_loss, longppl_short=a.longppl_short, passkey=a.passkey,
                       passkey_lengths=a.passkey_lengths, passkey_depths=a.passkey_depths,
                       passkey_trials=a.passkey_trials, batch_size=a.batch_size, eval_files=a.eval_files,
                       tokenizer=a.tokenizer, backend=a.backend, seed=a.seed, device=a.device, quiet=a.quiet)
    except (ConfigError, UnsupportedModel, OSError) as e:
        print(f"lsa eval: error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(res))
    files = ["results.json", "ppl_vs_length.png"] + (["passkey.json", "passkey.png"] if a.passkey else [])
    print("wrote " + ", ".join(os.path.join(a.out, f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(eval_main())
