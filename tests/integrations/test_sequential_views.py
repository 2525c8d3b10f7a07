"""views="sequential": each view's forward without grad, recomputed in the backward one view at a time.

The gradients must be those of the joint step (both views in one batched forward): fp64 to 1e-10, fp32 to
1e-5, also with LoRA, gradient checkpointing, gradient accumulation, bf16 autocast, DDP (2 gloo processes)
and activation offload; with dropout the recompute replays the no-grad forward's RNG, so the gradient is the
one of the loss reported."""

import functools
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")

from lsa_kernels.functional import long_short_loss  # noqa: E402
from lsa_kernels.integrations import hf, memory  # noqa: E402
from lsa_kernels.pairing import make_views  # noqa: E402
from lsa_kernels.train.model import enable_grad_checkpointing  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
V, L_TRAIN, L_EXTRA = 257, 24, 7


def _model(dtype=torch.float64, tied=False, **cfg):
    torch.manual_seed(0)
    c = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 tie_word_embeddings=tied, **cfg)
    m = hf.load_causal_lm(c, dtype=dtype)
    with torch.no_grad():  # larger logits, so that the divergence term matters
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.train()


def _window(B=2, seed=1):
    return torch.randint(0, V, (B, L_TRAIN + L_EXTRA + 1), generator=torch.Generator().manual_seed(seed))


def _grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(model, window, views, backend="reference", **kw):
    return lambda: hf.long_short_step(model, window, L_EXTRA, alpha=0.5, views=views, backend=backend, **kw).loss


def _rel(a, b):
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in b)


