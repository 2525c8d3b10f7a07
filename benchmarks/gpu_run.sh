#!/usr/bin/env bash
# One NVIDIA GPU, one call: a verdict first, then the numbers, within TOTAL_S seconds of work (default 480,
# so that the whole call, the machine's start-up included, stays under 10 minutes).
#
#   1. preflight (python -m benchmarks.gpu_preflight, about 10-30 s): versions, the C compiler + Python.h that
#      Triton builds its driver module (and, below triton 3.7, one launcher per kernel) with at run time,
#      TRITON_CACHE_DIR on a local disk, the GPU, one tiny compiled CE forward + backward vs the reference;
#   2. the CUDA tests (python -m benchmarks.gpu_tests): tests/backends/test_cuda.py with the kernels compiled,
#      in CUDA_TEST_JOBS parallel pytest processes (cold compiles dominate: they run side by side);
#   3. VERDICT: one line, printed and written to VERDICT.txt at once;
#   4. correctness at real sizes (python -m benchmarks --correctness; N=8192, H=4096, V=128256 bf16 ...): one
#      PASS/FAIL line per check as it finishes, appended to cuda_correctness.jsonl;
#   5. the goal shapes (python -m benchmarks.gpu_goal): CE and long-short sce in bf16, 16384 rows per view,
#      H=4096, V=128256: time, peak memory, % of the bf16 peak, vs torch's chunked CE and the bare GEMMs;
#   6. the rest of the GPU suite (python -m benchmarks --device cuda) until TOTAL_S: cuda_*.csv,
#      SUMMARY_cuda.md (tables always; plots only where matplotlib is installed).
#
# Time estimate, cold Triton cache (the EST lines are checked by tests/tooling/test_gpu_run_script.py):
# specialisations = the count `python -m benchmarks.gpu_tests --cpu` prints for test_cuda.py (CPU) + those
# of the GPU-only tests (counted by hand, 2 each: int64 offsets, dense N*V > 2^31, autocast); 3.0 s per
# specialisation = a Triton compile for one arch (1.7-2.8 s each in a compile-check sweep of 204 kernels on
# this 2-core machine under load) + the launcher triton 3.6 builds per kernel (0.5 s of gcc here); 4 processes
# compile side by side (16 cores on the GPU machine); running = the tests' own GPU work (estimated).
# EST preflight = 30 s
# EST cuda_tests = (84 + 6) * 3.0 / 4 + 40 = 108 s
# EST verdict = 30 + 108 = 138 s
# EST correctness = 12 * 3.0 + 6 * 5 = 66 s
# EST goal = 7 * 15 = 105 s
# EST before_suite = 138 + 66 + 105 = 309 s
#
# Results go to $OUT/gpu_<stamp>/ when $OUT is set (the device runner fetches $OUT), else to
# benchmarks/results/gpu_<stamp>/ (DRY_RUN: runs/gpu_dry_<stamp>/). Exit status, the first failure in this
# order (the FINAL line lists them all): 0 everything ran and passed; 2 no CUDA device; 3 the toolchain
# (C compiler, Python.h, libcuda, cache directory): no kernel can launch, nothing else is run; 4 the CUDA
# tests (or the preflight's tiny kernel) failed; 5 the CUDA tests did not finish in time; 6 correctness
# failed or did not finish; 7 the goal benchmark did not run ours at both shapes. Missing matplotlib,
# flash-attn, liger-kernel or cut-cross-entropy is a note, not a failure (tables without plots, skip rows).
#
# Environment knobs: PYTHON (interpreter with CUDA torch + triton), TOTAL_S (480), PREFLIGHT_S (45, hard
# limit of step 1), CUDA_TEST_S (200), CUDA_TEST_JOBS (4), CHECK_S (90), GOAL_S (150), SUITE_ARGS (extra
# args for python -m benchmarks), TRITON_CACHE_DIR (default: a directory under /tmp, local disk).
# DRY_RUN=1: every step on CPU (preflight --cpu, the CUDA tests under the interpreter, correctness --quick,
# the goal script at tiny shapes, one suite case) to check this script without a GPU.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
START=$(date +%s)
TOTAL_S=${TOTAL_S:-480}
PREFLIGHT_S=${PREFLIGHT_S:-45}
CUDA_TEST_S=${CUDA_TEST_S:-200}
CUDA_TEST_JOBS=${CUDA_TEST_JOBS:-4}
CHECK_S=${CHECK_S:-90}
GOAL_S=${GOAL_S:-150}
DRY_RUN=${DRY_RUN:-0}
for knob in TOTAL_S PREFLIGHT_S CUDA_TEST_S CUDA_TEST_JOBS CHECK_S GOAL_S; do
  if ! [[ "${!knob}" =~ ^[1-9][0-9]*$ ]]; then
    echo "gpu_run.sh: $knob must be a positive integer (seconds, or processes for CUDA_TEST_JOBS), got '${!knob}'"
    exit 64
  fi
