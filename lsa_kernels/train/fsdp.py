"""FSDP2 for ``lsa train --fsdp``: parameters, gradients and optimizer state sharded over the processes.

Uses torch's ``fully_shard`` (FSDP2, per-parameter DTensor sharding on a 1-D device mesh; gloo on CPU,
nccl on GPU). Units: every module whose class is in the model's ``_no_split_modules`` (transformers' own
list of blocks that must stay whole: the decoder layers), then the root — the loss objective, so the
embeddings, final norm and LM head are gathered by the root's pre-forward hook and the fused loss reads
the whole head weight inside the forward, as without FSDP. Nothing model-specific.

Checkpoints stay the plain format of every other run (``model.save_pretrained`` + an ``optimizer.pt`` in
``torch.optim`` layout, integer parameter ids): the full state is gathered to rank 0 on save and re-sharded
from the full state on ``--resume``, so a run can be resumed with or without FSDP and any world size.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist
from torch import nn


def units(model: nn.Module) -> List[nn.Module]:
    """The sub-modules that become their own FSDP unit: instances of ``model._no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def shard(objective: nn.Module, model: nn.Module, device: torch.device) -> nn.Module:
    """``fully_shard`` each unit of ``model`` and then ``objective`` (which holds ``model``), in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    blocks = units(model)
    if not blocks:
        raise ValueError(f"--fsdp: {type(model).__name__} names no _no_split_modules (no decoder layers to shard)")
    for m in blocks:
        fully_shard(m, mesh=mesh)
    fully_shard(objective, mesh=mesh)
    return objective


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _order(model: nn.Module, opt: torch.optim.Optimizer) -> List[str]:
    """Parameter names in the optimizer's order: index i of ``opt.state_dict()`` is ``_order(...)[i]``."""
    name = {id(p): n for n, p in model.named_parameters()}
    return [name[id(p)] for g in opt.param_groups for p in g["params"]]


def full_model_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Collective. The full (unsharded) state dict on rank 0, on the CPU; empty on the other ranks.

    A tied parameter (e.g. ``lm_head.weight`` = ``embed_tokens.weight``) is kept under its first name only,
    as ``save_pretrained`` writes it without FSDP (the gathered copies no longer share memory)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(model, options=_full_options())
    seen, tied = set(), []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.append(name)
        seen.add(id(p))
    for name in tied:
        sd.pop(name, None)
    return sd


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Collective. On rank 0 the full optimizer state in ``torch.optim`` layout (integer ids, as
    ``opt.state_dict()`` of an unsharded model); an empty dict elsewhere."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, opt, options=_full_options())
    if not sd.get("state") and not sd.get("param_groups"):
        return {}
    idx = {n: i for i, n in enumerate(_order(model, opt))}
    return {
        "state": {idx[n]: v for n, v in sd["state"].items()},
        "param_groups": [dict(g, params=[idx[n] for n in g["params"]]) for g in sd["param_groups"]],
    }


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, sd: dict) -> None:
    """Load a full ``torch.optim``-layout state (every rank passes the same dict) into the sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    order = _order(model, opt)
    fqn = {
        "state": {order[i]: v for i, v in sd["state"].items()},
        "param_groups": [dict(g, params=[order[i] for i in g["params"]]) for g in sd["param_groups"]],
    }
    set_optimizer_state_dict(model, opt, optim_state_dict=fqn, options=StateDictOptions(full_state_dict=True))


def full_tensor(t):
    """A DTensor's full value (a plain tensor passes through)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@torch.no_grad()
def param_sum(model: nn.Module) -> float:
    """Collective. Σ of all weights of the (unsharded) model; the same on every rank."""
    return float(sum(full_tensor(p).double().sum() for p in model.parameters()))
