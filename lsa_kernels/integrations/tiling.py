"""Sequence tiling of a decoder's row-wise modules: the MLP and the norms run over tiles of the sequence,
recomputed in the backward.

A decoder layer's MLP maps ``[.., T, H] -> [.., T, H]`` token by token, through ``[.., T, I]`` intermediates
(``I`` ~ 3.5 H: gate, up, their product) that dominate a layer's activations at long context. Tiled, the
layer input ``x`` is cut into ``n`` tiles along the sequence and the module runs tile by tile inside one
autograd function (:class:`_RowTiles`) that keeps only ``x`` (which the residual connection keeps anyway);
its backward recomputes one tile at a time with grad and writes that tile's rows of ``dx`` into one
preallocated ``dx``, so at most one tile's ``[T/n, I]`` intermediates exist at a time, in the forward and in
the backward. A module that draws random numbers (dropout: two calls differ) runs each tile under
``torch.utils.checkpoint`` instead, which replays the RNG. Under ``no_grad`` the tiles simply run one after
the other. Each output row is the module of its own input row, so the result and every gradient equal the
untiled module's (up to the summation order of the weight gradient).

The norm whose output is the MLP's input (Llama's ``post_attention_layernorm``) moves inside the MLP's tiles
(:func:`tile_mlp`; found by hooks on a probe run, kept only if the model's output is bitwise unchanged): the
tiles then keep the residual stream, which is the norm's input, and neither the norm's output (the MLP's
input, otherwise kept by the tiles) nor its saved rows exist for the backward.

The norms (RMSNorm, LayerNorm) are row-wise too. Untiled, transformers' RMSNorm saves for its backward the
normalised rows ``x * rsqrt(mean(x^2) + eps)`` in fp32 (for its weight's gradient) and, under bf16, the fp32
upcast of its input: one or two ``[T, H]`` fp32 tensors per norm that nothing else needs. Tiled the same way,
a norm keeps only its input (a view of a tensor that exists anyway: the layer input, or the residual sum that
feeds the second norm) and recomputes the rest one tile at a time in the backward. With fp32 weights that is
``4 H`` bytes per token per norm less (two norms per layer, plus the final norm); under bf16 ``8 H``.
A tiled norm's output, in turn, is kept by the linear layers it feeds (Llama's ``q_proj`` / ``k_proj`` /
``v_proj``, LoRA's ``lora_A``), for their weights' gradients: those linears (found by hooks on a probe run, no
names assumed) keep the norm's input instead and recompute the norm's output in their backward
(:class:`_NormedLinear`), so no ``[T, H]`` norm output waits for the backward at all.

:func:`tile_mlp` patches the ``forward`` of the module found at ``layer.mlp`` of every decoder layer (the
module object itself, so the state dict, hooks, LoRA layers inside it and checkpoints are unchanged):
transformers' Llama, Qwen2, Mistral, Gemma, GPT-2 MLPs and any module of that form, with no per-model code.
:func:`tile_norms` patches every norm that is a direct child of a decoder layer (``input_layernorm``,
``post_attention_layernorm``, Gemma's pre/post feed-forward norms, GPT-2's ``ln_1`` / ``ln_2``) or of the
decoder itself (the final norm): a module whose class name ends in ``Norm`` (``LlamaRMSNorm``,
``nn.LayerNorm``, ...). Norms inside the attention (Qwen3's per-head ``q_norm`` / ``k_norm``) are left alone.
A module that cannot be tiled is refused before anything is changed: one whose output is not a tensor of
the input's shape, one whose rows depend on other tokens, or a mixture of experts (routing statistics and
capacity are per batch).
"""

from __future__ import annotations

import contextlib
import math
import types
import weakref
from typing import List, Optional

import torch
import torch.nn as nn

__all__ = ["tile_mlp", "untile_mlp", "tile_norms", "untile_norms", "CannotTile"]


class CannotTile(ValueError):
    """The model has no MLP / norm this helper can tile (see the message)."""


def _mlps(model: nn.Module) -> List[nn.Module]:
    from .hf import decoder_of

    root = decoder_of(model) or model
    layers = [m for m in root.modules() if isinstance(getattr(m, "mlp", None), nn.Module)]
    if not layers:
        raise CannotTile(f"{type(model).__name__}: no decoder layer with an .mlp module (a mixture-of-experts "
                         "block or another feed-forward layout); the tiled MLP wraps layer.mlp")
    return [layer.mlp for layer in layers]


