"""Statistics of the multi-seed demo (``lsa demo``): pure functions of per-run numbers, no torch.

The demo fine-tunes the same base in several *arms* (ce1, ce2, sce, symkl, ...) for several seeds; the
same seed means the same data order and the same initial weights in every arm, so the comparison of two
arms is *paired by seed*. For each metric (lower is better for all of them: PPL, LongPPL, LSM, training CE)

* :func:`summarize`: mean ± std (sample std, ddof = 1) over the seeds of each arm;
* :func:`paired`: the per-seed relative difference ``100 * (arm - ref) / ref`` in %, its mean ± std, how
  many seeds are lower / higher, a two-sided paired t-test on the relative differences (H0: mean 0) and
  a two-sided exact sign test (binomial, ties dropped);
* :func:`verdict`: one line computed from :func:`paired`. The rule (fixed before any result was seen):
  the difference is *called* when the paired t-test gives p < 0.05 ("lower" / "higher"), otherwise
  "no significant difference". With 5 seeds the sign test cannot go below p = 2/32 = 0.0625, so it is
  reported but does not decide;
* :func:`bootstrap_ci`: where the runs carry per-window pieces of a metric (the recall testbed), a percentile
  bootstrap over the evaluation windows (the same resampled windows for every seed and both arms) of the
  seed-mean paired difference: a 95 % interval for the evaluation's sampling error, beside the t-test's
  seed-to-seed error;
* :func:`pearson`, :func:`spearman`: the paper's Table-1 check (LSM vs perplexity across runs), with
  the usual t-approximation p-value (exact enough for a report; no scipy needed);
* :func:`final_train_ce`: the mean of ``ce`` over the last 10 % of a run's ``log.jsonl``.

Everything here is plain Python on floats (NaN/None = missing: dropped pairwise, the count says so).
"""

from __future__ import annotations

import math
import random
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

__all__ = [
    "P_CALL", "N_BOOT", "bootstrap_ci", "holm", "is_absolute", "mean_std", "student_t_p", "sign_test_p", "paired", "verdict", "pearson", "spearman", "ranks",
    "final_train_ce", "summarize", "build_stats", "markdown", "fmt_pm", "plot",
]

P_CALL = 0.05  # the paired t-test level at which a difference is called (see the module docstring)
N_BOOT = 2000  # bootstrap resamples of the evaluation windows


def _ok(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def mean_std(xs: Iterable[float]):
    """(mean, sample std with ddof = 1, n) over the finite values; std is nan for n < 2, mean nan for n = 0."""
    v = [float(x) for x in xs if _ok(x)]
    n = len(v)
    if n == 0:
        return math.nan, math.nan, 0
    m = sum(v) / n
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1)) if n > 1 else math.nan
    return m, s, n


