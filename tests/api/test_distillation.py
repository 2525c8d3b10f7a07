"""linear_distillation (docs/maths.md §12): fused KD between two heads against plain-torch KD on materialised
logits (fp64 truth; the CCE rule for fp32 / bf16), on the cpu backend (compiled and ATen paths) and Triton
(interpreter); Liger's fused linear JSD as a second oracle; bad input; no [N, V] tensor; the module; the
transformers step for two tiny causal LMs."""

import math

import pytest
import torch
import torch.nn.functional as F

import lsa_kernels as L
from lsa_kernels import _ext

from _util import IGN, assert_close_rule, assert_within, grads, has, leaf, run_gloo, targets, triton_available

DIVERGENCES = ("kl", "kl_reverse", "sym_kl", "sce", "js")
B, T, HS, HT, V = 2, 7, 13, 21, 67  # odd shapes, Hs != Ht

PATHS = ["cpu", "cpu-aten"] + (["triton"] if triton_available() else [])


# ------------------------------------------------------------------------------------ plain-torch truth


def kd_truth(xs, ws, bs, xt, wt, bt, y, *, divergence="kl", temperature=1.0, hard_loss_weight=0.0,
             soft_loss_weight=1.0, softcap=None, ignore_index=IGN, reduction="mean", temperature_scaling=True,
             token_weight=None):
    """Knowledge distillation written from the logits (no lsa_kernels code): (loss, hard, soft)."""

    def logits(x, w, b):
        z = F.linear(x, w, b)
        z = z.float() if z.dtype in (torch.bfloat16, torch.float16) else z
        return z if softcap is None else softcap * torch.tanh(z / softcap)

    zs, zt = logits(xs, ws, bs), logits(xt, wt, bt)
    zs, zt = zs.reshape(-1, zs.shape[-1]), zt.reshape(-1, zt.shape[-1])
    lq, lp = torch.log_softmax(zs / temperature, -1), torch.log_softmax(zt / temperature, -1)  # student, teacher
    p, q = lp.exp(), lq.exp()
    if divergence == "kl":  # KL(teacher || student)
        d = (p * (lp - lq)).sum(-1)
    elif divergence == "kl_reverse":
        d = (q * (lq - lp)).sum(-1)
    elif divergence == "sym_kl":
        d = (p * (lp - lq)).sum(-1) + (q * (lq - lp)).sum(-1)
    elif divergence == "sce":
        d = -(p * lq).sum(-1) - (q * lp).sum(-1)
    else:
        lm = torch.logaddexp(lp, lq) - math.log(2.0)
        d = 0.5 * (p * (lp - lm)).sum(-1) + 0.5 * (q * (lq - lm)).sum(-1)
    n = zs.shape[0]
    if y is None:
        valid = torch.ones(n, dtype=zs.dtype)
        hard = torch.zeros(n, dtype=zs.dtype)
    else:
        yy = y.reshape(-1)
        valid = (yy != ignore_index).to(zs.dtype)
        hard = F.cross_entropy(zs, yy, ignore_index=ignore_index, reduction="none")
    if token_weight is not None:  # row i counts token_weight_i times in both terms
        tw = token_weight.reshape(-1).to(zs.dtype)
        valid, hard = valid * tw, hard * tw
    soft = d * valid * (temperature**2 if temperature_scaling else 1.0)
    if reduction == "none":
        hard, soft = hard.reshape(xs.shape[:-1]), soft.reshape(xs.shape[:-1])
    else:
        tot = valid.sum()
        c = 1.0 / torch.where(tot > 0, tot, torch.ones_like(tot)) if reduction == "mean" else 1.0
        hard, soft = hard.sum() * c, soft.sum() * c
    loss = hard_loss_weight * hard + soft_loss_weight * soft
    return tuple(o.to(xs.dtype) for o in (loss, hard, soft))  # in the input dtype, as torch's losses


def _inputs(seed=0, bias=(True, True), target=True):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(B, T, HS, generator=g)
    xt = torch.randn(B, T, HT, generator=g)
    ws = torch.randn(V, HS, generator=g) / HS**0.5 * 2
    wt = torch.randn(V, HT, generator=g) / HT**0.5 * 2
    bs = torch.randn(V, generator=g) * 0.3 if bias[0] else None
    bt = torch.randn(V, generator=g) * 0.3 if bias[1] else None
    y = targets((B, T), V, p_ignore=0.3, gen=g) if target else None
    return xs, ws, bs, xt, wt, bt, y


