"""Every bad input to the `lsa` command line gets ONE stderr line naming the flag and what is allowed, exit code 2,
no traceback, and nothing written to --out.

The numeric cases are generated from the argparse definitions: every subcommand's parser (lsa_kernels.cli.PARSERS) is
walked, and each numeric flag is given a value outside the range its ``type=`` helper declares
(lsa_kernels/_cli_types.py). A numeric flag added with a plain ``type=int`` / ``type=float`` fails
test_every_numeric_flag_declares_its_range unless it is listed in UNBOUNDED with the reason. The other cases
(files that are not what they claim, a missing GPU, flags that contradict each other) are listed in
semantic_cases(). scripts/bad_input_table.py prints both lists, with the error each gets, into docs/errors.md."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from typing import List, NamedTuple, Tuple

import pytest

pytestmark = pytest.mark.tooling

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMANDS = ("train", "eval", "demo", "plan", "synthetic", "bench", "info")

# numeric flags with no range on purpose: (command, flag) -> why any number is meaningful
UNBOUNDED = {
    ("train", "--ce-views"): "takes one of its choices 0, 1, 2 (argparse refuses anything else)",
}
# arguments a subcommand needs besides the flag under test (parsing fails on the bad value before they matter)
REQUIRED = {"eval": ["--runs", "model", "--l-train", "8"], "plan": ["--model", "train-step", "--budget", "8GiB"]}


class Case(NamedTuple):
    cmd: str
    args: Tuple[str, ...]  # what the table shows after `lsa <cmd>`
    expect: str  # a piece of the one stderr line
    no_gpu: bool = False  # run as on a machine without a GPU (and without Triton's interpreter)


def _numeric(action) -> bool:
    t = action.type
    return t in (int, float) or getattr(t, "range_text", None) is not None


def numeric_flags(cmd: str):
    """[(flag, action)] of every numeric option of ``lsa cmd``."""
    from lsa_kernels.cli import parser_of

    return [(a.option_strings[-1], a) for a in parser_of(cmd)._actions if a.option_strings and _numeric(a)]


def range_cases() -> List[Case]:
    """One case per numeric flag that declares a range: a value just outside it."""
    out = []
    for cmd in COMMANDS:
        for flag, a in numeric_flags(cmd):
            if getattr(a.type, "range_text", None) is not None:
                out.append(Case(cmd, (flag, a.type.out_of_range), f"argument {flag}: must be {a.type.range_text}"))
    return out


def make_fixtures(d: str) -> None:
    """In ``d``: model/ (a tiny Llama), corrupt/ (its model.safetensors cut short), badconfig/ (config.json not
    JSON), notes.txt (a text file, not a tokenizer), a_file (a plain file where a directory is expected)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
                     ).save_pretrained(os.path.join(d, "model"))
    shutil.copytree(os.path.join(d, "model"), os.path.join(d, "corrupt"))
    with open(os.path.join(d, "corrupt", "model.safetensors"), "r+b") as f:
        f.truncate(100)
    shutil.copytree(os.path.join(d, "model"), os.path.join(d, "badconfig"))
    with open(os.path.join(d, "badconfig", "config.json"), "w") as f:
        f.write("{ this is not json")
    with open(os.path.join(d, "notes.txt"), "w") as f:
        f.write("To be, or not to be, that is the question.\n")
    with open(os.path.join(d, "a_file"), "w") as f:
        f.write("not a directory\n")