# ------------------------------------------------------------------------------------- distributions
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta (modified Lentz, as in Numerical Recipes)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        de = d * c
        h *= de
        if abs(de - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def student_t_p(t: float, df: float) -> float:
    """Two-sided p-value P(|T| >= |t|) of Student's t with ``df`` degrees of freedom."""
    if not (_ok(t) or (isinstance(t, float) and math.isinf(t))) or df <= 0:
        return math.nan
    if math.isinf(t):
        return 0.0
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def sign_test_p(k_lower: int, k_higher: int) -> float:
    """Two-sided exact sign test (ties dropped): P(a count as extreme as observed | p = 1/2)."""
    n = k_lower + k_higher
    if n == 0:
        return 1.0
    k = min(k_lower, k_higher)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


# ------------------------------------------------------------------------------------------ paired
def is_absolute(metric: str) -> bool:
    """Metrics compared as differences in points (recall, a fraction: x 100; the copy gap, in nats) rather than
    relative %: they can be 0, where a relative difference is undefined."""
    return metric.startswith(("recall", "copy gap"))


def paired(values: Mapping, ref: Mapping, absolute: bool = False) -> dict:
    """Paired comparison of ``values`` (seed -> metric of an arm) against ``ref`` (seed -> metric of the
    reference arm), over the seeds present and finite in both.

    Returns ``{"seeds", "rel_pct" (per seed, 100 (v - r) / r), "abs" (per seed, v - r), "n", "mean", "std",
    "k_lower", "k_higher", "t", "p_t" (two-sided paired t-test on rel_pct), "p_sign" (exact sign test)}``.
    """
    seeds = sorted(s for s in values if s in ref and _ok(values[s]) and _ok(ref[s]) and (absolute or ref[s] != 0))
    rel = [100.0 * (values[s] - ref[s]) / (1.0 if absolute else ref[s]) for s in seeds]
    ab = [values[s] - ref[s] for s in seeds]
    m, sd, n = mean_std(rel)
    k_lower = sum(1 for v in rel if v < 0)
    k_higher = sum(1 for v in rel if v > 0)
    if n >= 2 and sd > 0:
        t = m / (sd / math.sqrt(n))
        p_t = student_t_p(t, n - 1)
    elif n >= 2 and m != 0:  # every seed moved by exactly the same amount
        t, p_t = math.copysign(math.inf, m), 0.0
    else:
        t, p_t = math.nan, math.nan
    return {"seeds": seeds, "rel_pct": rel, "abs": ab, "absolute": absolute, "n": n, "mean": m, "std": sd, "k_lower": k_lower,
            "k_higher": k_higher, "t": t, "p_t": p_t, "p_sign": sign_test_p(k_lower, k_higher)}


def _pooled_value(part: Mapping, idx: Sequence[int]) -> float:
    num = sum(part["num"][i] for i in idx)
    den = sum(part["den"][i] for i in idx)
    if den <= 0:
        return math.nan
    return math.exp(num / den) if part["kind"] == "ppl" else num / den


def bootstrap_ci(arm_parts: Mapping, ref_parts: Mapping, absolute: bool = False, n_boot: int = N_BOOT,
                 seed: int = 0, level: float = 0.95) -> Optional[dict]:
    """Percentile bootstrap over evaluation windows of the mean over seeds of the paired difference (relative %,
    or x 100 points when ``absolute``), the quantity :func:`paired` tests.

    ``arm_parts`` / ``ref_parts``: seed -> ``{"kind": "ppl" | "frac", "num": [per window], "den": [per window]}``
    (a metric over a set of windows is ``exp(sum num / sum den)`` or ``sum num / sum den``). Every resample draws
    the windows once, with replacement, and uses them for every seed and both arms (the windows are the same
    held-out windows for every model). Returns ``{"lo", "hi", "level", "n_boot", "windows"}``, or None when no
    seed has pieces in both."""
    seeds = sorted(s for s in arm_parts if s in ref_parts and arm_parts[s] and ref_parts[s])
    if not seeds:
        return None
    n = len(arm_parts[seeds[0]]["num"])
    if n == 0 or any(len(p[s]["num"]) != n or len(p[s]["den"]) != n for s in seeds for p in (arm_parts, ref_parts)):
        raise ValueError("bootstrap_ci: every seed's pieces must cover the same windows")
    rng = random.Random(seed)
    stats = []
    for _ in range(n_boot):
        idx = [rng.randrange(n) for _ in range(n)]
        ds = []
        for s in seeds:
            v, r = _pooled_value(arm_parts[s], idx), _pooled_value(ref_parts[s], idx)
            if _ok(v) and _ok(r) and (absolute or r != 0):
                ds.append(100.0 * (v - r) / (1.0 if absolute else r))
        if ds:
            stats.append(sum(ds) / len(ds))
    if not stats:
        return None
    stats.sort()
    a = (1.0 - level) / 2.0
    pick = lambda q: stats[min(len(stats) - 1, max(0, int(round(q * (len(stats) - 1)))))]  # noqa: E731
    return {"lo": pick(a), "hi": pick(1.0 - a), "level": level, "n_boot": len(stats), "windows": n}


def _fmt_p(p: float) -> str:
    if not _ok(p):
        return "n/a"
    if p < 1e-4:
        return "< 0.0001"
    return f"{p:.2g}" if p < 0.1 else f"{p:.2f}"


def _fmt_r(c: dict) -> str:
    return f"{c['r']:+.3f} ({_fmt_p(c['p'])})" if _ok(c["r"]) else "n/a"


def _p_eq(p: float) -> str:
    """``p = 0.012`` / ``p < 0.0001`` / ``p = n/a``."""
    s = _fmt_p(p)
    return f"p {s}" if s.startswith("<") else f"p = {s}"


def holm(ps: Sequence[float]) -> List[float]:
    """Holm's step-down adjustment of the p-values ``ps`` (family-wise error across them; NaN stays NaN): the
    i-th smallest p becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))`` with ``m`` the number of finite p."""
    idx = sorted((i for i, p in enumerate(ps) if _ok(p)), key=lambda i: ps[i])
    out = [math.nan] * len(ps)
    run, m = 0.0, len(idx)
    for j, i in enumerate(idx):
        run = max(run, min(1.0, (m - j) * ps[i]))
        out[i] = run
    return out


def call(d: dict, level: float = P_CALL) -> str:
    """The rule: "lower" / "higher" when the paired t-test gives p < level (Holm-adjusted across the verdict lines
    when ``d`` has ``p_holm``), else "no significant difference"."""
    p = d.get("p_holm", d["p_t"])
    if _ok(p) and p < level:
        return "lower" if d["mean"] < 0 else "higher"
    return "no significant difference"


def verdict(arm: str, ref: str, metric: str, d: dict, level: float = P_CALL) -> str:
    """One line, computed from :func:`paired`'s result ``d`` only, e.g.
    ``sce vs ce1: PPL@1024 lower on 4 of 5 seeds, mean -3.1 % ± 1.2 (paired t-test p = 0.012, sign test
    p = 0.38) -> lower``."""
    if d["n"] == 0:
        return f"{arm} vs {ref}: {metric}: no seeds to compare"
    sd = f"{d['std']:.1f}" if _ok(d["std"]) else "n/a"
    unit = "points (x 100)" if d.get("absolute") else "%"
    holm_s = f", Holm-adjusted {_p_eq(d['p_holm'])}" if "p_holm" in d else ""
    ci = d.get("ci")
    ci_s = (f", {100 * ci['level']:.0f} % bootstrap interval over {ci['windows']} windows [{ci['lo']:+.1f}, "
            f"{ci['hi']:+.1f}]" if ci else "")
    return (f"{arm} vs {ref}: {metric} lower on {d['k_lower']} of {d['n']} seeds, mean {d['mean']:+.1f} {unit} ± {sd} "
            f"(paired t-test {_p_eq(d['p_t'])}{holm_s}, sign test {_p_eq(d['p_sign'])}{ci_s}) -> {call(d, level)}")


# ------------------------------------------------------------------------------------- correlation
def pearson(x: Sequence[float], y: Sequence[float]) -> dict:
    """Pearson r over the pairs where both are finite, with the t-approximation two-sided p (df = n - 2)."""
    pairs = [(float(a), float(b)) for a, b in zip(x, y) if _ok(a) and _ok(b)]
    n = len(pairs)
    if n < 3:
        return {"r": math.nan, "p": math.nan, "n": n}
    mx = sum(a for a, _ in pairs) / n
    my = sum(b for _, b in pairs) / n
    sxy = sum((a - mx) * (b - my) for a, b in pairs)
    sxx = sum((a - mx) ** 2 for a, _ in pairs)
    syy = sum((b - my) ** 2 for _, b in pairs)
    if sxx == 0 or syy == 0:
        return {"r": math.nan, "p": math.nan, "n": n}
    r = max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))
    if abs(r) == 1.0:
        return {"r": r, "p": 0.0, "n": n}
    t = r * math.sqrt((n - 2) / (1 - r * r))
    return {"r": r, "p": student_t_p(t, n - 2), "n": n}


