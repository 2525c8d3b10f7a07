"""`lsa plan` (lsa_kernels/train/plan.py): hand-checked terms, the saved-activation count against autograd's own
saved tensors on a tiny Llama, monotonicity in T, the longest-T bisection, bad inputs (one line, exit 2)."""

from __future__ import annotations

import json

import pytest
import torch

from lsa_kernels.train import plan as P

TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def tiny(**kw):
    return P.shape_from_dict(dict(TINY, **kw), "tiny")


def test_hand_checked_terms():
    s = tiny()
    # embed + untied head 2*1000*64; per layer q 64*64, k,v 64*32 each, o 64*64, MLP 3*64*176, 2 norms; final norm
    layer = 4096 + 2048 + 2048 + 4096 + 33792 + 128
    assert s.layer_params() == layer == 46208
    assert s.params() == 128000 + 2 * layer + 64 == 220480
    assert s.lora_params(8) == 2 * 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64)) == 7168
    p = P.plan(s, P.Setup(device="cpu", objective="ce", runtime=0), 100)
    assert p.terms["weights"] == 220480 * 4
    assert p.terms["optimizer state"] == 2 * 220480 * 4
    assert p.terms["gradients"] == 220480 * 4
    # fp32, full fine-tuning: per token per layer 32H + 8 kv_dim + 16I + 4 heads + 8 bytes (module docstring)
    assert sum(p.per_token_layer.values()) == 32 * 64 + 8 * 32 + 16 * 176 + 4 * 4 + 8 == 5144
    lo = P.plan(s, P.Setup(device="cpu", objective="ce", lora=8, dtype="bf16", runtime=0), 100)
    assert lo.terms["weights"] == 220480 * 2 + 7168 * 4  # bf16 base, fp32 adapters
    assert lo.terms["optimizer state"] == 2 * 7168 * 4
    ck = P.plan(s, P.Setup(device="cpu", objective="ce", grad_ckpt=True, runtime=0), 100)
    assert ck.per_token_layer["checkpointed input"] == 4 * 64


