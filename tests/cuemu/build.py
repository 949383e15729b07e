"""Builds the test-only library of fastbn's CUDA operators emulated on the CPU,
and the sanitizer harness.

csrc/cuda/batch_norm_cuda.cu is compiled by g++ (no nvcc, no GPU) against the
cuemu emulator in tests/cuemu/include, its operators registered for CPU tensors,
and linked against fastbn/_C (the shared argument checks and the implementation
switch of fastbn.ops.cuda_implementation). Incremental (ninja); the output goes
to build/cuemu/. Prints the library's path, which tests/conftest.py loads when
FASTBN_CUDA_EMULATED names it (scripts/test-cuda-emulated.sh does both).

The sanitizer harness (sanitizer_harness.cpp, run by scripts/test-cuda-sanitized.sh)
is an executable built from the same .cu with -fsanitize=address,undefined and
the int32 index limit lowered to 4096 values; output in build/cuemu-harness/.

    python tests/cuemu/build.py [--harness] [--verbose]
"""
import os
import sys

import torch
import torch.utils.cpp_extension as cpp_extension

import fastbn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BUILD_DIR = os.path.join(ROOT, "build", "cuemu")
HARNESS_BUILD_DIR = os.path.join(ROOT, "build", "cuemu-harness")
# the emulator's cuda_runtime.h and c10/cuda stand-ins come before torch's headers
INCLUDE_PATHS = [os.path.join(HERE, "include"), os.path.join(ROOT, "csrc")]
CFLAGS = ["-g0", "-Wno-unknown-pragmas", "-DFASTBN_CUDA_DISPATCH_KEY=CPU"]


def build(verbose=False):
    extension = fastbn._C.__file__
    os.makedirs(BUILD_DIR, exist_ok=True)
    cpp_extension.load(
        name="fastbn_cuemu",
        sources=[os.path.join(HERE, "batch_norm_cuda_emulated.cpp")],
        extra_include_paths=INCLUDE_PATHS,
        # hidden: the kernels bind to this library's own definitions, never to the same-named
        # host stubs of a CUDA build of fastbn/_C
        extra_cflags=["-O2", "-fvisibility=hidden", *CFLAGS],
        extra_ldflags=[f"-L{os.path.dirname(extension)}", f"-l:{os.path.basename(extension)}",
                       f"-Wl,-rpath,{os.path.dirname(extension)}"],
        build_directory=BUILD_DIR,
        is_python_module=False,
        verbose=verbose,
    )
    return os.path.join(BUILD_DIR, "fastbn_cuemu.so")


def build_harness(verbose=False):
    sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    os.makedirs(HARNESS_BUILD_DIR, exist_ok=True)
    return cpp_extension.load(
        name="fastbn_cuemu_sanitizer_harness",
        sources=[os.path.join(HERE, "sanitizer_harness.cpp"), os.path.join(ROOT, "csrc", "bn_checks.cpp"),
                 os.path.join(ROOT, "csrc", "impl_switch.cpp")],
        extra_include_paths=INCLUDE_PATHS,
        extra_cflags=["-O1", *CFLAGS, "-DFASTBN_INT32_INDEX_LIMIT=4096", *sanitize],
        extra_ldflags=sanitize,
        build_directory=HARNESS_BUILD_DIR,
        is_python_module=False,
        is_standalone=True,
        verbose=verbose,
    )


if __name__ == "__main__":
    verbose = "--verbose" in sys.argv
    print(build_harness(verbose) if "--harness" in sys.argv else build(verbose))
