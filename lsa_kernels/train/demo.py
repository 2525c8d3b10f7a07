"""The paper's experiment in miniature: a pretrained base, context extension, fine-tuning arms, several seeds.

    lsa demo                                  # make demo: the recall testbed (--data recall), 6 arms x 4 seeds
    lsa demo --quick                          # the same pipeline, 1 seed, 20 steps
    lsa demo --data text                      # the Shakespeare control: base trained here, 5 arms x 5 seeds

``--data recall`` (default; docs/demo.md, "The recall testbed"): stage 1 is the shipped pretrained base
(``lsa_kernels/data/recall_base``, checksums verified; ``--base-model DIR`` for another) and the gate: it must
retrieve in its own window (:func:`demo_recall.run_gate`) or the demo stops with exit code 3 and no table.
Stage 2: for every seed, the base's RoPE extended (YaRN x16: 64 -> 1024 positions), fine-tuned at l_train 256
on windows with repeated rare spans and facts written in, in each arm: ce1, ce2, sce@0.1, symkl@0.1, symkl@1,
symkl-last (sym_kl at alpha 1 on the last pair only). Evaluation: natural- and key-token perplexity, recall by
length x distance, the copy gap, LongPPL, LSM.

``--data text``: stage 1 trains the small default Llama from scratch on the shipped corpus at a short context
(``--base-l-train 64``, ``max_position_embeddings`` = 64), alpha = 0; stage 2 extends it with position
interpolation (``--rope-scaling linear --rope-factor 4``: l_train 256) in the arms

    ce1     alpha = 0, CE on one view (the long one): the paper's baseline
    ce2     alpha = 0, CE on both views: the same tokens as the regularised arms, no divergence
    sce     alpha = 0.1, divergence sce (the paper's: CE(p,q) + CE(q,p) = H(p) + H(q) + KL + KL)
    symkl   alpha = 0.1, divergence sym_kl (KL(p||q) + KL(q||p): alignment without the entropy terms)
    longce  alpha = 0, CE on both views, each paired long row's CE weighted by min(exp(CE_short - CE_long), 5)
            (LongCE, Fang et al., gamma 5; detached; short rows and unpaired long rows weight 1; docs/maths.md
            §13): the same training tokens as ce2, which it is compared with
    --extra-arms NAME@ALPHA ...  e.g. sce@0.5 (the paper reports alpha 0.5 / 1.0 as harmful)

In both, the same seed gives every arm the same windows in the same order and the same initial weights
(``--lora R`` for LoRA instead of full fine-tuning). Evaluation (``<out>/eval``) of every fine-tuned run and of
the extended base before fine-tuning (the reference row and LongPPL evaluator), then :mod:`demo_stats`: mean ±
std over seeds, the per-seed paired differences against ce1 and ce2 (paired t-test, sign test, Holm across the
verdict lines, bootstrap intervals over windows where available), verdict lines computed from those numbers, and
the paper's Table-1 check (correlation across runs of LSM and of the final training CE with the target
metric). Writes ``<out>/table.md``, ``<out>/results.json``, ``<out>/demo.png`` (and ``recall.png``); prints the
table and the wall time. The protocol is documented in docs/demo.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from typing import Dict, List, Optional

from .. import _cli_types as T
from .. import _env
from .demo_models import check_view, eval_view, extended_base
from .demo_protocol import ARMS, LSM_DIVERGENCES, MODE_DEFAULTS, NOT_RESULTS, fill_defaults, parse_arm

def _parser() -> argparse.ArgumentParser:
    ap = T.Parser(prog="lsa demo", description=__doc__)
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--seeds", type=T.positive_int, default=None, help="seeds 0..S-1 per arm (default: 4 recall, 5 text)")
    ap.add_argument("--data", default="recall", choices=list(MODE_DEFAULTS),
                    help="recall: the testbed where distant context matters, from the shipped pretrained base; text: "
                         "the Shakespeare-only control (no long-range signal), base trained in stage 1")
    ap.add_argument("--quick", action="store_true", help="the same pipeline, 1 seed, fewer steps (a few minutes)")
    ap.add_argument("--arms", nargs="+", default=None, choices=list(ARMS),
                    help="the protocol's arms to run (default: those of --data)")
    ap.add_argument("--extra-arms", nargs="*", default=[], metavar="NAME@ALPHA", help="more arms, e.g. sce@0.5")
    g = ap.add_argument_group("stage 1: the base model (--data recall: a pretrained one; text: trained from scratch)")
    g.add_argument("--base-model", default=None,
                   help="a pretrained base (transformers directory; --data recall default: the shipped one)")
    g.add_argument("--gate-exact", type=T.fraction, default=None,
                   help="--data recall: the recall the base must reach before any arm runs (default 0.5, docs/demo.md)")
    g.add_argument("--base-l-train", type=T.int_at_least(4), default=64, help="its training length = its max_position_embeddings")
    g.add_argument("--base-steps", type=T.positive_int, default=800)
    g.add_argument("--base-batch-size", type=T.positive_int, default=16)
    g.add_argument("--base-lr", type=T.positive_float, default=2e-3)
    g.add_argument("--n-layer", type=T.positive_int, default=4)
    g.add_argument("--n-embd", type=T.positive_int, default=128)
    g.add_argument("--n-head", type=T.positive_int, default=4)
    g.add_argument("--n-kv-head", type=T.positive_int, default=2)
    g.add_argument("--ffn", type=T.positive_int, default=352)
    g = ap.add_argument_group("stage 2: context extension and fine-tuning (defaults per --data: docs/demo.md)")
    g.add_argument("--rope-scaling", default=None, choices=["linear", "dynamic", "yarn", "llama3"])
    g.add_argument("--rope-factor", type=T.float_at_least(1), default=None, help="positions: base x factor")
    g.add_argument("--l-train", type=T.int_at_least(4), default=None,
                   help="fine-tuning length (text default: base-l-train x rope-factor)")
    g.add_argument("--steps", type=T.positive_int, default=None)
    g.add_argument("--batch-size", type=T.positive_int, default=None)
    g.add_argument("--lr", type=T.positive_float, default=1e-3)
    g.add_argument("--warmup", type=T.nonneg_int, default=10)
    g.add_argument("--lora", type=T.nonneg_int, default=0, help="LoRA rank (0 = full fine-tuning)")
    g = ap.add_argument_group("evaluation")
    g.add_argument("--lengths", type=T.positive_float, nargs="+", default=None, help="multiples of l_train")
    g.add_argument("--n-windows", type=T.positive_int, default=None)
    g.add_argument("--lsm-samples", type=T.positive_int, default=None)
    g.add_argument("--eval-files", nargs="*", default=None, help="held-out text files (default: shipped held-out works)")
    ap.add_argument("--train-files", nargs="*", default=[], help="training text files (default: the shipped corpus)")
    ap.add_argument("--backend", default="auto", choices=["auto", "cpu", "triton", "reference"])
    ap.add_argument("--threads", type=T.nonneg_int, default=0,
                    help="torch CPU threads (0 = torch's default; 1 is much faster on a machine busy with other jobs)")
    ap.add_argument("--resume", action="store_true", help="also reuse finished fine-tuning runs with the same config")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--replot", action="store_true", help="only redraw <out>/demo.png from <out>/results.json")
    return ap


def plan(a) -> dict:
    """Every run's TrainConfig (validated, nothing written): ``{"base": cfg, "runs": [(arm, seed, cfg)],
    "l_train": int, "lengths": [...]}``; raises ConfigError for a bad option."""
    from .config import ConfigError, TrainConfig, validate

    fill_defaults(a)
    if a.data == "recall" and a.base_model is None:
        from .recall_base import SHIPPED_BASE

        if not os.path.isdir(SHIPPED_BASE):
            raise ConfigError("--data recall needs --base-model DIR: no pretrained recall base ships with this version "
                              "(docs/recall_testbed.md says how to pretrain one)")
        a.base_model = SHIPPED_BASE
    if a.base_model is not None and not os.path.isfile(os.path.join(a.base_model, "config.json")):
        raise ConfigError(f"--base-model {a.base_model!r} is not a transformers model directory (no config.json)")
    if a.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {a.seeds}")
    for name in ("base_l_train", "base_steps", "base_batch_size", "steps", "batch_size", "n_windows", "lsm_samples"):
        if getattr(a, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.threads < 0:
        raise ConfigError(f"--threads must be >= 0, got {a.threads}")
    if a.lora < 0:
        raise ConfigError(f"--lora must be >= 0, got {a.lora}")
    if not (math.isfinite(a.rope_factor) and a.rope_factor >= 1):
        raise ConfigError(f"--rope-factor must be >= 1, got {a.rope_factor}")
    if a.base_model is not None:
        with open(os.path.join(a.base_model, "config.json")) as f:
            a.base_l_train = int(json.load(f).get("max_position_embeddings") or a.base_l_train)
    n_pos = a.base_l_train * a.rope_factor
    if n_pos != int(n_pos):
        raise ConfigError(f"--base-l-train {a.base_l_train} x --rope-factor {a.rope_factor:g} is not a whole length")
    n_pos = int(n_pos)
    l_train = int(a.l_train or n_pos)
    if l_train > n_pos:
        raise ConfigError(f"--l-train {l_train} exceeds the extended positions ({a.base_l_train} x {a.rope_factor:g})")
    lengths = [int(m * l_train) for m in a.lengths]
    if not lengths or any(m <= 0 or m * l_train != int(m * l_train) for m in a.lengths):
        raise ConfigError(f"--lengths must be positive multiples giving whole lengths, got {a.lengths}")
    if max(lengths) > n_pos and a.rope_scaling != "linear":
        raise ConfigError(f"--lengths: evaluating past the extended length {l_train} (at {max(lengths)}) is done for "
                          f"--rope-scaling linear only ({a.rope_scaling} uses max_position_embeddings in its RoPE); "
                          "pass --lengths 1")
    for p in a.eval_files or []:
        if not os.path.isfile(p):
            raise ConfigError(f"--eval-files: {p!r} does not exist")
    arms = {name: ARMS[name] for name in dict.fromkeys(a.arms)}
    for spec in a.extra_arms:
        label, fields = parse_arm(spec)
        if label in arms:
            raise ConfigError(f"--extra-arms: {label} given twice")
        arms[label] = fields
    common = dict(backend=a.backend, train_files=list(a.train_files), quiet=a.quiet)
    base = TrainConfig(model=a.base_model or "", alpha=0.0, l_train=a.base_l_train, max_positions=a.base_l_train, batch_size=a.base_batch_size,
                       steps=a.base_steps, lr=a.base_lr, seed=0, n_layer=a.n_layer, n_embd=a.n_embd, n_head=a.n_head,
                       n_kv_head=a.n_kv_head, ffn=a.ffn, out=os.path.join(a.out, "base"), ckpt_every=a.base_steps,
                       **common)
    runs = []  # seed-major: an interrupted demo (--resume) has whole seeds done
    for s in range(a.seeds):
        for arm, fields in arms.items():
            runs.append((arm, s, TrainConfig(
                model=a.base_model or base.out, data=a.data, rope_scaling=a.rope_scaling, rope_factor=a.rope_factor, l_train=l_train,
                batch_size=a.batch_size, steps=a.steps, lr=a.lr, warmup=a.warmup, min_lr_frac=0.1, grad_clip=1.0,
                seed=s, lora=a.lora, out=os.path.join(a.out, "runs", arm, f"seed{s}"), ckpt_every=a.steps,
                **fields, **common)))
    validate(dataclasses.replace(base, out=os.path.join(a.out, ".never-written")))
    for _, _, c in runs:  # the base does not exist yet: check everything else
        validate(dataclasses.replace(c, model="", out=os.path.join(a.out, ".never-written")))
    return {"base": base, "runs": runs, "arms": arms, "l_train": l_train, "lengths": lengths, "n_pos": n_pos}


def _result_fields(cfg) -> dict:
    d = json.loads(json.dumps(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg))
    return {k: v for k, v in d.items() if k not in NOT_RESULTS}


def finished(cfg) -> bool:
    """``cfg.out`` holds a completed run (metrics at the last step, a checkpoint) of the same configuration.

    A field missing from the run's config.json (written before the field existed) counts as its TrainConfig
    default: fields are added with defaults that keep what the older code computed (docs/demo.md, "The
    committed run", checks this by re-running an old run)."""
    from .checkpoint import latest_checkpoint
    from .config import TrainConfig

    try:
        with open(os.path.join(cfg.out, "config.json")) as f:
            on_disk = dict(dataclasses.asdict(TrainConfig()), **json.load(f))
        with open(os.path.join(cfg.out, "metrics.json")) as f:
            metrics = json.load(f)
    except (OSError, ValueError):
        return False
    return (_result_fields(on_disk) == _result_fields(cfg) and metrics.get("step") == cfg.steps
            and latest_checkpoint(cfg.out) is not None)


def _is_demo_run(path: str) -> bool:
    try:
        with open(os.path.join(path, "config.json")) as f:
            return "alpha" in json.load(f)
    except (OSError, ValueError):
        return False


def _clear(path: str) -> None:
    """Remove an unfinished / different earlier run at ``path`` (only a training run dir, never anything else)."""
    from .config import ConfigError

    if not os.path.exists(path):
        return
    if not _is_demo_run(path):
        raise ConfigError(f"{path!r} exists and is not a training run: refusing to overwrite it (choose another --out)")
    shutil.rmtree(path)


def read_log(out: str) -> List[dict]:
    rows = []
    with open(os.path.join(out, "log.jsonl")) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def _clean(x):
    """NaN/inf -> None so results.json is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def run_metrics(ev: dict, label: str, lengths: List[int]) -> dict:
    """One evaluated run's numbers under the table's metric names."""
    r = ev["runs"][label]
    m = {}
    for L in lengths:
        p = r["ppl"][str(L)]
        m[f"PPL@{L}"] = p.get("ppl")
        m[f"LongPPL@{L}"] = p.get("longppl")
    for d in LSM_DIVERGENCES:
        m[f"LSM({d})"] = (r.get("lsm", {}).get(d) or {}).get("lsm")
    return m


def demo_main(argv: Optional[List[str]] = None) -> int:
    from tqdm import tqdm

    from ..integrations.hf import UnsupportedModel
    from . import demo_stats as S
    from .checkpoint import atomic_write_text
    from .demo_measure import machine
    from .evaluate import evaluate
    from .checkpoint import model_dir
    from .config import ConfigError
    from .loop import train

    from .model import quiet_transformers

    a = _parser().parse_args(argv)
    fill_defaults(a)
    quiet_transformers()  # no weight-loading bars from transformers between the demo's own lines
    _env.smoke_caps(a, "lsa demo", seeds=2, base_steps=2, base_batch_size=2, steps=2, batch_size=2, n_windows=2,
                    lsm_samples=4)
    gate = None
    if a.replot:
        return replot(a.out)
    t0 = time.perf_counter()
    try:
        p = plan(a)
    except (ConfigError, UnsupportedModel, FileNotFoundError) as e:
        print(f"lsa demo: error: {e}", file=sys.stderr)
        return 2
    base, runs, l_train, lengths = p["base"], p["runs"], p["l_train"], p["lengths"]
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    say = (lambda *x: None) if a.quiet else (lambda msg: tqdm.write(msg, file=sys.stderr))
    wall: Dict[str, float] = {}
    mach = machine()
    try:
        # ---- stage 1
        t = time.perf_counter()
        ref_label = f"base x{a.rope_factor:g}"
        ref_path = os.path.join(a.out, f"base_x{a.rope_factor:g}")
        if a.data == "recall":
            from . import demo_recall as DR

            say(f"stage 1: the pretrained base {a.base_model}; RoPE {a.rope_scaling} x{a.rope_factor:g}; the gate")
            wall["base_reused"] = True
            gate = DR.run_gate(a.base_model, extended_base(a.base_model, a.rope_scaling, a.rope_factor, ref_path), a.out,
                               a.gate_exact)
            say(gate["line"])
            if not gate["passed"]:
                print(f"lsa demo: stopped before any arm: the base does not retrieve. {gate['line']}", file=sys.stderr)
                return 3
        elif finished(base):
            say(f"stage 1: reusing the base model in {base.out}")
            wall["base_reused"] = True
        else:
            _clear(base.out)
            say(f"stage 1: training the base model ({base.n_layer} layers, d={base.n_embd}, l_train {base.l_train}, "
                f"{base.steps} steps) -> {base.out}")
            train(base)
            wall["base_reused"] = False
        wall["base_s"] = time.perf_counter() - t
        # ---- stage 2
        say(f"stage 2: RoPE {a.rope_scaling} x{a.rope_factor:g} -> l_train {l_train}; {len(p['arms'])} arms x "
            f"{a.seeds} seeds = {len(runs)} fine-tuning runs of {a.steps} steps")
        bar = tqdm(runs, desc="fine-tuning runs", disable=a.quiet, dynamic_ncols=True)
        run_info = []
        for arm, seed, c in bar:
            bar.set_postfix_str(f"{arm} seed {seed}")
            t = time.perf_counter()
            reused = a.resume and finished(c)
            if not reused:
                _clear(c.out)
                train(c)
            log = read_log(c.out)
            run_info.append({"arm": arm, "seed": seed, "out": c.out, "reused": reused,
                             "train_s": None if reused else time.perf_counter() - t,
                             "train_ce": S.final_train_ce(log, "ce"), "train_loss": S.final_train_ce(log, "loss"),
                             "train_misalign": S.final_train_ce(log, "misalign"), "steps_logged": len(log)})
        bar.close()
        wall["finetune_s"] = sum(r["train_s"] or 0.0 for r in run_info)
        # ---- evaluation
        t = time.perf_counter()
        ref_dir = ref_path if a.data == "recall" else extended_base(base.out, a.rope_scaling, a.rope_factor, ref_path)
        labels = [ref_label] + [f"{r['arm']}/seed{r['seed']}" for r in run_info]
        models = [ref_dir] + [model_dir(r["out"]) for r in run_info]
        if max(lengths) > p["n_pos"]:  # past the extended positions: evaluate views allowing max(lengths) (linear RoPE)
            views = os.path.join(a.out, "eval_models")
            shutil.rmtree(views, ignore_errors=True)
            models = [eval_view(m, os.path.join(views, lab.replace("/", "_")), max(lengths)) for m, lab in zip(models, labels)]
            wall["view_max_logit_diff"] = check_view(ref_dir, models[0], min(l_train, 128))
        say(f"evaluation: {len(labels)} models at lengths {lengths} ({a.n_windows} windows), LongPPL (reference: "
            f"{ref_label}), LSM {'/'.join(LSM_DIVERGENCES)} ({a.lsm_samples} samples)")
        ev = evaluate(models, os.path.join(a.out, "eval"), labels=labels,
                      l_train=l_train, multipliers=tuple(a.lengths), n_windows=a.n_windows, lsm_samples=a.lsm_samples,
                      lsm_divergences=LSM_DIVERGENCES, longppl_reference=models[0], eval_files=a.eval_files,
                      backend=a.backend, quiet=a.quiet)
        recall_parts: dict = {}
        recall_ev = DR.evaluate_models(models, labels, lengths, a.n_windows, quiet=a.quiet,
                                       parts=recall_parts) if a.data == "recall" else {}
        wall["eval_s"] = time.perf_counter() - t
    except (ConfigError, UnsupportedModel, FileNotFoundError) as e:
        print(f"lsa demo: error: {e}", file=sys.stderr)
        return 2

    # ---- statistics, table, plot
    lengths = [int(L) for L in ev.get("lengths", lengths)]
    Lmax = lengths[-1]
    for r, label in zip(run_info, labels[1:]):
        r["metrics"] = dict(run_metrics(ev, label, lengths), **recall_ev.get(label, {}),
                            **{"train CE": r["train_ce"], "train loss": r["train_loss"]})
    reference = {ref_label: dict(run_metrics(ev, ref_label, lengths), **recall_ev.get(ref_label, {}))}
    metrics = ([f"PPL@{L}" for L in lengths] + [f"LongPPL@{L}" for L in lengths]
               + [f"LSM({d})" for d in LSM_DIVERGENCES] + ["train CE"])
    verdict_metrics = list(dict.fromkeys([f"PPL@{lengths[0]}", f"PPL@{Lmax}", f"LongPPL@{Lmax}"]))
    corr_target = f"PPL@{Lmax}"
    if a.data == "recall":  # pre-registered in docs/demo.md: the recall testbed's columns and verdict metrics
        metrics = DR.metric_names(lengths) + metrics
        verdict_metrics = DR.verdict_metrics(lengths)
        corr_target = f"keyPPL@{Lmax}"
        for r, label in zip(run_info, labels[1:]):  # per-window pieces of the verdict metrics: bootstrap intervals
            r["parts"] = {m: v for m, v in recall_parts.get(label, {}).items() if m in verdict_metrics}
    stats = S.build_stats(run_info, metrics, refs=("ce1", "ce2"), verdict_metrics=verdict_metrics,
                          corr_target=corr_target, corr_predictors=[f"LSM({d})" for d in LSM_DIVERGENCES]
                          + ["train CE", "train loss"])
    _plot(stats, lengths, os.path.join(a.out, "demo.png"), run_info, reference, l_train)
    if a.data == "recall":
        DR.plot_recall(stats, lengths, os.path.join(a.out, "recall.png"), reference, run_info)
    wall["total_s"] = time.perf_counter() - t0
    header = [
        f"# lsa demo: RoPE {a.rope_scaling} x{a.rope_factor:g} context extension, {len(p['arms'])} arms x {a.seeds} seeds",
        "",
        (f"Base: the pretrained recall base {a.base_model} (64 positions; docs/recall_testbed.md); {gate['line']}. "
         if a.data == "recall" else
         f"Base: Llama {base.n_layer} layers, d={base.n_embd}, trained from scratch at l_train {base.l_train} "
         f"(max positions {base.max_positions}), batch {base.batch_size}, {base.steps} steps, lr {base.lr:g}, seed 0"
         f"{' (reused)' if wall['base_reused'] else ''}. ") + f"Fine-tuning on {a.data} windows: {a.rope_scaling} x{a.rope_factor:g} -> l_train "
        f"{l_train}, {'LoRA rank ' + str(a.lora) if a.lora else 'full fine-tuning'}, batch {a.batch_size}, "
        f"{a.steps} steps, lr {a.lr:g} (warmup {a.warmup}, cosine to 0.1), grad clip 1.0, seeds 0..{a.seeds - 1}. "
        f"Arms: " + "; ".join(f"{k} ({_describe(v)})" for k, v in p["arms"].items()) + ".",
        f"Evaluation: held-out text, {a.n_windows} windows per length (the same target tokens at every length), "
        f"LongPPL key tokens chosen by {ref_label}, LSM over {a.lsm_samples} samples. Lower is better everywhere. "
        f"train CE = mean training CE over the last 10 % of steps."
        + (f" Recall testbed: {a.n_windows} held-out windows per length with 2 repeated rare spans and 2 facts each; "
           "natPPL over the filler-text targets, keyPPL over the answers, recall = teacher-forced exact match of "
           "an answer (higher is better), copy gap d96 = what a first copy 96 tokens back is worth (nats, higher "
           "is better)." if a.data == "recall" else ""),
        "",
    ]
    footer = ["", f"Wall time: total {wall['total_s']:.0f} s ({wall['total_s'] / 60:.1f} min): base "
                  f"{wall['base_s']:.0f} s{' (reused)' if wall['base_reused'] else ''}, fine-tuning {wall['finetune_s']:.0f} s "
                  f"({_n_runs(run_info)}), evaluation {wall['eval_s']:.0f} s. Machine: {mach['cpu']}, {mach['cores']} cores, "
                  f"{mach['torch_threads']} torch threads, torch {mach['torch']}."]
    text = "\n".join(header) + "\n" + S.markdown(stats, reference) + "\n" + "\n".join(footer) + "\n"
    atomic_write_text(os.path.join(a.out, "table.md"), text)
    results = {
        "protocol": {"args": vars(a), "l_train": l_train, "lengths": lengths, "arms": p["arms"],
                     "base_config": dataclasses.asdict(base), "run_config": dataclasses.asdict(runs[0][2]),
                     "verdict_rule": f"two-sided paired t-test on per-seed relative differences (recall, copy gap: points), "
                                     f"Holm-adjusted across the verdict lines, p < {S.P_CALL}; recall testbed: {S.N_BOOT}-resample "
                                     "bootstrap intervals over the evaluation windows beside it",
                     "lsm_divergences": list(LSM_DIVERGENCES), "longppl_reference": ref_label},
        "gate": gate if a.data == "recall" else None, "machine": mach, "wall_s": wall, "runs": run_info, "reference": reference, "stats": stats,
        "eval": {k: v for k, v in ev.items() if k != "runs"}, "eval_runs": ev["runs"],
    }
    atomic_write_text(os.path.join(a.out, "results.json"), json.dumps(_clean(results), indent=1))
    print(text)
    print(f"wrote {os.path.join(a.out, 'table.md')}, results.json, demo.png; total wall time {wall['total_s']:.0f} s "
          f"({wall['total_s'] / 60:.1f} min)")
    return 0


def _plot(stats, lengths, path, runs, reference, l_train) -> None:
    from . import demo_stats as S

    S.plot(stats, lengths, path, runs=runs, reference_rows=reference, l_train=l_train,
           ref="ce1" if "ce1" in stats["paired"] else next(iter(stats["paired"]), "ce1"),
           scatter=[f"LSM({d})" for d in LSM_DIVERGENCES] + ["train CE"])


def replot(out: str) -> int:
    """``lsa demo --replot --out DIR``: redraw ``DIR/demo.png`` (and the recall testbed's ``recall.png``) from
    ``DIR/results.json`` (no training)."""
    path = os.path.join(out, "results.json")
    try:
        with open(path) as f:
            res = json.load(f)
        stats, lengths = res["stats"], res["protocol"]["lengths"]
    except (OSError, ValueError, KeyError) as e:
        print(f"lsa demo: error: --replot needs {path} from an earlier demo ({e})", file=sys.stderr)
        return 2
    def nan(x):  # results.json stores missing numbers as null
        if isinstance(x, dict):
            return {k: nan(v) for k, v in x.items()}
        if isinstance(x, list):
            return [nan(v) for v in x]
        return float("nan") if x is None else x

    stats, runs, reference = nan(stats), nan(res["runs"]), nan(res["reference"])
    _plot(stats, lengths, os.path.join(out, "demo.png"), runs, reference, res["protocol"]["l_train"])
    print(f"wrote {os.path.join(out, 'demo.png')}")
    if res.get("gate"):  # the recall testbed's figure
        from .demo_recall import plot_recall

        plot_recall(stats, lengths, os.path.join(out, "recall.png"), reference, runs)
        print(f"wrote {os.path.join(out, 'recall.png')}")
    return 0


def _n_runs(run_info) -> str:
    n_reused = sum(bool(r["reused"]) for r in run_info)
    return f"{len(run_info)} runs" + (f": {len(run_info) - n_reused} trained, {n_reused} reused" if n_reused else "")


def _describe(fields: dict) -> str:
    """An arm's settings in words, for the table's header: alpha, CE views, divergence, CE weighting."""
    v = fields.get("ce_views") or (1 if fields["alpha"] == 0 else 2)
    words = [f"alpha {fields['alpha']:g}", "CE on one view" if v == 1 else "CE on both views"]
    if fields["alpha"] != 0:
        words.append(fields["divergence"])
    if fields.get("ce_weighting", "none") == "longce":
        words.append(f"LongCE weights on the paired long rows, gamma {fields.get('longce_gamma', 5.0):g}")
    return ", ".join(words)


if __name__ == "__main__":
    if "--measure" in sys.argv[1:]:  # the step-cost measurement (docs/training.md), kept on this entry point
        from .demo_measure import measure_main

        sys.exit(measure_main())
    sys.exit(demo_main())
