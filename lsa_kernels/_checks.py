"""Input validation shared by every public op and the reference.

Each check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (right kind, wrong shape /
range) naming the argument and what was expected, before any kernel runs. Range checks on target
values need one reduction over the targets; they run when ``check_targets`` is on (default): on CPU
with a host sync and a precise message, on CUDA as a device-side assert (no sync); they are skipped
inside ``torch.compile`` graphs.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch

from .options import (BACKENDS, CE_WEIGHTINGS, DIVERGENCES, POSITIONS, REDUCTIONS, CrossEntropyArgs, DistillationArgs,
                      DivergenceArgs, LongShortArgs)

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _tensor(name: str, t, *, floating: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")


def _real(name: str, value, *, lo: Optional[float] = None, lo_open: bool = False, hi: Optional[float] = None,
          finite: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if v != v:
        raise ValueError(f"{name} must not be NaN")
    if finite and v in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}")


def _softcap(softcap) -> None:
    if softcap is not None:  # softcap=inf would be tanh(z/inf)·inf = 0·inf = NaN: None turns it off
        if isinstance(softcap, numbers.Real) and float(softcap) == float("inf"):
            raise ValueError("softcap must be finite and > 0, got inf; pass softcap=None for no capping")
        _real("softcap", softcap, lo=0.0, lo_open=True)


def check_chunk_bytes(chunk_bytes) -> None:
    """``chunk_bytes``: None (the default budget) or a positive int."""
    if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int)
                                    or chunk_bytes <= 0):
        raise ValueError(f"chunk_bytes must be a positive int (bytes) or None, got {chunk_bytes!r}")


def index_target(y):
    """Class-index targets of any integer dtype as int64 (what every kernel reads); anything else unchanged,
    for the checks to judge. torch's own losses take int64 and uint8; int32 (numpy's and many tokenizers'
    default) and the other integer types are cast here, once, at the API boundary."""
    if isinstance(y, torch.Tensor) and y.dtype != torch.int64 and _is_integer(y.dtype):
        return y.long()
    return y


def _is_integer(dtype: torch.dtype) -> bool:
    return dtype != torch.bool and not dtype.is_floating_point and not dtype.is_complex


def _same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; put them on one device")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")


def _weight_bias(input_name: str, x: torch.Tensor, w, b) -> None:
    _tensor("linear_weight", w)
    if w.dim() > 2:
        raise ValueError(
            f"linear_weight must be 2-D [V, H], got shape {tuple(w.shape)}: a K-dimensional weight [C, d1, ..., dk, H] "
            "(torch's K-dimensional loss) is not supported; loop over the positions d with linear_weight=W[:, d] and "
            "target=target[:, d], reduction='sum', and divide by the number of counted targets for a mean"
        )
    if w.dim() != 2:
        raise ValueError(f"linear_weight must be 2-D [V, H], got shape {tuple(w.shape)}")
    if x.dim() < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(
            f"{input_name} must have last dim H={w.shape[1]} to match linear_weight [V={w.shape[0]}, H={w.shape[1]}], "
            f"got shape {tuple(x.shape)}"
        )
    if w.shape[1] < 1:
        raise ValueError(f"{input_name} must have last dim (the hidden size H) >= 1, got shape {tuple(x.shape)}")
    if w.shape[0] < 1:
        raise ValueError("linear_weight must have at least one row (V >= 1)")
    _same("linear_weight", w, input_name, x)
    if b is not None:
        _tensor("linear_bias", b)
        if b.shape != (w.shape[0],):
            raise ValueError(f"linear_bias must have shape [V={w.shape[0]}], got {tuple(b.shape)}")
        _same("linear_bias", b, input_name, x)


def _targets(name: str, y, shape, V: int, ignore_index: int, device, check_values: bool) -> None:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64 class indices, got {type(y).__name__}")
    if not _is_integer(y.dtype):
        raise TypeError(f"{name} must hold integer class indices (int64), got {y.dtype}")
    if tuple(y.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (the input's leading dims), got {tuple(y.shape)}")
    if y.device != device:
        raise ValueError(f"{name} is on {y.device} but the input is on {device}")
    if check_values:
        check_target_values(name, y, V, ignore_index)


def check_target_values(name: str, y: torch.Tensor, V: int, ignore_index: int) -> None:
    """Targets in [0, V) or ignore_index. On CPU: one reduction and a clear ValueError naming the first bad
    value. On CUDA: a device-side assert (``torch._assert_async``), so the hot path never waits for the host.
    Skipped under torch.compile."""
    if y.numel() > 0 and not torch.compiler.is_compiling():
        bad = (y != ignore_index) & ((y < 0) | (y >= V))
        if y.device.type == "cuda":
            torch._assert_async(~bad.any(), f"{name} values must be in [0, {V}) or ignore_index={ignore_index}")
            return
        if bool(bad.any()):
            first = y[bad][0].item()
            raise ValueError(
                f"{name} values must be in [0, {V}) or ignore_index={ignore_index}; found {first}"
            )


def check_backend(backend) -> None:
    _choice("backend", backend, BACKENDS)


def check_ce(x, w, y, opts: CrossEntropyArgs, *, bias=None, weight=None, token_weight=None) -> bool:
    """Checks of :func:`lsa_kernels.linear_cross_entropy`; returns whether ``y`` holds probability targets (a
    float tensor of the logits' shape ``[..., V]``, docs/maths.md §11). A given ``ignore_index`` is refused with
    probabilities, as torch does."""
    check_chunk_bytes(opts.chunk_bytes)
    _tensor("input", x)
    _weight_bias("input", x, w, bias)
    _choice("reduction", opts.reduction, REDUCTIONS)
    ignore_index = opts.ignore
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    _real("label_smoothing", opts.label_smoothing, lo=0.0, hi=1.0)
    _real("z_loss", opts.z_loss, lo=0.0)
    _softcap(opts.softcap)
    check_values, parallel = opts.check_values, opts.parallel
    prob_shape = tuple(x.shape[:-1]) + (w.shape[0],)
    prob = isinstance(y, torch.Tensor) and y.is_floating_point()
    if prob:
        # under process_group the last dim is V or this rank's V_r, checked once the shards are known
        # (check_prob_target_shard)
        if tuple(y.shape) != prob_shape and not (parallel and tuple(y.shape[:-1]) == tuple(x.shape[:-1])):
            raise TypeError(
                f"target must hold integer class indices (int64) of shape {tuple(x.shape[:-1])}, or probabilities: "
                f"a float tensor of the logits' shape {prob_shape}; got a {y.dtype} tensor of shape {tuple(y.shape)}"
            )
        if y.dtype not in _FLOATS:
            raise TypeError(f"target probabilities must be float32, bfloat16, float16 or float64, got {y.dtype}")
        if y.device != x.device:
            raise ValueError(f"target is on {y.device} but the input is on {x.device}")
        if opts.ignore_index is not None:
            raise ValueError("ignore_index cannot be given with probability targets (a float target of shape "
                             f"{prob_shape}: no row is ignored, as in torch); leave ignore_index unset")
    else:
        _targets("target", y, x.shape[:-1], w.shape[0], ignore_index, x.device, check_values)
    if weight is not None:
        check_class_weight(weight, None if parallel else w.shape[0], x.device, check_values)
    check_token_weight("token_weight", token_weight, x.shape[:-1], x.device, check_values)
    return prob


def check_per_token(opts: CrossEntropyArgs, linear_path: bool) -> None:
    """``return_lse`` / ``return_entropy`` / ``return_accuracy``: what linear_cross_entropy can return per token
    (all three also under process_group=: docs/maths.md §15)."""
    names = [n for n, on in zip(("return_lse", "return_entropy", "return_accuracy"), opts.extras) if on]
    if names and linear_path:
        raise ValueError(f"{', '.join(names)} cannot be combined with probability targets or with weight= and "
                         "label_smoothing > 0 (that loss is not a per-row CE of one pass); compute them separately")


def check_prob_target_shard(y: torch.Tensor, V: int, V_r: int, vocab_start: int) -> None:
    """A probability target under process_group= (docs/maths.md §15): its last dim is the whole vocabulary's V
    (the full distribution, the same on every rank) or this rank's V_r (its columns [vocab_start, vocab_start +
    V_r)); anything else is refused naming ``target``."""
    if y.shape[-1] not in (V, V_r):
        raise ValueError(
            f"target (probabilities) under process_group= must have last dim V={V} (the full distribution, the "
            f"same on every rank) or V_r={V_r} (this rank's columns {vocab_start}:{vocab_start + V_r}); got shape "
            f"{tuple(y.shape)}"
        )


def check_class_weight(weight, V: Optional[int], device, check_values: bool) -> None:
    """``weight`` (torch's class weights): a float tensor ``[V]``, on the input's device, values >= 0."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight (class weights) must be a torch.Tensor of shape [V], got {type(weight).__name__}")
    if weight.dtype not in _FLOATS:
        raise TypeError(f"weight (class weights) must be a float tensor, got {weight.dtype}")
    if weight.dim() != 1 or (V is not None and weight.shape[0] != V):
        want = "[V]" if V is None else f"[V={V}]"
        raise ValueError(f"weight (class weights) must have shape {want}, one per class, got {tuple(weight.shape)}")
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device} but the input is on {device}")
    if weight.requires_grad and torch.is_grad_enabled():  # as torch's F.cross_entropy: no gradient to class weights
        raise ValueError("weight (class weights) cannot be a tensor that requires grad: the loss is not differentiable with respect to "
                         "it (as in torch's F.cross_entropy); pass weight.detach()")
    if check_values:
        _non_negative("weight", weight)


