"""Long-context fine-tuning with long-short alignment: one readable loop (nanoGPT style).

    python -m lsa_kernels.train.loop --alpha 0.1 --steps 300 --out runs/lsa
    python -m lsa_kernels.train.loop --alpha 0   --steps 300 --out runs/ce       # the plain-CE baseline
    torchrun --nproc_per_node 2 -m lsa_kernels.train.loop ...                      # DDP (gloo on CPU, nccl on GPU)
    torchrun --nproc_per_node 2 -m lsa_kernels.train.loop --fsdp ...               # FSDP2: everything sharded
    torchrun --nproc_per_node 2 -m lsa_kernels.train.loop --tensor-parallel 2 ...  # LM head sharded over the vocab

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
step's valid targets, so a step equals one batch K times larger; ``--dtype bf16`` runs under autocast.
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
    # objective (docs/maths.md §4)
    l_train: int = 128
    alpha: float = 0.1
    divergence: str = "sce"
    temperature: float = 1.0
    detach: Optional[str] = None
    positions: str = "overlap"
    backend: str = "auto"
    # CE on one view (the long one) or both; 0 = 1 when alpha == 0, else 2 (the long-short loss)
    ce_views: int = 0
    # context extension of a RoPE model (--model): "" = none, else one of ROPE_TYPES, with factor >= 1
    rope_scaling: str = ""
    rope_factor: float = 1.0
    # memory levers
    grad_checkpointing: bool = False
    lora: int = 0  # LoRA rank; 0 = full fine-tuning
    lora_alpha: float = 0.0  # 0 = 2 * rank
    lora_dropout: float = 0.0
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"
    lora_trainable: str = ""  # also train (fully) these, LongLoRA-style: comma list of "embed", "norm"
    grad_accum: int = 1
    dtype: str = "auto"  # "fp32", "bf16" (autocast), "auto" = bf16 on CUDA, fp32 on CPU
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
    if cfg.model and model_dir(cfg.model) is None:
        raise ConfigError(f"--model {cfg.model!r}: no transformers model there (expected a directory with config.json, "
                          "a checkpoint dir or the --out dir of an earlier run)")
    if cfg.ce_views not in (0, 1, 2):
        raise ConfigError(f"--ce-views must be 0 (auto), 1 or 2, got {cfg.ce_views}")
    if cfg.ce_views == 1 and cfg.alpha > 0:
        raise ConfigError("--ce-views 1 needs --alpha 0 (the long-short loss trains CE on both views)")
    if cfg.rope_scaling and cfg.rope_scaling not in ROPE_TYPES:
        raise ConfigError(f"--rope-scaling {cfg.rope_scaling!r} is not supported; choose one of {', '.join(ROPE_TYPES)}")
    if not (isinstance(cfg.rope_factor, (int, float)) and math.isfinite(cfg.rope_factor) and cfg.rope_factor >= 1):
        raise ConfigError(f"--rope-factor must be a number >= 1 (the context extension ratio), got {cfg.rope_factor}")
    if cfg.rope_factor != 1 and not cfg.rope_scaling:
        raise ConfigError("--rope-factor needs --rope-scaling (linear, dynamic, yarn or llama3)")
    if cfg.rope_scaling and (cfg.tensor_parallel > 1 or cfg.fsdp):
        raise ConfigError("--rope-scaling is supported on one process or DDP, not with --tensor-parallel / --fsdp")
    if cfg.lora < 0:
        raise ConfigError(f"--lora must be a rank >= 1 (or 0 for full fine-tuning), got {cfg.lora}")
    if cfg.lora and (cfg.tensor_parallel > 1 or cfg.fsdp):
        raise ConfigError("--lora is supported on one process or DDP, not with --tensor-parallel / --fsdp")
    if cfg.lora_alpha < 0 or not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"--lora-alpha must be >= 0 and --lora-dropout in [0, 1), got {cfg.lora_alpha}, {cfg.lora_dropout}")
    bad = [t for t in _csv(cfg.lora_trainable) if t not in ("embed", "norm")]
    if bad:
        raise ConfigError(f"--lora-trainable takes a comma list of embed, norm; got {', '.join(bad)}")
    if cfg.lora_trainable and not cfg.lora:
        raise ConfigError("--lora-trainable needs --lora R (without LoRA every weight is trained already)")
    if cfg.grad_accum < 1:
        raise ConfigError(f"--grad-accum must be >= 1, got {cfg.grad_accum}")
    if cfg.dtype not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"--dtype must be auto, fp32 or bf16, got {cfg.dtype!r}")
    if cfg.tokenizer and not os.path.exists(cfg.tokenizer):
        raise ConfigError(f"--tokenizer {cfg.tokenizer!r} does not exist")
    for p in cfg.train_files:
        if not os.path.isfile(p):
            raise ConfigError(f"--train-files: {p!r} does not exist")
    if cfg.resume:
        from .checkpoint import ADAPTER_DIR, latest_checkpoint

        ckpt = latest_checkpoint(cfg.out)
        if ckpt is None:
            raise ConfigError(f"--resume: no checkpoint in {cfg.out!r}")
        if cfg.lora and not os.path.isfile(os.path.join(ckpt, ADAPTER_DIR, "adapter_config.json")):
            raise ConfigError(f"--resume --lora: {ckpt!r} holds no LoRA adapter ({ADAPTER_DIR}/adapter_config.json); "
                              "it was not written by a --lora run")
        if cfg.lora and not cfg.model:
            raise ConfigError("--resume --lora needs --model: the base model the adapter was trained on")
    elif os.path.exists(os.path.join(cfg.out, "latest")):
        raise ConfigError(f"{cfg.out!r} already holds a run: pass --resume to continue it or choose another --out")


def tokenizer_path(cfg: TrainConfig) -> str:
    from .data import DEFAULT_TOKENIZER

    if cfg.tokenizer:
        return cfg.tokenizer
    mdir = model_dir(cfg.model) if cfg.model else None
    if mdir:
        if os.path.isfile(os.path.join(mdir, "tokenizer.json")) and not os.path.isfile(
            os.path.join(mdir, "tokenizer_config.json")
        ):
            return os.path.join(mdir, "tokenizer.json")
        if os.path.isfile(os.path.join(mdir, "tokenizer_config.json")):
            return mdir
    return DEFAULT_TOKENIZER


ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")


def _csv(text: str) -> List[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def model_dir(path: str) -> Optional[str]:
    """The transformers model dir behind ``path``: itself, or the latest checkpoint of a run's ``--out`` dir."""
    from .checkpoint import latest_checkpoint

    if os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, "latest")):
        return path
    ckpt = latest_checkpoint(path) if os.path.isdir(path) else None
    return ckpt if ckpt and os.path.isfile(os.path.join(ckpt, "config.json")) else None


