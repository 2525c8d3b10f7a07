"""tile_mlp / tile_norms: each decoder layer's MLP and norms over sequence tiles, recomputed in the backward.
Exact gradients on tiny Llama / Qwen2 / Mistral / Gemma models, never a whole [T, intermediate] tensor, the
norms' fp32 rows not kept for the backward, clear refusals."""

import weakref

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")

from lsa_kernels.integrations import hf  # noqa: E402
from lsa_kernels.integrations.tiling import CannotTile, tile_mlp, tile_norms, untile_mlp, untile_norms  # noqa: E402

V, H, I = 211, 32, 72  # I differs from every other dimension, so its tensors can be recognised
COMMON = dict(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)


def _model(family, dtype=torch.float64):
    T = transformers
    cfg = {"llama": lambda: T.LlamaConfig(**COMMON), "qwen2": lambda: T.Qwen2Config(**COMMON),
           "mistral": lambda: T.MistralConfig(**COMMON), "gemma": lambda: T.GemmaConfig(**COMMON, head_dim=8)}[family]()
    torch.manual_seed(0)
    m = hf.load_causal_lm(cfg, dtype=dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.train()


def _grads(m, x):
    m.zero_grad(set_to_none=True)
    loss = hf.causal_lm_loss(m, x, x, backend="reference")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _lora(peft, m, targets):
    """``m`` with LoRA adapters on ``targets`` whose B is not zero (so that they change the output)."""
    pm = peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return pm, pm.get_base_model()


def _rel(a, b):
    assert a.keys() == b.keys() and b
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in b)


class _Widest(TorchDispatchMode):
    """The most rows of any tensor whose last dimension is the MLP's intermediate size, in forward and
    backward (not counting down_proj's weight gradient, [H, I])."""

    def __init__(self):
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == I and tuple(t.shape) != (H, I):
                self.rows = max(self.rows, t.numel() // I)
        return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma"])
def test_exact_gradients_and_tiles_run(family):
    m = _model(family)
    x = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(1))
    keys = list(m.state_dict())
    l0, g0 = _grads(m, x)
    assert tile_mlp(m, 3) == 2
    assert list(m.state_dict()) == keys  # the modules themselves are kept: checkpoints do not change
    seen = []
    for layer in m.model.layers:  # count the calls of the module's own forward (what each tile runs)
        inner = layer.mlp._lsa_untiled_forward
        layer.mlp._lsa_untiled_forward = lambda t, inner=inner: seen.append(t.shape[-2]) or inner(t)
    with _Widest() as w:
        l1, g1 = _grads(m, x)
    # forward: 3 tiles per layer; backward: each tile recomputed once
    assert sorted(seen) == sorted([14, 13, 13] * 2 * 2)
    assert w.rows <= 2 * 14  # never more than one tile's [B, T/3, I] at once (untiled: 2 * 40)
    assert abs(l1 - l0) <= 1e-12 * abs(l0)
    # the norm that feeds the MLP runs inside the tiles: Gemma's fp32 norm-weight sum (see the norms' test)
    assert _rel(g1, g0) <= (1e-6 if family == "gemma" else 1e-10)
    assert untile_mlp(m) == 2
    with _Widest() as w:
        _grads(m, x)
    assert w.rows == 2 * 40  # untiled again: the whole [B, T, I] exists (the check above can fail)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_the_norm_feeding_the_mlp_moves_into_its_tiles(family):
    """tile_mlp finds (by a probe run, not by name) the norm whose output is the MLP's input and runs it inside
    the tiles: the tiles then keep the residual stream, and neither the norm's output nor its fp32 rows are saved;
    the norm gets its gradient through the tiles; untile_mlp puts everything back."""
    m = _model(family)
    x = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(5))
    l0, g0 = _grads(m, x)
    before = _saved_bytes(m, x)
    tile_mlp(m, 3)
    for layer in m.model.layers:
        assert layer.mlp.__dict__.get("_lsa_norm") is layer.post_attention_layernorm
        assert "_lsa_fused_forward" not in layer.input_layernorm.__dict__
    assert tile_norms(m, 3) == 3  # the moved norms are not tiled again: input norms and the final norm
    l1, g1 = _grads(m, x)
    assert abs(l1 - l0) <= 1e-12 * abs(l0)
    assert _rel(g1, g0) <= (1e-6 if family == "gemma" else 1e-10)  # Gemma's fp32 norm-weight sum, as above
    assert sum(k.endswith("post_attention_layernorm.weight") for k in g1) == 2  # the moved norms still learn
    untile_norms(m)
    # per layer, tiling the MLP alone saved its [B, T, I] rows; moving the norm in also drops the norm's saved
    # rows and output beside the [B, T, H] input the tiles keep (at least one [B, T, H] of 4-byte floats)
    tiled = _saved_bytes(m, x)
    untile_mlp(m)
    assert "_lsa_fused_forward" not in m.model.layers[0].post_attention_layernorm.__dict__
    assert _saved_bytes(m, x) == before
    tile_mlp(m, 3)
    _unfuse_all = [layer.mlp.__dict__.pop("_lsa_norm") for layer in m.model.layers]  # MLP tiles only
    for n in _unfuse_all:
        n.__dict__.pop("forward"), n.__dict__.pop("_lsa_fused_forward")
    mlp_only = _saved_bytes(m, x)
    assert tiled <= mlp_only - 2 * 2 * 40 * H * 4, (tiled, mlp_only)


