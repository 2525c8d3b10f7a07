"""Long-short alignment with ``transformers.Trainer`` on the shipped Shakespeare corpus.

    python examples/long_short_trainer.py --max-steps 5                 # CPU, a small Llama from a config
    python examples/long_short_trainer.py --model path/to/llama --l-train 1024 --bf16 --lora
    accelerate launch --num_processes 2 examples/long_short_trainer.py --max-steps 100   # or torchrun

The training windows come from the train split (tokenised with the shipped BPE tokenizer, or with the
model directory's tokenizer when ``--model`` has one): blocks of ``l_train + l_train // 2 + 1`` tokens, from
which :class:`~lsa_kernels.integrations.trainer.LongShortCollator` cuts ``l_train + l_extra + 1`` tokens
with a fresh ``l_extra`` every step. The trainer logs ``loss``, ``ce`` and ``misalign``; the log history is
written to ``OUT/log_history.json`` and a plot of the three curves to ``OUT/losses.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="",
                   help="a transformers causal LM directory (default: a small Llama from a config)")
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--l-train", type=int, default=64, help="tokens of the long view (l_extra ~ U{1..l_train/2})")
    p.add_argument("--batch-size", type=int, default=4, help="windows per device and micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--divergence", default="sce", choices=["sce", "sym_kl", "kl", "kl_reverse", "js"])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--detach", default=None, choices=["long", "short"])
    p.add_argument("--positions", default="overlap", choices=["overlap", "last"])
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter (peft) instead of all weights")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="output directory (default: a temporary one)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.max_steps < 1 or a.l_train < 2 or a.batch_size < 1 or a.grad_accum < 1:
        print("error: --max-steps, --batch-size, --grad-accum must be >= 1 and --l-train >= 2", file=sys.stderr)
        return 2

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from lsa_kernels.integrations import hf
    from lsa_kernels.integrations.trainer import LongShortCollator, LongShortTrainer, window_dataset
    from lsa_kernels.train import data as D

    torch.manual_seed(a.seed)
    if a.model:
        tok_path = a.model if os.path.exists(os.path.join(a.model, "tokenizer_config.json")) else None
        tok = D.load_tokenizer(tok_path)
        model = hf.load_causal_lm(a.model)
        if model.config.vocab_size < tok.vocab_size:
            print(f"error: --model has a vocabulary of {model.config.vocab_size} tokens, the tokenizer "
                  f"{tok.path} has {tok.vocab_size} (put the model's tokenizer in its directory)", file=sys.stderr)
            return 2
    else:
        tok = D.load_tokenizer()
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4 * a.l_train,
            tie_word_embeddings=True,
        ))
    if a.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))

    collator = LongShortCollator(a.l_train, seed=a.seed, steps_per_draw=a.grad_accum)
    corpus = D.load_corpus(tok, "train")
    dataset = window_dataset(corpus.docs, collator.max_length)
    out = a.out or tempfile.mkdtemp(prefix="lsa-trainer-")
    args = TrainingArguments(
        output_dir=out, max_steps=a.max_steps, per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=a.grad_accum, learning_rate=a.lr, logging_steps=1, save_strategy="no",
        report_to="none", seed=a.seed, bf16=a.bf16, use_cpu=not torch.cuda.is_available(),
        **({"gradient_checkpointing": True} if a.grad_checkpointing else {}),
    )
    trainer = LongShortTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator, alpha=a.alpha,
        divergence=a.divergence, temperature=a.temperature, detach=a.detach, positions=a.positions,
    )
    trainer.train()

    hist = [h for h in trainer.state.log_history if "ce" in h]
    if trainer.is_world_process_zero():
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "log_history.json"), "w") as f:
            json.dump(trainer.state.log_history, f, indent=1)
        for h in hist:
            print(f"step {h['step']:4d}  loss {h['loss']:.4f}  ce {h['ce']:.4f}  misalign {h['misalign']:.4f}")
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6, 3.5))
            for k in ("loss", "ce", "misalign"):
                ax.plot([h["step"] for h in hist], [h[k] for h in hist], label=k)
            ax.set_xlabel("step")
            ax.set_title(f"LongShortTrainer: alpha={a.alpha}, {a.divergence}, l_train={a.l_train}")
            ax.legend()
            fig.tight_layout()
            fig.savefig(os.path.join(out, "losses.png"), dpi=100)
            plt.close(fig)
        except ImportError:
            pass
        print(f"wrote {os.path.join(out, 'log_history.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