def check_token_weight(name: str, tw, shape, device, check_values: bool) -> None:
    """A per-row weight (docs/maths.md §11): None, or a float tensor of the rows' ``shape``, values >= 0."""
    if tw is None:
        return
    if not isinstance(tw, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {tuple(shape)}, got {type(tw).__name__}")
    if tw.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a float tensor (one weight per row), got {tw.dtype}")
    if tuple(tw.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (one weight per row), got {tuple(tw.shape)}")
    if tw.device != device:
        raise ValueError(f"{name} is on {tw.device} but the input is on {device}")
    if check_values:
        _non_negative(name, tw)


def _non_negative(name: str, t: torch.Tensor) -> None:
    """Values finite and >= 0 (an infinite weight makes the loss inf·0 = NaN): a ValueError on CPU, a device-side
    assert on CUDA; skipped under torch.compile. The same one reduction (and, on CPU, one host sync) as before
    the finiteness was checked: it runs only when the value checks are on (``check_targets``)."""
    if t.numel() == 0 or torch.compiler.is_compiling():
        return
    bad = ~((t >= 0) & (t < float("inf")))
    if t.device.type == "cuda":
        torch._assert_async(~bad.any(), f"{name} values must be finite and >= 0")
        return
    if bool(bad.any()):
        raise ValueError(f"{name} values must be >= 0 and finite (not NaN or inf); found {t[bad][0].item()}")


def check_divergence(xp, xq, w, opts: DivergenceArgs, *, bias=None, mask=None, token_weight=None) -> None:
    """Checks of :func:`lsa_kernels.linear_divergence`."""
    check_chunk_bytes(opts.chunk_bytes)
    _tensor("input_p", xp)
    _tensor("input_q", xq)
    _weight_bias("input_p", xp, w, bias)
    if xq.shape != xp.shape:
        raise ValueError(f"input_q must have the shape of input_p {tuple(xp.shape)}, got {tuple(xq.shape)}")
    _same("input_q", xq, "input_p", xp)
    _choice("divergence", opts.divergence, DIVERGENCES)
    _real("temperature", opts.temperature, lo=0.0, lo_open=True)
    _choice("detach", opts.detach, (None, "p", "q"))
    _choice("reduction", opts.reduction, REDUCTIONS)
    _softcap(opts.softcap)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor of shape {tuple(xp.shape[:-1])}")
        if tuple(mask.shape) != tuple(xp.shape[:-1]):
            raise ValueError(f"mask must have shape {tuple(xp.shape[:-1])} (input_p's leading dims), got {tuple(mask.shape)}")
        if mask.device != xp.device:
            raise ValueError(f"mask is on {mask.device} but input_p is on {xp.device}")
    check_token_weight("token_weight", token_weight, xp.shape[:-1], xp.device, opts.check_targets)


def check_long_short(hl, hs, w, yl, ys, opts: LongShortArgs, *, bias=None, token_weight_long=None,
                     token_weight_short=None) -> None:
    """Checks of :func:`lsa_kernels.long_short_loss` (every per-view output works under process_group= too:
    docs/maths.md §15)."""
    check_chunk_bytes(opts.chunk_bytes)
    _tensor("hidden_long", hl)
    _tensor("hidden_short", hs)
    if hl.dim() != 3:
        raise ValueError(f"hidden_long must be 3-D [B, T, H], got shape {tuple(hl.shape)}")
    if hs.shape != hl.shape:
        raise ValueError(
            f"hidden_short must have the shape of hidden_long [B, T, H]={tuple(hl.shape)}, got {tuple(hs.shape)}"
        )
    _same("hidden_short", hs, "hidden_long", hl)
    _weight_bias("hidden_long", hl, w, bias)
    T = hl.shape[1]
    l_extra = opts.l_extra
    if isinstance(l_extra, bool) or not isinstance(l_extra, int):
        raise TypeError(f"l_extra must be a Python int, got {type(l_extra).__name__}")
    if not 1 <= l_extra <= T - 1:
        raise ValueError(f"l_extra must be in [1, T-1] = [1, {T - 1}] for views of T={T} rows, got {l_extra}")
    _real("alpha", opts.alpha, lo=0.0)
    _choice("divergence", opts.divergence, DIVERGENCES)
    _real("temperature", opts.temperature, lo=0.0, lo_open=True)
    _choice("detach", opts.detach, (None, "long", "short"))
    _choice("positions", opts.positions, POSITIONS)
    ignore_index = opts.ignore_index
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    _softcap(opts.softcap)
    _real("label_smoothing", opts.label_smoothing, lo=0.0, hi=1.0)
    _real("z_loss", opts.z_loss, lo=0.0)
    check_values = opts.check_values
    _targets("labels_long", yl, hl.shape[:2], w.shape[0], ignore_index, hl.device, check_values)
    _targets("labels_short", ys, hs.shape[:2], w.shape[0], ignore_index, hl.device, check_values)
    check_token_weight("token_weight_long", token_weight_long, hl.shape[:2], hl.device, check_values)
    check_token_weight("token_weight_short", token_weight_short, hs.shape[:2], hl.device, check_values)
    _choice("ce_weighting", opts.ce_weighting, CE_WEIGHTINGS)
    _real("longce_gamma", opts.longce_gamma, lo=0.0, lo_open=True, finite=False)  # inf: no cap on the weight


def check_distillation(xs, ws, xt, wt, target, opts: DistillationArgs, *, student_bias=None, teacher_bias=None,
                       token_weight=None) -> None:
    """Checks of :func:`lsa_kernels.linear_distillation`."""
    bs, bt = student_bias, teacher_bias
    for name, t in (("student_input", xs), ("student_weight", ws), ("teacher_input", xt), ("teacher_weight", wt)):
        _tensor(name, t)
    for name, w, x, xname in (("student_weight", ws, xs, "student_input"), ("teacher_weight", wt, xt, "teacher_input")):
        if w.dim() != 2:
            raise ValueError(f"{name} must be 2-D [V, H], got shape {tuple(w.shape)}")
        if x.dim() < 1 or x.shape[-1] != w.shape[1]:
            raise ValueError(f"{xname} must have last dim H={w.shape[1]} to match {name} [V={w.shape[0]}, "
                             f"H={w.shape[1]}], got shape {tuple(x.shape)}")
        if w.shape[1] < 1:
            raise ValueError(f"{xname} must have last dim (the hidden size H) >= 1, got shape {tuple(x.shape)}")
        if x.device != xs.device or w.device != xs.device:
            raise ValueError(f"{name} / {xname} are on {w.device} / {x.device} but student_input is on {xs.device}")
    if ws.shape[0] < 1:
        raise ValueError("student_weight must have at least one row (V >= 1)")
    if wt.shape[0] != ws.shape[0]:
        raise ValueError(f"teacher_weight has V={wt.shape[0]} rows but student_weight has V={ws.shape[0]}: the "
                         "teacher and the student must share one vocabulary")
    if ws.dtype != xs.dtype:
        raise TypeError(f"student_weight has dtype {ws.dtype} but student_input has {xs.dtype}; they must match")
    if xt.shape[:-1] != xs.shape[:-1]:
        raise ValueError(f"teacher_input must have the rows of student_input {tuple(xs.shape[:-1])} (leading "
                         f"dims), got {tuple(xt.shape[:-1])}")
    for name, b, w in (("student_bias", bs, ws), ("teacher_bias", bt, wt)):
        if b is not None:
            _tensor(name, b)
            if tuple(b.shape) != (w.shape[0],):
                raise ValueError(f"{name} must have shape [V={w.shape[0]}], got {tuple(b.shape)}")
            if b.device != xs.device:
                raise ValueError(f"{name} is on {b.device} but student_input is on {xs.device}")
    if bs is not None and bs.dtype != xs.dtype:
        raise TypeError(f"student_bias has dtype {bs.dtype} but student_input has {xs.dtype}; they must match")
    _choice("divergence", opts.divergence, DIVERGENCES)
    _choice("reduction", opts.reduction, REDUCTIONS)
    _real("temperature", opts.temperature, lo=0.0, lo_open=True)
    for name, v in (("hard_loss_weight", opts.hard_loss_weight), ("soft_loss_weight", opts.soft_loss_weight)):
        _real(name, v, lo=0.0)
    _softcap(opts.softcap)
    ignore_index = opts.ignore_index
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_chunk_bytes(opts.chunk_bytes)
    if target is None:
        if float(opts.hard_loss_weight) > 0:
            raise ValueError(f"hard_loss_weight={opts.hard_loss_weight} needs a target (the student's CE term)")
    else:
        _targets("target", target, xs.shape[:-1], ws.shape[0], ignore_index, xs.device, opts.check_values)
    check_token_weight("token_weight", token_weight, xs.shape[:-1], xs.device, opts.check_targets)
