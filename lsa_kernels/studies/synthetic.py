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

Model: a small *causal* pre-LN transformer (2 layers, width 32, 4 heads, GELU MLP), written in plain torch
around ``F.scaled_dot_product_attention``. A library model (HF GPT-2 and friends) is not used because the
model is tiny, we need three interchangeable positional schemes including NoPE, a regression head read at
the last real token, and no extra dependency; 60 lines of torch are easier to audit than a config object.
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

Library: ``run_study(config) -> dict``. CLI: ``main(argv) -> int`` (``python -m lsa_kernels.train.synthetic``).
Cost. The models are so small that per-op overhead dominates on CPU, so the tasks of one (PE, seed) train
together as one batched ``Ensemble`` (stacked parameters, batched matmuls; mathematically the same as five
separate trainings, checked by a test). The 9 (PE, seed) jobs are spread over ``--workers`` processes with
one torch thread each. Results do not depend on the number of workers. Default: 45 models, 500 steps of
batch 64: about 400 CPU-seconds, i.e. roughly 3-4 minutes on 2 idle cores (estimated from CPU time;
wall time grows with whatever else shares the cores).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

TASKS = ("mean", "length", "length_sqrt", "length_log", "length_invsqrt")
PES = ("nope", "rope", "learned")
BOS = 2
VOCAB = 3
LONG_RANGE = (30, 50)  # lengths over which "long-length error" is averaged


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


# ----------------------------------------------------------------------------------------------- model
def _rope_cache(T: int, dim: int, base: float = 10000.0):
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    ang = torch.arange(T, dtype=torch.float32)[:, None] * inv[None, :]
    return ang.cos(), ang.sin()  # [T, dim/2]


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2)


class Block(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.h = h
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = _apply_rope(q, *rope), _apply_rope(k, *rope)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.ln2(x))