def _run(fn, inputs, dtype, kw, out_weights, **extra):
    """Values and the gradients of Σ c_k·out_k w.r.t. every floating input (teacher zeros when frozen)."""
    xs, ws, bs, xt, wt, bt, y = inputs
    tt = kw.get("train_teacher", False)
    ins = [leaf(t, dtype) if t is not None else None for t in (xs, ws, bs, xt, wt, bt)]
    if not tt:  # the truth's frozen teacher: no gradient
        for i in (3, 4, 5):
            if ins[i] is not None:
                ins[i] = ins[i].detach()
    args = dict(kw)
    args.pop("train_teacher", None)
    if fn is kd_truth:
        out = kd_truth(*ins, y, **args, **extra)
    else:
        out = fn(ins[0], ins[1], ins[3], ins[4], y, student_bias=ins[2], teacher_bias=ins[5], train_teacher=tt,
                 **args, **extra)
    # upstream gradients exact in bf16 (multiples of 1/8), so that they reach a bf16 output unrounded
    g_out = [(0.5 + (torch.arange(o.numel(), dtype=torch.float64) % 9) / 8).reshape(o.shape) for o in out]
    scalar = sum(c * (gw * o.double()).sum() for c, gw, o in zip(out_weights, g_out, out) if c)
    present = [t for t in ins if t is not None and t.requires_grad]
    return [o.detach() for o in out], grads(scalar, present)


# every divergence meets every reduction, train_teacher on/off, τ ≠ 1, softcap, biases, target or none,
# hard + soft, and a gradient through `loss` alone (the folded forward+backward) or through all three outputs
CONFIGS = [
    dict(reduction="mean", train_teacher=False, temperature=2.0, softcap=None, hard_loss_weight=0.5, bias=(1, 1),
         target=True, outw=(1.0, 0.0, 0.0)),
    dict(reduction="sum", train_teacher=True, temperature=0.7, softcap=4.0, hard_loss_weight=0.0, bias=(1, 0),
         target=True, outw=(1.0, 0.25, 0.5)),
    dict(reduction="none", train_teacher=True, temperature=1.0, softcap=None, hard_loss_weight=0.0, bias=(0, 1),
         target=False, outw=(1.0, 0.0, 0.5)),
    dict(reduction="mean", train_teacher=True, temperature=1.0, softcap=6.0, hard_loss_weight=1.5, bias=(0, 0),
         target=True, outw=(1.0, 0.0, 0.0), temperature_scaling=False),
]


def _check(path, dtype, div, cfg, seed=0):
    cfg = dict(cfg)
    bias, tgt, outw = cfg.pop("bias"), cfg.pop("target"), cfg.pop("outw")
    inputs = _inputs(seed, bias=tuple(bool(b) for b in bias), target=tgt)
    # representable in the test dtype: the fp64 truth sees exactly the inputs ours and torch's see
    inputs = [t.to(dtype).float() if t is not None and t.is_floating_point() else t for t in inputs]
    kw = dict(divergence=div, soft_loss_weight=0.8, **cfg)
    truth = _run(kd_truth, inputs, torch.float64, kw, outw)
    same = _run(kd_truth, inputs, dtype, kw, outw)
    be = "cpu" if path.startswith("cpu") else path
    with _ext.disable(path == "cpu-aten"):
        ours = _run(L.linear_distillation, inputs, dtype, kw, outw, backend=be, chunk_bytes=4096)
    tol = rtol = 2e-5 if dtype == torch.float32 else 2e-3
    for name, o, s, t in zip(["loss", "hard", "soft"], ours[0], same[0], truth[0]):
        assert o.dtype == dtype, name
        assert o.shape == t.shape, name
        assert_close_rule(o, s, t, atol=tol, rtol=rtol, name=f"{path} {div} {name}")
    assert len(ours[1]) == len(truth[1])
    for i, (o, s, t) in enumerate(zip(ours[1], same[1], truth[1])):
        a = tol * 0.1
        if path == "triton" and dtype != torch.float32:  # the kernels round dz to bf16 for the gradient GEMMs
            a += 2.0**-8 * t.abs().max().item()          # (as tests/backends/test_triton_two_heads.py, test_triton_kernels)
        assert_close_rule(o, s, t, atol=a, rtol=rtol, name=f"{path} {div} grad {i}")


