#!/usr/bin/env bash
# The CUDA kernels on the CPU under AddressSanitizer and UndefinedBehaviorSanitizer:
# builds (incrementally) cuemu's self-test and the sanitizer harness
# (tests/cuemu/sanitizer_harness.cpp: fastbn's CUDA operators from
# csrc/cuda/batch_norm_cuda.cu checked against float64), then runs the harness under
# the in-order and warp-greedy schedules with 1 and 132 SMs. Exits non-zero when any
# run fails. PYTHON names the interpreter (default .venv/bin/python); g++ only.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# torch.utils.cpp_extension builds with ninja; pip installs it next to the interpreter
export PATH="$(cd "$(dirname "$PYTHON")" && pwd):$PATH"

# Leaks are not what this looks for: torch's own allocations outlive main, and a
# block the emulator abandons on a reported error never unwinds its threads' frames.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0} UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
selftest=build/cuemu-harness/selftest
mkdir -p build/cuemu-harness
if [ ! "$selftest" -nt tests/cuemu/selftest.cpp ] || [ ! "$selftest" -nt tests/cuemu/include/cuemu/cuemu.h ]; then
  g++ -std=c++17 -O1 -g -Wall -fsanitize=address,undefined -fno-sanitize-recover=all -Itests/cuemu/include \
    tests/cuemu/selftest.cpp -o "$selftest" -lpthread
fi
"$selftest" > build/cuemu-harness/selftest.log || { cat build/cuemu-harness/selftest.log; exit 1; }
echo "cuemu self-test passed"

harness=$(MAX_JOBS=${MAX_JOBS:-2} "$PYTHON" tests/cuemu/build.py --harness | tail -n 1)
[ -x "$harness" ] || { echo "test-cuda-sanitized: no harness at '$harness'" >&2; exit 1; }
status=0
for schedule in inorder warps; do
  for sm_count in 1 132; do
    if ! CUEMU_SCHEDULE=$schedule CUEMU_SM_COUNT=$sm_count "$harness"; then
      echo "test-cuda-sanitized: FAILED with CUEMU_SCHEDULE=$schedule CUEMU_SM_COUNT=$sm_count" >&2
      status=1
    fi
  done
done
exit $status
