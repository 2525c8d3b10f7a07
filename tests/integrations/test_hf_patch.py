"""hf.patch / hf.unpatch: the patched model's loss and gradients equal the model's own (fp32), for every
argument transformers' causal-LM loss honours; no [B, T, V] tensor in forward or backward; PEFT, gradient
checkpointing, eval/generation unchanged, exact unpatch, clear errors."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from lsa_kernels.integrations import hf  # noqa: E402
from lsa_kernels.integrations import patch as P  # noqa: E402
from lsa_kernels.integrations import patched_forward as PF  # noqa: E402
from _util import CountFusedCE  # noqa: E402

V = 1024


def tiny(seed: int = 0, **cfg) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    kw = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    kw.update(cfg)
    m = LlamaForCausalLM(LlamaConfig(**kw)).float()
    m.train()
    return m


def batch(B=2, T=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, T), generator=g)
    labels = x.clone()
    labels[0, :5] = -100
    labels[1, 7] = -100
    return x, labels


def loss_and_grads(model, **kw):
    model.zero_grad(set_to_none=True)
    out = model(**kw)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same(ref, got, tol=1e-5):
    (o0, g0), (o1, g1) = ref, got
    torch.testing.assert_close(o1.loss.double(), o0.loss.double(), rtol=tol, atol=tol)
    assert set(g0) == set(g1)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=tol, atol=tol, msg=lambda m: f"{n}: {m}")


def _cases():
    x, lab = batch()
    packed = torch.cat([torch.arange(10), torch.arange(14)])[None].expand(2, -1).contiguous()
    mask = torch.ones_like(x)
    mask[1, -4:] = 0
    return {
        "labels": dict(input_ids=x, labels=lab),
        "attention_mask": dict(input_ids=x, labels=lab, attention_mask=mask),
        "num_items_in_batch": dict(input_ids=x, labels=lab, num_items_in_batch=torch.tensor(17)),
        "num_items_int": dict(input_ids=x, labels=lab, num_items_in_batch=29),
        "shift_labels": dict(input_ids=x, labels=lab, shift_labels=hf.shift_labels(lab).roll(1, -1)),
        "position_ids_packed": dict(input_ids=x, labels=lab, position_ids=packed),
        "logits_to_keep": dict(input_ids=x, labels=lab[:, -8:], logits_to_keep=8),
        "logits_to_keep_positions": dict(input_ids=x, labels=lab[:, :6],
                                         logits_to_keep=torch.tensor([0, 3, 5, 9, 11, 20])),
        "ignore_index": dict(input_ids=x, labels=lab.masked_fill(lab == -100, -1), ignore_index=-1),
    }


CASES = _cases()


@pytest.mark.parametrize("case", list(CASES))
def test_patched_loss_and_grads_equal_the_models_own(case):
    m = tiny()
    kw = CASES[case]
    ref = loss_and_grads(m, **kw)
    assert ref[0].logits is not None
    hf.patch(m)
    got = loss_and_grads(m, **kw)
    assert got[0].logits is None
    assert_same(ref, got)


def test_positional_args_return_dict_false_and_signature():
    m = tiny()
    x, lab = batch()
    ref = m(x, None, None, labels=lab).loss
    hf.patch(m)
    assert "labels" in inspect.signature(m.forward).parameters  # Trainer/generate inspect it
    out = m(x, labels=lab, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1
    torch.testing.assert_close(out[0], ref, rtol=1e-6, atol=1e-6)


def test_eval_mode_no_labels_and_generation_are_the_models_own():
    m = tiny()
    x, lab = batch()
    m.eval()
    with torch.no_grad():
        ref = m(input_ids=x, labels=lab)
        gen0 = m.generate(x[:, :5], max_new_tokens=4, do_sample=False)
    hf.patch(m)
    with torch.no_grad():
        out = m(input_ids=x, labels=lab)  # eval: the model's own output, logits included
        torch.testing.assert_close(out.logits, ref.logits)
        torch.testing.assert_close(out.loss, ref.loss)
        assert torch.equal(m.generate(x[:, :5], max_new_tokens=4, do_sample=False), gen0)
    m.train()
    out = m(input_ids=x)  # training without labels: the model's own logits
    assert out.logits.shape == (2, x.shape[1], V) and out.loss is None


def test_unpatch_restores_exactly():
    m = tiny()
    assert "forward" not in m.__dict__
    hf.patch(m)
    assert hf.is_patched(m) and "forward" in m.__dict__
    hf.patch(m, chunk_bytes=1 << 20)  # patched again: same wrapper, options updated
    assert len(m.__dict__[P._STACK]) == 1
    hf.unpatch(m)
    assert "forward" not in m.__dict__ and P._STACK not in m.__dict__ and not hf.is_patched(m)
    assert m.forward.__func__ is LlamaForCausalLM.forward
    with pytest.raises(ValueError, match="not patched"):
        hf.unpatch(m)

    sentinel = m.forward  # an instance-level forward someone else installed is put back as it was
    m.forward = sentinel
    hf.patch(m)
    hf.unpatch(m)
    assert m.__dict__["forward"] is sentinel

    hf.patch(m)
    m.forward = lambda *a, **k: None  # wrapped again after the patch: unpatching would drop it
    with pytest.raises(RuntimeError, match="wrapped again"):
        hf.unpatch(m)


def test_a_patched_model_can_be_freed():
    import gc
    import weakref

    m = tiny()
    hf.patch(m)
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None


def test_a_deepcopy_of_a_patched_model_runs_its_own_weights():
    import copy

    x, lab = batch()
    m = tiny()
    hf.patch(m)
    c = copy.deepcopy(m)
    assert hf.is_patched(c)
    with torch.no_grad():
        for p in c.parameters():
            p.mul_(0.5)
    want = hf.causal_lm_loss(c, x, lab)
    torch.testing.assert_close(c(input_ids=x, labels=lab).loss, want)  # training: fused path
    c.eval()
    torch.testing.assert_close(c(input_ids=x, labels=lab).loss, want)  # eval: the copy's own forward
    hf.unpatch(c)
    assert hf.is_patched(m) and "forward" not in c.__dict__


def test_peft_lora_model():
    peft = pytest.importorskip("peft")
    x, lab = batch()

    def lora():
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        pm = peft.get_peft_model(tiny(), cfg)
        for n, p in pm.named_parameters():  # non-zero B so the adapter changes the output
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(hash(n) % 1000))
        return pm

    ref_model, pm = lora(), lora()
    ref = loss_and_grads(ref_model, input_ids=x, labels=lab, num_items_in_batch=torch.tensor(30))
    assert hf.patch(pm) is pm
    assert "forward" in pm.get_base_model().__dict__  # the causal LM inside is patched, not the PeftModel
    got = loss_and_grads(pm, input_ids=x, labels=lab, num_items_in_batch=torch.tensor(30))
    assert got[0].logits is None and any("lora_" in n for n in got[1])
    assert_same(ref, got)
    hf.unpatch(pm)
    assert "forward" not in pm.get_base_model().__dict__


def test_gradient_checkpointing():
    x, lab = batch()
    ref_m, m = tiny(), tiny()
    for mm in (ref_m, m):
        (getattr(mm, "activation_checkpointing_enable", None) or mm.gradient_checkpointing_enable)()
        mm.config.use_cache = False
    ref = loss_and_grads(ref_m, input_ids=x, labels=lab)
    hf.patch(m)
    calls = []
    layer = m.model.layers[0].mlp  # inside the checkpointed block
    orig = layer.forward

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    layer.forward = spy
    got = loss_and_grads(m, input_ids=x, labels=lab)
    assert len(calls) == 2  # the forward, then its recompute in backward
    assert_same(ref, got)


class ShapeLog(TorchDispatchMode):
    """Records the shape of every tensor an op returns (forward and backward run inside the mode)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out

    def logits_like(self, n_rows: int):
        """Tensors with a vocabulary dimension holding at least half the rows' logits."""
        return [(f, s) for f, s in self.shapes if V in s and torch.Size(s).numel() >= n_rows * V // 2]


def test_no_BTV_tensor_in_forward_or_backward():
    B, T = 2, 48  # N = 96 rows > H = 32: the head weight [V, H] is not logits-sized
    x, lab = batch(B, T)
    m = tiny()
    with ShapeLog() as log:
        m(input_ids=x, labels=lab).loss.backward()
    assert log.logits_like(B * T), "the detector must see the unpatched model's logits"
    hf.patch(m, chunk_bytes=8 * V * 4)  # the cpu backend then holds at most a few rows of logits at a time
    m.zero_grad()
    with ShapeLog() as log:
        out = m(input_ids=x, labels=lab, num_items_in_batch=torch.tensor(50))
        out.loss.backward()
    assert out.logits is None
    assert not log.logits_like(B * T), log.logits_like(B * T)[:5]
    assert any(V in s for _, s in log.shapes)  # it did look at vocabulary-sized work (the chunks)


def test_unsupported_models_are_refused_clearly():
    class Doubled(LlamaForCausalLM):  # transforms its logits in a way no config field announces
        def forward(self, *a, **k):
            out = super().forward(*a, **k)
            out.logits = out.logits * 2
            return out

    torch.manual_seed(0)
    m = Doubled(tiny().config)
    with pytest.raises(hf.UnsupportedModel, match="do not reproduce"):
        hf.patch(m)
    assert "forward" not in m.__dict__
    with pytest.raises(TypeError, match="torch.nn.Module"):
        hf.patch(object())
    m = tiny()
    m.loss_type = "ForMaskedLM"
    with pytest.raises(hf.UnsupportedModel, match="ForMaskedLMLoss"):
        hf.patch(m)
    with pytest.raises(ValueError, match="backend"):
        hf.patch(tiny(), backend="cuda")
    with pytest.raises(ValueError, match="chunk_bytes"):
        hf.patch(tiny(), chunk_bytes=0)


def test_label_row_count_mismatch_is_a_clear_error():
    m = tiny()
    x, lab = batch()
    hf.patch(m)
    with pytest.raises(ValueError, match="hidden rows"):
        m(input_ids=x, labels=lab, logits_to_keep=4)


def test_trl_fused_lm_head_served_by_the_fused_ce():
    """TRL's add_fused_lm_head contract (what SFTTrainer calls) served by the patch on top of it."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    x, lab = batch()
    mask = torch.ones_like(x)
    outputs = ("log_probs", "entropy", "is_top1", "log_sum_sq_probs", "mean_logits")
    ref_m, m = tiny(), tiny()
    for mm in (ref_m, m):
        trl_utils.add_fused_lm_head(mm, outputs=outputs)
    ref = ref_m(input_ids=x, attention_mask=mask, labels=lab, fused_lm_head=True, num_items_in_batch=40)
    (-ref.log_probs.sum() / 40).backward()
    hf.patch(m, chunk_bytes=3 * V * 4 * 4)
    called = []
    orig = PF.linear_cross_entropy
    PF.linear_cross_entropy = lambda *a, **k: called.append(k.get("reduction")) or orig(*a, **k)
    try:
        got = m(input_ids=x, attention_mask=mask, labels=lab, fused_lm_head=True, num_items_in_batch=40)
    finally:
        PF.linear_cross_entropy = orig
    assert called == ["none"]
    (-got.log_probs.sum() / 40).backward()
    assert torch.equal(got.label_mask, ref.label_mask)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-5)
    for f in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        torch.testing.assert_close(getattr(got, f), getattr(ref, f), rtol=1e-5, atol=1e-5, msg=lambda s: f"{f}: {s}")
    assert torch.equal(got.is_top1.bool(), ref.is_top1.bool())
    for (n, p0), (_, p1) in zip(ref_m.named_parameters(), m.named_parameters()):
        torch.testing.assert_close(p1.grad, p0.grad, rtol=1e-5, atol=1e-6, msg=lambda s: f"{n}: {s}")


@pytest.mark.parametrize("order", ["patch_then_trl", "trl_then_patch"])
def test_trl_head_fields_and_either_patch_order(order):
    """Patched before TRL's head is added (what hf.patch(model) then SFTTrainer(model) does) or after: the
    fused_lm_head call runs the fused CE once, returns TRL's values, and fills exactly the fields TRL's head
    was built for (is_top1 / log_sum_sq_probs stay None when not asked)."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    x, lab = batch()
    outputs = ("log_probs", "entropy")
    ref_m, m = tiny(), tiny()
    trl_utils.add_fused_lm_head(ref_m, outputs=outputs)
    ref = ref_m(input_ids=x, labels=lab, fused_lm_head=True)
    ref.loss.backward()
    if order == "patch_then_trl":
        hf.patch(m)
        trl_utils.add_fused_lm_head(m, outputs=outputs)
    else:
        trl_utils.add_fused_lm_head(m, outputs=outputs)
        hf.patch(m)
    with CountFusedCE() as ce:
        got = m(input_ids=x, labels=lab, fused_lm_head=True)
    assert ce.calls == 1
    got.loss.backward()
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.log_probs, ref.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.entropy, ref.entropy, rtol=1e-5, atol=1e-5)
    assert got.is_top1 is None and got.log_sum_sq_probs is None and got.mean_logits is None
    for (n, p0), (_, p1) in zip(ref_m.named_parameters(), m.named_parameters()):
        torch.testing.assert_close(p1.grad, p0.grad, rtol=1e-5, atol=1e-6, msg=lambda s: f"{n}: {s}")
    m.eval()  # eval mode: TRL's own head, as unpatched
    with CountFusedCE() as ce, torch.no_grad():
        ev = m(input_ids=x, labels=lab, fused_lm_head=True)
    assert ce.calls == 0 and ev.log_probs is not None
    with CountFusedCE() as ce, torch.no_grad():  # and without fused_lm_head, in training mode, the patched loss
        m.train()
        plain = m(input_ids=x, labels=lab)
    assert ce.calls == 1 and plain.logits is None


