"""Long-short alignment inside ``transformers.Trainer``: :class:`LongShortTrainer` + :class:`LongShortCollator`.

Each optimisation step draws ``l_extra ~ U{1 .. l_train // 2}``; the collator cuts windows of
``l_train + l_extra + 1`` tokens from the examples (token blocks of at least ``l_train + l_train // 2 + 1``
tokens, e.g. from :func:`window_dataset`), and the trainer's loss is the long-short loss of docs/maths.md §4 on them::

    long  = window[:, :l_train + 1]        short = window[:, l_extra:]
    loss  = ce(long and short views) + alpha * misalign(h_long[:, l_extra + i] <-> h_short[:, i])

computed by the fused kernels through the patched model (:func:`lsa_kernels.integrations.patch.patch`), so
the call goes through ``model(...)``: DDP/FSDP/accelerate wrappers and PEFT adapters see one forward. ``ce``
and ``misalign`` are logged next to ``loss`` (``eval_ce``/``eval_misalign`` in evaluation). ``alpha=0`` is
the CE baseline on the long view of the same windows.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence

import torch
from transformers import Trainer, TrainingArguments

from ..options import DIVERGENCES, POSITIONS
from ..pairing import sample_l_extra
from .patch import patch

__all__ = ["LongShortCollator", "LongShortTrainer", "window_dataset"]


_OFFSET_SEED = 0x9E3779B97F4A7C15  # the offsets' generator: seeded apart from the l_extra one


def _check_l_train(l_train) -> int:
    if isinstance(l_train, bool) or not isinstance(l_train, int) or l_train < 2:
        raise ValueError(f"l_train: expected an int >= 2, got {l_train!r}")
    return l_train


class LongShortCollator:
    """Batches of windows ``[B, l_train + l_extra + 1]`` for :class:`LongShortTrainer`.

    ``l_extra ~ U{1 .. l_train // 2}`` is drawn from a generator seeded with ``seed``, once every
    ``steps_per_draw`` calls (the trainer sets it to ``gradient_accumulation_steps``, so that all micro-batches
    of an optimiser step share it, and every rank draws the same sequence). Each example (``{"input_ids": ids}``
    or ids, at least :attr:`max_length` tokens) gives one window at a random offset (``random_offset=False``:
    its start), drawn from a second generator (:attr:`offset_generator`) so that the ``l_extra`` sequence does
    not depend on the examples: ranks whose examples differ in length still draw the same ``l_extra`` at every
    step. Returns ``{"input_ids": LongTensor, "l_extra": int}``. The draw counters are not checkpointed: a
    resumed run draws the sequence again from the start.
    """

    def __init__(self, l_train: int, *, seed: int = 0, steps_per_draw: int = 1, random_offset: bool = True):
        self.l_train = _check_l_train(l_train)
        if isinstance(steps_per_draw, bool) or not isinstance(steps_per_draw, int) or steps_per_draw < 1:
            raise ValueError(f"steps_per_draw: expected an int >= 1, got {steps_per_draw!r}")
        self.seed, self.steps_per_draw, self.random_offset = int(seed), steps_per_draw, bool(random_offset)
        self.generator = torch.Generator().manual_seed(self.seed)  # l_extra only: the same on every rank
        self.offset_generator = torch.Generator().manual_seed((self.seed + _OFFSET_SEED) % 2**64)  # this rank's
        self.calls = 0
        self._l_extra: Optional[int] = None

    @property
    def max_length(self) -> int:
        """Tokens an example needs: the longest window, ``l_train + l_train // 2 + 1``."""
        return self.l_train + self.l_train // 2 + 1

    def next_l_extra(self) -> int:
        if self._l_extra is None or self.calls % self.steps_per_draw == 0:
            self._l_extra = sample_l_extra(self.l_train, self.generator)
        self.calls += 1
        return self._l_extra

    def __call__(self, features: Sequence[Any]) -> Dict[str, Any]:
        if len(features) == 0:
            raise ValueError("LongShortCollator: empty batch")
        l_extra = self.next_l_extra()
        L = self.l_train + l_extra + 1
        rows = []
        for i, f in enumerate(features):
            ids = f["input_ids"] if isinstance(f, dict) else f
            ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
            if ids.numel() < L:
                raise ValueError(
                    f"LongShortCollator: example {i} has {ids.numel()} tokens, a window needs {L} (l_train "
                    f"{self.l_train} + l_extra {l_extra} + 1; examples need max_length = {self.max_length})"
                )
            start = 0
            if self.random_offset and ids.numel() > L:
                start = int(torch.randint(0, ids.numel() - L + 1, (1,), generator=self.offset_generator).item())
            rows.append(ids[start : start + L])
        return {"input_ids": torch.stack(rows), "l_extra": l_extra}


def window_dataset(docs: Sequence[Any], length: int, stride: Optional[int] = None) -> List[Dict[str, torch.Tensor]]:
    """Blocks of ``length`` tokens cut from each token document (1-D tensors or lists), every ``stride``
    tokens (default ``length``: non-overlapping); documents shorter than ``length`` give none. A list of
    ``{"input_ids": tensor}`` that ``Trainer`` takes as ``train_dataset``."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ValueError(f"length: expected an int >= 2, got {length!r}")
    stride = length if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride: expected an int >= 1, got {stride!r}")
    out = []
    for d in docs:
        d = torch.as_tensor(d, dtype=torch.long).reshape(-1)
        for s in range(0, d.numel() - length + 1, stride):
            out.append({"input_ids": d[s : s + length].clone()})
    return out


def _sequential_args(args: Optional[TrainingArguments]) -> TrainingArguments:
    """A copy of ``args`` (``Trainer``'s default when None) with a static DDP graph and a gradient sync at
    every micro-batch, as sequential views need under DDP; ``False`` set by the user for either is refused."""
    if args is None:
        args = TrainingArguments(output_dir="tmp_trainer")
    if args.ddp_static_graph is False:
        raise ValueError("ddp_static_graph: views='sequential' needs True (or None, which the trainer sets to "
                         "True), got False")
    acc = args.accelerator_config
    ga_kwargs = dict(acc.gradient_accumulation_kwargs or {})
    if ga_kwargs.get("sync_each_batch") is False:
        raise ValueError("accelerator_config.gradient_accumulation_kwargs['sync_each_batch']: views='sequential' "
                         "needs True (or unset, which the trainer sets to True), got False")
    args = copy.copy(args)
    args.ddp_static_graph = True
    args.accelerator_config = dataclasses.replace(acc, gradient_accumulation_kwargs={**ga_kwargs,
                                                                                      "sync_each_batch": True})
    return args


def _synced(model=None):
    return contextlib.nullcontext()


class LongShortTrainer(Trainer):
    """``transformers.Trainer`` whose loss is the fused long-short alignment loss.

    Extra keyword arguments: ``l_train`` (needed unless a ``data_collator`` is given: a
    :class:`LongShortCollator` is built with ``seed=args.seed`` and ``steps_per_draw=gradient_accumulation_steps``),
    ``alpha`` (weight of the misalignment, 0 = CE baseline), ``divergence`` (``sce``, ``sym_kl``, ``kl``,
    ``kl_reverse``, ``js``), ``temperature``, ``detach`` (None, ``"long"``, ``"short"``), ``positions``
    (``"overlap"`` or ``"last"``), ``backend`` / ``chunk_bytes`` (of the fused ops), ``views`` (``"joint"``: both
    views in one batched forward; ``"sequential"``: each view's forward recomputed in the backward, one at a
    time, :mod:`lsa_kernels.integrations.memory`). With ``views="sequential"`` every parameter gets its
    gradient once per view, which DDP allows only with a static graph, and DDP's ``no_sync()`` under a static
    graph fails an internal assert (pytorch/pytorch#143580); so the trainer works on a copy of ``args`` with
    ``ddp_static_graph=True`` and ``accelerator_config.gradient_accumulation_kwargs["sync_each_batch"] = True``:
    every micro-batch of a gradient accumulation syncs its gradients (one all-reduce per micro-batch instead of
    one per step; the accumulated gradient is the same). Setting either of them to ``False`` is a
    ``ValueError``. The model is patched (:func:`lsa_kernels.integrations.patch.patch`) when the trainer is
    built. Every other argument is ``Trainer``'s. Gradient accumulation averages the micro-batch losses
    (Trainer divides by the steps).
    """

    def __init__(
        self,
        model=None,
        args=None,
        *,
        l_train: Optional[int] = None,
        alpha: float = 0.1,
        divergence: str = "sce",
        temperature: float = 1.0,
        detach: Optional[str] = None,
        positions: str = "overlap",
        backend: str = "auto",
        chunk_bytes: Optional[int] = None,
        views: str = "joint",
        **kwargs,
    ):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
            raise ValueError(f"alpha: expected a float >= 0, got {alpha!r}")
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence: expected one of {DIVERGENCES}, got {divergence!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature: expected a float > 0, got {temperature!r}")
        if detach not in (None, "long", "short"):
            raise ValueError(f"detach: expected None, 'long' or 'short', got {detach!r}")
        if positions not in POSITIONS:
            raise ValueError(f"positions: expected one of {POSITIONS}, got {positions!r}")
        if views not in ("joint", "sequential"):
            raise ValueError(f"views: expected 'joint' or 'sequential', got {views!r}")
        self._sync_each_micro_batch = views == "sequential"  # read by create_accelerator_and_postprocess
        if views == "sequential":
            args = _sequential_args(args)
        if kwargs.get("data_collator") is None:
            if l_train is None:
                raise ValueError("l_train: required when no data_collator is given (LongShortCollator(l_train))")
            seed = getattr(args, "seed", 42) if args is not None else 42
            ga = getattr(args, "gradient_accumulation_steps", 1) if args is not None else 1
            kwargs["data_collator"] = LongShortCollator(l_train, seed=seed, steps_per_draw=ga)
        super().__init__(model=model, args=args, **kwargs)
        self.long_short = {"alpha": float(alpha), "divergence": divergence, "temperature": float(temperature),
                           "detach": detach, "positions": positions, "views": views}
        patch(self.model, backend=backend, chunk_bytes=chunk_bytes)
        if views == "sequential":
            from .memory import check_sequential

            check_sequential(self.model)
        self.loss_is_scaled_for_ga = False  # per-micro-batch means: Trainer divides by the accumulation steps
        self._ls_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self._sync_each_micro_batch:  # Trainer loops that ignore sync_each_batch call no_sync() regardless
            self.accelerator.no_sync = _synced

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "l_extra" not in inputs:
            raise ValueError("LongShortTrainer: the batch has no 'l_extra'; use LongShortCollator (or one like it)")
        spec = dict(self.long_short, l_extra=int(inputs["l_extra"]))
        out = model(input_ids=inputs["input_ids"], lsa_long_short=spec)
        mode = "train" if model.training else "eval"
        self._ls_metrics[mode]["ce"].append(out.ce.detach().float())
        self._ls_metrics[mode]["misalign"].append(out.misalign.detach().float())
        return (out.loss, out) if return_outputs else out.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs).detach()
        return loss, None, None

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for k, vals in self._ls_metrics[mode].items():
            if vals:  # mean over the logging window, then over processes (log() runs on every rank)
                local = torch.stack(vals).mean().reshape(1)
                logs[prefix + k] = self.accelerator.gather(local).mean().item()
        self._ls_metrics[mode].clear()
        return super().log(logs, start_time)
