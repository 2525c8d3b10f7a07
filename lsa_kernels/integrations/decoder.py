"""A transformers causal LM's decoder and its final hidden states: the helpers every integration module shares.

``unwrap`` takes a model out of its DDP / FSDP / ``torch.compile`` wrappers, :func:`decoder_of` finds the module
that returns the final (normed) hidden states, :func:`hidden_states` runs it without computing logits.
:class:`UnsupportedModel` is what the adapters raise when a model does something they cannot express. They
live below both :mod:`~lsa_kernels.integrations.hf` (the losses) and :mod:`~lsa_kernels.integrations.memory`
(the recomputed views), which :mod:`~lsa_kernels.integrations.hf` dispatches to: neither imports the other
for them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

__all__ = ["UnsupportedModel", "unwrap", "decoder_of", "hidden_states"]


class UnsupportedModel(ValueError):
    """The model's output head does something this adapter cannot express (see the message)."""


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / FSDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def decoder_of(model: nn.Module) -> Optional[nn.Module]:
    """The module that returns final (normed) hidden states, or None if the model has no separate one."""
    model = unwrap(model)
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    if dec is None or dec is model:
        base = getattr(model, "base_model", None)
        dec = base if base is not None and base is not model else None
    return dec


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Final hidden states ``[B, T, H]`` (after the final norm), without computing logits.

    Runs the decoder (``model.get_decoder()``) when the model has one; otherwise falls back to
    ``model(..., output_hidden_states=True, logits_to_keep=1)`` (logits for one position only).
    """
    dec = decoder_of(model)
    if dec is not None:
        out = dec(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        h = getattr(out, "last_hidden_state", None)
        if h is None:
            h = out[0]
        return h
    out = unwrap(model)(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True, logits_to_keep=1
    )
    return out.hidden_states[-1]
