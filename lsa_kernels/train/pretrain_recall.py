"""Pretrain a small Llama from scratch with a recipe meant to make content-based copying (induction) form, and
track the copy-probe gap while it trains (the recall pilot, docs/recall_testbed.md).

    python -m lsa_kernels.train.pretrain_recall --recipe synth --steps 1200 --out run.json [--save DIR]

Recipes (fixed in benchmarks/results/recall_pilot/PROTOCOL.md before any run):

- ``text``: the demo's base recipe on Shakespeare windows of 256 tokens with recall structure written in
  (2 repeated rare spans and 2 facts per window); lr 2e-3, warmup 50, weight decay 0.1 on every matrix.
- ``synth``: dense copy windows of random rare tokens (:func:`~lsa_kernels.train.recall_data.copy_windows`),
  curriculum 64 -> 128 -> 256 tokens over equal thirds of the steps; lr 1e-3, warmup 100, weight decay 0.1
  on the block matrices only (none on embeddings and norms).
- ``synth-mha``: ``synth`` with 8 heads and 8 KV heads.
- ``synth64``: ``synth`` at 64 tokens throughout (the cheapest steps; added after ``synth`` and ``synth-mha``
  stayed on the loss plateau for 600 steps, to see whether more steps break it).
- ``mixed``: each step one ``synth`` batch (curriculum lengths) and one ``text`` batch, from scratch, with the
  ``synth`` optimiser settings and ``--heads``/``--kv-heads`` (default: the demo's 4 / 2).
- ``induction``: two phases: 60 % of the steps on :func:`~lsa_kernels.train.recall_data.repeat_windows` of 32
  tokens (batch ``--batch``, tokens from a fixed 512-token subset of the pool), then 64-token windows, half
  repeat windows over the whole pool, half text windows holding a repeated span or a fact.
- ``induction-untied``: ``induction`` with an untied head, a constant lr after warmup and no weight decay.
- ``induction-fullpool``: ``induction-untied``'s phase 1 only, over the whole pool.
- ``induction-phase2``: ``induction-untied``'s phase 2 only, from ``--init DIR`` (a model saved with ``--save``).
- ``induction-phase3``: phase 2 continued from ``--init DIR``, a quarter of the batch repeat windows over the
  rare pool, a quarter over the whole vocabulary, half text windows with a span or a fact; linear decay of the
  learning rate to 0.1 x over the last 20 % of the steps; the demo's gate (unextended, 64 windows per kind) at
  every probe (``gate_*`` columns of the probe curve).

The JSON written to ``--out`` holds the configuration, the loss curve, the copy-probe curve (gap at d in
{32, 96, 200} on held-out text filler and on random filler), training wall time / steps per second, and the
process's CPU seconds (probes included; a measure of cost that does not depend on the machine's load).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from typing import List, Optional

import torch
import torch.nn.functional as F

from .config import ConfigError, TrainConfig
from .data import DataError, load_corpus, load_tokenizer
from .recall_data import RecallWindows, copy_windows, fact_tokens, rare_pool, repeat_windows
from .recall_eval import copy_probe, copy_probe_windows, lm_logits_fn

__all__ = ["RECIPES", "build", "pretrain", "main"]

RECIPES = {
    "text": dict(lr=2e-3, warmup=50, decay_embeddings=True, synth=False, text=True, heads=4, kv_heads=2),
    "synth": dict(lr=1e-3, warmup=100, decay_embeddings=False, synth=True, text=False, heads=4, kv_heads=2),
    "synth-mha": dict(lr=1e-3, warmup=100, decay_embeddings=False, synth=True, text=False, heads=8, kv_heads=8),
    "mixed": dict(lr=1e-3, warmup=100, decay_embeddings=False, synth=True, text=True, heads=4, kv_heads=2),
    "synth64": dict(lr=1e-3, warmup=100, decay_embeddings=False, synth=True, text=False, heads=4, kv_heads=2,
                    curriculum=(64,)),
    # two phases: one repeated span per window of random pool tokens at 32 tokens, batch 64 (short windows:
    # attention at initialisation is spread over few positions, so the copy signal is strong), then the same
    # at 64 tokens mixed with text windows holding a repeated span and a fact, at the base's 64 positions
    # (phase 1 draws its tokens from a fixed 512-token subset of the pool: fewer, more frequent tokens)
    "induction": dict(lr=1e-3, warmup=100, decay_embeddings=False, synth=False, text=False, heads=4, kv_heads=2,
                      repeat=(32, 64), phase1=0.6, phase1_pool=512),
    # the toy setting in which induction formed (benchmarks/results/recall_pilot/PROTOCOL.md): untied head,
    # constant learning rate after warmup, no weight decay
    "induction-untied": dict(lr=1e-3, warmup=100, decay_embeddings=False, synth=False, text=False, heads=4,
                             kv_heads=2, repeat=(32, 64), phase1=0.6, phase1_pool=512, untied=True, constant_lr=True,
                             wd=0.0),
    # phase 1 only, over the whole pool (does induction form over the 2,038-token alphabet in this setting?)
    "induction-fullpool": dict(lr=1e-3, warmup=100, decay_embeddings=False, synth=False, text=False, heads=4,
                               kv_heads=2, repeat=(32, 64), phase1=1.0, phase1_pool=0, untied=True, constant_lr=True,
                               wd=0.0),
    # phase 2 only (use with --init: a model saved by induction-fullpool)
    "induction-phase2": dict(lr=1e-3, warmup=100, decay_embeddings=False, synth=False, text=False, heads=4,
                             kv_heads=2, repeat=(32, 64), phase1=0.0, phase1_pool=0, untied=True, constant_lr=True,
                             wd=0.0),
    # phase 2 continued (use with --init: a model saved by induction-phase2): a quarter of the batch repeat
    # windows over the rare pool, a quarter over the whole vocabulary (so copying also works on digits and common
    # tokens, which facts need), half text windows with a span or a fact; the learning rate decays linearly to
    # 0.1 x over the last 20 % of the steps; the gate (unextended) is measured at every probe
    "induction-phase3": dict(lr=1e-3, warmup=100, decay_embeddings=False, synth=False, text=False, heads=4,
                             kv_heads=2, repeat=(32, 64), phase1=0.0, phase1_pool=0, untied=True, constant_lr=True,
                             wd=0.0, vocab_repeat=True, decay_tail=0.2, gate_probe=True),
}
CURRICULUM = (64, 128, 256)
PROBE_DISTANCES = (32, 96, 200)
SHORT_PROBE_DISTANCES = (16, 40)  # inside a 64-token window


def build(heads: int, kv_heads: int, vocab_size: int, layers: int = 4, d_model: int = 128, ffn: int = 352,
          max_positions: int = 4096):
    """The demo-sized Llama (tied embeddings), with ``heads`` / ``kv_heads``."""
    from .model import build_model

    cfg = TrainConfig(n_layer=layers, n_embd=d_model, n_head=heads, n_kv_head=kv_heads, ffn=ffn,
                      max_positions=max_positions)
    return build_model(cfg, vocab_size, torch.device("cpu"))


def _optimizer(model, lr: float, decay_embeddings: bool, wd: float = 0.1):
    decay, no_decay = [], []
    emb = model.get_input_embeddings().weight
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or (p is emb and not decay_embeddings):
            no_decay.append(p)
        else:
            decay.append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _tail(step: int, steps: int, frac: float) -> float:
    """1 until the last ``frac`` of the steps, then linear down to 0.1 at the last step."""
    start = steps * (1.0 - frac)
    if frac <= 0 or step < start:
        return 1.0
    return 1.0 - 0.9 * (step - start) / max(1.0, steps - 1 - start)


def _ce(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def pretrain(recipe: str, steps: int, seed: int = 0, batch: int = 16, probe_every: int = 100, probe_n: int = 64,
             heads: Optional[int] = None, kv_heads: Optional[int] = None, log=print, save: Optional[str] = None,
             out: Optional[str] = None, lr: Optional[float] = None, layers: int = 4,
             max_positions: int = 4096, init: Optional[str] = None) -> dict:
    """Train ``recipe`` for ``steps`` steps; returns the run's record (and writes it to ``out`` after every probe,
    so a run stopped early leaves its curve so far, marked ``"complete": false``)."""
    if recipe not in RECIPES:
        raise ConfigError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    if steps < 1 or batch < 1 or probe_every < 1:
        raise ConfigError(f"--steps, --batch and --probe-every must be >= 1, got {steps}, {batch}, {probe_every}")
    r = dict(RECIPES[recipe])
    r["heads"] = heads or r["heads"]
    r["kv_heads"] = kv_heads or r["kv_heads"]
    if lr is not None:
        if not lr > 0:
            raise ConfigError(f"--lr must be > 0, got {lr}")
        r["lr"] = lr
    torch.manual_seed(seed)
    tok = load_tokenizer()
    train, test = load_corpus(tok, "train"), load_corpus(tok, "test")
    pool = rare_pool(train, tok.vocab_size, exclude=[tok.eos_id] + fact_tokens(tok)[1])
    model = build(r["heads"], r["kv_heads"], tok.vocab_size, layers=layers, max_positions=max_positions)
    if r.get("untied"):
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    if init:  # continue from a saved model of the same shape (its weights; a fresh optimizer)
        from safetensors.torch import load_file

        try:
            model.load_state_dict(load_file(os.path.join(init, "model.safetensors")), strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise ConfigError(f"--init {init!r} does not fit this recipe's model (--layers, untied head): {first}") from None
    opt = _optimizer(model, r["lr"], r["decay_embeddings"], wd=r.get("wd", 0.1))
    text_windows = RecallWindows(256, pool, seed=seed, corpus=train, tok=tok, n_spans=2, n_facts=2) if r["text"] else None
    if r.get("repeat"):
        pool1 = pool if not r["phase1_pool"] else \
            pool[torch.randperm(pool.numel(), generator=torch.Generator().manual_seed(seed))[: r["phase1_pool"]]]
        L2 = r["repeat"][1]
        # one item per window (a span and a fact together do not always fit in 64 tokens): half the text windows
        # hold a repeated span, half a fact
        bk = (("near", 12, L2 // 4), ("mid", L2 // 4 + 1, L2 - 20))
        text_windows = [RecallWindows(L2, pool, seed=seed, corpus=train, tok=tok, n_spans=1, n_facts=0, buckets=bk),
                        RecallWindows(L2, pool, seed=seed + 1, corpus=train, tok=tok, n_spans=0, n_facts=1, buckets=bk)]
    probes = {"text": copy_probe_windows(pool, PROBE_DISTANCES, n=probe_n, corpus=test),
              "random": copy_probe_windows(pool, PROBE_DISTANCES, n=probe_n, corpus=None),
              "text64": copy_probe_windows(pool, SHORT_PROBE_DISTANCES, n=probe_n, length=64, corpus=test)}
    g = torch.Generator().manual_seed(seed * 7 + 3)
    vocab = torch.tensor([i for i in range(tok.vocab_size) if i != tok.eos_id], dtype=torch.long)
    curve, losses = [], []
    train_s = 0.0

    def probe(step):
        model.eval()
        fn = lm_logits_fn(model)
        row = {"step": step, "train_s": round(train_s, 1), "cpu_s": round(time.process_time() - cpu0, 1)}
        for name, p in probes.items():
            for d, v in copy_probe(fn, p).items():
                row[f"{name}_gap_d{d}"] = round(v["gap"], 4)
                row[f"{name}_with_d{d}"] = round(v["loss_with"], 4)
        if r.get("gate_probe"):
            from .demo_recall import gate

            gt = gate(model, pool, test, tok, min(max_positions, 256), n=probe_n)
            for k in ("span", "fact"):
                row[f"gate_{k}_exact"] = round(gt["full"][f"{k}/all"]["exact"], 4)
                row[f"gate_{k}_token_acc"] = round(gt["full"][f"{k}/all"]["token_acc"], 4)
                row[f"gate_{k}_truncated_acc"] = round(gt["truncated"][f"{k}/all"]["token_acc"], 4)
        model.train()
        curve.append(row)
        log(f"step {step:5d}  {train_s:7.1f}s  {time.strftime('%H:%M:%S')}  gap text64 d16/40: {row['text64_gap_d16']:.2f} "
            f"{row['text64_gap_d40']:.2f}  text d32/96/200: {row['text_gap_d32']:.2f} "
            f"{row['text_gap_d96']:.2f} {row['text_gap_d200']:.2f}  random: {row['random_gap_d32']:.2f} "
            f"{row['random_gap_d96']:.2f} {row['random_gap_d200']:.2f}" + (
                f"  gate span/fact exact {row['gate_span_exact']:.2f}/{row['gate_fact_exact']:.2f} token acc "
                f"{row['gate_span_token_acc']:.2f}/{row['gate_fact_token_acc']:.2f}" if "gate_span_exact" in row else ""))

    def record(complete: bool) -> dict:
        final = curve[-1]
        done = final["step"]
        res = {
            "recipe": recipe, "complete": complete, "config": dict(
                r, layers=layers, d_model=128, ffn=352, batch=batch, max_positions=max_positions, init=init,
                curriculum=list(r.get("curriculum", CURRICULUM)) if r["synth"] else None,
                betas=[0.9, 0.95], grad_clip=1.0, schedule="linear warmup, cosine to 0.1"),
            "seed": seed, "steps": steps, "steps_done": done, "train_wall_s": round(train_s, 1),
            "steps_per_s": round(done / train_s, 3) if train_s > 0 else None, "wall_s": round(time.time() - t_start, 1),
            "cpu_s": round(time.process_time() - cpu0, 1),
            "pool_size": int(pool.numel()), "probe_n": probe_n, "probe_distances": list(PROBE_DISTANCES),
            "pass_criterion": "text_gap_d96 >= 1.0 nat", "passed": final["text_gap_d96"] >= 1.0,
            "final": final, "probe_curve": curve, "loss_curve": losses,
            "machine": {"cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                        "python": platform.python_version(), "nice": os.nice(0)},
        }
        if out:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(out + ".tmp", "w") as f:
                json.dump(res, f, indent=1)
            os.replace(out + ".tmp", out)
        return res

    t_start, cpu0 = time.time(), time.process_time()
    model.train()
    probe(0)
    record(False)
    for step in range(steps):
        t0 = time.perf_counter()
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(step, steps, r["lr"], r["warmup"]) if not r.get("constant_lr") else \
                r["lr"] * min(1.0, (step + 1) / r["warmup"]) * _tail(step, steps, r.get("decay_tail", 0.0))
        loss_row = {"step": step + 1}
        total = 0.0
        if r.get("repeat"):
            L1, L2 = r["repeat"]
            if step < r["phase1"] * steps:
                ls = _ce(model, repeat_windows(g, batch, L1, pool1)[0])
                total = total + ls
                loss_row["synth"], loss_row["L"] = round(ls.item(), 4), L1
            elif r.get("vocab_repeat"):
                nq = batch // 4
                ls = _ce(model, torch.cat([repeat_windows(g, nq, L2, pool)[0], repeat_windows(g, nq, L2, vocab)[0]]))
                nt = batch - 2 * nq
                lt = _ce(model, torch.cat([text_windows[0].batch(step, nt // 2).ids,
                                           text_windows[1].batch(step, nt - nt // 2).ids]))
                total = total + ls + lt
                loss_row["synth"], loss_row["text"], loss_row["L"] = round(ls.item(), 4), round(lt.item(), 4), L2
            else:
                ls = _ce(model, repeat_windows(g, batch // 2, L2, pool)[0])
                nt = batch - batch // 2
                lt = _ce(model, torch.cat([text_windows[0].batch(step, nt // 2).ids,
                                           text_windows[1].batch(step, nt - nt // 2).ids]))
                total = total + ls + lt
                loss_row["synth"], loss_row["text"], loss_row["L"] = round(ls.item(), 4), round(lt.item(), 4), L2
        if r["synth"]:
            cur = r.get("curriculum", CURRICULUM)
            L = cur[min(len(cur) - 1, step * len(cur) // steps)]
            ls = _ce(model, copy_windows(g, batch, L, pool))
            total = total + ls
            loss_row["synth"], loss_row["L"] = round(ls.item(), 4), L
        if r["text"]:
            lt = _ce(model, text_windows.batch(step, batch).ids)
            total = total + lt
            loss_row["text"] = round(lt.item(), 4)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        train_s += time.perf_counter() - t0
        losses.append(loss_row)
        if (step + 1) % probe_every == 0 or step + 1 == steps:
            probe(step + 1)
            record(step + 1 == steps)
    result = record(True)
    if save:
        model.save_pretrained(save)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    from .. import _cli_types as T
    from .. import _env

    ap = T.Parser(prog="python -m lsa_kernels.train.pretrain_recall", description=__doc__.split("\n\n")[0],
                  formatter_class=T.HelpFormatter)
    ap.add_argument("--recipe", required=True, choices=sorted(RECIPES))
    ap.add_argument("--steps", type=T.positive_int, required=True)
    ap.add_argument("--seed", type=T.nonneg_int, default=0)
    ap.add_argument("--batch", type=T.positive_int, default=16)
    ap.add_argument("--probe-every", type=T.positive_int, default=100)
    ap.add_argument("--probe-n", type=T.positive_int, default=64)
    ap.add_argument("--lr", type=T.positive_float, default=None, help="override the recipe's peak learning rate")
    ap.add_argument("--heads", type=T.positive_int, default=None)
    ap.add_argument("--kv-heads", type=T.positive_int, default=None)
    ap.add_argument("--layers", type=T.positive_int, default=4)
    ap.add_argument("--init", default=None, help="start from the weights of a model saved with --save (same shape)")
    ap.add_argument("--max-positions", type=T.positive_int, default=4096,
                    help="the model's max_position_embeddings (64 for a base that is then extended)")
    ap.add_argument("--threads", type=T.positive_int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", required=True, help="the run's JSON")
    ap.add_argument("--save", default=None, help="directory to save the trained model in (transformers format)")
    try:
        a = ap.parse_args(argv)
    except SystemExit as e:  # --help (0), or a flag argparse refused (2; its one line is on stderr already)
        return int(e.code or 0)
    _env.smoke_caps(a, "pretrain_recall", steps=2, batch=2, probe_every=1, probe_n=2)
    if a.init is not None and not os.path.isfile(os.path.join(a.init, "model.safetensors")):
        print(f"pretrain_recall: --init {a.init!r} holds no model.safetensors (a directory written by --save)",
              file=sys.stderr)
        return 2
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    from .model import quiet_transformers

    quiet_transformers()
    try:
        res = pretrain(a.recipe, a.steps, a.seed, a.batch, a.probe_every, a.probe_n, a.heads, a.kv_heads,
                       log=lambda s: print(s, flush=True), save=a.save, out=a.out, lr=a.lr, layers=a.layers,
                       max_positions=a.max_positions, init=a.init)
    except (ConfigError, DataError) as e:
        print(f"pretrain_recall: {e}", file=sys.stderr)
        return 2
    print(f"{a.recipe}: {a.steps} steps in {res['train_wall_s']} s ({res['steps_per_s']} steps/s); final gap at d=96 "
          f"(text filler) {res['final']['text_gap_d96']:.3f} nats -> {'PASS' if res['passed'] else 'FAIL'} (>= 1 nat)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