def _hidden_size(model: nn.Module, mlp: nn.Module) -> int:
    for m in mlp.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
    w = getattr(mlp, "weight", None)  # a norm: its [H] scale
    if isinstance(w, torch.Tensor) and w.dim() == 1:
        return int(w.shape[0])
    cfg = getattr(model, "config", None)
    h = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if not h:
        raise CannotTile(f"{type(mlp).__name__}: cannot tell its hidden size (no nn.Linear, no config.hidden_size)")
    return int(h)


@torch.no_grad()
def _probe(mlp: nn.Module, H: int, where: str) -> bool:
    """Raise :class:`CannotTile` unless ``mlp`` maps rows to rows; returns whether two calls in its training mode
    agree (no dropout or other random draw)."""
    name = type(mlp).__name__
    if any(hasattr(mlp, a) for a in ("experts", "num_experts", "router")):
        raise CannotTile(f"{where} ({name}) is a mixture of experts: its routing (capacity, auxiliary loss) is "
                         "computed over the whole batch, so it is not tiled")
    p = next(mlp.parameters(), None)
    if p is None:
        raise CannotTile(f"{where} ({name}) has no parameters")
    dtype = p.dtype if p.is_floating_point() else torch.float32
    x = torch.randn(1, 6, H, generator=torch.Generator().manual_seed(7), dtype=torch.float32).to(p.device, dtype)
    was = mlp.training
    mlp.eval()
    try:
        y = mlp(x)
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            got = list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise CannotTile(f"{where} ({name}) does not map [.., T, H] -> [.., T, H] (input {list(x.shape)}, "
                             f"output {got}); it cannot be tiled over the sequence")
        tol = 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2
        atol = tol * (1 + y.abs().max().item())
        if not all(torch.allclose(mlp(x[:, s]).float(), y[:, s].float(), rtol=tol, atol=atol)
                   for s in (slice(0, 3), slice(3, 6))):
            raise CannotTile(f"{where} ({name}): an output row depends on other tokens than its own; it cannot "
                             "be tiled over the sequence")
        mlp.train(was)
        return bool(torch.equal(mlp(x), mlp(x)))
    except CannotTile:
        raise
    except Exception as e:  # noqa: BLE001 - a module that fails on a plain [1, T, H] input is not an MLP we know
        raise CannotTile(f"{where} ({name}) fails on a [1, T, H] input ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); it cannot be tiled") from None
    finally:
        mlp.train(was)


def _run_tiles(fn, x: torch.Tensor, n: int) -> torch.Tensor:
    """``cat([fn(t) for t in x.tensor_split(n, dim=-2)], dim=-2)`` written tile by tile into one output: the tiles'
    outputs never exist all at once beside the joined copy (a ``cat`` over a list holds both)."""
    y, rows = None, 0
    for t in x.tensor_split(n, dim=-2):
        yt = fn(t)
        if y is None:
            y = yt.new_empty(*x.shape[:-1], yt.shape[-1])
        y.narrow(-2, rows, t.shape[-2]).copy_(yt)
        rows += t.shape[-2]
    return y


