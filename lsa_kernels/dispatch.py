"""The op boundary shared by every public op: autocast, the backend choice, the vocab-parallel wrap.

    @dispatch.op("input", "linear_weight", "linear_bias")     on a public op: autocast cast / off / finish
    select_backend(opts, weight, device, dtype, targets)      after the checks: backend name or wrapper
    resolve_backend(backend, device, dtype)                   "auto" -> a concrete backend, checked
    autocast_off                                              on autograd Functions' forward / backward

Autocast (like ``F.linear``): under ``torch.autocast(device_type, dtype)`` an op's input(s), weight(s) and
bias(es) (floating, not float64, on an autocast-enabled device type) are cast to the autocast dtype first,
then the op runs with autocast off; its loss and per-token values come back in float32 under autocast (as
torch's loss functions return them), in the first input's dtype otherwise, rounded once from the backends'
fp32 (fp64) accumulation. The Functions' forward and backward run with autocast off too
(:func:`autocast_off`), so a backward called inside an autocast region cannot turn the backends' fp32
accumulations into bf16 GEMMs.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Optional

import torch

from . import _checks, _env
from .options import RunOptions

__all__ = ["op", "select_backend", "resolve_backend", "autocast_off", "no_autocast"]


def resolve_backend(backend: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """Map ``"auto"`` to a concrete backend and check that the choice can run on ``device`` / ``dtype``.

    ``auto``: Triton for CUDA tensors (``reference`` for float64 ones), cpu for CPU tensors."""
    _checks.check_backend(backend)
    if backend == "auto":
        if device.type != "cuda":
            return "cpu"
        if dtype == torch.float64:
            return "reference"
        backend = "triton"
    if backend == "triton":
        if device.type != "cuda" and not _env.interpreting():
            raise ValueError(
                "backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before import); "
                f"got tensors on {device}. Use backend='cpu' or 'auto'."
            )
        if dtype == torch.float64:
            raise ValueError(
                "backend='triton' takes float32, bfloat16 or float16 inputs, got float64 (the kernels have no fp64 "
                "path); use backend='auto' or 'reference' for float64 on CUDA, 'cpu' for CPU tensors"
            )
        if device.type == "cuda":
            from .kernels._common import check_device

            check_device(device)
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    return backend


def select_backend(opts: RunOptions, w: torch.Tensor, device: torch.device, dtype: torch.dtype, targets=(),
                   ignore_index: int = -100):
    """The backend an op runs on (after its checks): :func:`resolve_backend` of ``opts.backend``, then, under
    ``opts.process_group``, that backend wrapped for a vocab-sharded head ``w`` (this rank's rows): the shards
    are exchanged once and the ``targets`` (``(name, tensor or None)`` pairs of global ids) checked against the
    whole vocabulary unless ``opts.check_targets`` is off."""
    be = resolve_backend(opts.backend, device, dtype)
    if opts.process_group is None:
        if opts.vocab_start not in (0, None):
            raise ValueError("vocab_start is only meaningful together with process_group=")
        return be
    from . import backends, distributed
    from .backends.vocab_parallel import VocabParallel

    if be == "reference":
        if w.dtype == torch.float64 and w.device.type == "cuda":
            raise ValueError("a vocab-parallel head cannot take float64 CUDA tensors (the Triton kernels take "
                             "float32, bfloat16 or float16; float64 on CUDA runs only on the non-parallel reference)")
        raise ValueError("backend='reference' cannot run a vocab-parallel head; use 'auto', 'cpu' or 'triton'")
    vocab_start = opts.vocab_start
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be a non-negative int (this rank's first vocab id), got {vocab_start!r}")
    shard = distributed.shard_info(opts.process_group, vocab_start, w.shape[0], w.device)
    if opts.check_targets:
        for name, y in targets:
            if y is not None:
                _checks.check_target_values(name, y, shard.vocab_total, ignore_index)
    return VocabParallel(backends.get(be), shard)


# ------------------------------------------------------------------------------------------------ autocast


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (False for types autocast does not know, e.g. meta)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def autocast_cast(t):
    """``t`` as ``F.linear`` sees it under autocast: a floating (not float64) tensor on a device type with
    autocast enabled cast to that autocast dtype; anything else unchanged."""
    if (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
            and autocast_on(t.device.type)):
        return t.to(torch.get_autocast_dtype(t.device.type))
    return t


def result_dtype(t) -> Optional[torch.dtype]:
    """The dtype of an op's loss / per-token values for its first input ``t`` (before the autocast cast):
    float32 under autocast (float64 stays float64), else ``t``'s dtype; None for a non-tensor (the op's checks
    reject it)."""
    if not isinstance(t, torch.Tensor):
        return None
    if t.dtype != torch.float64 and t.is_floating_point() and autocast_on(t.device.type):
        return torch.float32
    return t.dtype


def finish(out, dtype: Optional[torch.dtype]):
    """``out`` (a tensor, or a NamedTuple of tensors / None / NamedTuples) with its floating tensors in ``dtype``
    (one rounding of the Functions' fp32 / fp64 results; bool and int outputs unchanged)."""
    if dtype is None:
        return out
    if isinstance(out, torch.Tensor):
        return out.to(dtype) if out.is_floating_point() else out
    if isinstance(out, tuple):
        return type(out)(*(None if o is None else finish(o, dtype) for o in out))
    return out


def no_autocast(device: torch.device):
    """Autocast off for ``device``'s type inside the block (no-op when it is not on)."""
    if autocast_on(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _all_autocast_off():
    with contextlib.ExitStack() as stack:
        for dev in ("cpu", "cuda"):
            if torch.is_autocast_enabled(dev):
                stack.enter_context(torch.autocast(dev, enabled=False))
        yield


def autocast_off(fn):
    """Run an autograd Function's forward / backward with autocast disabled (module docstring)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _all_autocast_off():
            return fn(*args, **kwargs)

    return wrapper


def op(*cast: str):
    """Decorator of a public op: the arguments named ``cast`` (the first one sets the result's dtype) are cast as
    ``F.linear`` casts them under autocast, the op's body runs with autocast off, and its result's floating
    tensors are rounded once to the result dtype (module docstring). The op keeps its signature and docstring."""

    def wrap(fn):
        params = list(inspect.signature(fn).parameters)
        where = [(name, params.index(name)) for name in cast]

        @functools.wraps(fn)
        def run(*args, **kwargs):
            args = list(args)
            first = None
            for k, (name, i) in enumerate(where):
                if i < len(args):
                    v = args[i]
                    args[i] = autocast_cast(v)
                elif name in kwargs:
                    v = kwargs[name]
                    kwargs[name] = autocast_cast(v)
                else:
                    continue
                if k == 0:
                    first = v
            dt = result_dtype(first)
            dev = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
            with no_autocast(dev):
                out = fn(*args, **kwargs)
            return finish(out, dt)

        return run

    return wrap
