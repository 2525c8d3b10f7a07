"""Measure the communication of the vocab-parallel losses: bytes each rank sends through
torch.distributed per op (forward + backward), against gathering the logits.

    python benchmarks/tp_comm.py [--world 2] [--rows 2048] [--hidden 256] [--vocab 32768]

Every collective the losses issue is intercepted and its payload counted (all_gather: the rank's own
tensor; all_reduce: the tensor; those of [rows, H] tensors are dX, the rest statistics). The "gather logits" baseline is what a naive vocab-parallel loss
moves: every rank's [N, V_r] fp32 logits to every other rank (all_gather), per view, plus the same
all-reduce of dX in backward. Writes benchmarks/results/tp_comm.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Counter:
    def __init__(self, hidden: int):
        self.bytes = {"all_gather": 0, "all_reduce": 0}
        self.dx_bytes = 0  # all-reduces of [rows, H] tensors: the dX of the backward
        self.hidden = hidden
        self._orig = {}

    def __enter__(self):
        for name in self.bytes:
            orig = getattr(dist, name)
            self._orig[name] = orig

            def wrapped(*args, _orig=orig, _name=name, **kw):
                t = args[1] if _name == "all_gather" else args[0]
                self.bytes[_name] += t.numel() * t.element_size()
                if _name == "all_reduce" and t.dim() == 2 and t.shape[1] == self.hidden:
                    self.dx_bytes += t.numel() * t.element_size()
                return _orig(*args, **kw)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, orig in self._orig.items():
            setattr(dist, name, orig)


def _worker(rank, world, port, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(HERE))
    import lsa_kernels as L

    N, H, V = args.rows, args.hidden, args.vocab
    sizes = [len(c) for c in torch.arange(V).tensor_split(world)]
    start, Vr = sum(sizes[:rank]), sizes[rank]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g)[start : start + Vr] / H**0.5
    y = torch.randint(0, V, (N,), generator=g)
    B, T = 2, N // 2
    rows = []
    kw = dict(backend="cpu", process_group=dist.group.WORLD, vocab_start=start)
    for op in ("ce", "long_short", "long_short_js"):
        xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        L.linear_cross_entropy(xs[:8], ws, y[:8], **kw)  # first call: shard exchange (cached), not counted
        with Counter(H) as c:
            if op == "ce":
                L.linear_cross_entropy(xs, ws, y, **kw).backward()
                views = 1
            else:
                hl, hs = xs.view(B, T, H), (xs * 0.9).view(B, T, H)
                div = "js" if op.endswith("js") else "sce"
                L.long_short_loss(hl, hs, ws, y.view(B, T), y.view(B, T), l_extra=T // 4, divergence=div,
                                  **kw).loss.backward()
                views = 2
        logits = views * N * Vr * 4  # this rank's logits, sent to every other rank by an all_gather
        dx = views * N * H * 4
        # all-reduces of [*, H] tensors are dX; the others ([N, 2]: js's second exchange) are statistics
        rows.append(dict(op=op, world=world, rows_per_view=N, H=H, V=V, V_rank=Vr,
                         all_gather_bytes=c.bytes["all_gather"], all_reduce_bytes=c.bytes["all_reduce"],
                         dx_all_reduce_bytes=c.dx_bytes, stats_bytes=c.bytes["all_gather"] + c.bytes["all_reduce"] - c.dx_bytes,
                         gather_logits_bytes=logits + dx))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "tp_comm.json"))
    args = ap.parse_args(argv)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    mp.spawn(_worker, args=(args.world, _port(), args, args.out), nprocs=args.world, join=True)
    rows = json.load(open(args.out))
    print("| op | ranks | rows/view | H | V (per rank) | sent per rank: statistics | dX all-reduce | total "
          "| gathering the logits | ratio |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        tot = r["all_gather_bytes"] + r["all_reduce_bytes"]
        print(f"| {r['op']} | {r['world']} | {r['rows_per_view']} | {r['H']} | {r['V']} ({r['V_rank']}) "
              f"| {r['stats_bytes'] / 1e3:.1f} kB | {r['dx_all_reduce_bytes'] / 1e6:.2f} MB | {tot / 1e6:.2f} MB "
              f"| {r['gather_logits_bytes'] / 1e6:.1f} MB | {r['gather_logits_bytes'] / tot:.0f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