def _rope_dict(config) -> tuple:
    """(attribute name, the model's RoPE parameters) — ``rope_parameters`` (transformers >= 5) or the older
    ``rope_scaling`` + ``rope_theta``; raises ConfigError for a model without (a single, global) RoPE."""
    name = type(config).__name__
    if hasattr(config, "rope_parameters"):
        rp = config.rope_parameters
        if not isinstance(rp, dict) or not rp or "rope_theta" not in rp:
            raise ConfigError(f"--rope-scaling: the model ({config.model_type}, {name}) has no rotary position "
                              "embeddings (no rope_parameters in its config); only RoPE models can be extended this way")
        if any(isinstance(v, dict) for v in rp.values()):
            raise ConfigError(f"--rope-scaling: {config.model_type} has per-layer RoPE parameters; extending those "
                              "is not supported")
        return "rope_parameters", dict(rp)
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        raise ConfigError(f"--rope-scaling: the model ({config.model_type}, {name}) has no rotary position embeddings "
                          "(no rope_theta in its config); only RoPE models can be extended this way")
    rs = dict(getattr(config, "rope_scaling", None) or {})
    rs.setdefault("rope_type", rs.get("type", "default"))
    return "rope_scaling", rs


def extend_rope(config, rope_type: str, factor: float):
    """Write a ``rope_type`` context extension by ``factor`` into a transformers ``config`` (in place; returned).

    linear (position interpolation), yarn and llama3 scale the positions the model was trained on,
    ``n0 = max_position_embeddings``, to ``n0 * factor`` (and record ``original_max_position_embeddings = n0``);
    dynamic (NTK) keeps ``max_position_embeddings = n0`` (transformers rescales the base past it) and allows
    ``n0 * factor`` positions here (:func:`max_positions`). A model that is already scaled is refused."""
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"--rope-scaling {rope_type!r} is not supported; choose one of {', '.join(ROPE_TYPES)}")
    if not factor >= 1:
        raise ConfigError(f"--rope-factor must be >= 1, got {factor}")
    attr, rp = _rope_dict(config)
    if rp.get("rope_type", "default") != "default":
        raise ConfigError(f"--rope-scaling: the model is already extended ({rp.get('rope_type')}, factor "
                          f"{rp.get('factor')}); extending it again is not supported: start from its base model")
    n0 = getattr(config, "max_position_embeddings", None)
    if not isinstance(n0, int):
        raise ConfigError(f"--rope-scaling: {config.model_type} has no max_position_embeddings to extend")
    new = {k: rp[k] for k in ("rope_theta", "partial_rotary_factor") if k in rp}
    new.update(rope_type=rope_type, factor=float(factor))
    if rope_type in ("yarn", "llama3"):
        new["original_max_position_embeddings"] = n0
    if rope_type == "llama3":
        new.update(low_freq_factor=1.0, high_freq_factor=4.0)
    if attr == "rope_parameters":
        config.rope_parameters = new
    else:  # transformers 4.x: rope_theta stays a top-level field
        new.pop("rope_theta", None)
        config.rope_scaling = new
    if rope_type != "dynamic":
        config.max_position_embeddings = int(round(n0 * factor))
    if hasattr(config, "validate_rope"):
        config.validate_rope()
    return config


