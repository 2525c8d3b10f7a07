"""Memory levers of a long-context step that need no change to the model: the views run one at a time, and
activation offload to host memory. (The sequence-tiled MLP and norms are :mod:`lsa_kernels.integrations.tiling`.)

**View-sequential long-short step** (``hf.long_short_step(..., views="sequential")``). The joint step runs
both views of a window through the model as one batch of ``2B`` sequences, so the activations of two full
forward passes coexist until the backward. The sequential step runs each view's forward under
``no_grad`` (nothing saved but its final hidden states ``[B, T, H]``), computes the fused loss on the two
hidden-state tensors, and in the backward recomputes each view's forward *with* grad and backpropagates its
``dL/dH`` through it, one view after the other: the peak holds one view's activations plus the two
hidden-state tensors, for one extra forward per view. Each view's ``dL/dH`` waits in a slot, not in the
checkpoint's backward (whose arguments live as long as the recompute's whole backward): the checkpoint is handed
a zero-stride placeholder, and the recomputed output's own backward takes ``dL/dH`` out of the slot, so autograd
frees it as soon as the final norm's backward has consumed it. When the input embedding trains and the views hold
at most ``2V`` tokens together, it runs once on both views, with grad, outside the recompute: its ``[V, H]``
weight gradient is made once, as in the joint step, and the two ``[B, T, H]`` embedding outputs wait for the
backward. Past ``2V`` tokens those outputs outweigh the two ``[V, H]`` tensors the other way costs, so the
embedding runs inside each view's recompute instead (one ``[V, H]`` gradient per view, summed into ``.grad``). Each view's decoder forward is a reentrant
``torch.utils.checkpoint.checkpoint`` (torch's own recompute: it restores the CPU and CUDA RNG state of the
no-grad forward, so dropout draws the same masks and the gradient is that of the loss reported, and the
autocast state). Because the recompute runs inside
the backward, the step is driven by ``loss.backward()`` as usual (gradient accumulation, ``Trainer``, LoRA,
gradient checkpointing inside the model compose); ``torch.autograd.grad`` is not supported (reentrant
checkpointing), and under DDP the wrapper needs ``static_graph=True`` (every parameter gets its gradient
once per view) and every micro-batch must sync (``no_sync()`` under a static graph fails an internal assert
of DDP's reducer, pytorch/pytorch#143580).

**Activation offload** (:func:`offload_activations`): ``torch.autograd.graph.save_on_cpu`` around the
model's forward: every tensor autograd saves goes to host memory (pinned on CUDA) and comes back in the
backward. With activation checkpointing only the checkpointed layers' inputs are saved, so only those move
(what Unsloth calls offloaded gradient checkpointing); with the sequential views the hooks are entered
inside each view's recompute.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Optional

import torch
import torch.nn as nn

from .decoder import UnsupportedModel, decoder_of, hidden_states, unwrap

__all__ = ["VIEWS", "sequential_states", "view_hidden_states", "check_sequential", "offload_activations"]

VIEWS = ("joint", "sequential")


def offload_activations(enabled: bool, device: "torch.device | str | None" = None):
    """``save_on_cpu`` (pinned host buffers when ``device`` is CUDA) if ``enabled``, else a null context."""
    if not enabled:
        return contextlib.nullcontext()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return torch.autograd.graph.save_on_cpu(pin_memory=dev.type == "cuda")


@contextlib.contextmanager
def _noting_saved(offload: bool, device):
    """Saved-tensor hooks that note the storage of every tensor autograd saves (yielding the set of their data
    pointers) and otherwise do what :func:`offload_activations` would (move it to host memory, or nothing)."""
    seen = set()
    inner = offload_activations(offload, device) if offload else None
    pack_in = getattr(inner, "pack_hook", None)
    unpack_in = getattr(inner, "unpack_hook", None)

    def pack(t):
        seen.add(t.untyped_storage().data_ptr())
        return pack_in(t) if pack_in is not None else t

    def unpack(t):
        return unpack_in(t) if unpack_in is not None else t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield seen


def _recompute(fn, x, offload: bool) -> torch.Tensor:
    """``fn(x)`` under :func:`offload_activations`; when it runs with grad (the recompute inside the backward),
    the storage of its output is given back at once unless autograd saved it: the checkpoint's backward needs
    only the output's graph and shape (it backpropagates the incoming ``dL/dH`` from there), so its ``[B, T, H]``
    values would otherwise sit through the view's whole backward for nothing."""
    if not torch.is_grad_enabled():
        with offload_activations(offload, x.device):
            return fn(x)
    with _noting_saved(offload, x.device) as saved:
        h = fn(x)
    if (isinstance(h, torch.Tensor) and h.grad_fn is not None and h._base is None
            and h.untyped_storage().data_ptr() not in saved):
        h.untyped_storage().resize_(0)
    return h


