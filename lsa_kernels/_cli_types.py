"""What every ``lsa`` subcommand's parser shares: argparse ``type=`` helpers that check a number's range while
the command line is parsed (``positive_int``, ``nonneg_int``, ``positive_float``, ...), the parser class whose
errors are one stderr line and exit code 2, and the help formatter that shows each flag's default and range.

A range helper is a callable ``type=`` with two attributes: ``range_text`` (what is allowed, as the error and
the help show it) and ``out_of_range`` (one value outside the range, as a command-line string). A numeric flag
that declares no range this way is an error in the test that walks every parser
(tests/tooling/test_cli_bad_input.py), unless it is listed there as unbounded on purpose.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable, Optional

__all__ = ["bounded", "positive_int", "nonneg_int", "positive_float", "nonneg_float", "finite_float", "fraction",
           "int_at_least", "float_at_least", "Parser", "HelpFormatter", "range_of"]


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def bounded(kind: type, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False,
            name: Optional[str] = None) -> Callable[[str], object]:
    """An argparse ``type=``: parse ``kind`` (int or float; floats must be finite) and check ``lo <= x <= hi``
    (``<`` where ``lo_open`` / ``hi_open``); a value outside is refused with the allowed range."""
    noun = "an integer" if kind is int else "a finite number"
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {_fmt(lo)}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {_fmt(hi)}")
    if lo is not None and hi is not None:
        text = f"{noun} in {'(' if lo_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if hi_open else ']'}"
    else:
        text = f"{noun} {parts[0]}" if parts else noun

    def parse(s: str):
        try:
            v = kind(s)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {text}, got {s!r}") from None
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be {text}, got {s!r}")
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise argparse.ArgumentTypeError(f"must be {text}, got {s!r}")
        if hi is not None and (v >= hi if hi_open else v > hi):
            raise argparse.ArgumentTypeError(f"must be {text}, got {s!r}")
        return v

    if lo is not None:
        bad = lo if lo_open else (lo - 1 if kind is int else lo - 0.5)
    elif hi is not None:
        bad = hi if hi_open else (hi + 1 if kind is int else hi + 0.5)
    else:
        bad = "nan" if kind is float else "x"
    parse.range_text = text
    parse.out_of_range = _fmt(bad) if not isinstance(bad, str) else bad
    parse.__name__ = name or f"{kind.__name__}_range"
    return parse


def int_at_least(n: int) -> Callable[[str], int]:
    return bounded(int, lo=n, name=f"int_at_least_{n}")


def float_at_least(x: float) -> Callable[[str], float]:
    return bounded(float, lo=float(x), name="float_at_least")


positive_int = bounded(int, lo=1, name="positive_int")
nonneg_int = bounded(int, lo=0, name="nonneg_int")
positive_float = bounded(float, lo=0.0, lo_open=True, name="positive_float")
nonneg_float = bounded(float, lo=0.0, name="nonneg_float")
finite_float = bounded(float, name="finite_float")
fraction = bounded(float, lo=0.0, hi=1.0, name="fraction")


def range_of(action: argparse.Action) -> Optional[str]:
    """The allowed range a flag declares through its ``type=`` helper, else None."""
    return getattr(action.type, "range_text", None)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (its examples keep their lines); each flag's help followed by its default
    (when it has a meaningful one and the help does not already say it) and its allowed range."""

    def _get_help_string(self, action):
        h = action.help or ""
        extra = []
        d = action.default
        if ("%(default)" not in h and "default" not in h.lower() and d is not argparse.SUPPRESS
                and not (d is None or d is False or d == "" or d == []) and action.option_strings):
            extra.append("default: %(default)s")
        rng = range_of(action)
        if rng:
            extra.append(rng)
        return f"{h} ({'; '.join(extra)})".strip() if extra else h


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are ONE stderr line (``prog: error: ...``, no usage block) and exit 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        msg = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {msg} (see {self.prog} --help)\n")