def build_model(cfg: TrainConfig, vocab_size: int, device: torch.device, path: Optional[str] = None,
                rope: bool = True):
    """The small default Llama (from config), or the transformers model at ``path or cfg.model``, with
    ``cfg``'s RoPE extension applied when ``rope`` (not for a checkpoint of this run: it has it already)."""
    from transformers import AutoConfig, LlamaConfig

    from ..integrations.hf import load_causal_lm

    path = path or (model_dir(cfg.model) if cfg.model else None)
    if path:
        mc = None
        if rope and cfg.rope_scaling:
            mc = extend_rope(AutoConfig.from_pretrained(path, local_files_only=True), cfg.rope_scaling, cfg.rope_factor)
        model = load_causal_lm(path, device=device, dtype=torch.float32, config=mc)
    else:
        mc = LlamaConfig(
            vocab_size=vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.ffn, num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, max_position_embeddings=cfg.max_positions,
            tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )
        if rope and cfg.rope_scaling:
            extend_rope(mc, cfg.rope_scaling, cfg.rope_factor)
        model = load_causal_lm(mc, device=device, dtype=torch.float32)
    if getattr(model.config, "vocab_size", vocab_size) < vocab_size:
        raise ConfigError(f"the tokenizer has {vocab_size} tokens but the model's vocabulary only {model.config.vocab_size}")
    return model


def max_positions(model) -> Optional[int]:
    """The longest sequence the model is configured for: ``max_position_embeddings`` (times the factor for
    dynamic NTK scaling, which keeps the original value there and rescales past it)."""
    c = getattr(model, "config", model)
    for k in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(c, k, None)
        if isinstance(v, int):
            rp = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
            if isinstance(rp, dict) and rp.get("rope_type", rp.get("type")) == "dynamic":
                return int(round(v * float(rp.get("factor", 1.0))))
            return v
    return None