def test_a_norm_whose_output_feeds_more_than_the_mlp_stays_out():
    """If moving the norm changes the model's output (here: a layer that also adds the norm's output to its
    residual), tile_mlp leaves the norm where it was."""
    m = _model("llama", torch.float32)
    x = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(2))
    layer = m.model.layers[0]
    kept = {}
    layer.post_attention_layernorm.register_forward_hook(lambda mod, i, o: kept.__setitem__("n", o))
    layer.register_forward_hook(lambda mod, i, o: (o[0] + kept["n"],) + tuple(o[1:]) if isinstance(o, tuple)
                                else o + kept["n"])  # the norm's output also goes into the layer's output
    with torch.no_grad():
        want = hf.hidden_states(m, x)
    tile_mlp(m, 2)
    assert "_lsa_norm" not in layer.mlp.__dict__
    with torch.no_grad():
        torch.testing.assert_close(hf.hidden_states(m, x), want)  # up to the tiles' fp32 GEMM rounding


def test_auto_tiles_fp32_no_grad_lora_and_checkpointing():
    peft = pytest.importorskip("peft")
    m = _model("llama", torch.float32)
    x = torch.randint(0, V, (2, 70), generator=torch.Generator().manual_seed(2))
    _, g0 = _grads(m, x)
    tile_mlp(m)  # one tile per H = 32 tokens: 3 tiles at T = 70
    _, g1 = _grads(m, x)
    assert _rel(g1, g0) <= 1e-5
    with torch.no_grad(), _Widest() as w:  # without grad the tiles run one after the other too
        hf.hidden_states(m, x)
    assert w.rows <= 2 * 24

    untile_mlp(m)
    pm, base = _lora(peft, m, ["gate_proj", "down_proj", "q_proj"])
    _, g0 = _grads(base, x)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tile_mlp(pm, 4)  # through the peft wrapper
    _, g1 = _grads(base, x)
    assert all("lora_" in n for n in g0)
    assert _rel(g1, g0) <= 1e-5


def test_refusals_change_nothing():
    with pytest.raises(ValueError, match="tiles: expected an int >= 1"):
        tile_mlp(_model("llama"), 0)

    class Pair(nn.Module):  # returns a tuple, as some MoE blocks do
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(H, H, dtype=torch.float64)

        def forward(self, x):
            return self.lin(x), None

    class Mixer(nn.Module):  # a row depends on the rows before it
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(H, H, dtype=torch.float64)

        def forward(self, x):
            return self.lin(x).cumsum(-2)

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList([nn.Linear(H, H, dtype=torch.float64)])

        def forward(self, x):
            return self.experts[0](x)

    for bad, msg in ((Pair(), r"does not map \[.., T, H\] -> \[.., T, H\]"),
                     (Mixer(), "depends on other tokens"), (Experts(), "mixture of experts")):
        m = _model("llama")
        m.model.layers[1].mlp = bad
        with pytest.raises(CannotTile, match=msg):
            tile_mlp(m, 2)
        assert "_lsa_untiled_forward" not in m.model.layers[0].mlp.__dict__  # nothing was wrapped

    class NoMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(H, H)])

    with pytest.raises(CannotTile, match="no decoder layer with an .mlp module"):
        tile_mlp(NoMLP(), 2)


