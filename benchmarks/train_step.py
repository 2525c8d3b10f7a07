"""Peak memory and time of ONE training step of a narrow, large-vocabulary causal LM at long context.

    python -m benchmarks --train-step                       # full CPU run (~20 min on 2 cores)
    python -m benchmarks.train_step --quick                 # tiny model, T=512,1024 (the test's mode)
    python -m benchmarks.train_step --lengths 1024,2048 --objectives hf,fused_ce --ckpt off
    python -m benchmarks.train_step --report-only           # redo SUMMARY.md + plot from the CSV

The model is a randomly initialised transformers ``LlamaForCausalLM`` (fp32, CPU, SDPA attention, untied
output head as in Llama-3-8B) with Llama-3's vocabulary V=128256 and a narrow body (2 layers, hidden 256,
4 heads, 2 kv heads, intermediate 704), so the [T, V] logits, not the layers, dominate the step.
Batch 1, random token ids (seeded), ``labels = input_ids``. Objectives:

    hf          transformers' own loss: ``model(input_ids=x, labels=x).loss.backward()``
                (builds the [T, V] logits; the model output is dropped before backward)
    fused_ce    ``lsa_kernels.integrations.hf.causal_lm_loss(model, x, x).backward()`` (fused linear CE)
    long_short  ``long_short_step(model, window, l_extra=T//4, alpha=0.1).loss.backward()`` on a window of
                T + T//4 + 1 tokens: TWO views of T tokens each through the model (batched), both CEs and
                the sce divergence on the T - T//4 shared positions

each with and without activation checkpointing
(``model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})``).

(Over 500 lines on purpose: the parent that schedules cases, the child process that measures ONE case, and
the CSV / SUMMARY.md / plot writer share the case table and must stay one runnable module,
``python -m benchmarks.train_step``.)

One step = forward + backward + ``AdamW.step()`` + ``zero_grad(set_to_none=True)`` (``--no-optimizer``
leaves the optimizer out). Every case runs in a fresh process:

1. build the model and AdamW, run one warm-up step at ``--warmup-len`` tokens (64): this allocates the
   optimizer state and does every one-time initialisation (the fused head's logit probe, oneDNN setup);
2. ``gc.collect()``, ``malloc_trim(0)``; ``base`` = VmRSS: the resident model + optimizer state (+ the
   interpreter and libraries);
3. the memory guard: ``RLIMIT_AS`` is set so that the process can grow by at most ``cap - base`` more
   (cap = ``--mem-limit-gib``, lowered to what the machine has available when the case starts); an
   allocation beyond it fails inside the process (RuntimeError/MemoryError) and the case is recorded as
   ``oom`` with the peak it had reached (a lower bound). The kernel's OOM killer is never involved;
4. VmHWM is reset to the current RSS (``echo 5 > /proc/self/clear_refs``), the step runs, VmHWM is read:
   ``peak_total_mib`` = VmHWM (everything resident at the step's peak), ``peak_extra_mib`` = VmHWM - base
   (what the step needs on top of the resident state: activations, logits, the gradients -- re-created
   by every step since zero_grad sets them to None -- and the optimizer's temporaries).
   Repeated (same process) while the measured calls take < ``--repeat-budget`` s, at most ``--repeats``
   times: ``step_s`` is the median, the memory figures the max; the CSV's ``repeats`` says how many.

A larger T of the same objective/checkpointing after an ``oom`` is not run (memory grows with T): it is
recorded as ``oom`` with the reason. ``--refine K`` bisects K times between the largest grid length
that fits in ``--fit-gib`` (8) GiB of total peak and the next one that does not (rows of kind
``refine``, run with the cap at fit + 0.5 GiB).

Outputs in ``--out`` (default benchmarks/results/train_step): ``train_step.csv`` (one row per case,
written as it finishes), ``machine.json``, ``train_step.png`` (peak total memory and step time against T,
log-log, one line per objective x checkpointing, the fit line), ``SUMMARY.md`` (tables, the longest
context that fits, the long-short vs transformers line), ``errors.log`` (output of failed cases).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .runner import REPO, _child_env, _malloc_trim, _reset_hwm, _status_kb, machine_info

MARK = "@@TRAIN_STEP@@"
OBJECTIVES = ("hf", "fused_ce", "long_short")
LABELS = {
    "hf": "transformers loss (logits)",
    "fused_ce": "lsa fused CE",
    "long_short": "lsa long-short (2 views)",
}
FULL_LENGTHS = (1024, 2048, 4096, 8192, 16384)
QUICK_LENGTHS = (512, 1024)
FULL_MODEL = dict(vocab_size=128256, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=704)
QUICK_MODEL = dict(vocab_size=32768, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=176)
ALPHA = 0.1
MIB = 2**20

COLUMNS = [
    "objective", "grad_ckpt", "T", "tokens_processed", "peak_extra_mib", "peak_total_mib", "step_s", "status",
    "repeats", "step_s_min", "fwd_bwd_s", "opt_s", "base_mib", "mem_cap_mib", "kind", "window_tokens",
    "optimizer", "loss", "reason", "V", "H", "layers", "threads", "loadavg_1m", "wall_s", "timestamp",
]


def tokens_processed(objective: str, T: int) -> int:
    """Rows through the decoder and the output head: 2T for the long-short step (two views), else T."""
    return 2 * T if objective == "long_short" else T


def _meminfo_mib(key: str) -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


# -------------------------------------------------------------------------------------------- child


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("can't allocate memory" in msg or "out of memory" in msg
                                            or "bad_alloc" in msg or "cannot allocate memory" in msg)


def run_child(spec: Dict) -> Dict:
    """Measure one case in this (fresh) process; see the module docstring for what is measured."""
    import torch
    from transformers import LlamaConfig

    from lsa_kernels.integrations import hf

    obj, T, ckpt = spec["objective"], int(spec["T"]), bool(spec["grad_ckpt"])
    mcfg = dict(spec["model"])
    cfg = LlamaConfig(**mcfg, max_position_embeddings=max(32768, 2 * T))
    torch.manual_seed(0)
    model = hf.load_causal_lm(cfg, dtype=torch.float32, attn="sdpa")
    model.train()
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if spec["optimizer"] else None
    V = cfg.vocab_size
    gen = torch.Generator().manual_seed(1234)

    def make_input(t: int) -> torch.Tensor:
        n = t + t // 4 + 1 if obj == "long_short" else t
        return torch.randint(0, V, (1, n), generator=gen)

    def fwd_bwd(x: torch.Tensor, t: int) -> float:
        if obj == "hf":
            loss = model(input_ids=x, labels=x).loss  # the output (and its logits) is dropped here
        elif obj == "fused_ce":
            loss = hf.causal_lm_loss(model, x, x)
        else:
            loss = hf.long_short_step(model, x, l_extra=t // 4, alpha=ALPHA).loss
        loss.backward()
        return float(loss.detach())

    def opt_step() -> None:
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)

    # warm-up: optimizer state, the fused head's one-time probe, library initialisation
    tw = int(spec["warmup_len"])
    fwd_bwd(make_input(tw), tw)
    opt_step()
    x = make_input(T)
    gc.collect()
    _malloc_trim()
    base_kb = _status_kb("VmRSS") or 0
    vmsize_kb = _status_kb("VmSize") or 0
    cap_mib = float(spec["cap_total_mib"])
    if spec.get("cap_extra_mib"):
        cap_mib = min(cap_mib, base_kb / 1024 + float(spec["cap_extra_mib"]))
    res: Dict = {"base_mib": base_kb / 1024, "mem_cap_mib": cap_mib, "threads": torch.get_num_threads()}
    if cap_mib <= base_kb / 1024:
        res.update(status="oom", reason=f"resident state {base_kb / 1024:.0f} MiB already >= cap {cap_mib:.0f} MiB",
                   peak_total_mib=base_kb / 1024)
        return res
    limit = int((vmsize_kb / 1024 + cap_mib - base_kb / 1024) * MIB)
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))

    times, fb_times, opt_times, extras, totals, losses = [], [], [], [], [], []
    spent = 0.0
    method_ok = True
    try:
        while len(times) < int(spec["max_repeats"]):
            gc.collect()
            _malloc_trim()
            rss0 = _status_kb("VmRSS") or 0
            method_ok = _reset_hwm() and method_ok
            t0 = time.perf_counter()
            losses.append(fwd_bwd(x, T))
            t1 = time.perf_counter()
            opt_step()
            t2 = time.perf_counter()
            hwm = _status_kb("VmHWM") or 0
            times.append(t2 - t0)
            fb_times.append(t1 - t0)
            opt_times.append(t2 - t1)
            extras.append((hwm - rss0) / 1024)
            totals.append(hwm / 1024)
            spent += t2 - t0
            if spent + (t2 - t0) > float(spec["repeat_budget_s"]):
                break
    except BaseException as e:  # noqa: B036 -- MemoryError included; anything else is re-raised
        if not _is_oom(e):
            raise
        hwm = (_status_kb("VmHWM") or 0) / 1024
        if times:  # a later repeat failed: keep the measured ones but say so
            res["reason"] = f"repeat {len(times) + 1} hit the cap"
        else:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            res.update(status="oom", reason=f"over the {cap_mib:.0f} MiB cap: {type(e).__name__}: {first}"[:300],
                       peak_total_mib=hwm, peak_extra_mib=hwm - base_kb / 1024)
            return res
    if not method_ok:
        res["reason"] = (res.get("reason", "") + "; VmHWM reset refused: peak is the process maximum").lstrip("; ")
    res.update(
        status="ok", repeats=len(times), step_s=statistics.median(times), step_s_min=min(times),
        fwd_bwd_s=statistics.median(fb_times), opt_s=statistics.median(opt_times),
        peak_extra_mib=max(extras), peak_total_mib=max(totals), loss=losses[0],
    )
    return res


def _child_main(argv: List[str]) -> int:
    spec = json.loads(argv[0])
    try:
        res = run_child(spec)
    except BaseException as e:  # reported, not raised: the parent records the row
        import traceback

        traceback.print_exc()
        msg = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
        res = {"status": "oom" if _is_oom(e) else "error", "reason": msg}
    print(MARK + json.dumps(res), flush=True)
    return 0


# ------------------------------------------------------------------------------------------- parent


def _row_key(r: Dict) -> Tuple:
    return (str(r["objective"]), str(r["grad_ckpt"]), int(r["T"]))


def _fmt(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def _backstop(hard_bytes: int):
    def fn():  # runs in the child before exec: nothing it does can grow past this
        resource.setrlimit(resource.RLIMIT_AS, (hard_bytes, hard_bytes))
    return fn


def run_one(spec: Dict, timeout_s: float, log=None) -> Dict:
    """Run one case in a fresh process; returns its row (without the machine columns)."""
    row = {k: spec[k] for k in ("objective", "grad_ckpt", "T", "kind")}
    row.update(tokens_processed=tokens_processed(spec["objective"], spec["T"]),
               window_tokens=spec["T"] + spec["T"] // 4 + 1 if spec["objective"] == "long_short" else spec["T"],
               optimizer="adamw" if spec["optimizer"] else "none",
               V=spec["model"]["vocab_size"], H=spec["model"]["hidden_size"],
               layers=spec["model"]["num_hidden_layers"], mem_cap_mib=spec["cap_total_mib"],
               loadavg_1m=round(_loadavg(), 2),
               timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"))
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--child", json.dumps(spec)]
    # backstop in case the child's own guard is bypassed: virtual size <= cap + 6 GiB (the untouched
    # address space of a torch process -- libraries, thread stacks, malloc arenas -- is ~1-2 GiB)
    hard = int((spec["cap_total_mib"] + 6144) * MIB)
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=REPO, env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, preexec_fn=_backstop(hard))
    try:
        out, err = p.communicate(timeout=timeout_s)
        res = None
        for line in out.splitlines():
            if line.startswith(MARK):
                res = json.loads(line[len(MARK):])
        if res is None:
            tail = (err or out or "").strip().splitlines()[-3:]
            text = " | ".join(tail)
            low = text.lower()
            oomish = p.returncode in (-9, 137) or "memory" in low or "bad_alloc" in low
            res = {"status": "oom" if oomish else "error", "reason": f"child exit {p.returncode}: {text}"[:300]}
        if res.get("status") != "ok" and log is not None:
            log.write(f"--- {spec['objective']} ckpt={spec['grad_ckpt']} T={spec['T']}\n{out[-3000:]}\n{err[-3000:]}\n")
            log.flush()
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)  # our own child's session only
        p.communicate()
        res = {"status": "timeout", "reason": f"over {timeout_s:.0f} s"}
    row.update(res)
    row["wall_s"] = round(time.time() - t0, 1)
    return row


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


class Sink:
    def __init__(self, path: Path, resume: bool):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_rows(path) if r["status"] in ("ok", "oom")] if resume else []
        with open(path, "w", newline="") as f:
            csv.DictWriter(f, COLUMNS, extrasaction="ignore").writeheader()
        self.rows: List[Dict] = []
        for r in kept:
            self.add(r)

    def add(self, row: Dict) -> None:
        self.rows = [r for r in self.rows if _row_key(r) != _row_key(row)] + [row]
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, COLUMNS, extrasaction="ignore").writerow({k: _fmt(row.get(k, "")) for k in COLUMNS})

    def get(self, key) -> Optional[Dict]:
        for r in self.rows:
            if _row_key(r) == key:
                return r
        return None


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


# ------------------------------------------------------------------------------------------- report


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


# --------------------------------------------------------------------------------------------- main


def _parse_list(s: Optional[str]) -> List[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        return _child_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m benchmarks --train-step", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"tiny model {QUICK_MODEL} at T={','.join(map(str, QUICK_LENGTHS))}, 1 repeat")
    ap.add_argument("--lengths", default=None, help="comma list of context lengths T (default 1024,...,16384)")
    ap.add_argument("--objectives", default=",".join(OBJECTIVES), help=f"comma list from {','.join(OBJECTIVES)}")
    ap.add_argument("--ckpt", choices=("both", "off", "on"), default="both", help="activation checkpointing")
    ap.add_argument("--no-optimizer", action="store_true", help="leave AdamW.step() out of the step")
    ap.add_argument("--out", default=None, help="default benchmarks/results/train_step (--quick: .../train_step/quick)")
    ap.add_argument("--mem-limit-gib", type=float, default=14.0,
                    help="cap on a case's total memory (lowered to MemAvailable - 1.5 GiB when a case starts)")
    ap.add_argument("--extra-limit-mib", type=float, default=None, help="also cap the step's extra memory (tests)")
    ap.add_argument("--fit-gib", type=float, default=8.0, help="the memory line: longest T with total peak <= this")
    ap.add_argument("--refine", type=int, default=None,
                    help="bisection steps between the last grid T that fits and the next (default 3; --quick 0)")
    ap.add_argument("--repeats", type=int, default=None, help="max measured steps per case (default 3; --quick 1)")
    ap.add_argument("--repeat-budget", type=float, default=12.0, help="seconds of measured steps per case")
    ap.add_argument("--warmup-len", type=int, default=None, help="tokens of the warm-up step (default 64; --quick 16)")
    ap.add_argument("--case-timeout", type=float, default=420.0, help="seconds per case process")
    ap.add_argument("--deadline", type=float, default=None, help="stop launching cases after this many seconds")
    ap.add_argument("--resume", action="store_true", help="keep the ok/oom rows of the CSV, run the rest")
    ap.add_argument("--report-only", action="store_true", help="rewrite SUMMARY.md and the plot from the CSV")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)

    out = Path(a.out or ("benchmarks/results/train_step/quick" if a.quick else "benchmarks/results/train_step"))
    fit_mib = a.fit_gib * 1024
    if a.report_only:
        md, lines = write_report(out, fit_mib)
        print(f"wrote {md}\n" + "\n".join(lines))
        return 0
    objectives = _parse_list(a.objectives)
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad or not objectives:
        ap.error(f"--objectives: unknown {bad}, choose from {','.join(OBJECTIVES)}")
    try:
        lengths = sorted({int(x) for x in _parse_list(a.lengths)}) or list(QUICK_LENGTHS if a.quick else FULL_LENGTHS)
    except ValueError:
        ap.error(f"--lengths: expected a comma list of integers, got {a.lengths!r}")
    if min(lengths) < 8:
        ap.error(f"--lengths: every T must be >= 8, got {min(lengths)}")
    ckpts = {"both": [False, True], "off": [False], "on": [True]}[a.ckpt]
    model = QUICK_MODEL if a.quick else FULL_MODEL
    refine = a.refine if a.refine is not None else (0 if a.quick else 3)
    base_spec = dict(model=model, optimizer=not a.no_optimizer,
                     warmup_len=a.warmup_len or (16 if a.quick else 64),
                     max_repeats=a.repeats or (1 if a.quick else 3), repeat_budget_s=a.repeat_budget,
                     cap_extra_mib=a.extra_limit_mib)

    import torch
    import transformers

    info = dict(machine_info("cpu"))
    info.update(transformers=transformers.__version__, mem_total_gib=round((_meminfo_mib("MemTotal") or 0) / 1024, 1),
                threads=torch.get_num_threads())
    command = "python -m benchmarks --train-step " + " ".join(argv)
    info["run"] = dict(mode="quick" if a.quick else "full", command=command.strip(),
                       model_desc=f"{model['num_attention_heads']} heads, {model['num_key_value_heads']} kv heads, "
                                  f"intermediate {model['intermediate_size']}, untied head",
                       mem_limit_gib=a.mem_limit_gib, fit_gib=a.fit_gib, refine_steps=refine)
    out.mkdir(parents=True, exist_ok=True)
    sink = Sink(out / "train_step.csv", a.resume)

    # T-major order: a run stopped by --deadline has every objective at the short lengths
    grid = [dict(base_spec, objective=o, grad_ckpt=c, T=T, kind="grid") for T in lengths for o in objectives for c in ckpts]
    t_start = time.time()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=len(grid), desc="train-step cases", unit="case", disable=a.no_progress or tqdm is None,
               dynamic_ncols=True) if tqdm else None
    log = open(out / "errors.log", "w")

    def launch(spec: Dict, cap_mib: float) -> Dict:
        avail = _meminfo_mib("MemAvailable")
        cap = cap_mib if avail is None else min(cap_mib, avail - 1536)
        spec = dict(spec, cap_total_mib=round(cap))
        row = run_one(spec, a.case_timeout, log)
        sink.add(row)
        return row

    try:
        for spec in grid:
            key = (spec["objective"], str(spec["grad_ckpt"]), spec["T"])
            label = f"{spec['objective']} ckpt={'on' if spec['grad_ckpt'] else 'off'} T={spec['T']}"
            if bar is not None:
                bar.set_postfix_str(label)
            done = sink.get(key)
            if done is not None:
                pass  # --resume
            elif a.deadline is not None and time.time() - t_start > a.deadline:
                sink.add(dict(spec, tokens_processed=tokens_processed(spec["objective"], spec["T"]), status="not_run",
                              reason=f"--deadline {a.deadline:.0f} s passed"))
            else:
                smaller_oom = [r for r in sink.rows if r["objective"] == spec["objective"] and str(r["grad_ckpt"]) ==
                               str(spec["grad_ckpt"]) and r["T"] < spec["T"] and r["status"] == "oom"
                               and r.get("kind", "grid") == "grid"]
                if smaller_oom:
                    r = smaller_oom[0]
                    sink.add(dict(spec, tokens_processed=tokens_processed(spec["objective"], spec["T"]),
                                  status="oom", mem_cap_mib=r.get("mem_cap_mib", ""),
                                  optimizer="adamw" if spec["optimizer"] else "none",
                                  V=model["vocab_size"], H=model["hidden_size"], layers=model["num_hidden_layers"],
                                  reason=f"not run: T={r['T']} already oom (memory grows with T)"))
                else:
                    launch(spec, a.mem_limit_gib * 1024)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()

        # bisection between the last fitting grid length and the next one
        for o in objectives:
            for c in ckpts:
                for _ in range(refine):
                    if a.deadline is not None and time.time() - t_start > a.deadline:
                        break
                    lf = longest_fit(sink.rows, o, c, fit_mib)
                    lo, hi = lf["fit"], lf["next"]
                    if lo is None or hi is None:
                        break
                    step = 256 if hi - lo > 512 else 64
                    mid = int(round((lo + hi) / 2 / step) * step)
                    if mid <= lo or mid >= hi:
                        break
                    print(f"refine {o} ckpt={'on' if c else 'off'}: T={mid} (between {lo} and {hi})", flush=True)
                    launch(dict(base_spec, objective=o, grad_ckpt=c, T=mid, kind="refine"),
                           min(a.mem_limit_gib * 1024, fit_mib + 512))
    finally:
        log.close()
    wall = time.time() - t_start
    info["run"]["wall_s"] = round(wall, 1)
    info["run"]["loadavg_end"] = round(_loadavg(), 2)
    if a.resume and (out / "machine.json").exists():  # keep what the earlier sittings were
        old = json.loads((out / "machine.json").read_text())
        info["earlier_runs"] = old.get("earlier_runs", []) + ([old["run"]] if "run" in old else [])
    with open(out / "machine.json", "w") as f:
        json.dump(info, f, indent=2)
    md, lines = write_report(out, fit_mib)
    counts = {s: sum(r["status"] == s for r in sink.rows) for s in ("ok", "oom", "timeout", "error", "not_run")}
    print(f"\n{counts} in {wall / 60:.1f} min -> {out}/train_step.csv, {md}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
