"""``lsa train --tensor-parallel N``: the LM head sharded over the vocabulary across N processes.

Every rank builds the same model (same seed), with untied input/output embeddings, then keeps only its
rows ``W[start : start + V_r]`` of the head (``torch.tensor_split``: sizes differ by at most one) as an
``nn.Linear(H, V_r)`` that replaces the model's output embedding. The losses run vocab-parallel
(``process_group=, vocab_start=``, :mod:`lsa_kernels.distributed`): every rank gets the same loss and the
same all-reduced gradient wrt the hidden states, so the replicated decoder and input embeddings get
identical gradients on every rank without any DDP wrapper; the head gradient stays local to the shard.

What has to be global is done here: the gradient-norm clip (the head's part of the norm is summed over
ranks), the weight fingerprint, and checkpoints (parallel.TensorParallel calls these from the loop). A checkpoint holds the FULL model and the FULL optimizer
state (the head rows and their Adam moments gathered to rank 0), exactly as an untied single-process run
would write it: ``from_pretrained`` / ``lsa eval`` load it as is, and ``--resume`` slices it again (with
any ``--tensor-parallel``, or none).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

Tensor = torch.Tensor


@dataclass
class HeadShard:
    group: object
    rank: int
    world: int
    vocab_total: int  # V: rows of the full head
    sizes: List[int]  # V_r of every rank
    has_bias: bool

    @property
    def start(self) -> int:
        return sum(self.sizes[: self.rank])

    @property
    def size(self) -> int:
        return self.sizes[self.rank]

    def loss_kw(self) -> dict:
        return {"process_group": self.group, "vocab_start": self.start}


def is_tied(model) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None:
        return False
    return out.weight is inp.weight or out.weight.data_ptr() == inp.weight.data_ptr()


def untie_embeddings(model) -> bool:
    """Give the output head its own copy of the (tied) weight; returns whether anything changed."""
    if not is_tied(model):
        return False
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    for c in {id(model.config): model.config, id(model.config.get_text_config()): model.config.get_text_config()}.values():
        c.tie_word_embeddings = False  # save_pretrained / from_pretrained then keep both matrices
    return True


def shard_head(model, group=None) -> HeadShard:
    """Replace the model's (untied) output embedding by this rank's vocab slice; returns the shard."""
    group = group or dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    head = model.get_output_embeddings()
    if is_tied(model):
        raise ValueError("shard_head needs untied embeddings (call untie_embeddings first)")
    W = head.weight.detach()
    b = getattr(head, "bias", None)
    V, H = W.shape
    if V < world:
        raise ValueError(f"cannot shard a vocabulary of {V} over {world} ranks")
    sizes = [int(t.shape[0]) for t in torch.tensor_split(torch.empty(V, 0), world)]
    shard = HeadShard(group, rank, world, V, sizes, isinstance(b, Tensor))
    lin = nn.Linear(H, shard.size, bias=shard.has_bias, device=W.device, dtype=W.dtype)
    with torch.no_grad():
        lin.weight.copy_(W[shard.start : shard.start + shard.size])
        if shard.has_bias:
            lin.bias.copy_(b.detach()[shard.start : shard.start + shard.size])
    model.set_output_embeddings(lin)
    return shard


def head_params(model) -> List[Tensor]:
    head = model.get_output_embeddings()
    return [p for p in (head.weight, getattr(head, "bias", None)) if isinstance(p, Tensor)]


def _gather_rows(t: Tensor, shard: HeadShard) -> Optional[Tensor]:
    """This rank's rows of a head-shaped tensor -> the full tensor on rank 0 (None elsewhere)."""
    pad = max(shard.sizes) - t.shape[0]
    tp = torch.cat([t, t.new_zeros((pad,) + tuple(t.shape[1:]))]) if pad else t.contiguous()
    parts = [torch.empty_like(tp) for _ in range(shard.world)] if shard.rank == 0 else None
    dist.gather(tp, parts, dst=0, group=shard.group)
    if shard.rank != 0:
        return None
    return torch.cat([p[:n] for p, n in zip(parts, shard.sizes)])