def test_moe_model_refused():
    cfg = transformers.Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                      shared_expert_intermediate_size=16)
    m = hf.load_causal_lm(cfg, dtype=torch.float32)
    with pytest.raises(CannotTile, match="mixture of experts"):
        tile_mlp(m, 2)


def _saved_bytes(m, x):
    """Bytes of the distinct storages autograd saves in one forward of ``m`` on ``x``."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hf.hidden_states(m, x)
    return sum(seen.values())


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma"])
def test_norms_exact_gradients_and_less_saved(family):
    m = _model(family)
    x = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(3))
    l0, g0 = _grads(m, x)
    before = _saved_bytes(m, x)
    assert tile_norms(m, 3) == 5  # two per layer and the final norm
    calls = []
    for layer in m.model.layers:
        inner = layer.input_layernorm._lsa_untiled_forward
        layer.input_layernorm._lsa_untiled_forward = lambda t, inner=inner: calls.append(t.shape[-2]) or inner(t)
    l1, g1 = _grads(m, x)
    # 3 tiles per layer, run by the forward, recomputed by the norm's backward and by the backward of each of
    # the three linears the input norm feeds (q, k, v: their weight gradients)
    assert sorted(calls) == sorted([14, 13, 13] * 2 * 5)
    assert abs(l1 - l0) <= 1e-12 * abs(l0)
    # Gemma's norm multiplies by (1 + weight) in fp32 even for fp64 weights: its weight gradient is an fp32 sum,
    # whose order the tiles change (fp32 rounding); the other families' weight product is in the weights' dtype
    assert _rel(g1, g0) <= (1e-6 if family == "gemma" else 1e-10)
    assert untile_norms(m) == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma"])
def test_norms_keep_only_their_input(family, dtype):
    m = _model(family, dtype)
    x = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(3))
    before = _saved_bytes(m, x)
    tile_norms(m, 3)
    after = _saved_bytes(m, x)
    # untiled, each of the 5 norms saves at least its normalised rows [2, 40, H] in fp32 (transformers' norms
    # compute in fp32) for its weight's gradient; tiled, only its input, a tensor the step holds anyway in fp32
    # (the residual stream) or a bf16 copy smaller than the fp32 upcast the untiled norm saved
    assert before - after >= 5 * 2 * 40 * H * 4
    untile_norms(m)
    assert _saved_bytes(m, x) == before  # untiled again (the check above can fail)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_linears_fed_by_a_tiled_norm_keep_its_input_not_its_output(family):
    """q/k/v (and, without a tiled MLP, gate/up) save the norm's input, not its output; the gradients stay exact
    (Qwen2: q/k/v with biases); a frozen linear and untile_norms take the plain path again."""
    m = _model(family)
    x = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(5))
    _, g0 = _grads(m, x)
    tile_norms(m, 3)
    layer = m.model.layers[0]
    wired = [n for n, mod in layer.named_modules() if "_lsa_plain_forward" in mod.__dict__]
    assert sorted(wired) == sorted(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                    "mlp.gate_proj", "mlp.up_proj"])
    outs, kept = [], []
    hooks = [mm.register_forward_hook(lambda _m, _i, o: outs.append(weakref.ref(o)))
             for lay in m.model.layers for mm in (lay.input_layernorm, lay.post_attention_layernorm)]

    def pack(t):  # is t (a view of) a norm output that is still alive?
        kept.extend(1 for r in outs if r() is not None and r().untyped_storage().data_ptr() == t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hf.hidden_states(m, x)
    for h in hooks:
        h.remove()
    assert len(outs) == 4 and not kept  # no norm output is kept for the backward
    _, g1 = _grads(m, x)
    assert _rel(g1, g0) <= (1e-6 if family == "gemma" else 1e-10)  # Gemma: fp32 norm-weight sums (see above)
    layer.self_attn.q_proj.weight.requires_grad_(False)  # frozen: the plain forward, which saves nothing for it
    _, g2 = _grads(m, x)
    assert "model.layers.0.self_attn.q_proj.weight" not in g2 and _rel(g2, {k: g0[k] for k in g2}) <= (
        1e-6 if family == "gemma" else 1e-10)
    untile_norms(m)
    assert not [n for n, mod in m.named_modules() if "_lsa_plain_forward" in mod.__dict__]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linears_recomputing_the_norm_match_the_plain_linears_bit_for_bit(dtype):
    """The recomputed norm output is the forward's, bit for bit, and dy / dW / db are the products autograd forms:
    tiled norms with the linears that keep the norm's input give the gradients of tiled norms without them."""
    from lsa_kernels.integrations.tiling import _unwire_linears

    m = _model("qwen2", dtype)  # q/k/v with biases
    x = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(5))
    tile_norms(m, 3)
    l1, g1 = _grads(m, x)
    _unwire_linears(m)
    l2, g2 = _grads(m, x)
    assert torch.equal(l1, l2) and g1.keys() == g2.keys()
    assert all(torch.equal(g1[k], g2[k]) for k in g1)


