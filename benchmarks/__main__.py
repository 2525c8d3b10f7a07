"""python -m benchmarks: run the suite (one fresh process per case), write CSV + plots + SUMMARY, print goals.

    python -m benchmarks --quick                      # < 3 min on 2 cores: small fp32 shapes, sce only
    python -m benchmarks                              # full CPU suite (includes the two goal shapes)
    python -m benchmarks --goal                       # only the two goal shapes
    python -m benchmarks --device cuda                # GPU suite (lsa_triton, liger, cce impl="cce")
    python -m benchmarks --ops ce --impls lsa_cpu,gemm --dtype fp32 --rows 1024,4096
    python -m benchmarks --list                       # print the cases and exit
    python -m benchmarks --report-only --tag cpu --out benchmarks/results  # redo the committed summary/plots
    python -m benchmarks --resume                     # keep finished rows, run the missing cases
    python -m benchmarks --train-step [opts]          # one training step's memory at long context (train_step.py)
    python -m benchmarks --distill [opts]             # fused distillation vs torch KD vs the GEMMs (distill.py)
    python -m benchmarks --prob-targets [opts]        # probability targets: dense CE pass vs GEMM path vs torch

Outputs in --out (default runs/bench, also for --train-step / --distill / --prob-targets run this way; the
committed results: --out benchmarks/results): {tag}_ce.csv, {tag}_long_short.csv, {tag}_machine.json,
{tag}_errors.log, SUMMARY_{tag}.md, plots_{tag}/*.png; tag = device, + "_quick" / "_goal".
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from lsa_kernels import _cli_types as T

from . import cases as C
from .report import write_report
from .runner import Settings, run_cases


def build_parser():
    """The flags of the main suite (``lsa bench`` / ``python -m benchmarks``)."""
    ap = T.Parser(prog="lsa bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small shapes, sce only, fp32 unless --dtype (< 3 min)")
    ap.add_argument("--goal", action="store_true", help="only the two goal shapes (CE and long-short sce, fp32, N=4096, H=512, V=32768)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available else cpu")
    ap.add_argument("--dtype", default=None, help="comma list of fp32,bf16 (default fp32,bf16; --quick: fp32)")
    ap.add_argument("--ops", default="ce,long_short", help="comma list of ce,long_short")
    ap.add_argument("--impls", default=None, help=f"comma list from {','.join(C.ALL_IMPLS)} (default: all for the device)")
    ap.add_argument("--divergences", default=None, help="long_short divergences to keep (default: suite's)")
    ap.add_argument("--rows", default=None, help="keep only these N (comma list)")
    ap.add_argument("--modes", default=None, help="keep only these modes: fwd,fwd_bwd")
    ap.add_argument("--out", default="runs/bench",
                    help="output directory (the committed results are benchmarks/results: pass it to update them)")
    ap.add_argument("--tag", default=None, help="output file prefix (default: device[_quick|_goal])")
    ap.add_argument("--warmup", type=T.nonneg_int, default=None, help="unmeasured calls per case")
    ap.add_argument("--min-repeats", type=T.positive_int, default=None, help="min measured calls per case")
    ap.add_argument("--repeats", type=T.positive_int, default=None, help="max measured calls per case")
    ap.add_argument("--budget", type=T.positive_float, default=None, help="seconds of measured calls per case (sets repeats)")
    ap.add_argument("--case-timeout", type=T.positive_float, default=None, help="seconds per case process")
    ap.add_argument("--deadline", type=T.positive_float, default=None, help="stop launching cases after this many seconds")
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    ap.add_argument("--correctness", action="store_true",
                    help="check ours (triton on cuda) against the reference at real sizes; writes {tag}_correctness.json")
    ap.add_argument("--report-only", action="store_true", help="only redo SUMMARY/plots from the CSVs in --out")
    ap.add_argument("--resume", action="store_true", help="keep the ok/skip rows of {tag}_*.csv, run the rest")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def _sub_argv(argv, flag: str, out: str):
    """``argv`` for a separate benchmark: without ``flag``, with ``--out out`` unless it names its own (so that
    ``lsa bench --distill`` too leaves the committed results alone by default)."""
    rest = [x for x in argv if x != flag]
    if not any(x == "--out" or x.startswith("--out=") for x in rest) and not {"-h", "--help"} & set(rest):
        rest += ["--out", out]
    return rest


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--train-step" in argv:  # a separate benchmark with its own options (python -m benchmarks.train_step -h)
        from . import train_step

        out = "runs/bench/train_step/quick" if "--quick" in argv else "runs/bench/train_step"
        return train_step.main(_sub_argv(argv, "--train-step", out))
    if "--distill" in argv:  # the distillation benchmark (python -m benchmarks.distill -h)
        from . import distill

        return distill.main(_sub_argv(argv, "--distill", "runs/bench"))
    if "--prob-targets" in argv:  # probability targets (python -m benchmarks.prob_targets -h)
        from . import prob_targets

        return prob_targets.main(_sub_argv(argv, "--prob-targets", "runs/bench"))
    ap = build_parser()
    a = ap.parse_args(argv)

    if a.device is None:
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    mode_tag = "_quick" if a.quick else ("_goal" if a.goal else "")
    tag = a.tag or f"{a.device}{mode_tag}"
    out = Path(a.out)
    if a.report_only:
        md, goals = write_report(out, tag)
        print(f"wrote {md}\n" + "\n".join(goals))
        return 0

    if a.correctness:
        import json

        out.mkdir(parents=True, exist_ok=True)
        res = C.correctness(a.device, quick=a.quick)
        (out / f"{tag}_correctness.json").write_text(json.dumps(res, indent=2, default=str))
        n_bad = sum(not r["ok"] for r in res)
        print(f"correctness: {len(res) - n_bad}/{len(res)} pass -> {out / (tag + '_correctness.json')}")
        return 1 if n_bad else 0

    ops = C.parse_list(a.ops) or list(C.OPS)
    bad = [o for o in ops if o not in C.OPS]
    impls = C.parse_list(a.impls)
    bad += [i for i in (impls or []) if i not in C.ALL_IMPLS]
    dtypes = C.parse_list(a.dtype) or (["fp32"] if a.quick else ["fp32", "bf16"])
    bad += [d for d in dtypes if d not in C.DTYPES]
    if bad:
        ap.error(f"unknown value(s): {bad}")

    if a.goal:
        cases = [c for c in C.goal_cases(a.device, impls) if c.op in ops]
    else:
        cases = C.build_cases(a.device, quick=a.quick, dtypes=dtypes, ops=ops, impls=impls)
    if a.rows:
        keep = {int(n) for n in C.parse_list(a.rows)}
        cases = [c for c in cases if c.N in keep]
    if a.modes:
        cases = [c for c in cases if c.mode in C.parse_list(a.modes)]
    if a.divergences:
        keep_d = set(C.parse_list(a.divergences))
        cases = [c for c in cases if c.op != "long_short" or c.divergence in keep_d]
    if not cases:
        print("no cases selected", file=sys.stderr)
        return 2
    if a.list:
        for c in cases:
            print(c.label())
        print(f"{len(cases)} cases")
        return 0

    s = Settings()
    if a.quick:
        s = Settings(warmup=1, min_repeats=2, max_repeats=5, budget_s=2.0, case_timeout_s=120.0)
    elif a.device == "cuda":
        s = Settings(warmup=2, min_repeats=5, max_repeats=20, budget_s=1.0, case_timeout_s=150.0)
    for name, val in (("warmup", a.warmup), ("min_repeats", a.min_repeats), ("max_repeats", a.repeats),
                      ("budget_s", a.budget), ("case_timeout_s", a.case_timeout), ("deadline_s", a.deadline)):
        if val is not None:
            setattr(s, name, val)
    s.min_repeats = min(s.min_repeats, s.max_repeats)

    t0 = time.time()
    print(f"{len(cases)} cases on {a.device} -> {out}/{tag}_*.csv  ({s})", flush=True)
    rows = run_cases(cases, out, tag, s, progress=not a.no_progress, resume=a.resume)
    elapsed = time.time() - t0
    md, goals = write_report(out, tag)
    n_ok = sum(r.get("status") == "ok" for r in rows)
    n_skip = sum(r.get("status") == "skip" for r in rows)
    failed = [r for r in rows if r.get("status") not in ("ok", "skip")]
    print(f"\n{n_ok} ok, {n_skip} skipped, {len(failed)} failed/timeout/not run, in {elapsed:.0f} s")
    for r in failed:
        print(f"  {r['status']}: {C.Case.from_dict(r).label()}: {r.get('reason', '')}")
    print(f"summary: {md}\n")
    print("\n".join(goals))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