def enable_grad_checkpointing(model) -> None:
    """transformers' activation checkpointing, non-reentrant (works with frozen inputs, LoRA and DDP)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"--grad-checkpointing: {type(model).__name__} does not support gradient checkpointing")
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2 renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def apply_lora(cfg: TrainConfig, model, adapter_dir: Optional[str] = None):
    """Wrap ``model`` in a peft LoRA adapter (rank ``cfg.lora`` on ``cfg.lora_targets``), everything else frozen
    (the LM head too, so the fused losses compute no dW) except ``cfg.lora_trainable`` (embeddings and/or norms,
    trained in full as LongLoRA does). ``adapter_dir``: load the adapter weights saved there (``--resume``).
    Returns the peft model; the wrapped transformers model (with the LoRA layers in it) is ``.get_base_model()``."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    from ..integrations.hf import output_head

    extra = set(_csv(cfg.lora_trainable))
    head = output_head(model, verify=False).weight
    emb = model.get_input_embeddings()
    if "embed" in extra and emb is not None and emb.weight is head:
        raise ConfigError("--lora-trainable embed: the model ties its input embeddings to the LM head, which LoRA "
                          "keeps frozen; pass --untie-embeddings to train the input embeddings alone")
    modules_to_save = []
    if "embed" in extra:
        names = [n for n, m in model.named_modules() if m is emb]
        modules_to_save.append(names[0].split(".")[-1])
    if "norm" in extra:
        modules_to_save += sorted({n.split(".")[-1] for n, m in model.named_modules()
                                   if "norm" in type(m).__name__.lower() and n})
    lc = LoraConfig(r=cfg.lora, lora_alpha=cfg.lora_alpha or 2 * cfg.lora, lora_dropout=cfg.lora_dropout,
                    target_modules=_csv(cfg.lora_targets), modules_to_save=modules_to_save or None, bias="none",
                    task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, lc)
    except ValueError as e:
        found = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"--lora-targets {cfg.lora_targets!r}: no matching module in {type(model).__name__} "
                          f"(its linear layers: {', '.join(found)}) [{str(e).splitlines()[0]}]") from None
    if adapter_dir is not None:
        res = set_peft_model_state_dict(peft_model, load_peft_weights(adapter_dir, device="cpu"))
        if getattr(res, "unexpected_keys", None):
            raise ConfigError(f"--resume: the adapter in {adapter_dir!r} does not fit this model "
                              f"(unexpected keys {res.unexpected_keys[:3]})")
    if head.requires_grad:  # a head inside modules_to_save would be trained: LoRA keeps it frozen
        raise ConfigError("--lora: the LM head would be trained; remove it from --lora-targets / --lora-trainable")
    return peft_model


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        import warnings

        # peft still calls the pre-5.2 name; the rename is transformers' business, not the user's
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
    except Exception:
        pass


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