def ranks(x: Sequence[float]) -> List[float]:
    """1-based ranks, ties given their average rank."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return r


def spearman(x: Sequence[float], y: Sequence[float]) -> dict:
    """Spearman's rho (Pearson on average ranks) over the pairs where both are finite, t-approximation p."""
    pairs = [(float(a), float(b)) for a, b in zip(x, y) if _ok(a) and _ok(b)]
    if len(pairs) < 3:
        return {"r": math.nan, "p": math.nan, "n": len(pairs)}
    return pearson(ranks([a for a, _ in pairs]), ranks([b for _, b in pairs]))


def final_train_ce(rows: Sequence[Mapping], key: str = "ce", frac: float = 0.1) -> float:
    """Mean of ``row[key]`` over the last ``frac`` of the steps (at least one row) of a ``log.jsonl``."""
    v = [r[key] for r in rows if _ok(r.get(key))]
    if not v:
        return math.nan
    k = max(1, int(math.ceil(len(v) * frac)))
    return sum(v[-k:]) / k


# --------------------------------------------------------------------------------------- the table
def summarize(runs: Sequence[Mapping], metrics: Sequence[str]) -> Dict[str, Dict[str, dict]]:
    """``runs``: ``[{"arm", "seed", "metrics": {name: value}}]`` -> ``{arm: {metric: {mean, std, n}}}``
    (arms in order of first appearance)."""
    out: Dict[str, Dict[str, dict]] = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        out[arm] = {}
        for m in metrics:
            mu, sd, n = mean_std(r["metrics"].get(m) for r in runs if r["arm"] == arm)
            out[arm][m] = {"mean": mu, "std": sd, "n": n}
    return out