@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("path", PATHS)
def test_matches_torch_kd_fp32(path, div, cfg):
    _check(path, torch.float32, div, CONFIGS[cfg])


@pytest.mark.parametrize("div", ["kl", "js"])
@pytest.mark.parametrize("path", PATHS)
def test_matches_torch_kd_bf16(path, div):
    _check(path, torch.bfloat16, div, CONFIGS[1])
    _check(path, torch.bfloat16, div, CONFIGS[0], seed=1)


@pytest.mark.parametrize("div", DIVERGENCES)
def test_fp64_exact(div):
    """fp64 on the cpu backend (ATen path) against the fp64 truth to 1e-10, every gradient."""
    inputs = _inputs(3)
    kw = dict(divergence=div, temperature=1.3, hard_loss_weight=0.4, softcap=5.0, reduction="sum",
              train_teacher=True)
    truth = _run(kd_truth, inputs, torch.float64, kw, (1.0, 0.2, 0.3))
    ours = _run(L.linear_distillation, inputs, torch.float64, kw, (1.0, 0.2, 0.3), backend="cpu", chunk_bytes=2048)
    for o, t in zip(ours[0] + ours[1], truth[0] + truth[1]):
        torch.testing.assert_close(o, t, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("divergence", ["sce", "kl", "kl_reverse"])  # asymmetric ones: a swapped direction fails
def test_reference_backend_matches(divergence):
    inputs = _inputs(4)
    kw = dict(divergence=divergence, temperature=1.7, hard_loss_weight=0.3, reduction="mean", train_teacher=True)
    truth = _run(kd_truth, inputs, torch.float64, kw, (1.0, 0.5, 0.5))
    ours = _run(L.linear_distillation, inputs, torch.float64, kw, (1.0, 0.5, 0.5), backend="reference")
    for o, t in zip(ours[0] + ours[1], truth[0] + truth[1]):
        torch.testing.assert_close(o, t, rtol=1e-12, atol=1e-12)


def test_frozen_teacher_gets_no_gradient():
    xs, ws, bs, xt, wt, bt, y = _inputs(5)
    xs, ws, xt, wt, bt = (leaf(t) for t in (xs, ws, xt, wt, bt))
    out = L.linear_distillation(xs, ws, xt, wt, y, teacher_bias=bt, hard_loss_weight=1.0, backend="cpu")
    out.loss.backward()
    assert xt.grad is None and wt.grad is None and bt.grad is None
    assert xs.grad is not None and ws.grad is not None


def test_all_rows_ignored_gives_zero():
    xs, ws, _, xt, wt, _, y = _inputs(6)
    xs, ws = leaf(xs), leaf(ws)
    y = torch.full_like(y, IGN)
    out = L.linear_distillation(xs, ws, xt, wt, y, hard_loss_weight=1.0, backend="cpu")
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.hard.item() == 0.0 and out.soft.item() == 0.0
    assert xs.grad.abs().max().item() == 0.0 and ws.grad.abs().max().item() == 0.0


def test_teacher_dtype_is_cast_to_the_students():
    """A bf16 student with an fp32 teacher equals the same call with the teacher cast to bf16 by hand; the
    teacher's gradient comes back in fp32."""
    xs, ws, _, xt, wt, _, y = _inputs(7)
    xs16, ws16 = leaf(xs, torch.bfloat16), leaf(ws, torch.bfloat16)
    xt32, wt32 = leaf(xt), leaf(wt)
    a = L.linear_distillation(xs16, ws16, xt32, wt32, y, train_teacher=True, backend="cpu")
    a.loss.backward()
    b = L.linear_distillation(xs16.detach(), ws16.detach(), xt32.detach().bfloat16(), wt32.detach().bfloat16(), y,
                              backend="cpu")
    assert a.loss.dtype == torch.bfloat16
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    assert xt32.grad.dtype == torch.float32 and wt32.grad.dtype == torch.float32


# ----------------------------------------------------------------------------------------- Liger oracle


@pytest.mark.skipif(not has("liger_kernel"), reason="liger-kernel not installed")
@pytest.mark.skipif(not triton_available(), reason="Liger's kernels need triton (the interpreter on CPU)")
@pytest.mark.parametrize("div,beta", [("js", 0.5), ("kl", 0.0), ("kl_reverse", 1.0)])
@pytest.mark.parametrize("path", PATHS)
def test_liger_fused_linear_jsd(path, div, beta):
    """Liger's fused linear JSD (beta-JSD of teacher P and student Q; beta 0 = KL(P‖Q), 1 = KL(Q‖P); mean over
    rows with a valid label, no τ², no gradient to the teacher, no bias or softcap)."""
    from liger_kernel.transformers.functional import liger_fused_linear_jsd

    xs, ws, _, xt, wt, _, y = _inputs(8)
    xs, ws, xt, wt, y = xs.reshape(-1, HS), ws, xt.reshape(-1, HT), wt, y.reshape(-1)
    xa, wa = leaf(xs), leaf(ws)
    theirs = liger_fused_linear_jsd(xa, wa, xt, wt, y, jsd_beta=beta, ignore_index=IGN, temperature=1.6)
    g_theirs = grads(theirs, [xa, wa])
    xb, wb = leaf(xs), leaf(ws)
    be = "cpu" if path.startswith("cpu") else path
    with _ext.disable(path == "cpu-aten"):
        ours = L.linear_distillation(xb, wb, xt, wt, y, divergence=div, temperature=1.6, temperature_scaling=False,
                                     backend=be).loss
    g_ours = grads(ours, [xb, wb])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------- bad input


def _bad(**over):
    xs, ws, bs, xt, wt, bt, y = _inputs(9)
    args = dict(student_input=xs, student_weight=ws, teacher_input=xt, teacher_weight=wt, target=y)
    kw = dict(backend="cpu")
    for k, v in over.items():
        (args if k in args else kw)[k] = v
    return L.linear_distillation(**args, **kw)


@pytest.mark.parametrize("over,exc,match", [
    (dict(teacher_weight=torch.randn(V + 1, HT)), ValueError, "teacher_weight has V=68"),
    (dict(teacher_input=torch.randn(B, T + 1, HT)), ValueError, "teacher_input must have the rows"),
    (dict(teacher_input=torch.randn(B, T, HT + 1)), ValueError, "teacher_input must have last dim"),
    (dict(student_input=torch.randn(B, T, HS + 2)), ValueError, "student_input must have last dim"),
    (dict(divergence="tvd"), ValueError, "divergence must be one of"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(temperature=-1.0), ValueError, "temperature must be > 0"),
    (dict(hard_loss_weight=-0.1), ValueError, "hard_loss_weight must be >= 0"),
    (dict(soft_loss_weight=-1.0), ValueError, "soft_loss_weight must be >= 0"),
    (dict(target=torch.zeros(B, T + 1, dtype=torch.long)), ValueError, "target must have shape"),
    (dict(target=torch.zeros(B, T)), TypeError, "target must hold integer"),
    (dict(target=torch.full((B, T), V)), ValueError, "target values must be in"),
    (dict(target=None, hard_loss_weight=1.0), ValueError, "hard_loss_weight=1.0 needs a target"),
    (dict(reduction="batchmean"), ValueError, "reduction must be one of"),
    (dict(student_bias=torch.randn(V + 1)), ValueError, "student_bias must have shape"),
    (dict(teacher_bias=torch.randn(3)), ValueError, "teacher_bias must have shape"),
    (dict(student_weight=torch.randn(V, HS).double()), TypeError, "student_weight has dtype"),
    (dict(softcap=-1.0), ValueError, "softcap must be > 0"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
])
def test_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        _bad(**over)


# ------------------------------------------------------------------------------------------------- memory


@pytest.mark.parametrize("train_teacher", [False, True])
def test_no_logits_tensor_is_created(train_teacher):
    """With a small chunk budget no tensor with a last dim V and >= N/2 rows exists in forward + backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    N, Vb = 256, 1000
    g = torch.Generator().manual_seed(0)
    xs, xt = leaf(torch.randn(N, 24, generator=g)), leaf(torch.randn(N, 40, generator=g))
    ws, wt = leaf(torch.randn(Vb, 24, generator=g) * 0.2), leaf(torch.randn(Vb, 40, generator=g) * 0.2)
    y = targets((N,), Vb, gen=g)
    big = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == Vb and t.numel() >= N * Vb // 2:
                    big.append((str(func), tuple(t.shape)))
            return out

    with Watch():
        out = L.linear_distillation(xs, ws, xt, wt, y, hard_loss_weight=0.5, train_teacher=train_teacher,
                                    backend="cpu", chunk_bytes=64 * 1024)
        out.loss.backward()
    assert not big, big
    assert (wt.grad is not None) == train_teacher


# ------------------------------------------------------------------------------------------------- module


def test_module():
    xs, ws, bs, xt, wt, bt, y = _inputs(10)
    m = L.LinearDistillationLoss(divergence="js", temperature=2.0, hard_loss_weight=0.5, backend="cpu")
    assert "js" in repr(m)
    got = m(xs, ws, xt, wt, y, student_bias=bs, teacher_bias=bt)
    want = L.linear_distillation(xs, ws, xt, wt, y, divergence="js", temperature=2.0, hard_loss_weight=0.5,
                                 student_bias=bs, teacher_bias=bt, backend="cpu")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------- transformers


def _tiny_lm(hidden, seed):
    transformers = pytest.importorskip("transformers")
    from lsa_kernels.integrations import hf

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=301, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64)
    m = hf.load_causal_lm(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("train_teacher", [False, True])
def test_hf_distillation_step(train_teacher):
    """Two tiny Llamas (student H=32, teacher H=64, V=301) against KD on their own materialised logits."""
    from lsa_kernels.integrations import hf

    student, teacher = _tiny_lm(32, 0), _tiny_lm(64, 1)
    x = torch.randint(0, 301, (2, 19))
    labels = x.clone()
    labels[0, :5] = IGN  # a masked prompt
    kw = dict(divergence="kl", temperature=2.0, hard_loss_weight=0.5)
    got = hf.distillation_step(student, teacher, x, labels, backend="cpu", train_teacher=train_teacher, **kw)
    got.loss.backward()
    g_got = {n: p.grad.clone() for m in (student, teacher) for n, p in m.named_parameters(prefix=str(id(m)))
             if p.grad is not None}
    for m in (student, teacher):
        m.zero_grad(set_to_none=True)
    assert train_teacher == any(n.startswith(str(id(teacher))) for n in g_got)  # frozen: no teacher grads

    zs = student(input_ids=x).logits
    with torch.enable_grad() if train_teacher else torch.no_grad():
        zt = teacher(input_ids=x).logits
    y = F.pad(labels[:, 1:], (0, 1), value=IGN).reshape(-1)
    lq, lp = torch.log_softmax(zs.reshape(-1, 301) / 2.0, -1), torch.log_softmax(zt.reshape(-1, 301) / 2.0, -1)
    valid = (y != IGN).float()
    soft = 4.0 * ((lp.exp() * (lp - lq)).sum(-1) * valid).sum() / valid.sum()
    hard = F.cross_entropy(zs.reshape(-1, 301), y, ignore_index=IGN)
    want = 0.5 * hard + soft
    want.backward()
    for a, b in ((got.loss, want), (got.hard, hard), (got.soft, soft)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    for m in (student, teacher):
        for n, p in m.named_parameters(prefix=str(id(m))):
            if p.grad is not None:
                torch.testing.assert_close(g_got[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


# --------------------------------------------------------------------------------------- vocab-parallel


def _vp_body(rank, world):
    import torch.distributed as dist

    sizes = [V // 3, V - V // 3]  # uneven shards, the same split for both heads
    s, n = [0, sizes[0]][rank], sizes[rank]
    for div, tt, red in (("kl", False, "mean"), ("js", True, "sum"), ("sce", True, "none")):
        inputs = _inputs(11)
        kw = dict(divergence=div, temperature=1.5, hard_loss_weight=0.5, softcap=5.0, reduction=red,
                  train_teacher=tt)
        truth = _run(kd_truth, inputs, torch.float64, kw, (1.0, 0.25, 0.5))
        xs, ws, bs, xt, wt, bt, y = inputs
        shard = [xs, ws[s:s + n], bs[s:s + n], xt, wt[s:s + n], bt[s:s + n], y]
        ours = _run(L.linear_distillation, shard, torch.float64, kw, (1.0, 0.25, 0.5), backend="cpu",
                    process_group=dist.group.WORLD, vocab_start=s)
        for o, t in zip(ours[0], truth[0]):
            torch.testing.assert_close(o, t, rtol=1e-9, atol=1e-10)
        tg = truth[1]  # [xs, ws, bs, (xt, wt, bt)]
        want = [tg[0], tg[1][s:s + n], tg[2][s:s + n]]
        if tt:
            want += [tg[3], tg[4][s:s + n], tg[5][s:s + n]]
        assert len(ours[1]) == len(want)
        for a, e in zip(ours[1], want):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


def test_vocab_parallel_two_heads(tmp_path):
    """Both heads sharded over 2 gloo ranks (the same uneven split): values and every gradient (dW/db: the
    rank's slice) equal the single-process fp64 truth."""
    run_gloo(_vp_body, 2, tmp_path)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("path", PATHS + ["reference"])
def test_token_weight(path, reduction):
    """token_weight (docs/maths.md §11): row i counts w_i times in the hard and the soft term; mean divides by
    the total weight of the counted rows; against the truth written from the logits, every gradient."""
    inputs = _inputs(5)
    tw = torch.rand(B, T, generator=torch.Generator().manual_seed(9)) * 2
    tw[0, :3] = 0.0
    kw = dict(divergence="kl", temperature=1.5, hard_loss_weight=0.7, reduction=reduction, train_teacher=True)
    truth = _run(kd_truth, inputs, torch.float64, kw, (1.0, 0.3, 0.2), token_weight=tw.double())
    be = "cpu" if path.startswith("cpu") else path
    with _ext.disable(path == "cpu-aten"):
        ours = _run(L.linear_distillation, inputs, torch.float32, kw, (1.0, 0.3, 0.2), backend=be, chunk_bytes=4096,
                    token_weight=tw)
    for o, t in zip(ours[0] + ours[1], truth[0] + truth[1]):
        assert_within(o, t, atol=2e-5, rtol=2e-5, name=f"{path} {reduction}")


def test_token_weight_zero_total_and_bad_shape():
    xs, ws, bs, xt, wt, bt, y = _inputs(6)
    xs = xs.clone().requires_grad_(True)
    out = L.linear_distillation(xs, ws, xt, wt, y, token_weight=torch.zeros(B, T), hard_loss_weight=1.0)
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.all(xs.grad == 0)
    with pytest.raises(ValueError, match="token_weight must have shape"):
        L.linear_distillation(xs, ws, xt, wt, y, token_weight=torch.ones(B, T + 1))
    with pytest.raises(ValueError, match="token_weight values must be >= 0"):
        L.linear_distillation(xs, ws, xt, wt, y, token_weight=-torch.ones(B, T))


@pytest.mark.parametrize("path", PATHS)
def test_token_weight_mean_with_total_below_one(path):
    """``mean`` divides by the total weight even when it is below one row's worth (no clamp at 1)."""
    inputs = _inputs(8)
    tw = torch.full((B, T), 0.01)
    kw = dict(divergence="js", hard_loss_weight=0.5, reduction="mean", train_teacher=True)
    truth = _run(kd_truth, inputs, torch.float64, kw, (1.0, 0.0, 0.0), token_weight=tw.double())
    be = "cpu" if path.startswith("cpu") else path
    with _ext.disable(path == "cpu-aten"):
        ours = _run(L.linear_distillation, inputs, torch.float32, kw, (1.0, 0.0, 0.0), backend=be, token_weight=tw)
    for o, t in zip(ours[0] + ours[1], truth[0] + truth[1]):
        assert_within(o, t, atol=2e-5, rtol=2e-5, name=f"{path} total weight 0.14")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_forward_backward_for_mean_and_sum(monkeypatch, reduction):
    """With a scalar reduction the cpu backend folds the gradient into the forward (one pass over V per chunk):
    pair_forward_backward runs, the separate backward does not (docs/maths.md §12; a speed property)."""
    from lsa_kernels.backends.cpu import CpuBackend

    calls = []
    for name in ("pair_forward_backward", "pair_forward", "pair_backward"):
        orig = getattr(CpuBackend, name)
        monkeypatch.setattr(CpuBackend, name, lambda self, *a, _o=orig, _n=name, **k: (calls.append(_n), _o(self, *a, **k))[1])
    xs, ws, bs, xt, wt, bt, y = _inputs(3)
    xs = xs.clone().requires_grad_(True)
    out = L.linear_distillation(xs, ws, xt, wt, y, hard_loss_weight=0.5, reduction=reduction, backend="cpu")
    out.loss.backward()
    assert calls == ["pair_forward_backward"], calls
