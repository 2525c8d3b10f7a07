"""Atomic checkpoints: a transformers-loadable model dir + optimizer + RNG + data position.

Layout of ``<out>/``:

    ckpt-000300/            one directory per saved step
        config.json, model.safetensors      (model.save_pretrained: loadable with from_pretrained)
        tokenizer.json                      (copy of the tokenizer the run used, when it is a file)
        optimizer.pt                        (optimizer state_dict)
        trainer.pt                          (step, torch / cuda / python RNG states)
        state.json                          (step, train config; human-readable)
        adapter/                            LoRA runs only: the peft adapter (adapter_config.json,
                                            adapter_model.safetensors); the model files above are then the
                                            MERGED model (base + adapter), loadable alone
    latest                                  text file naming the newest complete ckpt dir

Checkpoints from elsewhere are data, not code: ``optimizer.pt`` and ``trainer.pt`` hold only tensors and
plain Python values and are read with ``torch.load(weights_only=True)``, so a file carrying any other
pickled object (which could run code when unpickled) is refused with :class:`UnsafeCheckpoint`; the model
and adapter weights are safetensors.

A checkpoint is written to ``<out>/.tmp-ckpt-*`` and renamed into place with ``os.replace``; ``latest``
is rewritten the same way afterwards, so a crash at any point leaves the previous checkpoint usable.
The data position is the step counter (sampling is a pure function of seed and step, see data.py).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from typing import Optional

import torch

__all__ = ["save_checkpoint", "latest_checkpoint", "model_dir", "load_trainer_state", "atomic_write_text", "safe_load",
           "UnsafeCheckpoint", "ADAPTER_DIR", "umask_mode"]

ADAPTER_DIR = "adapter"


class UnsafeCheckpoint(ValueError):
    """A checkpoint file holds something other than tensors and plain values (or is unreadable)."""


def safe_load(path: str):
    """``torch.load(path, weights_only=True)``: tensors, dicts, lists, tuples, numbers, strings and None only."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise
    except Exception as e:  # pickle.UnpicklingError for a disallowed global, or a corrupt file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpoint(
            f"refusing to load {path!r}: it is not a plain tensor/state file that loads with "
            f"torch.load(weights_only=True) ({first}); only load checkpoints you trust"
        ) from None


def _save_merged(model, adapter, path: str) -> None:
    """The peft ``adapter`` model merged into a copy of its base, saved with ``save_pretrained``, and the adapter
    itself under ``path/adapter``. The copy costs one model's memory at checkpoint time only; the training model
    is never merged in place (merge + unmerge would perturb the frozen base weights by rounding)."""
    import copy

    adapter.save_pretrained(os.path.join(path, ADAPTER_DIR), safe_serialization=True)
    merged = copy.deepcopy(adapter).merge_and_unload()
    merged.save_pretrained(path, safe_serialization=True)
    del merged


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask sets it, briefly, for every thread)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def umask_mode(path: str, directory: bool = False) -> None:
    """Give ``path`` (made by mkstemp / mkdtemp, which create it 0600 / 0700) the mode ``open`` / ``os.makedirs``
    would have given it under the process umask, like its siblings."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (readers never see half a file); the
    file gets the umask's mode, as ``open(path, "w")`` would give it."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    try:
        umask_mode(tmp)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(out: str, step: int, model, optimizer, config: dict, tokenizer_path: Optional[str] = None,
                    keep: int = 2, state_dict: Optional[dict] = None, adapter=None) -> str:
    """Write ``<out>/ckpt-{step}`` atomically, point ``latest`` at it, keep the newest ``keep`` dirs.

    ``optimizer`` is an optimizer or an already assembled state dict; ``state_dict`` (optional) the model
    weights to save in place of ``model``'s own (FSDP: the gathered full weights); ``adapter`` (optional) the
    peft model of a LoRA run: the adapter is saved under ``adapter/`` and the merged model as the model files."""
    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=out, prefix=".tmp-ckpt-")
    try:
        umask_mode(tmp, directory=True)
        if adapter is not None:
            _save_merged(model, adapter, tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if tokenizer_path and os.path.isfile(tokenizer_path):
            shutil.copyfile(tokenizer_path, os.path.join(tmp, "tokenizer.json"))
        osd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()  # a dict: already assembled
        torch.save(osd, os.path.join(tmp, "optimizer.pt"))
        rng = {
            "step": step,
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python": random.getstate(),
        }
        torch.save(rng, os.path.join(tmp, "trainer.pt"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"step": step, "config": config}, f, indent=1, default=str)
        for root, dirs, files in os.walk(tmp):  # some writers (safetensors) create their files 0600: as siblings
            for n in dirs:
                umask_mode(os.path.join(root, n), directory=True)
            for n in files:
                umask_mode(os.path.join(root, n))
        final = os.path.join(out, f"ckpt-{step:06d}")
        if os.path.exists(final):  # re-saving the same step (e.g. the last one): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(os.path.join(out, "latest"), os.path.basename(final) + "\n")
    old = sorted(d for d in os.listdir(out) if d.startswith("ckpt-") and d != os.path.basename(final))
    for d in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(os.path.join(out, d), ignore_errors=True)
    return final


def latest_checkpoint(out: str) -> Optional[str]:
    """The newest complete checkpoint dir under ``out`` (or ``out`` itself if it is one), else None."""
    if os.path.isfile(os.path.join(out, "trainer.pt")):
        return out
    p = os.path.join(out, "latest")
    if not os.path.isfile(p):
        return None
    d = os.path.join(out, open(p).read().strip())
    return d if os.path.isfile(os.path.join(d, "trainer.pt")) else None


def model_dir(path: str) -> Optional[str]:
    """The transformers model dir behind ``path``: itself, or the latest checkpoint of a run's ``--out`` dir."""
    if os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, "latest")):
        return path
    ckpt = latest_checkpoint(path) if os.path.isdir(path) else None
    return ckpt if ckpt and os.path.isfile(os.path.join(ckpt, "config.json")) else None


def load_trainer_state(ckpt: str, optimizer=None, transform=None, loader=None) -> int:
    """Restore optimizer and RNG states from ``ckpt``; returns the step to continue from.

    ``transform(state_dict) -> state_dict`` is applied to the saved optimizer state before loading it
    (tensor parallelism slices the head's rows out of the full state); ``loader(state_dict)``, when given,
    loads it in place of ``optimizer.load_state_dict`` (FSDP re-shards the full state)."""
    if optimizer is not None:
        osd = safe_load(os.path.join(ckpt, "optimizer.pt"))
        osd = transform(osd) if transform is not None else osd
        (loader or optimizer.load_state_dict)(osd)
    st = safe_load(os.path.join(ckpt, "trainer.pt"))
    torch.set_rng_state(st["torch"])
    if st.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    py = st["python"]  # (version, tuple of ints, gauss_next); a list after some pickle round trips
    random.setstate((py[0], tuple(py[1]), py[2]))
    return int(st["step"])
