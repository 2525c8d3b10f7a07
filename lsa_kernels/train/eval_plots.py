"""The figures of ``lsa eval``: perplexity (and LongPPL) vs context length, and the pass-key heat maps."""

from __future__ import annotations

import math
import os

def plain_log_axis(axis) -> None:
    """A log axis labelled with plain numbers: ticks at 1, 2, 5 x 10^k, and where the data span less than those
    (runs with close perplexities) matplotlib's linear ticks, all written as plain decimals (no offset, no
    scientific notation, no minor-tick labels: never a stack of "3.84288x10^3")."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    fmt = ScalarFormatter(useOffset=False, useMathText=False)
    fmt.set_scientific(False)
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(fmt)
    axis.set_minor_formatter(NullFormatter())


def ppl_figure(results: dict):
    """The figure of :func:`plot` (not saved): PPL vs length, one line per run; a second panel with LongPPL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    has_long = any(v.get("longppl") is not None for r in runs.values() for v in r["ppl"].values())
    ncol = 2 if has_long else 1
    fig, axes = plt.subplots(1, ncol, figsize=(5.5 * ncol, 4.0), squeeze=False)
    axes = axes[0]
    for name, r in runs.items():
        xs = sorted(int(k) for k in r["ppl"])
        lsm = r.get("lsm") or {}
        div = next(iter(lsm), None)
        lab = f"{name} (LSM {div} {lsm[div]['lsm']:.3f})" if div else name
        line, = axes[0].plot(xs, [r["ppl"][str(k)]["ppl"] for k in xs], marker="o", ms=3, label=lab)
        if has_long:
            ys = [r["ppl"][str(k)].get("longppl") for k in xs]
            axes[1].plot(xs, [math.nan if y is None else y for y in ys], marker="o", ms=3, color=line.get_color())
    lt = results.get("l_train")
    titles = [f"Perplexity vs context ({results.get('score_tokens')} fixed targets per window)"]
    if has_long:
        lp = results.get("longppl") or {}
        titles.append(f"LongPPL ({lp.get('n_key')} key tokens, reference {os.path.basename(str(lp.get('reference')))})")
    for ax, title in zip(axes, titles):
        if lt:
            ax.axvline(lt, color="gray", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        plain_log_axis(ax.yaxis)
        ax.set_xlabel("context length (tokens); dotted: training length")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("held-out perplexity")
    if has_long:
        axes[1].set_ylabel("LongPPL")
    n = len(runs)
    axes[0].legend(fontsize=7 if n <= 8 else 5, ncol=1 if n <= 12 else 2)
    fig.tight_layout()
    return fig


def plot(results: dict, path: str) -> None:
    """PPL vs length, one line per run; a second panel with LongPPL when any run has it (saved to ``path``)."""
    import matplotlib.pyplot as plt

    fig = ppl_figure(results)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_passkey(passkey: dict, path: str) -> None:
    """Heat map (length x depth) of pass-key accuracy, one panel per run; cells show accuracy and the mean
    key-token log-prob."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = passkey["runs"]
    lengths, depths = passkey["lengths"], passkey["depths"]
    n = max(1, len(runs))
    ncol = min(4, n)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(1.6 + 0.75 * len(depths) * ncol, 1.2 + (0.5 + 0.4 * len(lengths)) * nrow),
                             squeeze=False, constrained_layout=True)
    im = None
    for ax, (name, r) in zip(axes.flat, runs.items()):
        acc = r["accuracy_grid"]
        im = ax.imshow(acc, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        for a in range(len(lengths)):
            for b in range(len(depths)):
                ax.text(b, a, f"{acc[a][b]:.1f}\n{r['key_logprob_grid'][a][b]:.1f}", ha="center", va="center",
                        fontsize=5, color="white" if acc[a][b] < 0.6 else "black")
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=6)
        ax.set_yticks(range(len(lengths)), [str(L) for L in lengths], fontsize=6)
        ax.set_title(f"{name}: acc {r['accuracy']:.2f}", fontsize=7)
        ax.set_xlabel("depth", fontsize=6)
        ax.set_ylabel("length", fontsize=6)
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="pass-key accuracy")
    fig.suptitle(f"Pass-key retrieval, {passkey['trials']} trials per cell (cell text: accuracy / mean key-token "
                 "log-prob)", fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
