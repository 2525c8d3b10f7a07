"""Every command written in README.md and docs/*.md runs as written, and every relative link points to a file.

Fenced blocks tagged ```bash / ```sh / ```shell run with bash (``set -eo pipefail``: every command must exit 0);
```python blocks run with the venv's python. The blocks of one document run in order in one temporary working
directory (so a training run's output is there for the evaluation that follows), which holds links to the
repository's sources and copies of the folders a command may write into (``benchmarks/``, ``examples/``), so
nothing is written into the checkout. ``lsa`` and ``python`` resolve to the venv (``.venv/bin`` first on PATH).

``LSA_DOCS_SMOKE=1`` is set: the CLIs cap their work (steps, seeds, samples; ``lsa_kernels/_env.py``) so that
a 200-step recipe runs in seconds, with the same flags, files and checks.

Not run: ```text / ```console / ```json blocks (output, not commands), and a block whose first line is
``# not run by tests: <reason>`` (a reason is required). A fence without a language fails the test: say what it is.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, List, Tuple

import pytest

pytestmark = pytest.mark.tooling

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHELL = ("bash", "sh", "shell")
RUN = SHELL + ("python",)
NOT_RUN = ("text", "console", "json", "markdown", "md", "bibtex", "yaml", "toml", "cff", "ini", "diff", "cpp", "c")
MARKER = "# not run by tests:"
# folders a documented command may write into: copied per document; the other sources are linked. Not there:
# the install files (a stray `make` / `pip install -e .` finds nothing to build) and outputs
COPIED = ("benchmarks", "examples")
NOT_LINKED = ("runs", "build", "dist", "out", "__pycache__", "Makefile", "setup.py", "setup.cfg", "pyproject.toml")
# commands that install or run the whole suite: never run here, whatever the block says
INSTALLS = re.compile(r"(^|[;&|(]\s*|\s)(make|pip3?|uv|conda)(\s|$)|-m\s+pip\b|\bpytest\b")
BLOCK_TIMEOUT = 300


def documents() -> List[str]:
    docs = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    return [d for d in docs if os.path.isfile(d)]


@dataclass
class Block:
    doc: str   # path relative to ROOT
    line: int  # 1-based line of the opening fence
    lang: str
    body: str

    @property
    def first(self) -> str:
        return next((s.strip() for s in self.body.splitlines() if s.strip()), "")

    @property
    def skip_reason(self):
        """None when the block runs; the reason ("" when the marker has none) when it is marked."""
        if self.first.lower().startswith(MARKER):
            return self.first[len(MARKER):].strip()
        return None

    @property
    def runs(self) -> bool:
        return self.lang in RUN and self.skip_reason is None

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})\s*([\w+-]*)")


def blocks(path: str) -> List[Block]:
    rel = os.path.relpath(path, ROOT)
    out, lines, i = [], open(path, encoding="utf-8").read().split("\n"), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m.group(1)), m.group(2), m.group(3).lower()
        body, j = [], i + 1
        while j < len(lines) and not re.match(rf"^ {{0,3}}{fence[0]}{{{len(fence)},}}\s*$", lines[j]):
            body.append(lines[j][indent:] if lines[j][:indent].isspace() else lines[j])
            j += 1
        out.append(Block(rel, i + 1, lang, "\n".join(body) + "\n"))
        i = j + 1
    return out


ALL = [b for d in documents() for b in blocks(d)]
RUNNABLE = [b for b in ALL if b.runs]


def test_the_docs_have_commands_to_run():
    docs = {b.doc for b in RUNNABLE}
    assert "README.md" in docs and "docs/training.md" in docs, sorted(docs)


@pytest.mark.parametrize("block", ALL, ids=[b.id for b in ALL])
def test_every_fence_says_what_it_is(block):
    """A fence names its language (so a command cannot escape the runner by being untagged), and a block kept
    out of the run says why."""
    assert block.lang, (f"{block.id}: fenced block without a language: tag it ```bash / ```python (run here) or "
                        "```text (not run)")
    assert block.lang in RUN or block.lang in NOT_RUN, f"{block.id}: unknown fence language {block.lang!r}"
    reason = block.skip_reason
    assert reason is None or len(reason) >= 10, f"{block.id}: '{MARKER}' needs a reason after the colon"


# ---------------------------------------------------------------- running the blocks, in order, per document

def _workdir(tmp: str) -> str:
    for name in os.listdir(ROOT):
        if name in NOT_LINKED or name.startswith(".") and name != ".venv":  # .venv/bin/python as written works
            continue
        src, dst = os.path.join(ROOT, name), os.path.join(tmp, name)
        if name in COPIED:
            shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            os.symlink(src, dst)
    return tmp


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.path.join(ROOT, ".venv", "bin") + os.pathsep + env.get("PATH", "")
    env.update(LSA_DOCS_SMOKE="1", OMP_NUM_THREADS="1", MPLBACKEND="Agg", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPATH", None)
    return env


def _installs(block: Block) -> List[str]:
    code = [s.split(" #", 1)[0] for s in block.body.splitlines() if not s.lstrip().startswith("#")]
    return [s.strip() for s in code if INSTALLS.search(s)]


def _run(block: Block, cwd: str) -> Tuple[int, str]:
    found = _installs(block)
    if found:
        pytest.fail(f"{block.id}: {found[0]!r} installs or runs the test suite: the docs test never runs it; put "
                    f"'{MARKER} <reason>' as the block's first line", pytrace=False)
    if block.lang in SHELL:
        cmd = ["bash", "-c", "set -eo pipefail\n" + block.body]
    else:
        path = os.path.join(cwd, f"_snippet_{block.line}.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(block.body)
        cmd = [os.path.join(ROOT, ".venv", "bin", "python") if os.path.isdir(os.path.join(ROOT, ".venv"))
               else sys.executable, path]
    p = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
    return p.returncode, (p.stdout[-3000:] + "\n--- stderr ---\n" + p.stderr[-6000:])


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """doc -> [working dir, index in RUNNABLE of the doc's blocks already run]"""
    return {}


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_documented_commands_run(block, workdirs, tmp_path_factory):
    mine = [b for b in RUNNABLE if b.doc == block.doc]
    k = mine.index(block)
    if block.doc not in workdirs:
        workdirs[block.doc] = [_workdir(str(tmp_path_factory.mktemp(block.doc.replace("/", "_")))), 0]
    state = workdirs[block.doc]
    for earlier in mine[state[1]:k]:  # the blocks this one may depend on (when selected alone)
        rc, log = _run(earlier, state[0])
        assert rc == 0, f"{earlier.id} (run before {block.id}) exited {rc}\n{earlier.body}\n{log}"
    state[1] = k + 1
    rc, log = _run(block, state[0])
    assert rc == 0, f"{block.id} exited {rc}:\n{block.body}\n{log}"


# ---------------------------------------------------------------- links

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _links(path: str):
    text = open(path, encoding="utf-8").read()
    text = re.sub(r"(?ms)^ {0,3}(`{3,}|~{3,}).*?^ {0,3}\1\s*$", "", text)  # not inside code blocks
    text = re.sub(r"`[^`\n]*`", "", text)                                   # nor inline code
    for m in LINK.finditer(text):
        yield m.group(1)


def _slug(heading: str) -> str:
    s = re.sub(r"[`*_\[\]()]", "", heading.strip().lower())
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _anchors(path: str) -> set:
    text = open(path, encoding="utf-8").read()
    text = re.sub(r"(?ms)^ {0,3}(`{3,}|~{3,}).*?^ {0,3}\1\s*$", "", text)
    return {_slug(m.group(1)) for m in re.finditer(r"(?m)^#{1,6}\s+(.*?)\s*#*\s*$", text)}


@pytest.mark.parametrize("doc", documents(), ids=lambda d: os.path.relpath(d, ROOT))
def test_relative_links_and_images_exist(doc):
    bad = []
    for target in _links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path, _, frag = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
        if not os.path.exists(dest):
            bad.append(f"{target} (no file {os.path.relpath(dest, ROOT)})")
        elif frag and dest.endswith(".md") and frag.lower() not in _anchors(dest):
            bad.append(f"{target} (no heading #{frag} in {os.path.relpath(dest, ROOT)})")
    assert not bad, f"{os.path.relpath(doc, ROOT)}: broken links: " + "; ".join(bad)


def test_install_and_test_commands_are_never_run():
    b = Block("x.md", 1, "bash", "make demo    # the demo\nlsa info\n")
    assert _installs(b) == ["make demo"]
    assert _installs(Block("x.md", 1, "bash", "python -m pip install -e .\ncd x && pip install y\n")) == [
        "python -m pip install -e .", "cd x && pip install y"]
    assert _installs(Block("x.md", 1, "bash", "lsa train --steps 2   # not make, no pip\nlsa eval --runs r\n")) == []


def test_the_link_check_sees_a_missing_file(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("see ![plot](missing.png) and [ok](x.md) and `[not a link](nowhere)`\n")
    assert list(_links(str(doc))) == ["missing.png", "x.md"]


def test_smoke_caps_lower_only_under_the_switch(monkeypatch, capsys):
    import argparse

    from lsa_kernels import _env

    ns = argparse.Namespace(steps=800, batch_size=1, stop_after=0)
    monkeypatch.delenv("LSA_DOCS_SMOKE", raising=False)
    _env.smoke_caps(ns, "lsa train", steps=2, batch_size=2, stop_after=1)
    assert (ns.steps, ns.batch_size, ns.stop_after) == (800, 1, 0) and capsys.readouterr().err == ""
    monkeypatch.setenv("LSA_DOCS_SMOKE", "1")
    _env.smoke_caps(ns, "lsa train", steps=2, batch_size=2, stop_after=1)
    assert (ns.steps, ns.batch_size, ns.stop_after) == (2, 1, 0)  # only values above a cap change
    assert capsys.readouterr().err == "lsa train: LSA_DOCS_SMOKE is set: --steps 800 -> 2\n"