done
if [[ "$DRY_RUN" != 0 && "$DRY_RUN" != 1 ]]; then echo "gpu_run.sh: DRY_RUN must be 0 or 1, got '$DRY_RUN'"; exit 64; fi
STAMP=$(date +%Y%m%d_%H%M%S)
if [[ -n "${OUT:-}" ]]; then RES="$OUT/gpu_$STAMP"
elif [[ "$DRY_RUN" == 1 ]]; then RES="runs/gpu_dry_$STAMP"
else RES="benchmarks/results/gpu_$STAMP"; fi
mkdir -p "$RES"
exec > >(tee -a "$RES/gpu_run.log") 2>&1
echo "== lsa_kernels gpu_run.sh  $(date -Is)  -> $RES  (work limit ${TOTAL_S} s$( [[ "$DRY_RUN" == 1 ]] && echo ", DRY_RUN: on CPU"))"

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
# limit NAME WANT: the seconds a step may take: WANT, cut to what is left of TOTAL_S (0: skip the step)
limit() { local l; l=$(( $(left) - 5 )); if (( l > $2 )); then l=$2; fi; if (( l < 10 )); then l=0; fi; echo "$l"; }
FAILS=()   # "code what" for each failure, in order
fail() { FAILS+=("$1 $2"); }
what_failed() { local f out=""; for f in "${FAILS[@]}"; do out+="${out:+, }${f#* }"; done; echo "$out"; }
# the header's estimate (EST cuda_tests): specialisations and the seconds of running the tests
EST_SPECS=$(( 84 + 6 )); EST_RUN_S=40
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/lsa_triton_cache}"

# ---- the machine
if [[ "$DRY_RUN" == 0 ]]; then
  {
    echo "# nvidia-smi"; timeout 30 nvidia-smi || echo "nvidia-smi failed"
    echo; echo "# query"
    timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv || true
    echo; echo "# cpu"; grep -m1 "model name" /proc/cpuinfo || true; nproc || true
  } > "$RES/nvidia-smi.txt" 2>&1 || true
  GPU_NAME=$(timeout 30 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)
else
  GPU_NAME="none (DRY_RUN)"
fi
echo "GPU: ${GPU_NAME:-unknown}"
echo "${GPU_NAME:-unknown}" > "$RES/gpu_name.txt"

# ---- python: the first with CUDA torch + triton, else the first with torch + triton (the preflight says why
# it sees no GPU); DRY_RUN: the first with torch + triton
PY=""; PY_NO_CUDA=""
for cand in "${PYTHON:-}" .venv/bin/python python3 python; do
  [[ -z "$cand" ]] && continue
  command -v "$cand" >/dev/null 2>&1 || [[ -x "$cand" ]] || continue
  timeout 120 "$cand" -c "import torch, triton, sys; sys.exit(0 if torch.cuda.is_available() else 3)" >/dev/null 2>&1
  case $? in
    0) PY="$cand"; break ;;
    3) [[ -z "$PY_NO_CUDA" ]] && PY_NO_CUDA="$cand" ;;
  esac
done
if [[ -z "$PY" ]]; then PY="$PY_NO_CUDA"; fi

verdict() {  # one line, printed and written at once
  echo "$1" | tee "$RES/VERDICT.txt"
  sync "$RES/VERDICT.txt" 2>/dev/null || true
}

