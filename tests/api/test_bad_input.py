"""Bad input: a clear exception naming the argument and what was expected, before any kernel runs.

The table below is the one the README shows (section "Bad input").
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lsa_kernels as L
from lsa_kernels import backends

N, H, V = 6, 8, 11
x = torch.randn(N, H)
w = torch.randn(V, H)
y = torch.randint(0, V, (N,))
hl = torch.randn(2, 5, H)
yl = torch.randint(0, V, (2, 5))


def ce(**kw):
    args = dict(input=x, linear_weight=w, target=y)
    args.update(kw)
    return lambda: L.linear_cross_entropy(args.pop("input"), args.pop("linear_weight"), args.pop("target"), **args)


def div(**kw):
    args = dict(input_p=x, input_q=x.clone(), linear_weight=w)
    args.update(kw)
    return lambda: L.linear_divergence(args.pop("input_p"), args.pop("input_q"), args.pop("linear_weight"), **args)


def ls(**kw):
    args = dict(hidden_long=hl, hidden_short=hl.clone(), linear_weight=w, labels_long=yl, labels_short=yl.clone(),
                l_extra=2)
    args.update(kw)
    pos = [args.pop(k) for k in ("hidden_long", "hidden_short", "linear_weight", "labels_long", "labels_short")]
    return lambda: L.long_short_loss(*pos, **args)


def dist(**kw):
    args = dict(student_input=x, student_weight=w, teacher_input=x.clone(), teacher_weight=w.clone())
    args.update(kw)
    return lambda: L.linear_distillation(**args)


inf = float("inf")


def with_value(t, i, v):
    t = t.clone()
    t.view(-1)[i] = v
    return t


CASES = [
    # (id, call, exception, words the message must contain)
    ("ce hidden size", ce(input=torch.randn(N, H + 1)), ValueError, ["input", "H=8"]),
    ("ce weight 1-D", ce(linear_weight=torch.randn(V)), ValueError, ["linear_weight", "[V, H]"]),
    ("ce target shape", ce(target=torch.randint(0, V, (N + 1,))), ValueError, ["target", "shape", "(6,)"]),
    ("ce target range", ce(target=torch.tensor([0, 1, 2, 3, 4, V])), ValueError, ["target", "[0, 11)", "11"]),
    ("ce negative target", ce(target=torch.tensor([0, 1, -5, 3, 4, 5])), ValueError, ["target", "-5"]),
    ("ce float target", ce(target=y.float()), TypeError, ["target", "int64"]),
    ("ce probabilities of V + 1 classes", ce(target=torch.rand(N, V + 1)), TypeError, ["target", "(6, 11)", "(6, 12)"]),
    ("ce dtype mismatch", ce(linear_weight=w.bfloat16()), TypeError, ["linear_weight", "bfloat16", "float32"]),
    ("ce device mismatch", ce(linear_weight=w.to("meta")), ValueError, ["linear_weight", "meta", "device"]),
    ("ce int input", ce(input=x.long()), TypeError, ["input", "float32"]),
    ("ce bias shape", ce(linear_bias=torch.randn(V + 1)), ValueError, ["linear_bias", "[V=11]"]),
    ("ce reduction", ce(reduction="avg"), ValueError, ["reduction", "'mean'", "'avg'"]),
    ("ce backend", ce(backend="cuda"), ValueError, ["backend", "'auto'", "'cuda'"]),
    ("ce label smoothing < 0", ce(label_smoothing=-0.1), ValueError, ["label_smoothing", ">= 0"]),
    ("ce label smoothing > 1", ce(label_smoothing=1.5), ValueError, ["label_smoothing", "<= 1"]),
    ("ce z_loss < 0", ce(z_loss=-1.0), ValueError, ["z_loss"]),
    ("ce softcap <= 0", ce(softcap=0.0), ValueError, ["softcap", "> 0"]),
    ("ce ignore_index float", ce(ignore_index=-100.0), TypeError, ["ignore_index", "int"]),
    ("div shapes", div(input_q=torch.randn(N + 1, H)), ValueError, ["input_q", "shape"]),
    ("div name", div(divergence="kld"), ValueError, ["divergence", "'sce'", "'kld'"]),
    ("div detach", div(detach="long"), ValueError, ["detach", "'p'"]),
    ("div temperature", div(temperature=0.0), ValueError, ["temperature", "> 0"]),
    ("div mask dtype", div(mask=torch.ones(N)), TypeError, ["mask", "bool", "(6,)"]),
    ("div mask device", div(mask=torch.ones(N, dtype=torch.bool, device="meta")), ValueError, ["mask", "meta"]),
    ("div mask shape", div(mask=torch.ones(N + 1, dtype=torch.bool)), ValueError, ["mask", "shape"]),
    ("ls 2-D hidden", ls(hidden_long=torch.randn(5, H)), ValueError, ["hidden_long", "[B, T, H]"]),
    ("ls view shapes", ls(hidden_short=torch.randn(2, 6, H)), ValueError, ["hidden_short", "(2, 5, 8)"]),
    ("ls hidden size", ls(hidden_long=torch.randn(2, 5, H + 1), hidden_short=torch.randn(2, 5, H + 1)), ValueError,
     ["hidden_long", "H=8"]),
    ("ls l_extra 0", ls(l_extra=0), ValueError, ["l_extra", "[1, 4]"]),
    ("ls l_extra T", ls(l_extra=5), ValueError, ["l_extra", "[1, 4]"]),
    ("ls l_extra float", ls(l_extra=2.0), TypeError, ["l_extra", "int"]),
    ("ls labels shape", ls(labels_short=torch.randint(0, V, (2, 4))), ValueError, ["labels_short", "(2, 5)"]),
    ("ls labels range", ls(labels_long=torch.full((2, 5), V)), ValueError, ["labels_long", "[0, 11)"]),
    ("ls divergence", ls(divergence="mse"), ValueError, ["divergence"]),
    ("ls detach", ls(detach="p"), ValueError, ["detach", "'long'", "'short'"]),
    ("ls positions", ls(positions="first"), ValueError, ["positions", "'overlap'", "'last'"]),
    ("ls alpha < 0", ls(alpha=-0.1), ValueError, ["alpha", ">= 0"]),
    ("ls temperature", ls(temperature=-1.0), ValueError, ["temperature"]),
    ("sample_l_extra", lambda: L.sample_l_extra(1), ValueError, ["l_train", ">= 2"]),
    # integer targets of any dtype are read as int64; a bool or out-of-range one is still refused naming target
    ("ce bool target", ce(target=y > 3), TypeError, ["target", "integer"]),
    ("ce int32 target range", ce(target=torch.tensor([0, 1, 2, 3, 4, V], dtype=torch.int32)), ValueError,
     ["target", "[0, 11)", "11"]),
    ("ls int32 labels range", ls(labels_short=torch.full((2, 5), -3, dtype=torch.int32)), ValueError,
     ["labels_short", "-3"]),
    ("dist uint8 target range", dist(target=torch.full((N,), V, dtype=torch.uint8)), ValueError, ["target", "11"]),
    # chunk_bytes: None or a positive int
    ("ce chunk_bytes 0", ce(chunk_bytes=0), ValueError, ["chunk_bytes", "positive"]),
    ("ce chunk_bytes -1", ce(chunk_bytes=-1), ValueError, ["chunk_bytes", "positive", "-1"]),
    ("ce chunk_bytes float", ce(chunk_bytes=1e6), ValueError, ["chunk_bytes", "int"]),
    ("div chunk_bytes 0", div(chunk_bytes=0), ValueError, ["chunk_bytes", "positive"]),
    ("ls chunk_bytes -1", ls(chunk_bytes=-1), ValueError, ["chunk_bytes", "positive"]),
    ("dist chunk_bytes 0", dist(chunk_bytes=0), ValueError, ["chunk_bytes", "positive"]),
    # non-finite numbers that would make the loss NaN / inf
    ("ce softcap inf", ce(softcap=inf), ValueError, ["softcap", "finite", "None"]),
    ("div softcap inf", div(softcap=inf), ValueError, ["softcap", "finite"]),
    ("ls softcap inf", ls(softcap=inf), ValueError, ["softcap", "finite"]),
    ("dist softcap inf", dist(softcap=inf), ValueError, ["softcap", "finite"]),
    ("ce z_loss inf", ce(z_loss=inf), ValueError, ["z_loss", "finite"]),
    ("div temperature inf", div(temperature=inf), ValueError, ["temperature", "finite"]),
    ("ls alpha inf", ls(alpha=inf), ValueError, ["alpha", "finite"]),
    ("ce token_weight -0.5", ce(token_weight=with_value(torch.ones(N), 4, -0.5)), ValueError,
     ["token_weight", ">= 0", "-0.5"]),
    ("ce token_weight inf", ce(token_weight=with_value(torch.ones(N), 2, inf)), ValueError,
     ["token_weight", "finite", "inf"]),
    ("ce class weight inf", ce(weight=with_value(torch.ones(V), 3, inf)), ValueError, ["weight", "finite", "inf"]),
    ("div token_weight inf", div(token_weight=with_value(torch.ones(N), 1, inf)), ValueError,
     ["token_weight", "finite"]),
    ("ls token_weight_long inf", ls(token_weight_long=with_value(torch.ones(2, 5), 7, inf)), ValueError,
     ["token_weight_long", "finite"]),
    ("ls token_weight_short -inf", ls(token_weight_short=with_value(torch.ones(2, 5), 0, -inf)), ValueError,
     ["token_weight_short", ">= 0"]),
    ("dist token_weight inf", dist(token_weight=with_value(torch.ones(N), 5, inf)), ValueError,
     ["token_weight", "finite"]),
    # a hidden size of 0: refused naming the input's last dim (not a reshape error from inside)
    ("ce H = 0", ce(input=torch.randn(N, 0), linear_weight=torch.randn(V, 0)), ValueError,
     ["input", "last dim", ">= 1", "(6, 0)"]),
    ("div H = 0", div(input_p=torch.randn(N, 0), input_q=torch.randn(N, 0), linear_weight=torch.randn(V, 0)),
     ValueError, ["input_p", "last dim", ">= 1"]),
    ("ls H = 0", ls(hidden_long=torch.randn(2, 5, 0), hidden_short=torch.randn(2, 5, 0), linear_weight=torch.randn(V, 0)),
     ValueError, ["hidden_long", "last dim", ">= 1"]),
    ("dist H = 0", dist(student_input=torch.randn(N, 0), student_weight=torch.randn(V, 0)), ValueError,
     ["student_input", "last dim", ">= 1"]),
]


@pytest.fixture
def no_kernels(monkeypatch):
    """Any backend use is a failure: validation must come first."""

    def boom(name):
        raise AssertionError(f"backend {name!r} reached before validation finished")

    monkeypatch.setattr(backends, "get", boom)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_before_any_kernel(case, no_kernels):
    _, call, exc, words = case
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    for word in words:
        assert word in msg, f"message {msg!r} lacks {word!r}"


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
        L.linear_cross_entropy(x, w, y, backend="triton")


class HostSyncs(TorchDispatchMode):
    """Counts the ops that hand a tensor's value to the host (``.item()``, ``bool(t)``): a host sync on CUDA."""

    SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
             torch.ops.aten.item.default}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _syncs(fn):
    mode = HostSyncs()
    with mode:
        fn()
    return mode.seen


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_target_check_can_be_skipped(backend):
    """check_targets=False skips the one host sync (the target-range check): forward and backward then read
    no value back to the host; with the check on, the sync is there (so this test can see one); valid input
    still gives the right answer."""
    xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    hs_, ys_ = hl.clone().requires_grad_(True), yl.roll(1, 1)

    def ce_call(check):
        return lambda: L.linear_cross_entropy(xs, ws, y, backend=backend, check_targets=check).backward()

    def ls_call(check):
        return lambda: L.long_short_loss(hl, hs_, ws, yl, ys_, l_extra=2, backend=backend, positions="last",
                                         check_targets=check).loss.backward()

    for call in (ce_call, ls_call):
        assert _syncs(call(True)), "the target check should read a value on the host"
        assert _syncs(call(False)) == [], "check_targets=False still synchronises with the host"
    a = L.linear_cross_entropy(x, w, y, check_targets=False, backend=backend)
    b = L.reference.linear_cross_entropy(x, w, y)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="target"):  # and the check, when on, is the one that catches bad ids
        L.linear_cross_entropy(x, w, torch.tensor([0, 1, 2, 3, 4, V]), backend=backend)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_integer_targets_of_any_dtype_give_the_int64_result(dtype, backend):
    """Class indices in int32 (numpy's and many tokenizers' default), int16 or uint8 (torch's other accepted
    type) are read as int64 at the API boundary: the same loss, gradient and per-token accuracy, and no
    internal op's error reaches the user."""
    xs = x.clone().requires_grad_(True)
    ref = L.linear_cross_entropy(xs, w, y, backend=backend, return_accuracy=True)
    (gx,) = torch.autograd.grad(ref.loss, xs)
    out = L.linear_cross_entropy(xs, w, y.to(dtype), backend=backend, return_accuracy=True)
    (gx2,) = torch.autograd.grad(out.loss, xs)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    torch.testing.assert_close(gx2, gx, rtol=0, atol=0)
    assert torch.equal(out.accuracy, ref.accuracy)
    hs_ = hl.roll(1, 1)
    ys_ = yl.roll(1, 1)
    a = L.long_short_loss(hl, hs_, w, yl, ys_, l_extra=2, backend=backend, return_accuracy=True)
    b = L.long_short_loss(hl, hs_, w, yl.to(dtype), ys_.to(dtype), l_extra=2, backend=backend, return_accuracy=True)
    torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=0)
    assert torch.equal(b.short.accuracy, a.short.accuracy)
    d1 = L.linear_distillation(x, w, x.flip(0), w, y, hard_loss_weight=1.0, backend=backend)
    d2 = L.linear_distillation(x, w, x.flip(0), w, y.to(dtype), hard_loss_weight=1.0, backend=backend)
    torch.testing.assert_close(d2.loss, d1.loss, rtol=0, atol=0)


