"""The training-step benchmark's report: read its CSV back, the longest context that fits in a memory line, the
long-short vs transformers comparison, ``SUMMARY.md`` and the plot (``benchmarks/train_step.py`` measures;
``python -m benchmarks.train_step --report-only`` rewrites them from the CSV)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

OBJECTIVES = ("hf", "fused_ce", "long_short")
LABELS = {
    "hf": "transformers loss (logits)",
    "fused_ce": "lsa fused CE",
    "long_short": "lsa long-short (2 views)",
}


def read_rows(path: Path) -> List[Dict]:
    """The CSV rows with numbers parsed (missing numbers are NaN)."""
    if not Path(path).exists():
        return []
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            for k in ("T", "tokens_processed", "repeats", "window_tokens", "V", "H", "layers", "threads"):
                try:
                    r[k] = int(float(r[k]))
                except (ValueError, TypeError, KeyError):
                    r[k] = 0 if k == "T" else None  # blank stays blank when the CSV is rewritten (--resume)
            for k in ("peak_extra_mib", "peak_total_mib", "step_s", "step_s_min", "fwd_bwd_s", "opt_s",
                      "base_mib", "mem_cap_mib", "loss", "loadavg_1m", "wall_s"):
                try:
                    r[k] = float(r[k])
                except (ValueError, TypeError, KeyError):
                    r[k] = float("nan")
            r["grad_ckpt"] = str(r.get("grad_ckpt")) in ("True", "true", "1")
            rows.append(r)
    return rows


def fits(r: Dict, fit_mib: float) -> Optional[bool]:
    """True/False when the row says whether the step fits in ``fit_mib`` of total peak; None if unknown."""
    if r["status"] == "ok":
        return r["peak_total_mib"] <= fit_mib
    if r["status"] == "oom":  # it needs more than its cap: known not to fit only if the cap was >= the line
        cap = r.get("mem_cap_mib", float("nan"))
        try:
            cap = float(cap)
        except (TypeError, ValueError):
            return None
        return False if cap >= fit_mib else None
    return None


def longest_fit(rows: Sequence[Dict], objective: str, ckpt: bool, fit_mib: float) -> Dict:
    """The longest measured T whose step fits in ``fit_mib`` (total peak), for one objective/checkpointing.

    Returns ``{"fit": T or None, "next": the smallest larger T that does not fit or None,
    "grid_fit": the same on grid rows only, "grid_next": ..., "refined": bool}``."""
    out = {}
    for name, kinds in (("grid", ("grid",)), ("all", ("grid", "refine"))):
        rs = [r for r in rows if r["objective"] == objective and r["grad_ckpt"] == ckpt and r.get("kind", "grid") in kinds]
        known = sorted((r["T"], fits(r, fit_mib)) for r in rs if fits(r, fit_mib) is not None)
        ok_T = [T for T, f in known if f]
        best = max(ok_T) if ok_T else None
        bad_T = [T for T, f in known if not f and (best is None or T > best)]
        out[name] = (best, min(bad_T) if bad_T else None)
    return {"fit": out["all"][0], "next": out["all"][1], "grid_fit": out["grid"][0], "grid_next": out["grid"][1],
            "refined": out["all"] != out["grid"]}


def compare_long_short(rows: Sequence[Dict]) -> Tuple[Optional[bool], List[Dict]]:
    """Per length and checkpointing setting: does the long-short step (two views) peak below transformers'
    one-view step (total peak)? ``oom`` of transformers' step with long-short ok counts as yes (its peak is
    above the cap, long-short's below). Returns (all yes, or None if no length is comparable; the details)."""
    by = {(r["objective"], r["grad_ckpt"], r["T"]): r for r in rows if r.get("kind", "grid") == "grid"}
    details = []
    for ckpt in (False, True):
        for T in sorted({k[2] for k in by if k[1] == ckpt}):
            a, b = by.get(("long_short", ckpt, T)), by.get(("hf", ckpt, T))
            if a is None or b is None:
                continue
            if a["status"] == "ok" and b["status"] == "ok":
                verdict = a["peak_total_mib"] < b["peak_total_mib"]
            elif a["status"] == "ok" and b["status"] == "oom":
                verdict = a["peak_total_mib"] < b.get("mem_cap_mib", float("inf")) or a["peak_total_mib"] < b.get(
                    "peak_total_mib", 0)
            elif a["status"] == "oom" and b["status"] == "ok":
                verdict = False
            else:
                verdict = None
            details.append(dict(T=T, grad_ckpt=ckpt, long_short=a, hf=b, yes=verdict))
    known = [d["yes"] for d in details if d["yes"] is not None]
    return (all(known) if known else None), details


def _cell(r: Optional[Dict], field: str = "peak_total_mib", spec: str = ".0f") -> str:
    if r is None:
        return "–"
    if r["status"] == "ok":
        return format(r[field], spec)
    if r["status"] == "oom":
        v = r.get("peak_total_mib", float("nan")) if field == "peak_total_mib" else float("nan")
        cap = r.get("mem_cap_mib", float("nan"))
        if str(r.get("reason", "")).startswith("not run"):
            return "oom (not run)"
        if field == "peak_total_mib" and not math.isnan(cap):
            return f"oom (> {cap:.0f} cap)" if math.isnan(v) or v < cap * 0.9 else f"oom (> {v:.0f})"
        return "oom"
    return r["status"]