class _GradSlot:
    """One view's ``dL/dH`` between the loss's backward and the view's recompute."""

    __slots__ = ("grad",)

    def __init__(self):
        self.grad: Optional[torch.Tensor] = None


def _placeholder(t: torch.Tensor) -> torch.Tensor:
    """Zeros of ``t``'s shape, dtype and device in one element's memory (zero strides)."""
    return t.new_zeros(()).expand(t.shape)


class _Deposit(torch.autograd.Function):
    """Identity on a view's final hidden states. Backward: the incoming ``dL/dH`` goes into the slot, and the
    checkpoint below gets a placeholder (its backward holds its arguments until the recompute's backward ends)."""

    @staticmethod
    def forward(ctx, h, slot):
        ctx.slot = slot
        return h.view_as(h)

    @staticmethod
    def backward(ctx, g):
        ctx.slot.grad = g
        return _placeholder(g), None


class _Withdraw(torch.autograd.Function):
    """A placeholder for the recomputed final hidden states, inside the recompute. Backward: ``dL/dH`` out of the
    slot, which keeps no reference, so autograd frees it once the next node (the final norm) has used it."""

    @staticmethod
    def forward(ctx, h, slot):
        ctx.slot = slot
        return _placeholder(h)

    @staticmethod
    def backward(ctx, _placeholder_grad):
        g, ctx.slot.grad = ctx.slot.grad, None
        return g, None


def _recomputed_view(fn, x, offload: bool, slot: _GradSlot) -> torch.Tensor:
    """``_recompute(fn, x)``, whose output hands its gradient over through ``slot`` when it runs with grad."""
    h = _recompute(fn, x, offload)
    return _Withdraw.apply(h, slot) if h.requires_grad else h


def _checkpointed_view(run, *args, replay_rng: bool, slot: _GradSlot) -> torch.Tensor:
    return _Deposit.apply(torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=True,
                                                            preserve_rng_state=replay_rng), slot)


def view_hidden_states(model: nn.Module, x: torch.Tensor, *, offload: bool = False,
                       replay_rng: bool = True) -> torch.Tensor:
    """``hidden_states(model, x)`` whose activations are not kept: computed under ``no_grad`` now, recomputed
    with grad (RNG and autocast state restored; offloaded if ``offload``) when the backward reaches it."""
    slot = _GradSlot()

    def run(ids, _anchor):
        return _recomputed_view(functools.partial(hidden_states, model), ids, offload, slot)

    if not torch.is_grad_enabled():
        return hidden_states(model, x)
    # an input that requires grad, so the checkpoint's output is part of the graph (the token ids cannot be)
    anchor = torch.empty(0, device=x.device, requires_grad=True)
    return _checkpointed_view(run, x, anchor, replay_rng=replay_rng, slot=slot)


_EMBEDS: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def _decoder_output(dec: nn.Module, e: torch.Tensor) -> torch.Tensor:
    out = dec(inputs_embeds=e, use_cache=False)
    h = getattr(out, "last_hidden_state", None)
    return out[0] if h is None else h


def _embedding_split(model: nn.Module):
    """``(decoder, input embedding)`` when the embedding trains and ``decoder(inputs_embeds=embed(ids))``
    reproduces ``hidden_states(model, ids)`` exactly (checked once per model), else None."""
    inner = unwrap(model)
    dec = decoder_of(inner)
    emb = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    if dec is None or not isinstance(w, torch.Tensor) or not w.requires_grad:
        return None
    if inner not in _EMBEDS:
        V = getattr(getattr(inner, "config", None), "vocab_size", None) or w.shape[0]
        ids = torch.randint(0, min(V, w.shape[0]), (1, 8), generator=torch.Generator().manual_seed(99)).to(w.device)
        was = inner.training
        inner.eval()
        try:
            with torch.no_grad():
                ok = torch.equal(_decoder_output(dec, emb(ids)), hidden_states(inner, ids))
        except (TypeError, ValueError, RuntimeError):  # a decoder that takes no inputs_embeds
            ok = False
        finally:
            inner.train(was)
        _EMBEDS[inner] = ok
    return (dec, emb) if _EMBEDS[inner] else None


