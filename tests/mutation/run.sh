#!/usr/bin/env bash
# Mutation testing with cosmic-ray (outside CI): mutates ONE module of a private copy of the package and
# runs the tests that should notice, per mutant. Never touches the working tree (other people edit it).
#
#   tests/mutation/run.sh pairing      # or: stats
#
# Needs cosmic-ray in its own venv (kept apart from the project's pinned stack):
#   python3 -m venv /tmp/crvenv && /tmp/crvenv/bin/pip install cosmic-ray==8.7.0
# The copy is HEAD's lsa_kernels/ and tests/ (git archive) plus the built extension; the tests run with the
# project's .venv python from inside the copy, so the copy's package is the one imported.
set -euo pipefail
module="${1:?module: pairing | stats}"
repo="$(cd "$(dirname "$0")/../.." && pwd)"
work="${CR_WORK:-/tmp/lsa-mutation}/$module"
cr="${CR_VENV:-/tmp/crvenv}/bin"
rm -rf "$work" && mkdir -p "$work"
git -C "$repo" archive HEAD lsa_kernels tests | tar -x -C "$work"
cp "$repo"/lsa_kernels/_C*.so "$work/lsa_kernels/" 2>/dev/null || true
py="$repo/.venv/bin/python"
case "$module" in
  pairing) tests="tests/test_pairing_oracle.py tests/test_bad_input.py tests/test_long_short.py::test_sample_l_extra_range_and_module" ;;
  stats) tests="tests/test_pairing_oracle.py tests/test_long_short.py tests/test_cpu_ext.py -k 'pair or long_short or divergence or large_logits'" ;;
  *) echo "unknown module $module" >&2; exit 2 ;;
esac
cat > "$work/cr.toml" <<TOML
[cosmic-ray]
module-path = "lsa_kernels/$module.py"
timeout = 600.0
excluded-modules = []
test-command = "env LSA_TEST_BACKENDS=cpu $py -m pytest -x -q -p no:cacheprovider $tests"

[cosmic-ray.distributor]
name = "local"
TOML
cd "$work"  # cosmic-ray runs the test command (no shell) from here: the copy is imported
"$cr/cosmic-ray" init cr.toml session.sqlite
"$cr/cosmic-ray" baseline cr.toml || { echo "baseline failed: the unmutated copy does not pass" >&2; exit 1; }
"$cr/cosmic-ray" exec cr.toml session.sqlite
"$cr/cr-report" session.sqlite --show-pending > report.txt || true
"$cr/cr-rate" session.sqlite > rate.txt || true
echo "report: $work/report.txt  (survival rate: $(cat rate.txt))"
