"""Per-token outputs, probability targets and class weights under ``process_group=`` (vocab-parallel head, docs/maths.md §15): per-token entropy and accuracy,
probability targets (the full ``[..., V]`` distribution or this rank's ``[..., V_r]`` columns) and class weights
with label smoothing, on 2 and 3 gloo ranks with uneven shards of an odd V, against the fp64 reference on the
unsharded head: values and every gradient (dX, this rank's dW and db rows, a probability target's).
fp32 by tolerance, bf16 by CCE's rule (docs/maths.md §7); cpu and Triton (interpreter) local backends."""

import pytest
import torch
import torch.distributed as dist

import lsa_kernels as L
from lsa_kernels import reference as R

from _util import assert_within, run_gloo

IGN = -100
H, V = 16, 53  # V prime: no world size divides it
ROWS = (2, 7)


def _shards(world: int):
    """Uneven split of [0, V): sizes grow with the rank."""
    weights = [r + 1 for r in range(world)]
    sizes = [V * w // sum(weights) for w in weights]
    sizes[-1] += V - sum(sizes)
    return [sum(sizes[:r]) for r in range(world)], sizes


def _data():
    g = torch.Generator().manual_seed(16)
    x = torch.randn(*ROWS, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5 * 2
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.1
    y = torch.randint(0, V, ROWS, generator=g)
    y[..., ::2] = (x @ w.T + b).argmax(-1)[..., ::2]  # rows whose accuracy is True
    y[0, :3] = IGN
    y[1, 5] = IGN
    t = torch.softmax(2 * torch.randn(*ROWS, V, generator=g, dtype=torch.float64), -1)
    t[1, 2] *= 0.5  # a row whose mass is not 1: (Σ_v t_v)·lse
    cw = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    tw = torch.rand(ROWS, generator=g, dtype=torch.float64) + 0.25
    ent_coef = torch.randn(ROWS, generator=g, dtype=torch.float64)
    return dict(x=x, w=w, b=b, y=y, t=t, cw=cw, tw=tw, ent_coef=ent_coef)


# (name, kwargs); "target": "y" (class ids), "t" (the full distribution), "t_local" (this rank's columns);
# "grad_t": the probability target takes a gradient too
CASES = [
    ("pt", dict(return_lse=True, return_entropy=True, return_accuracy=True)),
    ("pt_ls", dict(return_entropy=True, return_accuracy=True, label_smoothing=0.1, z_loss=1e-3, reduction="sum")),
    ("pt_cap", dict(return_lse=True, return_entropy=True, return_accuracy=True, softcap=2.5, reduction="none",
                    token_weight="tw")),
    ("pt_cw", dict(return_entropy=True, weight="cw")),
    ("prob", dict(target="t")),
    ("prob_all", dict(target="t", label_smoothing=0.2, weight="cw", z_loss=1e-3, reduction="none", grad_t=True)),
    ("prob_local", dict(target="t_local", token_weight="tw", reduction="sum", grad_t=True)),
    ("prob_local_cw", dict(target="t_local", weight="cw", label_smoothing=0.05)),
    ("cw_ls", dict(weight="cw", label_smoothing=0.15)),
    ("cw_ls_none", dict(weight="cw", label_smoothing=0.3, z_loss=1e-3, reduction="none", token_weight="tw")),
    ("cw_ls_sum", dict(weight="cw", label_smoothing=0.1, reduction="sum")),
    # softcap with dense targets (docs/maths.md §11: T read next to the capped logits, every shard)
    ("prob_cap", dict(target="t", softcap=2.5, weight="cw", label_smoothing=0.1, grad_t=True)),
    ("prob_local_cap", dict(target="t_local", softcap=3.0, reduction="none", grad_t=True)),
    ("cw_ls_cap", dict(weight="cw", label_smoothing=0.2, softcap=2.0, z_loss=1e-3, token_weight="tw")),
]
TRITON = ("pt_cap", "prob_all", "cw_ls_none", "prob_cap", "cw_ls_cap")
BF16 = ("pt", "pt_cap", "prob_all", "cw_ls_none")


def _run(d, kw, dtype, shard=None, **extra):
    """(outputs {name: tensor}, grads {name: tensor}) of one call; ``shard`` = (start, size) runs our op on that
    slice of the head, None the reference on the whole head."""
    kw = dict(kw)
    tname, grad_t = kw.pop("target", "y"), kw.pop("grad_t", False)
    for k in ("weight", "token_weight"):
        if isinstance(kw.get(k), str):
            kw[k] = d[kw[k]].to(dtype)
    x, w, b = (d[k].to(dtype).requires_grad_() for k in ("x", "w", "b"))
    ins = {"dx": x, "dw": w, "db": b}
    if shard is not None:
        s, n = shard
        w_, b_ = w[s:s + n], b[s:s + n]
    else:
        w_, b_ = w, b
    if tname == "y":
        target = d["y"]
    else:
        target = d["t"].to(dtype)
        if tname == "t_local" and shard is not None:
            target = target[..., shard[0]:shard[0] + shard[1]]
        if grad_t:
            target = target.detach().requires_grad_()
            ins["dt"] = target
    fn = R.linear_cross_entropy if shard is None else L.linear_cross_entropy
    out = fn(x, w_, target, linear_bias=b_, **kw, **extra)
    res = {}
    if isinstance(out, tuple):
        res = {k: v for k, v in zip(("loss", "lse", "entropy", "accuracy"), out) if v is not None}
    else:
        res["loss"] = out
    scalar = 1.3 * res["loss"].sum()
    if "entropy" in res:
        scalar = scalar + (res["entropy"] * d["ent_coef"].to(res["entropy"].dtype)).sum()
    gs = torch.autograd.grad(scalar, list(ins.values()))
    grads = dict(zip(ins, gs))
    if shard is not None:  # the shard's rows of dW, db: compare with the reference's
        grads["dw"], grads["db"] = grads["dw"][s:s + n], grads["db"][s:s + n]
    return {k: v.detach() for k, v in res.items()}, grads


def _expect(grads, kw, shard):
    """The reference's gradients cut to what this rank holds."""
    s, n = shard
    out = dict(grads, dw=grads["dw"][s:s + n], db=grads["db"][s:s + n])
    if "dt" in out and kw.get("target") == "t_local":
        out["dt"] = out["dt"][..., s:s + n]
    return out


def _body(rank, world, dtype, backend):
    starts, sizes = _shards(world)
    shard = (starts[rank], sizes[rank])
    d = _data()
    if dtype != torch.float64:  # the fp64 truth of the inputs as the op sees them (rounded to dtype)
        d = {k: v.to(dtype).double() if v.is_floating_point() else v for k, v in d.items()}
    grp = dict(process_group=dist.group.WORLD, vocab_start=shard[0], backend=backend)
    names = TRITON if backend == "triton" else (BF16 if dtype == torch.bfloat16 else [c[0] for c in CASES])
    z = d["x"] @ d["w"].T + d["b"]  # fp64 logits (no softcap) for the argmax margin
    top2 = z.topk(2, -1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.05  # rows whose argmax no rounding can move
    for name, kw in CASES:
        if name not in names:
            continue
        truth_o, truth_g = _run(d, kw, torch.float64)
        ours_o, ours_g = _run(d, kw, dtype, shard, **grp)
        lowp_o = lowp_g = None
        if dtype == torch.bfloat16:
            lowp_o, lowp_g = _run(d, kw, dtype)
            lowp_g = _expect(lowp_g, kw, shard)
        assert set(ours_o) == set(truth_o), name
        for k, v in ours_o.items():
            if k == "accuracy":
                assert truth_o[k].any() and not truth_o[k].all(), name  # a test that can fail
                if dtype == torch.bfloat16:
                    assert torch.equal(v[clear], truth_o[k][clear]), f"{name} accuracy"
                else:
                    assert torch.equal(v, truth_o[k]), f"{name} accuracy: {v} vs {truth_o[k]}"
                continue
            _close(v, truth_o[k], dtype, f"{name} {k}", None if lowp_o is None else lowp_o[k])
        exp = _expect(truth_g, kw, shard)
        assert set(ours_g) == set(exp), name
        for k, v in ours_g.items():
            assert exp[k].abs().max() > 1e-6, f"{name} {k}: a zero gradient cannot catch a bug"
            _close(v, exp[k], dtype, f"{name} {k}", None if lowp_g is None else lowp_g[k])


def _close(v, want, dtype, name, lowp=None):
    assert v.dtype == dtype, f"{name}: dtype {v.dtype}"
    if dtype == torch.float64:
        torch.testing.assert_close(v, want, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")
    elif dtype == torch.float32:
        assert_within(v, want, atol=2e-6, rtol=2e-5, name=name)
    else:
        assert_within(v, want, atol=1e-4 + 2.0**-8 * want.abs().max().item(), rtol=1e-3, lowp=lowp, name=name)


@pytest.mark.parametrize("world,dtype,backend", [(2, torch.float64, "cpu"), (3, torch.float64, "cpu"),
                                                 (3, torch.float32, "cpu"), (2, torch.bfloat16, "cpu"),
                                                 (2, torch.float32, "triton"), (2, torch.bfloat16, "triton")],
                         ids=["2-fp64-cpu", "3-fp64-cpu", "3-fp32-cpu", "2-bf16-cpu", "2-fp32-triton",
                              "2-bf16-triton"])
def test_per_token_and_dense_options_under_process_group(world, dtype, backend, tmp_path):
    if backend == "triton":
        pytest.importorskip("triton")
    run_gloo(_body, world, tmp_path, dtype, backend)


# ---------------------------------------------------------------------------------------- argmax ties


def _ties_body(rank, world, backend):
    """Exact ties across shards: identical rows (and biases) of W on different ranks. The global argmax is the
    LOWEST global id among them (torch.argmax's rule), whichever rank holds it."""
    starts, sizes = _shards(world)
    s, n = starts[rank], sizes[rank]
    g = torch.Generator().manual_seed(5)
    w = torch.randn(V, H, generator=g) / H**0.5
    b = torch.randn(V, generator=g) * 0.1
    last = starts[-1]
    a0, a1 = 3, last + 2  # tie group A: shard 0 and the last shard
    c0, c1, c2 = starts[1] + 1, last + 5, last + 1  # group B: shard 1 (the last one for world 2) and the last
    w[a1], b[a1] = w[a0], b[a0]
    w[c1], b[c1] = w[c0], b[c0]
    w[c2], b[c2] = w[c0], b[c0]
    x = torch.stack([6 * w[a0], 6 * w[a0], 6 * w[c0], 6 * w[c0], 6 * w[c0]])
    y = torch.tensor([a0, a1, c0, c1, c2])
    want_am = torch.tensor([a0, a0, c0, c0, c0])
    z = x @ w.T + b
    assert torch.equal(z.argmax(-1), want_am)  # the construction: those rows are the maxima
    ref = R.linear_cross_entropy(x, w, y, linear_bias=b, return_accuracy=True, reduction="none")
    assert torch.equal(ref.accuracy, y == want_am)
    from lsa_kernels.backends import vocab_parallel as vp

    exact = dict(vp._EXACT_INT)
    for packed in (True, False):  # the ids in the float exchange, or (a V beyond 2^24) their own int64 gather
        if not packed:
            vp._EXACT_INT.update({k: 1 for k in exact})
        try:
            out = L.linear_cross_entropy(x, w[s:s + n], y, linear_bias=b[s:s + n], return_accuracy=True,
                                         reduction="none", process_group=dist.group.WORLD, vocab_start=s,
                                         backend=backend)
        finally:
            vp._EXACT_INT.update(exact)
        assert torch.equal(out.accuracy, y == want_am), f"rank {rank} packed={packed}: {out.accuracy}"


@pytest.mark.parametrize("world,backend", [(2, "cpu"), (3, "cpu"), (2, "triton")])
def test_argmax_ties_go_to_the_lowest_global_id(world, backend, tmp_path):
    if backend == "triton":
        pytest.importorskip("triton")
    run_gloo(_ties_body, world, tmp_path, backend)


# ------------------------------------------------------------------------------------------- bad input


def _bad_body(rank, world):
    starts, sizes = _shards(world)
    s, n = starts[rank], sizes[rank]
    d = _data()
    x, w = d["x"].float(), d["w"][s:s + n].float()
    for last in (V + 1, n + 1, n - 1):
        t = torch.softmax(torch.randn(*ROWS, last), -1)
        with pytest.raises(ValueError, match=r"target \(probabilities\) under process_group= must have last dim "
                                             rf"V={V} .* or V_r={n}"):
            L.linear_cross_entropy(x, w, t, process_group=dist.group.WORLD, vocab_start=s)
    with pytest.raises(TypeError, match="target must hold"):  # leading dims still checked
        L.linear_cross_entropy(x, w, torch.rand(3, V), process_group=dist.group.WORLD, vocab_start=s)


def test_probability_target_of_the_wrong_last_dim(tmp_path):
    run_gloo(_bad_body, 2, tmp_path)


# ------------------------------------------------------------------------- long_short_loss per-view outputs

LS_CASES = [
    dict(divergence="sce", l_extra=3, alpha=0.3, label_smoothing=0.1, softcap=2.5),
    dict(divergence="js", l_extra=2, alpha=0.5, z_loss=1e-3, temperature=0.7, detach="long"),
    dict(divergence="kl", l_extra=4, alpha=0.2, ce_weighting="longce", token_weight_long="tw"),
]


def _ls_run(d, kw, dtype, shard=None, **extra):
    kw = dict(kw)
    if isinstance(kw.get("token_weight_long"), str):
        kw["token_weight_long"] = d[kw["token_weight_long"]].to(dtype)
    hl, hs, w, b = (d[k].to(dtype).requires_grad_() for k in ("x", "hs", "w", "b"))
    w_, b_ = (w, b) if shard is None else (w[shard[0]:shard[0] + shard[1]], b[shard[0]:shard[0] + shard[1]])
    fn = R.long_short_loss if shard is None else L.long_short_loss
    out = fn(hl, hs, w_, d["y"], d["ys"], linear_bias=b_, return_lse=True, return_entropy=True,
             return_accuracy=True, **kw, **extra)
    res = dict(loss=out.loss, ce=out.ce, mis=out.misalign, lse_l=out.long.lse, lse_s=out.short.lse,
               ent_l=out.long.entropy, ent_s=out.short.entropy, acc_l=out.long.accuracy, acc_s=out.short.accuracy)
    ec = d["ent_coef"].to(dtype)
    scalar = 1.3 * out.loss + 0.4 * out.ce + (out.long.entropy * ec).sum() - 0.7 * (out.short.entropy * ec).sum()
    gs = dict(zip(("dhl", "dhs", "dw", "db"), torch.autograd.grad(scalar, [hl, hs, w, b])))
    if shard is not None:
        gs["dw"], gs["db"] = gs["dw"][shard[0]:shard[0] + shard[1]], gs["db"][shard[0]:shard[0] + shard[1]]
    return {k: v.detach() for k, v in res.items()}, gs


def _ls_body(rank, world, dtype, backend):
    starts, sizes = _shards(world)
    shard = (starts[rank], sizes[rank])
    d = _data()
    g = torch.Generator().manual_seed(7)
    d["hs"] = 0.6 * torch.randn(d["x"].shape, generator=g, dtype=torch.float64) + 0.8 * d["x"]
    d["ys"] = torch.where(torch.arange(ROWS[1]) % 3 == 0, (d["hs"] @ d["w"].T + d["b"]).argmax(-1), d["y"].roll(1, -1))
    grp = dict(process_group=dist.group.WORLD, vocab_start=shard[0], backend=backend)
    for kw in LS_CASES:
        truth_o, truth_g = _ls_run(d, kw, torch.float64)
        ours_o, ours_g = _ls_run(d, kw, dtype, shard, **grp)
        for k, v in ours_o.items():
            if k.startswith("acc"):
                assert truth_o[k].any() and not truth_o[k].all(), k  # a test that can fail
                assert torch.equal(v, truth_o[k]), f"{kw} {k}"
            else:
                _close(v, truth_o[k], dtype, f"{kw} {k}")
        s, n = shard
        want = dict(truth_g, dw=truth_g["dw"][s:s + n], db=truth_g["db"][s:s + n])
        for k, v in ours_g.items():
            assert want[k].abs().max() > 1e-6, k
            _close(v, want[k], dtype, f"{kw} {k}")


@pytest.mark.parametrize("world,dtype,backend", [(2, torch.float64, "cpu"), (3, torch.float32, "cpu"),
                                                 (2, torch.float32, "triton")],
                         ids=["2-fp64-cpu", "3-fp32-cpu", "2-fp32-triton"])
def test_long_short_per_view_under_process_group(world, dtype, backend, tmp_path):
    if backend == "triton":
        pytest.importorskip("triton")
    run_gloo(_ls_body, world, tmp_path, dtype, backend)
