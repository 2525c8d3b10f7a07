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
The process per case, the memory probes and the CSV writer are ``benchmarks/harness.py``'s; the report
(CSV read back, longest fit, SUMMARY.md, plot) is ``benchmarks/train_step_report.py``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .harness import (MIB, CsvRows, address_space_cap, child_main, collect, is_oom, loadavg_1m, machine_info,
                      meminfo_mib, reset_hwm, run_child_process, status_kb)
from .train_step_report import OBJECTIVES, longest_fit, read_rows, write_report

FULL_LENGTHS = (1024, 2048, 4096, 8192, 16384)
QUICK_LENGTHS = (512, 1024)
FULL_MODEL = dict(vocab_size=128256, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=704)
QUICK_MODEL = dict(vocab_size=32768, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=176)
ALPHA = 0.1

COLUMNS = [
    "objective", "grad_ckpt", "T", "tokens_processed", "peak_extra_mib", "peak_total_mib", "step_s", "status",
    "repeats", "step_s_min", "fwd_bwd_s", "opt_s", "base_mib", "mem_cap_mib", "kind", "window_tokens",
    "optimizer", "loss", "reason", "V", "H", "layers", "threads", "loadavg_1m", "wall_s", "timestamp",
]


def tokens_processed(objective: str, T: int) -> int:
    """Rows through the decoder and the output head: 2T for the long-short step (two views), else T."""
    return 2 * T if objective == "long_short" else T


# -------------------------------------------------------------------------------------------- child


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
    collect()
    base_kb = status_kb("VmRSS") or 0
    vmsize_kb = status_kb("VmSize") or 0
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
            collect()
            rss0 = status_kb("VmRSS") or 0
            method_ok = reset_hwm() and method_ok
            t0 = time.perf_counter()
            losses.append(fwd_bwd(x, T))
            t1 = time.perf_counter()
            opt_step()
            t2 = time.perf_counter()
            hwm = status_kb("VmHWM") or 0
            times.append(t2 - t0)
            fb_times.append(t1 - t0)
            opt_times.append(t2 - t1)
            extras.append((hwm - rss0) / 1024)
            totals.append(hwm / 1024)
            spent += t2 - t0
            if spent + (t2 - t0) > float(spec["repeat_budget_s"]):
                break
    except Exception as e:  # MemoryError included; anything else is re-raised
        if not is_oom(e):
            raise
        hwm = (status_kb("VmHWM") or 0) / 1024
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


# ------------------------------------------------------------------------------------------- parent


def _row_key(r: Dict) -> Tuple:
    return (str(r["objective"]), str(r["grad_ckpt"]), int(r["T"]))


def run_one(spec: Dict, timeout_s: float, log=None) -> Dict:
    """Run one case in a fresh process; returns its row (without the machine columns)."""
    row = {k: spec[k] for k in ("objective", "grad_ckpt", "T", "kind")}
    row.update(tokens_processed=tokens_processed(spec["objective"], spec["T"]),
               window_tokens=spec["T"] + spec["T"] // 4 + 1 if spec["objective"] == "long_short" else spec["T"],
               optimizer="adamw" if spec["optimizer"] else "none",
               V=spec["model"]["vocab_size"], H=spec["model"]["hidden_size"],
               layers=spec["model"]["num_hidden_layers"], mem_cap_mib=spec["cap_total_mib"],
               loadavg_1m=round(loadavg_1m(), 2),
               timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"))
    # backstop in case the child's own guard is bypassed: virtual size <= cap + 6 GiB (the untouched
    # address space of a torch process -- libraries, thread stacks, malloc arenas -- is ~1-2 GiB)
    hard = int((spec["cap_total_mib"] + 6144) * MIB)
    t0 = time.time()
    run = run_child_process(["-m", "benchmarks.train_step", "--child", json.dumps(spec)], timeout_s,
                            preexec_fn=address_space_cap(hard))
    res = run.result_or_failure()
    if res.get("status") not in ("ok", "timeout") and log is not None:
        log.write(f"--- {spec['objective']} ckpt={spec['grad_ckpt']} T={spec['T']}\n{run.stdout[-3000:]}\n"
                  f"{run.stderr[-3000:]}\n")
        log.flush()
    row.update(res)
    row["wall_s"] = round(time.time() - t0, 1)
    return row


def open_sink(path: Path, resume: bool) -> CsvRows:
    """The CSV, written row by row; ``resume`` keeps its ok/oom rows (parsed by :func:`read_rows`)."""
    return CsvRows(path, COLUMNS, _row_key, resume=resume, keep=("ok", "oom"), read=read_rows, nan="")


# --------------------------------------------------------------------------------------------- main


def _parse_list(s: Optional[str]) -> List[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        spec = json.loads(argv[1])
        return child_main(lambda: run_child(spec))
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
    info.update(transformers=transformers.__version__, mem_total_gib=round((meminfo_mib("MemTotal") or 0) / 1024, 1),
                threads=torch.get_num_threads())
    command = "python -m benchmarks --train-step " + " ".join(argv)
    info["run"] = dict(mode="quick" if a.quick else "full", command=command.strip(),
                       model_desc=f"{model['num_attention_heads']} heads, {model['num_key_value_heads']} kv heads, "
                                  f"intermediate {model['intermediate_size']}, untied head",
                       mem_limit_gib=a.mem_limit_gib, fit_gib=a.fit_gib, refine_steps=refine)
    out.mkdir(parents=True, exist_ok=True)
    sink = open_sink(out / "train_step.csv", a.resume)

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
        avail = meminfo_mib("MemAvailable")
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
    info["run"]["loadavg_end"] = round(loadavg_1m(), 2)
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