def semantic_cases() -> List[Case]:
    """Bad inputs the parser cannot see: files, devices, combinations (run in the directory of make_fixtures)."""
    return [
        Case("train", ("--model", "corrupt"), "cannot load the model in 'corrupt'"),
        Case("eval", ("--runs", "corrupt", "--l-train", "8"),
             "corrupt: cannot read 'corrupt/model.safetensors'"),
        Case("train", ("--model", "badconfig"), "cannot load the model in 'badconfig'"),
        Case("eval", ("--runs", "badconfig", "--l-train", "8"), "badconfig: cannot read the model config"),
        Case("train", ("--tokenizer", "notes.txt"), "cannot read the tokenizer 'notes.txt'"),
        Case("eval", ("--runs", "model", "--tokenizer", "notes.txt", "--l-train", "8"),
             "cannot read the tokenizer 'notes.txt'"),
        Case("train", ("--device", "cuda"), "--device cuda: no CUDA GPU is visible", no_gpu=True),
        Case("eval", ("--runs", "model", "--device", "cuda", "--l-train", "8"), "--device cuda: no CUDA GPU is visible",
             no_gpu=True),
        Case("train", ("--device", "tpu7"), "--device 'tpu7' is not a torch device"),
        Case("train", ("--backend", "triton"), "--backend triton needs a CUDA GPU", no_gpu=True),
        Case("train", ("--offload-activations",), "--offload-activations moves saved activations to pinned host "
             "memory while they wait for the backward: it needs a CUDA device", no_gpu=True),
        Case("train", ("--views", "sequential", "--alpha", "0"), "--views sequential runs the two views one after the other"),
        Case("train", ("--out", "a_file"), "--out 'a_file' is an existing file"),
        Case("eval", ("--runs", "model", "--out", "a_file", "--l-train", "8"), "--out 'a_file' is an existing file"),
        Case("synthetic", ("--out", "a_file"), "--out 'a_file' is an existing file"),
        Case("train", ("--n-head", "3"), "--n-head 3 must divide --n-embd 128"),
        Case("train", ("--n-kv-head", "3"), "--n-kv-head 3 must divide --n-head 4"),
        Case("train", ("--override-on-resume", "steps"), "--override-on-resume needs --resume"),
        Case("train", ("--resume",), "--resume: no checkpoint in"),
        Case("train", ("--divergence", "hellinger"), "argument --divergence: invalid choice: 'hellinger'"),
        Case("info", ("--foo",), "unrecognized arguments: --foo"),
    ]


def _has_out(cmd: str) -> bool:
    return any(f == "--out" for f, _ in [(a.option_strings[-1], a) for a in _parser(cmd)._actions if a.option_strings])


def _parser(cmd: str):
    from lsa_kernels.cli import parser_of

    return parser_of(cmd)


def argv_of(case: Case, out: str) -> List[str]:
    """The full argument list a case runs with: its own args, what the command requires, and --out ``out``
    (unless the case names its own --out) so that the test can see nothing was written."""
    extra = [] if "--runs" in case.args else list(REQUIRED.get(case.cmd, []))
    if _has_out(case.cmd) and "--out" not in case.args:
        extra += ["--out", out]
    return [*case.args, *extra]


@contextlib.contextmanager
def no_gpu():
    """As on a machine without a GPU and without Triton's interpreter."""
    import torch

    saved = (torch.cuda.is_available, torch.cuda.device_count, os.environ.pop("TRITON_INTERPRET", None))
    torch.cuda.is_available, torch.cuda.device_count = (lambda: False), (lambda: 0)
    try:
        yield
    finally:
        torch.cuda.is_available, torch.cuda.device_count = saved[0], saved[1]
        if saved[2] is not None:
            os.environ["TRITON_INTERPRET"] = saved[2]


def run_case(case: Case, out: str) -> Tuple[int, str, str]:
    """Run ``lsa <cmd> ...`` in this process: (exit code, stdout, stderr)."""
    from lsa_kernels.cli import main

    o, e = io.StringIO(), io.StringIO()
    argv = argv_of(case, out)
    gpu = no_gpu() if case.no_gpu else contextlib.nullcontext()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e), gpu:
        if case.cmd == "bench":  # `lsa bench` runs `python -m benchmarks` in a child: call its main here
            from benchmarks.__main__ import main as bench_main

            try:
                rc = bench_main(argv)
            except SystemExit as exc:
                rc = exc.code
        else:
            rc = main([case.cmd, *argv])
    return rc, o.getvalue(), e.getvalue()


