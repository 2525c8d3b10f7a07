#!/usr/bin/env bash
# One NVIDIA GPU (sized for an H200), < 10 minutes in all (TOTAL_S, default 570 s):
#   1. record the GPU (nvidia-smi) and the software versions;
#   1b. the CUDA test path: tests/backends/test_cuda.py in its own pytest process with the interpreter off (every op
#      and option, bf16/fp16/fp32, odd shapes, compiled kernels vs the reference, device guard, fp64
#      routing, autocast, int64 offsets) -> test_cuda.log, test_cuda.xml (limit CUDA_TEST_S, default 270; about 55 kernel specialisations compile cold);
#   2. correctness: compiled Triton kernels vs the reference at real sizes (e.g. N=8192, H=4096,
#      V=128256 bf16, fwd+bwd; CE and long-short sce/js/kl; error vs an fp32 truth must be within
#      1.5x torch's same-dtype error + tol) -> cuda_correctness.json;
#   3. the GPU benchmark suite (python -m benchmarks --device cuda), one fresh process per case,
#      stopped by a deadline so it always finishes -> cuda_*.csv, SUMMARY_cuda.md, plots_cuda/.
# Results go to $OUT/gpu_<stamp>/ when $OUT is set (the device runner fetches $OUT), else to
# benchmarks/results/gpu_<stamp>/. Exit status: 0 when everything ran and correctness passed,
# 1 when the CUDA tests or correctness failed, 2 when no CUDA-capable python was found; the suite's rows
# are kept anyway.
#
# Environment knobs: PYTHON (interpreter with CUDA torch + triton), TOTAL_S (default 570),
# CUDA_TEST_S (default 270), CHECK_S (correctness time limit, default 90), SUITE_ARGS (extra args for
# python -m benchmarks).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
START=$(date +%s)
TOTAL_S=${TOTAL_S:-570}
CUDA_TEST_S=${CUDA_TEST_S:-270}
CHECK_S=${CHECK_S:-90}
STAMP=$(date +%Y%m%d_%H%M%S)
if [[ -n "${OUT:-}" ]]; then RES="$OUT/gpu_$STAMP"; else RES="benchmarks/results/gpu_$STAMP"; fi
mkdir -p "$RES"
exec > >(tee -a "$RES/gpu_run.log") 2>&1
echo "== lsa_kernels gpu_run.sh  $(date -Is)  -> $RES"

left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }

# ---- 1. the machine
{
  echo "# nvidia-smi"; timeout 30 nvidia-smi || echo "nvidia-smi failed"
  echo; echo "# query"
  timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv || true
  echo; echo "# cpu"; grep -m1 "model name" /proc/cpuinfo || true; nproc || true
} > "$RES/nvidia-smi.txt" 2>&1 || true
GPU_NAME=$(timeout 30 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)
echo "GPU: ${GPU_NAME:-unknown}"
echo "${GPU_NAME:-unknown}" > "$RES/gpu_name.txt"

# ---- python with CUDA torch
PY=""
for cand in "${PYTHON:-}" .venv/bin/python python3 python; do
  [[ -z "$cand" ]] && continue
  command -v "$cand" >/dev/null 2>&1 || [[ -x "$cand" ]] || continue
  if timeout 120 "$cand" -c "import torch, triton, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    PY="$cand"; break
  fi
done
if [[ -z "$PY" ]]; then
  echo "no python with CUDA torch + triton found (tried \$PYTHON, .venv/bin/python, python3, python)"
  exit 2
fi
unset TRITON_INTERPRET || true
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONWARNINGS=ignore
"$PY" - <<'EOF' | tee "$RES/versions.txt"
import importlib.metadata as md, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
for m in ("triton", "liger-kernel", "cut-cross-entropy"):
    try: print(m, md.version(m))
    except Exception as e: print(m, "missing", e)
EOF
# optional packages: the suite records a skip row when one is missing
"$PY" -c "import liger_kernel" 2>/dev/null || echo "note: liger_kernel not importable -> liger rows will say so"
"$PY" -c "import cut_cross_entropy" 2>/dev/null || echo "note: cut_cross_entropy not importable -> cce rows will say so"

# build the C++ extension only if it is cheap to skip: the GPU path does not need it
STATUS=0

# ---- 1b. the CUDA test path (compiled kernels vs the reference, own process, interpreter off)
echo "== tests/backends/test_cuda.py (limit ${CUDA_TEST_S} s)"
if TRITON_INTERPRET=0 timeout --kill-after=10 "$CUDA_TEST_S" "$PY" -m pytest -q -ra -p no:cacheprovider \
     tests/backends/test_cuda.py --junitxml="$RES/test_cuda.xml" > "$RES/test_cuda.log" 2>&1; then
  echo "cuda tests: PASS"; tail -3 "$RES/test_cuda.log"
else
  rc=$?; STATUS=1
  echo "cuda tests: FAIL or timeout (rc=$rc); see $RES/test_cuda.log"; tail -40 "$RES/test_cuda.log"
fi

# ---- 2. correctness (compiled kernels at real sizes)
echo "== correctness (limit ${CHECK_S} s)"
if timeout --kill-after=10 "$CHECK_S" "$PY" -m benchmarks --correctness --device cuda --out "$RES" --tag cuda; then
  echo "correctness: PASS"
else
  rc=$?; STATUS=1
  echo "correctness: FAIL or timeout (rc=$rc); see $RES/cuda_correctness.json and the log"
fi

# ---- 3. the suite, cut by a deadline so that the whole script stays inside TOTAL_S
SUITE_S=$(( $(left) - 25 ))
if (( SUITE_S < 60 )); then SUITE_S=60; fi
DEADLINE=$(( SUITE_S - 45 ))
echo "== suite: ${SUITE_S} s hard limit, no new case after ${DEADLINE} s"
if ! timeout --kill-after=10 "$SUITE_S" "$PY" -m benchmarks --device cuda --out "$RES" --tag cuda \
     --deadline "$DEADLINE" --case-timeout 90 --no-progress ${SUITE_ARGS:-}; then
  echo "suite exited non-zero or was stopped at ${SUITE_S} s; regenerating the report from the rows it wrote"
fi
timeout 60 "$PY" -m benchmarks --report-only --device cuda --out "$RES" --tag cuda || true
# make the GPU name part of the summary even when the report could not read it
if [[ -f "$RES/SUMMARY_cuda.md" ]] && ! grep -q "GPU:" "$RES/SUMMARY_cuda.md"; then
  sed -i "3i - GPU (nvidia-smi): ${GPU_NAME:-unknown}" "$RES/SUMMARY_cuda.md" || true
fi
echo "== done in $(( $(date +%s) - START )) s, results in $RES (status $STATUS)"
ls -la "$RES" || true
exit $STATUS