def sequential_states(model: nn.Module, xs, *, offload: bool = False, replay_rng: bool = True) -> list:
    """The final hidden states of each token tensor in ``xs``, each view's decoder forward under ``no_grad``
    and recomputed with grad in the backward (:func:`view_hidden_states`). When the input embedding trains
    (and the decoder takes ``inputs_embeds``) and the views hold at most ``2V`` tokens together, the embedding
    runs once, with grad, on all the views together, outside the recompute: its ``[V, H]`` weight gradient is
    then made once, not once per view, and the views' ``[B, T, H]`` embeddings (together no larger than two such
    gradients) are kept for the backward. Past ``2V`` tokens the embedding runs inside each view's recompute."""
    if not torch.is_grad_enabled():
        return [hidden_states(model, x) for x in xs]
    split = _embedding_split(model)
    if split is not None and sum(x.numel() for x in xs) > 2 * split[1].weight.shape[0]:
        split = None  # the embedding outputs would outweigh a second [V, H] gradient and its sum: embed inside
    if split is None or len({tuple(x.shape[1:]) for x in xs}) != 1:
        return [view_hidden_states(model, x, offload=offload, replay_rng=replay_rng) for x in xs]
    dec, emb = split

    def view(e):
        slot = _GradSlot()
        run = functools.partial(_recomputed_view, functools.partial(_decoder_output, dec), offload=offload, slot=slot)
        return _checkpointed_view(run, e, replay_rng=replay_rng, slot=slot)

    es = emb(torch.cat(list(xs), dim=0)).split([x.shape[0] for x in xs], dim=0)
    return [view(e) for e in es]


_CHECKED: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def check_sequential(model: nn.Module) -> None:
    """Raise :class:`~lsa_kernels.integrations.decoder.UnsupportedModel` (one line) unless the views of ``model`` can be
    recomputed: once per model, on an 8-token probe, the final hidden states must be a ``[B, T, H]`` tensor
    that depends on the trainable parameters, and two forwards from the same RNG state must agree exactly
    (a forward whose result depends on anything but its input, its weights and torch's RNG cannot be replayed)."""
    inner = unwrap(model)
    if inner in _CHECKED:
        return
    name = type(inner).__name__
    params = [p for p in inner.parameters()]
    if not params:
        raise UnsupportedModel(f"views='sequential': {name} has no parameters")
    dev = params[0].device
    V = getattr(getattr(inner, "config", None), "vocab_size", None) or 2
    ids = torch.randint(0, V, (1, 8), generator=torch.Generator().manual_seed(4321)).to(dev)
    trains = any(p.requires_grad for p in params)
    cuda = [dev] if dev.type == "cuda" else []
    with torch.enable_grad(), torch.random.fork_rng(devices=cuda):  # the probe leaves the RNG as it found it
        h = hidden_states(inner, ids)
    if not isinstance(h, torch.Tensor) or h.dim() != 3 or tuple(h.shape[:2]) != (1, 8):
        raise UnsupportedModel(
            f"views='sequential': {name}'s final hidden states are not a [B, T, H] tensor "
            f"(got {type(h).__name__}{list(h.shape) if isinstance(h, torch.Tensor) else ''}); use views='joint'")
    if trains and not h.requires_grad:
        raise UnsupportedModel(
            f"views='sequential': {name}'s final hidden states do not depend on its trainable parameters "
            "(its forward returns a detached tensor); use views='joint'")
    with torch.no_grad(), torch.random.fork_rng(devices=cuda):
        state = torch.random.get_rng_state()
        cstate = torch.cuda.get_rng_state(dev) if cuda else None
        out = []
        for _ in range(2):
            torch.random.set_rng_state(state)
            if cuda:
                torch.cuda.set_rng_state(cstate, dev)
            out.append(hidden_states(inner, ids))
    a, b = out
    if not torch.equal(a, b):
        raise UnsupportedModel(
            f"views='sequential': two forwards of {name} from the same RNG state differ (max abs "
            f"{(a.float() - b.float()).abs().max().item():.3g}), so its recompute cannot replay the loss it "
            "reported; use views='joint'")
    _CHECKED[inner] = True
