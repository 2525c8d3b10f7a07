"""Hand-planted bugs at the op boundary (lsa_kernels/dispatch.py, lsa_kernels/options.py) that a line-level
mutation tool does not make: swapped option fields, a dropped autocast cast, a lost result dtype. Each one is
applied to a scratch copy of the package and the tests that should notice run there; every mutant must die.

    python tests/mutation/planted.py                 # every mutant (tests/mutation/run.sh planted)
    python tests/mutation/planted.py swap_ls_z detach_map   # some of them, by name
    python tests/mutation/planted.py --list

The copy is the working tree's lsa_kernels/ (its built extension included) and tests/; the tests run with this
interpreter from inside the copy (PYTHONPATH = the copy, LSA_TEST_BACKENDS=cpu, OMP_NUM_THREADS=1, under
``nice``). Prints one line per mutant (KILLED / SURVIVED, its name, what it changes) and exits 1 if one survived
(or, for the ones listed in EQUIVALENT, run only by name, if one was killed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
AUTOCAST = "tests/api/test_autocast.py"
FORMULAS = "tests/api/test_module_formulas.py"
BAD = "tests/api/test_bad_input.py"
LS_OPTIONS = "tests/api/test_long_short.py::test_cpu_fp32_every_option"

#: name -> (file, exact text, replacement, what it breaks, test selection)
MUTANTS = {
    "swap_ls_z": (
        "options.py",
        "label_smoothing=float(label_smoothing), z_loss=float(z_loss)",
        "label_smoothing=float(z_loss), z_loss=float(label_smoothing)",
        "the backends' CEOptions gets label_smoothing and z_loss swapped",
        [FORMULAS, LS_OPTIONS, "tests/api/test_linear_cross_entropy.py::test_matches_reference"],
    ),
    "detach_map": (
        "options.py",
        '{None: None, "long": "p", "short": "q"}',
        '{None: None, "long": "q", "short": "p"}',
        "long_short_loss(detach='long') stops the gradient of the short view and vice versa",
        [FORMULAS, LS_OPTIONS],
    ),
    "swap_entropy_argmax": (
        "options.py",
        "entropy=self.extras[1], argmax=self.extras[2]",
        "entropy=self.extras[2], argmax=self.extras[1]",
        "long_short_loss's return_entropy / return_accuracy requests swapped",
        ["tests/api/test_per_view.py", "-k", "entropy_alone or accuracy_ignored"],
    ),
    "grad_p_q": (
        "options.py",
        'return self.detach != "p"',
        'return self.detach != "q"',
        "PairOptions.grad_p answers for the other view",
        [FORMULAS, LS_OPTIONS],
    ),
    "ignore_default": (
        "options.py",
        "return IGNORE_INDEX if self.ignore_index is None else self.ignore_index",
        "return IGNORE_INDEX",
        "linear_cross_entropy ignores a given ignore_index",
        ["tests/api/test_accuracy.py", "-k", "ignore_index_a_real_token"],
    ),
    "no_autocast_cast": (
        "dispatch.py",
        "                    args[i] = autocast_cast(v)\n",
        "                    args[i] = v\n",
        "a positional input / weight / bias is not cast to the autocast dtype (F.linear casts it)",
        [AUTOCAST],
    ),
    "no_autocast_cast_kw": (
        "dispatch.py",
        "                    kwargs[name] = autocast_cast(v)\n",
        "                    kwargs[name] = v\n",
        "a keyword input / weight / bias is not cast to the autocast dtype",
        [AUTOCAST],
    ),
    "no_fp32_result": (
        "dispatch.py",
        "    if t.dtype != torch.float64 and t.is_floating_point() and autocast_on(t.device.type):\n"
        "        return torch.float32\n",
        "",
        "under autocast the loss comes back in the input's dtype, not float32",
        [AUTOCAST],
    ),
    "vocab_start_unchecked": (
        "dispatch.py",
        "        if opts.vocab_start not in (0, None):\n",
        "        if False:\n",
        "vocab_start without process_group is accepted silently",
        [FORMULAS, BAD],
    ),
}


#: bugs that change nothing today, kept out of the default run (run them by name; they are expected to survive):
#: the ops' autograd Functions switch autocast off themselves and today's backends use only out= / in-place GEMMs
#: that autocast leaves alone (tests/api/test_autocast.py says so); a linear_divergence record asking for CE has
#: no targets, and the backends compute no CE for a view without one
EQUIVALENT = {
    "autocast_stays_on": (
        "dispatch.py",
        "            with no_autocast(dev):\n                out = fn(*args, **kwargs)\n",
        "            out = fn(*args, **kwargs)\n",
        "the op's body runs with autocast still on",
        [AUTOCAST],
    ),
    "functions_under_autocast": (
        "dispatch.py",
        "        with _all_autocast_off():\n            return fn(*args, **kwargs)\n",
        "        return fn(*args, **kwargs)\n",
        "the autograd Functions' forward / backward run under the caller's autocast",
        [AUTOCAST],
    ),
    "divergence_with_ce": (
        "options.py",
        "with_ce=False, ce=self._ce(IGNORE_INDEX, softcap=self.softcap)",
        "with_ce=True, ce=self._ce(IGNORE_INDEX, softcap=self.softcap)",
        "linear_divergence's record asks for the two CEs",
        [FORMULAS, "tests/api/test_long_short.py::test_linear_divergence"],
    ),
}

def run(name: str, timeout: float) -> tuple:
    file, old, new, what, sel = {**MUTANTS, **EQUIVALENT}[name]
    with tempfile.TemporaryDirectory(prefix="lsa-planted-") as tmp:
        shutil.copytree(REPO / "lsa_kernels", Path(tmp) / "lsa_kernels", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(REPO / "tests", Path(tmp) / "tests", ignore=shutil.ignore_patterns("__pycache__", "mutation"))
        path = Path(tmp) / "lsa_kernels" / file
        src = path.read_text()
        if src.count(old) != 1:
            return "STALE", f"the text to replace occurs {src.count(old)} times in lsa_kernels/{file}: update MUTANTS"
        path.write_text(src.replace(old, new))
        env = dict(os.environ, PYTHONPATH=tmp, LSA_TEST_BACKENDS="cpu", OMP_NUM_THREADS="1")
        env.pop("TRITON_INTERPRET", None)
        cmd = ["nice", "-n", "10", sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *sel]
        try:
            r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "KILLED", f"timeout after {timeout:.0f} s"
        tail = (r.stdout.strip().splitlines() or [""])[-1]
        if r.returncode == 5:  # no test selected: the selection is stale, not a kill
            return "STALE", f"no test selected by {' '.join(sel)}"
        return ("KILLED" if r.returncode != 0 else "SURVIVED"), tail


def main(argv) -> int:
    every = {**MUTANTS, **EQUIVALENT}
    if argv[:1] == ["--list"]:
        for name, (file, _, _, what, sel) in every.items():
            tag = " (equivalent today)" if name in EQUIVALENT else ""
            print(f"{name:24s} {file:12s} {what}{tag}  [{' '.join(sel)}]")
        return 0
    names = argv or list(MUTANTS)
    unknown = [n for n in names if n not in every]
    if unknown:
        print(f"unknown mutant(s) {unknown}; choose from {', '.join(every)}", file=sys.stderr)
        return 2
    bad = 0
    for name in names:
        t0 = time.time()
        verdict, detail = run(name, float(os.environ.get("CR_TIMEOUT", 600)))
        bad += verdict != ("SURVIVED" if name in EQUIVALENT else "KILLED")
        note = " (equivalent today)" if name in EQUIVALENT else ""
        print(f"{verdict:8s} {name:24s} {every[name][0]:12s} {every[name][3]}{note} ({time.time() - t0:.0f} s: {detail})",
              flush=True)
    print(f"{len(names) - bad} of {len(names)} planted mutants as expected (killed; equivalent ones survived)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
