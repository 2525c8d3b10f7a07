"""Vocab-parallel losses over a gloo process group (2 and 4 CPU processes, uneven shards): values and
gradients equal the single-process reference; dW stays a shard; dX is the full gradient on every rank."""

import pytest
import torch
import torch.distributed as dist

import lsa_kernels as L
from lsa_kernels import reference as R

from _util import run_gloo

IGN = -100
H, V = 24, 211


def _shards(world: int):
    """Uneven split of [0, V): sizes grow with the rank."""
    weights = [r + 1 for r in range(world)]
    sizes = [V * w // sum(weights) for w in weights]
    sizes[-1] += V - sum(sizes)
    starts = [sum(sizes[:r]) for r in range(world)]
    return starts, sizes


def _data():
    g = torch.Generator().manual_seed(0)
    hl, hs = torch.randn(2, 2, 9, H, generator=g, dtype=torch.float64).unbind(0)
    hs = 0.6 * hs + 0.8 * hl
    w = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5 * 2
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.1
    yl, ys = torch.randint(0, V, (2, 2, 9), generator=g).unbind(0)
    yl[0, :3] = IGN
    ys[1, 4] = IGN
    return hl, hs, w, b, yl, ys


CASES = [
    ("ce", dict(label_smoothing=0.1, z_loss=1e-3)),
    ("ce", dict(softcap=3.0, reduction="none")),
    ("ce", dict(label_smoothing=0.2, softcap=2.0, reduction="none")),  # Σ softcap(z) from the shards
    ("div", dict(divergence="sce", temperature=0.8, softcap=4.0)),
    ("div", dict(divergence="kl", detach="p")),
    ("div", dict(divergence="kl_reverse", reduction="none")),
    ("div", dict(divergence="sym_kl", detach="q")),
    ("div", dict(divergence="js", temperature=1.5, softcap=4.0, reduction="none")),  # two exchanges
    ("div", dict(divergence="js", detach="q")),
] + [("ls", dict(divergence=d, l_extra=3, alpha=0.3, label_smoothing=0.1, detach=det))
     for d, det in [("sce", None), ("kl", "long"), ("kl_reverse", "short"), ("sym_kl", None), ("js", None)]] + [
    ("ls", dict(divergence="js", l_extra=2, alpha=0.5, label_smoothing=0.1, softcap=3.0, z_loss=1e-3,
                temperature=0.7, detach="long")),
]
# the Triton backend (interpreter) under a process group: the cases that exercise its own entry points
TRITON_CASES = [CASES[2], CASES[7], CASES[-1]]


def _run_case(kind, kw, hl, hs, w, b, yl, ys, **extra):
    """Returns (outputs, grads of inputs in order hl, hs, w, b)."""
    ins = [t.clone().requires_grad_(True) for t in (hl, hs, w, b)]
    if kind == "ce":
        out = (extra.pop("fn", L.linear_cross_entropy))(ins[0], ins[2], yl, linear_bias=ins[3], **kw, **extra)
        outs = [out]
    elif kind == "div":
        out = (extra.pop("fn", L.linear_divergence))(ins[0], ins[1], ins[2], linear_bias=ins[3], **kw, **extra)
        outs = [out]
    else:
        outs = list((extra.pop("fn", L.long_short_loss))(ins[0], ins[1], ins[2], yl, ys, linear_bias=ins[3], **kw,
                                                         **extra))
    scalar = sum((i + 1) * o.sum() for i, o in enumerate(outs))
    grads = torch.autograd.grad(scalar, ins, allow_unused=True)
    return [o.detach() for o in outs], [None if g is None else g.detach() for g in grads]


def _body(rank, world, dtype=torch.float64, backend="cpu"):
    starts, sizes = _shards(world)
    s, n = starts[rank], sizes[rank]
    hl, hs, w, b, yl, ys = _data()
    tight = dtype == torch.float64  # fp64: the ATen path, exact; fp32: the C++ path when built
    rt, at = (1e-9, 1e-10) if tight else (2e-5, 1e-6)
    truth = (hl, hs, w, b)
    hl, hs, w, b = (t.to(dtype) for t in (hl, hs, w, b))
    for kind, kw in (CASES if backend == "cpu" else TRITON_CASES):
        ref_out, ref_g = _run_case(kind, kw, *truth, yl, ys, fn={"ce": R.linear_cross_entropy,
                                                                      "div": R.linear_divergence,
                                                                      "ls": R.long_short_loss}[kind])
        out, g = _run_case(kind, kw, hl, hs, w[s:s + n], b[s:s + n], yl, ys, backend=backend,
                           process_group=dist.group.WORLD, vocab_start=s)
        for o, r in zip(out, ref_out):
            torch.testing.assert_close(o.double(), r, rtol=rt, atol=at, msg=lambda m: f"{kind} {kw} value: {m}")
        expect = [ref_g[0], ref_g[1], None if ref_g[2] is None else ref_g[2][s:s + n],
                  None if ref_g[3] is None else ref_g[3][s:s + n]]
        for name, a, e in zip(["d_in0", "d_in1", "dw", "db"], g, expect):
            a = torch.zeros_like(e) if (a is None and e is not None) else a
            e = torch.zeros_like(a) if (e is None and a is not None) else e
            if a is not None:
                torch.testing.assert_close(a.double(), e, rtol=rt * 10, atol=at, msg=lambda m: f"{kind} {kw} {name}: {m}")


@pytest.mark.parametrize("world,dtype,backend", [(2, torch.float64, "cpu"), (4, torch.float64, "cpu"),
                                                 (3, torch.float32, "cpu"), (2, torch.float32, "triton")])
def test_vocab_parallel_matches_single_process(world, dtype, backend, tmp_path):
    if backend == "triton":
        pytest.importorskip("triton")
    run_gloo(_body, world, tmp_path, dtype, backend)


def test_vocab_start_needs_a_process_group():
    with pytest.raises(ValueError, match="vocab_start"):
        L.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), vocab_start=2)


