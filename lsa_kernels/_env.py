"""Every environment switch the package reads, in one place. Imports nothing from lsa_kernels (any module
may import it without a cycle).

    TRITON_INTERPRET=1    Triton kernels run under the CPU interpreter (read by Triton when a kernel
                          module is imported; the package only asks whether it is set)
    LSA_DISABLE_EXT=1     the cpu backend ignores the compiled kernels (lsa_kernels._C) and runs its
                          ATen path (lsa_kernels._ext.disable() does the same for a block of code)

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
