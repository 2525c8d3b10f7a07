"""The synthetic study's model (docs/synthetic.md, lsa_kernels/studies/synthetic.py): a small causal pre-LN
transformer over the vocabulary {0, 1, BOS} with a scalar regression head read at the last real token,
``M`` independent members stacked in one module.

    h_0 = E[ids] (+ P[min(pos, n_pos - 1)] for the learned PE)
    per layer: h += W_o · attn_causal(RoPE?(W_q LN(h)), RoPE?(W_k LN(h)), W_v LN(h));  h += W_2 GELU(W_1 LN(h))
    y = (w_head · LN(h[length]) + b_head) · y_std + y_mean          (y_std, y_mean: fixed, from the training targets)

Written in plain torch around ``F.scaled_dot_product_attention`` rather than a library model: it is tiny,
needs three interchangeable positional schemes including NoPE, and a regression head at the last token.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

PES = ("nope", "rope", "learned")
BOS = 2
VOCAB = 3


def _rope_cache(T: int, dim: int, base: float = 10000.0):
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    ang = torch.arange(T, dtype=torch.float32)[:, None] * inv[None, :]
    return ang.cos(), ang.sin()  # [T, dim/2]


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2)


def init_params(pe: str, d: int, n_layers: int, n_pos: int) -> Dict[str, torch.Tensor]:
    """One model's parameters, drawn from the global RNG in a fixed order with torch's default initialisation
    of ``nn.Embedding`` (N(0, 1)), ``nn.Linear`` (U(±1/√fan_in) for weight and bias) and ``nn.LayerNorm`` (1, 0).
    Names: ``emb``, ``pos`` (learned PE only), ``blocks.{i}.{ln1,qkv,proj,ln2,mlp0,mlp2}``, ``ln_f``, ``head``;
    each with ``.weight`` (and ``.bias`` for linear and norm layers)."""
    if pe not in PES:
        raise ValueError(f"unknown pe {pe!r}")
    p: Dict[str, torch.Tensor] = {}

    def linear(name, n_in, n_out):
        w = torch.empty(n_out, n_in)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # what nn.Linear.reset_parameters does
        b = torch.empty(n_out)
        nn.init.uniform_(b, -1 / math.sqrt(n_in), 1 / math.sqrt(n_in))
        p[name + ".weight"], p[name + ".bias"] = w, b

    def norm(name):
        p[name + ".weight"], p[name + ".bias"] = torch.ones(d), torch.zeros(d)

    p["emb.weight"] = torch.randn(VOCAB, d)
    if pe == "learned":
        p["pos.weight"] = torch.randn(n_pos, d)
    for i in range(n_layers):
        pre = f"blocks.{i}."
        norm(pre + "ln1")
        linear(pre + "qkv", d, 3 * d)
        linear(pre + "proj", d, d)
        norm(pre + "ln2")
        linear(pre + "mlp0", d, 4 * d)
        linear(pre + "mlp2", 4 * d, d)
    norm("ln_f")
    linear("head", d, 1)
    return p


class Regressors(nn.Module):
    """``M`` independent causal pre-LN transformers over {0, 1, BOS} (one PE), each with a scalar output read
    at the last real token; ``M = 1`` is one model. The only model definition of the study.

    Parameters (:func:`init_params`, one dict per member) are stacked along a leading member axis: linear
    layers are batched matmuls and attention runs on the flattened (member, batch) axis. Member m's output
    depends only on member m's parameters; the training loss is a sum of per-member losses, gradients are
    clipped per member and AdamW is elementwise, so training M members together is the same computation as
    training them one by one (up to float summation order; ``tests/training/test_synthetic.py`` checks it). Stacking
    exists because the models are so small that per-op overhead, not arithmetic, dominates on CPU: batching
    15 models is several times faster than a loop. With a causal mask right-padding never reaches the last
    real token, so variable-length batches need no attention mask.
    """

    def __init__(self, pe: str, n_heads: int, n_pos: int, params: Sequence[Dict[str, torch.Tensor]],
                 y_mean: Sequence[float], y_std: Sequence[float]):
        super().__init__()
        if pe not in PES:
            raise ValueError(f"unknown pe {pe!r}")
        self.pe, self.n_pos, self.h = pe, n_pos, n_heads
        self.n_layers = sum(1 for k in params[0] if k.endswith(".qkv.weight"))
        self.p = nn.ParameterDict({k.replace(".", "__"): nn.Parameter(torch.stack([m[k].detach() for m in params]))
                                   for k in params[0]})
        self.register_buffer("y_mean", torch.tensor([float(v) for v in y_mean]))
        self.register_buffer("y_std", torch.tensor([float(v) for v in y_std]))

    def member(self, i: int) -> "Regressors":
        """Member ``i`` alone (a copy, ``M = 1``)."""
        params = [{k.replace("__", "."): v[i] for k, v in self.p.items()}]
        return Regressors(self.pe, self.h, self.n_pos, params, self.y_mean[i:i + 1], self.y_std[i:i + 1]).eval()

    def _lin(self, x, name):  # x [M, N, in] -> [M, N, out]
        return torch.baddbmm(self.p[name + "__bias"][:, None, :], x, self.p[name + "__weight"].transpose(1, 2))

    def _ln(self, x, name):  # x [M, N, d]
        w, b = self.p[name + "__weight"], self.p[name + "__bias"]
        return F.layer_norm(x, x.shape[-1:]) * w[:, None, :] + b[:, None, :]

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids [M, B, T] (or [B, T], the same batch for every member) with BOS at index 0; lengths [M, B] (or
        [B]) = number of bits. Returns predictions [M, B] in the task's target space."""
        M = self.y_mean.shape[0]
        if ids.dim() == 2:
            ids, lengths = ids.expand(M, *ids.shape), lengths.expand(M, *lengths.shape)
        _, B, T = ids.shape
        ar = torch.arange(M)[:, None, None]
        x = self.p["emb__weight"][ar, ids]  # [M, B, T, d]
        D = x.shape[-1]
        hd = D // self.h
        rope = None
        if self.pe == "learned":
            # positions past the trained table are clamped to its last row (no extrapolation possible)
            pos = torch.arange(T).clamp_max(self.n_pos - 1)
            x = x + self.p["pos__weight"][:, pos][:, None]
        elif self.pe == "rope":
            rope = _rope_cache(T, hd)
        x = x.reshape(M, B * T, D)
        for i in range(self.n_layers):
            pre = f"blocks__{i}__"
            q, k, v = (self._lin(self._ln(x, pre + "ln1"), pre + "qkv")
                       .view(M * B, T, 3, self.h, hd).permute(2, 0, 3, 1, 4))
            if rope is not None:
                q, k = _apply_rope(q, *rope), _apply_rope(k, *rope)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(M, B * T, D)
            x = x + self._lin(a, pre + "proj")
            hdn = F.gelu(self._lin(self._ln(x, pre + "ln2"), pre + "mlp0"))
            x = x + self._lin(hdn, pre + "mlp2")
        x = x.view(M, B, T, D)[ar[:, :, 0], torch.arange(B)[None, :], lengths]  # last real token: index `length`
        x = self._ln(x, "ln_f")
        out = self._lin(x, "head").squeeze(-1)
        return out * self.y_std[:, None] + self.y_mean[:, None]
