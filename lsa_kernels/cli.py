"""`lsa` command line: train | eval | demo | synthetic | bench | info.

Each subcommand hands its remaining arguments to the module that owns it, so `lsa train --help`
shows that module's own flags.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from typing import List, Optional

from . import _env

COMMANDS = {
    "train": ("lsa_kernels.train.loop", "train_main", "fine-tune a causal LM with the long-short loss"),
    "eval": ("lsa_kernels.train.evaluate", "eval_main", "perplexity vs length and the LSM metric"),
    "demo": ("lsa_kernels.train.demo", "demo_main", "the paper's experiment in miniature: base, RoPE x4, 4-5 arms x seeds, stats (CPU, ~30 min)"),
    "synthetic": ("lsa_kernels.studies.synthetic", "main", "the paper's synthetic study (mean/length prediction)"),
}


def _usage() -> str:
    lines = ["usage: lsa <command> [args...]", "", "commands:"]
    for name, (_, _, doc) in COMMANDS.items():
        lines.append(f"  {name:<10} {doc}")
    lines.append(f"  {'bench':<10} kernel benchmarks vs torch / Liger / Cut Cross-Entropy (run from the repo root)")
    lines.append(f"  {'info':<10} versions, backends, whether the C++ extension is built")
    return "\n".join(lines)


def _info() -> int:
    import torch

    import lsa_kernels

    print(f"lsa_kernels {lsa_kernels.__version__}  torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}  (interpreter: {_env.interpreting()})")
    except Exception as exc:  # pragma: no cover
        print(f"triton unavailable: {exc}")
    try:
        from lsa_kernels import _ext

        print(f"C++ extension lsa_kernels._C: {'built' if _ext.available() else 'not built (chunked ATen path)'}")
    except Exception as exc:  # pragma: no cover
        print(f"C++ extension: {exc}")
    print(f"CUDA: {torch.cuda.is_available()}  default backend: {'triton' if torch.cuda.is_available() else 'cpu'}")
    return 0


def _bench(argv: List[str]) -> int:
    here = os.getcwd()
    if not os.path.isfile(os.path.join(here, "benchmarks", "__main__.py")):
        print("lsa bench: run it from the lsa_kernels repository root (benchmarks/ lives there)", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", "benchmarks", *argv])


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"lsa-kernels {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "info":
        return _info()
    if cmd == "bench":
        return _bench(rest)
    if cmd not in COMMANDS:
        print(f"lsa: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[cmd]
    fn = getattr(importlib.import_module(module), func)
    rc = fn(rest)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
