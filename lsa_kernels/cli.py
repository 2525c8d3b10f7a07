"""`lsa` command line: train | eval | demo | synthetic | plan | bench | info.

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
    "plan": ("lsa_kernels.train.plan", "plan_main", "a train step's peak memory and the longest context a budget fits"),
}


def _usage() -> str:
    lines = ["usage: lsa <command> [args...]", "", "commands:"]
    for name, (_, _, doc) in COMMANDS.items():
        lines.append(f"  {name:<10} {doc}")
    lines.append(f"  {'bench':<10} kernel benchmarks vs torch / Liger / Cut Cross-Entropy (run from the repo root)")
    lines.append(f"  {'info':<10} versions, backends, whether the C++ extension is built")
    return "\n".join(lines)


# each subcommand's argparse parser (module, function): its --help, and the test that walks every flag of every
# subcommand (tests/tooling/test_cli_bad_input.py); bench's lives in the repository's benchmarks/ package
PARSERS = {
    "train": ("lsa_kernels.train.config", "parser"),
    "eval": ("lsa_kernels.train.evaluate", "build_parser"),
    "demo": ("lsa_kernels.train.demo", "_parser"),
    "synthetic": ("lsa_kernels.studies.synthetic", "build_parser"),
    "plan": ("lsa_kernels.train.plan", "build_parser"),
    "bench": ("benchmarks.__main__", "build_parser"),
    "info": ("lsa_kernels.cli", "info_parser"),
}


def parser_of(cmd: str):
    """The argparse parser of ``lsa <cmd>``."""
    module, func = PARSERS[cmd]
    return getattr(importlib.import_module(module), func)()


def info_parser():
    from ._cli_types import Parser

    return Parser(prog="lsa info", description="versions, backends, whether the C++ extension is built and used")


def _ext_state(_ext) -> str:
    if _env.ext_disabled_by_env():
        return f"disabled (LSA_DISABLE_EXT=1; {'built' if _ext.built() else 'not built either'}): chunked ATen path"
    return "built" if _ext.available() else "not built (chunked ATen path)"


def _info(argv: List[str]) -> int:
    try:
        info_parser().parse_args(argv)
    except SystemExit as e:  # --help (0), or an unknown flag (2, one line on stderr)
        return int(e.code or 0)
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

        print(f"C++ extension lsa_kernels._C: {_ext_state(_ext)}")
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
        return _info(rest)
    if cmd == "bench":
        return _bench(rest)
    if cmd not in COMMANDS:
        print(f"lsa: error: unknown command {cmd!r} (choose from {', '.join([*COMMANDS, 'bench', 'info'])}; see lsa --help)",
              file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[cmd]
    fn = getattr(importlib.import_module(module), func)
    try:
        rc = fn(rest)
    except SystemExit as e:  # a subcommand's argparse: --help (0) or a refused flag (2, its one line on stderr)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