class _RowTiles(torch.autograd.Function):
    """``y = cat(fn(x_i))`` over sequence tiles ``x_i``, keeping only ``x`` for the backward, which recomputes one
    tile at a time and writes its rows of ``dx`` into one preallocated ``dx``; the parameters' gradients are
    summed over the tiles. The backward so holds ``dx`` and one tile: not every tile's gradient at once, as a
    ``torch.utils.checkpoint`` per tile does (the tiles' ``split`` backward joins their gradients into a new
    tensor; measured on the CPU under layer checkpointing, that cost more than the norms' saved rows it
    spared). For modules that draw no random numbers (the probe checks that two calls agree; a module with
    dropout gets a checkpoint per tile, which replays the RNG); the forward's autocast state is restored for
    the recompute."""

    @staticmethod
    def forward(ctx, x, n, fn, *params):
        ctx.fn, ctx.n, ctx.params = fn, n, params
        ctx.amp = [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
        ctx.save_for_backward(x)
        with torch.no_grad():
            return _run_tiles(fn, x, n)

    @staticmethod
    def backward(ctx, gy):
        (x,) = ctx.saved_tensors
        want = [i for i, need in enumerate(ctx.needs_input_grad[3:]) if need]
        ps = [ctx.params[i] for i in want]
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        dps = [None] * len(ctx.params)
        dx_tiles = dx.tensor_split(ctx.n, dim=-2) if dx is not None else None
        for i, (xt, gt) in enumerate(zip(x.tensor_split(ctx.n, dim=-2), gy.tensor_split(ctx.n, dim=-2))):
            with torch.enable_grad(), contextlib.ExitStack() as amp:
                for d, dt in ctx.amp:
                    amp.enter_context(torch.autocast(d, dtype=dt))
                xi = xt.detach().requires_grad_(dx is not None)
                inputs = ([xi] if dx is not None else []) + ps
                grads = list(torch.autograd.grad(ctx.fn(xi), inputs, gt, allow_unused=True))
            if dx is not None:
                dx_tiles[i].copy_(grads.pop(0))
            for j, g in zip(want, grads):
                if g is not None:
                    dps[j] = g if dps[j] is None else dps[j].add_(g)
        return (dx, None, None, *dps)


class _NormedLinear(torch.autograd.Function):
    """``F.linear(y, w, b)`` of a tiled norm's output ``y = norm(x)``, keeping ``x`` (which the norm keeps anyway)
    rather than ``y``. Backward: ``dy = g w``, ``dw = (y^T g)^T`` with ``y`` recomputed from ``x`` exactly as the
    forward made it (same tiles, no random draws: the norm's probe checked that two calls agree),
    ``db = sum_rows g``."""

    @staticmethod
    def forward(ctx, y, x, norm_fn, w, b):
        ctx.norm_fn = norm_fn
        ctx.save_for_backward(x, w)
        return nn.functional.linear(y, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        need_y, _, _, need_w, need_b = ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])
        dy = g2.mm(w).view(*g.shape[:-1], w.shape[1]) if need_y else None
        dw = None
        if need_w:
            with torch.no_grad():
                y = ctx.norm_fn(x)
            dw = y.reshape(-1, y.shape[-1]).t().mm(g2).t()
            del y
        db = g2.sum(0) if need_b else None
        return dy, None, None, dw, db


def _normed_linear_forward(self, y):
    """An ``nn.Linear`` fed by a tiled norm: :class:`_NormedLinear` when ``y`` carries its norm's input and the
    weight trains (no autocast: its casts would sit between the norm and the product), else the plain forward."""
    src = getattr(y, "_lsa_normed", None)
    if (src is None or not torch.is_grad_enabled() or not self.weight.requires_grad
            or torch.is_autocast_enabled(y.device.type)):
        return self._lsa_plain_forward(y)
    x, norm_fn = src
    return _NormedLinear.apply(y, x, norm_fn, self.weight, self.bias)


def _tiled_forward(self, x, *args, **kwargs):
    out = _tiled_output(self, x, *args, **kwargs)
    if (self.__dict__.get("_lsa_feeds_linears") and isinstance(out, torch.Tensor) and out.requires_grad
            and isinstance(x, torch.Tensor) and x.dim() >= 2):
        n = _tile_count(self, x.shape[-2])
        inner = self._lsa_untiled_forward
        out._lsa_normed = (x, inner if n == 1 else (lambda t: _run_tiles(inner, t, n)))
    return out


def _tile_count(mod: nn.Module, T: int) -> int:
    n = mod._lsa_tiles or math.ceil(T / mod._lsa_tile_len)
    return max(1, min(n, T))


def _tiled_output(self, x, *args, **kwargs):
    inner = self._lsa_untiled_forward
    norm = self.__dict__.get("_lsa_norm")  # the norm that feeds this MLP, run inside its tiles
    if norm is not None:
        mlp_forward, norm_forward = inner, norm._lsa_fused_forward

        def inner(t, *a, **k):
            return mlp_forward(norm_forward(t), *a, **k)

    if args or kwargs or not isinstance(x, torch.Tensor) or x.dim() < 2:
        return inner(x, *args, **kwargs)
    n = _tile_count(self, x.shape[-2])
    if n == 1:
        return inner(x)
    if not torch.is_grad_enabled():
        return _run_tiles(inner, x, n)
    if self._lsa_row_function:  # no random draws: one autograd function over the tiles
        params = list(self.parameters()) + (list(norm.parameters()) if norm is not None else [])
        return _RowTiles.apply(x, n, inner, *params)
    from torch.utils.checkpoint import checkpoint  # dropout inside: a checkpoint per tile replays the RNG

    return torch.cat([checkpoint(inner, t, use_reentrant=False) for t in x.tensor_split(n, dim=-2)], dim=-2)


