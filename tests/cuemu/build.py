"""Builds the test-only library of fastbn's CUDA operators emulated on the CPU.

csrc/cuda/batch_norm_cuda.cu is compiled by g++ (no nvcc, no GPU) against the
cuemu emulator in tests/cuemu/include, its operators registered for CPU tensors,
and linked against fastbn/_C (the shared argument checks and the implementation
switch of fastbn.ops.cuda_implementation). Incremental (ninja); the output goes
to build/cuemu/. Prints the library's path, which tests/conftest.py loads when
FASTBN_CUDA_EMULATED names it (scripts/test-cuda-emulated.sh does both).

    python tests/cuemu/build.py [--verbose]
"""
import os
import sys

import torch
import torch.utils.cpp_extension as cpp_extension

import fastbn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BUILD_DIR = os.path.join(ROOT, "build", "cuemu")


def build(verbose=False):
    extension = fastbn._C.__file__
    os.makedirs(BUILD_DIR, exist_ok=True)
    cpp_extension.load(
        name="fastbn_cuemu",
        sources=[os.path.join(HERE, "batch_norm_cuda_emulated.cpp")],
        # the emulator's cuda_runtime.h and c10/cuda stand-ins come before torch's headers
        extra_include_paths=[os.path.join(HERE, "include"), os.path.join(ROOT, "csrc")],
        extra_cflags=["-O2", "-g0", "-Wno-unknown-pragmas", "-DFASTBN_CUDA_DISPATCH_KEY=CPU"],
        extra_ldflags=[f"-L{os.path.dirname(extension)}", f"-l:{os.path.basename(extension)}",
                       f"-Wl,-rpath,{os.path.dirname(extension)}"],
        build_directory=BUILD_DIR,
        is_python_module=False,
        verbose=verbose,
    )
    return os.path.join(BUILD_DIR, "fastbn_cuemu.so")


if __name__ == "__main__":
    print(build(verbose="--verbose" in sys.argv))