def _by_seed(runs, arm, metric):
    return {r["seed"]: r["metrics"].get(metric) for r in runs if r["arm"] == arm}


def _parts_by_seed(runs, arm, metric):
    return {r["seed"]: r["parts"][metric] for r in runs if r["arm"] == arm and metric in (r.get("parts") or {})}


def build_stats(runs: Sequence[Mapping], metrics: Sequence[str], refs: Sequence[str] = ("ce1", "ce2"),
                verdict_metrics: Sequence[str] = (), corr_target: Optional[str] = None,
                corr_predictors: Sequence[str] = (), level: float = P_CALL) -> dict:
    """Everything the table and the plot show, from per-run numbers:

    ``summary`` (:func:`summarize`), ``paired[ref][arm][metric]`` (:func:`paired`, every arm other than
    ``ref`` against each reference arm present), ``verdicts`` (:func:`verdict` lines for
    ``verdict_metrics``; with :func:`bootstrap_ci`'s interval where the runs carry ``"parts"``: metric -> per-window
    pieces), ``correlation[predictor]`` = Pearson and Spearman of each predictor with
    ``corr_target`` across all runs."""
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    res: dict = {"arms": arms, "metrics": list(metrics), "level": level, "summary": summarize(runs, metrics),
                 "paired": {}, "verdicts": [], "correlation": {}}
    for ref in refs:
        if ref not in arms:
            continue
        res["paired"][ref] = {}
        for arm in arms:
            if arm == ref or arm in res["paired"]:  # each pair once: no "ce1 vs ce2" after "ce2 vs ce1"
                continue
            res["paired"][ref][arm] = {m: paired(_by_seed(runs, arm, m), _by_seed(runs, ref, m), is_absolute(m))
                                       for m in metrics}
    lines = [(arm, ref, m, res["paired"][ref][arm][m]) for m in verdict_metrics for ref in res["paired"]
             for arm in res["paired"][ref]]
    for (arm, ref, m, d), ph in zip(lines, holm([d["p_t"] for _, _, _, d in lines])):
        d = dict(d, p_holm=ph)
        ci = bootstrap_ci(_parts_by_seed(runs, arm, m), _parts_by_seed(runs, ref, m), is_absolute(m))
        if ci is not None:
            d["ci"] = ci
        res["paired"][ref][arm][m] = d
        res["verdicts"].append(verdict(arm, ref, m, d, level))
    if corr_target:
        y = [r["metrics"].get(corr_target) for r in runs]
        for p in corr_predictors:
            x = [r["metrics"].get(p) for r in runs]
            res["correlation"][p] = {"pearson": pearson(x, y), "spearman": spearman(x, y), "target": corr_target}
    return res