def test_trl_head_wrapped_by_accelerates_mixed_precision_is_still_routed():
    """Trainer's accelerate wraps the model's forward again for bf16 (autocast, then outputs to fp32) on top of
    TRL's head on top of the patch: the fused_lm_head call still reaches the fused CE."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    from accelerate.utils import convert_outputs_to_fp32

    import types

    x, lab = batch()
    m = tiny()
    hf.patch(m)
    trl_utils.add_fused_lm_head(m, outputs=("log_probs",))
    m.forward = types.MethodType(torch.autocast("cpu", dtype=torch.bfloat16)(m.forward.__func__), m)
    m.forward = types.MethodType(convert_outputs_to_fp32(m.forward.__func__), m)
    with CountFusedCE() as ce:
        got = m(input_ids=x, labels=lab, fused_lm_head=True)
    assert ce.calls == 1 and got.log_probs.dtype == torch.float32 and torch.isfinite(got.loss)


@pytest.mark.parametrize("order", ["patch_then_trl", "trl_then_patch"])
def test_trl_head_with_a_temperature_keeps_trls_pass_and_warns_once(order):
    """TRL's head divides the logits by its temperature, which the fused CE cannot: its values (not the
    temperature-1 ones) come back, from TRL's pass, with one warning per model."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    x, lab = batch()
    ref_m, m = tiny(), tiny()
    trl_utils.add_fused_lm_head(ref_m, temperature=0.5)
    with torch.no_grad():
        ref = ref_m(input_ids=x, labels=lab, fused_lm_head=True)
    if order == "patch_then_trl":
        hf.patch(m)
        trl_utils.add_fused_lm_head(m, temperature=0.5)
    else:
        trl_utils.add_fused_lm_head(m, temperature=0.5)
        hf.patch(m)
    import warnings

    with warnings.catch_warnings(record=True) as seen, CountFusedCE() as ce, torch.no_grad():
        warnings.simplefilter("always")
        got = [m(input_ids=x, labels=lab, fused_lm_head=True) for _ in range(2)]
    assert ce.calls == 0
    for g in got:
        torch.testing.assert_close(g.log_probs, ref.log_probs, rtol=1e-6, atol=1e-6)
    mine = [w for w in seen if "temperature=0.5" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in seen]


def test_unpatch_removes_the_trl_routing_hook():
    m = tiny()
    hf.patch(m)
    hf.patch(m, chunk_bytes=1 << 20)
    assert len(m._forward_pre_hooks) == 1
    hf.unpatch(m)
    assert len(m._forward_pre_hooks) == 0 and len(m._forward_pre_hooks_with_kwargs) == 0
    assert P._HOOK not in m.__dict__


def test_bf16_autocast_matches_within_bf16_precision():
    """Trainer's bf16 (accelerate autocast; also SFTConfig's default): the head runs in bf16 as F.linear would."""
    x, lab = batch()
    ref_m, m = tiny(), tiny()
    hf.patch(m)
    res = []
    for mm in (ref_m, m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = mm(input_ids=x, labels=lab, num_items_in_batch=torch.tensor(40))
        out.loss.backward()
        res.append((out.loss.float(), {n: p.grad for n, p in mm.named_parameters()}))
    (l0, g0), (l1, g1) = res
    assert abs(l1.item() - l0.item()) <= 1e-2 * abs(l0.item())  # the fused loss is returned in bf16
    for n in g0:
        assert g1[n].dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(g0[n].flatten(), g1[n].flatten(), dim=0)
        assert cos > 0.999, (n, cos.item())
