"""Long-context fine-tuning as the paper runs it: RoPE context extension of a pretrained model, LoRA,
activation checkpointing, gradient accumulation, bf16 autocast, checkpoints that cannot run code."""

import json
import os
import pickle

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from _util import read_train_log, write_corpus_texts  # noqa: E402
from lsa_kernels.train.config import ROPE_TYPES, ConfigError, TrainConfig  # noqa: E402
from lsa_kernels.train.loop import micro_batch_weights, train_main  # noqa: E402
from lsa_kernels.train.model import build_model, extend_rope, max_positions  # noqa: E402

TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--n-kv-head", "1", "--ffn", "64", "--batch-size", "2",
        "--quiet", "--warmup", "1"]


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    return write_corpus_texts(tmp_path_factory.mktemp("texts"), train_chars=12000, test_chars=12000)


@pytest.fixture(scope="module")
def base(tmp_path_factory, texts):
    """A base model trained at l_train 16 with 16 positions (so any longer context is a real extension)."""
    out = tmp_path_factory.mktemp("runs") / "base"
    assert train_main(TINY + ["--train-files", *texts["train"], "--l-train", "16", "--max-positions", "16",
                              "--alpha", "0", "--steps", "3", "--lr", "1e-2", "--out", str(out)]) == 0
    return out


def _run(out, texts, base, *extra):
    return train_main(TINY + ["--train-files", *texts["train"], "--model", str(base), "--out", str(out), *extra])


def _ckpt(out):
    return os.path.join(out, open(os.path.join(out, "latest")).read().strip())


def _logits(model, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.config.vocab_size, (1, T), generator=g)
    with torch.no_grad():
        return model.eval()(input_ids=x).logits


# ------------------------------------------------------------------------------------------------ RoPE
@pytest.mark.parametrize("kind", ROPE_TYPES)
def test_extension_written_to_config_and_rebuilt_by_from_pretrained(tmp_path, base, kind):
    from transformers import AutoModelForCausalLM

    from lsa_kernels.train.checkpoint import model_dir

    cfg = TrainConfig(model=str(base), rope_scaling=kind, rope_factor=4)
    ext = build_model(cfg, 4096, torch.device("cpu"))
    plain = build_model(TrainConfig(model=str(base)), 4096, torch.device("cpu"))
    assert max_positions(plain) == 16 and max_positions(ext) == 64
    rp = ext.config.rope_parameters
    assert rp["rope_type"] == kind and rp["factor"] == 4.0
    if kind == "linear":  # position interpolation: every frequency divided by the factor
        inv0 = plain.model.rotary_emb.inv_freq
        torch.testing.assert_close(ext.model.rotary_emb.inv_freq, inv0 / 4)
    # the extension changes the model past (dynamic: only past) the original 16 positions
    assert not torch.allclose(_logits(ext, 48), _logits(plain, 48), atol=1e-4)
    ext.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m", local_files_only=True)
    assert again.config.rope_parameters["rope_type"] == kind
    torch.testing.assert_close(_logits(again, 60), _logits(ext, 60), atol=1e-5, rtol=1e-5)
    assert model_dir(str(base)) == _ckpt(base)  # --model accepts a run's --out dir


def test_extend_rope_refusals():
    from transformers import GPT2Config, LlamaConfig

    with pytest.raises(ConfigError, match="no rotary position embeddings"):
        extend_rope(GPT2Config(), "linear", 2.0)
    c = LlamaConfig(max_position_embeddings=16)
    with pytest.raises(ConfigError, match="not supported"):
        extend_rope(c, "ntk-by-parts", 2.0)
    with pytest.raises(ConfigError, match=">= 1"):
        extend_rope(c, "linear", 0.5)
    extend_rope(c, "yarn", 2.0)
    assert c.max_position_embeddings == 32 and c.rope_parameters["original_max_position_embeddings"] == 16
    with pytest.raises(ConfigError, match="already extended"):
        extend_rope(c, "linear", 2.0)


