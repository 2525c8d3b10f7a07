"""Any transformers causal LM -> final hidden states + output head -> the fused losses. No patches.

The model's own ``forward`` would build ``[B, T, V]`` logits; we never call it on training data.
Instead:

    decoder = model.get_decoder()            # LlamaModel, GPT2Model, Gemma2Model, ... (transformers' own lookup)
    h       = decoder(input_ids, attention_mask).last_hidden_state      # already through the final norm
    head    = model.get_output_embeddings()  # nn.Linear [V, H] (+ bias)
    loss    = linear_cross_entropy(h * scale, head.weight, labels, linear_bias=b * scale, softcap=c)

``scale`` covers the logit scalings some models apply after the head (Cohere's ``logit_scale``
multiplies, Granite/MiniCPM3's ``logits_scaling`` divides), ``c`` is Gemma-2's
``final_logit_softcapping``. Both come from the config, and (since a model may do something else that
no config field announces) :func:`output_head` checks once per model, on an 8-token probe, that the
head it built reproduces the model's own last-position logits; it raises ``UnsupportedModel`` if not.

Labels follow transformers' convention (``labels`` = ``input_ids`` with ignored positions at -100; the
shift happens here), so ``causal_lm_loss(model, x, labels)`` equals ``model(x, labels=labels).loss``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..functional import linear_cross_entropy, long_short_loss
from ..maths import IGNORE_INDEX
from ..pairing import LongShortLoss, make_views
from .decoder import UnsupportedModel, decoder_of, hidden_states, unwrap

__all__ = [
    "UnsupportedModel",
    "OutputHead",
    "attn_implementation",
    "decoder_of",
    "output_head",
    "hidden_states",
    "shift_labels",
    "causal_lm_loss",
    "long_short_step",
    "plain_ce_step",
    "view_states",
    "LongShortObjective",
    "head_operands",
    "load_causal_lm",
]


@dataclass
class OutputHead:
    """What turns a final hidden state into logits: ``softcap(scale * (h W^T + b))``."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    scale: float = 1.0
    softcap: Optional[float] = None

    def prepare(self, h: torch.Tensor):
        """Fold ``scale`` into the hidden states and bias: returns ``(h', bias')`` for the fused ops."""
        if self.scale == 1.0:
            return h, self.bias
        b = None if self.bias is None else self.bias * self.scale
        return h * self.scale, b

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Materialised logits (tests and the one-time probe only)."""
        h, b = self.prepare(h)
        z = F.linear(h, self.weight, b).float()
        if self.softcap:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z


def attn_implementation(device: Optional[torch.device | str] = None) -> str:
    """``"flash_attention_2"`` when flash-attn is installed and we run on CUDA, else ``"sdpa"``."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_causal_lm(model: "str | object", *, device=None, dtype: Optional[torch.dtype] = None, attn: Optional[str] = None,
                   config=None):
    """A causal LM from a path on disk (``from_pretrained``, local files only) or a transformers config
    (``from_config``), with ``attn_implementation`` set: :func:`attn_implementation` unless ``attn`` is
    given, falling back to ``"eager"`` for architectures that support neither flash-attn nor SDPA.
    ``config`` (with a path) replaces the config stored there, e.g. one whose RoPE was extended."""
    import os

    from transformers import AutoModelForCausalLM, PretrainedConfig

    impl = attn or attn_implementation(device)
    if isinstance(model, PretrainedConfig):
        def build(i):
            return AutoModelForCausalLM.from_config(model, attn_implementation=i, dtype=dtype)
    else:
        path = os.fspath(model)
        if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"no model at {path!r}: expected a directory with config.json (and weights)")

        def build(i):
            kw = {} if config is None else {"config": config}
            return AutoModelForCausalLM.from_pretrained(path, attn_implementation=i, dtype=dtype, local_files_only=True,
                                                        **kw)
    chain = {"flash_attention_2": ["flash_attention_2", "sdpa", "eager"], "sdpa": ["sdpa", "eager"]}.get(impl, [impl])
    for i, cand in enumerate(chain):
        try:
            m = build(cand)
            break
        except (ValueError, ImportError):
            if i == len(chain) - 1:
                raise
    if device is not None:
        m = m.to(device)
    return m


