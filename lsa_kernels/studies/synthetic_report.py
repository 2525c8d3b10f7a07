"""The synthetic study's report (docs/synthetic.md): per-group summaries and the paper's §3 claims checked
against a run (:func:`summarise`), the markdown table, the two figures, and ``save_results``.
Inputs are the JSON-able run dicts of :func:`lsa_kernels.studies.synthetic.run_study`."""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Dict, List

#: test lengths over which the "long-length error" (rel_long) is averaged
LONG_RANGE = (30, 50)


def _pearson(x: List[float], y: List[float]) -> float:
    n = len(x)
    if n < 3:
        return float("nan")
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def _spearman(x: List[float], y: List[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for k, i in enumerate(order):
            r[i] = float(k)
        return r
    return _pearson(ranks(x), ranks(y))


def summarise(runs: List[dict], cfg) -> dict:
    """Per-group summaries and the paper's §3 claims checked on ``runs`` (``cfg``: the run's
    :class:`~lsa_kernels.studies.synthetic.StudyConfig`)."""
    groups: Dict[str, dict] = {}
    for task in cfg.tasks:
        for pe in cfg.pes:
            rs = [r for r in runs if r["task"] == task and r["pe"] == pe]
            if not rs:
                continue
            n = len(rs)
            per_len = lambda key: [sum(r[key][i] for r in rs) / n for i in range(cfg.test_max_len)]  # noqa: E731

            def ms(key):
                v = [r[key] for r in rs]
                m = sum(v) / n
                s = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1)) if n > 1 else 0.0
                return dict(mean=m, std=s, min=min(v), max=max(v), per_seed=v)

            groups[f"{task}/{pe}"] = dict(
                task=task, pe=pe, n_seeds=n,
                mse=per_len("mse"), rel_rmse=per_len("rel_rmse"),
                rel_long=ms("rel_long"), rel_in=ms("rel_in"),
                misalign=ms("misalign"), misalign_dist=ms("misalign_dist"), misalign_long=ms("misalign_long"),
                final_train_loss=ms("final_train_loss"),
            )

    claims = {}
    # 1. mean prediction generalises, length prediction does not
    if "mean" in cfg.tasks and "length" in cfg.tasks:
        per_pe = {}
        for pe in cfg.pes:
            gm, gl = groups.get(f"mean/{pe}"), groups.get(f"length/{pe}")
            if gm and gl:
                per_pe[pe] = dict(mean_rel_long=gm["rel_long"]["mean"], length_rel_long=gl["rel_long"]["mean"],
                                  ratio=gl["rel_long"]["mean"] / max(gm["rel_long"]["mean"], 1e-12),
                                  holds_every_seed=gl["rel_long"]["min"] > gm["rel_long"]["max"])
        claims["mean_generalises_length_does_not"] = per_pe
    # 2. each reparameterisation helps length prediction
    if "length" in cfg.tasks:
        rep = {}
        for task in cfg.tasks:
            if not task.startswith("length_"):
                continue
            rep[task] = {}
            for pe in cfg.pes:
                g0, g1 = groups.get(f"length/{pe}"), groups.get(f"{task}/{pe}")
                if g0 and g1:
                    rep[task][pe] = dict(base_rel_long=g0["rel_long"]["mean"], reparam_rel_long=g1["rel_long"]["mean"],
                                         helps=g1["rel_long"]["mean"] < g0["rel_long"]["mean"])
        claims["reparameterisation_helps"] = rep
    # 3. best PE per task (lowest long-length relative error, mean over seeds)
    best = {}
    for task in cfg.tasks:
        cands = [(groups[f"{task}/{pe}"]["rel_long"]["mean"], pe) for pe in cfg.pes if f"{task}/{pe}" in groups]
        if cands:
            best[task] = min(cands)[1]
    claims["best_pe"] = best
    # 4. misalignment vs long-length error across all trained models
    xs = [r["misalign"] for r in runs]
    xl = [r["misalign_long"] for r in runs]
    xd = [r["misalign_dist"] for r in runs]
    ys = [r["rel_long"] for r in runs]
    lg = lambda v: [math.log10(max(t, 1e-30)) for t in v]  # noqa: E731
    claims["misalignment_vs_error"] = dict(
        n_models=len(runs),
        spearman_in_range=_spearman(xs, ys), pearson_log_in_range=_pearson(lg(xs), lg(ys)),
        spearman_dist=_spearman(xd, ys), pearson_log_dist=_pearson(lg(xd), lg(ys)),
        spearman_long=_spearman(xl, ys), pearson_log_long=_pearson(lg(xl), lg(ys)),
    )
    return dict(groups=groups, claims=claims)