class _VxH(TorchDispatchMode):
    """Counts the [V, H] tensors made (weight gradients of the embedding and of the head)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.n = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.n += sum(1 for t in (out if isinstance(out, (tuple, list)) else [out])
                      if isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape)
        return out


@pytest.mark.parametrize("tied", [False, True])
def test_fp64_equals_joint(tied):
    m = _model(tied=tied)
    w = _window()
    shape = m.get_input_embeddings().weight.shape
    with _VxH(shape) as cj:
        lj, gj = _grads(m, _step(m, w, "joint"))
    memory.check_sequential(m)  # the one-time probes, before counting
    memory._embedding_split(m)
    calls = []
    m.get_input_embeddings().register_forward_hook(lambda _m, inp, _o: calls.append(inp[0].shape[0]))
    with _VxH(shape) as cs:
        ls, gs = _grads(m, _step(m, w, "sequential"))
    # the input embedding runs once on both views (outside the recompute), so its [V, H] weight gradient is
    # made once, as in the joint step, not once per view
    assert calls == [2 * w.shape[0]] and cs.n == cj.n
    assert gs.keys() == gj.keys() and len(gj) == len(list(m.parameters()))  # the head's gradient too
    assert abs(ls - lj) <= 1e-12 * abs(lj)
    assert _rel(gs, gj) <= 1e-10


def test_embedding_inside_the_recompute_past_v_tokens():
    m = _model()
    w = _window(B=11)  # 2 views x 11 x 24 = 528 tokens > 2 V = 514: the embeddings outweigh two [V, H] tensors
    shape = m.get_input_embeddings().weight.shape
    with _VxH(shape) as cj:
        lj, gj = _grads(m, _step(m, w, "joint"))
    memory.check_sequential(m)
    memory._embedding_split(m)
    calls = []
    m.get_input_embeddings().register_forward_hook(lambda _m, inp, _o: calls.append(inp[0].shape[0]))
    with _VxH(shape) as cs:
        ls, gs = _grads(m, _step(m, w, "sequential"))
    # the embedding runs in each view's no-grad forward and again in its recompute: one [V, H] gradient per view
    # (the second one, and possibly its sum into .grad, are the [V, H] tensors the joint step does not make)
    assert calls == [11, 11, 11, 11] and cj.n + 1 <= cs.n <= cj.n + 2
    assert abs(ls - lj) <= 1e-12 * abs(lj)
    assert _rel(gs, gj) <= 1e-10


def test_fp32_equals_joint_on_the_fused_backend():
    m = _model(torch.float32)
    w = _window()
    lj, gj = _grads(m, _step(m, w, "joint", backend="cpu"))
    ls, gs = _grads(m, _step(m, w, "sequential", backend="cpu"))
    assert abs(ls - lj) <= 1e-6 * abs(lj)
    assert _rel(gs, gj) <= 1e-5


def test_lora():
    peft = pytest.importorskip("peft")
    m = _model()
    pm = peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]))
    with torch.no_grad():  # LoRA's B starts at 0: give the adapter a non-zero contribution
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    base = pm.get_base_model()
    w = _window()
    _, gj = _grads(base, _step(base, w, "joint"))
    _, gs = _grads(base, _step(base, w, "sequential"))
    assert gj and all("lora_" in n for n in gj)  # only the adapter trains (head frozen: no dW)
    assert memory._embedding_split(base) is None  # a frozen embedding: each view recomputed from its token ids
    assert gs.keys() == gj.keys()
    assert _rel(gs, gj) <= 1e-10


def test_gradient_checkpointing_inside():
    m = _model()
    w = _window()
    _, gj = _grads(m, _step(m, w, "joint"))
    enable_grad_checkpointing(m)
    _, gs = _grads(m, _step(m, w, "sequential"))
    assert _rel(gs, gj) <= 1e-10


def test_gradient_accumulation():
    """Two micro-batches, each backpropagated on its own, sum to the joint step over the whole batch."""
    m = _model()
    w = _window(B=4)
    _, gj = _grads(m, _step(m, w, "joint"))
    m.zero_grad(set_to_none=True)
    for part in w.chunk(2):
        (hf.long_short_step(m, part, L_EXTRA, alpha=0.5, views="sequential", backend="reference").loss / 2).backward()
    gs = {n: p.grad.clone() for n, p in m.named_parameters()}
    assert _rel(gs, gj) <= 1e-10


def test_bf16_autocast():
    """Under bf16 autocast the joint and the sequential steps run the same bf16 GEMMs on different batch
    shapes ([2B*T, H] against [B*T, H] twice), so their roundings differ (bf16 keeps 8 bits: a relative
    step of 2^-8 = 4e-3 per rounded value, compounded over the layers). Measured: the losses agree exactly,
    the gradients to 2.5e-3 (and to 9e-3 of the fp32 step); the bound is five bf16 steps, while an error such
    as a missing view or a wrong RNG replay is O(1)."""
    m = _model(torch.float32)
    w = _window()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lj, gj = _grads(m, _step(m, w, "joint", backend="cpu"))
        ls, gs = _grads(m, _step(m, w, "sequential", backend="cpu"))
    assert abs(ls - lj) <= 1e-2 * abs(lj)
    assert _rel(gs, gj) <= 2e-2
    # and the sequential bf16 step is the gradient of its own fp32 twin to bf16 accuracy, not a broken one
    _, g32 = _grads(m, _step(m, w, "sequential", backend="cpu"))
    assert _rel(gs, g32) <= 5e-2


def _same_masks_reference(model, window):
    """The long-short loss with each view through the model on its own, with grad, long then short: the
    dropout masks the sequential step draws (its no-grad forwards run in this order from the same RNG)."""
    long, short = make_views(window, L_EXTRA)
    head = hf.output_head(model)
    hl = hf.hidden_states(model, long[:, :-1])
    hs = hf.hidden_states(model, short[:, :-1])
    return long_short_loss(hl, hs, head.weight, long[:, 1:], short[:, 1:], l_extra=L_EXTRA, alpha=0.5,
                           backend="reference").loss


def test_dropout_recompute_replays_the_rng(monkeypatch):
    m = _model(attention_dropout=0.3)
    hf.output_head(m)
    memory.check_sequential(m)  # the one-time probes leave the RNG as they found it, but run them first anyway
    w = _window()

    torch.manual_seed(5)
    ls, gs = _grads(m, _step(m, w, "sequential"))
    torch.manual_seed(5)
    lr, gr = _grads(m, lambda: _same_masks_reference(m, w))
    assert abs(ls - lr) <= 1e-12 * abs(lr)  # the loss reported is the loss of these masks ...
    assert _rel(gs, gr) <= 1e-10  # ... and the gradient is its gradient

    torch.manual_seed(5)
    _, gj = _grads(m, _step(m, w, "joint"))  # other masks (one [2B, ...] draw): a different gradient
    assert _rel(gj, gr) > 1e-3

    # without the replay the recompute draws fresh masks: the gradient is not the reported loss's
    monkeypatch.setattr(memory, "sequential_states", functools.partial(memory.sequential_states, replay_rng=False))
    torch.manual_seed(5)
    ln, gn = _grads(m, _step(m, w, "sequential"))
    assert abs(ln - ls) <= 1e-12 * abs(ls)  # the same loss (the forward is the same) ...
    assert _rel(gn, gr) > 1e-3  # ... with a gradient that is not its own


def test_offload_hooks_active_same_gradients(monkeypatch):
    """The offload path on CPU (pin_memory=False there): save_on_cpu's hooks pack the saved tensors of the
    recomputed views (and, joint, of the forward) and the gradients do not change."""
    calls = []
    orig = torch.autograd.graph.save_on_cpu

    class Counting(torch.autograd.graph.saved_tensors_hooks):
        def __init__(self, pin_memory=False, device_type="cuda"):
            calls.append(pin_memory)
            inner = orig(pin_memory=pin_memory, device_type=device_type)

            def pack(t):
                calls.append("pack")
                return inner.pack_hook(t)

            super().__init__(pack, inner.unpack_hook)

    m = _model()
    w = _window()
    _, g0 = _grads(m, _step(m, w, "joint"))
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Counting)
    enable_grad_checkpointing(m)
    for views in ("joint", "sequential"):
        calls.clear()
        _, g = _grads(m, _step(m, w, views, offload=True))
        assert calls and calls[0] is False and calls.count("pack") >= 4, (views, calls[:3])
        assert _rel(g, g0) <= 1e-10, views


def test_objective_two_view_ce_path():
    """alpha = 0 with both views (the CE baseline on the long-short run's tokens) also runs sequentially."""
    m = _model()
    w = _window()
    obj_j = hf.LongShortObjective(m, backend="reference")
    obj_s = hf.LongShortObjective(m, backend="reference", views="sequential")
    lj, gj = _grads(m, lambda: obj_j(w, L_EXTRA, 0.0, views=2).loss)
    ls, gs = _grads(m, lambda: obj_s(w, L_EXTRA, 0.0, views=2).loss)
    assert abs(ls - lj) <= 1e-12 * abs(lj) and _rel(gs, gj) <= 1e-10


def test_probe_rejects_what_cannot_be_replayed():
    m = _model()
    count = [0]

    def drift(_mod, _inp, out):  # the output depends on how often the model ran: no recompute can replay it
        count[0] += 1
        return out + 1e-3 * count[0]

    h = m.model.norm.register_forward_hook(drift)
    with pytest.raises(hf.UnsupportedModel, match="two forwards of LlamaForCausalLM from the same RNG state differ"):
        hf.long_short_step(m, _window(), L_EXTRA, views="sequential", backend="reference")
    h.remove()

    m2 = _model()
    h = m2.model.norm.register_forward_hook(lambda _m, _i, out: out.detach())
    with pytest.raises(hf.UnsupportedModel, match="do not depend on its trainable parameters"):
        memory.check_sequential(m2)
    h.remove()
    with pytest.raises(ValueError, match="views: expected one of"):
        hf.long_short_step(m2, _window(), L_EXTRA, views="both", backend="reference")


DDP_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, os.environ["TESTS"])
import test_sequential_views as t
from lsa_kernels.integrations import hf
dist.init_process_group("gloo")
r = dist.get_rank()
m = t._model()
w = t._window(B=4)
obj = torch.nn.parallel.DistributedDataParallel(hf.LongShortObjective(m, backend="reference", views="sequential"),
                                                static_graph=True)