def _config_scale_softcap(config) -> tuple:
    scale = 1.0
    ls = getattr(config, "logit_scale", None)  # Cohere: logits * logit_scale
    if isinstance(ls, (int, float)) and not isinstance(ls, bool):
        scale *= float(ls)
    lsc = getattr(config, "logits_scaling", None)  # Granite, MiniCPM3: logits / logits_scaling
    if isinstance(lsc, (int, float)) and not isinstance(lsc, bool):
        scale /= float(lsc)
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3, nanochat
    softcap = float(softcap) if softcap else None
    return scale, softcap


_VERIFIED: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def output_head(model: nn.Module, verify: bool = True) -> OutputHead:
    """The model's output head as an :class:`OutputHead`; raises :class:`UnsupportedModel` if there is none
    or (``verify=True``, once per model) if it does not reproduce the model's own logits."""
    model = unwrap(model)
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is None or not isinstance(getattr(emb, "weight", None), torch.Tensor) or emb.weight.dim() != 2:
        raise UnsupportedModel(
            f"{type(model).__name__} has no linear output embedding (get_output_embeddings() returned "
            f"{type(emb).__name__}); lsa_kernels needs a causal LM with an [V, H] output head"
        )
    bias = getattr(emb, "bias", None)
    scale, softcap = _config_scale_softcap(model.config)
    head = OutputHead(emb.weight, bias if isinstance(bias, torch.Tensor) else None, scale, softcap)
    if verify and model not in _VERIFIED:
        _verify(model, head)
        _VERIFIED[model] = True
    return head


@torch.no_grad()
def _verify(model: nn.Module, head: OutputHead) -> None:
    was_training = model.training
    model.eval()
    try:
        dev = head.weight.device
        V = head.weight.shape[0]
        g = torch.Generator().manual_seed(1234)
        ids = torch.randint(0, min(V, getattr(model.config, "vocab_size", V) or V), (1, 8), generator=g).to(dev)
        ours = head.logits(hidden_states(model, ids)[:, -1:].float().to(head.weight.dtype))
        theirs = model(input_ids=ids, logits_to_keep=1).logits[:, -1:].float()
    finally:
        model.train(was_training)
    tol = 1e-3 * (1.0 + theirs.abs().max().item()) if head.weight.dtype == torch.float32 else 5e-2 * (1 + theirs.abs().max().item())
    err = (ours - theirs).abs().max().item()
    if ours.shape != theirs.shape or err > tol:
        raise UnsupportedModel(
            f"{type(model).__name__}: hidden states @ get_output_embeddings() (scale={head.scale}, "
            f"softcap={head.softcap}) do not reproduce the model's logits (max abs error {err:.3g}); this model "
            "transforms its logits in a way lsa_kernels.integrations.hf does not know about"
        )