def _param_ids(opt) -> Dict[int, int]:
    """id(param) -> its index in ``optimizer.state_dict()['state']``."""
    ids, i = {}, 0
    for g in opt.param_groups:
        for p in g["params"]:
            ids[id(p)] = i
            i += 1
    return ids


def full_checkpoint_state(model, opt, shard: HeadShard):
    """Collective. On rank 0: (the full head as an nn.Linear, the full optimizer state dict); else (None, None)."""
    head = model.get_output_embeddings()
    W = _gather_rows(head.weight.detach(), shard)
    b = _gather_rows(head.bias.detach(), shard) if shard.has_bias else None
    sd = opt.state_dict()
    ids = _param_ids(opt)
    for p in head_params(model):
        if ids[id(p)] not in sd["state"]:
            continue
        st = sd["state"][ids[id(p)]] = dict(sd["state"][ids[id(p)]])  # state_dict() shares the live tensors
        for k in sorted(st):
            v = st[k]
            if isinstance(v, Tensor) and v.shape == p.shape:
                full = _gather_rows(v, shard)
                if full is not None:
                    st[k] = full
    if shard.rank != 0:
        return None, None
    lin = nn.Linear(W.shape[1], W.shape[0], bias=b is not None, device=W.device, dtype=W.dtype)
    with torch.no_grad():
        lin.weight.copy_(W)
        if b is not None:
            lin.bias.copy_(b)
    return lin, sd


@contextlib.contextmanager
def swapped_head(model, full: nn.Module):
    """The model with ``full`` as its output embedding for the duration (to save_pretrained it)."""
    shard = model.get_output_embeddings()
    model.set_output_embeddings(full)
    try:
        yield model
    finally:
        model.set_output_embeddings(shard)


def slice_optimizer_state(sd: dict, model, opt, shard: Optional[HeadShard]) -> dict:
    """A full (unsharded) optimizer state dict -> this rank's, by slicing the head's per-row tensors."""
    if shard is None:
        return sd
    ids = _param_ids(opt)
    for p in head_params(model):
        if ids[id(p)] not in sd["state"]:
            continue
        st = sd["state"][ids[id(p)]] = dict(sd["state"][ids[id(p)]])
        for k, v in list(st.items()):
            if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == shard.vocab_total and v.shape[1:] == p.shape[1:]:
                st[k] = v[shard.start : shard.start + shard.size].clone()
    return sd


def clip_grad_norm_(model, max_norm: float, shard: HeadShard) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole (logical) model: the replicated parameters count
    once, the head shards of all ranks together. The same norm (bit for bit) on every rank."""
    head = {id(p) for p in head_params(model)}
    rep = [p.grad for p in model.parameters() if p.grad is not None and id(p) not in head]
    hg = [p.grad for p in model.parameters() if p.grad is not None and id(p) in head]
    dev = next(model.parameters()).device
    rep_sq = torch.stack([torch.linalg.vector_norm(g.float()) ** 2 for g in rep]).sum() if rep else torch.zeros((), device=dev)
    head_sq = torch.stack([torch.linalg.vector_norm(g.float()) ** 2 for g in hg]).sum() if hg else torch.zeros((), device=dev)
    parts = [torch.empty_like(head_sq.reshape(1)) for _ in range(shard.world)]
    dist.all_gather(parts, head_sq.reshape(1).contiguous(), group=shard.group)
    total = torch.sqrt(rep_sq + torch.cat(parts).sum())  # summed in rank order: identical on every rank
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in rep + hg:
        g.mul_(coef.to(g.dtype))
    return total


@torch.no_grad()
def param_sum(model, shard: HeadShard) -> float:
    """Σ of all weights of the logical (unsharded) model; the same on every rank."""
    head = {id(p) for p in head_params(model)}
    rep = sum(float(p.double().sum()) for p in model.parameters() if id(p) not in head)
    mine = torch.tensor([sum(float(p.double().sum()) for p in model.parameters() if id(p) in head)], dtype=torch.float64)
    mine = mine.to(next(model.parameters()).device)
    parts = [torch.empty_like(mine) for _ in range(shard.world)]
    dist.all_gather(parts, mine, group=shard.group)
    return rep + float(torch.cat(parts).sum())