def test_js_partial_with_own_normalisers_is_js():
    """``pair_js_partial`` with the weight's own lse gives js's X and Y (what a 1-shard group computes)."""
    from lsa_kernels.backends import PairRows, get
    from lsa_kernels.options import STAT_LSET_P, STAT_LSET_Q, STAT_X, STAT_Y, PairOptions

    g = torch.Generator().manual_seed(1)
    xp, xq = torch.randn(2, 7, 5, generator=g, dtype=torch.float64)
    w, b = torch.randn(13, 5, generator=g, dtype=torch.float64), torch.randn(13, generator=g, dtype=torch.float64)
    opts = PairOptions(divergence="js", temperature=0.6, with_ce=False)
    cpu = get("cpu")
    st = cpu.pair_forward(PairRows(xp, xq), w, b, opts).stats
    part = cpu.pair_js_partial(xp, xq, w, b, st[:, STAT_LSET_P : STAT_LSET_Q + 1], opts)
    torch.testing.assert_close(part, st[:, [STAT_X, STAT_Y]])
    ref = R.linear_divergence(xp, xq, w, linear_bias=b, divergence="js", temperature=0.6, reduction="none")
    torch.testing.assert_close(0.5 * part.sum(1), ref)


def test_process_group_is_not_kept_alive(tmp_path):
    """After the losses ran on a group, destroy_process_group() frees it: nothing in lsa_kernels (the shard
    cache, saved autograd state) holds it. A group that survives is destroyed at interpreter exit, where
    gloo's threads abort the process ("terminate called without an active exception": a CI failure)."""
    import gc
    import weakref

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        g = torch.Generator().manual_seed(2)
        x = torch.randn(1, 5, 8, generator=g, requires_grad=True)
        w = torch.randn(11, 8, generator=g, requires_grad=True)
        y = torch.randint(0, 11, (1, 5), generator=g)
        grp = dist.group.WORLD
        L.linear_cross_entropy(x[0], w, y[0], process_group=grp, vocab_start=0).backward()
        L.long_short_loss(x, 0.5 * x.detach(), w, y, y, l_extra=1, alpha=0.2, divergence="js", process_group=grp,
                          vocab_start=0).loss.backward()
        ref = weakref.ref(grp)
        del grp
    finally:
        dist.destroy_process_group()
    gc.collect()
    assert ref() is None
