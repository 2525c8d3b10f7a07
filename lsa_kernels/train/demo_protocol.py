"""The demo's protocol: its arms and the defaults of each kind of data (docs/demo.md: "The recall testbed" and
"The Shakespeare control")."""

from __future__ import annotations

import math
from typing import Dict

# the arms: TrainConfig fields that differ between them (the rest at TrainConfig's defaults)
ARMS: Dict[str, dict] = {
    "ce1": {"alpha": 0.0, "ce_views": 1, "divergence": "sce"},
    "ce2": {"alpha": 0.0, "ce_views": 2, "divergence": "sce"},
    "sce": {"alpha": 0.1, "ce_views": 0, "divergence": "sce"},
    "symkl": {"alpha": 0.1, "ce_views": 0, "divergence": "sym_kl"},
    "longce": {"alpha": 0.0, "ce_views": 2, "divergence": "sce", "ce_weighting": "longce", "longce_gamma": 5.0},
    # the recall testbed's two further arms: sym_kl at a strength where the term acts, and sym_kl on the last
    # pair of each window only (the pairing of the LSM metric: the short view keeps half to all of the context)
    "symkl@1": {"alpha": 1.0, "ce_views": 0, "divergence": "sym_kl"},
    "symkl-last": {"alpha": 1.0, "ce_views": 0, "divergence": "sym_kl", "positions": "last"},
}
DEFAULT_SEEDS = 5
TEXT_ARMS = ("ce1", "ce2", "sce", "symkl", "longce")
RECALL_ARMS = ("ce1", "ce2", "sce", "symkl", "symkl@1", "symkl-last")
# the data each demo runs on, and the defaults that differ between them (docs/demo.md)
MODE_DEFAULTS = {
    "recall": dict(arms=RECALL_ARMS, seeds=4, rope_scaling="yarn", rope_factor=16.0, l_train=256, steps=60,
                   batch_size=8, lengths=[1, 2, 4], n_windows=64, lsm_samples=256),
    "text": dict(arms=TEXT_ARMS, seeds=DEFAULT_SEEDS, rope_scaling="linear", rope_factor=4.0, l_train=None,
                 steps=150, batch_size=4, lengths=[1, 2, 4], n_windows=16, lsm_samples=64),
}
QUICK = dict(seeds=1, steps=20, n_windows=32, lsm_samples=64)
_DIVERGENCES = {"sce": "sce", "symkl": "sym_kl", "sym_kl": "sym_kl", "kl": "kl", "kl_reverse": "kl_reverse", "js": "js"}
LSM_DIVERGENCES = ("sce", "sym_kl")
# config fields that do not change what a run computes (a finished run with the rest equal is reused)
NOT_RESULTS = ("out", "quiet", "resume", "ckpt_every", "stop_after", "device")


def parse_arm(spec: str):
    """``NAME@ALPHA`` (``sce@0.5``, ``symkl@1``) -> (label, TrainConfig fields); ConfigError if malformed."""
    from .config import ConfigError

    name, sep, alpha = spec.partition("@")
    try:
        a = float(alpha)
    except ValueError:
        a = math.nan
    if name in ARMS and name not in _DIVERGENCES:
        raise ConfigError(f"--extra-arms: {spec!r}: {name} is an arm of the protocol (--arms ... {name}), not NAME@ALPHA")
    if not sep or name not in _DIVERGENCES or not (math.isfinite(a) and a > 0):
        raise ConfigError(f"--extra-arms: {spec!r} is not NAME@ALPHA with NAME one of {', '.join(_DIVERGENCES)} "
                          "and ALPHA > 0 (e.g. sce@0.5)")
    return f"{name}@{a:g}", {"alpha": a, "ce_views": 0, "divergence": _DIVERGENCES[name]}


def fill_defaults(a) -> None:
    """Every option left unset takes its ``--data`` default (:data:`MODE_DEFAULTS`, then :data:`QUICK`)."""
    for k, v in dict(MODE_DEFAULTS[a.data], **(QUICK if a.quick else {})).items():
        if getattr(a, k, None) is None:
            setattr(a, k, list(v) if isinstance(v, (list, tuple)) else v)