class TinyRegressor(nn.Module):
    """Causal transformer over {0, 1, BOS}; scalar output read at the last real token."""

    def __init__(self, pe: str, d: int, n_layers: int, n_heads: int, n_pos: int, y_mean: float, y_std: float):
        super().__init__()
        if pe not in PES:
            raise ValueError(f"unknown pe {pe!r}")
        self.pe, self.n_pos, self.hd = pe, n_pos, d // n_heads
        self.emb = nn.Embedding(VOCAB, d)
        self.pos = nn.Embedding(n_pos, d) if pe == "learned" else None
        self.blocks = nn.ModuleList(Block(d, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, 1)
        self.register_buffer("y_mean", torch.tensor(float(y_mean)))
        self.register_buffer("y_std", torch.tensor(float(y_std)))

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids [B, T] with BOS at 0; lengths [B] = number of bits. Returns prediction [B] (target space)."""
        B, T = ids.shape
        x = self.emb(ids)
        rope = None
        if self.pe == "learned":
            # positions past the trained table are clamped to its last row (no extrapolation possible)
            pos = torch.arange(T, device=ids.device).clamp_max(self.n_pos - 1)
            x = x + self.pos(pos)[None]
        elif self.pe == "rope":
            rope = _rope_cache(T, self.hd)
        for blk in self.blocks:
            x = blk(x, rope)
        x = self.ln_f(x[torch.arange(B), lengths])  # last real token sits at index `length`
        return self.head(x).squeeze(-1) * self.y_std + self.y_mean


# ----------------------------------------------------------------------------------------- one run
def _predict(model: nn.Module, ids: torch.Tensor, lengths: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Predictions [M, B] (float64) for a shared batch ids [B, T]; model is an ``Ensemble`` (M members) or a
    ``TinyRegressor`` (M = 1)."""
    out = []
    for i in range(0, ids.shape[0], chunk):
        x, l = ids[i:i + chunk], lengths[i:i + chunk]
        if isinstance(model, Ensemble):
            M = model.y_mean.shape[0]
            out.append(model(x.expand(M, *x.shape), l.expand(M, *l.shape)).double())
        else:
            out.append(model(x, l).double()[None])
    return torch.cat(out, dim=1)


def misalignment(model: nn.Module, lo: int, hi: int, n: int, var, seed: int) -> torch.Tensor:
    """E[(g(x) - g(x[-l2:]))^2] / var per member ([M]), l1 >= l2 two ordered i.i.d. draws from U{lo..hi}."""
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
        d = _predict(model, ids, l1) - _predict(model, short, l2)
    return (d ** 2).mean(1) / torch.as_tensor(var, dtype=torch.float64)


class Ensemble(nn.Module):
    """M independent ``TinyRegressor``s (same PE) evaluated as one batched graph.

    Parameters are stacked along a leading model axis; linear layers are batched matmuls and attention runs
    on the flattened (model, batch) axis. Member m's output depends only on member m's parameters, the loss
    is a sum of per-member losses, gradients are clipped per member and AdamW is elementwise, so training the
    ensemble is the same computation as training the M models one by one (up to float summation order;
    ``tests/test_synthetic.py`` checks it). It exists only because the models are so small that per-op
    overhead, not arithmetic, dominates on CPU: batching 15 models is several times faster than a loop.
    """

    def __init__(self, members: Sequence[TinyRegressor]):
        super().__init__()
        m0 = members[0]
        self.pe, self.n_pos, self.hd, self.h = m0.pe, m0.n_pos, m0.hd, m0.blocks[0].h
        self.n_layers = len(m0.blocks)
        self.p = nn.ParameterDict({
            k.replace(".", "__"): nn.Parameter(torch.stack([dict(m.named_parameters())[k].detach() for m in members]))
            for k, _ in m0.named_parameters()})
        self.register_buffer("y_mean", torch.stack([m.y_mean for m in members]))
        self.register_buffer("y_std", torch.stack([m.y_std for m in members]))

    def member_state(self, i: int) -> dict:
        st = {k.replace("__", "."): v[i].detach().clone() for k, v in self.p.items()}
        st["y_mean"], st["y_std"] = self.y_mean[i].clone(), self.y_std[i].clone()
        return st

    def _lin(self, x, name):  # x [M, N, in] -> [M, N, out]
        return torch.baddbmm(self.p[name + "__bias"][:, None, :], x, self.p[name + "__weight"].transpose(1, 2))

    def _ln(self, x, name):  # x [M, N, d]
        w, b = self.p[name + "__weight"], self.p[name + "__bias"]
        return F.layer_norm(x, x.shape[-1:]) * w[:, None, :] + b[:, None, :]

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids [M, B, T], lengths [M, B] -> predictions [M, B]."""
        M, B, T = ids.shape
        ar = torch.arange(M)[:, None, None]
        x = self.p["emb__weight"][ar, ids]  # [M, B, T, d]
        D = x.shape[-1]
        rope = None
        if self.pe == "learned":
            pos = torch.arange(T).clamp_max(self.n_pos - 1)
            x = x + self.p["pos__weight"][:, pos][:, None]
        elif self.pe == "rope":
            rope = _rope_cache(T, self.hd)
        x = x.reshape(M, B * T, D)
        for i in range(self.n_layers):
            pre = f"blocks__{i}__"
            q, k, v = (self._lin(self._ln(x, pre + "ln1"), pre + "qkv")
                       .view(M * B, T, 3, self.h, self.hd).permute(2, 0, 3, 1, 4))
            if rope is not None:
                q, k = _apply_rope(q, *rope), _apply_rope(k, *rope)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(M, B * T, D)
            x = x + self._lin(a, pre + "proj")
            hdn = F.gelu(self._lin(self._ln(x, pre + "ln2"), pre + "mlp__0"))
            x = x + self._lin(hdn, pre + "mlp__2")
        x = x.view(M, B, T, D)[ar[:, :, 0], torch.arange(B)[None, :], lengths]  # [M, B, D]
        x = self._ln(x, "ln_f")
        out = self._lin(x, "head").squeeze(-1)
        return out * self.y_std[:, None] + self.y_mean[:, None]


def build_member(task: str, pe: str, seed: int, cfg: StudyConfig) -> TinyRegressor:
    y_mean, y_var = train_target_stats(task, cfg.train_min_len, cfg.train_max_len)
    torch.manual_seed(1000 * seed + 17)  # same init for every task of one seed
    return TinyRegressor(pe, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.train_max_len + 1, y_mean, math.sqrt(y_var))


def train_group(tasks: Sequence[str], pe: str, seeds: Sequence[int], cfg: StudyConfig):
    """Train the models (task, pe, seed) for every task x seed together.

    Returns (members [(task, seed)], trained ``Ensemble``, per-step per-member losses [steps, M])."""
    lo, hi = cfg.train_min_len, cfg.train_max_len
    members = [(t, s) for s in seeds for t in tasks]
    var = torch.tensor([train_target_stats(t, lo, hi)[1] for t, _ in members])
    ens = Ensemble([build_member(t, pe, s, cfg) for t, s in members])
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


def unstack(ens: "Ensemble", members, pe: str, cfg: StudyConfig) -> List[TinyRegressor]:
    """The ensemble's members as ordinary ``TinyRegressor``s."""
    models = []
    for i, (t, s) in enumerate(members):
        m = build_member(t, pe, s, cfg)
        m.load_state_dict(ens.member_state(i))
        models.append(m.eval())
    return models


def evaluate(model: nn.Module, tasks: Sequence[str], cfg: StudyConfig) -> List[dict]:
    """Metrics for each member (task ``tasks[i]``) of an ``Ensemble``, or of one ``TinyRegressor``."""
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


def run_one(task: str, pe: str, seed: int, cfg: StudyConfig) -> dict:
    """Train one model and evaluate it; returns a JSON-able dict."""
    return run_group([task], pe, [seed], cfg)[0]


def _run_group_star(args):
    return run_group(*args)


# --------------------------------------------------------------------------------------- the study
def _geo_mean(xs: List[float]) -> float:
    return math.exp(sum(math.log(max(x, 1e-30)) for x in xs) / len(xs))


def _pearson(x: List[float], y: List[float]) -> float:
    n = len(x)
    if n < 3:
        return float("nan")
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def _spearman(x: List[float], y: List[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for k, i in enumerate(order):
            r[i] = float(k)
        return r
    return _pearson(ranks(x), ranks(y))


def summarise(runs: List[dict], cfg: StudyConfig) -> dict:
    groups: Dict[str, dict] = {}
    for task in cfg.tasks:
        for pe in cfg.pes:
            rs = [r for r in runs if r["task"] == task and r["pe"] == pe]
            if not rs:
                continue
            n = len(rs)
            per_len = lambda key: [sum(r[key][i] for r in rs) / n for i in range(cfg.test_max_len)]  # noqa: E731

            def ms(key):
                v = [r[key] for r in rs]
                m = sum(v) / n
                s = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1)) if n > 1 else 0.0
                return dict(mean=m, std=s, min=min(v), max=max(v), per_seed=v)

            groups[f"{task}/{pe}"] = dict(
                task=task, pe=pe, n_seeds=n,
                mse=per_len("mse"), rel_rmse=per_len("rel_rmse"),
                rel_long=ms("rel_long"), rel_in=ms("rel_in"),
                misalign=ms("misalign"), misalign_dist=ms("misalign_dist"), misalign_long=ms("misalign_long"),
                final_train_loss=ms("final_train_loss"),
            )

    claims = {}
    # 1. mean prediction generalises, length prediction does not
    if "mean" in cfg.tasks and "length" in cfg.tasks:
        per_pe = {}
        for pe in cfg.pes:
            gm, gl = groups.get(f"mean/{pe}"), groups.get(f"length/{pe}")
            if gm and gl:
                per_pe[pe] = dict(mean_rel_long=gm["rel_long"]["mean"], length_rel_long=gl["rel_long"]["mean"],
                                  ratio=gl["rel_long"]["mean"] / max(gm["rel_long"]["mean"], 1e-12),
                                  holds_every_seed=gl["rel_long"]["min"] > gm["rel_long"]["max"])
        claims["mean_generalises_length_does_not"] = per_pe
    # 2. each reparameterisation helps length prediction
    if "length" in cfg.tasks:
        rep = {}
        for task in cfg.tasks:
            if not task.startswith("length_"):
                continue
            rep[task] = {}
            for pe in cfg.pes:
                g0, g1 = groups.get(f"length/{pe}"), groups.get(f"{task}/{pe}")
                if g0 and g1:
                    rep[task][pe] = dict(base_rel_long=g0["rel_long"]["mean"], reparam_rel_long=g1["rel_long"]["mean"],
                                         helps=g1["rel_long"]["mean"] < g0["rel_long"]["mean"])
        claims["reparameterisation_helps"] = rep
    # 3. best PE per task (lowest long-length relative error, mean over seeds)
    best = {}
    for task in cfg.tasks:
        cands = [(groups[f"{task}/{pe}"]["rel_long"]["mean"], pe) for pe in cfg.pes if f"{task}/{pe}" in groups]
        if cands:
            best[task] = min(cands)[1]
    claims["best_pe"] = best
    # 4. misalignment vs long-length error across all trained models
    xs = [r["misalign"] for r in runs]
    xl = [r["misalign_long"] for r in runs]
    xd = [r["misalign_dist"] for r in runs]
    ys = [r["rel_long"] for r in runs]
    lg = lambda v: [math.log10(max(t, 1e-30)) for t in v]  # noqa: E731
    claims["misalignment_vs_error"] = dict(
        n_models=len(runs),
        spearman_in_range=_spearman(xs, ys), pearson_log_in_range=_pearson(lg(xs), lg(ys)),
        spearman_dist=_spearman(xd, ys), pearson_log_dist=_pearson(lg(xd), lg(ys)),
        spearman_long=_spearman(xl, ys), pearson_log_long=_pearson(lg(xl), lg(ys)),
    )
    return dict(groups=groups, claims=claims)


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


# ------------------------------------------------------------------------------------------ reporting
TASK_LABEL = {"mean": "mean", "length": "length", "length_sqrt": "length via √n",
              "length_log": "length via log n", "length_invsqrt": "length via 1/√n"}


def plot_results(res: dict, out_dir: str) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = res["config"]
    tasks, pes = cfg["tasks"], cfg["pes"]
    Ls = list(range(1, cfg["test_max_len"] + 1))
    colors = {"nope": "tab:blue", "rope": "tab:orange", "learned": "tab:green"}
    styles = {"length": "-", "length_sqrt": "--", "length_log": "-.", "length_invsqrt": ":"}
    paths = []

    # Figure 1: relative error vs length. Panel per task, one line per PE; last panel overlays reparams.
    n = len(tasks) + (1 if any(t.startswith("length") for t in tasks) else 0)
    ncol = min(3, n)
    nrow = (n + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.7 * nrow), sharey=True, squeeze=False)
    axes = list(axes.flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    axes = axes[:n]
    for ax, task in zip(axes, tasks):
        for pe in pes:
            g = res["groups"].get(f"{task}/{pe}")
            if g is None:
                continue
            per_seed = [r["rel_rmse"] for r in res["runs"] if r["task"] == task and r["pe"] == pe]
            lo = [min(v[i] for v in per_seed) for i in range(len(Ls))]
            hi = [max(v[i] for v in per_seed) for i in range(len(Ls))]
            ax.plot(Ls, g["rel_rmse"], color=colors[pe], label=pe)
            ax.fill_between(Ls, lo, hi, color=colors[pe], alpha=0.15, linewidth=0)
        ax.axvspan(cfg["train_min_len"], cfg["train_max_len"], color="red", alpha=0.07)
        ax.set_yscale("log")
        ax.set_title(TASK_LABEL.get(task, task))
        ax.set_xlabel("test length")
        ax.grid(alpha=0.3, which="both")
    for ax in axes[::ncol]:
        ax.set_ylabel("relative RMSE (seed mean; band min..max)")
    axes[0].legend(fontsize=8)
    if n > len(tasks):
        ax = axes[-1]
        for task in tasks:
            if not task.startswith("length"):
                continue
            for pe in pes:
                g = res["groups"].get(f"{task}/{pe}")
                if g is not None:
                    ax.plot(Ls, g["rel_rmse"], color=colors[pe], linestyle=styles[task],
                            label=f"{TASK_LABEL[task]}, {pe}")
        ax.axvspan(cfg["train_min_len"], cfg["train_max_len"], color="red", alpha=0.07)
        ax.set_yscale("log")
        ax.set_title("length: reparameterisations")
        ax.set_xlabel("test length")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6, ncol=1)
    fig.suptitle("Synthetic study (paper §3): train lengths 1–10 (shaded), test 1–50")
    fig.tight_layout()
    p = os.path.join(out_dir, "error_vs_length.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    # Figure 2: misalignment vs long-length error, one point per trained model.
    markers = {"mean": "o", "length": "s", "length_sqrt": "^", "length_log": "D", "length_invsqrt": "v"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, key, title in ((axes[0], "misalign", "per-sequence misalignment, lengths 5–10"),
                           (axes[1], "misalign_dist", "mean-output shift between lengths 5–10"),
                           (axes[2], "misalign_long", "per-sequence misalignment, lengths 25–50")):
        for r in res["runs"]:
            ax.scatter(max(r[key], 1e-8), r["rel_long"], color=colors[r["pe"]], marker=markers.get(r["task"], "o"),
                       s=30, alpha=0.8, edgecolor="k", linewidth=0.3)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"{key} (normalised by Var_train(target))")
        ax.set_ylabel(f"relative RMSE at lengths {LONG_RANGE[0]}–{LONG_RANGE[1]}")
        c = res["claims"]["misalignment_vs_error"]
        sp = c[{"misalign": "spearman_in_range", "misalign_dist": "spearman_dist", "misalign_long": "spearman_long"}[key]]
        ax.set_title(f"{title}\nSpearman ρ = {sp:.2f} over {c['n_models']} models", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], marker=markers[t], linestyle="", color="gray", label=TASK_LABEL[t]) for t in tasks]
    handles += [Line2D([], [], marker="o", linestyle="", color=colors[p], label=p) for p in pes]
    axes[2].legend(handles=handles, fontsize=7, loc="lower right")
    fig.tight_layout()
    p = os.path.join(out_dir, "misalignment_vs_error.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def markdown_table(res: dict) -> str:
    cfg = res["config"]
    lines = [
        f"Relative RMSE (mean ± std over {len(cfg['seeds'])} seeds) at training lengths "
        f"{cfg['train_min_len']}–{cfg['train_max_len']} and at test lengths {LONG_RANGE[0]}–{LONG_RANGE[1]}; "
        "misalignment = normalised long-short misalignment inside the training range.",
        "",
        "| task | PE | rel. error, lengths 1–10 | rel. error, lengths 30–50 | MSE at length 50 "
        "| misalign (5–10) | mean-output shift (5–10) | misalign (25–50) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, g in res["groups"].items():
        lines.append(
            f"| {TASK_LABEL.get(g['task'], g['task'])} | {g['pe']} "
            f"| {g['rel_in']['mean']:.3g} ± {g['rel_in']['std']:.2g} "
            f"| {g['rel_long']['mean']:.3g} ± {g['rel_long']['std']:.2g} "
            f"| {g['mse'][-1]:.3g} "
            f"| {g['misalign']['mean']:.3g} | {g['misalign_dist']['mean']:.3g} | {g['misalign_long']['mean']:.3g} |")
    cl = res["claims"]
    lines += ["", "Claims (paper §3) against this run:", ""]
    if "mean_generalises_length_does_not" in cl:
        for pe, c in cl["mean_generalises_length_does_not"].items():
            lines.append(f"- mean vs length, {pe}: length error / mean error at 30–50 = {c['ratio']:.1f}× "
                         f"({'holds on every seed' if c['holds_every_seed'] else 'NOT on every seed'})")
    for task, d in cl.get("reparameterisation_helps", {}).items():
        for pe, c in d.items():
            lines.append(f"- {TASK_LABEL[task]}, {pe}: {c['base_rel_long']:.3g} → {c['reparam_rel_long']:.3g} "
                         f"({'helps' if c['helps'] else 'does NOT help'})")
    for task, pe in cl.get("best_pe", {}).items():
        lines.append(f"- best PE for {TASK_LABEL[task]}: {pe}")
    m = cl["misalignment_vs_error"]
    lines.append(f"- misalignment vs error at 30–50 over {m['n_models']} models: Spearman "
                 f"{m['spearman_in_range']:.2f} (per-sequence, 5–10), {m['spearman_dist']:.2f} (mean-output shift, "
                 f"5–10), {m['spearman_long']:.2f} (per-sequence, 25–50)")
    return "\n".join(lines) + "\n"


def save_results(res: dict, out_dir: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"), "table": os.path.join(out_dir, "table.md")}
    with open(paths["json"], "w") as f:
        json.dump(res, f, indent=1)
    with open(paths["table"], "w") as f:
        f.write(markdown_table(res))
    try:
        paths["plots"] = plot_results(res, out_dir)
    except ImportError as e:  # pragma: no cover
        print(f"no plots: {e}", file=sys.stderr)
    return paths


# ------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lsa synthetic", description="Synthetic length-generalisation study "
                                 "(mean vs length prediction, paper §3) on CPU.")
    ap.add_argument("--quick", action="store_true", help="2 seeds, 200 steps (about a minute on 2 idle cores)")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; --quick 2)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per model (default 500; --quick 200)")
    ap.add_argument("--out", default="benchmarks/results/synthetic", help="output directory")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma list from {','.join(TASKS)}")
    ap.add_argument("--pe", default=",".join(PES), help=f"comma list from {','.join(PES)}")
    ap.add_argument("--workers", type=int, default=0, help="processes (default min(2, cpus))")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = StudyConfig.quick() if args.quick else StudyConfig()
    kw = dict(tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
              pes=tuple(p.strip() for p in args.pe.split(",") if p.strip()),
              workers=args.workers, progress=not args.no_progress)
    if args.seeds is not None:
        kw["seeds"] = tuple(range(args.seeds))
    if args.steps is not None:
        kw["steps"] = args.steps
    try:
        res = run_study(dataclasses.replace(cfg, **kw))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = save_results(res, args.out)
    print(markdown_table(res))
    print(f"wrote {paths['json']}, {paths['table']}" + (f", {', '.join(paths.get('plots', []))}"))
    print(f"{len(res['runs'])} models in {res['wall_seconds']:.0f} s on {res['workers']} worker(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
