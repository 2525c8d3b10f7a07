"""The models the demo evaluates: the base with its RoPE extended, and a view of a model past its extended length."""

from __future__ import annotations

import json
import os
import shutil

__all__ = ["extended_base", "eval_view", "check_view"]


def extended_base(base_out: str, rope_scaling: str, factor: float, dest: str) -> str:
    """Write the base with its RoPE extended (no training) to ``dest``: the "base x4" row and LongPPL reference."""
    import torch

    from .checkpoint import latest_checkpoint
    from .config import TrainConfig
    from .model import build_model

    ckpt = latest_checkpoint(base_out) or base_out  # a run's --out dir, or a model directory (a shipped base)
    model = build_model(TrainConfig(model=ckpt, rope_scaling=rope_scaling, rope_factor=factor), 0, torch.device("cpu"))
    shutil.rmtree(dest, ignore_errors=True)
    model.save_pretrained(dest, safe_serialization=True)
    tok = os.path.join(ckpt, "tokenizer.json")
    if os.path.isfile(tok):
        shutil.copy(tok, os.path.join(dest, "tokenizer.json"))
    return dest


def eval_view(model_dir: str, dest: str, n_positions: int) -> str:
    """``model_dir`` as seen by the evaluation past its extended length: ``dest`` holds a copy of its config.json
    with ``max_position_embeddings`` raised to ``n_positions`` and links to its other files (weights, tokenizer).

    ``lsa eval`` refuses lengths past ``max_position_embeddings`` (n0 x F after a x F extension); the demo
    evaluates at up to 4x the extended length, as the paper evaluates beyond its training length. For
    position interpolation (linear) and plain RoPE the rotary angles do not depend on that field (it is a
    bound only), which :func:`check_view` verifies on the model's outputs; other RoPE types do use it and are
    refused by :func:`plan`."""
    os.makedirs(dest, exist_ok=True)
    for name in os.listdir(model_dir):
        src = os.path.abspath(os.path.join(model_dir, name))
        if name == "config.json" or name.endswith(".pt") or not os.path.isfile(src):
            continue
        link = os.path.join(dest, name)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(src, link)
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg["max_position_embeddings"] = max(int(cfg.get("max_position_embeddings") or 0), int(n_positions))
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return dest


def check_view(model_dir: str, view: str, length: int) -> float:
    """Max |logit difference| between ``model_dir`` and its :func:`eval_view` on a ``length``-token input; a
    ConfigError unless they agree (then the view changes nothing but the allowed length)."""
    import torch

    from .config import ConfigError, TrainConfig
    from .model import build_model

    torch.manual_seed(0)
    outs = []
    for d in (model_dir, view):
        m = build_model(TrainConfig(), 0, torch.device("cpu"), path=d).eval()
        ids = torch.randint(0, m.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            outs.append(m(ids).logits.float())
    diff = (outs[0] - outs[1]).abs().max().item()
    if not diff <= 1e-5:
        raise ConfigError(f"raising max_position_embeddings changes {model_dir}'s outputs (max |diff| {diff:.3g}): "
                          "its RoPE type cannot be evaluated past its extended length")
    return diff