TASK_LABEL = {"mean": "mean", "length": "length", "length_sqrt": "length via √n",
              "length_log": "length via log n", "length_invsqrt": "length via 1/√n"}


def plot_results(res: dict, out_dir: str) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = res["config"]
    tasks, pes = cfg["tasks"], cfg["pes"]
    Ls = list(range(1, cfg["test_max_len"] + 1))
    colors = {"nope": "tab:blue", "rope": "tab:orange", "learned": "tab:green"}
    styles = {"length": "-", "length_sqrt": "--", "length_log": "-.", "length_invsqrt": ":"}
    paths = []

    # Figure 1: relative error vs length. Panel per task, one line per PE; last panel overlays reparams.
    n = len(tasks) + (1 if any(t.startswith("length") for t in tasks) else 0)
    ncol = min(3, n)
    nrow = (n + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.7 * nrow), sharey=True, squeeze=False)
    axes = list(axes.flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    axes = axes[:n]
    for ax, task in zip(axes, tasks):
        for pe in pes:
            g = res["groups"].get(f"{task}/{pe}")
            if g is None:
                continue
            per_seed = [r["rel_rmse"] for r in res["runs"] if r["task"] == task and r["pe"] == pe]
            lo = [min(v[i] for v in per_seed) for i in range(len(Ls))]
            hi = [max(v[i] for v in per_seed) for i in range(len(Ls))]
            ax.plot(Ls, g["rel_rmse"], color=colors[pe], label=pe)
            ax.fill_between(Ls, lo, hi, color=colors[pe], alpha=0.15, linewidth=0)
        ax.axvspan(cfg["train_min_len"], cfg["train_max_len"], color="red", alpha=0.07)
        ax.set_yscale("log")
        ax.set_title(TASK_LABEL.get(task, task))
        ax.set_xlabel("test length")
        ax.grid(alpha=0.3, which="both")
    for ax in axes[::ncol]:
        ax.set_ylabel("relative RMSE (seed mean; band min..max)")
    axes[0].legend(fontsize=8)
    if n > len(tasks):
        ax = axes[-1]
        for task in tasks:
            if not task.startswith("length"):
                continue
            for pe in pes:
                g = res["groups"].get(f"{task}/{pe}")
                if g is not None:
                    ax.plot(Ls, g["rel_rmse"], color=colors[pe], linestyle=styles[task],
                            label=f"{TASK_LABEL[task]}, {pe}")
        ax.axvspan(cfg["train_min_len"], cfg["train_max_len"], color="red", alpha=0.07)
        ax.set_yscale("log")
        ax.set_title("length: reparameterisations")
        ax.set_xlabel("test length")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6, ncol=1)
    fig.suptitle("Synthetic study (paper §3): train lengths 1–10 (shaded), test 1–50")
    fig.tight_layout()
    p = os.path.join(out_dir, "error_vs_length.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    # Figure 2: misalignment vs long-length error, one point per trained model.
    markers = {"mean": "o", "length": "s", "length_sqrt": "^", "length_log": "D", "length_invsqrt": "v"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, key, title in ((axes[0], "misalign", "per-sequence misalignment, lengths 5–10"),
                           (axes[1], "misalign_dist", "mean-output shift between lengths 5–10"),
                           (axes[2], "misalign_long", "per-sequence misalignment, lengths 25–50")):
        for r in res["runs"]:
            ax.scatter(max(r[key], 1e-8), r["rel_long"], color=colors[r["pe"]], marker=markers.get(r["task"], "o"),
                       s=30, alpha=0.8, edgecolor="k", linewidth=0.3)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"{key} (normalised by Var_train(target))")
        ax.set_ylabel(f"relative RMSE at lengths {LONG_RANGE[0]}–{LONG_RANGE[1]}")
        c = res["claims"]["misalignment_vs_error"]
        sp = c[{"misalign": "spearman_in_range", "misalign_dist": "spearman_dist", "misalign_long": "spearman_long"}[key]]
        ax.set_title(f"{title}\nSpearman ρ = {sp:.2f} over {c['n_models']} models", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], marker=markers[t], linestyle="", color="gray", label=TASK_LABEL[t]) for t in tasks]
    handles += [Line2D([], [], marker="o", linestyle="", color=colors[p], label=p) for p in pes]
    axes[2].legend(handles=handles, fontsize=7, loc="lower right")
    fig.tight_layout()
    p = os.path.join(out_dir, "misalignment_vs_error.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def markdown_table(res: dict) -> str:
    cfg = res["config"]
    lines = [
        f"Relative RMSE (mean ± std over {len(cfg['seeds'])} seeds) at training lengths "
        f"{cfg['train_min_len']}–{cfg['train_max_len']} and at test lengths {LONG_RANGE[0]}–{LONG_RANGE[1]}; "
        "misalignment = normalised long-short misalignment inside the training range.",
        "",
        "| task | PE | rel. error, lengths 1–10 | rel. error, lengths 30–50 | MSE at length 50 "
        "| misalign (5–10) | mean-output shift (5–10) | misalign (25–50) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, g in res["groups"].items():
        lines.append(
            f"| {TASK_LABEL.get(g['task'], g['task'])} | {g['pe']} "
            f"| {g['rel_in']['mean']:.3g} ± {g['rel_in']['std']:.2g} "
            f"| {g['rel_long']['mean']:.3g} ± {g['rel_long']['std']:.2g} "
            f"| {g['mse'][-1]:.3g} "
            f"| {g['misalign']['mean']:.3g} | {g['misalign_dist']['mean']:.3g} | {g['misalign_long']['mean']:.3g} |")
    cl = res["claims"]
    lines += ["", "Claims (paper §3) against this run:", ""]
    if "mean_generalises_length_does_not" in cl:
        for pe, c in cl["mean_generalises_length_does_not"].items():
            lines.append(f"- mean vs length, {pe}: length error / mean error at 30–50 = {c['ratio']:.1f}× "
                         f"({'holds on every seed' if c['holds_every_seed'] else 'NOT on every seed'})")
    for task, d in cl.get("reparameterisation_helps", {}).items():
        for pe, c in d.items():
            lines.append(f"- {TASK_LABEL[task]}, {pe}: {c['base_rel_long']:.3g} → {c['reparam_rel_long']:.3g} "
                         f"({'helps' if c['helps'] else 'does NOT help'})")
    for task, pe in cl.get("best_pe", {}).items():
        lines.append(f"- best PE for {TASK_LABEL[task]}: {pe}")
    m = cl["misalignment_vs_error"]
    lines.append(f"- misalignment vs error at 30–50 over {m['n_models']} models: Spearman "
                 f"{m['spearman_in_range']:.2f} (per-sequence, 5–10), {m['spearman_dist']:.2f} (mean-output shift, "
                 f"5–10), {m['spearman_long']:.2f} (per-sequence, 25–50)")
    return "\n".join(lines) + "\n"


def save_results(res: dict, out_dir: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"), "table": os.path.join(out_dir, "table.md")}
    with open(paths["json"], "w") as f:
        json.dump(res, f, indent=1)
    with open(paths["table"], "w") as f:
        f.write(markdown_table(res))
    try:
        paths["plots"] = plot_results(res, out_dir)
    except ImportError as e:  # pragma: no cover
        print(f"no plots: {e}", file=sys.stderr)
    return paths


