"""LongShortTrainer(views="sequential") under DDP with gradient accumulation: 2 CPU gloo processes (torchrun),
2 micro-batches per step, 2 SGD steps. The weights after each run equal those of SGD steps taken, in one process,
on the gradient of the joint-view loss averaged over every micro-batch both ranks saw (fp64, 1e-10 of the
update; measured ~1e-14. In fp32 the two SGD steps leave up to 3e-5 of rounding in a tensor's update).
Two runs: the user leaves ``ddp_static_graph`` unset, and the user sets it but the Trainer loop ignores
``sync_each_batch`` (older transformers: no_sync() on every non-final micro-batch)."""

import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from lsa_kernels.integrations import hf  # noqa: E402
from lsa_kernels.integrations.trainer import LongShortCollator, LongShortTrainer, window_dataset  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
V, L_TRAIN, WORLD, GA, STEPS, LR = 257, 16, 2, 2, 2, 0.5
LOSS = dict(alpha=0.3, divergence="sce", backend="reference")
ARGS = dict(max_steps=STEPS, per_device_train_batch_size=2, gradient_accumulation_steps=GA, learning_rate=LR,
            optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, logging_steps=1,
            save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)


def model():
    torch.manual_seed(0)
    c = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 tie_word_embeddings=False)
    m = hf.load_causal_lm(c, dtype=torch.float64)
    with torch.no_grad():  # larger logits, so that the divergence term matters
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.train()


def dataset():
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, V, (L_TRAIN * 12,), generator=g) for _ in range(2)]
    return window_dataset(docs, LongShortCollator(L_TRAIN).max_length, stride=L_TRAIN)


DDP_SCRIPT = r"""
import os, sys, warnings
import torch, torch.distributed as dist
sys.path.insert(0, os.environ["TESTS"])
import test_trainer_ddp_sequential as t
from transformers import TrainingArguments
from lsa_kernels.integrations.trainer import LongShortTrainer

warnings.simplefilter("ignore")
torch.set_num_threads(1)


class Recording(LongShortTrainer):  # keeps every training micro-batch this rank computed
    seen = None

    def compute_loss(self, model, inputs, *a, **k):
        if model.training:
            self.seen.append((inputs["input_ids"].clone(), int(inputs["l_extra"])))
        return super().compute_loss(model, inputs, *a, **k)


out = {}
for run, static in (("unset", None), ("old_loop", True)):
    m = t.model()
    args = TrainingArguments(output_dir=os.path.join(os.environ["OUT"], run), ddp_static_graph=static, **t.ARGS)
    tr = Recording(model=m, args=args, train_dataset=t.dataset(), l_train=t.L_TRAIN, views="sequential", **t.LOSS)
    tr.seen = []
    if run == "old_loop":  # a Trainer loop that ignores sync_each_batch calls accelerator.no_sync() regardless
        tr.accelerator.gradient_state.plugin_kwargs["sync_each_batch"] = False
    tr.train()
    assert dist.get_world_size() == t.WORLD and tr.args.ddp_static_graph is True
    out[run] = {"seen": tr.seen, "weights": {n: p.detach().clone() for n, p in m.named_parameters()}}
torch.save(out, os.path.join(os.environ["OUT"], f"rank{dist.get_rank()}.pt"))
dist.barrier()  # neither rank tears gloo down while the other still uses it (an abort at exit otherwise)
dist.destroy_process_group()
"""


def reference_weights(seen_by_rank):
    """SGD steps, in one process, on the joint-view gradient averaged over each step's micro-batches of every
    rank (Trainer: mean over the accumulation; DDP: mean over the ranks)."""
    m = model()
    for s in range(STEPS):
        m.zero_grad(set_to_none=True)
        for seen in seen_by_rank:
            for window, l_extra in seen[s * GA : (s + 1) * GA]:
                loss = hf.long_short_step(m, window, l_extra, views="joint", **LOSS).loss
                (loss / (GA * len(seen_by_rank))).backward()
        with torch.no_grad():
            for p in m.parameters():
                p.sub_(LR * p.grad)
    return {n: p.detach() for n, p in m.named_parameters()}


def test_ddp_gradient_accumulation_equals_one_process_joint(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, OUT=str(tmp_path), TESTS=os.path.dirname(os.path.abspath(__file__)),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                        str(WORLD), str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    w0 = dict(model().named_parameters())
    for run in ("unset", "old_loop"):
        seen = [r[run]["seen"] for r in ranks]
        assert [len(s) for s in seen] == [STEPS * GA] * WORLD
        assert not torch.equal(seen[0][0][0], seen[1][0][0])  # the ranks trained on different windows
        want = reference_weights(seen)
        for r in ranks:  # the replicas agree, and their update is the reference's
            got = r[run]["weights"]
            assert got.keys() == want.keys()
            for n in want:
                upd, ref = got[n] - w0[n], want[n] - w0[n]
                assert ref.abs().max() > 0, n
                err = ((upd - ref).abs().max() / ref.abs().max()).item()
                assert err <= 1e-10, (run, n, err)


def test_sequential_views_set_static_graph_and_sync_each_batch(tmp_path):
    from transformers import TrainingArguments

    ds = dataset()
    args = TrainingArguments(output_dir=str(tmp_path), **ARGS)
    tr = LongShortTrainer(model=model(), args=args, train_dataset=ds, l_train=L_TRAIN, views="sequential", **LOSS)
    assert tr.args.ddp_static_graph is True
    assert tr.args.accelerator_config.gradient_accumulation_kwargs["sync_each_batch"] is True
    assert tr.accelerator.gradient_state.plugin_kwargs["sync_each_batch"] is True
    assert args.ddp_static_graph is None and args.accelerator_config.gradient_accumulation_kwargs is None  # a copy
    joint = LongShortTrainer(model=model(), args=args, train_dataset=ds, l_train=L_TRAIN, **LOSS)
    assert joint.args is args and joint.accelerator.gradient_state.plugin_kwargs.get("sync_each_batch") is not True
    with pytest.raises(ValueError, match="ddp_static_graph"):
        LongShortTrainer(model=model(), args=TrainingArguments(output_dir=str(tmp_path), ddp_static_graph=False,
                                                                **ARGS), l_train=L_TRAIN, views="sequential")
    no_sync = TrainingArguments(output_dir=str(tmp_path), **ARGS,
                                accelerator_config={"gradient_accumulation_kwargs": {"sync_each_batch": False}})
    with pytest.raises(ValueError, match="sync_each_batch"):
        LongShortTrainer(model=model(), args=no_sync, l_train=L_TRAIN, views="sequential")
