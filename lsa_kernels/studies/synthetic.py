"""Synthetic length-generalisation study of the paper's §3 (Du et al., ICML 2025, arXiv 2506.11769).

What it reproduces (docs/maths.md §8): sequences of i.i.d. fair bits, training lengths uniform in [1, 10],
tests at every length 1..50.

Tasks (``--tasks``):

* ``mean``          target = mean of the bits (always in [0, 1]).
* ``length``        target = the length n.
* ``length_sqrt``   the model predicts sqrt(n);   prediction p is turned back into n = p**2.
* ``length_log``    the model predicts log(n);    n = exp(p)        (n >= 1, so log 1 = 0 is fine).
* ``length_invsqrt`` the model predicts 1/sqrt(n); n = 1 / p**2      (p clamped to >= 1e-3).

Errors of the ``length*`` tasks are always measured on the length itself, after the inverse map.
The loss is MSE in the (re-parameterised) target space. The head's output is affinely de-standardised
with the mean/std of the training target distribution (fixed buffers, computed exactly): an affine map is
absorbed by the linear head anyway, so this changes optimisation speed only, not what can extrapolate.

Model (:mod:`lsa_kernels.studies.synthetic_model`): a small *causal* pre-LN transformer (2 layers, width 32,
4 heads, GELU MLP), written in plain torch around ``F.scaled_dot_product_attention``. A library model (HF
GPT-2 and friends) is not used because the model is tiny, we need three interchangeable positional schemes
including NoPE, a regression head read at the last real token, and no extra dependency; 100 lines of torch
are easier to audit than a config object.
Causal, because the paper reads the output at the last position of a decoder, and because with a causal
mask right-padding never reaches the last real token, so variable-length batches need no attention mask.
Every sequence starts with a BOS token (vocabulary {0, 1, BOS}): a causal NoPE model needs some anchor to
be able to count at all (attention weight on BOS is ~1/(n+1)); the same BOS is used for all PEs.

Positional encodings (``--pe``):

* ``nope``     none.
* ``rope``     rotary embedding on q and k of every layer, base 10000, positions 0..n (BOS is position 0).
* ``learned``  learned absolute table with ``max_train_len + 1`` rows (BOS + 10 positions). Learned
  positions cannot extrapolate: at test time position ids past the table are *clamped* to the last
  trained row, i.e. every position >= 10 shares the embedding of position 10.

Long-short misalignment (the paper's explanation, measured per trained model). For a sequence x of length
l1 and its suffix x[-l2:] (l2 <= l1, same last token, less context), with g the model's raw output in the
task's own target space (mean, n, sqrt n, log n or 1/sqrt n):

    misalign = E[(g(x) - g(x[-l2:]))**2] / Var_train(target)

where l1, l2 are two i.i.d. draws from U{5..10} ordered so that l1 >= l2 (the docs/maths.md §6 recipe: lengths in
[l_train/2, l_train], i.e. measured *inside* the training range), and Var_train(target) is the variance of
the task's target under the training distribution, so the number is scale-free and comparable across
tasks: it is the fraction of the output's natural spread that moves when context is cut. For the mean task
part of it is unavoidable per-sequence noise (the suffix's mean differs from the whole's), so we also report
``misalign_dist = E_{l1,l2}[(m(l1) - m(l2))**2] / Var_train(target)`` with m(l) the model's mean output over
random inputs of length l: the shift of the output distribution's centre with length, which is the paper's
"output distributions at different lengths should agree". A third version, ``misalign_long``, is
``misalign`` with l1, l2 drawn from U{25..50} (outside the training range). All three are plotted against
the model's relative error at lengths 30..50, one point per trained model.

Errors. Per test length L: ``mse`` (in the task's natural space: mean, or the length) and the scale-free
``rel_rmse = sqrt(mse) / sqrt(E[y**2])`` (for ``mean`` the denominator is ~0.5; for length tasks it is L),
which makes mean- and length-prediction errors comparable.

Library: ``run_study(config) -> dict``. CLI: ``main(argv) -> int`` (``python -m lsa_kernels.studies.synthetic``,
``lsa synthetic``); the summary, table and plots are in :mod:`lsa_kernels.studies.synthetic_report`.
Cost. The models are so small that per-op overhead dominates on CPU, so the tasks of one (PE, seed) train
together as one ``Regressors`` module with stacked members (batched matmuls; mathematically the same as five
separate trainings, checked by a test). The 9 (PE, seed) jobs are spread over ``--workers`` processes with
one torch thread each. Results do not depend on the number of workers. Default: 45 models, 500 steps of
batch 64: about 400 CPU-seconds, i.e. roughly 3-4 minutes on 2 idle cores (estimated from CPU time;
wall time grows with whatever else shares the cores).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _env
from .synthetic_model import BOS, PES, Regressors, init_params
from .synthetic_report import LONG_RANGE, markdown_table, save_results, summarise

TASKS = ("mean", "length", "length_sqrt", "length_log", "length_invsqrt")


# ----------------------------------------------------------------------------------------------- config
@dataclasses.dataclass
class StudyConfig:
    tasks: Sequence[str] = TASKS
    pes: Sequence[str] = PES
    seeds: Sequence[int] = (0, 1, 2)
    steps: int = 500
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup: int = 100
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 4
    train_min_len: int = 1
    train_max_len: int = 10
    test_max_len: int = 50
    n_eval: int = 256  # sequences per test length
    n_misalign: int = 1024
    workers: int = 0  # 0 = min(2, cpu count)
    progress: bool = True

    @classmethod
    def quick(cls, **kw) -> "StudyConfig":
        base = dict(seeds=(0, 1), steps=200, n_eval=64, n_misalign=256)
        base.update(kw)
        return cls(**base)


# ------------------------------------------------------------------------------------- targets / inverses
def target_transform(task: str, y: torch.Tensor) -> torch.Tensor:
    """Map the natural target (mean or length) to what the model is trained to predict."""
    if task in ("mean", "length"):
        return y
    if task == "length_sqrt":
        return torch.sqrt(y)
    if task == "length_log":
        return torch.log(y)
    if task == "length_invsqrt":
        return torch.rsqrt(y)
    raise ValueError(f"unknown task {task!r}")


def target_inverse(task: str, p: torch.Tensor) -> torch.Tensor:
    """Map a prediction in the model's target space back to the natural space (mean or length)."""
    if task in ("mean", "length"):
        return p
    if task == "length_sqrt":
        return p.clamp_min(0.0) ** 2
    if task == "length_log":
        return torch.exp(p.clamp_max(30.0))
    if task == "length_invsqrt":
        return 1.0 / p.clamp_min(1e-3) ** 2
    raise ValueError(f"unknown task {task!r}")


