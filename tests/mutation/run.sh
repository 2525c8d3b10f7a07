#!/usr/bin/env bash
# Mutation testing with cosmic-ray (outside CI): mutates ONE module of a private copy of the package and
# runs the tests that should notice, per mutant. Never touches the working tree (other people edit it).
#
#   tests/mutation/run.sh maths          # one module: maths | reference | functional | autograd | pairing |
#                                        #   backends/cpu/aten | backends/cpu/loop | backends/cpu/__init__ |
#                                        #   backends/cpu/ext | distillation | _checks | integrations/trainer |
#                                        #   integrations/patch | integrations/patched_forward | train/demo_stats | dispatch | options
#                                        #   (the last seven: not in `all`)
#   tests/mutation/run.sh planted [NAME...]  # the hand-planted bugs of the op boundary (dispatch.py, options.py:
#                                        #   swapped option fields, a dropped autocast cast; tests/mutation/planted.py,
#                                        #   no cosmic-ray needed): each applied to a scratch copy, every one must die
#   tests/mutation/run.sh all            # every module above, in that order (what `make mutate` runs)
#
# Needs cosmic-ray in its own venv (kept apart from the project's pinned stack):
#   python3 -m venv /tmp/crvenv && /tmp/crvenv/bin/pip install cosmic-ray==8.7.0
# The copy is lsa_kernels/, tests/, csrc/, setup.py and README.md (setup.py reads it) of CR_REV (default HEAD; `git archive`) plus the
# extension built from it, or of the directory CR_SRC when set (e.g. a frozen `git worktree`, whose
# lsa_kernels/_C*.so must be built). The tests run with the project's .venv python from inside the copy
# (PYTHONPATH=copy), so the copy's package is the one imported, not the venv's editable install.
# Each module has a small, fast test selection (tests/api/test_module_formulas.py first, so most mutants die in
# seconds); the per-mutant timeout is CR_TIMEOUT (default 120 s). Results: $CR_WORK/<module>/report.txt.
set -euo pipefail
module="${1:?module: maths, reference, functional, autograd, pairing, backends/cpu/aten, backends/cpu/loop, backends/cpu/__init__, backends/cpu/ext, distillation, _checks, integrations/trainer, integrations/patch, train/demo_stats, dispatch, options, planted or all}"
repo="$(cd "$(dirname "$0")/../.." && pwd)"
if [ "$module" = planted ]; then
  exec "$repo/.venv/bin/python" "$repo/tests/mutation/planted.py" "${@:2}"
fi
if [ "$module" = all ]; then
  for m in maths reference functional autograd pairing backends/cpu/aten backends/cpu/loop backends/cpu/__init__ \
           backends/cpu/ext distillation; do
    "$0" "$m"
  done
  exit 0
