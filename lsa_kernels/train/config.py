"""The training run's configuration: :class:`TrainConfig` (every option of ``lsa train`` in one dataclass),
its command-line flags (:func:`parser`, :func:`config_from_args`), the checks that need neither a model nor
data (:func:`validate`), and :class:`ConfigError`, the one-line error every training / evaluation entry
point reports with exit code 2. The objective the options select is docs/maths.md §4."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional

from .. import _cli_types as T
from .. import _env
from ..maths import DIVERGENCES
from .checkpoint import ADAPTER_DIR, latest_checkpoint, model_dir

__all__ = ["TrainConfig", "ConfigError", "ROPE_TYPES", "validate", "parser", "config_from_args", "csv_list",
           "saved_config", "resume_changes", "check_device", "check_out", "RESUME_FREE"]

ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")
CLI_DOC = "lsa train: fine-tune a causal LM with the long-short loss (see lsa_kernels.train.loop and docs/training.md)"


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
    # "text": plain corpus windows; "recall": the same with repeated rare spans and facts written in
    # (lsa_kernels/train/recall_data.py), so that distant context carries information the model can use
    data: str = "text"
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
    # "longce": weight each paired long row's CE by min(exp(ce_short - ce_long), longce_gamma) (docs/maths.md §13)
    ce_weighting: str = "none"
    longce_gamma: float = 5.0
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
    views: str = "joint"  # "sequential": each view's forward recomputed in the backward, one at a time
    tiled_mlp: int = 0  # 0 = off; N >= 1 sequence tiles per MLP; -1 = one tile per hidden-size tokens
    tiled_norms: int = 0  # the same for the decoder's norms (each keeps only its input for the backward)
    offload_activations: bool = False  # save_on_cpu around the model's forward (CUDA)
    dtype: str = "auto"  # "fp32", "bf16" (autocast), "auto" = bf16 on CUDA, fp32 on CPU
    # parallelism (parallel.py): N > 1 shards the LM head over the vocabulary across N processes (torchrun,
    # world = N); it unties the embeddings (as --untie-embeddings does); see tensor_parallel.py
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
    override_on_resume: List[str] = field(default_factory=list)  # with resume: fields allowed to differ from the run's
    ckpt_every: int = 100
    stop_after: int = 0  # stop (after checkpointing) once this many steps ran in this process; 0 = never
    device: str = ""  # "" = cuda if available else cpu
    quiet: bool = False


class ConfigError(ValueError):
    """A bad flag / input, reported as one line and a non-zero exit; nothing is written to --out."""


def csv_list(text: str) -> List[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]


# fields that say how this process runs, not what the run is: a resumed run may change them freely
RESUME_FREE = ("out", "resume", "override_on_resume", "quiet", "stop_after", "ckpt_every", "device")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _plain(v):
    """A value as it reads back from JSON (tuples as lists), so a saved and a given value compare equal."""
    return json.loads(json.dumps(v, default=str))


def saved_config(out: str) -> tuple:
    """(the configuration the latest checkpoint in ``out`` was written with, the file it came from): the
    checkpoint's state.json, else the run's config.json; ConfigError when neither can be read."""
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise ConfigError(f"--resume: no checkpoint in {out!r}")
    for p, key in ((os.path.join(ckpt, "state.json"), "config"), (os.path.join(out, "config.json"), None)):
        try:
            with open(p) as f:
                d = json.load(f)
            d = d[key] if key else d
            if isinstance(d, dict):
                return d, p
        except (OSError, ValueError, KeyError, TypeError):
            continue
    raise ConfigError(f"--resume: cannot read the run's configuration ({os.path.join(ckpt, 'state.json')} and "
                      f"{os.path.join(out, 'config.json')} are missing or not valid JSON)")


def resume_changes(cfg: TrainConfig, saved: dict) -> dict:
    """``{field: [the run's value, cfg's value]}`` for every field of ``cfg`` that differs from the saved
    configuration of the run it resumes (fields in :data:`RESUME_FREE` and fields the run did not record
    are not compared)."""
    out = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in RESUME_FREE or f.name not in saved:
            continue
        old, new = _plain(saved[f.name]), _plain(getattr(cfg, f.name))
        if old != new:
            out[f.name] = [old, new]
    return out


def check_device(device: str, backend: str = "auto") -> None:
    """``--device`` names a device this machine has, and ``--backend triton`` has a GPU (or Triton's interpreter)."""
    import torch

    try:
        dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device!r} is not a torch device (expected cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"--device {device}: no CUDA GPU is visible (torch.cuda.is_available() is False); "
                              "use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"--device {device}: this machine has {n} CUDA device(s), indices 0..{n - 1}")
    elif dev.type != "cpu":
        raise ConfigError(f"--device {device!r}: only cpu and cuda devices are supported")
    if backend == "triton" and dev.type != "cuda" and not _env.interpreting():
        raise ConfigError("--backend triton needs a CUDA GPU (or TRITON_INTERPRET=1); use --backend cpu or auto")


def check_out(out: str, flag: str = "--out") -> None:
    """``--out`` is a directory to be (or already) created, not an existing file."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"{flag} {out!r} is an existing file; it must name a directory")


def validate(cfg: TrainConfig) -> None:
    """Every check of ``cfg`` that needs no model or data; raises :class:`ConfigError` with one line."""
    check_out(cfg.out)
    check_device(cfg.device, cfg.backend)
    if not cfg.model:
        if cfg.n_embd % cfg.n_head:
            raise ConfigError(f"--n-head {cfg.n_head} must divide --n-embd {cfg.n_embd}")
        if cfg.n_head % cfg.n_kv_head:
            raise ConfigError(f"--n-kv-head {cfg.n_kv_head} must divide --n-head {cfg.n_head}")
        for name in ("n_layer", "n_embd", "n_head", "n_kv_head", "ffn", "max_positions"):
            if getattr(cfg, name) < 1:
                raise ConfigError(f"{_flag(name)} must be >= 1, got {getattr(cfg, name)}")
    if not (isinstance(cfg.temperature, (int, float)) and math.isfinite(cfg.temperature) and cfg.temperature > 0):
        raise ConfigError(f"--temperature must be a finite number > 0, got {cfg.temperature}")
    for name in ("warmup", "stop_after", "seed"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{_flag(name)} must be >= 0, got {getattr(cfg, name)}")
    if cfg.ckpt_every < 1:
        raise ConfigError(f"--ckpt-every must be >= 1, got {cfg.ckpt_every}")
    if not (isinstance(cfg.grad_clip, (int, float)) and math.isfinite(cfg.grad_clip) and cfg.grad_clip >= 0):
        raise ConfigError(f"--grad-clip must be a finite number >= 0 (0 = no clipping), got {cfg.grad_clip}")
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
    if cfg.ce_weighting not in ("none", "longce"):
        raise ConfigError(f"--ce-weighting must be 'none' or 'longce', got {cfg.ce_weighting!r}")
    if cfg.ce_weighting == "longce" and (cfg.ce_views or (1 if cfg.alpha == 0 else 2)) != 2:
        raise ConfigError("--ce-weighting longce compares the two views: it needs --alpha > 0 or --ce-views 2")
    if not (isinstance(cfg.longce_gamma, (int, float)) and math.isfinite(cfg.longce_gamma) and cfg.longce_gamma > 0):
        raise ConfigError(f"--longce-gamma must be a finite number > 0, got {cfg.longce_gamma}")
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
    bad = [t for t in csv_list(cfg.lora_trainable) if t not in ("embed", "norm")]
    if bad:
        raise ConfigError(f"--lora-trainable takes a comma list of embed, norm; got {', '.join(bad)}")
    if cfg.lora_trainable and not cfg.lora:
        raise ConfigError("--lora-trainable needs --lora R (without LoRA every weight is trained already)")
    if cfg.grad_accum < 1:
        raise ConfigError(f"--grad-accum must be >= 1, got {cfg.grad_accum}")
    if cfg.views not in ("joint", "sequential"):
        raise ConfigError(f"--views must be joint or sequential, got {cfg.views!r}")
    if cfg.views == "sequential" and (cfg.ce_views or (1 if cfg.alpha == 0 else 2)) != 2:
        raise ConfigError("--views sequential runs the two views one after the other: it needs --alpha > 0 or "
                          "--ce-views 2 (a one-view run has nothing to split)")
    if cfg.views == "sequential" and (cfg.fsdp or cfg.tensor_parallel > 1):
        raise ConfigError("--views sequential is supported on one process or DDP, not with --fsdp / --tensor-parallel")
    for flag, v in (("--tiled-mlp", cfg.tiled_mlp), ("--tiled-norms", cfg.tiled_norms)):
        if v < -1:
            raise ConfigError(f"{flag} must be a tile count >= 1 (or given alone: one tile per hidden-size "
                              f"tokens), got {v}")
    if cfg.offload_activations:
        import torch

        dev = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if not dev.startswith("cuda") or not torch.cuda.is_available():
            raise ConfigError(f"--offload-activations moves saved activations to pinned host memory while they "
                              f"wait for the backward: it needs a CUDA device, this run is on {dev}")
    if cfg.dtype not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"--dtype must be auto, fp32 or bf16, got {cfg.dtype!r}")
    if cfg.tokenizer and not os.path.exists(cfg.tokenizer):
        raise ConfigError(f"--tokenizer {cfg.tokenizer!r} does not exist")
    if cfg.data not in ("text", "recall"):
        raise ConfigError(f"--data must be text or recall, got {cfg.data!r}")
    if cfg.data == "recall" and cfg.l_train + 1 < 160:
        raise ConfigError(f"--data recall needs --l-train >= 159 (windows of >= 160 tokens), got {cfg.l_train}")
    for p in cfg.train_files:
        if not os.path.isfile(p):
            raise ConfigError(f"--train-files: {p!r} does not exist")
    if cfg.resume:
        ckpt = latest_checkpoint(cfg.out)
        if ckpt is None:
            raise ConfigError(f"--resume: no checkpoint in {cfg.out!r}")
        if cfg.lora and not os.path.isfile(os.path.join(ckpt, ADAPTER_DIR, "adapter_config.json")):
            raise ConfigError(f"--resume --lora: {ckpt!r} holds no LoRA adapter ({ADAPTER_DIR}/adapter_config.json); "
                              "it was not written by a --lora run")
        if cfg.lora and not cfg.model:
            raise ConfigError("--resume --lora needs --model: the base model the adapter was trained on")
        saved, src = saved_config(cfg.out)
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        allowed = {o.lstrip("-").replace("-", "_") for o in cfg.override_on_resume}
        bad = sorted(a for a in allowed if a not in fields or a in RESUME_FREE)
        if bad:
            raise ConfigError(f"--override-on-resume: {_flag(bad[0])} is not a setting of the run "
                              "(name training flags such as steps, lr, alpha)")
        for name, (old, new) in resume_changes(cfg, saved).items():
            if name not in allowed:
                raise ConfigError(
                    f"--resume: {_flag(name)} {json.dumps(new)} differs from the run's {json.dumps(old)} ({src}); "
                    f"leave it out to continue the run as it was, or pass --override-on-resume {name.replace('_', '-')}"
                )
    elif cfg.override_on_resume:
        raise ConfigError("--override-on-resume needs --resume")
    elif os.path.exists(os.path.join(cfg.out, "latest")):
        raise ConfigError(f"{cfg.out!r} already holds a run: pass --resume to continue it or choose another --out")


def parser(description: str = CLI_DOC) -> argparse.ArgumentParser:
    d = TrainConfig()
    ap = T.Parser(prog="lsa train", description=description)
    ap.add_argument("--model", default=d.model, help="transformers model dir (default: a small Llama from config)")
    ap.add_argument("--tokenizer", default=d.tokenizer, help="tokenizer.json or tokenizer dir (default: shipped BPE)")
    ap.add_argument("--train-files", nargs="*", default=[], help="text files, one document each (default: shipped corpus)")
    ap.add_argument("--data", choices=("text", "recall"), default=d.data,
                    help="recall: write repeated rare spans and NAME's-number facts into every window (docs/recall_testbed.md)")
    ap.add_argument("--l-train", type=T.int_at_least(4), default=d.l_train,
                    help="training context length in tokens (the long and the short view each have this many)")
    ap.add_argument("--alpha", type=T.nonneg_float, default=d.alpha, help="weight of the misalignment term; 0 = plain CE")
    ap.add_argument("--divergence", default=d.divergence, choices=list(DIVERGENCES),
                    help="divergence between the two views' next-token distributions")
    ap.add_argument("--temperature", type=T.positive_float, default=d.temperature,
                    help="softmax temperature of the misalignment term")
    ap.add_argument("--detach", default=d.detach, choices=[None, "long", "short"],
                    help="stop the misalignment gradient through one view (default: through both)")
    ap.add_argument("--positions", default=d.positions, choices=["overlap", "last"],
                    help="compare the views at every overlapping position or at the last one")
    ap.add_argument("--ce-views", type=int, default=d.ce_views, choices=[0, 1, 2],
                    help="CE on 1 view (the long one) or 2 (both); 0 = 1 with --alpha 0, else 2")
    ap.add_argument("--ce-weighting", default=d.ce_weighting, choices=["none", "longce"],
                    help="longce: weight each paired long row's CE by min(exp(ce_short - ce_long), gamma) "
                         "(LongCE, docs/maths.md section 13)")
    ap.add_argument("--longce-gamma", type=T.positive_float, default=d.longce_gamma, help="LongCE's cap on a token's weight")
    g = ap.add_argument_group("context extension (RoPE models)")
    g.add_argument("--rope-scaling", default=d.rope_scaling, metavar="TYPE",
                   help=f"extend the model's context: one of {', '.join(ROPE_TYPES)} (linear = position interpolation)")
    g.add_argument("--rope-factor", type=T.float_at_least(1), default=d.rope_factor, help="extension ratio")
    g = ap.add_argument_group("memory")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in the backward")
    g.add_argument("--lora", type=T.nonneg_int, default=d.lora, metavar="R", help="train a LoRA adapter of rank R (0 = full)")
    g.add_argument("--lora-alpha", type=T.nonneg_float, default=d.lora_alpha, help="LoRA scaling alpha (0 = 2R)")
    g.add_argument("--lora-dropout", type=T.bounded(float, 0.0, 1.0, hi_open=True, name="dropout"),
                   default=d.lora_dropout, help="dropout on the LoRA branch")
    g.add_argument("--lora-targets", default=d.lora_targets, help="comma list of module names to adapt")
    g.add_argument("--lora-trainable", default=d.lora_trainable,
                   help="also train these in full, LongLoRA-style: comma list of embed, norm")
    g.add_argument("--grad-accum", type=T.positive_int, default=d.grad_accum, metavar="K",
                   help="K micro-batches of --batch-size per step, normalised over all their targets")
    g.add_argument("--views", default=d.views, choices=["joint", "sequential"],
                   help="joint: both views in one batched forward; sequential: each view's forward recomputed in "
                        "the backward, one at a time (the activations of one view, one extra forward per view)")
    g.add_argument("--tiled-mlp", type=T.positive_int, nargs="?", const=-1, default=d.tiled_mlp, metavar="TILES",
                   help="run each layer's MLP over TILES sequence tiles, recomputed in the backward (alone: one "
                        "tile per hidden-size tokens; default: off)")
    g.add_argument("--tiled-norms", type=T.positive_int, nargs="?", const=-1, default=d.tiled_norms, metavar="TILES",
                   help="run the decoder's norms over TILES sequence tiles, recomputed in the backward: each keeps "
                        "only its input, not its fp32 normalised rows (alone: one tile per hidden-size tokens)")
    g.add_argument("--offload-activations", action="store_true",
                   help="CUDA: keep the activations saved for the backward in pinned host memory (save_on_cpu), "
                        "with --grad-checkpointing only the layers' inputs")
    g.add_argument("--dtype", default=d.dtype, choices=["auto", "fp32", "bf16"],
                   help="bf16 = autocast (auto: bf16 on CUDA, fp32 on CPU)")
    g = ap.add_argument_group("optimisation")
    g.add_argument("--steps", type=T.positive_int, default=d.steps, help="optimizer steps of the whole run")
    g.add_argument("--batch-size", type=T.positive_int, default=d.batch_size, help="windows per step per process")
    g.add_argument("--lr", type=T.positive_float, default=d.lr,
                   help=f"peak learning rate (AdamW; linear warmup, then cosine to {d.min_lr_frac:g} x lr)")
    g.add_argument("--warmup", type=T.nonneg_int, default=d.warmup, help="linear warmup steps")
    g.add_argument("--grad-clip", type=T.nonneg_float, default=d.grad_clip, help="max global gradient norm; 0 = no clipping")
    g.add_argument("--seed", type=T.nonneg_int, default=d.seed,
                   help="seed of the initial weights and of the windows (the same for every alpha)")
    g = ap.add_argument_group("outputs and resuming")
    g.add_argument("--out", default=d.out,
                   help="run directory: config.json, log.jsonl, metrics.json, ckpt-NNNNNN/, latest")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint, with the run's own configuration "
                        "(a flag that differs from it is refused unless named in --override-on-resume)")
    g.add_argument("--override-on-resume", nargs="+", default=[], metavar="FLAG",
                   help="with --resume: flags (e.g. steps lr) allowed to differ from the run's configuration; the "
                        "change is recorded in log.jsonl and config.json follows the next checkpoint")
    g.add_argument("--ckpt-every", type=T.positive_int, default=d.ckpt_every,
                   help="write a checkpoint every N steps (and at the last step)")
    g.add_argument("--stop-after", type=T.nonneg_int, default=d.stop_after,
                   help="stop (after checkpointing) once N steps ran in this process; 0 = never (resumable)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g = ap.add_argument_group("device and parallelism")
    g.add_argument("--backend", default=d.backend, choices=["auto", "cpu", "triton", "reference"],
                   help="kernels of the fused loss (auto: triton on CUDA, cpu otherwise)")
    g.add_argument("--device", default=d.device, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    g.add_argument("--tensor-parallel", type=T.positive_int, default=d.tensor_parallel,
                   help="shard the LM head over the vocabulary across N processes (torchrun --nproc_per_node N)")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard parameters, gradients and optimizer state with FSDP2 instead of DDP")
    g.add_argument("--untie-embeddings", action="store_true",
                   help="give the LM head its own copy of tied input embeddings (implied by --tensor-parallel > 1)")
    g = ap.add_argument_group("the default model (a small Llama; ignored with --model)")
    g.add_argument("--n-layer", type=T.positive_int, default=d.n_layer, help="transformer layers")
    g.add_argument("--n-embd", type=T.positive_int, default=d.n_embd, help="hidden size (a multiple of --n-head)")
    g.add_argument("--n-head", type=T.positive_int, default=d.n_head, help="attention heads (divides --n-embd)")
    g.add_argument("--n-kv-head", type=T.positive_int, default=d.n_kv_head, help="key/value heads (divides --n-head)")
    g.add_argument("--ffn", type=T.positive_int, default=d.ffn, help="MLP hidden size")
    g.add_argument("--max-positions", type=T.positive_int, default=d.max_positions, help="max_position_embeddings")
    return ap


def config_from_args(argv=None, description: str = CLI_DOC) -> TrainConfig:
    """The configuration a command line asks for. With ``--resume`` every flag not on the command line takes the
    run's own value (from its latest checkpoint), so ``lsa train --out R --resume`` continues R as it was;
    a flag given with another value than the run's is refused by :func:`validate` unless named in
    ``--override-on-resume``."""
    ap = parser(description)
    ns = ap.parse_args(argv)
    _env.smoke_caps(ns, "lsa train", steps=2, batch_size=2, stop_after=1)
    cfg = TrainConfig(**vars(ns))
    if cfg.resume and latest_checkpoint(cfg.out) is not None and not os.path.isfile(cfg.out):
        for a in ap._actions:  # which flags the command line gave: parse it again with every default suppressed
            a.default = argparse.SUPPRESS
        given = set(vars(ap.parse_args(argv)))
        saved, _ = saved_config(cfg.out)
        for f in dataclasses.fields(TrainConfig):
            if f.name in saved and f.name not in given and f.name not in RESUME_FREE:
                setattr(cfg, f.name, saved[f.name])
    return cfg
