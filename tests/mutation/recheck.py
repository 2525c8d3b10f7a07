"""Re-run the surviving mutants of a cosmic-ray session against the tests as they are now.

    python3 tests/mutation/recheck.py WORK_DIR TESTS_DIR [pytest selection args...]

WORK_DIR is a session's copy (holds session.sqlite and the unmutated lsa_kernels/, or set CR_SRC to the
tree the session was copied from); TESTS_DIR the tests to
use (e.g. the repo's tests/ with the new tests/api/test_module_formulas.py). For each SURVIVED job the mutation diff is
applied with `patch` to a scratch copy and the selection run there (PYTHONPATH = the copy). Prints one line
per mutant: KILLED / SURVIVED, the job id and the mutated line, and a summary; writes recheck.txt.
"""

import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile

work, tests, sel = sys.argv[1], sys.argv[2], sys.argv[3:]
py = os.path.join(os.path.dirname(__file__), "..", "..", ".venv", "bin", "python")
py = os.environ.get("CR_PY", os.path.abspath(py))
rows = sqlite3.connect(os.path.join(work, "session.sqlite")).execute(
    "select job_id, diff from work_results where test_outcome = 'SURVIVED'").fetchall()
skip = os.environ.get("CR_SKIP")  # regex on the mutated line: survivors already judged equivalent, not re-run
out, killed = [], 0
for job, diff in rows:
    plus = next((ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")), "")
    if skip and re.search(skip, plus):
        out.append(f"SKIPPED {job} {plus}")
        continue
    with tempfile.TemporaryDirectory() as tmp:
        src = os.environ.get("CR_SRC", work)  # the unmutated package (a running local session mutates work's)
        shutil.copytree(os.path.join(src, "lsa_kernels"), os.path.join(tmp, "lsa_kernels"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(tests, os.path.join(tmp, "tests"), ignore=shutil.ignore_patterns("__pycache__"))
        if os.path.isdir(os.path.join(src, "csrc")):
            shutil.copytree(os.path.join(src, "csrc"), os.path.join(tmp, "csrc"))
        body = "\n".join(line for line in diff.splitlines() if not line.startswith("--- mutation diff")) + "\n"
        subprocess.run(["patch", "-s", "-p1"], input=body, text=True, cwd=tmp, check=True)
        env = dict(os.environ, PYTHONPATH=".", LSA_TEST_BACKENDS="cpu", OMP_NUM_THREADS="1")
        r = subprocess.run([py, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *sel], cwd=tmp, env=env,
                           capture_output=True, text=True, timeout=900)
    verdict = "KILLED" if r.returncode != 0 else "SURVIVED"
    killed += r.returncode != 0
    out.append(f"{verdict} {job} {plus}")
    print(out[-1], flush=True)
out.append(f"{killed} of {len(rows) - sum(o.startswith('SKIPPED') for o in out)} re-run survivors killed now")
print(out[-1])
with open(os.path.join(work, "recheck.txt"), "w") as f:
    f.write("\n".join(out) + "\n")
