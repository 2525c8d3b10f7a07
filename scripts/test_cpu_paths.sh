#!/usr/bin/env bash
# The precision and memory tests (pytest -m "precision or memory", which includes the close-distribution KL
# test) under several CPU code paths of torch and MKL, one pytest process per path:
#
#   best      no variable: the machine's best ATen kernels (AVX-512 / AVX2) and MKL's own dispatch
#   default   ATEN_CPU_CAPABILITY=default: ATen's non-vectorised kernels (torch.backends.cpu.get_cpu_capability()
#             must then say DEFAULT; the script fails otherwise)
#   avx2      MKL_ENABLE_INSTRUCTIONS=AVX2: MKL's AVX2 kernels on an AVX-512 Intel CPU (MKL ignores it on CPUs
#             it does not tune for, e.g. AMD: the printed GEMM fingerprint then equals best's)
#   cbwr      MKL_CBWR=COMPATIBLE: MKL's conditional-numerical-reproducibility branch (another GEMM kernel on
#             any x86 CPU)
#
# Precision bounds scale with each path's own fp32 GEMM error (tests/_util.py fp32_gemm_rho). Each mode prints
# its ATen capability and a fingerprint of one fp32 GEMM's result, so a variable without effect shows.
#
#   scripts/test_cpu_paths.sh                      # every mode, from the repository root
#   scripts/test_cpu_paths.sh default avx2         # some modes
#   PYTEST_ARGS="-x" scripts/test_cpu_paths.sh     # extra pytest arguments
#
# Python: $PYTHON, else .venv/bin/python when it exists, else python. Exit status: non-zero if any mode failed.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi
modes=("$@")
[ ${#modes[@]} -eq 0 ] && modes=(best default avx2 cbwr)

probe='
import hashlib, torch
g = torch.Generator().manual_seed(0)
a, b = torch.randn(256, 512, generator=g), torch.randn(512, 1024, generator=g)
c = a @ b
err = (c.double() - a.double() @ b.double()).abs().max().item()
print(f"capability={torch.backends.cpu.get_cpu_capability()} gemm={hashlib.md5(c.numpy().tobytes()).hexdigest()[:12]} "
      f"gemm_err={err:.3e}")
'

status=0
for mode in "${modes[@]}"; do
  case "$mode" in
    best) vars=() ;;
    default) vars=(ATEN_CPU_CAPABILITY=default) ;;
    avx2) vars=(MKL_ENABLE_INSTRUCTIONS=AVX2) ;;
    cbwr) vars=(MKL_CBWR=COMPATIBLE) ;;
    *) echo "test_cpu_paths.sh: unknown mode '$mode' (expected best, default, avx2 or cbwr)" >&2; exit 2 ;;
  esac
  info=$(env ${vars[@]+"${vars[@]}"} "$PY" -c "$probe") || { echo "[$mode] probe failed" >&2; status=1; continue; }
  echo "=== [$mode] ${vars[*]:-(no variable)}: $info"
  if [ "$mode" = default ] && [[ "$info" != capability=DEFAULT* ]]; then
    echo "[$mode] ATEN_CPU_CAPABILITY=default did not change the ATen code path" >&2
    status=1
    continue
  fi
  start=$SECONDS
  # shellcheck disable=SC2086
  env ${vars[@]+"${vars[@]}"} "$PY" -m pytest -q -p no:cacheprovider -m "precision or memory" ${PYTEST_ARGS:-} tests
  rc=$?
  echo "=== [$mode] exit $rc in $((SECONDS - start)) s"
  [ $rc -ne 0 ] && status=1
done
exit $status
