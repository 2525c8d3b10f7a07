"""The package's import graph: no cycles, no private name used across modules, every module importable alone.

An AST walk over ``lsa_kernels/`` collects every import of a package module — at module level, inside
functions (lazy imports) and under ``if TYPE_CHECKING:`` alike — as an edge ``importer -> imported``. A cycle
in that graph is a failure (printed as ``a -> b -> ... -> a``). So is an ``_``-prefixed name taken from
another package module, by ``from m import _name`` or by ``m._name`` on an imported package module
(underscore modules such as ``_checks`` are private to the package, not to a module, and may be imported).
Each module is then imported in one subprocess, with every ``lsa_kernels`` module dropped from
``sys.modules`` before each import, so that a module that only imports in some order fails.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "lsa_kernels"

#: edges allowed to remain, each with its reason (none: every cycle fails); every entry must still exist
ALLOWED_EDGES: dict[tuple[str, str], str] = {}

#: (importing module, imported module, name) private names allowed across modules, each with its reason (none)
ALLOWED_PRIVATE: dict[tuple[str, str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}
#: compiled extension modules (setup.py's Extension names): modules, whether built here or not
EXTENSIONS = set(re.findall(r"Extension\(\s*[\"'](lsa_kernels\.[\w.]+)[\"']", (ROOT / "setup.py").read_text()))


def _is_package(mod: str) -> bool:
    return MODULES[mod].name == "__init__.py"


def _resolve(importer: str, level: int, module: str | None) -> str | None:
    """The absolute name of ``from <level dots><module> import ...`` inside ``importer``."""
    if level == 0:
        return module
    base = importer.split(".") if _is_package(importer) else importer.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _walk(mod: str):
    """(edges {imported: line}, private uses [(imported, name, line)]) of one module."""
    tree = ast.parse(MODULES[mod].read_text(encoding="utf-8"), filename=str(MODULES[mod]))
    edges: dict[str, int] = {}
    private: list[tuple[str, str, int]] = []
    bound: dict[str, str] = {}  # local name -> package module it refers to

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES:
                    edges.setdefault(a.name, node.lineno)
                    bound[a.asname or a.name.split(".")[0]] = a.asname and a.name or a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            src = _resolve(mod, node.level, node.module)
            if src is None or not (src == "lsa_kernels" or src.startswith("lsa_kernels.")):
                continue
            for a in node.names:
                sub = f"{src}.{a.name}"
                if sub in EXTENSIONS:  # the compiled extension: a leaf module
                    continue
                if sub in MODULES:  # a submodule: the edge goes to it, and the name is not private to a module
                    edges.setdefault(sub, node.lineno)
                    bound[a.asname or a.name] = sub
                    continue
                if src in MODULES:
                    edges.setdefault(src, node.lineno)
                if a.name.startswith("_") and not a.name.startswith("__"):
                    private.append((src, a.name, node.lineno))
    for node in ast.walk(tree):  # m._name on an imported package module
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            target = bound[node.value.id]
            if f"{target}.{node.attr}" not in MODULES and target in MODULES:
                private.append((target, node.attr, node.lineno))
    edges.pop(mod, None)
    return edges, private


GRAPH = {m: _walk(m) for m in MODULES}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan), as a path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    out = []
    for comp in comps:  # a shortest path from the component's first module back to itself
        start, members = comp[0], set(comp)
        prev = {start: None}
        queue = [start]
        found = None
        while queue and found is None:
            v = queue.pop(0)
            for w in sorted(edges.get(v, ())):
                if w == start:
                    found = v
                    break
                if w in members and w not in prev:
                    prev[w] = v
                    queue.append(w)
        path = [start]
        v = found
        while v is not None and v != start:
            path.insert(1, v)
            v = prev[v]
        out.append(path + [start])
    return out


def test_the_walk_sees_the_package():
    """The walk finds the modules and the arrows it should (a broken walk would pass every check below)."""
    assert "lsa_kernels.functional" in MODULES and "lsa_kernels.backends.contract" in MODULES
    assert "lsa_kernels.options" in GRAPH["lsa_kernels._checks"][0]  # a relative module-level import
    assert EXTENSIONS == {"lsa_kernels._C"}
    assert "lsa_kernels.kernels" in GRAPH["lsa_kernels.backends.triton"][0] or any(
        m.startswith("lsa_kernels.kernels") for m in GRAPH["lsa_kernels.backends.triton"][0])
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    edges = {m: {t for t in e if (m, t) not in ALLOWED_EDGES} for m, (e, _) in GRAPH.items()}
    cycles = _cycles(edges)
    lines = []
    for c in cycles:
        hops = " -> ".join(f"{a} (line {GRAPH[a][0][b]})" for a, b in zip(c, c[1:]))
        lines.append(f"{hops} -> {c[-1]}")
    assert not cycles, "import cycles in lsa_kernels/:\n" + "\n".join(lines)


def test_allow_lists_are_current():
    for (a, b), why in ALLOWED_EDGES.items():
        assert b in GRAPH[a][0], f"allowed edge {a} -> {b} ({why}) no longer exists: remove it from ALLOWED_EDGES"
    uses = {(m, src, name) for m, (_, p) in GRAPH.items() for src, name, _ in p}
    for key, why in ALLOWED_PRIVATE.items():
        assert key in uses, f"allowed private use {key} ({why}) no longer exists: remove it from ALLOWED_PRIVATE"


def test_no_private_name_across_modules():
    bad = [f"{m}:{line}: {name} from {src}" for m, (_, p) in GRAPH.items() for src, name, line in p
           if (m, src, name) not in ALLOWED_PRIVATE]
    assert not bad, ("_-prefixed names used outside their module (make them public within the package, or "
                     "move the helper):\n" + "\n".join(sorted(bad)))


def test_every_module_imports_alone():
    """Each module imported from a clean lsa_kernels state (torch stays loaded: only the package is dropped)."""
    script = (
        "import importlib, json, sys, traceback\n"
        "import torch\n"
        "bad = {}\n"
        "for name in json.loads(sys.argv[1]):\n"
        "    for m in [k for k in sys.modules if k == 'lsa_kernels' or k.startswith('lsa_kernels.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as e:\n"
        "        if e.name and not e.name.startswith('lsa_kernels'):\n"
        "            continue  # an optional dependency that is not installed here\n"
        "        bad[name] = traceback.format_exc(limit=-3)\n"
        "    except Exception:\n"
        "        bad[name] = traceback.format_exc(limit=-3)\n"
        "print(json.dumps(bad))\n"
    )
    names = sorted(MODULES)
    res = subprocess.run([sys.executable, "-c", script, json.dumps(names)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    bad = json.loads(res.stdout.strip().splitlines()[-1])
    assert not bad, "modules that fail to import alone:\n" + "\n".join(f"{k}:\n{v}" for k, v in bad.items())


if __name__ == "__main__":  # print the graph's problems without pytest
    sys.exit(pytest.main([__file__, "-q"]))
