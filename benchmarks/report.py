"""CSV → plots (PNG) + markdown summary + the goal PASS/MISS lines.

    python -m benchmarks.report benchmarks/results/cpu_ce.csv benchmarks/results/cpu_long_short.csv \
        --out benchmarks/results --tag cpu

Ratios (``×gemm``, ``×naive``) are taken between rows of the same CSV set (one run, same machine, same
shape): ``time / time(gemm)`` and ``time / time(naive)``; memory ratio ``peak / peak(naive)``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import math
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from .cases import GOAL_CE, GOAL_LS

NUM = ("N", "H", "V")
FLOATS = ("time_ms", "time_ms_min", "time_ms_max", "time_ms_first", "peak_mem_mb", "peak_mem_first_mb",
          "base_mem_mb", "loss")
OURS = ("lsa_cpu", "lsa_triton")
IMPL_ORDER = ("lsa_triton", "lsa_cpu", "naive", "torch_chunked", "cce", "liger", "gemm")


def read_rows(paths: Iterable) -> List[Dict]:
    rows = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            continue
        with open(p, newline="") as f:
            for r in csv.DictReader(f):
                for k in NUM:
                    r[k] = int(r[k]) if r.get(k) not in (None, "") else 0
                for k in FLOATS:
                    try:
                        r[k] = float(r[k]) if r.get(k) not in (None, "") else math.nan
                    except ValueError:
                        r[k] = math.nan
                rows.append(r)
    return rows


def _ok(r: Dict) -> bool:
    return r.get("status") == "ok" and math.isfinite(r.get("time_ms", math.nan))


def _key(r: Dict) -> Tuple:
    return (r["op"], r.get("divergence", ""), r["dtype"], r["mode"], r["N"], r["H"], r["V"])


def by_shape(rows: List[Dict]) -> "OrderedDict[Tuple, Dict[str, Dict]]":
    out: "OrderedDict[Tuple, Dict[str, Dict]]" = OrderedDict()
    for r in rows:
        out.setdefault(_key(r), {})[r["impl"]] = r
    return out


def _impl_rank(impl: str) -> int:
    return IMPL_ORDER.index(impl) if impl in IMPL_ORDER else len(IMPL_ORDER)


def _ratio(a: Optional[Dict], b: Optional[Dict], field: str) -> float:
    if not a or not b or not _ok(a) or not _ok(b):
        return math.nan
    x, y = a.get(field, math.nan), b.get(field, math.nan)
    if not (math.isfinite(x) and math.isfinite(y)) or y <= 0:
        return math.nan
    return x / y


def _f(v: float, spec: str = ".2f", suffix: str = "") -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:{spec}}{suffix}"


# ----------------------------------------------------------------------------------------------- goals


def goal_lines(rows: List[Dict]) -> List[str]:
    """The two goal targets, evaluated on the rows of this run. One line each, PASS / MISS / N/A."""
    shapes = by_shape(rows)
    lines = []
    for goal, t_target, what in ((GOAL_CE, 1.20, "3 bare GEMMs"), (GOAL_LS, 1.25, "6 bare GEMMs")):
        key = (goal["op"], goal["divergence"], goal["dtype"], goal["mode"], goal["N"], goal["H"], goal["V"])
        impls = shapes.get(key, {})
        name = f"{goal['op']}{'/' + goal['divergence'] if goal['divergence'] else ''} {goal['mode']} {goal['dtype']} " \
               f"N={goal['N']}{' per view' if goal['op'] == 'long_short' else ''} H={goal['H']} V={goal['V']}"
        ours = next((impls[i] for i in OURS if i in impls and _ok(impls[i])), None)
        if ours is None:
            lines.append(f"GOAL {name}: N/A (not in this run, or ours failed)")
            continue
        o = ours["impl"]
        g = impls.get("gemm")
        r = _ratio(ours, g, "time_ms")
        verdict = "N/A" if not math.isfinite(r) else ("PASS" if r <= t_target else "MISS")
        g = impls.get("gemm")
        r_min = _ratio(ours, g, "time_ms_min")
        lines.append(
            f"GOAL {name}: time {o} {ours['time_ms'] / 1e3:.2f} s vs {what} "
            f"{_f(g['time_ms'] / 1e3 if g and _ok(g) else math.nan)} s = {_f(r, '.2f', 'x')} "
            f"(target <= {t_target:.2f}x; ratio of fastest calls {_f(r_min, '.2f', 'x')}; "
            f"{int(ours.get('repeats') or 0)}/{int(g.get('repeats') or 0) if g else 0} measured calls) {verdict}"
        )
        if goal["op"] == "ce":
            tc = impls.get("torch_chunked")
            ok = tc is not None and _ok(tc)
            verdict = "N/A" if not ok else ("PASS" if ours["peak_mem_mb"] <= tc["peak_mem_mb"] else "MISS")
            lines.append(
                f"GOAL {name}: peak extra memory {o} {ours['peak_mem_mb']:.1f} MB vs torch_chunked "
                f"{_f(tc['peak_mem_mb'] if ok else math.nan, '.1f')} MB (target <=) {verdict}"
            )
        else:
            nv = impls.get("naive")
            ok = nv is not None and _ok(nv) and ours["peak_mem_mb"] > 0
            red = nv["peak_mem_mb"] / ours["peak_mem_mb"] if ok else math.nan
            verdict = "N/A" if not ok else ("PASS" if red >= 10 else "MISS")
            lines.append(
                f"GOAL {name}: extra memory naive (reference, materialised) "
                f"{_f(nv['peak_mem_mb'] if nv is not None and _ok(nv) else math.nan, '.0f')} MB / {o} "
                f"{ours['peak_mem_mb']:.0f} MB = {_f(red, '.1f', 'x')} less (target >= 10x) {verdict}"
            )
    return lines


# ------------------------------------------------------------------------------------------- markdown


def _hours(a: str, b: str) -> float:
    """Hours from ISO timestamp ``a`` to ``b``."""
    from datetime import datetime

    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds() / 3600.0


def summary_markdown(rows: List[Dict], machine: Optional[Dict] = None, title: str = "") -> str:
    out = [f"# {title or 'lsa_kernels benchmarks'}", ""]
    if machine:
        bits = [f"CPU: {machine.get('cpu_model', '?')} ({machine.get('threads', '?')} threads)"]
        if machine.get("gpu_name"):
            bits.append(f"GPU: {machine['gpu_name']}" + (f" ({machine['nvidia_smi']})" if machine.get("nvidia_smi") else ""))
        bits.append(f"torch {machine.get('torch', '?')}, triton {machine.get('triton', '?') or '-'}, "
                    f"cut-cross-entropy {machine.get('cut_cross_entropy', '?') or '-'}, "
                    f"liger-kernel {machine.get('liger_kernel', '?') or '-'}")
        if "lsa_kernels_C" in machine:
            bits.append(f"lsa_kernels C++ extension built: {machine['lsa_kernels_C']}; git {machine.get('git', '')} (of the last run)")
        out += ["- " + b for b in bits]
    stamps = sorted(r["timestamp"] for r in rows if r.get("timestamp") and r.get("status") == "ok")
    if stamps:
        runs = 1 + sum(1 for a, b in zip(stamps, stamps[1:]) if _hours(a, b) > 0.5)
        span = f"measured {stamps[0]} … {stamps[-1]}"
        if runs > 1:
            span += (f" in {runs} sittings (`--resume` fills in the cases a run did not reach; every shape's "
                     "implementations are measured in the same sitting, side by side)")
        out.append("- " + span)
    loads = [float(r["loadavg_1m"]) for r in rows if r.get("loadavg_1m") not in (None, "")]
    if loads:
        out.append(f"- 1-minute load average during the run: {min(loads):.1f} … {max(loads):.1f} "
                   "(more than the core count means other processes shared the CPUs: times are inflated)")
    out += [
        "",
        "Each row is one fresh process. `time` is the median of the measured calls (after warm-up); "
        "`peak extra` is the peak memory on top of the inputs during one call (CPU: VmHWM − VmRSS after "
        "a high-water-mark reset; GPU: max_memory_allocated − memory_allocated), gradients included. "
        "`×gemm` = time / time of the bare GEMMs the op needs (the floor); `×naive` = time / time of "
        "plain torch on materialised logits; `mem ×naive` = peak extra / that of naive; `1st call` = time "
        "and peak extra of the first (warm-up) call in the fresh process: it includes compilation and any "
        "workspace an implementation keeps between calls. "
        "All ratios compare rows of this same run.",
        "",
        "## Goals",
        "",
    ]
    out += ["    " + l for l in goal_lines(rows)]
    shapes = by_shape(rows)
    for op in ("ce", "long_short"):
        keys = [k for k in shapes if k[0] == op and any(r.get("status") not in ("skip", "not_run") for r in shapes[k].values())]
        n_not_run = sum(1 for k in shapes if k[0] == op for r in shapes[k].values() if r.get("status") == "not_run")
        if not keys:
            continue
        out += ["", f"## {'Linear cross-entropy' if op == 'ce' else 'Long-short loss (CE of both views + 0.1 * divergence)'}", ""]
        out.append("| div | dtype | mode | N | H | V | impl | time (ms) | ×gemm | ×naive | peak extra (MB) | mem ×naive "
                   "| 1st call (ms / MB) |")
        out.append("|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
        skipped = defaultdict(set)
        for k in keys:
            impls = shapes[k]
            for impl in sorted(impls, key=_impl_rank):
                r = impls[impl]
                if r.get("status") in ("skip", "not_run"):
                    why = r.get("reason", "") if r["status"] == "skip" else "not run (deadline)"
                    skipped[(impl, why)].add(k)
                    continue
                if not _ok(r):
                    cells = [r.get("status", "?") + (": " + r.get("reason", "")[:60] if r.get("reason") else "")]
                    cells += [""] * 5
                else:
                    bold = impl in OURS
                    t = f"{r['time_ms']:.1f}"
                    cells = [
                        f"**{t}**" if bold else t,
                        _f(_ratio(r, impls.get("gemm"), "time_ms"), ".2f", "x"),
                        _f(_ratio(r, impls.get("naive"), "time_ms"), ".2f", "x"),
                        _f(r["peak_mem_mb"], ".0f") if impl != "gemm" else "(prealloc.)",
                        _f(_ratio(r, impls.get("naive"), "peak_mem_mb"), ".2f", "x") if impl != "gemm" else "",
                        f"{_f(r.get('time_ms_first', math.nan), '.0f')} / {_f(r.get('peak_mem_first_mb', math.nan), '.0f')}",
                    ]
                out.append(f"| {k[1] or '-'} | {k[2]} | {k[3]} | {k[4]} | {k[5]} | {k[6]} | {impl} | " + " | ".join(cells) + " |")
        skipped = {k: v for k, v in skipped.items() if not k[1].startswith("not run")}
        if skipped or n_not_run:
            out.append("")
            for (impl, reason), ks in sorted(skipped.items()):
                out.append(f"- skipped `{impl}` ({len(ks)} shapes): {reason}")
            if n_not_run:
                out.append(f"- {n_not_run} cases not run: the run's --deadline was reached (see the CSV)")
    # loss agreement: the implementations see the same inputs, so their losses should agree
    bad = []
    for k, impls in shapes.items():
        vals = {i: r["loss"] for i, r in impls.items() if _ok(r) and math.isfinite(r.get("loss", math.nan)) and i != "liger"}
        if len(vals) >= 2:
            lo, hi = min(vals.values()), max(vals.values())
            tol = 1e-3 if k[2] == "fp32" else 3e-2
            if hi - lo > tol * max(1.0, abs(hi)):
                bad.append(f"{k}: " + ", ".join(f"{i}={v:.5f}" for i, v in vals.items()))
    out += ["", "## Loss agreement", ""]
    out += (["All implementations of each shape agree on the loss value."] if not bad
            else ["Losses that disagree (check these):", ""] + [f"- {b}" for b in bad])
    out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- plots


def make_plots(rows: List[Dict], out_dir: Path, tag: str) -> List[Path]:
    """Time and peak memory against N (and against V where a V sweep exists), one line per impl.

    Without matplotlib (a GPU image may lack it) no plot is drawn and the summary says so: tables always,
    plots when possible."""
    try:
        import matplotlib
    except ImportError:
        print("benchmarks: matplotlib is not installed; writing tables without plots", file=sys.stderr)
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if _ok(r)]
    written = []
    for axis, fixed in (("N", ("V",)), ("V", ("N",))):
        groups = defaultdict(list)
        for r in ok:
            groups[(r["op"], r.get("divergence", ""), r["dtype"], r["mode"], r["H"], r[fixed[0]])].append(r)
        for (op, div, dt, mode, H, fx), rs in groups.items():
            xs = sorted({r[axis] for r in rs})
            if len(xs) < 2:
                continue
            fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
            for impl in sorted({r["impl"] for r in rs}, key=_impl_rank):
                pts = sorted((r[axis], r["time_ms"], r["peak_mem_mb"]) for r in rs if r["impl"] == impl)
                style = dict(marker="o", lw=2.4 if impl in OURS else 1.4, ls="--" if impl == "gemm" else "-")
                ax_t.plot([p[0] for p in pts], [p[1] for p in pts], label=impl, **style)
                if impl != "gemm":
                    ax_m.plot([p[0] for p in pts], [p[2] for p in pts], label=impl, **style)
            xl = "rows N" + (" per view" if op == "long_short" else "") if axis == "N" else "vocabulary V"
            for ax, yl in ((ax_t, "time (ms, median)"), (ax_m, "peak extra memory (MB)")):
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xticks(xs)
                ax.set_xticklabels([str(x) for x in xs])
                ax.minorticks_off() if len(xs) > 1 else None
                ax.set_xlabel(xl)
                ax.set_ylabel(yl)
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
            fxn = f"V={fx}" if axis == "N" else f"N={fx}"
            fig.suptitle(f"{tag}: {op}{'/' + div if div else ''} {mode} {dt}, H={H}, {fxn}")
            fig.tight_layout()
            p = out_dir / f"{op}{'_' + div if div else ''}_{dt}_{mode}_H{H}_{fxn.replace('=', '')}_vs_{axis}.png"
            fig.savefig(p, dpi=110)
            plt.close(fig)
            written.append(p)
    return written


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_report(out_dir: Path, tag: str, title: str = "") -> Tuple[Path, List[str]]:
    """Read ``{tag}_ce.csv`` / ``{tag}_long_short.csv`` in ``out_dir``; write ``SUMMARY_{tag}.md`` and the
    PNGs (in ``plots_{tag}/``); return the goal lines."""
    out_dir = Path(out_dir)
    rows = read_rows([out_dir / f"{tag}_{op}.csv" for op in ("ce", "long_short")])
    mpath = out_dir / f"{tag}_machine.json"
    machine = json.loads(mpath.read_text()) if mpath.exists() else None
    plot_dir = out_dir / f"plots_{tag}"
    plot_dir.mkdir(parents=True, exist_ok=True)
    for old in plot_dir.glob("*.png"):
        old.unlink()
    pngs = make_plots(rows, plot_dir, tag)
    md = out_dir / f"SUMMARY_{tag}.md"
    text = summary_markdown(rows, machine, title or f"lsa_kernels benchmarks ({tag})")
    if pngs:
        text += "\n## Plots\n\n" + "\n".join(f"![{p.stem}]({plot_dir.name}/{p.name})" for p in pngs) + "\n"
    elif not _have_matplotlib():
        text += "\n(no plots: matplotlib is not installed)\n"
    md.write_text(text)
    return md, goal_lines(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="cpu", help="file prefix: reads {tag}_*.csv, writes SUMMARY_{tag}.md")
    a = ap.parse_args(argv)
    md, goals = write_report(Path(a.out), a.tag)
    print(f"wrote {md}")
    print("\n".join(goals))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