def fmt_pm(mean: float, std: float, digits=2) -> str:
    """``mean ± std`` with ``digits`` decimals, or (``digits`` a string such as ``".4g"``) that format."""
    if not _ok(mean):
        return "n/a"
    f, fs = (f".{digits}f", f".{digits}f") if isinstance(digits, int) else (digits, ".2g")
    return f"{mean:{f}} ± {std:{fs}}" if _ok(std) else f"{mean:{f}}"


def _digits(metric: str):
    return ".4g" if metric.startswith("LSM") else (3 if "CE" in metric else 2)


def markdown(stats: dict, reference_rows: Optional[Mapping[str, Mapping[str, float]]] = None) -> str:
    """The table (mean ± std over seeds per arm; ``reference_rows``: single-run rows such as "base x4"), the
    paired differences against each reference arm, the verdict lines and the correlation check."""
    ms = stats["metrics"]
    lines = ["| arm | seeds | " + " | ".join(ms) + " |", "|---|---|" + "---|" * len(ms)]
    for name, row in (reference_rows or {}).items():
        lines.append(f"| {name} | 1 | " + " | ".join(fmt_pm(row.get(m, math.nan), math.nan, _digits(m)) for m in ms) + " |")
    for arm in stats["arms"]:
        s = stats["summary"][arm]
        n = max(v["n"] for v in s.values()) if s else 0
        lines.append(f"| {arm} | {n} | " + " | ".join(fmt_pm(s[m]["mean"], s[m]["std"], _digits(m)) for m in ms) + " |")
    for ref, arms in stats["paired"].items():
        lines += ["", f"Paired by seed against {ref}: relative difference in % (recall and copy gap: difference "
                      "x 100, in points), mean ± std over seeds "
                      f"(k/S = seeds lower than {ref}):", "",
                  "| arm | " + " | ".join(ms) + " |", "|---|" + "---|" * len(ms)]
        for arm, d in arms.items():
            cells = []
            for m in ms:
                x = d[m]
                cells.append("n/a" if x["n"] == 0 else
                             f"{x['mean']:+.1f} ± {x['std']:.1f} ({x['k_lower']}/{x['n']})" if _ok(x["std"]) else
                             f"{x['mean']:+.1f} ({x['k_lower']}/{x['n']})")
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    if stats["verdicts"]:
        lines += ["", f"Verdicts (a difference is called when the two-sided paired t-test on the per-seed relative "
                      f"differences gives p < {stats['level']:g} after Holm's adjustment across these lines):", ""]
        lines += [f"- {v}" for v in stats["verdicts"]]
    if stats["correlation"]:
        target = next(iter(stats["correlation"].values()))["target"]
        lines += ["", f"Correlation with {target} across all fine-tuned runs (the paper's Table 1: |r| 0.85 for LSM, "
                      "0.62 for the training loss):", "", "| predictor | n | Pearson r (p) | Spearman rho (p) |",
                  "|---|---|---|---|"]
        for p, c in stats["correlation"].items():
            pe, sp = c["pearson"], c["spearman"]
            lines.append(f"| {p} | {pe['n']} | {_fmt_r(pe)} | {_fmt_r(sp)} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- plot
def plot(stats: dict, lengths: Sequence[int], path: str, runs: Sequence[Mapping] = (),
         reference_rows: Optional[Mapping[str, Mapping[str, float]]] = None, l_train: Optional[int] = None,
         ref: str = "ce1", scatter: Sequence[str] = ()) -> None:
    """PPL and LongPPL vs length per arm (mean ± std error bars; reference rows dashed), the paired relative
    differences against ``ref`` vs length, and (``scatter``) each predictor against the correlation target
    for every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = max(2, len(scatter))
    fig, axes = plt.subplots(3 if scatter else 2, ncol, figsize=(5.0 * ncol, 3.9 * (3 if scatter else 2)), squeeze=False)
    arms = stats["arms"]
    colors = {a: f"C{i}" for i, a in enumerate(arms)}
    for col, kind in enumerate(("PPL", "LongPPL")):
        ax = axes[0][col]
        ms = [f"{kind}@{L}" for L in lengths]
        if not any(_ok(stats["summary"][arm].get(m, {}).get("mean")) for arm in arms for m in ms):
            for row in (0, 1):  # nothing to draw (LongPPL without key tokens): say so instead of empty axes
                axes[row][col].axis("off")
                axes[row][col].text(0.5, 0.5, f"no {kind} values" + (" (no key tokens: see the table)"
                                    if kind == "LongPPL" else ""), transform=axes[row][col].transAxes, ha="center")
            continue
        for name, row in (reference_rows or {}).items():
            ax.plot(lengths, [row.get(m, math.nan) for m in ms], "k--", marker="x", label=name)
        for i, arm in enumerate(arms):
            s = stats["summary"][arm]
            off = [L * (1 + 0.02 * (i - (len(arms) - 1) / 2)) for L in lengths]  # so error bars do not overlap
            ax.errorbar(off, [s[m]["mean"] if m in s else math.nan for m in ms],
                        yerr=[s[m]["std"] if m in s and _ok(s[m]["std"]) else 0 for m in ms], marker="o", capsize=3,
                        color=colors[arm], label=arm)
        _length_axis(ax, l_train, lengths)
        ax.set_yscale("log")  # arms can differ by a factor (alpha 0.5) while the others differ by a few %
        ax.set_ylabel(f"held-out {kind} (mean ± std over seeds; log scale)")
        ax.set_title(f"{kind} vs evaluation length")
        _legend(ax)
        ax = axes[1][col]
        if ref in stats["paired"]:
            for i, (arm, d) in enumerate(stats["paired"][ref].items()):
                off = [L * (1 + 0.02 * (i - (len(arms) - 1) / 2)) for L in lengths]
                ax.errorbar(off, [d[m]["mean"] if m in d else math.nan for m in ms],
                            yerr=[d[m]["std"] if m in d and _ok(d[m]["std"]) else 0 for m in ms], marker="o",
                            capsize=3, color=colors[arm], label=arm)
        ax.axhline(0, color="gray", lw=1)
        _length_axis(ax, l_train, lengths)
        ax.set_yscale("symlog", linthresh=10)  # linear within ±10 %, logarithmic beyond
        ax.set_ylabel(f"{kind}: {ref}-paired difference (%, symlog)")
        ax.set_title(f"{kind} relative to {ref}, paired by seed (mean ± std)")
        _legend(ax)
    for col in range(2, ncol):
        axes[0][col].axis("off")
        axes[1][col].axis("off")
    if scatter:
        for col, p in enumerate(scatter):
            ax = axes[2][col]
            c = stats["correlation"].get(p)
            target = c["target"] if c else ""
            for arm in arms:
                pts = [(r["metrics"].get(p), r["metrics"].get(target)) for r in runs if r["arm"] == arm]
                pts = [(a, b) for a, b in pts if _ok(a) and _ok(b)]
                ax.scatter([a for a, _ in pts], [b for _, b in pts], color=colors[arm], label=arm, s=18)
            if c:
                ax.set_title(f"{p}: Pearson r {_fmt_r(c['pearson'])}, Spearman {_fmt_r(c['spearman'])}", fontsize=9)
            ax.set_xlabel(p)
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 4))
            ax.set_ylabel(target + " (log scale)")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            _legend(ax)
        for col in range(len(scatter), ncol):
            axes[2][col].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _legend(ax):
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _length_axis(ax, l_train, lengths=()):
    ax.set_xscale("log", base=2)
    if lengths:
        ax.set_xticks(list(lengths), [str(L) for L in lengths])
        ax.minorticks_off()
    if l_train:
        ax.axvline(l_train, color="gray", ls=":", lw=1)
    ax.set_xlabel("evaluation length (tokens)" + ("; dotted: fine-tuning length" if l_train else ""))
    ax.grid(alpha=0.3)
