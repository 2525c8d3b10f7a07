"""The long-context metrics of ``lsa eval`` (docs/maths.md §6, §10), computed from a model's final hidden
states and its LM head with the fused losses (no ``[B, T, V]`` logits):

* per-token CE of the last ``S`` targets of each window at every context length (the same targets at
  every length): ``ce = mean_t -log softmax(W h_t)[y_t]``, ``ppl = exp(ce)``;
* the same targets fed only a truncated context (LongPPL's comparison), and LongPPL's key tokens
  (``loss_short - loss_full > gap`` and ``loss_full < max_loss``);
* LSM: ``D(p(.|x[-l1:]), p(.|x[-l2:]))`` at the last position, per divergence ``D`` (docs/maths.md §5, §6).

No gradients flow here (``torch.no_grad``). Orchestration, inputs and outputs: evaluate.py.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import torch

HiddenFn = Callable[[torch.Tensor], torch.Tensor]  # ids [B, T] (on the head's device) -> final hidden [B, T, H]


def rows_per_forward(budget_tokens: int, T: int) -> int:
    return max(1, budget_tokens // max(1, T))


@torch.no_grad()
def last_losses(hidden_fn: HiddenFn, head, inputs: torch.Tensor, targets: torch.Tensor, budget_tokens: int,
                backend: str) -> torch.Tensor:
    """Per-token CE ``[B, S]`` (float64, CPU) of the last ``S = targets.shape[1]`` positions of ``inputs [B, T]``
    (position ``T - S + j`` predicts ``targets[:, j]``). Fused CE, no logits."""
    from ..functional import linear_cross_entropy

    dev = head.weight.device
    S = targets.shape[1]
    out = []
    rows = rows_per_forward(budget_tokens, inputs.shape[1])
    for i in range(0, inputs.shape[0], rows):
        h = hidden_fn(inputs[i : i + rows].to(dev))[:, -S:]
        h, b = head.prepare(h.float())
        per = linear_cross_entropy(h, head.weight.float(), targets[i : i + rows].to(dev),
                                   linear_bias=None if b is None else b.float(), softcap=head.softcap,
                                   reduction="none", backend=backend)
        out.append(per.double().cpu())
    return torch.cat(out)


def length_losses(hidden_fn: HiddenFn, head, windows: torch.Tensor, lengths: Sequence[int], score_tokens: int,
                  budget_tokens: int, backend: str) -> Dict[int, torch.Tensor]:
    """``{L: [n, score_tokens]}``: the losses of each window's final ``score_tokens`` targets, fed its last
    ``L + 1`` tokens (context ``L``). The targets are ``windows[:, -score_tokens:]`` at every length."""
    S = score_tokens
    tgt = windows[:, -S:]
    return {L: last_losses(hidden_fn, head, windows[:, -(L + 1) : -1], tgt, budget_tokens, backend) for L in lengths}


def truncated_losses(hidden_fn: HiddenFn, head, windows: torch.Tensor, score_tokens: int, short: int,
                     budget_tokens: int, backend: str) -> torch.Tensor:
    """``[n, score_tokens]``: the loss of each scored target ``t`` given ONLY ``x[t-short : t]`` (one sequence
    of ``short`` tokens per target, batched)."""
    n, N = windows.shape
    S = score_tokens
    assert N - S - short >= 0, "truncated context reaches before the window"
    ctx = windows.unfold(1, short, 1)[:, N - S - short : N - short]  # [n, S, short]: x[t-short:t], t = N-S..N-1
    ctx = ctx.reshape(n * S, short)
    tgt = windows[:, -S:].reshape(n * S, 1)
    return last_losses(hidden_fn, head, ctx, tgt, budget_tokens, backend).reshape(n, S)


def key_tokens(full: torch.Tensor, short: torch.Tensor, gap: float, max_loss: float) -> torch.Tensor:
    """LongPPL's key tokens: ``short - full > gap`` (long context helps by more than ``gap`` nats) and
    ``full < max_loss`` (the reference model actually predicts them with the full context)."""
    return ((short - full) > gap) & (full < max_loss)


@torch.no_grad()
def lsm_values(hidden_fn: HiddenFn, head, windows: torch.Tensor, samples: Sequence[tuple], divergences: Sequence[str],
               budget_tokens: int, backend: str) -> Dict[str, dict]:
    """``{div: {lsm, lsm_std, lsm_n}}`` over ``samples = [(window index, l1, l2)]``: the divergence between the
    next-token distributions at the last position of ``windows[i, -l1:]`` (p) and ``windows[i, -l2:]`` (q)."""
    from ..functional import linear_divergence

    dev = head.weight.device
    need = sorted({(i, l) for i, l1, l2 in samples for l in (l1, l2)}, key=lambda t: (t[1], t[0]))
    last: Dict[tuple, torch.Tensor] = {}
    by_len: Dict[int, List[int]] = {}
    for i, l in need:
        by_len.setdefault(l, []).append(i)
    for l, idx in by_len.items():
        rows = rows_per_forward(budget_tokens, l)
        for j in range(0, len(idx), rows):
            ii = idx[j : j + rows]
            h = hidden_fn(windows[ii, -l:].to(dev))[:, -1].float()
            for k, i in enumerate(ii):
                last[(i, l)] = h[k]
    hp = torch.stack([last[(i, l1)] for i, l1, _ in samples])
    hq = torch.stack([last[(i, l2)] for i, _, l2 in samples])
    (hp, b), (hq, _) = head.prepare(hp), head.prepare(hq)
    res = {}
    for div in divergences:
        d = linear_divergence(hp, hq, head.weight.float(), linear_bias=None if b is None else b.float(), divergence=div,
                              softcap=head.softcap, reduction="none", backend=backend).double().cpu()
        n = d.numel()
        res[div] = {"lsm": d.mean().item(), "lsm_std": d.std().item() if n > 1 else 0.0, "lsm_n": n}
    return res


def lsm_samples_for(l_train: int, fractions: torch.Tensor) -> List[tuple]:
    """``[(i, l1, l2)]`` with ``l ~ U{lo..l_train}``, ``lo = max(1, l_train // 2)``, from fixed uniforms in [0, 1)
    (so runs with the same ``l_train`` get the same samples)."""
    lo = max(1, l_train // 2)
    span = l_train - lo + 1
    ls = (lo + (fractions * span).floor().long().clamp(max=span - 1)).tolist()
    return [(i, l1, l2) for i, (l1, l2) in enumerate(ls)]
