#!/usr/bin/env bash
# Runs the tests with fastbn's CUDA kernels emulated on the CPU (no GPU, no nvcc):
# builds (incrementally) the test-only library that tests/cuemu/build.py makes from
# csrc/cuda/batch_norm_cuda.cu with g++ against the cuemu emulator, then runs pytest
# with it loaded, so that every CPU test runs the CUDA kernel code and
# tests/test_cuda.py runs on CPU tensors. fastbn itself must be built (scripts/setup.sh).
#
#   bash scripts/test-cuda-emulated.sh [pytest args...]   # default: -q tests
#
# PYTHON names the interpreter (default .venv/bin/python). Emulator knobs pass through
# the environment: CUEMU_SCHEDULE=inorder|reverse|random|warps|warps-reverse,
# CUEMU_SM_COUNT (default 132), CUEMU_BLOCK_ORDER, CUEMU_SEED (tests/cuemu/include/cuemu/cuemu.h).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# torch.utils.cpp_extension builds with ninja; pip installs it next to the interpreter
export PATH="$(cd "$(dirname "$PYTHON")" && pwd):$PATH"
library=$(MAX_JOBS=${MAX_JOBS:-2} "$PYTHON" tests/cuemu/build.py | tail -n 1)
[ -f "$library" ] || { echo "test-cuda-emulated: no library at '$library'" >&2; exit 1; }
[ $# -eq 0 ] && set -- -q tests
FASTBN_CUDA_EMULATED="$library" exec "$PYTHON" -m pytest "$@"
