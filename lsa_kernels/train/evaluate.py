"""Evaluate runs: held-out perplexity at 1x, 2x, 4x, 8x the training length, and the LSM metric.

    python -m lsa_kernels.train.evaluate --runs runs/ce runs/lsa --out runs/eval

Each run is a training ``--out`` dir (its latest checkpoint is used), a checkpoint dir or any
transformers model dir. Perplexity is exp(mean token CE) over the same fixed held-out windows for every
run: ``ppl`` over all positions of a window of ``L`` tokens, ``ppl_tail`` over its last ``l_train``
positions only (the tokens that have more context than training ever gave). Models are evaluated
WITHOUT any RoPE extension (no rope_scaling change): the point is how far they generalise as they are.
A length past the model's ``max_position_embeddings`` is an error, never silently truncated.

LSM (SPEC §6): for ``n`` held-out end positions and lengths ``l1, l2 ~ U[l_train/2, l_train]``, the mean
``sce`` between the next-token distributions at the last position of ``x[-l1:]`` and ``x[-l2:]``.
Writes ``results.json`` and ``ppl_vs_length.png`` (one line per run) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List, Optional

import torch

from .loop import ConfigError


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
        except (OSError, ValueError):
            pass
    if os.path.isfile(os.path.join(ckpt, "tokenizer.json")):
        tok = os.path.join(ckpt, "tokenizer.json")
    return ckpt, tok, l_train


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, l_train: int, batch_size: int, backend: str) -> Dict[str, float]:
    """exp(mean CE) over all positions and over the last ``l_train`` positions of each window."""
    from ..functional import linear_cross_entropy
    from ..integrations.hf import hidden_states, output_head

    head = output_head(model)
    dev = head.weight.device
    tot = tail = 0.0
    n_tot = n_tail = 0
    for i in range(0, windows.shape[0], batch_size):
        w = windows[i : i + batch_size].to(dev)
        h, b = head.prepare(hidden_states(model, w[:, :-1]))
        per = linear_cross_entropy(h.float(), head.weight.float(), w[:, 1:], linear_bias=None if b is None else b.float(),
                                   softcap=head.softcap, reduction="none", backend=backend)
        tot += per.double().sum().item()
        n_tot += per.numel()
        tail += per[:, -l_train:].double().sum().item()
        n_tail += per[:, -l_train:].numel()
    return {"ppl": math.exp(tot / n_tot), "ppl_tail": math.exp(tail / n_tail), "ce": tot / n_tot}


@torch.no_grad()
def lsm(model, corpus, l_train: int, n: int, seed: int, backend: str) -> Dict[str, float]:
    """SPEC §6: mean sce between the last-position distributions of two suffixes of lengths in [l_train/2, l_train]."""
    from ..functional import linear_divergence
    from ..integrations.hf import hidden_states, output_head
    from .data import WindowSampler

    head = output_head(model)
    dev = head.weight.device
    g = torch.Generator().manual_seed(seed)
    x = WindowSampler(corpus, seed=seed).windows(0, n, l_train, generator=g)  # x[:, -l:] are the suffixes
    lo = max(1, l_train // 2)
    vals = []
    for i in range(n):
        l1, l2 = (int(v) for v in torch.randint(lo, l_train + 1, (2,), generator=g))
        h1 = hidden_states(model, x[i : i + 1, -l1:].to(dev))[:, -1]
        h2 = hidden_states(model, x[i : i + 1, -l2:].to(dev))[:, -1]
        (h1, b), (h2, _) = head.prepare(h1), head.prepare(h2)
        d = linear_divergence(h1.float(), h2.float(), head.weight.float(), linear_bias=None if b is None else b.float(),
                              divergence="sce", softcap=head.softcap, reduction="none", backend=backend)
        vals.append(d.item())
    t = torch.tensor(vals, dtype=torch.float64)
    return {"lsm": t.mean().item(), "lsm_std": t.std().item() if n > 1 else 0.0, "lsm_n": n}


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, r in results["runs"].items():
        xs = sorted(int(k) for k in r["ppl"])
        ax.plot(xs, [r["ppl"][str(k)]["ppl"] for k in xs], marker="o", label=f"{name} (LSM {r['lsm']['lsm']:.3f})")
    ax.axvline(results["l_train"], color="gray", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation length (tokens); dotted: training length")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("Perplexity vs context length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate(runs: List[str], out: str, *, labels: Optional[List[str]] = None, l_train: Optional[int] = None,
             multipliers=(1, 2, 4, 8), n_windows: int = 16, lsm_samples: int = 64, batch_size: int = 4,
             eval_files: Optional[List[str]] = None, tokenizer: Optional[str] = None, backend: str = "auto",
             seed: int = 1234, device: str = "") -> dict:
    """Evaluate ``runs``; returns the results dict (also ``results.json`` + ``ppl_vs_length.png`` in ``out``).

    Everything is checked (paths, lengths vs positions and corpus) before ``out`` is created.
    """
    from .data import DEFAULT_TOKENIZER, DataError, eval_windows, load_corpus, load_tokenizer
    from .loop import TrainConfig, _quiet_transformers, build_model, max_positions

    _quiet_transformers()

    if labels and len(labels) != len(runs):
        raise ConfigError(f"--labels: {len(labels)} labels for {len(runs)} runs")
    resolved = [_resolve(r) for r in runs]
    lt = l_train or next((r[2] for r in resolved if r[2]), None)
    if not lt:
        raise ConfigError("--l-train is needed (no run records its training length)")
    lengths = [int(m * lt) for m in multipliers]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # all runs must share one tokenizer for the windows to be the same text; the first one decides
    tok_path = tokenizer or next((r[1] for r in resolved if r[1]), None) or DEFAULT_TOKENIZER
    try:
        tok = load_tokenizer(tok_path)
        corpus = load_corpus(tok, "test", eval_files)
        if corpus.longest < max(lengths) + 1:
            raise DataError(f"held-out corpus too short: longest document {corpus.longest} tokens, "
                            f"evaluation at {max(lengths)} needs {max(lengths) + 1}")
    except DataError as e:
        raise ConfigError(str(e)) from None
    models = []
    for (ckpt, _, _), run in zip(resolved, runs):
        m = build_model(TrainConfig(), tok.vocab_size, dev, path=ckpt).eval()
        npos = max_positions(m)
        if npos is not None and max(lengths) > npos:
            raise ConfigError(
                f"{run}: evaluation length {max(lengths)} exceeds max_position_embeddings={npos}; this evaluation "
                "does not extend RoPE, so pass smaller --lengths (or a model with more positions)"
            )
        models.append(m)
    names = labels or [os.path.basename(os.path.normpath(r)) for r in runs]
    results = {"l_train": lt, "lengths": lengths, "n_windows": n_windows, "rope_extension": None, "runs": {}}
    wins = {L: eval_windows(corpus, L + 1, n_windows, seed=seed) for L in lengths}
    for name, m in zip(names, models):
        r = {"ppl": {}, "run": runs[names.index(name)]}
        for L in lengths:
            r["ppl"][str(L)] = perplexity(m, wins[L], lt, batch_size, backend)
        r["lsm"] = lsm(m, corpus, lt, lsm_samples, seed, backend)
        results["runs"][name] = r
    os.makedirs(out, exist_ok=True)
    from .checkpoint import atomic_write_text

    atomic_write_text(os.path.join(out, "results.json"), json.dumps(results, indent=1))
    plot(results, os.path.join(out, "ppl_vs_length.png"))
    return results


def markdown_table(results: dict) -> str:
    lengths = results["lengths"]
    head = "| run | " + " | ".join(f"PPL@{L}" for L in lengths) + " | tail PPL@" + str(lengths[-1]) + " | LSM |"
    sep = "|" + "---|" * (len(lengths) + 3)
    rows = []
    for name, r in results["runs"].items():
        cells = [f"{r['ppl'][str(L)]['ppl']:.2f}" for L in lengths]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {r['ppl'][str(lengths[-1])]['ppl_tail']:.2f} | "
                    f"{r['lsm']['lsm']:.4f} |")
    return "\n".join([head, sep] + rows)


def eval_main(argv: Optional[List[str]] = None) -> int:
    """CLI entry: ``lsa eval``. Returns 0 on success, 2 on a bad input."""
    from ..integrations.hf import UnsupportedModel

    ap = argparse.ArgumentParser(prog="lsa eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="training out dirs, checkpoint dirs or model dirs")
    ap.add_argument("--labels", nargs="*", default=None)
    ap.add_argument("--out", default="runs/eval")
    ap.add_argument("--l-train", type=int, default=None, help="default: read from the first run's config")
    ap.add_argument("--lengths", type=float, nargs="+", default=[1, 2, 4, 8], help="multiples of l_train")
    ap.add_argument("--n-windows", type=int, default=16)
    ap.add_argument("--lsm-samples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-files", nargs="*", default=None, help="held-out text files (default: shipped held-out works)")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--backend", default="auto", choices=["auto", "cpu", "triton", "reference"])
    ap.add_argument("--device", default="")
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args(argv)
    try:
        res = evaluate(a.runs, a.out, labels=a.labels, l_train=a.l_train, multipliers=a.lengths, n_windows=a.n_windows,
                       lsm_samples=a.lsm_samples, batch_size=a.batch_size, eval_files=a.eval_files,
                       tokenizer=a.tokenizer, backend=a.backend, seed=a.seed, device=a.device)
    except (ConfigError, UnsupportedModel, FileNotFoundError) as e:
        print(f"lsa eval: error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(res))
    print(f"wrote {os.path.join(a.out, 'results.json')} and {os.path.join(a.out, 'ppl_vs_length.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(eval_main())
