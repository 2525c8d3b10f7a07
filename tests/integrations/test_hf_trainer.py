"""transformers.Trainer and TRL's SFTTrainer on a patched model give the unpatched run's losses and weights
(fp32, 1e-5; gradient accumulation 2; full fine-tuning and LoRA) with the fused kernels doing the work;
LongShortTrainer, its collator and the runnable example."""

from __future__ import annotations

import importlib.util
import json
import os
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import (  # noqa: E402
    DataCollatorForLanguageModeling,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

from lsa_kernels.integrations import hf  # noqa: E402
from lsa_kernels.integrations import patch as P  # noqa: E402
from _util import CountFusedCE  # noqa: E402
from lsa_kernels.integrations.trainer import LongShortCollator, LongShortTrainer, window_dataset  # noqa: E402
from lsa_kernels.train import data as D  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOL = 1e-5


@pytest.fixture(scope="module")
def tok():
    return PreTrainedTokenizerFast(tokenizer_file=D.DEFAULT_TOKENIZER, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def lines():
    import lzma

    with lzma.open(D.DEFAULT_CORPUS, "rt", encoding="utf-8") as f:
        text = json.loads(f.readline())["text"][:20000]
    return [ln for ln in text.split("\n") if len(ln) > 20][:32]


def tiny(tok, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=False,
    ))


def lora_config():
    peft = pytest.importorskip("peft")
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


# fp32 and SGD: Adam's normalisation turns float-rounding differences of near-zero gradients into lr-sized
# steps, so weights are compared after plain SGD steps (large lr: the weights do move)
COMMON = dict(max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=0.5,
              optim="sgd", logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
              disable_tqdm=True, bf16=False, fp16=False)


def trained(trainer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    hist = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return hist, weights


def assert_same_run(a, b, keys=("loss", "grad_norm")):
    (h0, w0), (h1, w1) = a, b
    assert len(h0) == len(h1) == COMMON["max_steps"]
    for s0, s1 in zip(h0, h1):
        for k in keys:
            assert abs(s0[k] - s1[k]) <= TOL * (1 + abs(s0[k])), (k, s0, s1)
    assert set(w0) == set(w1)
    for n in w0:
        torch.testing.assert_close(w1[n], w0[n], rtol=TOL, atol=TOL, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_trainer_patched_equals_unpatched(tok, lines, tmp_path, lora):
    Dataset = pytest.importorskip("datasets").Dataset
    if lora:
        pytest.importorskip("peft")

    feats = Dataset.from_list([{"input_ids": tok(ln)["input_ids"]} for ln in lines])

    def run(patched):
        m = tiny(tok)
        w_init = {n: p.detach().clone() for n, p in m.named_parameters()}
        if lora:
            from peft import get_peft_model

            m = get_peft_model(m, lora_config())
        if patched:
            hf.patch(m)
        args = TrainingArguments(output_dir=str(tmp_path / f"p{int(patched)}"), **COMMON)
        tr = Trainer(model=m, args=args, train_dataset=feats,
                     data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
        with CountFusedCE() as spy:
            out = trained(tr)
        return out, spy.calls, w_init

    (ref, calls0, w_init), (got, calls1, _) = run(False), run(True)
    assert calls0 == 0 and calls1 == COMMON["max_steps"] * COMMON["gradient_accumulation_steps"]
    assert_same_run(ref, got)
    if not lora:  # the weights did move
        assert max((ref[1][n] - w_init[n]).abs().max().item() for n in ref[1]) > 1e-3


@pytest.mark.parametrize("order", ["after", "before"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_trainer_patched_equals_unpatched(tok, lines, tmp_path, lora, order):
    """Patched after SFTTrainer(...) (on top of the LM head TRL installs) or before it (TRL's head then wraps
    the patched forward, and its calls are routed into it): the fused kernels do every step's loss."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_list([{"text": ln} for ln in lines])

    def run(patched):
        args = SFTConfig(output_dir=str(tmp_path / f"p{int(patched)}"), max_length=64, **COMMON)
        m = tiny(tok)
        if patched and order == "before":
            hf.patch(m)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tr = SFTTrainer(model=m, args=args, train_dataset=data, processing_class=tok,
                            peft_config=lora_config() if lora else None)
        if patched and order == "after":
            assert hf.patch(tr) is tr
        with CountFusedCE() as spy:
            out = trained(tr)
        return out, spy.calls

    (ref, calls0), (got, calls1) = run(False), run(True)
    assert calls0 == 0 and calls1 == COMMON["max_steps"] * COMMON["gradient_accumulation_steps"]
    # TRL's metrics from logits come from the fused pass: same entropy and token accuracy
    assert_same_run(ref, got, keys=("loss", "grad_norm", "entropy", "mean_token_accuracy"))


def test_long_short_collator_and_window_dataset():
    ds = window_dataset([torch.arange(100), list(range(5)), torch.arange(30)], 25)
    assert len(ds) == 4 + 1 and all(d["input_ids"].numel() == 25 for d in ds)
    assert window_dataset([torch.arange(10)], 4, stride=3)[1]["input_ids"].tolist() == [3, 4, 5, 6]
    c = LongShortCollator(16, seed=3, steps_per_draw=2)
    assert c.max_length == 16 + 8 + 1
    batches = [c([torch.arange(40), torch.arange(100, 140)]) for _ in range(6)]
    ls = [b["l_extra"] for b in batches]
    assert ls[0::2] == ls[1::2] and all(1 <= v <= 8 for v in ls)
    for b in batches:
        x = b["input_ids"]
        assert x.shape == (2, 16 + b["l_extra"] + 1)
        assert torch.equal(x[0], torch.arange(int(x[0, 0]), int(x[0, 0]) + x.shape[1]))  # contiguous slices
    with pytest.raises(ValueError, match="example 0 has 10 tokens"):
        LongShortCollator(16)([torch.arange(10)])
    with pytest.raises(ValueError, match="l_train"):
        LongShortCollator(1)
    with pytest.raises(ValueError, match="divergence"):
        LongShortTrainer(model=None, args=None, l_train=8, divergence="l2")
    with pytest.raises(ValueError, match="l_train"):
        LongShortTrainer(model=None, args=None)


@pytest.mark.parametrize("alpha", [0.3, 0.0])
def test_long_short_trainer_loss_is_long_short_step(tok, tmp_path, alpha):
    """Step 1's logged loss/ce/misalign are the long-short loss of step 1's windows on the initial weights."""
    l_train = 16
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, len(tok), (200,), generator=g) for _ in range(3)]
    collator = LongShortCollator(l_train, seed=5)
    ds = window_dataset(docs, collator.max_length)
    init = tiny(tok)
    m = tiny(tok)
    args = TrainingArguments(output_dir=str(tmp_path), **{**COMMON, "gradient_accumulation_steps": 1,
                                                          "max_steps": 2, "learning_rate": 0.1})
    tr = LongShortTrainer(model=m, args=args, train_dataset=ds, data_collator=collator, alpha=alpha,
                          divergence="sym_kl", positions="overlap")
    first = []
    orig = tr.compute_loss

    def keep_first(model, inputs, *a, **k):
        if not first:
            first.append({"input_ids": inputs["input_ids"].clone(), "l_extra": inputs["l_extra"]})
        return orig(model, inputs, *a, **k)

    tr.compute_loss = keep_first
    hist, _ = trained(tr)
    assert len(hist) == 2 and all({"ce", "misalign"} <= set(h) for h in hist)
    win, l_extra = first[0]["input_ids"], first[0]["l_extra"]
    assert win.shape == (4, l_train + l_extra + 1)
    init.train()
    with torch.no_grad():
        if alpha:
            want = hf.long_short_step(init, win, l_extra, alpha=alpha, divergence="sym_kl")
            assert hist[0]["misalign"] > 0
        else:
            ce = hf.causal_lm_loss(init, win[:, : l_train + 1], win[:, : l_train + 1])
            want = (ce, ce, torch.zeros(()))
    for i, k in enumerate(("loss", "ce", "misalign")):
        assert abs(hist[0][k] - float(want[i])) <= 1e-5 * (1 + abs(hist[0][k])), (k, hist[0], want)


def test_long_short_trainer_with_lora_and_eval(tok, tmp_path):
    pytest.importorskip("peft")
    from peft import get_peft_model

    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, len(tok), (120,), generator=g) for _ in range(2)]
    m = get_peft_model(tiny(tok), lora_config())
    args = TrainingArguments(output_dir=str(tmp_path), **{**COMMON, "max_steps": 2, "optim": "adamw_torch",
                                                          "learning_rate": 1e-2})
    ds = window_dataset(docs, 16 + 8 + 1)
    tr = LongShortTrainer(model=m, args=args, train_dataset=ds, eval_dataset=ds[:4], l_train=16, alpha=0.1,
                          detach="long", positions="last")
    assert tr.data_collator.steps_per_draw == 2  # l_extra per optimiser step
    b0 = {n: p.detach().clone() for n, p in m.named_parameters() if "lora_B" in n}
    hist, w = trained(tr)
    assert all(h["loss"] == pytest.approx(h["ce"] + 0.1 * h["misalign"], rel=1e-4) for h in hist)
    assert any((w[n] - b0[n]).abs().max() > 0 for n in b0)  # the adapter trained
    metrics = tr.evaluate()
    assert {"eval_loss", "eval_ce", "eval_misalign"} <= set(metrics)


def test_example_runs(tmp_path):
    path = os.path.join(ROOT, "examples", "long_short_trainer.py")
    spec = importlib.util.spec_from_file_location("lst_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert mod.main(["--max-steps", "2", "--l-train", "16", "--batch-size", "2", "--out", str(out)]) == 0
    hist = json.loads((out / "log_history.json").read_text())
    steps = [h for h in hist if "ce" in h]
    assert len(steps) == 2 and all(h["misalign"] > 0 for h in steps)
    assert (out / "losses.png").stat().st_size > 0