def test_bad_inputs_one_line_exit_2_nothing_written(tmp_path, texts, base, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=4096, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(
        tmp_path / "gpt2")
    out = tmp_path / "out"
    cases = [
        (["--rope-scaling", "bogus", "--rope-factor", "2"], "--rope-scaling 'bogus' is not supported"),
        (["--rope-scaling", "linear", "--rope-factor", "0.5"], "argument --rope-factor: must be a finite number >= 1"),
        (["--rope-factor", "2"], "--rope-factor needs --rope-scaling"),
        (["--rope-scaling", "linear", "--rope-factor", "2", "--l-train", "48"], "exceeds the model's 32 positions"),
        (["--l-train", "32"], "exceeds the model's 16 positions (extend them with --rope-scaling"),
        (["--lora", "2", "--lora-targets", "nothing_here", "--l-train", "16"], "no matching module"),
        (["--lora", "2", "--lora-trainable", "embed", "--l-train", "16"], "ties its input embeddings"),
        (["--lora-trainable", "norm", "--l-train", "16"], "--lora-trainable needs --lora"),
        (["--grad-accum", "0", "--l-train", "16"], "argument --grad-accum: must be an integer >= 1"),
        (["--ce-views", "1", "--alpha", "0.1", "--l-train", "16"], "--ce-views 1 needs --alpha 0"),
    ]
    for extra, msg in cases:
        assert _run(out, texts, base, *extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, (extra, err)
        assert not out.exists(), extra
    assert train_main(TINY + ["--train-files", *texts["train"], "--model", str(tmp_path / "gpt2"), "--l-train", "16",
                              "--rope-scaling", "linear", "--rope-factor", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no rotary position embeddings" in err and len(err.splitlines()) == 1
    assert not out.exists()


# --------------------------------------------------------------------------------------- memory levers
def _one_step_grads(model, window, l_extra):
    from lsa_kernels.integrations.hf import LongShortObjective

    obj = LongShortObjective(model, divergence="sym_kl")
    out = obj(window, l_extra, 0.1)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_checkpointing_same_loss_and_gradients(base):
    from lsa_kernels.train.model import enable_grad_checkpointing

    cfg = TrainConfig(model=str(base), rope_scaling="linear", rope_factor=2)
    g = torch.Generator().manual_seed(3)
    window = torch.randint(0, 4096, (2, 32 + 8 + 1), generator=g)
    ref = build_model(cfg, 4096, torch.device("cpu")).train()
    ck = build_model(cfg, 4096, torch.device("cpu")).train()
    enable_grad_checkpointing(ck)
    assert ck.model.layers[0].gradient_checkpointing
    l0, g0 = _one_step_grads(ref, window, 8)
    l1, g1 = _one_step_grads(ck, window, 8)
    torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) > 5
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-5, msg=n)


def test_micro_batch_weights_sum_to_one_step():
    w = torch.arange(6 * 20).reshape(6, 20)
    parts = micro_batch_weights(w, l_extra=3, views=2, positions="overlap", grad_accum=3)
    assert [p[0].shape[0] for p in parts] == [2, 2, 2]
    assert sum(p[1] for p in parts) == pytest.approx(1.0) and sum(p[2] for p in parts) == pytest.approx(1.0)
    uneven = micro_batch_weights(w[:5], l_extra=3, views=1, positions="last", grad_accum=2)
    assert [p[0].shape[0] for p in uneven] == [3, 2]
    assert [p[1] for p in uneven] == pytest.approx([0.6, 0.4]) and [p[2] for p in uneven] == pytest.approx([0.6, 0.4])


@pytest.mark.parametrize("alpha", ["0", "0.1"])
def test_grad_accum_equals_a_larger_batch(tmp_path, texts, base, alpha):
    common = ["--alpha", alpha, "--l-train", "32", "--rope-scaling", "linear", "--rope-factor", "2", "--steps", "3",
              "--lr", "5e-3", "--divergence", "sym_kl"]
    assert _run(tmp_path / "big", texts, base, *common, "--batch-size", "4") == 0
    assert _run(tmp_path / "acc", texts, base, *common, "--batch-size", "2", "--grad-accum", "2") == 0
    a, b = read_train_log(tmp_path / "big"), read_train_log(tmp_path / "acc")
    for ra, rb in zip(a, b):
        assert ra["l_extra"] == rb["l_extra"]
        for k in ("loss", "ce", "misalign", "grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=2e-5, abs=1e-7), (k, ra, rb)
    ma = json.load(open(tmp_path / "big" / "metrics.json"))
    mb = json.load(open(tmp_path / "acc" / "metrics.json"))
    assert mb["param_sum"] == pytest.approx(ma["param_sum"], rel=1e-6)


def test_same_windows_for_every_arm(tmp_path, texts, base):
    """alpha = 0 on one view, alpha = 0 on both views and alpha > 0 draw the same l_extra and windows."""
    common = ["--l-train", "16", "--steps", "3", "--lr", "1e-9"]
    assert _run(tmp_path / "ce1", texts, base, *common, "--alpha", "0") == 0
    assert _run(tmp_path / "ce2", texts, base, *common, "--alpha", "0", "--ce-views", "2") == 0
    assert _run(tmp_path / "lsa", texts, base, *common, "--alpha", "0.1") == 0
    l1, l2, l3 = read_train_log(tmp_path / "ce1"), read_train_log(tmp_path / "ce2"), read_train_log(tmp_path / "lsa")
    assert [r["l_extra"] for r in l1] == [r["l_extra"] for r in l2] == [r["l_extra"] for r in l3]
    for r1, r2, r3 in zip(l1, l2, l3):
        assert r1["misalign"] == 0 == r2["misalign"] and r3["misalign"] > 0
        # CE over both views is the alpha > 0 run's CE term (the same tokens; the lr is ~0 so the weights agree)
        assert r2["ce"] == pytest.approx(r3["ce"], rel=1e-5)
        assert r2["ce"] != pytest.approx(r1["ce"], rel=1e-6)


def test_bf16_autocast_runs_close_to_fp32(tmp_path, texts, base):
    common = ["--l-train", "16", "--steps", "2", "--lr", "1e-9", "--alpha", "0.1"]
    assert _run(tmp_path / "f32", texts, base, *common, "--dtype", "fp32") == 0
    assert _run(tmp_path / "b16", texts, base, *common, "--dtype", "bf16") == 0
    for ra, rb in zip(read_train_log(tmp_path / "f32"), read_train_log(tmp_path / "b16")):
        assert rb["ce"] != ra["ce"]  # it did run in bf16
        assert rb["ce"] == pytest.approx(ra["ce"], rel=2e-2)
        assert rb["misalign"] == pytest.approx(ra["misalign"], rel=5e-2, abs=5e-3)


# ------------------------------------------------------------------------------------------------ LoRA
def test_lora_frozen_base_adapter_merged_checkpoint_and_resume(tmp_path, texts, base):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    common = ["--l-train", "32", "--rope-scaling", "linear", "--rope-factor", "2", "--lora", "4", "--alpha", "0.1",
              "--lora-trainable", "norm", "--steps", "4", "--lr", "2e-2", "--grad-checkpointing", "--ckpt-every", "100"]
    assert _run(tmp_path / "full", texts, base, *common) == 0
    ck = _ckpt(tmp_path / "full")
    assert os.path.isfile(os.path.join(ck, "adapter", "adapter_model.safetensors"))
    ad = load_file(os.path.join(ck, "adapter", "adapter_model.safetensors"))
    assert any("lora_A" in k for k in ad) and any("norm" in k for k in ad)
    assert not any("lm_head" in k or "embed_tokens" in k for k in ad)  # the head (tied embedding) stays frozen
    # the merged model loads alone, carries the scaling, and differs from the base where LoRA/norms trained
    merged = AutoModelForCausalLM.from_pretrained(ck, local_files_only=True)
    assert merged.config.rope_parameters["rope_type"] == "linear" and merged.config.max_position_embeddings == 32
    basem = AutoModelForCausalLM.from_pretrained(_ckpt(base), local_files_only=True)
    sb, sm = basem.state_dict(), merged.state_dict()
    torch.testing.assert_close(sm["lm_head.weight"], sb["lm_head.weight"], atol=0, rtol=0)
    assert not torch.equal(sm["model.layers.0.self_attn.q_proj.weight"], sb["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(sm["model.layers.0.mlp.up_proj.weight"], sb["model.layers.0.mlp.up_proj.weight"])  # not a target
    assert not torch.equal(sm["model.norm.weight"], sb["model.norm.weight"])
    # the merged model computes what the trained base + adapter computes
    from lsa_kernels.train.model import apply_lora

    cfg = TrainConfig(model=str(base), rope_scaling="linear", rope_factor=2, lora=4, lora_trainable="norm")
    pm = apply_lora(cfg, build_model(cfg, 4096, torch.device("cpu")), os.path.join(ck, "adapter"))
    torch.testing.assert_close(_logits(pm.get_base_model(), 30), _logits(merged, 30), atol=1e-4, rtol=1e-4)
    # stop after 2 steps and resume: the same run
    assert _run(tmp_path / "part", texts, base, *common, "--stop-after", "2") == 0
    assert _run(tmp_path / "part", texts, base, *common, "--resume") == 0
    a, b = read_train_log(tmp_path / "full"), read_train_log(tmp_path / "part")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6)
    ma = json.load(open(tmp_path / "full" / "metrics.json"))
    mb = json.load(open(tmp_path / "part" / "metrics.json"))
    assert mb["param_sum"] == pytest.approx(ma["param_sum"], rel=1e-9)


def test_lora_head_gets_no_gradient(base):
    from lsa_kernels.integrations.hf import output_head
    from lsa_kernels.train.model import apply_lora

    cfg = TrainConfig(model=str(base), lora=2)
    pm = apply_lora(cfg, build_model(cfg, 4096, torch.device("cpu")))
    m = pm.get_base_model().train()
    head = output_head(m).weight
    assert not head.requires_grad
    _, grads = _one_step_grads(m, torch.randint(0, 4096, (2, 16 + 4 + 1)), 4)
    assert grads and all("lora_" in n for n in grads)
    assert head.grad is None


def test_resume_lora_without_adapter_refused(tmp_path, texts, base, capsys):
    out = tmp_path / "plain"
    assert _run(out, texts, base, "--l-train", "16", "--steps", "1") == 0
    assert _run(out, texts, base, "--l-train", "16", "--steps", "2", "--lora", "2", "--resume") == 2
    err = capsys.readouterr().err
    assert "holds no LoRA adapter" in err


# --------------------------------------------------------------------------------------- checkpoints
class _Evil:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ["LSA_EVIL_MARKER"],))


def test_malicious_checkpoint_refused(tmp_path, texts, base, capsys, monkeypatch):
    out = tmp_path / "run"
    assert _run(out, texts, base, "--l-train", "16", "--steps", "1") == 0
    marker = tmp_path / "pwned"
    monkeypatch.setenv("LSA_EVIL_MARKER", str(marker))
    ck = _ckpt(out)
    for name in ("trainer.pt", "optimizer.pt"):
        good = open(os.path.join(ck, name), "rb").read()
        with open(os.path.join(ck, name), "wb") as f:
            pickle.dump({"step": 1, "payload": _Evil()}, f)
        assert _run(out, texts, base, "--l-train", "16", "--steps", "2", "--resume", "--override-on-resume", "steps") == 2
        err = capsys.readouterr().err
        assert "refusing to load" in err and name in err, err
        assert not marker.exists()  # the payload never ran
        with open(os.path.join(ck, name), "wb") as f:
            f.write(good)
    assert _run(out, texts, base, "--l-train", "16", "--steps", "2", "--resume", "--override-on-resume", "steps") == 0