if [[ -z "$PY" ]]; then
  verdict "VERDICT: FAIL no-cuda: no python with torch + triton (tried \$PYTHON, .venv/bin/python, python3, python) (exit 2)"
  echo "FINAL: exit 2 after $(elapsed) s"
  exit 2
fi
"$PY" - <<'EOF' | tee "$RES/versions.txt"
import importlib.metadata as md, importlib.util, torch
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", dev)
notes = {"matplotlib": "SUMMARY tables without plots", "flash-attn": "not used by this run (the HF adapter's attention only)",
         "liger-kernel": "liger rows say so", "cut-cross-entropy": "cce rows say so"}
for m in ("triton", "numpy", *notes):
    try:
        print(m, md.version(m))
    except Exception:
        print(m, "missing")
for m, what in notes.items():
    if importlib.util.find_spec(m.replace("-", "_")) is None:
        print(f"note: {m} missing -> {what}")
EOF

# ---- 1. preflight
DEV=cuda; PRE_ARGS=(); [[ "$DRY_RUN" == 1 ]] && { DEV=cpu; PRE_ARGS=(--cpu); }
unset TRITON_INTERPRET  # each step sets what it needs (compiled kernels on a GPU; --cpu: the interpreter)
echo "== 1. preflight (limit ${PREFLIGHT_S} s)"
timeout --kill-after=5 "$PREFLIGHT_S" "$PY" -m benchmarks.gpu_preflight "${PRE_ARGS[@]}" --json "$RES/preflight.json" \
  2>&1 | tee "$RES/preflight.log"
PRE_RC=${PIPESTATUS[0]}
PRE_LINE=$(grep -h "^PREFLIGHT:" "$RES/preflight.log" | tail -1)
PRE_LINE=${PRE_LINE:-PREFLIGHT: no verdict line (exit $PRE_RC)}
case $PRE_RC in
  0) ;;
  2|3) why=${PRE_LINE#PREFLIGHT: FAIL }; why=${why% (exit *}
     verdict "VERDICT: FAIL $( (( PRE_RC == 2 )) && echo no-cuda || echo toolchain) at $(elapsed) s: $why (exit $PRE_RC)"
     echo "FINAL: exit $PRE_RC after $(elapsed) s"; exit "$PRE_RC" ;;
  4) fail 4 "preflight tiny kernel" ;;
  5) echo "note: unsupported versions reported by the preflight; going on" ;;
  124|137) fail 4 "preflight over ${PREFLIGHT_S} s" ;;
  *) fail 4 "preflight exit $PRE_RC" ;;
esac
# this machine's compile time -> the time to the verdict (the header's formula)
"$PY" - "$RES/preflight.json" "$CUDA_TEST_JOBS" "$EST_SPECS" "$EST_RUN_S" <<'EOF' || true
import json, sys
try:
    c = json.load(open(sys.argv[1])).get("compile_s_per_specialisation")
except Exception:
    c = None
if c:
    jobs, n, run = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    print(f"estimate on this machine: the CUDA tests compile {n} specialisations x {c:.2f} s / {jobs} "
          f"processes + {run} s = {n * c / jobs + run:.0f} s")
EOF

# ---- 2. the CUDA tests
L=$(limit tests "$CUDA_TEST_S")
TEST_LINE="cuda tests: not run (no time left)"
if (( L > 0 )); then
  echo "== 2. tests/backends/test_cuda.py (limit ${L} s, ${CUDA_TEST_JOBS} processes)"
  T_ARGS=(); [[ "$DRY_RUN" == 1 ]] && T_ARGS=(--cpu)
  timeout --kill-after=10 $(( L + 20 )) "$PY" -m benchmarks.gpu_tests --out "$RES" --jobs "$CUDA_TEST_JOBS" \
    --timeout "$L" --python "$PY" "${T_ARGS[@]}" 2>&1 | tee "$RES/gpu_tests.log"
  rc=${PIPESTATUS[0]}
  TEST_LINE=$(grep -h "^cuda tests:" "$RES/gpu_tests.log" | tail -1)
  TEST_LINE=${TEST_LINE:-cuda tests: no summary line (exit $rc)}
  case $rc in
    0) ;;
    124|137) fail 5 "cuda tests did not finish" ;;
    *) fail 4 "cuda tests" ;;
  esac
