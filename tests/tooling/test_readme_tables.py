"""docs/errors.md is what scripts/bad_input_table.py prints from the test cases (the Python API's bad inputs and the
command line's), so a changed error message or a new case cannot leave it stale, and the script runs from a clean
checkout."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.tooling

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ERRORS = os.path.join(ROOT, "docs", "errors.md")


@pytest.fixture(scope="module")
def generated():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bad_input_table.py")], capture_output=True,
                         text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _table(text: str, header: str):
    lines = text.split("\n")
    i = lines.index(header)
    j = i
    while j < len(lines) and lines[j].startswith("|"):
        j += 1
    return lines[i:j]


def test_errors_page_is_current(generated):
    api = _table(generated, "| wrong input | exception | message |")
    cli = _table(generated, "| command | exit | stderr |")
    assert len(api) > 20 and len(cli) > 20
    assert not any("(none!)" in row for row in api), "a bad input raised nothing"
    assert all(row.split(" | ")[1] == "2" for row in cli[2:]), "a bad command line did not exit with 2"
    assert not any("Traceback" in row or "(nothing!)" in row for row in cli)
    with open(ERRORS, encoding="utf-8") as f:
        page = f.read()
    assert page == generated, ("docs/errors.md is stale: regenerate it with "
                               "`python scripts/bad_input_table.py > docs/errors.md`")


def test_cli_table_covers_every_generated_case(generated):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import test_cli_bad_input as T

    cli = _table(generated, "| command | exit | stderr |")[2:]
    shown = [row.split(" | ")[0].lstrip("| ").strip("`") for row in cli]
    want = [" ".join(("lsa", c.cmd, *c.args)) + (" (no GPU)" if c.no_gpu else "") for c in T.range_cases() + T.semantic_cases()]
    assert shown == want
