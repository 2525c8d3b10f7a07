"""How ``lsa train`` spreads one run over processes: one strategy object per run, chosen once by
:func:`strategy_for`, holding every place where the loop differs between a single process, DDP, FSDP2 and
tensor parallelism (the LM head sharded over the vocabulary).

The maths is the same in all four (docs/maths.md §4): the step's loss is ``ce + alpha * misalign`` averaged
over every window of the step, and the gradient is that loss's. What differs:

=================  ============  ==============  =======================  ===========================
strategy           data          objective       gradient-norm clip        checkpoint (always plain)
=================  ============  ==============  =======================  ===========================
``Single``         own stream    as is           torch's                   rank 0 saves
``DataParallel``   rank's own    DDP wrapper     torch's (grads reduced)   rank 0 saves
``FullyShard``     rank's own    FSDP2 units     over all shards           full state gathered to rank 0
``TensorParallel`` rank 0's      head sharded    head part summed          head gathered to rank 0
=================  ============  ==============  =======================  ===========================

The implementations they call are fsdp.py and tensor_parallel.py; torch.distributed is initialised by
:func:`init_distributed` (gloo on CPU, nccl on GPU) under torchrun.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional, Tuple

import torch

from . import fsdp as FSDP
from . import tensor_parallel as TP
from .checkpoint import load_trainer_state, save_checkpoint
from .config import ConfigError, TrainConfig

__all__ = ["init_distributed", "strategy_for", "Single", "DataParallel", "FullyShard", "TensorParallel"]


def init_distributed() -> Tuple[int, int, int]:
    """(rank, world, local_rank); initialises torch.distributed under torchrun (``WORLD_SIZE > 1``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if world > 1:
        return torch.distributed.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


class Single:
    """One process: nothing to wrap, reduce or gather. The base class of the others (their defaults)."""

    untie_reason: Optional[str] = None  # set when the strategy needs the LM head untied from the embeddings

    def __init__(self, cfg: TrainConfig, rank: int, world: int, device: torch.device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device

    # ---- data and seeds
    @property
    def data_rank(self) -> int:
        """Which rank's window stream this process draws (data.py: windows are a function of (seed, step, rank))."""
        return self.rank

    @property
    def data_replicas(self) -> int:
        """How many processes draw different windows (tokens per step = this x the per-process tokens)."""
        return self.world

    @property
    def init_seed(self) -> int:
        return self.cfg.seed + self.rank

    # ---- model and objective
    def prepare_model(self, model) -> None:
        """Change the model before the optimizer sees it (tensor parallelism: keep this rank's head rows)."""

    def loss_kwargs(self) -> dict:
        """Extra keyword arguments of the fused losses (tensor parallelism: the vocab shard)."""
        return {}

    def wrap(self, objective, model):
        """The module the loop calls each micro-batch (DDP: a wrapper; FSDP: sharded in place)."""
        return objective

    def accumulating(self, objective, last: bool):
        """Context for one micro-batch's backward; ``last`` = the step's last micro-batch."""
        return contextlib.nullcontext()

    def clip_grad_norm(self, model, max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm of the (logical, whole) model to ``max_norm``; returns the norm before."""
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    # ---- checkpoints
    def load_trainer_state(self, ckpt: str, opt, model) -> int:
        """Restore the optimizer (a full, plain state) and the RNG from ``ckpt``; returns the step to resume at."""
        return load_trainer_state(ckpt, opt)

    def save(self, out: str, step: int, model, opt, cfg_dict: dict, tokenizer_file: Optional[str], adapter=None) -> None:
        """Collective. Write a plain checkpoint (the whole model and optimizer state, as one process would)."""
        if self.rank == 0:
            save_checkpoint(out, step, model, opt, cfg_dict, tokenizer_file, adapter=adapter)
        self.barrier()

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    # ---- end of run
    @torch.no_grad()
    def param_sum(self, model) -> float:
        """Collective. Σ of every weight of the logical model in float64 (the same on every rank)."""
        return float(sum(p.double().sum() for p in model.parameters()))

    @torch.no_grad()
    def replicas_agree(self, model) -> Optional[bool]:
        """Collective. Whether the weights every rank holds a copy of are bit-identical on all ranks (their
        float64 sums compared); None when nothing is replicated (one process, FSDP)."""
        return None

    def _same_on_all_ranks(self, value: float) -> bool:
        mine = torch.tensor([value], dtype=torch.float64, device=self.device)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        torch.distributed.all_gather(parts, mine)
        return bool((torch.cat(parts) == mine).all())


class DataParallel(Single):
    """DDP: every rank holds the whole model and draws its own windows; gradients are all-reduced once per
    step (after the last micro-batch)."""

    def wrap(self, objective, model):
        # --views sequential recomputes each view in the backward: every parameter's gradient arrives once per
        # view, which DDP allows with a static graph
        return torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            static_graph=getattr(self.cfg, "views", "joint") == "sequential")

    def accumulating(self, objective, last: bool):
        # with a static graph (--views sequential) every micro-batch syncs: DDP's no_sync() under static_graph
        # fails an internal assert in the reducer (pytorch/pytorch#143580); the sum of per-micro-batch averages
        # is the same gradient
        if last or getattr(objective, "static_graph", False):
            return contextlib.nullcontext()
        return objective.no_sync()

    @torch.no_grad()
    def replicas_agree(self, model) -> Optional[bool]:
        return self._same_on_all_ranks(self.param_sum(model))


class FullyShard(Single):
    """FSDP2 (fsdp.py): parameters, gradients and optimizer state sharded; full state gathered to rank 0 on
    save and re-sharded from it on resume."""

    def wrap(self, objective, model):  # before the optimizer: it must see the sharded (DTensor) parameters
        try:
            FSDP.shard(objective, model, self.device)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return objective

    def clip_grad_norm(self, model, max_norm: float) -> torch.Tensor:
        # a DTensor (the norm over all shards): full_tensor() makes it a plain scalar
        return FSDP.full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))

    def load_trainer_state(self, ckpt: str, opt, model) -> int:
        return load_trainer_state(ckpt, opt, loader=lambda sd: FSDP.load_optimizer_state(model, opt, sd))

    def save(self, out, step, model, opt, cfg_dict, tokenizer_file, adapter=None) -> None:
        full_sd, full_opt = FSDP.full_model_state(model), FSDP.full_optimizer_state(model, opt)
        if self.rank == 0:
            save_checkpoint(out, step, model, full_opt, cfg_dict, tokenizer_file, state_dict=full_sd)
        del full_sd, full_opt
        self.barrier()

    def param_sum(self, model) -> float:
        return FSDP.param_sum(model)


class TensorParallel(Single):
    """The LM head sharded over the vocabulary (tensor_parallel.py): every rank draws rank 0's windows, runs
    the replicated decoder and the vocab-parallel losses; no DDP wrapper (the hidden-state gradient is
    all-reduced inside the loss, so the replicated weights get identical gradients)."""

    untie_reason = " so that the head can be sharded over the vocabulary"

    def __init__(self, cfg, rank, world, device):
        super().__init__(cfg, rank, world, device)
        self.shard: Optional[TP.HeadShard] = None

    data_rank = property(lambda self: 0)
    data_replicas = property(lambda self: 1)
    init_seed = property(lambda self: self.cfg.seed)  # the replicated decoder needs the same RNG on every rank

    def prepare_model(self, model) -> None:
        self.shard = TP.shard_head(model)  # this rank's rows of the head replace the output embedding

    def loss_kwargs(self) -> dict:
        return self.shard.loss_kw()

    def clip_grad_norm(self, model, max_norm: float) -> torch.Tensor:
        return TP.clip_grad_norm_(model, max_norm, self.shard)  # the head's part of the norm is spread over ranks

    def load_trainer_state(self, ckpt: str, opt, model) -> int:
        return load_trainer_state(ckpt, opt, transform=lambda sd: TP.slice_optimizer_state(sd, model, opt, self.shard))

    def save(self, out, step, model, opt, cfg_dict, tokenizer_file, adapter=None) -> None:
        full_head, full_opt = TP.full_checkpoint_state(model, opt, self.shard)  # gathered to rank 0
        if self.rank == 0:
            with TP.swapped_head(model, full_head):
                save_checkpoint(out, step, model, full_opt, cfg_dict, tokenizer_file)
        del full_head, full_opt
        self.barrier()

    def param_sum(self, model) -> float:
        return TP.param_sum(model, self.shard)

    @torch.no_grad()
    def replicas_agree(self, model) -> Optional[bool]:
        head = {id(p) for p in TP.head_params(model)}
        return self._same_on_all_ranks(float(sum(p.double().sum() for p in model.parameters() if id(p) not in head)))


def strategy_for(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> Single:
    """The run's strategy (``validate`` has checked the combination: tensor parallelism needs
    ``world == --tensor-parallel``, FSDP a torchrun launch)."""
    if cfg.tensor_parallel > 1:
        return TensorParallel(cfg, rank, world, device)
    if cfg.fsdp:
        return FullyShard(cfg, rank, world, device)
    if world > 1:
        return DataParallel(cfg, rank, world, device)
    return Single(cfg, rank, world, device)