# ------------------------------------------------------------------------------------------------ tests
def test_every_numeric_flag_declares_its_range():
    missing, stale = [], [k for k in UNBOUNDED]
    for cmd in COMMANDS:
        for flag, a in numeric_flags(cmd):
            if (cmd, flag) in UNBOUNDED:
                stale.remove((cmd, flag))
                continue
            if getattr(a.type, "range_text", None) is None:
                missing.append(f"lsa {cmd} {flag}")
    assert not missing, ("numeric flags without a range: give them a type= from lsa_kernels/_cli_types.py "
                         f"(positive_int, nonneg_float, ...) or list them in UNBOUNDED with the reason: {missing}")
    assert not stale, f"UNBOUNDED lists flags that no longer exist or are not numeric: {stale}"


def test_a_plain_numeric_flag_is_caught(monkeypatch):
    """The walk sees a numeric flag added without a range (the check above can fail)."""
    import argparse

    from lsa_kernels import cli

    def parser():
        ap = argparse.ArgumentParser()
        ap.add_argument("--new-knob", type=float, default=1.0)
        ap.add_argument("--name", default="x")
        return ap

    monkeypatch.setitem(cli.PARSERS, "train", (__name__, "_test_parser"))
    monkeypatch.setattr(sys.modules[__name__], "_test_parser", parser, raising=False)
    flags = numeric_flags("train")
    assert [f for f, _ in flags] == ["--new-knob"] and getattr(flags[0][1].type, "range_text", None) is None


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("cli")
    make_fixtures(str(d))
    return d


def _check(case: Case, fixtures, monkeypatch, i: int):
    monkeypatch.chdir(fixtures)
    out = f"out_{case.cmd}_{i}"
    rc, stdout, stderr = run_case(case, out)
    lines = stderr.strip().splitlines()
    assert rc == 2, (case, rc, stderr)
    assert len(lines) == 1, (case, stderr)
    assert lines[0].startswith(f"lsa {case.cmd}: error: ") and case.expect in lines[0], (case, lines[0])
    assert "Traceback" not in stderr and stdout == ""
    assert not os.path.exists(out), f"{case}: --out was created"
    return lines[0]


@pytest.mark.parametrize("case", range_cases(), ids=lambda c: f"{c.cmd} {' '.join(c.args)}")
def test_out_of_range_value_refused_in_one_line(case, fixtures, monkeypatch):
    line = _check(case, fixtures, monkeypatch, 0)
    assert case.args[0] in line  # names the flag


@pytest.mark.parametrize("i", range(len(semantic_cases())), ids=lambda i: " ".join(
    (semantic_cases()[i].cmd, *semantic_cases()[i].args)))
def test_semantic_bad_input_refused_in_one_line(i, fixtures, monkeypatch):
    _check(semantic_cases()[i], fixtures, monkeypatch, i)


def test_issue_list_is_covered():
    """The bad inputs a newcomer met are all among the cases (by command and flag)."""
    have = {(c.cmd, c.args[0]) for c in range_cases() + semantic_cases()}
    want = {("train", f) for f in ("--warmup", "--ckpt-every", "--grad-clip", "--stop-after", "--n-layer",
                                   "--temperature", "--n-head", "--device", "--backend", "--out", "--model",
                                   "--tokenizer")}
    want |= {("eval", "--l-train"), ("eval", "--longppl-gap"), ("eval", "--runs"), ("synthetic", "--seeds"),
             ("synthetic", "--steps"), ("info", "--foo")}
    assert want <= have, want - have


@pytest.mark.parametrize("args", [
    ["train", "--warmup", "-1"],
    ["train", "--model", "corrupt", "--out", "o"],
    ["eval", "--runs", "badconfig", "--out", "o"],
    ["info", "--foo"],
])
def test_no_traceback_from_the_installed_entry_point(args, fixtures):
    """The same through a real process: exit 2, one line, no traceback, no --out."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-m", "lsa_kernels.cli", *args], cwd=fixtures, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    assert not (fixtures / "o").exists()
