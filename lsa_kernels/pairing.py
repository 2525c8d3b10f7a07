"""The two views of a text window and how their rows pair (docs/maths.md §4).

From one window ``x`` of ``l_train + l_extra`` tokens:

    long  = x[0 : l_train]                  short = x[l_extra : l_train + l_extra]
    hidden_long[:, l_extra + i]  <->  hidden_short[:, i]      for i in [0, T - l_extra)

Both rows of a pair end on the same token and predict the same next token; the long one has seen
``l_extra`` more tokens of context. Shared by the reference, the fused path and the training loop so
that all three pair rows the same way.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .maths import IGNORE_INDEX
from .outputs import LongShortLoss, LongShortLossOutput, PerToken  # noqa: F401  (re-exported)


def sample_l_extra(l_train: int, generator: Optional[torch.Generator] = None) -> int:
    """Draw ``l_extra ~ Uniform{1, ..., floor(l_train / 2)}`` (the paper's range; docs/maths.md §4)."""
    if isinstance(l_train, bool) or not isinstance(l_train, int):
        raise TypeError(f"l_train must be an int, got {type(l_train).__name__}")
    if l_train < 2:
        raise ValueError(f"l_train must be >= 2 so that l_extra in [1, l_train // 2] exists, got {l_train}")
    hi = l_train // 2
    return int(torch.randint(1, hi + 1, (1,), generator=generator).item())


def make_views(window: torch.Tensor, l_extra: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split token windows ``[B, l_train + l_extra (+1)]`` into (long, short) views of equal length.

    Both views have length ``window.shape[-1] - l_extra``; long is the prefix, short the suffix.
    """
    T = window.shape[-1] - l_extra
    if l_extra < 1 or T < l_extra + 1:
        raise ValueError(f"l_extra={l_extra} does not fit a window of {window.shape[-1]} tokens")
    return window[..., :T], window[..., l_extra:]


def pair_mask(
    labels_long: torch.Tensor,
    labels_short: torch.Tensor,
    l_extra: int,
    positions: str = "overlap",
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Bool ``[B, T - l_extra]``: which pairs enter the misalignment term.

    A pair counts when the targets of both its rows are valid. ``positions="last"`` keeps only the
    last such pair of each sequence (sequences with no valid pair contribute nothing).
    """
    T = labels_long.shape[-1]
    yl = labels_long[..., l_extra:]
    ys = labels_short[..., : T - l_extra]
    valid = (yl != ignore_index) & (ys != ignore_index)
    if positions == "overlap":
        return valid
    # last valid pair per sequence, without a host sync
    idx = torch.arange(valid.shape[-1], device=valid.device)
    score = torch.where(valid, idx, torch.full_like(idx, -1))
    last = score.amax(dim=-1, keepdim=True)
    return valid & (idx == last)
