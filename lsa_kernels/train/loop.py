r"""Long-context fine-tuning with long-short alignment: one readable loop (nanoGPT style).

    lsa train --alpha 0.1 --steps 300 --out runs/lsa
    lsa train --alpha 0   --steps 300 --out runs/ce                            # the plain-CE baseline
    lsa train --out runs/lsa --resume                                          # continue runs/lsa as it was
    torchrun --nproc_per_node 2 -m lsa_kernels.train.loop ...                  # DDP (gloo on CPU, nccl on GPU)
    torchrun --nproc_per_node 2 -m lsa_kernels.train.loop --fsdp ...           # FSDP2: everything sharded
    torchrun --nproc_per_node 2 -m lsa_kernels.train.loop --tensor-parallel 2  # LM head sharded over the vocab

Each step draws ``l_extra ~ U{1..l_train/2}`` and a batch of windows of ``l_train + l_extra + 1``
tokens; the model sees both views (long = first ``l_train`` tokens, short = last ``l_train``) in one
batched forward and the fused loss gives ``ce + alpha * misalign`` (docs/maths.md §4). ``alpha = 0`` takes the
plain CE path: the long view only (``--ce-views 2``: CE on both views, the same tokens as the
regularised run). Every run with the same seed sees the same windows in the same order, whatever its
alpha. The model is a small Llama built from a config (sized for a CPU), or any transformers causal LM
on disk (``--model PATH``: a model dir, a checkpoint dir or the ``--out`` dir of an earlier run).

Long-context fine-tuning as the paper runs it (context extension of a pretrained model on little memory):

    lsa train --model runs/base --rope-scaling linear --rope-factor 4 --l-train 256 \
        --lora 8 --grad-checkpointing --grad-accum 4 --dtype bf16 --alpha 0.1 --out runs/x4

``--rope-scaling/--rope-factor`` write the scaling into the model's config the way the installed
transformers expects (so ``from_pretrained`` on a checkpoint rebuilds the extended model); ``--lora``
trains a peft LoRA adapter with the base weights and the LM head frozen (the fused losses then compute no
dW), checkpoints hold the adapter and the merged model; ``--grad-checkpointing`` recomputes activations in
the backward (non-reentrant); ``--grad-accum K`` sums K micro-batches, each weighted by its share of the
step's valid targets, so a step equals one batch K times larger; ``--dtype bf16`` runs under autocast. For the longest contexts:
``--views sequential`` runs the two views one at a time (each recomputed in the backward: one view's
activations), ``--tiled-mlp`` / ``--tiled-norms`` run each MLP / norm over sequence tiles,
``--offload-activations`` (CUDA) keeps the saved activations in host memory (lsa_kernels/integrations/memory.py,
tiling.py).

Where things live: the options and their checks in config.py, the model (build, RoPE extension, LoRA,
checkpointing, dtype) in model.py, single process / DDP / FSDP / tensor parallelism in parallel.py (one
strategy object), checkpoints in checkpoint.py, data in data.py. This module is the step loop and the CLI.
Outputs in ``--out`` (docs/training.md, "Outputs"): ``config.json``, ``log.jsonl`` (one line per step),
``metrics.json`` (the last step's line, the weights' fingerprint ``param_sum`` and ``replicas_agree``),
``ckpt-NNNNNN/`` and ``latest``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import sys
import time
from typing import List, Optional

import torch

from ..integrations.hf import LongShortObjective, UnsupportedModel, output_head
from ..integrations.memory import check_sequential
from ..integrations.tiling import CannotTile, tile_mlp, tile_norms
from .checkpoint import ADAPTER_DIR, UnsafeCheckpoint, atomic_write_text, latest_checkpoint
from .config import ConfigError, TrainConfig, config_from_args, resume_changes, saved_config, validate
from .data import DataError, WindowSampler, load_corpus, load_tokenizer
from .model import (apply_lora, autocast_for, build_model, enable_grad_checkpointing, max_positions,
                    quiet_transformers, tokenizer_path, untie_embeddings)
from .parallel import init_distributed, strategy_for

__all__ = ["train", "train_main", "lr_at", "l_extra_at", "ce_views", "micro_batch_weights"]


# ------------------------------------------------------------------------------------------- schedule
def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def l_extra_at(cfg: TrainConfig, step: int) -> int:
    """``l_extra ~ U{1..l_train//2}`` for this step (the same on every rank). Drawn for every run, whatever its
    alpha, so that runs with the same seed see the same windows (the one-view CE run uses their long view)."""
    from ..pairing import sample_l_extra

    return sample_l_extra(cfg.l_train, torch.Generator().manual_seed(cfg.seed * 7919 + step))


def ce_views(cfg: TrainConfig) -> int:
    return cfg.ce_views or (1 if cfg.alpha == 0 else 2)


def micro_batch_weights(window: torch.Tensor, l_extra: int, views: int, positions: str, grad_accum: int):
    """Split a step's windows into ``grad_accum`` micro-batches and weight each by its share of the step's
    valid CE targets and of its valid pairs, so that ``sum_k w_k * mean_k`` is the mean over the whole step
    (the loss of one batch ``grad_accum`` times larger). Returns ``[(windows_k, w_ce_k, w_pair_k)]``.
    Windows cut from the corpus hold token ids only (no ignored targets), so the counts are the row counts."""
    chunks = window.chunk(grad_accum, dim=0)
    T = window.shape[1] - 1 - l_extra  # l_train
    n_ce = [c.shape[0] * T * views for c in chunks]
    n_pair = [c.shape[0] * (1 if positions == "last" else T - l_extra) for c in chunks]
    return [(c, a / sum(n_ce), b / sum(n_pair)) for c, a, b in zip(chunks, n_ce, n_pair)]


# ---------------------------------------------------------------------------------------------- train
def train(cfg: TrainConfig) -> dict:
    """Run ``cfg``; returns the final metrics (also written to ``<out>/metrics.json``)."""
    from tqdm import tqdm

    validate(cfg)
    quiet_transformers()
    rank, world, local_rank = init_distributed()
    device = torch.device(cfg.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    par = strategy_for(cfg, rank, world, device)
    torch.manual_seed(cfg.seed)

    # data + model; every check that can fail happens before anything is written to cfg.out
    tok_path = tokenizer_path(cfg)
    try:
        tok = load_tokenizer(tok_path)
        corpus = load_corpus(tok, "train", cfg.train_files or None)
        if cfg.data == "recall":
            from .recall_data import RecallSampler

            sampler = RecallSampler(corpus, tok, seed=cfg.seed, rank=par.data_rank)
        else:
            sampler = WindowSampler(corpus, seed=cfg.seed, rank=par.data_rank)
        sampler.check(cfg.l_train + cfg.l_train // 2 + 1)
    except DataError as e:
        raise ConfigError(str(e)) from None
    ckpt = latest_checkpoint(cfg.out) if cfg.resume else None
    # LoRA resumes from the base (extended as before) + the saved adapter; other runs from the checkpoint itself
    model = build_model(cfg, tok.vocab_size, device, path=None if cfg.lora else ckpt, rope=cfg.lora or not ckpt)
    npos = max_positions(model)
    if npos is not None and cfg.l_train > npos:
        how = "" if cfg.rope_scaling else " (extend them with --rope-scaling linear --rope-factor F)"
        raise ConfigError(f"--l-train {cfg.l_train} exceeds the model's {npos} positions{how}")
    if par.untie_reason is not None or cfg.untie_embeddings:
        untie_embeddings(model, cfg, ckpt, why=par.untie_reason or "", rank=rank)
    par.prepare_model(model)
    output_head(model)  # raises UnsupportedModel for heads we cannot express, before training starts
    peft_model = None
    if cfg.lora:
        peft_model = apply_lora(cfg, model, os.path.join(ckpt, ADAPTER_DIR) if ckpt else None)
        model = peft_model.get_base_model()  # the same modules, LoRA layers inside; what the objective runs
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(model)
    for flag, tiles, tile in (("--tiled-mlp", cfg.tiled_mlp, tile_mlp), ("--tiled-norms", cfg.tiled_norms, tile_norms)):
        if tiles:
            try:
                tile(model, None if tiles < 0 else tiles)
            except CannotTile as e:
                raise ConfigError(f"{flag}: {e}") from None
    amp = autocast_for(cfg, device)
    objective = LongShortObjective(
        model, divergence=cfg.divergence, backend=cfg.backend, temperature=cfg.temperature, detach=cfg.detach,
        positions=cfg.positions, ce_weighting=cfg.ce_weighting, longce_gamma=cfg.longce_gamma,
        views=cfg.views, offload=cfg.offload_activations, **par.loss_kwargs(),
    )
    if cfg.views == "sequential":
        try:
            check_sequential(model)
        except UnsupportedModel as e:
            msg = str(e).replace("views='sequential': ", "", 1).replace("views='joint'", "--views joint")
            raise ConfigError(f"--views sequential: {msg}") from None
    objective = par.wrap(objective, model)

    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda",
    )
    if ckpt:  # optimizer, RNG (rank 0's; the default model has no dropout)
        start = par.load_trainer_state(ckpt, opt, model)
    else:
        start = 0
        torch.manual_seed(par.init_seed)
    cfg_dict = dataclasses.asdict(cfg)
    # config.json describes the checkpoints: a fresh run writes it now; a resumed run keeps the run's own, and
    # with --override-on-resume rewrites it only once a checkpoint holds the changed configuration
    changes = resume_changes(cfg, saved_config(cfg.out)[0]) if ckpt else {}
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        if not ckpt:
            atomic_write_text(os.path.join(cfg.out, "config.json"), json.dumps(cfg_dict, indent=1))
        elif changes:
            print(f"lsa train: resuming {cfg.out} at step {start} with "
                  + ", ".join(f"--{k.replace('_', '-')} {json.dumps(v[0])} -> {json.dumps(v[1])}" for k, v in changes.items())
                  + " (--override-on-resume; recorded in log.jsonl)", file=sys.stderr)

    model.train()
    log = open(os.path.join(cfg.out, "log.jsonl"), "a") if rank == 0 else None
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=rank != 0 or cfg.quiet,
               dynamic_ncols=True, desc=f"alpha={cfg.alpha:g}")
    last = {}
    t0, tok_count = time.perf_counter(), 0
    views = ce_views(cfg)
    tok_file = tok_path if os.path.isfile(tok_path) else None
    for step in bar:
        l_extra = l_extra_at(cfg, step)
        window = sampler.windows(step, cfg.batch_size * cfg.grad_accum, cfg.l_train + l_extra + 1)
        window = window.to(device, non_blocking=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        opt.zero_grad(set_to_none=True)
        tot = [0.0, 0.0, 0.0]  # loss, ce, misalign of the whole step (tensors after the first micro-batch)
        for k, (win, w_ce, w_pair) in enumerate(micro_batch_weights(window, l_extra, views, cfg.positions, cfg.grad_accum)):
            with par.accumulating(objective, last=k == cfg.grad_accum - 1):
                with amp:
                    if views == 1:
                        out = objective(win[:, : cfg.l_train + 1], 0, 0.0)
                    else:
                        out = objective(win, l_extra, cfg.alpha, views=2)
                ce_k, mis_k = out.ce.float() * w_ce, out.misalign.float() * w_pair
                (ce_k + cfg.alpha * mis_k).backward()
            tot = [tot[0] + ce_k.detach() + cfg.alpha * mis_k.detach(), tot[1] + ce_k.detach(), tot[2] + mis_k.detach()]
        gnorm = par.clip_grad_norm(model, cfg.grad_clip) if cfg.grad_clip > 0 else None
        opt.step()

        tok_count += cfg.batch_size * cfg.grad_accum * cfg.l_train * views * par.data_replicas
        if rank == 0:
            dt = time.perf_counter() - t0
            last = {
                "step": step + 1, "loss": float(tot[0]), "ce": float(tot[1]), "misalign": float(tot[2]),
                "l_extra": l_extra, "lr": lr_at(cfg, step), "tok_s": tok_count / max(dt, 1e-9),
                "grad_norm": None if gnorm is None else float(gnorm),
            }
            if changes and step == start:  # the first step after a resume with overrides records them
                last["resume_overrides"] = changes
            bar.set_postfix(loss=f"{last['loss']:.3f}", ce=f"{last['ce']:.3f}", misalign=f"{last['misalign']:.3f}",
                            tok_s=f"{last['tok_s']:.0f}")
            log.write(json.dumps(last) + "\n")
            log.flush()  # a killed run keeps every finished step in its log
        stop = cfg.stop_after > 0 and step + 1 - start >= cfg.stop_after
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps or stop:
            par.save(cfg.out, step + 1, model, opt, cfg_dict, tok_file, adapter=peft_model)
            if changes and rank == 0:
                atomic_write_text(os.path.join(cfg.out, "config.json"), json.dumps(cfg_dict, indent=1))
                changes = {}
        if stop:
            break
    bar.close()
    # the weights' fingerprint (equal weights, equal sums: a resumed run reproduces the uninterrupted one's) and
    # whether the replicated weights stayed bit-identical across ranks; both collectives, on every rank
    last = dict(last, param_sum=par.param_sum(model), replicas_agree=par.replicas_agree(model))
    if rank == 0:
        log.close()
        if last.get("replicas_agree") is False:
            print("lsa train: warning: the replicated weights differ between ranks at the end of the run "
                  "(see replicas_agree in metrics.json)", file=sys.stderr)
        if "step" in last:
            atomic_write_text(os.path.join(cfg.out, "metrics.json"), json.dumps(last, indent=1))
    return last


# ------------------------------------------------------------------------------------------------ cli
def train_main(argv: Optional[List[str]] = None) -> int:
    """CLI entry: ``lsa train ...``. Returns 0 on success, 2 on a bad input (one line on stderr)."""
    ok = False
    try:
        try:
            cfg = config_from_args(argv, description=__doc__)
        except SystemExit as e:  # --help (0), or a flag argparse refused (2; its one line is on stderr already)
            return int(e.code or 0)
        train(cfg)
        ok = True
    except (ConfigError, UnsupportedModel, UnsafeCheckpoint, OSError) as e:
        print(f"lsa train: error: {e}", file=sys.stderr)
        return 2
    finally:
        _teardown(ok)
    return 0


def _teardown(ok: bool) -> None:
    """End torch.distributed cleanly: after a successful run every rank meets at a barrier (no rank closes
    its connections while a peer is still in a collective), the garbage holding the model's references to
    the group is collected, then the group is destroyed. A process group that outlives this is destroyed
    at interpreter exit, where gloo's threads abort the process ("terminate called without an active
    exception", seen once in CI)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if ok:
        torch.distributed.barrier()
    gc.collect()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(train_main())
