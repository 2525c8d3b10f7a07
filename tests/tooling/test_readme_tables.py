"""The README's bad-input table is what scripts/bad_input_table.py prints from the test cases (so a changed error
message or a new case cannot leave the README stale), and the script runs from a clean checkout."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.tooling

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_readme_bad_input_table_is_current():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bad_input_table.py")], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    table = out.stdout.rstrip("\n").split("\n")
    assert table[0] == "| wrong input | exception | message |" and len(table) > 20
    assert not any("(none!)" in row for row in table), "a bad input raised nothing"
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().split("\n")
    i = readme.index(table[0])
    j = i
    while j < len(readme) and readme[j].startswith("|"):
        j += 1
    assert readme[i:j] == table, ("README.md's bad-input table is stale: regenerate it with "
                                  "`python scripts/bad_input_table.py` and paste it in")
