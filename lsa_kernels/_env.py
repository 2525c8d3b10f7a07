"""Every environment switch the package reads, in one place. Imports nothing from lsa_kernels (any module
may import it without a cycle).

    TRITON_INTERPRET=1    Triton kernels run under the CPU interpreter (read by Triton when a kernel
                          module is imported; the package only asks whether it is set)
    LSA_DISABLE_EXT=1     the cpu backend ignores the compiled kernels (lsa_kernels._C) and runs its
                          ATen path (lsa_kernels._ext.disable() does the same for a block of code)
    LSA_DOCS_SMOKE=1      the CLIs (lsa train / eval / demo / synthetic) cap steps, seeds and samples, saying so
                          on stderr: the documented commands run in seconds under the docs test

Build-time switches (setup.py: ``LSA_NO_EXT=1`` skips building lsa_kernels._C, ``LSA_NATIVE``) and the
test-suite switches (tests/README.md) are not read by the package.
"""

from __future__ import annotations

import os


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def ext_disabled_by_env() -> bool:
    """True when ``LSA_DISABLE_EXT`` is set to anything but "" or "0"."""
    return _flag("LSA_DISABLE_EXT")


def docs_smoke() -> bool:
    """True when ``LSA_DOCS_SMOKE`` is set to anything but "" or "0": the CLIs cap their work (see
    :func:`smoke_caps`) so that the commands written in README.md and docs/ run in seconds under
    tests/tooling/test_docs_commands.py, with the same flags, files and checks."""
    return _flag("LSA_DOCS_SMOKE")


def smoke_caps(args, prog: str, **caps) -> None:
    """Under ``LSA_DOCS_SMOKE``, lower each attribute of the parsed ``args`` named in ``caps`` to at most its cap,
    and say so in one line on stderr; otherwise do nothing."""
    if not docs_smoke():
        return
    import sys

    changed = []
    for name, cap in caps.items():
        v = getattr(args, name)
        if isinstance(v, (int, float)) and v > cap:
            setattr(args, name, cap)
            changed.append(f"--{name.replace('_', '-')} {v} -> {cap}")
    if changed:
        print(f"{prog}: LSA_DOCS_SMOKE is set: {', '.join(changed)}", file=sys.stderr)
