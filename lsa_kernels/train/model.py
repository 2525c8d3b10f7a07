"""The model a training run trains: the transformers causal LM (the small default Llama built from
``TrainConfig``, or one loaded from disk), its RoPE context extension, LoRA wrapping, activation
checkpointing, untied embeddings and the autocast dtype; plus the position limits and RoPE scaling read
from a model config (shared with ``lsa eval``). Nothing here depends on how the run is parallelised
(parallel.py) or on the loss (docs/maths.md §4); RoPE scaling is docs/maths.md §9.

Context extension by a factor ``F`` of a model trained on ``n0`` positions: linear (position
interpolation), yarn and llama3 scale the positions to ``n0 * F`` and record
``original_max_position_embeddings = n0``; dynamic NTK keeps ``max_position_embeddings = n0`` (transformers
rescales the base past it) and allows ``n0 * F`` positions (:func:`positions`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Optional

import torch

from ..integrations.hf import load_causal_lm, output_head
from . import tensor_parallel as TP
from .checkpoint import model_dir
from .config import ROPE_TYPES, ConfigError, TrainConfig, csv_list
from .data import DEFAULT_TOKENIZER

__all__ = ["tokenizer_path", "extend_rope", "build_model", "positions", "max_positions", "rope_of",
           "untie_embeddings", "enable_grad_checkpointing", "apply_lora", "quiet_transformers", "autocast_for"]


def tokenizer_path(cfg: TrainConfig) -> str:
    """``--tokenizer``, else the tokenizer saved with ``--model`` (a tokenizer.json or a tokenizer dir), else the
    shipped one."""
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

    path = path or (model_dir(cfg.model) if cfg.model else None)
    if path:
        try:
            mc = None
            if rope and cfg.rope_scaling:
                mc = extend_rope(AutoConfig.from_pretrained(path, local_files_only=True), cfg.rope_scaling, cfg.rope_factor)
            model = load_causal_lm(path, device=device, dtype=torch.float32, config=mc)
        except ConfigError:
            raise
        except Exception as e:  # a corrupted model.safetensors, an invalid config.json, ...: one line, no traceback
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"cannot load the model in {path!r} ({type(e).__name__}: {first}); is its config.json "
                              "valid JSON and its model.safetensors complete?") from None
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


def positions(cfg) -> tuple:
    """(positions the model allows, its ``max_position_embeddings`` or equivalent); None, None if unknown.

    Dynamic NTK scaling keeps ``max_position_embeddings = n0`` in the config (as ``lsa train`` writes it and
    transformers reads it) and allows ``n0 * factor``; with ``original_max_position_embeddings`` given, the
    larger of ``max_position_embeddings`` and ``original * factor``."""
    for k in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, k, None)
        if isinstance(v, int) and not isinstance(v, bool):
            rp = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
            if isinstance(rp, dict) and rp.get("rope_type", rp.get("type")) == "dynamic":
                f = float(rp.get("factor", 1.0) or 1.0)
                n0 = rp.get("original_max_position_embeddings")
                return (max(v, int(round(n0 * f))) if isinstance(n0, int) else int(round(v * f))), v
            return v, v
    return None, None


def rope_of(cfg) -> Optional[dict]:
    """The RoPE scaling a model config carries (``rope_parameters``, or legacy ``rope_scaling``), or None
    for plain RoPE / no RoPE. Per-layer-type parameters (Gemma 3) come back as ``{type: {...}}``."""
    rp = getattr(cfg, "rope_parameters", None)
    if rp is None:
        rp = getattr(cfg, "rope_scaling", None)
    if not isinstance(rp, dict) or not rp:
        return None

    def scaled(d):
        return isinstance(d, dict) and d.get("rope_type", d.get("type", "default")) not in (None, "default")

    if all(isinstance(v, dict) for v in rp.values()):
        sub = {k: dict(v) for k, v in rp.items() if scaled(v)}
        return sub or None
    return dict(rp) if scaled(rp) else None


def max_positions(model) -> Optional[int]:
    """The longest sequence ``model`` (or a model config) is configured for, or None if it does not say."""
    return positions(getattr(model, "config", model))[0]


def untie_embeddings(model, cfg: TrainConfig, resumed_from: Optional[str], why: str = "", rank: int = 0) -> None:
    """Give the LM head its own copy of tied input embeddings (``--untie-embeddings``, or a head that is
    about to be sharded: ``why`` says so on stderr). A checkpoint trained tied cannot be resumed untied."""
    if not TP.is_tied(model):
        return
    if resumed_from and not cfg.lora:  # a LoRA run resumes from its (tied) base, untied again here
        raise ConfigError(f"--resume: {resumed_from!r} was trained with tied embeddings; --tensor-parallel / "
                          f"--untie-embeddings need untied ones: start a new run with --model {resumed_from}")
    TP.untie_embeddings(model)
    if rank == 0:  # printed even with --quiet: the saved model differs in structure from the input
        print("lsa train: untying the input and output embeddings (the head starts as a copy of the "
              f"embedding matrix){why}", file=sys.stderr)


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

    extra = set(csv_list(cfg.lora_trainable))
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
                    target_modules=csv_list(cfg.lora_targets), modules_to_save=modules_to_save or None, bias="none",
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


def quiet_transformers() -> None:
    """No download bars or info logs from transformers; no FutureWarning about peft's gradient-checkpointing call."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        import warnings

        # peft still calls the pre-5.2 name; the rename is transformers' business, not the user's
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
    except Exception:
        pass


def autocast_for(cfg: TrainConfig, device: torch.device):
    """bf16 autocast for ``--dtype bf16`` (and ``auto`` on CUDA); fp32 otherwise."""
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--dtype bf16: {torch.cuda.get_device_name(device)} does not support bfloat16")
    return torch.autocast(device.type, dtype=torch.bfloat16)