def make_plot(rows: Sequence[Dict], path: Path, fit_mib: float, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"hf": "tab:red", "fused_ce": "tab:blue", "long_short": "tab:green"}
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(12, 4.8))
    xs = sorted({r["T"] for r in rows if r.get("kind", "grid") == "grid"}) or sorted({r["T"] for r in rows})
    for obj in OBJECTIVES:
        for ckpt in (False, True):
            rs = sorted((r for r in rows if r["objective"] == obj and r["grad_ckpt"] == ckpt), key=lambda r: r["T"])
            ok = [r for r in rs if r["status"] == "ok"]
            if not rs:
                continue
            lab = f"{LABELS[obj]}, {'ckpt' if ckpt else 'no ckpt'}"
            style = dict(color=colors[obj], ls="--" if ckpt else "-", marker="s" if ckpt else "o", ms=4,
                         lw=2.2 if obj != "hf" else 1.6)
            if ok:
                ax_m.plot([r["T"] for r in ok], [r["peak_total_mib"] / 1024 for r in ok], label=lab, **style)
                okg = [r for r in ok if r.get("kind", "grid") == "grid"]  # bisection probes ran at another load
                ax_t.plot([r["T"] for r in okg], [r["step_s"] for r in okg], label=lab, **style)
            oom = [r for r in rs if r["status"] == "oom" and r.get("kind", "grid") == "grid"]
            for r in oom:
                y = max(r.get("peak_total_mib", 0) or 0, r.get("mem_cap_mib", 0) or 0)
                if y > 0 and not math.isnan(y):
                    ax_m.plot([r["T"]], [y / 1024], marker="^", mfc="none", color=colors[obj], ms=9, ls="none")
    ax_m.axhline(fit_mib / 1024, color="k", lw=1, ls=":", label=f"{fit_mib / 1024:g} GiB")
    if any(r["status"] == "oom" for r in rows):
        ax_m.plot([], [], marker="^", mfc="none", color="gray", ls="none", label="oom: above the cap (a lower bound)")
    from matplotlib.ticker import FuncFormatter

    for ax, yl in ((ax_m, "peak memory of the step, total (GiB)"), (ax_t, "step time (s, median)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2 if ax is ax_m else 10)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x // 1024}K" if x % 1024 == 0 else str(x) for x in xs])
        ax.minorticks_off()
        ax.set_xlabel("context length T (tokens per view)")
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
    ax_m.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_markdown(rows: Sequence[Dict], machine: Dict, fit_mib: float, meta: Dict) -> Tuple[str, List[str]]:
    """SUMMARY.md text and the headline lines (the goal line and the longest fits)."""
    grid = [r for r in rows if r.get("kind", "grid") == "grid"]
    Ts = sorted({r["T"] for r in grid})
    settings = [(o, c) for o in OBJECTIVES for c in (False, True)
                if any(r["objective"] == o and r["grad_ckpt"] == c for r in grid)]
    by = {(r["objective"], r["grad_ckpt"], r["T"]): r for r in grid}
    r0 = next((r for r in rows if r.get("V")), rows[0] if rows else {})
    stamps = sorted(r.get("timestamp", "") for r in rows if r.get("timestamp"))
    loads = [r["loadavg_1m"] for r in rows if not math.isnan(r.get("loadavg_1m", float("nan")))]
    L = [f"# Training-step memory at long context ({meta.get('mode', 'full')})", ""]
    L.append(f"- Model: transformers LlamaForCausalLM, V={r0.get('V')}, hidden {r0.get('H')}, "
             f"{r0.get('layers')} layers, {meta.get('model_desc', '')}, fp32, CPU, SDPA attention, batch 1, "
             "random ids, labels = inputs")
    L.append(f"- Step: forward + backward + {'AdamW.step() + zero_grad(set_to_none=True)' if r0.get('optimizer') == 'adamw' else 'zero_grad (no optimizer step)'}"
             "; checkpointing = `gradient_checkpointing_enable(use_reentrant=False)`")
    L.append(f"- Machine: {machine.get('cpu_model', '?')}, {machine.get('cpu_count', '?')} cores "
             f"({machine.get('threads', '?')} torch threads), {machine.get('mem_total_gib', '?')} GiB RAM; "
             f"torch {machine.get('torch', '?')}, transformers {machine.get('transformers', '?')}; "
             f"git {machine.get('git', '?')}")
    if stamps:
        L.append(f"- Cases started {stamps[0]} … {stamps[-1]}" + (f"; 1-minute load average {min(loads):.1f} … {max(loads):.1f} "
                 "(above the core count = CPUs shared with other work: times are inflated and noisy; memory is not affected)"
                 if loads else ""))
    for run in machine.get("earlier_runs", []) + [meta]:
        if run.get("wall_s"):
            L.append(f"- Wall time: {run['wall_s'] / 60:.1f} min for `{run.get('command', '')}`")
    L += ["", "`peak total` = the process's VmHWM during the step (model, optimizer state, interpreter and "
          "libraries included); `extra` = VmHWM − VmRSS just before the step (the step's own memory: activations, "
          "logits, gradients, optimizer temporaries). `oom (> X)`: the step failed at the memory cap after "
          "reaching X MiB (or the cap), i.e. it needs more. Times: median of `repeats` steps in the same "
          "process (1 at the large lengths). One fresh process per cell.", ""]

    head = "| T | " + " | ".join(f"{LABELS[o]}{', ckpt' if c else ''}" for o, c in settings) + " |"
    L += ["## Peak total memory (MiB) [extra over the resident state]", "", head,
          "|---:|" + "---:|" * len(settings)]
    for T in Ts:
        cells = []
        for o, c in settings:
            r = by.get((o, c, T))
            cells.append(_cell(r) + (f" [{r['peak_extra_mib']:.0f}]" if r is not None and r["status"] == "ok" else ""))
        L.append(f"| {T} | " + " | ".join(cells) + " |")
    L += ["", "## Step time (s) [repeats]", "", head, "|---:|" + "---:|" * len(settings)]
    for T in Ts:
        cells = []
        for o, c in settings:
            r = by.get((o, c, T))
            cells.append(_cell(r, "step_s", ".2f") + (f" [{r['repeats']}]" if r is not None and r["status"] == "ok" else ""))
        L.append(f"| {T} | " + " | ".join(cells) + " |")

    headline = []
    L += ["", f"## Longest context that fits in {fit_mib / 1024:g} GiB (total peak ≤ {fit_mib:.0f} MiB)", ""]
    L.append("| objective | checkpointing | longest measured T that fits | next measured T (does not fit) | how |")
    L.append("|---|---|---:|---:|---|")
    for o, c in settings:
        lf = longest_fit(rows, o, c, fit_mib)
        fit = "none" if lf["fit"] is None else str(lf["fit"])
        nxt = "–" if lf["next"] is None else str(lf["next"])
        if lf["fit"] is not None and lf["next"] is None:
            how = "fits at every measured length (no upper bound measured)"
            fit = f"≥ {fit}"
        elif lf["refined"]:
            how = f"grid {lf['grid_fit']} / {lf['grid_next']}, refined by bisection"
        else:
            how = "grid lengths only"
        L.append(f"| {LABELS[o]} | {'on' if c else 'off'} | {fit} | {nxt} | {how} |")
        headline.append(f"longest T in {fit_mib / 1024:g} GiB: {LABELS[o]}, ckpt {'on' if c else 'off'}: {fit}")

    allyes, details = compare_long_short(rows)
    word = {True: "yes", False: "no", None: "n/a"}
    per = "; ".join(f"T={d['T']}{' ckpt' if d['grad_ckpt'] else ''}: {word[d['yes']]}" for d in details)
    goal = (f"long-short step (two views) peaks below transformers' one-view step at every length: "
            f"{word[allyes]} ({per})")
    L += ["", "## Long-short (two views) vs transformers' loss (one view)", "", goal, ""]
    if details:
        L.append("| T | checkpointing | long-short total (MiB) | transformers total (MiB) | below? |")
        L.append("|---:|---|---:|---:|---|")
        for d in details:
            L.append(f"| {d['T']} | {'on' if d['grad_ckpt'] else 'off'} | {_cell(d['long_short'])} | {_cell(d['hf'])} "
                     f"| {word[d['yes']]} |")
    bad = [r for r in rows if r["status"] not in ("ok", "oom")]
    if bad:
        L += ["", "## Not measured", ""]
        L += [f"- {r['objective']} ckpt={r['grad_ckpt']} T={r['T']}: {r['status']} {r.get('reason', '')}" for r in bad]
    refine = [r for r in rows if r.get("kind") == "refine"]
    if refine:
        L += ["", "## Bisection rows", "", "| objective | ckpt | T | total (MiB) | status |", "|---|---|---:|---:|---|"]
        L += [f"| {r['objective']} | {r['grad_ckpt']} | {r['T']} | {_cell(r)} | {r['status']} |"
              for r in sorted(refine, key=lambda r: (r['objective'], r['grad_ckpt'], r['T']))]
    L += ["", "![peak memory and step time](train_step.png)", ""]
    return "\n".join(L), [goal] + headline


def write_report(out: Path, fit_mib: float, meta: Optional[Dict] = None) -> Tuple[Path, List[str]]:
    out = Path(out)
    rows = read_rows(out / "train_step.csv")
    mpath = out / "machine.json"
    machine = json.loads(mpath.read_text()) if mpath.exists() else {}
    meta = dict(machine.get("run", {}), **(meta or {}))
    text, lines = summary_markdown(rows, machine, fit_mib, meta)
    if rows:
        r0 = next((r for r in rows if r.get("V")), rows[0])
        make_plot(rows, out / "train_step.png", fit_mib,
                  f"one training step, LlamaForCausalLM V={r0['V']} H={r0['H']} {r0['layers']} layers, fp32 CPU, batch 1")
    md = out / "SUMMARY.md"
    md.write_text(text)
    return md, lines


