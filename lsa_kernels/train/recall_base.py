"""The shipped pretrained base of the recall testbed (``lsa_kernels/data/recall_base``).

A 2-layer Llama (d = 128, 4 heads / 2 KV heads, FFN 352, untied head, the shipped 4096-token BPE,
``max_position_embeddings`` = 64) pretrained from scratch so that it copies from context (an induction
mechanism) and answers "NAME's number is" queries from a fact stated earlier in the window. It is made in three
stages, each from the previous one's weights (``make recall-base``; records in
benchmarks/results/recall_pilot/, docs/recall_testbed.md, "The shipped base"):

    python -m lsa_kernels.train.pretrain_recall --recipe induction-fullpool --layers 2 --max-positions 64 \
        --batch 64 --steps 2400 --out stage1.json --save stage1       # induction over random rare tokens
    python -m lsa_kernels.train.pretrain_recall --recipe induction-phase2 --init stage1 --layers 2 \
        --max-positions 64 --batch 64 --steps 1000 --out stage2.json --save stage2   # + text, spans, facts
    python -m lsa_kernels.train.pretrain_recall --recipe induction-phase3 --init stage2 --layers 2 \
        --max-positions 64 --batch 64 --steps 3000 --out stage3.json --save stage3   # + copying any token

``SHA256SUMS`` in the directory pins its weights; :func:`verify` checks them before the demo uses the base.
"""

from __future__ import annotations

import hashlib
import os

from .config import ConfigError

__all__ = ["SHIPPED_BASE", "verify"]

SHIPPED_BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "recall_base")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: str = SHIPPED_BASE) -> None:
    """ConfigError unless every file listed in ``path/SHA256SUMS`` has the listed checksum."""
    sums = os.path.join(path, "SHA256SUMS")
    if not os.path.isfile(sums):
        raise ConfigError(f"{path!r} has no SHA256SUMS: not the shipped recall base")
    with open(sums) as f:
        for line in f:
            if not line.strip():
                continue
            digest, name = line.split(maxsplit=1)
            name = name.strip().lstrip("*")
            fp = os.path.join(path, name)
            if not os.path.isfile(fp) or _sha256(fp) != digest:
                raise ConfigError(f"the recall base's {name} is missing or does not match its SHA256SUMS "
                                  f"({path}); reinstall the package or rebuild it with the command in "
                                  "lsa_kernels/train/recall_base.py")