fi
work="${CR_WORK:-/tmp/lsa-mutation}/${module//\//_}"
cr="${CR_VENV:-/tmp/crvenv}/bin"
py="$repo/.venv/bin/python"
M="tests/api/test_module_formulas.py"
case "$module" in
  maths) tests="$M tests/backends/test_maths_defs.py tests/backends/test_cpu_ext.py::test_fastmath_accuracy -k 'maths or fastmath'" ;;
  reference) tests="$M tests/api/test_pairing_oracle.py -k 'reference or oracle or pair_mask or make_views'" ;;
  functional) tests="$M tests/api/test_bad_input.py tests/api/test_edges.py -k 'functional or autograd or bad_input or edges'" ;;
  autograd) tests="$M tests/api/test_edges.py -k 'autograd or single_rank or edges'" ;;
  backends/cpu/*) tests="$M tests/backends/test_backend_contract.py tests/api/test_per_token.py tests/backends/test_cpu_ext.py tests/backends/test_memory.py tests/api/test_distillation.py tests/api/test_per_view.py tests/api/test_dense_targets.py -k 'not triton'" ;;
  distillation) tests="$M tests/api/test_distillation.py -k 'not triton and not gloo and not ranks and not liger'" ;;
  pairing) tests="$M tests/api/test_pairing_oracle.py tests/api/test_bad_input.py tests/api/test_long_short.py::test_sample_l_extra_range_and_module" ;;
  _checks) tests="$M tests/api/test_bad_input.py tests/api/test_accuracy.py -k 'functional or bad_input or target or integer or finite or triton_backend or accuracy'" ;;
  integrations/trainer) tests="tests/integrations/test_collator.py tests/integrations/test_hf_trainer.py::test_long_short_collator_and_window_dataset" ;;
  integrations/patch|integrations/patched_forward) tests="tests/integrations/test_hf_patch.py -k 'trl or unpatch or patched_loss or positional or eval_mode or peft'" ;;
  dispatch) tests="$M tests/api/test_autocast.py tests/api/test_bad_input.py" ;;
  options) tests="$M tests/api/test_long_short.py::test_cpu_fp32_every_option tests/api/test_per_token.py tests/api/test_linear_cross_entropy.py::test_matches_reference" ;;
  train/demo_stats) tests="tests/training/test_demo_verdicts.py tests/training/test_demo.py -k 'verdict or tie or student or paired or correlations or build_stats'" ;;
  *) echo "unknown module $module" >&2; exit 2 ;;
esac
if [ ! -f "${CR_SRC:-$repo}/lsa_kernels/$module.py" ]; then
  echo "lsa_kernels/$module.py does not exist in ${CR_SRC:-$repo}: skipped (moved? update this script)" >&2
  exit 0
fi
workers="${CR_WORKERS:-1}"   # >1: that many cosmic-ray http-workers, each in its own copy of the tree
port0="${CR_PORT:-47310}"
if [ -z "${CR_RESUME:-}" ]; then   # CR_RESUME=1: continue the pending mutants of an interrupted session
  rm -rf "$work" && mkdir -p "$work"
  if [ -n "${CR_SRC:-}" ]; then
    cp -r "$CR_SRC/lsa_kernels" "$CR_SRC/tests" "$CR_SRC/csrc" "$CR_SRC/setup.py" "$CR_SRC/README.md" "$work/"
    find "$work" -name __pycache__ -prune -exec rm -rf {} +
  else
    git -C "$repo" archive "${CR_REV:-HEAD}" lsa_kernels tests csrc setup.py README.md | tar -x -C "$work"
    (cd "$work" && "$py" setup.py build_ext --inplace -q >/dev/null 2>&1) \
      || echo "extension did not build: the C++ path is not tested" >&2
  fi
fi
# PYTHONPATH=. : each worker imports the package of the copy it runs in (its working directory)
{
  echo "[cosmic-ray]"
  echo "module-path = \"lsa_kernels/$module.py\""
  echo "timeout = ${CR_TIMEOUT:-120}.0"
  echo "excluded-modules = []"
  echo "test-command = \"env PYTHONPATH=. LSA_TEST_BACKENDS=cpu OMP_NUM_THREADS=1 $py -m pytest -x -q -p no:cacheprovider $tests\""
  echo
  echo "[cosmic-ray.distributor]"
  if [ "$workers" -gt 1 ]; then
    echo 'name = "http"'
    echo "[cosmic-ray.distributor.http]"
    echo "worker-urls = [$(for i in $(seq 1 "$workers"); do printf '"http://127.0.0.1:%d",' $((port0 + i)); done)]"
  else
    echo 'name = "local"'
  fi
  # arithmetic -> bitwise/shift replacements, only where every such site is float arithmetic (they raise)
  if [ -n "${CR_EXCLUDE:-}" ]; then
    echo "[cosmic-ray.filters.operators-filter]"
    echo "exclude-operators = [\"$CR_EXCLUDE\"]"
  fi
} > "$work/cr.toml"
cd "$work"  # cosmic-ray runs the test command (no shell) from here: the copy is imported
start=$(date +%s)
if [ -z "${CR_RESUME:-}" ]; then
  "$cr/cosmic-ray" init cr.toml session.sqlite
  [ -z "${CR_EXCLUDE:-}" ] || "$cr/cr-filter-operators" session.sqlite cr.toml
  [ -z "${CR_SAMPLE:-}" ] || "$cr/python" "$repo/tests/mutation/sample.py" session.sqlite "$CR_SAMPLE" "${CR_SEED:-12}"
  "$cr/cosmic-ray" baseline cr.toml || { echo "baseline failed: the unmutated copy does not pass" >&2; exit 1; }
fi
pids=()
if [ "$workers" -gt 1 ]; then
  for i in $(seq 1 "$workers"); do
    rm -rf "$work/w$i" && mkdir -p "$work/w$i" && cp -r "$work/lsa_kernels" "$work/tests" "$work/w$i/"
    [ ! -d "$work/csrc" ] || cp -r "$work/csrc" "$work/w$i/"
    (cd "$work/w$i" && exec nice -n 10 "$cr/cosmic-ray" http-worker --port $((port0 + i)) > worker.log 2>&1) &
    pids+=($!)
  done
  trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
  sleep 5
fi
nice -n 10 "$cr/cosmic-ray" exec cr.toml session.sqlite
"$cr/cr-report" session.sqlite --show-pending > report.txt || true
"$cr/cr-rate" session.sqlite > rate.txt || true
echo "$module: $(grep -c '^\[job-id\]' report.txt) mutants, survival rate $(cat rate.txt) %, $(( $(date +%s) - start )) s" \
  | tee -a "${CR_WORK:-/tmp/lsa-mutation}/summary.txt"
echo "report: $work/report.txt"