def head_operands(head: OutputHead, h: torch.Tensor):
    """``(h', W, b')`` for the fused ops, the scale folded in (:meth:`OutputHead.prepare`). Under
    ``torch.autocast`` the fused ops themselves cast all three to the autocast dtype, as ``F.linear`` does."""
    h, b = head.prepare(h)
    return h, head.weight, b


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """transformers' shift: row t predicts ``labels[t + 1]``; the last row is ignored."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
    ignore_index: int = IGNORE_INDEX,
    **loss_kw,
) -> torch.Tensor:
    """``model(input_ids, labels=labels).loss`` with the fused CE (labels shifted here, as transformers does).

    ``loss_kw`` go to :func:`lsa_kernels.functional.linear_cross_entropy` (``label_smoothing``, ``z_loss``, ...),
    including ``process_group=, vocab_start=`` when the model's output embedding holds only this rank's rows
    ``W[vocab_start : vocab_start + V_r]`` of a vocab-parallel head (labels stay global ids).
    """
    head = output_head(model)
    h, w, b = head_operands(head, hidden_states(model, input_ids, attention_mask))
    y = shift_labels(labels, ignore_index)
    return linear_cross_entropy(
        h, w, y, linear_bias=b, softcap=head.softcap, ignore_index=ignore_index, backend=backend, **loss_kw
    )


def long_short_step(
    model: nn.Module,
    window: torch.Tensor,
    l_extra: int,
    *,
    alpha: float = 0.1,
    divergence: str = "sce",
    backend: str = "auto",
    ignore_index: int = IGNORE_INDEX,
    labels: Optional[torch.Tensor] = None,
    views: str = "joint",
    offload: bool = False,
    **loss_kw,
) -> LongShortLoss:
    """The long-short loss of docs/maths.md §4 for token windows ``[B, l_train + l_extra + 1]``.

    The views are ``long = window[:, :l_train + 1]`` and ``short = window[:, l_extra:]`` (the extra
    token gives the last row its target); each view's inputs are ``view[:, :-1]`` and its targets
    ``view[:, 1:]``. ``labels`` (optional, the window's shape): the targets to use instead of the window's
    tokens, ``ignore_index`` where a position must not count (padding, a prompt): the views take
    ``labels`` exactly as they take ``window``, so a row counts in CE when its own target is valid and a
    pair counts in the divergence when both targets are (docs/maths.md §4). ``views="joint"``: both views run
    through the decoder in ONE batched call (so DDP sees one forward); ``views="sequential"``: each view's
    forward runs without saving activations and is recomputed in the backward, one view at a time (the memory
    of one view, one extra forward per view; :mod:`lsa_kernels.integrations.memory`). ``offload``: the
    activations autograd saves go to host memory (``save_on_cpu``). Then
    :func:`lsa_kernels.functional.long_short_loss` pairs ``h_long[:, l_extra + i] <-> h_short[:, i]``.
    ``loss_kw``: ``temperature``, ``detach``, ``positions``, ``label_smoothing``, ``z_loss``, and
    ``process_group``, ``vocab_start`` for a vocab-sharded output embedding (as in :func:`causal_lm_loss`).
    """
    head = output_head(model)
    long, short = make_views(window, l_extra)
    if labels is None:
        lab_long, lab_short = long, short
    else:
        if labels.shape != window.shape:
            raise ValueError(f"labels must have the window's shape {tuple(window.shape)}, got {tuple(labels.shape)}")
        lab_long, lab_short = make_views(labels.to(window.device), l_extra)
    h_long, h_short = view_states(model, [long[:, :-1], short[:, :-1]], views, offload)
    h_long, w, b = head_operands(head, h_long)
    h_short = head.prepare(h_short)[0]
    return long_short_loss(
        h_long, h_short, w, lab_long[:, 1:], lab_short[:, 1:], l_extra=l_extra, alpha=alpha, divergence=divergence,
        linear_bias=b, softcap=head.softcap, ignore_index=ignore_index, backend=backend, **loss_kw,
    )


def plain_ce_step(
    model: nn.Module,
    window: torch.Tensor,
    l_extra: int,
    *,
    both_views: bool = False,
    backend: str = "auto",
    views: str = "joint",
    offload: bool = False,
    **ce_kw,
) -> LongShortLoss:
    """The alpha = 0 baseline of :func:`long_short_step`: plain CE, no divergence, on the same window convention.

    ``window`` is ``[B, l_train + l_extra + 1]`` as for :func:`long_short_step` (``l_extra = 0``: the whole window
    is the long view, ``[B, l_train + 1]``). ``both_views=False``: CE on the long view ``window[:, :l_train + 1]``
    only (inputs ``[:, :-1]``, targets ``[:, 1:]``: ``l_train`` rows per window, the last ``l_extra`` tokens are
    not read), one forward. ``both_views=True`` (``l_extra >= 1``): CE over the long and the short view together
    (the rows the long-short loss scores, without the divergence), run as ``views`` / ``offload`` say (see
    :func:`long_short_step`). ``ce_kw`` go to :func:`lsa_kernels.functional.linear_cross_entropy`
    (``label_smoothing``, ``z_loss``, ``chunk_bytes``, ``process_group``, ``vocab_start``, ...). Returns
    :class:`LongShortLoss` ``(ce, ce, 0)``: the same fields as the long-short step.
    """
    if window.dim() != 2:
        raise ValueError(f"window: expected token ids [B, l_train + l_extra + 1], got shape {tuple(window.shape)}")
    width = window.shape[1]
    if isinstance(l_extra, bool) or not isinstance(l_extra, int) or not 0 <= l_extra <= width - 2:
        raise ValueError(f"l_extra: expected an int in [0, {width - 2}] for a window of {width} tokens, got {l_extra!r}")
    head = output_head(model)
    if both_views:
        long, short = make_views(window, l_extra)
        h = torch.cat(view_states(model, [long[:, :-1], short[:, :-1]], views, offload), dim=0)
        y = torch.cat([long[:, 1:], short[:, 1:]], dim=0)
    else:
        long = window[:, : width - l_extra]
        h = view_states(model, [long[:, :-1]], "joint", offload)[0]
        y = long[:, 1:]
    h, w, b = head_operands(head, h)
    ce = linear_cross_entropy(h, w, y, linear_bias=b, softcap=head.softcap, backend=backend, **ce_kw)
    return LongShortLoss(ce, ce, torch.zeros((), device=ce.device, dtype=ce.dtype))


def view_states(model: nn.Module, xs, views: str = "joint", offload: bool = False) -> list:
    """The final hidden states of each input in ``xs`` (same shapes): ``"joint"`` = one batched forward,
    ``"sequential"`` = one recomputed forward per input (:func:`lsa_kernels.integrations.memory.view_hidden_states`)."""
    from .memory import VIEWS, check_sequential, offload_activations, sequential_states

    if views not in VIEWS:
        raise ValueError(f"views: expected one of {VIEWS}, got {views!r}")
    if views == "sequential":
        check_sequential(model)
        return sequential_states(model, xs, offload=offload)
    with offload_activations(offload, xs[0].device):
        h = hidden_states(model, torch.cat(list(xs), dim=0))
    return list(h.split([x.shape[0] for x in xs], dim=0))


class LongShortObjective(nn.Module):
    """``model`` + objective as one module, so DDP/FSDP wrap a forward that returns the loss.

    ``forward(window, l_extra, alpha)``: ``window`` is ``[B, l_train + l_extra + 1]`` at every ``alpha``; with
    ``alpha > 0`` the long-short loss on both views (:func:`long_short_step`); with ``alpha == 0`` plain CE on
    the long view ``window[:, :l_train + 1]`` (:func:`plain_ce_step`: the baseline; ``l_extra = 0`` with a
    ``[B, l_train + 1]`` window reads the same tokens).
    Returns :class:`LongShortLoss` (``misalign`` is 0 on the CE path). ``loss_kw`` go to
    :func:`long_short_step`; ``label_smoothing``, ``z_loss``, ``process_group`` and ``vocab_start`` also to
    the CE path. ``views`` (``"joint"`` or ``"sequential"``) and ``offload``: how the two views run
    (:func:`long_short_step`), also on the two-view CE path.
    """

    def __init__(self, model: nn.Module, *, divergence: str = "sce", backend: str = "auto", views: str = "joint",
                 offload: bool = False, **loss_kw):
        super().__init__()
        self.model = model
        self.views, self.offload = views, offload
        self.divergence = divergence
        self.backend = backend
        self.loss_kw = loss_kw

    def forward(self, window: torch.Tensor, l_extra: int, alpha: float, views: int = 0) -> LongShortLoss:
        """``views``: 0 = the default pairing above; 2 with ``alpha == 0`` = CE over BOTH views of ``window``
        ``[B, l_train + l_extra + 1]`` (the same tokens as the long-short loss, without the divergence); with a
        ``ce_weighting`` (LongCE, which needs the pairing) that is the long-short loss at ``alpha = 0``."""
        if alpha == 0 and not (views == 2 and self.loss_kw.get("ce_weighting", "none") != "none"):
            ce_kw = {k: v for k, v in self.loss_kw.items()
                     if k in ("label_smoothing", "z_loss", "process_group", "vocab_start")}
            return plain_ce_step(self.model, window, l_extra, both_views=views == 2, backend=self.backend,
                                 views=self.views, offload=self.offload, **ce_kw)
        return long_short_step(
            self.model, window, l_extra, alpha=alpha, divergence=self.divergence, backend=self.backend,
            views=self.views, offload=self.offload, **self.loss_kw
        )


# --- one-line drop-in for Trainer/TRL/PEFT (lsa_kernels.integrations.patch, .trainer), re-exported lazily:
# patch.py imports this module, and the trainer module imports transformers.Trainer only when asked for.
_LAZY = {
    "patch": "patch", "unpatch": "patch", "is_patched": "patch", "LongShortOutput": "patched_forward",
    "LongShortTrainer": "trainer", "LongShortCollator": "trainer", "window_dataset": "trainer",
}
__all__ += list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def distillation_step(
    student: nn.Module,
    teacher: nn.Module,
    input_ids: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
    ignore_index: int = IGNORE_INDEX,
    train_teacher: bool = False,
    **loss_kw,
):
    """Knowledge distillation between two causal LMs with one vocabulary (docs/maths.md §12), fused: no logits.

    Both models run on ``input_ids [B, T]`` (the teacher under ``torch.no_grad()`` unless ``train_teacher``);
    their final hidden states and output heads (each with its own scale folded in, :func:`output_head`) go to
    :func:`lsa_kernels.linear_distillation`. ``labels`` (transformers' convention: ``input_ids`` with
    ignored positions at ``ignore_index``; shifted here as in :func:`causal_lm_loss`): the student's CE
    target, and only rows whose target is valid count in either term — pass labels with padding at
    ``ignore_index`` to keep padded rows out. Without ``labels`` every row counts in the soft term (and
    ``hard_loss_weight`` must be 0). ``loss_kw``: ``divergence`` (default ``"kl"`` = KL(teacher ‖ student)),
    ``temperature``, ``hard_loss_weight``, ``soft_loss_weight``, ``temperature_scaling``, ``reduction``,
    ``chunk_bytes``, ``deterministic``. The two heads must have the same softcap (Gemma-2's
    ``final_logit_softcapping``), else :class:`UnsupportedModel`. Returns
    :class:`lsa_kernels.DistillationLoss` ``(loss, hard, soft)``.
    """
    from ..distillation import linear_distillation

    head_s = output_head(student)
    head_t = output_head(teacher)
    if (head_s.softcap or None) != (head_t.softcap or None):
        raise UnsupportedModel(
            f"the student's logit softcap ({head_s.softcap}) differs from the teacher's ({head_t.softcap}); "
            "linear_distillation applies one softcap to both heads"
        )
    hs, ws, bs = head_operands(head_s, hidden_states(student, input_ids, attention_mask))
    ctx = contextlib.nullcontext() if train_teacher else torch.no_grad()
    with ctx:
        ht, wt, bt = head_operands(head_t, hidden_states(teacher, input_ids.to(head_t.weight.device),
                                                         None if attention_mask is None
                                                         else attention_mask.to(head_t.weight.device)))
    dev = hs.device
    ht, wt, bt = ht.to(dev), wt.to(dev), None if bt is None else bt.to(dev)
    y = None if labels is None else shift_labels(labels.to(dev), ignore_index)
    return linear_distillation(
        hs, ws, ht, wt, y, student_bias=bs, teacher_bias=bt, softcap=head_s.softcap, ignore_index=ignore_index,
        train_teacher=train_teacher, backend=backend, **loss_kw,
    )


__all__.append("distillation_step")
