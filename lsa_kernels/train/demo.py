"""The paper's experiment in miniature: context extension x4, five fine-tuning arms, several seeds.

    lsa demo                                  # make demo: the defaults below
    lsa demo --seeds 5 --extra-arms sce@0.5   # the committed run (benchmarks/results/demo, docs/demo.md)

Stage 1 (built once; reused when ``<out>/base`` holds a finished run with the same config): the small
default Llama trained from scratch on the shipped corpus at a short context (``--base-l-train 64``,
``max_position_embeddings`` = 64, so the extension below is a real one), alpha = 0.

Stage 2: for every seed, from that base, RoPE extended with position interpolation (``--rope-scaling
linear --rope-factor 4``: l_train 256), full fine-tuning (``--lora R`` for LoRA) in each arm; the same seed
gives every arm the same windows in the same order and the same initial weights:

    ce1     alpha = 0, CE on one view (the long one): the paper's baseline
    ce2     alpha = 0, CE on both views: the same tokens as the regularised arms, no divergence
    sce     alpha = 0.1, divergence sce (the paper's: CE(p,q) + CE(q,p) = H(p) + H(q) + KL + KL)
    symkl   alpha = 0.1, divergence sym_kl (KL(p||q) + KL(q||p): alignment without the entropy terms)
    longce  alpha = 0, CE on both views, each paired long row's CE weighted by min(exp(CE_short - CE_long), 5)
            (LongCE, Fang et al., gamma 5; detached; short rows and unpaired long rows weight 1; docs/maths.md
            §13): the same training tokens as ce2, which it is compared with
    --extra-arms NAME@ALPHA ...  e.g. sce@0.5 (the paper reports alpha 0.5 / 1.0 as harmful)

Evaluation (``<out>/eval``) of every fine-tuned run and of the extended base before fine-tuning ("base x4",
also the LongPPL reference): perplexity and LongPPL at 1x, 2x, 4x the extended length on the same
held-out target tokens, LSM with sce and sym_kl. Then :mod:`demo_stats`: mean ± std over seeds, the
per-seed paired differences against ce1 and ce2 with a paired t-test and a sign test, verdict lines
computed from those numbers, and the paper's Table-1 check (correlation across runs of LSM and of the
final training CE with PPL at the longest length). Writes ``<out>/table.md``, ``<out>/results.json``,
``<out>/demo.png``; prints the table and the wall time. The protocol is documented in docs/demo.md.
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

# the five arms of the protocol: TrainConfig fields that differ between them (the rest at TrainConfig's defaults)
ARMS: Dict[str, dict] = {
    "ce1": {"alpha": 0.0, "ce_views": 1, "divergence": "sce"},
    "ce2": {"alpha": 0.0, "ce_views": 2, "divergence": "sce"},
    "sce": {"alpha": 0.1, "ce_views": 0, "divergence": "sce"},
    "symkl": {"alpha": 0.1, "ce_views": 0, "divergence": "sym_kl"},
    "longce": {"alpha": 0.0, "ce_views": 2, "divergence": "sce", "ce_weighting": "longce", "longce_gamma": 5.0},
}
_DIVERGENCES = {"sce": "sce", "symkl": "sym_kl", "sym_kl": "sym_kl", "kl": "kl", "kl_reverse": "kl_reverse", "js": "js"}
DEFAULT_SEEDS = 5
LSM_DIVERGENCES = ("sce", "sym_kl")
# config fields that do not change what a run computes (a finished run with the rest equal is reused)
_NOT_RESULTS = ("out", "quiet", "resume", "ckpt_every", "stop_after", "device")


def parse_arm(spec: str):
    """``NAME@ALPHA`` (``sce@0.5``, ``symkl@1``) -> (label, TrainConfig fields); ConfigError if malformed."""
    from .config import ConfigError

    name, sep, alpha = spec.partition("@")
    try:
        a = float(alpha)
    except ValueError:
        a = math.nan
    if name in ARMS and name not in _DIVERGENCES:
        raise ConfigError(f"--extra-arms: {spec!r}: {name} is an arm of the protocol (--arms ... {name}), not NAME@ALPHA")
    if not sep or name not in _DIVERGENCES or not (math.isfinite(a) and a > 0):
        raise ConfigError(f"--extra-arms: {spec!r} is not NAME@ALPHA with NAME one of {', '.join(_DIVERGENCES)} "
                          "and ALPHA > 0 (e.g. sce@0.5)")
    return f"{name}@{a:g}", {"alpha": a, "ce_views": 0, "divergence": _DIVERGENCES[name]}


def _parser() -> argparse.ArgumentParser:
    ap = T.Parser(prog="lsa demo", description=__doc__)
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--seeds", type=T.positive_int, default=DEFAULT_SEEDS, help="seeds 0..S-1 per arm (default %(default)s)")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="the protocol's arms to run")
    ap.add_argument("--extra-arms", nargs="*", default=[], metavar="NAME@ALPHA", help="more arms, e.g. sce@0.5")
    g = ap.add_argument_group("stage 1: the base model (trained from scratch at a short context)")
    g.add_argument("--base-l-train", type=T.int_at_least(4), default=64, help="its training length = its max_position_embeddings")
    g.add_argument("--base-steps", type=T.positive_int, default=800)
    g.add_argument("--base-batch-size", type=T.positive_int, default=16)
    g.add_argument("--base-lr", type=T.positive_float, default=2e-3)
    g.add_argument("--n-layer", type=T.positive_int, default=4)
    g.add_argument("--n-embd", type=T.positive_int, default=128)
    g.add_argument("--n-head", type=T.positive_int, default=4)
    g.add_argument("--n-kv-head", type=T.positive_int, default=2)
    g.add_argument("--ffn", type=T.positive_int, default=352)
    g = ap.add_argument_group("stage 2: context extension and fine-tuning (l_train = base-l-train x rope-factor)")
    g.add_argument("--rope-scaling", default="linear", choices=["linear", "dynamic", "yarn", "llama3"])
    g.add_argument("--rope-factor", type=T.float_at_least(1), default=4.0)
    g.add_argument("--steps", type=T.positive_int, default=150)
    g.add_argument("--batch-size", type=T.positive_int, default=4)
    g.add_argument("--lr", type=T.positive_float, default=1e-3)
    g.add_argument("--warmup", type=T.nonneg_int, default=10)
    g.add_argument("--lora", type=T.nonneg_int, default=0, help="LoRA rank (0 = full fine-tuning)")
    g = ap.add_argument_group("evaluation")
    g.add_argument("--lengths", type=T.positive_float, nargs="+", default=[1, 2, 4], help="multiples of the extended length")
    g.add_argument("--n-windows", type=T.positive_int, default=16)
    g.add_argument("--lsm-samples", type=T.positive_int, default=64)
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
    l_train = a.base_l_train * a.rope_factor
    if l_train != int(l_train):
        raise ConfigError(f"--base-l-train {a.base_l_train} x --rope-factor {a.rope_factor:g} is not a whole length")
    l_train = int(l_train)
    lengths = [int(m * l_train) for m in a.lengths]
    if not lengths or any(m <= 0 or m * l_train != int(m * l_train) for m in a.lengths):
        raise ConfigError(f"--lengths must be positive multiples giving whole lengths, got {a.lengths}")
    if max(lengths) > l_train and a.rope_scaling != "linear":
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
    base = TrainConfig(alpha=0.0, l_train=a.base_l_train, max_positions=a.base_l_train, batch_size=a.base_batch_size,
                       steps=a.base_steps, lr=a.base_lr, seed=0, n_layer=a.n_layer, n_embd=a.n_embd, n_head=a.n_head,
                       n_kv_head=a.n_kv_head, ffn=a.ffn, out=os.path.join(a.out, "base"), ckpt_every=a.base_steps,
                       **common)
    runs = []  # seed-major: an interrupted demo (--resume) has whole seeds done
    for s in range(a.seeds):
        for arm, fields in arms.items():
            runs.append((arm, s, TrainConfig(
                model=base.out, rope_scaling=a.rope_scaling, rope_factor=a.rope_factor, l_train=l_train,
                batch_size=a.batch_size, steps=a.steps, lr=a.lr, warmup=a.warmup, min_lr_frac=0.1, grad_clip=1.0,
                seed=s, lora=a.lora, out=os.path.join(a.out, "runs", arm, f"seed{s}"), ckpt_every=a.steps,
                **fields, **common)))
    validate(dataclasses.replace(base, out=os.path.join(a.out, ".never-written")))
    for _, _, c in runs:  # the base does not exist yet: check everything else
        validate(dataclasses.replace(c, model="", out=os.path.join(a.out, ".never-written")))
    return {"base": base, "runs": runs, "arms": arms, "l_train": l_train, "lengths": lengths}


def _result_fields(cfg) -> dict:
    d = json.loads(json.dumps(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg))
    return {k: v for k, v in d.items() if k not in _NOT_RESULTS}


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


def extended_base(base_out: str, rope_scaling: str, factor: float, dest: str) -> str:
    """Write the base with its RoPE extended (no training) to ``dest``: the "base x4" row and LongPPL reference."""
    import torch

    from .checkpoint import latest_checkpoint
    from .config import TrainConfig
    from .model import build_model

    ckpt = latest_checkpoint(base_out)
    model = build_model(TrainConfig(model=ckpt, rope_scaling=rope_scaling, rope_factor=factor), 0, torch.device("cpu"))
    shutil.rmtree(dest, ignore_errors=True)
    model.save_pretrained(dest, safe_serialization=True)
    tok = os.path.join(ckpt, "tokenizer.json")
    if os.path.isfile(tok):
        shutil.copy(tok, os.path.join(dest, "tokenizer.json"))
    return dest


def eval_view(model_dir: str, dest: str, n_positions: int) -> str:
    """``model_dir`` as seen by the evaluation past its extended length: ``dest`` holds a copy of its config.json
    with ``max_position_embeddings`` raised to ``n_positions`` and links to its other files (weights, tokenizer).

    ``lsa eval`` refuses lengths past ``max_position_embeddings`` (n0 x F after a x F extension); the demo
    evaluates at up to 4x the extended length, as the paper evaluates beyond its training length. For
    position interpolation (linear) and plain RoPE the rotary angles do not depend on that field (it is a
    bound only), which :func:`check_view` verifies on the model's outputs; other RoPE types do use it and are
    refused by :func:`plan`."""
    os.makedirs(dest, exist_ok=True)
    for name in os.listdir(model_dir):
        src = os.path.abspath(os.path.join(model_dir, name))
        if name == "config.json" or name.endswith(".pt") or not os.path.isfile(src):
            continue
        link = os.path.join(dest, name)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(src, link)
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg["max_position_embeddings"] = max(int(cfg.get("max_position_embeddings") or 0), int(n_positions))
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return dest


def check_view(model_dir: str, view: str, length: int) -> float:
    """Max |logit difference| between ``model_dir`` and its :func:`eval_view` on a ``length``-token input; a
    ConfigError unless they agree (then the view changes nothing but the allowed length)."""
    import torch

    from .config import ConfigError, TrainConfig
    from .model import build_model

    torch.manual_seed(0)
    outs = []
    for d in (model_dir, view):
        m = build_model(TrainConfig(), 0, torch.device("cpu"), path=d).eval()
        ids = torch.randint(0, m.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            outs.append(m(ids).logits.float())
    diff = (outs[0] - outs[1]).abs().max().item()
    if not diff <= 1e-5:
        raise ConfigError(f"raising max_position_embeddings changes {model_dir}'s outputs (max |diff| {diff:.3g}): "
                          "its RoPE type cannot be evaluated past its extended length")
    return diff


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

    a = _parser().parse_args(argv)
    _env.smoke_caps(a, "lsa demo", seeds=2, base_steps=2, base_batch_size=2, steps=2, batch_size=2, n_windows=2,
                    lsm_samples=4)
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
        if finished(base):
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
        ref_label = f"base x{a.rope_factor:g}"
        ref_dir = extended_base(base.out, a.rope_scaling, a.rope_factor, os.path.join(a.out, f"base_x{a.rope_factor:g}"))
        labels = [ref_label] + [f"{r['arm']}/seed{r['seed']}" for r in run_info]
        models = [ref_dir] + [model_dir(r["out"]) for r in run_info]
        if max(lengths) > l_train:  # past the extended positions: evaluate views allowing max(lengths) (linear RoPE)
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
        wall["eval_s"] = time.perf_counter() - t
    except (ConfigError, UnsupportedModel, FileNotFoundError) as e:
        print(f"lsa demo: error: {e}", file=sys.stderr)
        return 2

    # ---- statistics, table, plot
    lengths = [int(L) for L in ev.get("lengths", lengths)]
    Lmax = lengths[-1]
    for r, label in zip(run_info, labels[1:]):
        r["metrics"] = dict(run_metrics(ev, label, lengths), **{"train CE": r["train_ce"], "train loss": r["train_loss"]})
    reference = {ref_label: run_metrics(ev, ref_label, lengths)}
    metrics = ([f"PPL@{L}" for L in lengths] + [f"LongPPL@{L}" for L in lengths]
               + [f"LSM({d})" for d in LSM_DIVERGENCES] + ["train CE"])
    verdict_metrics = list(dict.fromkeys([f"PPL@{lengths[0]}", f"PPL@{Lmax}", f"LongPPL@{Lmax}"]))
    stats = S.build_stats(run_info, metrics, refs=("ce1", "ce2"), verdict_metrics=verdict_metrics,
                          corr_target=f"PPL@{Lmax}", corr_predictors=[f"LSM({d})" for d in LSM_DIVERGENCES]
                          + ["train CE", "train loss"])
    _plot(stats, lengths, os.path.join(a.out, "demo.png"), run_info, reference, l_train)
    wall["total_s"] = time.perf_counter() - t0
    header = [
        f"# lsa demo: RoPE {a.rope_scaling} x{a.rope_factor:g} context extension, {len(p['arms'])} arms x {a.seeds} seeds",
        "",
        f"Base: Llama {base.n_layer} layers, d={base.n_embd}, trained from scratch at l_train {base.l_train} "
        f"(max positions {base.max_positions}), batch {base.batch_size}, {base.steps} steps, lr {base.lr:g}, seed 0"
        f"{' (reused)' if wall['base_reused'] else ''}. Fine-tuning: {a.rope_scaling} x{a.rope_factor:g} -> l_train "
        f"{l_train}, {'LoRA rank ' + str(a.lora) if a.lora else 'full fine-tuning'}, batch {a.batch_size}, "
        f"{a.steps} steps, lr {a.lr:g} (warmup {a.warmup}, cosine to 0.1), grad clip 1.0, seeds 0..{a.seeds - 1}. "
        f"Arms: " + "; ".join(f"{k} ({_describe(v)})" for k, v in p["arms"].items()) + ".",
        f"Evaluation: held-out text, {a.n_windows} windows per length (the same target tokens at every length), "
        f"LongPPL key tokens chosen by {ref_label}, LSM over {a.lsm_samples} samples. Lower is better everywhere. "
        f"train CE = mean training CE over the last 10 % of steps.",
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
                     "verdict_rule": f"two-sided paired t-test on per-seed relative differences, p < {S.P_CALL}",
                     "lsm_divergences": list(LSM_DIVERGENCES), "longppl_reference": ref_label},
        "machine": mach, "wall_s": wall, "runs": run_info, "reference": reference, "stats": stats,
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
    """``lsa demo --replot --out DIR``: redraw ``DIR/demo.png`` from ``DIR/results.json`` (no training)."""
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