def test_non_finite_weight_check_is_behind_check_targets():
    """The finiteness of token / class weights is checked in the same reduction as their sign, so with
    check_targets=False it adds no host sync (and is not checked: the docstring says the result is undefined)."""
    tw = torch.ones(N)
    assert _syncs(lambda: L.linear_cross_entropy(x, w, y, token_weight=tw, weight=torch.ones(V), backend="cpu",
                                                 check_targets=False)) == []
    syncs_on = _syncs(lambda: L.linear_cross_entropy(x, w, y, token_weight=tw, weight=torch.ones(V), backend="cpu"))
    assert len(syncs_on) == 3, syncs_on  # targets, class weights, token weights: one each


def test_vocab_parallel_target_shapes():
    """Under process_group= a probability target may have this rank's columns or the whole vocabulary as its last
    dim (the rows must still be the input's); any other last dim is refused naming the shard's columns."""
    from lsa_kernels import _checks

    w_shard = w[:5]
    for t in (torch.rand(N, 5), torch.rand(N, V)):
        assert _checks.check_ce(x, w_shard, t, None, "mean", -100, 0.0, 0.0, None, parallel=True)
    with pytest.raises(TypeError, match="target must hold"):
        _checks.check_ce(x, w_shard, torch.rand(N + 1, V), None, "mean", -100, 0.0, 0.0, None, parallel=True)
    with pytest.raises(ValueError, match=r"last dim V=11 .* or V_r=5 \(this rank's columns 5:10\); got shape \(6, 7\)"):
        _checks.check_prob_target_shard(torch.rand(N, 7), V, 5, 5)
