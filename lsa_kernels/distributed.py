"""Vocabulary-parallel heads: which slice of the vocabulary each rank of a process group holds.

A head sharded over the vocabulary (``process_group=``, ``vocab_start=`` of every public op; :mod:`lsa_kernels.dispatch`)
runs through :class:`VocabParallel` (:mod:`lsa_kernels.backends.vocab_parallel`: the exact merge of the
per-row statistics across ranks, its maths and its bytes on the wire). This module finds the shards:
:func:`shard_info` exchanges every rank's ``(vocab_start, V_r)`` once and checks that they tile ``[0, V)``.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.distributed as dist

__all__ = ["Shard", "shard_info"]


@dataclass(frozen=True)
class Shard:
    """This rank's slice of the vocabulary and the group it belongs to."""

    group: object
    rank: int
    world: int
    vocab_start: int
    vocab_size: int  # V_r
    vocab_total: int  # V


# (id(group), vocab_start, V_r) -> (weak reference to the group, the Shard without its group). The cache
# never keeps a process group alive: a group object that outlives destroy_process_group() is destroyed at
# interpreter exit, when gloo's worker threads can no longer take the GIL (an abort at exit).
_SHARDS: Dict[Tuple[int, int, int], Tuple["weakref.ref", "Shard"]] = {}


def shard_info(group, vocab_start: int, vocab_size: int, device: torch.device) -> Shard:
    """Exchange (start, size) of every rank once per (group, shard) and check that they tile [0, V).

    The exchange is a collective (and a host sync); it is cached, so training steps do not repeat it.
    """
    key = (id(group), int(vocab_start), int(vocab_size))
    hit = _SHARDS.get(key)
    if hit is not None and hit[0]() is group:
        return dataclasses.replace(hit[1], group=group)
    world = dist.get_world_size(group)
    mine = torch.tensor([vocab_start, vocab_size], dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    spans = sorted((int(p[0]), int(p[1])) for p in parts)
    pos = 0
    for start, size in spans:
        if start != pos or size < 1:
            raise ValueError(
                f"vocab shards must tile [0, V) without gaps or overlaps; got (vocab_start, V_r) per rank {spans}"
            )
        pos += size
    shard = Shard(group, dist.get_rank(group), world, int(vocab_start), int(vocab_size), pos)
    _SHARDS[key] = (weakref.ref(group), dataclasses.replace(shard, group=None))
    return shard