def _tile(modules: List[nn.Module], model: nn.Module, tiles: Optional[int], where: str) -> int:
    if tiles is not None and (isinstance(tiles, bool) or not isinstance(tiles, int) or tiles < 1):
        raise ValueError(f"tiles: expected an int >= 1 or None (one tile per hidden-size tokens), got {tiles!r}")
    sizes, fixed = [], []
    for i, mod in enumerate(modules):
        H = _hidden_size(model, mod)
        sizes.append(H)
        fixed.append(mod._lsa_row_function if "_lsa_untiled_forward" in mod.__dict__ else _probe(mod, H, where.format(i=i)))
    for mod, H, det in zip(modules, sizes, fixed):
        if "_lsa_untiled_forward" not in mod.__dict__:
            mod._lsa_untiled_forward = mod.forward
            mod.forward = types.MethodType(_tiled_forward, mod)
        mod._lsa_tiles, mod._lsa_tile_len, mod._lsa_row_function = tiles, H, det
    return len(modules)


def _untile(modules: List[nn.Module]) -> int:
    n = 0
    for mod in modules:
        if "_lsa_untiled_forward" in mod.__dict__:
            for a in ("forward", "_lsa_untiled_forward", "_lsa_tiles", "_lsa_tile_len", "_lsa_row_function",
                      "_lsa_feeds_linears"):
                mod.__dict__.pop(a, None)
            n += 1
    return n


def _identity_forward(self, x, *args, **kwargs):
    return x


def _feeding_norms(model: nn.Module, ids: torch.Tensor):
    """``({mlp: norm}, output)``: the decoder layers whose MLP input is exactly the output of one of the layer's
    norms, found by running ``model`` on the probe ``ids`` with hooks (no names assumed), and the probe's final
    hidden states; ``({}, None)`` when the probe cannot run the model."""
    return _norm_consumers(model, ids, lambda layer: [layer.mlp])


def _norm_consumers(model: nn.Module, ids: torch.Tensor, candidates):
    """``({module: norm}, output)``: of the modules ``candidates(layer)`` of each decoder layer, those whose input is
    exactly the output of one of the layer's norms (hooks on a probe run of ``model`` on ``ids``), and the probe's
    final hidden states; ``({}, None)`` when the probe cannot run the model."""
    from .decoder import decoder_of, hidden_states

    root = decoder_of(model) or model
    layers = [m for m in root.modules() if isinstance(getattr(m, "mlp", None), nn.Module)]
    outs, feeds, hooks, mods = {}, {}, [], []

    def note_out(mod, _inp, out):
        if isinstance(out, torch.Tensor):
            outs[id(out)] = (weakref.ref(out), mod)

    def note_in(mod, args):
        if args and isinstance(args[0], torch.Tensor):
            ref, norm = outs.get(id(args[0]), (None, None))
            feeds[mod] = norm if ref is not None and ref() is args[0] else None

    for layer in layers:
        hooks += [c.register_forward_hook(note_out) for c in layer.children() if _is_norm(c)]
        mods += candidates(layer)
    hooks += [m.register_forward_pre_hook(note_in) for m in mods]
    try:
        with torch.no_grad():
            out = hidden_states(model, ids)
    except Exception:  # noqa: BLE001 - not a model the probe can run: its modules stay as they are
        return {}, None
    finally:
        for h in hooks:
            h.remove()
    return {m: feeds[m] for m in mods if feeds.get(m) is not None}, out


def _probe_ids(model: nn.Module) -> Optional[torch.Tensor]:
    p = next(model.parameters(), None)
    V = getattr(getattr(model, "config", None), "vocab_size", None)
    if p is None or not V:
        return None
    return torch.randint(0, V, (1, 8), generator=torch.Generator().manual_seed(11)).to(p.device)


def _fuse_norms(model: nn.Module, mlps: List[nn.Module]) -> int:
    """Move the norm that feeds each MLP inside the MLP's tiles (the norm's own forward becomes the identity), when
    the model's output stays bitwise the same; returns the number of norms moved."""
    from .decoder import hidden_states

    ids = _probe_ids(model)
    if ids is None:
        return 0
    was = model.training
    model.eval()
    try:
        found, before = _feeding_norms(model, ids)
        pairs = {m: n for m, n in found.items() if m in mlps and "_lsa_norm" not in m.__dict__}
        if not pairs:
            return 0
        with torch.no_grad():
            for mlp, norm in pairs.items():
                _untile([norm])
                norm._lsa_fused_forward = norm.forward
                norm.forward = types.MethodType(_identity_forward, norm)
                object.__setattr__(mlp, "_lsa_norm", norm)  # a plain attribute: not a submodule of the MLP
            same = torch.equal(hidden_states(model, ids), before)
    finally:
        model.train(was)
    if not same:  # the norm's output feeds something else too: leave the norms where they were
        _unfuse(pairs)
        return 0
    return len(pairs)


