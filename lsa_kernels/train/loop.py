"""Long-context fine-tuning with long-short alignment: one readable loop (nanoGPT style).

    python -m lsa_kernels.train.loop --alpha 0.1 --steps 300 --out runs/lsa
    python -m lsa_kernels.train.loop --alpha 0   --steps 300 --out runs/ce       # the plain-CE baseline
    torchrun --nproc_per_node 2 -m lsa_kernels.train.loop ...                      # DDP (gloo on CPU, nccl on GPU)
    torchrun --nproc_per_node 2 -m lsa_kernels.train.loop --fsdp ...               # FSDP2: everything sharded
    torchrun --nproc_per_node 2 -m lsa_kernels.train.loop --tensor-parallel 2 ...  # LM head sharded over the vocab

Each step draws ``l_extra ~ U{1..l_train/2}`` and a batch of windows of ``l_train + l_extra + 1``
tokens; the model sees both views (long = first ``l_train`` tokens, short = last ``l_train``) in one
batched forward and the fused loss gives ``ce + alpha * misalign`` (SPEC §4). ``alpha = 0`` takes the
plain CE path: one view of ``l_train + 1`` tokens. The model is a small Llama built from a config
(sized for a CPU), or any transformers causal LM on disk (``--model PATH``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch


@dataclass
class TrainConfig:
    # model: "" = a small Llama from LlamaConfig (fields below); else a transformers model dir on disk
    model: str = ""
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_kv_head: int = 2
    ffn: int = 352
    max_positions: int = 4096  # room to evaluate at 8x l_train without any RoPE change
    # data: "" = the shipped Shakespeare corpus / tokenizer
    tokenizer: str = ""
    train_files: List[str] = field(default_factory=list)
    # objective (SPEC §4)
    l_train: int = 128
    alpha: float = 0.1
    divergence: str = "sce"
    temperature: float = 1.0
    detach: Optional[str] = None
    positions: str = "overlap"
    backend: str = "auto"
    # parallelism: N > 1 shards the LM head over the vocabulary across N processes (torchrun, world = N);
    # it unties the embeddings (as --untie-embeddings does); see tensor_parallel.py
    tensor_parallel: int = 1
    untie_embeddings: bool = False
    # FSDP2 (fully_shard) instead of DDP under torchrun: parameters, gradients and optimizer state sharded
    fsdp: bool = False
    # optimisation
    steps: int = 300
    batch_size: int = 8
    lr: float = 2e-3
    min_lr_frac: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    # io
    out: str = "runs/train"
    resume: bool = False
    ckpt_every: int = 100
    stop_after: int = 0  # stop (after checkpointing) once this many steps ran in this process; 0 = never
    device: str = ""  # "" = cuda if available else cpu
    quiet: bool = False


class ConfigError(ValueError):
    """A bad flag / input, reported as one line and a non-zero exit; nothing is written to --out."""


# ----------------------------------------------------------------------------------------------- setup
def _dist():
    """(rank, world, local_rank); initialises torch.distributed under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    if world > 1:
        return torch.distributed.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def validate(cfg: TrainConfig) -> None:
    if not (isinstance(cfg.alpha, (int, float)) and math.isfinite(cfg.alpha) and cfg.alpha >= 0):
        raise ConfigError(f"--alpha must be a finite number >= 0, got {cfg.alpha}")
    if cfg.l_train < 4:
        raise ConfigError(f"--l-train must be >= 4, got {cfg.l_train}")
    for name in ("steps", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.lr > 0:
        raise ConfigError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.tensor_parallel < 1:
        raise ConfigError(f"--tensor-parallel must be >= 1, got {cfg.tensor_parallel}")
    if cfg.fsdp and cfg.tensor_parallel > 1:
        raise ConfigError("--fsdp and --tensor-parallel cannot be combined (choose one way to split the model)")
    if cfg.fsdp and "WORLD_SIZE" not in os.environ:
        raise ConfigError("--fsdp shards the model over the processes of a torchrun launch: run it as "
                          "torchrun --nproc_per_node N -m lsa_kernels.train.loop --fsdp ...")
    if cfg.tensor_parallel > 1:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != cfg.tensor_parallel:
            raise ConfigError(
                f"--tensor-parallel {cfg.tensor_parallel} shards the LM head over exactly {cfg.tensor_parallel} "
                f"processes, but the world size is {world}: launch with torchrun --nproc_per_node "
                f"{cfg.tensor_parallel} (tensor parallelism combined with data parallelism is not supported)"
            )
        if cfg.backend == "reference":
            raise ConfigError("--tensor-parallel needs a fused backend (--backend auto, cpu or triton), not reference")
    if cfg.model and not os.path.isfile(os.path.join(cfg.model, "config.json")):
        raise ConfigError(f"--model {cfg.model!r}: no transformers model there (expected a directory with config.json)")
    if cfg.tokenizer and not os.path.exists(cfg.tokenizer):
        raise ConfigError(f"--tokenizer {cfg.tokenizer!r} does not exist")
    for p in cfg.train_files:
        if not os.path.isfile(p):
            raise ConfigError(f"--train-files: {p!r} does not exist")
    if cfg.resume:
        from .checkpoint import latest_checkpoint

        if latest_checkpoint(cfg.out) is None:
            raise ConfigError(f"--resume: no checkpoint in {cfg.out!r}")
    elif os.path.exists(os.path.join(cfg.out, "latest")):
        raise ConfigError(f"{cfg.out!r} already holds a run: pass --resume to continue it or choose another --out")


def tokenizer_path(cfg: TrainConfig) -> str:
    from .data import DEFAULT_TOKENIZER

    if cfg.tokenizer:
        return cfg.tokenizer
    if cfg.model:
        if os.path.isfile(os.path.join(cfg.model, "tokenizer.json")) and not os.path.isfile(
            os.path.join(cfg.model, "tokenizer_config.json")
        ):
            return os.path.join(cfg.model, "tokenizer.json")
        if os.path.isfile(os.path.join(cfg.model, "tokenizer_config.json")):
            return cfg.model
    return DEFAULT_TOKENIZER


def build_model(cfg: TrainConfig, vocab_size: int, device: torch.device, path: Optional[str] = None):
    """The small default Llama (from config), or the transformers model at ``path or cfg.model``."""
    from transformers import LlamaConfig

    from ..integrations.hf import load_causal_lm

    path = path or cfg.model
    if path:
        model = load_causal_lm(path, device=device, dtype=torch.float32)
    else:
        mc = LlamaConfig(
            vocab_size=vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.ffn, num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, max_position_embeddings=cfg.max_positions,
            tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )
        model = load_causal_lm(mc, device=device, dtype=torch.float32)
    if getattr(model.config, "vocab_size", vocab_size) < vocab_size:
        raise ConfigError(f"the tokenizer has {vocab_size} tokens but the model's vocabulary only {model.config.vocab_size}")
    return model


def max_positions(model) -> Optional[int]:
    c = model.config
    for k in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(c, k, None)
        if isinstance(v, int):
            return v
    return None


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:
        pass


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def l_extra_at(cfg: TrainConfig, step: int) -> int:
    """``l_extra ~ U{1..l_train//2}`` for this step (the same on every rank); 0 on the CE path."""
    from ..pairing import sample_l_extra

    if cfg.alpha == 0:
        return 0
    return sample_l_extra(cfg.l_train, torch.Generator().manual_seed(cfg.seed * 7919 + step))


# ------------------------------------------------------------------------------------------------ train
def train(cfg: TrainConfig) -> dict:
    """Run ``cfg``; returns the final metrics (also written to ``<out>/metrics.json``)."""
    from tqdm import tqdm

    from ..integrations.hf import LongShortObjective, output_head
    from . import fsdp as FSDP
    from . import tensor_parallel as TP
    from .checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
    from .data import DataError, WindowSampler, load_corpus, load_tokenizer

    validate(cfg)
    _quiet_transformers()
    rank, world, local_rank = _dist()
    tp = cfg.tensor_parallel > 1  # validate() made sure world == tensor_parallel
    device = torch.device(cfg.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)

    # data + model; every check that can fail happens before anything is written to cfg.out
    tok_path = tokenizer_path(cfg)
    try:
        tok = load_tokenizer(tok_path)
        corpus = load_corpus(tok, "train", cfg.train_files or None)
        sampler = WindowSampler(corpus, seed=cfg.seed, rank=0 if tp else rank)  # TP: every rank, the same batch
        sampler.check(cfg.l_train + (cfg.l_train // 2 if cfg.alpha > 0 else 0) + 1)
    except DataError as e:
        raise ConfigError(str(e)) from None
    ckpt = latest_checkpoint(cfg.out) if cfg.resume else None
    model = build_model(cfg, tok.vocab_size, device, path=ckpt)
    npos = max_positions(model)
    if npos is not None and cfg.l_train > npos:
        raise ConfigError(f"--l-train {cfg.l_train} exceeds the model's {npos} positions (max_position_embeddings)")
    shard = None
    if tp or cfg.untie_embeddings:
        if TP.is_tied(model):
            if ckpt:
                raise ConfigError(f"--resume: {ckpt!r} was trained with tied embeddings; --tensor-parallel / "
                                  f"--untie-embeddings need untied ones: start a new run with --model {ckpt}")
            TP.untie_embeddings(model)
            if rank == 0:  # printed even with --quiet: the saved model differs in structure from the input
                print("lsa train: untying the input and output embeddings (the head starts as a copy of the "
                      f"embedding matrix){' so that the head can be sharded over the vocabulary' if tp else ''}",
                      file=sys.stderr)
        if tp:
            shard = TP.shard_head(model)  # this rank's rows of the head replace the output embedding
    output_head(model)  # raises UnsupportedModel for heads we cannot express, before training starts

    objective = LongShortObjective(
        model, divergence=cfg.divergence, backend=cfg.backend, temperature=cfg.temperature, detach=cfg.detach,
        positions=cfg.positions, **(shard.loss_kw() if tp else {}),
    )
    if cfg.fsdp:  # before the optimizer: it must see the sharded (DTensor) parameters
        try:
            FSDP.shard(objective, model, device)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    elif world > 1 and not tp:
        objective = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None
        )

    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda",
    )
    if ckpt:  # optimizer, RNG (rank 0's; the default model has no dropout)
        if cfg.fsdp:
            start = load_trainer_state(ckpt, opt, loader=lambda sd: FSDP.load_optimizer_state(model, opt, sd))
        else:
            start = load_trainer_state(ckpt, opt, transform=lambda sd: TP.slice_optimizer_state(sd, model, opt, shard))
    else:
        start = 0
        torch.manual_seed(cfg.seed + (0 if tp else rank))  # TP: the replicated decoder needs the same RNG
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    cfg_dict = dataclasses.asdict(cfg)
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(cfg_dict, f, indent=1)

    model.train()
    log = open(os.path.join(cfg.out, "log.jsonl"), "a") if rank == 0 else None
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=rank != 0 or cfg.quiet,
               dynamic_ncols=True, desc=f"alpha={cfg.alpha:g}")
    last = {}
    t0, tok_count = time.perf_counter(), 0
    for step in bar:
        l_extra = l_extra_at(cfg, step)
        window = sampler.windows(step, cfg.batch_size, cfg.l_train + l_extra + 1).to(device, non_blocking=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        with amp:
            out = objective(window, l_extra, cfg.alpha)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if cfg.grad_clip <= 0:
            gnorm = None
        elif tp:  # the head's part of the norm is spread over the ranks
            gnorm = TP.clip_grad_norm_(model, cfg.grad_clip, shard)
        else:  # a DTensor under FSDP (the norm over all shards): full_tensor() makes it a plain scalar
            gnorm = FSDP.full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        opt.step()

        tok_count += cfg.batch_size * cfg.l_train * (2 if cfg.alpha > 0 else 1) * (1 if tp else world)
        if rank == 0:
            dt = time.perf_counter() - t0
            last = {
                "step": step + 1, "loss": out.loss.item(), "ce": out.ce.item(), "misalign": out.misalign.item(),
                "l_extra": l_extra, "lr": lr_at(cfg, step), "tok_s": tok_count / max(dt, 1e-9),
                "grad_norm": None if gnorm is None else float(gnorm),
            }
            bar.set_postfix(loss=f"{last['loss']:.3f}", ce=f"{last['ce']:.3f}", misalign=f"{last['misalign']:.3f}",
                            tok_s=f"{last['tok_s']:.0f}")
            log.write(json.dumps(last) + "\n")
            log.flush()  # a killed run keeps every finished step in its log
        stop = cfg.stop_after > 0 and step + 1 - start >= cfg.stop_after
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps or stop:
            tok_file = tok_path if os.path.isfile(tok_path) else None
            if tp:  # the full head and its optimizer state, gathered to rank 0: a plain untied checkpoint
                full_head, full_opt = TP.full_checkpoint_state(model, opt, shard)
                if rank == 0:
                    with TP.swapped_head(model, full_head):
                        save_checkpoint(cfg.out, step + 1, model, full_opt, cfg_dict, tok_file)
                del full_head, full_opt
            elif cfg.fsdp:  # the full weights and optimizer state, gathered to rank 0: a plain checkpoint
                full_sd, full_opt = FSDP.full_model_state(model), FSDP.full_optimizer_state(model, opt)
                if rank == 0:
                    save_checkpoint(cfg.out, step + 1, model, full_opt, cfg_dict, tok_file, state_dict=full_sd)
                del full_sd, full_opt
            elif rank == 0:
                save_checkpoint(cfg.out, step + 1, model, opt, cfg_dict, tok_file)
            if world > 1:
                torch.distributed.barrier()
        if stop:
            break
    bar.close()
    with torch.no_grad():  # a cheap fingerprint of the weights (tests compare it across ranks / resumes)
        if tp:
            psum = TP.param_sum(model, shard)
        elif cfg.fsdp:
            psum = FSDP.param_sum(model)
        else:
            psum = float(sum(p.double().sum() for p in model.parameters()))
        last = dict(last, param_sum=psum)
    if world > 1:  # every rank records its fingerprint: DDP keeps them identical
        with open(os.path.join(cfg.out, f"param_sum.rank{rank}"), "w") as f:
            f.write(repr(last["param_sum"]))
        if tp:  # the replicated weights (all but the head shard) must be bit-identical across ranks
            with open(os.path.join(cfg.out, f"replicated_sha256.rank{rank}"), "w") as f:
                f.write(TP.replicated_digest(model))
    if rank == 0:
        log.close()
        if last:
            from .checkpoint import atomic_write_text

            atomic_write_text(os.path.join(cfg.out, "metrics.json"), json.dumps(last, indent=1))
    return last


# -------------------------------------------------------------------------------------------------- cli
def _parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    ap = argparse.ArgumentParser(prog="lsa train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=d.model, help="transformers model dir (default: a small Llama from config)")
    ap.add_argument("--tokenizer", default=d.tokenizer, help="tokenizer.json or tokenizer dir (default: shipped BPE)")
    ap.add_argument("--train-files", nargs="*", default=[], help="text files, one document each (default: shipped corpus)")
    ap.add_argument("--l-train", type=int, default=d.l_train)
    ap.add_argument("--alpha", type=float, default=d.alpha, help="weight of the misalignment term; 0 = plain CE")
    ap.add_argument("--divergence", default=d.divergence, choices=["sce", "sym_kl", "kl", "kl_reverse", "js"])
    ap.add_argument("--temperature", type=float, default=d.temperature)
    ap.add_argument("--detach", default=d.detach, choices=[None, "long", "short"])
    ap.add_argument("--positions", default=d.positions, choices=["overlap", "last"])
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per step per process")
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--warmup", type=int, default=d.warmup)
    ap.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max global gradient norm; 0 = no clipping")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--out", default=d.out)
    ap.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    ap.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    ap.add_argument("--stop-after", type=int, default=d.stop_after, help="stop after N steps in this process (resumable)")
    ap.add_argument("--backend", default=d.backend, choices=["auto", "cpu", "triton", "reference"])
    ap.add_argument("--device", default=d.device)
    ap.add_argument("--tensor-parallel", type=int, default=d.tensor_parallel,
                    help="shard the LM head over the vocabulary across N processes (torchrun --nproc_per_node N)")
    ap.add_argument("--fsdp", action="store_true",
                    help="under torchrun: shard parameters, gradients and optimizer state with FSDP2 instead of DDP")
    ap.add_argument("--untie-embeddings", action="store_true",
                    help="give the LM head its own copy of tied input embeddings (implied by --tensor-parallel > 1)")
    ap.add_argument("--n-layer", type=int, default=d.n_layer)
    ap.add_argument("--n-embd", type=int, default=d.n_embd)
    ap.add_argument("--n-head", type=int, default=d.n_head)
    ap.add_argument("--n-kv-head", type=int, default=d.n_kv_head)
    ap.add_argument("--ffn", type=int, default=d.ffn)
    ap.add_argument("--max-positions", type=int, default=d.max_positions)
    ap.add_argument("--quiet", action="store_true")
    return ap


def config_from_args(argv=None) -> TrainConfig:
    a = vars(_parser().parse_args(argv))
    return TrainConfig(**{k: v for k, v in a.items()})


def train_main(argv: Optional[List[str]] = None) -> int:
    """CLI entry: ``lsa train ...``. Returns 0 on success, 2 on a bad input (one line on stderr)."""
    from ..integrations.hf import UnsupportedModel

    ok = False
    try:
        cfg = config_from_args(argv)
        train(cfg)
        ok = True
    except (ConfigError, UnsupportedModel, FileNotFoundError) as e:
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