def _autograd_saved_per_layer(dtype, lora: int, tiled_norms: bool = False) -> float:
    """Bytes per token autograd saves for one decoder layer of a tiny transformers Llama (layers 2 minus 1),
    parameters (which are resident anyway) left out; ``tiled_norms``: with the norms sequence-tiled."""
    from transformers import LlamaConfig

    from lsa_kernels.integrations import hf

    T = 256

    def saved(layers):
        torch.manual_seed(0)
        m = hf.load_causal_lm(LlamaConfig(**dict(TINY, num_hidden_layers=layers), max_position_embeddings=T),
                              dtype=dtype, attn="sdpa").train()
        if lora:
            from peft import LoraConfig, get_peft_model

            m = get_peft_model(m, LoraConfig(r=lora, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        if tiled_norms:
            from lsa_kernels.integrations.tiling import tile_norms

            tile_norms(m, 4)
        params = {p.untyped_storage().data_ptr() for p in m.parameters()}
        seen = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hf.hidden_states(m, torch.randint(0, 1000, (1, T)))
        return sum(seen.values())

    return (saved(2) - saved(1)) / T


@pytest.mark.parametrize("tiled_norms", [False, True])
@pytest.mark.parametrize("dtype,lora", [("fp32", 0), ("bf16", 0), ("fp32", 8), ("bf16", 8)])
def test_saved_activations_match_autograd(dtype, lora, tiled_norms):
    pytest.importorskip("peft")
    tdtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    got = _autograd_saved_per_layer(tdtype, lora, tiled_norms)
    p = P.plan(tiny(), P.Setup(device="cpu", objective="ce", dtype=dtype, lora=lora, runtime=0,
                               tiled_norms=0 if tiled_norms else None), 256)
    assert sum(p.per_token_layer.values()) == pytest.approx(got, abs=0.5)


SETUPS = [
    P.Setup(device="cpu", objective="hf"),
    P.Setup(device="cpu", objective="ce", grad_ckpt=True),
    P.Setup(device="cpu", objective="long-short"),
    P.Setup(device="cpu", objective="long-short", views="sequential", grad_ckpt=True, tiled_mlp=0),
    P.Setup(device="cpu", objective="long-short", views="sequential", grad_ckpt=True, tiled_mlp=0, tiled_norms=0),
    P.Setup(device="cuda", objective="long-short", views="sequential", grad_ckpt=True, tiled_mlp=4, lora=8,
            dtype="bf16", offload=True),
]


@pytest.mark.parametrize("st", SETUPS, ids=lambda st: f"{st.objective}-{st.views}-{st.device}")
def test_peak_grows_with_T_and_longest_is_tight(st):
    s = tiny()
    Ts = range(1, 3000, 7)
    peaks = [P.plan(s, st, T).peak for T in Ts]
    # monotone, except where the sequential views move a trainable embedding into each view's recompute (past
    # V tokens per view): the two [T, H] embeddings kept until the backward are then gone
    switch = [i for i, T in enumerate(Ts) if st.views == "sequential" and not st.lora and st.batch * T > s.vocab][:1]
    for part in ([peaks[:switch[0]], peaks[switch[0]:]] if switch else [peaks]):
        assert all(b >= a for a, b in zip(part, part[1:]))
    budget = P.plan(s, st, 5000).peak + 12345
    best = P.longest(s, st, budget)
    assert best >= 5000
    assert P.plan(s, st, best).peak <= budget < P.plan(s, st, best + 1).peak


def test_levers_lower_the_peak_at_long_context():
    s = P.load_shape("llama3-8b", 2)
    T = 65536

    def peak(**kw):
        return P.plan(s, P.Setup(device="cuda", dtype="bf16", lora=32, **kw), T).peak

    joint, seq = peak(), peak(views="sequential")
    assert seq < joint
    assert peak(views="sequential", grad_ckpt=True) < seq
    assert peak(views="sequential", grad_ckpt=True, tiled_mlp=0) < peak(views="sequential", grad_ckpt=True)
    assert peak(views="sequential", grad_ckpt=True, tiled_mlp=0, tiled_norms=0) < peak(views="sequential",
                                                                                       grad_ckpt=True, tiled_mlp=0)
    assert peak(objective="hf") > peak(objective="ce")


def test_cli_json_and_table(capsys):
    rc = P.plan_main(["--model", "train-step", "--budget", "8GiB", "--device", "cpu", "--objective", "ce", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["longest_T"] > 0 and out["peak"] <= out["budget"] == 8 * 2**30
    rc = P.plan_main(["--model", "train-step", "--budget", "8GiB", "--device", "cpu", "--tokens", "4096"])
    text = capsys.readouterr().out
    assert rc == 0 and "at T = 4096" in text and "longest T that fits" in text and "saved activations" in text


def test_config_file_and_layers(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(dict(TINY, model_type="llama")))
    assert P.load_shape(str(cfg)) == P.shape_from_dict(TINY, str(cfg))
    assert P.load_shape("llama3-8b", 2).layers == 2
    assert P.load_shape("llama3-8b").params() == 8030261248  # Meta-Llama-3-8B's parameter count


@pytest.mark.parametrize("args,expect", [
    (["--budget", "1GiB"], "smaller than the weights"),
    (["--budget", "80"], "expected a size with a unit"),
    (["--budget", "lots"], "expected a size with a unit"),
    (["--budget", "80GiB", "--dtype", "fp16"], "--dtype 'fp16'"),
    (["--budget", "80GiB", "--objective", "ce", "--views", "sequential"], "--views sequential"),
    (["--budget", "80GiB", "--device", "cpu", "--offload-activations"], "CUDA only"),
])
def test_bad_inputs_one_line_exit_2(capsys, args, expect):
    rc = P.plan_main(["--model", "llama3-8b", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and expect in err and len(err.splitlines()) == 1


def test_bad_model(capsys, tmp_path):
    bad = tmp_path / "gpt2.json"
    bad.write_text(json.dumps({"n_embd": 64, "vocab_size": 100}))
    assert P.plan_main(["--model", str(bad), "--budget", "8GiB"]) == 2
    assert "not a Llama-style decoder config" in capsys.readouterr().err
    assert P.plan_main(["--model", str(tmp_path / "missing"), "--budget", "8GiB"]) == 2
    assert "no such file" in capsys.readouterr().err