def test_norms_with_mlp_lora_and_checkpointing_fp32():
    peft = pytest.importorskip("peft")
    m = _model("llama", torch.float32)
    x = torch.randint(0, V, (2, 70), generator=torch.Generator().manual_seed(4))
    pm, base = _lora(peft, m, ["q_proj", "v_proj", "up_proj"])
    _, g0 = _grads(base, x)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert tile_norms(pm) == 5 and tile_mlp(pm, 4) == 2  # through the peft wrapper; norms: one tile per 32 tokens
    _, g1 = _grads(base, x)
    assert g0 and all("lora_" in n for n in g0)
    assert _rel(g1, g0) <= 1e-5


def test_norms_refused_when_missing_or_not_row_wise():
    with pytest.raises(ValueError, match="tiles: expected an int >= 1"):
        tile_norms(_model("llama"), -2)

    class MixNorm(nn.Module):  # called a norm, but normalises over the sequence
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(H, dtype=torch.float64))

        def forward(self, x):
            return self.weight * (x - x.mean(-2, keepdim=True))

    m = _model("llama")
    m.model.layers[1].post_attention_layernorm = MixNorm()
    with pytest.raises(CannotTile, match="depends on other tokens"):
        tile_norms(m)
    assert "_lsa_untiled_forward" not in m.model.layers[0].input_layernorm.__dict__  # nothing was wrapped

    class NoNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(H, H)])

    with pytest.raises(CannotTile, match="no norm module"):
        tile_norms(NoNorm())


def test_random_modules_get_a_checkpoint_per_tile_and_the_rest_one_function():
    m = _model("llama")
    tile_mlp(m, 2)
    tile_norms(m, 2)
    assert all(layer.mlp._lsa_row_function and layer.input_layernorm._lsa_row_function for layer in m.model.layers)

    class DropMLP(nn.Module):  # as GPT-2's MLP: dropout on its output
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(H, H, dtype=torch.float64)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            return self.drop(self.lin(x))

    m = _model("llama")
    m.model.layers[0].mlp = DropMLP()
    tile_mlp(m, 3)
    assert not m.model.layers[0].mlp._lsa_row_function and m.model.layers[1].mlp._lsa_row_function
    x = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(11)
    _, g = _grads(m, x)  # the checkpointed tiles replay their dropout masks in the backward
    torch.manual_seed(11)
    _, g2 = _grads(m, x)
    assert _rel(g2, g) == 0


def _autocast_grads(m, x):
    m.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = hf.causal_lm_loss(m, x, x, backend="reference")
    loss.backward()  # outside autocast, as recommended: the tiles' recompute must restore it
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def test_bf16_autocast_recompute_runs_under_the_forwards_autocast():
    m = _model("llama", torch.float32)
    x = torch.randint(0, V, (2, 70), generator=torch.Generator().manual_seed(6))
    l0, g0 = _autocast_grads(m, x)
    tile_mlp(m, 3)
    tile_norms(m, 3)
    seen = []
    mlp = m.model.layers[0].mlp
    inner = mlp._lsa_untiled_forward
    mlp._lsa_untiled_forward = lambda t: seen.append(torch.is_autocast_enabled("cpu")) or inner(t)
    l1, g1 = _autocast_grads(m, x)
    assert seen == [True] * 6  # 3 tiles in the forward, 3 recomputed in the backward (outside autocast)
    assert abs(l1 - l0) <= 1e-6 * abs(l0)
    # per tile, each weight gradient is rounded to bf16 before the tiles are summed: bf16-level differences
    assert _rel(g1, g0) <= 2e-2