for it in range(2):  # two iterations: DDP's static graph is recorded in the first
    m.zero_grad(set_to_none=True)
    obj(w.chunk(2)[r], t.L_EXTRA, 0.5).loss.backward()
if r == 0:
    torch.save({n: p.grad for n, p in m.named_parameters()}, os.environ["OUT"])
dist.barrier()  # neither rank tears gloo down while the other still uses it (an abort at exit otherwise)
dist.destroy_process_group()
"""


def test_ddp_gloo_two_processes(tmp_path):
    """2 CPU processes, each with half the batch, sequential views under DDP (static_graph): the averaged
    gradient equals the joint step over the whole batch in one process."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, OUT=str(tmp_path / "g.pt"), TESTS=os.path.dirname(os.path.abspath(__file__)),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    gd = torch.load(tmp_path / "g.pt")
    m = _model()
    _, gj = _grads(m, _step(m, _window(B=4), "joint"))
    assert gd.keys() == gj.keys()
    assert _rel(gd, gj) <= 1e-10


def test_long_short_trainer_sequential_follows_joint(tmp_path):
    """LongShortTrainer(views="sequential"): the logged losses and the weights after 3 SGD steps (gradient
    accumulation 2) equal the joint trainer's (fp32, 1e-5)."""
    import warnings

    pytest.importorskip("accelerate")
    from transformers import TrainingArguments

    from lsa_kernels.integrations.trainer import LongShortTrainer, window_dataset

    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, V, (200,), generator=g) for _ in range(3)]
    ds = window_dataset(docs, 16 + 8 + 1)
    runs = {}
    for views in ("joint", "sequential"):
        m = _model(torch.float32)
        args = TrainingArguments(output_dir=str(tmp_path / views), max_steps=3, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, learning_rate=0.5, optim="sgd", logging_steps=1,
                                 save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True)
        tr = LongShortTrainer(model=m, args=args, train_dataset=ds, l_train=16, alpha=0.3, views=views)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tr.train()
        hist = [h for h in tr.state.log_history if "loss" in h and "train_runtime" not in h]
        runs[views] = hist, {n: p.detach().clone() for n, p in m.named_parameters()}
    (hj, wj), (hs, ws) = runs["joint"], runs["sequential"]
    assert len(hj) == len(hs) == 3
    for a, b in zip(hj, hs):
        for k in ("loss", "ce", "misalign"):
            assert b[k] == pytest.approx(a[k], rel=1e-5), (k, a, b)
    w0 = dict(_model(torch.float32).named_parameters())
    assert _rel({k: ws[k] - w0[k] for k in ws}, {k: wj[k] - w0[k] for k in wj}) <= 1e-4  # the updates agree
    with pytest.raises(ValueError, match="views: expected 'joint' or 'sequential'"):
        LongShortTrainer(model=None, args=None, l_train=8, views="both")