def natural_target(task: str, bits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """bits: [B, T] (0/1, right-padded with anything), lengths: [B]. Returns float64 [B]."""
    if task == "mean":
        T = bits.shape[1]
        mask = torch.arange(T, device=bits.device)[None, :] < lengths[:, None]
        return (bits.double() * mask).sum(1) / lengths.double()
    return lengths.double()


def train_target_stats(task: str, lo: int, hi: int) -> tuple[float, float]:
    """Exact mean and variance of the (transformed) target under the training distribution."""
    if task == "mean":
        # n ~ U{lo..hi}, k ~ Bin(n, 1/2), y = k/n
        vals, probs = [], []
        for n in range(lo, hi + 1):
            for k in range(n + 1):
                vals.append(k / n)
                probs.append(math.comb(n, k) / 2 ** n / (hi - lo + 1))
        v = torch.tensor(vals, dtype=torch.float64)
        pr = torch.tensor(probs, dtype=torch.float64)
    else:
        v = target_transform(task, torch.arange(lo, hi + 1, dtype=torch.float64))
        pr = torch.full_like(v, 1.0 / (hi - lo + 1))
    m = float((v * pr).sum())
    var = float((((v - m) ** 2) * pr).sum())
    return m, var


# ------------------------------------------------------------------------------------------------ data
def make_batch(gen: torch.Generator, lengths: torch.Tensor) -> torch.Tensor:
    """Token ids [B, 1 + max(lengths)]: BOS then fair bits; positions past a row's length hold 0 (padding,
    never seen by that row's last token because attention is causal)."""
    B, T = lengths.shape[0], int(lengths.max())
    bits = torch.randint(0, 2, (B, T), generator=gen)
    bits = bits * (torch.arange(T)[None, :] < lengths[:, None])
    return torch.cat([torch.full((B, 1), BOS, dtype=torch.long), bits], dim=1)


def sample_train_lengths(gen: torch.Generator, batch: int, lo: int, hi: int) -> torch.Tensor:
    return torch.randint(lo, hi + 1, (batch,), generator=gen)


def _predict(model: Regressors, ids: torch.Tensor, lengths: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Predictions [M, B] (float64) of every member for a shared batch ids [B, T]."""
    return torch.cat([model(ids[i:i + chunk], lengths[i:i + chunk]).double() for i in range(0, ids.shape[0], chunk)],
                     dim=1)


def misalignment(model: nn.Module, lo: int, hi: int, n: int, var, seed: int) -> torch.Tensor:
    """E[(g(x) - g(x[-l2:]))^2] / var per member ([M]), l1 >= l2 two ordered i.i.d. draws from U{lo..hi}.
    ``model(ids [B, T], lengths [B])`` returns [M, B] (or [B]: one member)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(lo, hi + 1, (n,), generator=gen)
    b = torch.randint(lo, hi + 1, (n,), generator=gen)
    l1, l2 = torch.maximum(a, b), torch.minimum(a, b)
    ids = make_batch(gen, l1)
    # suffix of length l2 of each row, re-prefixed with BOS
    T2 = int(l2.max())
    j = torch.arange(T2)[None, :]
    src = (1 + l1 - l2)[:, None] + j  # bit j of the suffix is bit (l1 - l2 + j) of the long row
    bits = torch.gather(ids, 1, src.clamp_max(ids.shape[1] - 1)) * (j < l2[:, None])
    short = torch.cat([torch.full((n, 1), BOS, dtype=torch.long), bits], dim=1)
    with torch.no_grad():
        d = model(ids, l1).double() - model(short, l2).double()
    return (d ** 2).mean(-1) / torch.as_tensor(var, dtype=torch.float64)


def build_group(members: Sequence[tuple], pe: str, cfg: StudyConfig) -> Regressors:
    """The untrained models ``[(task, seed)]`` stacked; every task of one seed starts from the same weights."""
    params, y_mean, y_std = [], [], []
    for task, seed in members:
        m, v = train_target_stats(task, cfg.train_min_len, cfg.train_max_len)
        torch.manual_seed(1000 * seed + 17)
        params.append(init_params(pe, cfg.d_model, cfg.n_layers, cfg.train_max_len + 1))
        y_mean.append(m)
        y_std.append(math.sqrt(v))
    return Regressors(pe, cfg.n_heads, cfg.train_max_len + 1, params, y_mean, y_std)


def train_group(tasks: Sequence[str], pe: str, seeds: Sequence[int], cfg: StudyConfig):
    """Train the models (task, pe, seed) for every task x seed together.

    Returns (members [(task, seed)], the trained ``Regressors``, per-step per-member losses [steps, M])."""
    lo, hi = cfg.train_min_len, cfg.train_max_len
    members = [(t, s) for s in seeds for t in tasks]
    var = torch.tensor([train_target_stats(t, lo, hi)[1] for t, _ in members])
    ens = build_group(members, pe, cfg)
    params = list(ens.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    gens = {s: torch.Generator().manual_seed(s) for s in seeds}  # data stream: one per seed, shared by its tasks
    seed_row = torch.tensor([list(seeds).index(s) for _, s in members])
    losses = []
    for step in range(cfg.steps):
        lens, batches = [], []
        for s in seeds:
            lengths = sample_train_lengths(gens[s], cfg.batch_size, lo, hi)
            lens.append(lengths)
            batches.append(make_batch(gens[s], lengths))
        T = max(b.shape[1] for b in batches)
        ids = torch.stack([F.pad(b, (0, T - b.shape[1])) for b in batches])[seed_row]  # [M, B, T]
        lengths = torch.stack(lens)[seed_row]
        y = torch.stack([target_transform(t, natural_target(t, ids[i, :, 1:], lengths[i]))
                         for i, (t, _) in enumerate(members)]).float()
        # per-member loss on the standardised scale (= MSE / Var_train), so all tasks see O(1) losses
        per = ((ens(ids, lengths) - y) ** 2).mean(1) / var
        opt.zero_grad(set_to_none=True)
        per.sum().backward()
        with torch.no_grad():  # per-member gradient clipping to norm 1
            sq = sum(p.grad.pow(2).flatten(1).sum(1) for p in params)
            scale = (1.0 / (sq.sqrt() + 1e-6)).clamp(max=1.0)
            for p in params:
                p.grad.mul_(scale.view(-1, *([1] * (p.dim() - 1))))
        opt.step()
        sched.step()
        losses.append(per.detach())
    L = torch.stack(losses) if losses else torch.zeros(0, len(members))
    return members, ens.eval(), L


def evaluate(model: Regressors, tasks: Sequence[str], cfg: StudyConfig) -> List[dict]:
    """Metrics for each member (task ``tasks[i]``) of ``model``."""
    lo, hi = cfg.train_min_len, cfg.train_max_len
    var = [train_target_stats(t, lo, hi)[1] for t in tasks]
    M = len(tasks)
    mse, rel, mse_param, mean_out = ([[] for _ in range(M)] for _ in range(4))
    with torch.no_grad():
        for L in range(1, cfg.test_max_len + 1):
            g = torch.Generator().manual_seed(100_000 + L)  # fixed test set, shared by all models
            lengths = torch.full((cfg.n_eval,), L, dtype=torch.long)
            ids = make_batch(g, lengths)
            P = _predict(model, ids, lengths)
            for i, task in enumerate(tasks):
                p = P[i]
                y = natural_target(task, ids[:, 1:], lengths)
                m = float(((target_inverse(task, p) - y) ** 2).mean())
                mse[i].append(m)
                rel[i].append(math.sqrt(m) / math.sqrt(float((y ** 2).mean())))
                mse_param[i].append(float(((p - target_transform(task, y)) ** 2).mean()))
                mean_out[i].append(float(p.mean()))
    mis_in = misalignment(model, (hi + 1) // 2, hi, cfg.n_misalign, var, seed=7)
    mis_long = misalignment(model, 25, cfg.test_max_len, cfg.n_misalign, var, seed=8)
    ls = range((hi + 1) // 2, hi + 1)
    a, b = LONG_RANGE
    out = []
    for i in range(M):
        # distributional part: shift of the mean output between lengths, E_{l1,l2}[(m(l1) - m(l2))^2] / var
        mo = mean_out[i]
        mis_dist = sum((mo[x - 1] - mo[z - 1]) ** 2 for x in ls for z in ls) / len(ls) ** 2 / var[i]
        out.append(dict(
            mse=mse[i], rel_rmse=rel[i], mse_param=mse_param[i], mean_output=mo,
            rel_long=sum(rel[i][a - 1:b]) / (b - a + 1),
            rel_in=sum(rel[i][lo - 1:hi]) / (hi - lo + 1),
            misalign=float(mis_in[i]), misalign_dist=mis_dist, misalign_long=float(mis_long[i]),
            target_var_train=var[i]))
    return out


def run_group(tasks: Sequence[str], pe: str, seeds: Sequence[int], cfg: StudyConfig) -> List[dict]:
    """Train and evaluate every (task, pe, seed) for the given tasks and seeds; one JSON-able dict per model."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.time()
        c0 = time.process_time()
        members, ens, losses = train_group(tasks, pe, seeds, cfg)
        train_s, train_cpu = time.time() - t0, time.process_time() - c0
        t1, c1 = time.time(), time.process_time()
        metrics = evaluate(ens, [t for t, _ in members], cfg)
        eval_s, eval_cpu = time.time() - t1, time.process_time() - c1
        tail = max(1, min(200, cfg.steps // 4))
        out = []
        for i, ((t, s), met) in enumerate(zip(members, metrics)):
            r = dict(task=t, pe=pe, seed=s, **met)
            r["final_train_loss"] = float(losses[-tail:, i].mean()) if len(losses) else float("nan")
            r["group_size"] = len(members)
            r["group_train_seconds"], r["group_train_cpu_seconds"] = train_s, train_cpu
            r["group_eval_seconds"], r["group_eval_cpu_seconds"] = eval_s, eval_cpu
            out.append(r)
        return out
    finally:
        torch.set_num_threads(n_threads)


def _run_group_star(args):
    return run_group(*args)


# --------------------------------------------------------------------------------------- the study
def run_study(config: Optional[StudyConfig] = None, **overrides) -> dict:
    """Train every (task, pe, seed) model, evaluate, and summarise. Returns a JSON-able dict."""
    cfg = config or StudyConfig()
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    for t in cfg.tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; choose from {TASKS}")
    for p in cfg.pes:
        if p not in PES:
            raise ValueError(f"unknown pe {p!r}; choose from {PES}")
    # one job per (pe, seed): the tasks of a job train together as one batched ensemble
    jobs = [(tuple(cfg.tasks), p, (s,), cfg) for p in cfg.pes for s in cfg.seeds]
    workers = cfg.workers or min(2, os.cpu_count() or 1)
    workers = max(1, min(workers, len(jobs)))
    t0 = time.time()
    runs: List[dict] = []
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs) * len(cfg.tasks), desc="synthetic models", disable=not cfg.progress,
                   file=sys.stderr)
    except ImportError:  # pragma: no cover
        bar = None

    def done(rs, j):
        runs.extend(rs)
        if bar is not None:
            bar.update(len(rs))
            bar.set_postfix_str(f"{j[1]}/seed{j[2][0]}")

    if workers == 1:
        for j in jobs:
            done(run_group(*j), j)
    else:
        import multiprocessing as mp
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
            futs = {ex.submit(_run_group_star, j): j for j in jobs}
            for f in as_completed(futs):
                done(f.result(), futs[f])
    if bar is not None:
        bar.close()
    order = {(t, p, s): i for i, (t, p, s) in enumerate(
        (t, p, s) for s in cfg.seeds for t in cfg.tasks for p in cfg.pes)}
    runs.sort(key=lambda r: order[(r["task"], r["pe"], r["seed"])])
    out = dict(
        paper="Du, Huang, Wang, Wang. Long-Short Alignment for Effective Long-Context Modeling in LLMs. "
              "ICML 2025, arXiv 2506.11769, section 3",
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
        definitions=dict(
            rel_rmse="sqrt(MSE_L) / sqrt(E[y^2]) per test length L, y = mean (mean task) or length (length tasks, "
                     "after inverting the reparameterisation)",
            rel_long=f"rel_rmse averaged over test lengths {LONG_RANGE[0]}..{LONG_RANGE[1]}",
            rel_in=f"rel_rmse averaged over training lengths {cfg.train_min_len}..{cfg.train_max_len}",
            misalign="E[(g(x) - g(x[-l2:]))^2] / Var_train(target), g = raw model output in the task's target "
                     f"space, l1>=l2 ordered draws from U{{{(cfg.train_max_len + 1) // 2}..{cfg.train_max_len}}}",
            misalign_dist="E_{l1,l2}[(m(l1) - m(l2))^2] / Var_train(target), m(l) = mean raw output over random "
                          "inputs of length l, l1, l2 i.i.d. U{5..10}: the shift of the output distribution's "
                          "centre between lengths (the part of misalign that is not per-sequence noise)",
            misalign_long=f"same as misalign with l1>=l2 from U{{25..{cfg.test_max_len}}}",
            model=f"causal pre-LN transformer, {cfg.n_layers} layers, d={cfg.d_model}, {cfg.n_heads} heads, BOS "
                  "token, output at the last token; learned PE clamps positions past the table",
        ),
        runs=runs,
        wall_seconds=time.time() - t0,
        workers=workers,
    )
    out.update(summarise(runs, cfg))
    return out


# ------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    from .. import _cli_types as T

    ap = T.Parser(prog="lsa synthetic", description="Synthetic length-generalisation study "
                  "(mean vs length prediction, paper §3) on CPU.")
    ap.add_argument("--quick", action="store_true", help="2 seeds, 200 steps (about a minute on 2 idle cores)")
    ap.add_argument("--seeds", type=T.positive_int, default=None, help="number of seeds (default 3; --quick 2)")
    ap.add_argument("--steps", type=T.positive_int, default=None,
                    help="training steps per model (default 500; --quick 200)")
    ap.add_argument("--out", default="runs/synthetic",
                    help="output directory (the committed study is benchmarks/results/synthetic: pass it to redo it)")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma list from {','.join(TASKS)}")
    ap.add_argument("--pe", default=",".join(PES), help=f"comma list from {','.join(PES)}")
    ap.add_argument("--workers", type=T.nonneg_int, default=0, help="processes (0 = min(2, cpus))")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0), or a flag argparse refused (2; its one line is on stderr already)
        return int(e.code or 0)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"lsa synthetic: error: --out {args.out!r} is an existing file; it must name a directory", file=sys.stderr)
        return 2
    cfg = StudyConfig.quick() if args.quick else StudyConfig()
    kw = dict(tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
              pes=tuple(p.strip() for p in args.pe.split(",") if p.strip()),
              workers=args.workers, progress=not args.no_progress)
    if args.seeds is not None:
        kw["seeds"] = tuple(range(args.seeds))
    if args.steps is not None:
        kw["steps"] = args.steps
    if _env.docs_smoke():  # the documented commands under the docs test: 2 seeds, a few steps, small evaluation
        kw.update(seeds=kw.get("seeds", cfg.seeds)[:2], steps=min(kw.get("steps", cfg.steps), 3), workers=1)
        cfg = dataclasses.replace(cfg, n_eval=min(cfg.n_eval, 16), n_misalign=min(cfg.n_misalign, 32))
        print("lsa synthetic: LSA_DOCS_SMOKE is set: at most 2 seeds, 3 steps, 16 test sequences per length, "
              "1 worker", file=sys.stderr)
    try:
        res = run_study(dataclasses.replace(cfg, **kw))
    except ValueError as e:
        print(f"lsa synthetic: error: {e}", file=sys.stderr)
        return 2
    paths = save_results(res, args.out)
    print(markdown_table(res))
    print(f"wrote {paths['json']}, {paths['table']}" + (f", {', '.join(paths.get('plots', []))}"))
    print(f"{len(res['runs'])} models in {res['wall_seconds']:.0f} s on {res['workers']} worker(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