def autocast_for(cfg: TrainConfig, device: torch.device):
    """bf16 autocast for ``--dtype bf16`` (and ``auto`` on CUDA); fp32 otherwise."""
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--dtype bf16: {torch.cuda.get_device_name(device)} does not support bfloat16")
    return torch.autocast(device.type, dtype=torch.bfloat16)


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
    shard = None
    if tp or cfg.untie_embeddings:
        if TP.is_tied(model):
            if ckpt and not cfg.lora:  # a LoRA run resumes from its (tied) base, untied again here
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
    peft_model = None
    if cfg.lora:
        from .checkpoint import ADAPTER_DIR

        peft_model = apply_lora(cfg, model, os.path.join(ckpt, ADAPTER_DIR) if ckpt else None)
        model = peft_model.get_base_model()  # the same modules, LoRA layers inside; what the objective runs
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(model)
    amp = autocast_for(cfg, device)

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
    views = ce_views(cfg)
    for step in bar:
        l_extra = l_extra_at(cfg, step)
        window = sampler.windows(step, cfg.batch_size * cfg.grad_accum, cfg.l_train + l_extra + 1)
        window = window.to(device, non_blocking=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        opt.zero_grad(set_to_none=True)
        tot = [0.0, 0.0, 0.0]  # loss, ce, misalign of the whole step (tensors after the first micro-batch)
        for k, (win, w_ce, w_pair) in enumerate(micro_batch_weights(window, l_extra, views, cfg.positions, cfg.grad_accum)):
            sync = contextlib.nullcontext()
            if k < cfg.grad_accum - 1 and isinstance(objective, torch.nn.parallel.DistributedDataParallel):
                sync = objective.no_sync()  # DDP: all-reduce the gradients once, after the last micro-batch
            with sync:
                with amp:
                    if views == 1:
                        out = objective(win[:, : cfg.l_train + 1], 0, 0.0)
                    else:
                        out = objective(win, l_extra, cfg.alpha, views=2)
                ce_k, mis_k = out.ce.float() * w_ce, out.misalign.float() * w_pair
                (ce_k + cfg.alpha * mis_k).backward()
            tot = [tot[0] + ce_k.detach() + cfg.alpha * mis_k.detach(), tot[1] + ce_k.detach(), tot[2] + mis_k.detach()]
        if cfg.grad_clip <= 0:
            gnorm = None
        elif tp:  # the head's part of the norm is spread over the ranks
            gnorm = TP.clip_grad_norm_(model, cfg.grad_clip, shard)
        else:  # a DTensor under FSDP (the norm over all shards): full_tensor() makes it a plain scalar
            gnorm = FSDP.full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        opt.step()

        tok_count += cfg.batch_size * cfg.grad_accum * cfg.l_train * views * (1 if tp else world)
        if rank == 0:
            dt = time.perf_counter() - t0
            last = {
                "step": step + 1, "loss": float(tot[0]), "ce": float(tot[1]), "misalign": float(tot[2]),
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
                save_checkpoint(cfg.out, step + 1, model, opt, cfg_dict, tok_file, adapter=peft_model)
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
    ap.add_argument("--ce-views", type=int, default=d.ce_views, choices=[0, 1, 2],
                    help="CE on 1 view (the long one) or 2 (both); 0 = 1 with --alpha 0, else 2")
    g = ap.add_argument_group("context extension (RoPE models)")
    g.add_argument("--rope-scaling", default=d.rope_scaling, metavar="TYPE",
                   help=f"extend the model's context: one of {', '.join(ROPE_TYPES)} (linear = position interpolation)")
    g.add_argument("--rope-factor", type=float, default=d.rope_factor, help="extension ratio (>= 1)")
    g = ap.add_argument_group("memory")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in the backward")
    g.add_argument("--lora", type=int, default=d.lora, metavar="R", help="train a LoRA adapter of rank R (0 = full)")
    g.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help="LoRA scaling alpha (default 2R)")
    g.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    g.add_argument("--lora-targets", default=d.lora_targets, help="comma list of module names to adapt")
    g.add_argument("--lora-trainable", default=d.lora_trainable,
                   help="also train these in full, LongLoRA-style: comma list of embed, norm")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, metavar="K",
                   help="K micro-batches of --batch-size per step, normalised over all their targets")
    g.add_argument("--dtype", default=d.dtype, choices=["auto", "fp32", "bf16"],
                   help="bf16 = autocast (auto: bf16 on CUDA, fp32 on CPU)")
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
    from .checkpoint import UnsafeCheckpoint

    ok = False
    try:
        cfg = config_from_args(argv)
        train(cfg)
        ok = True
    except (ConfigError, UnsupportedModel, UnsafeCheckpoint, FileNotFoundError) as e:
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