else
  fail 5 "cuda tests not run"
fi

# ---- 3. the verdict
if (( ${#FAILS[@]} == 0 )); then
  verdict "VERDICT: PASS at $(elapsed) s: preflight ${PRE_LINE#PREFLIGHT: PASS }; ${TEST_LINE/: PASS/}"
else
  verdict "VERDICT: FAIL $(what_failed) at $(elapsed) s: preflight ${PRE_LINE#PREFLIGHT: }; ${TEST_LINE}"
fi

# ---- 4. correctness at real sizes, streamed
L=$(limit correctness "$CHECK_S")
if (( L > 0 )); then
  echo "== 4. correctness (limit ${L} s)"
  C_ARGS=(--device cuda); [[ "$DRY_RUN" == 1 ]] && C_ARGS=(--device cpu --quick)
  : > "$RES/${DEV}_correctness.jsonl"
  timeout --kill-after=10 "$L" "$PY" -m benchmarks --correctness "${C_ARGS[@]}" --out "$RES" --tag "$DEV" 2>&1 |
    while IFS= read -r line; do
      echo "$line"
      case "$line" in PASS\ \{*|FAIL\ \{*) echo "${line#* }" >> "$RES/${DEV}_correctness.jsonl" ;; esac
    done
  rc=${PIPESTATUS[0]}
  if (( rc != 0 )); then fail 6 "correctness (rc $rc)"; echo "correctness: FAIL or timeout (rc $rc)"; fi
else
  fail 6 "correctness not run"
fi

# ---- 5. the goal shapes
L=$(limit goal "$GOAL_S")
if (( L > 0 )); then
  echo "== 5. goal shapes (limit ${L} s)"
  G_ARGS=(--device cuda); [[ "$DRY_RUN" == 1 ]] && G_ARGS=(--device cpu --small)
  timeout --kill-after=10 "$L" "$PY" -m benchmarks.gpu_goal "${G_ARGS[@]}" --out "$RES" --tag "${DEV}_goal" \
    --deadline $(( L > 40 ? L - 30 : 10 )) --case-timeout 90
  rc=$?
  (( rc != 0 )) && fail 7 "goal shapes (rc $rc)"
else
  fail 7 "goal shapes not run"
fi

# ---- 6. the rest of the suite, with what is left
L=$(( $(left) - 15 ))
if (( L >= 30 )); then
  echo "== 6. suite: ${L} s hard limit, no new case after $(( L - 20 )) s"
  S_ARGS=(--device cuda --case-timeout 90); [[ "$DRY_RUN" == 1 ]] && S_ARGS=(--device cpu --quick --ops ce --impls gemm --rows 256)
  timeout --kill-after=10 "$L" "$PY" -m benchmarks "${S_ARGS[@]}" --out "$RES" --tag "$DEV" \
    --deadline $(( L - 20 )) --no-progress ${SUITE_ARGS:-} ||
    echo "suite exited non-zero or was stopped at ${L} s; the report is redone from the rows it wrote"
  timeout 30 "$PY" -m benchmarks --report-only --device "$DEV" --out "$RES" --tag "$DEV" || true
  if [[ -f "$RES/SUMMARY_$DEV.md" ]] && ! grep -q "GPU:" "$RES/SUMMARY_$DEV.md"; then
    sed -i "3i - GPU (nvidia-smi): ${GPU_NAME:-unknown}" "$RES/SUMMARY_$DEV.md" || true
  fi
else
  echo "== 6. suite: not run (${L} s left)"
fi

CODE=0
for f in "${FAILS[@]}"; do CODE=${f%% *}; break; done
echo "FINAL: exit $CODE after $(elapsed) s; ${#FAILS[@]} problem(s)$( (( ${#FAILS[@]} )) && echo ": $(what_failed)"); $(cat "$RES/VERDICT.txt")"
ls -la "$RES" || true
exit "$CODE"