def test_recompute_gives_back_an_output_nothing_saved():
    """Inside the backward's recompute (grad enabled) the output's storage is given back unless autograd saved
    it: a final ``* 2`` saves nothing of its result, a final ``tanh`` saves it (and keeps it)."""
    w = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    with torch.enable_grad():
        h = memory._recompute(lambda t: (t @ w) * 2, x, False)
        kept = memory._recompute(lambda t: torch.tanh(t @ w), x, False)
    assert h.untyped_storage().size() == 0 and kept.untyped_storage().size() == kept.numel() * 8
    with torch.no_grad():  # the first, no-grad forward keeps its output (the loss reads it)
        assert memory._recompute(lambda t: (t @ w) * 2, x, False).untyped_storage().size() > 0
    for fn in (lambda t: (t @ w) * 2, lambda t: torch.tanh(t @ w)):  # both backpropagate as without the recompute
        g = torch.randn(3, 5, 8, dtype=torch.float64)
        want = torch.autograd.grad(fn(x), w, g)[0]
        anchor = torch.empty(0, requires_grad=True)
        out = torch.utils.checkpoint.checkpoint(lambda t, _a: memory._recompute(fn, t, False), x, anchor,
                                                use_reentrant=True)
        w.grad = None
        out.backward(g)  # a reentrant checkpoint: .backward(), not autograd.grad
        torch.testing.assert_close(w.grad, want, rtol=0, atol=0)


def test_sequential_step_frees_the_recomputed_hidden_states(monkeypatch):
    """On a transformers Llama the recomputed view's final hidden states are given back (nothing saves the
    final norm's output), with and without the offload hooks, and the gradients still equal the joint step's."""
    freed = []
    real = memory._recompute

    def spy(fn, x, offload):
        h = real(fn, x, offload)
        if torch.is_grad_enabled():
            freed.append(h.untyped_storage().size() == 0)
        return h

    monkeypatch.setattr(memory, "_recompute", spy)
    model, window = _model(), _window()
    _, want = _grads(model, _step(model, window, "joint"))
    for offload in (False, True):
        freed.clear()
        _, got = _grads(model, _step(model, window, "sequential", offload=offload))
        assert freed == [True, True], freed
        assert _rel(got, want) < 1e-10


def test_each_views_hidden_state_gradient_is_freed_after_the_final_norm(monkeypatch):
    """A view's dL/dH is freed once the final norm's backward has used it, not held through its recompute's whole
    backward (torch's reentrant checkpoint keeps its backward arguments alive): when the backward reaches the
    last decoder layer of a view's recompute, that view's dL/dH is gone (the short view runs first; the long
    view's dL/dH reaches the hook only when its own turn comes)."""
    import weakref

    model, window = _model(), _window()
    _, want = _grads(model, _step(model, window, "joint"))
    refs, alive = [], []
    real = memory.sequential_states

    def spy(*a, **k):
        hs = real(*a, **k)
        for h in hs:
            h.register_hook(lambda g: refs.append(weakref.ref(g if g._base is None else g._base)))  # its storage
        return hs

    def on_layer_out(_mod, _inp, out):
        h = out[0] if isinstance(out, tuple) else out
        if h.requires_grad:  # the recompute inside the backward
            h.register_hook(lambda g: alive.append(sum(r() is not None for r in refs)))

    monkeypatch.setattr(memory, "sequential_states", spy)
    hook = model.model.layers[-1].register_forward_hook(on_layer_out)
    try:
        _, got = _grads(model, _step(model, window, "sequential"))
    finally:
        hook.remove()
    assert len(refs) == 2 and alive == [0, 0], alive  # before: [1, 1]
    assert _rel(got, want) < 1e-10