def _unfuse(mlps) -> None:
    for mlp in mlps:
        norm = mlp.__dict__.pop("_lsa_norm", None)
        if norm is not None:
            norm.__dict__.pop("forward", None)
            norm.__dict__.pop("_lsa_fused_forward", None)


def tile_mlp(model: nn.Module, tiles: Optional[int] = None) -> int:
    """Run every decoder layer's MLP of ``model`` over ``tiles`` sequence tiles, recomputed in the backward.

    ``tiles``: an int >= 1 (the same count at every length), or None = one tile per ``H`` tokens
    (``ceil(T / H)``, H the hidden size: each tile's ``[T/n, I]`` intermediate is then about ``I/H`` times a
    ``[H, H]`` matrix). The norm whose output is the MLP's input (``post_attention_layernorm`` in Llama,
    ``pre_feedforward_layernorm`` in Gemma 2, ``ln_2`` in GPT-2: found by a probe run, not by name) moves inside
    the tiles, so the tiles keep the norm's input (the residual stream) and neither the norm's output nor its
    saved rows exist for the backward; this is kept only if the model's output stays bitwise the same.
    Returns the number of MLPs wrapped. Raises :class:`CannotTile` (nothing changed) when an MLP cannot be
    tiled. Calling it again changes the tile count; :func:`untile_mlp` undoes it (the moved norms run
    untiled again)."""
    mlps = _mlps(model)
    n = _tile(mlps, model, tiles, "layer {i}'s mlp")
    _fuse_norms(model, mlps)
    return n


def untile_mlp(model: nn.Module) -> int:
    """Undo :func:`tile_mlp`; returns the number of MLPs restored."""
    mlps = _mlps(model)
    _unfuse(mlps)
    return _untile(mlps)


def _is_norm(m: nn.Module) -> bool:
    return type(m).__name__.endswith("Norm")


def _norms(model: nn.Module) -> List[nn.Module]:
    from .hf import decoder_of

    root = decoder_of(model) or model
    layers = [m for m in root.modules() if isinstance(getattr(m, "mlp", None), nn.Module)]
    found = [c for layer in layers for c in layer.children() if _is_norm(c) and "_lsa_fused_forward" not in c.__dict__]
    found += [c for c in root.children() if _is_norm(c)]
    if not found:
        raise CannotTile(f"{type(model).__name__}: no norm module (a child of a decoder layer or of the decoder whose "
                         "class name ends in 'Norm') to tile")
    return found


def tile_norms(model: nn.Module, tiles: Optional[int] = None) -> int:
    """Run every norm of ``model``'s decoder layers (and its final norm) over ``tiles`` sequence tiles, recomputed
    in the backward: each norm then keeps only its input for the backward (module docstring).

    ``tiles`` as for :func:`tile_mlp` (None = one tile per ``H`` tokens). The ``nn.Linear`` layers a norm's output
    feeds directly keep the norm's input instead of its output and recompute the norm in their backward.
    Returns the number of norms wrapped; :class:`CannotTile` (nothing changed) when one cannot be tiled;
    :func:`untile_norms` undoes it."""
    norms = _norms(model)
    n = _tile(norms, model, tiles, "norm {i}")
    _wire_linears(model, norms)
    return n


def _wire_linears(model: nn.Module, norms: List[nn.Module]) -> None:
    """Give the ``nn.Linear`` layers fed directly by one of the tiled ``norms`` the forward that keeps the norm's
    input (:func:`_normed_linear_forward`); norms that draw random numbers are left out."""
    ids = _probe_ids(model)
    if ids is None:
        return
    ours = {n for n in norms if n.__dict__.get("_lsa_row_function")}
    was = model.training
    model.eval()
    try:
        # plain nn.Linear only: a subclass (a quantised linear, ...) may compute something else from its weight
        found, _ = _norm_consumers(model, ids, lambda layer: [m for m in layer.modules() if type(m) is nn.Linear])
    finally:
        model.train(was)
    for lin, norm in found.items():
        if norm not in ours:
            continue
        norm._lsa_feeds_linears = True
        if "_lsa_plain_forward" not in lin.__dict__:
            lin._lsa_plain_forward = lin.forward
            lin.forward = types.MethodType(_normed_linear_forward, lin)


def _unwire_linears(model: nn.Module) -> None:
    from .hf import decoder_of

    for m in (decoder_of(model) or model).modules():
        if "_lsa_plain_forward" in m.__dict__:
            m.__dict__.pop("forward", None)
            m.__dict__.pop("_lsa_plain_forward", None)


def untile_norms(model: nn.Module) -> int:
    """Undo :func:`tile_norms`; returns the number of norms restored."""
    _unwire_linears(model)
    return _untile(_norms(model))
