"""Build the fastbn extension.

CUDA or not is decided by the installed torch (``torch.version.cuda``) and an nvcc
under CUDA_HOME, never by ``torch.cuda.is_available()``: a machine without a GPU
still compiles (and so checks) the CUDA sources. ``FASTBN_FORCE_CPU=1`` forces a
CPU-only build.
"""
import glob
import os
import platform
import re
import subprocess

# torch.utils.cpp_extension reads CUDA_HOME when it is imported, so default it first;
# without it torch guesses /usr/local and linking fails (-lcudart not found).
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

ROOT = os.path.dirname(os.path.abspath(__file__))


def _nvcc_version(cuda_home):
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    if not os.path.exists(nvcc):
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def want_cuda():
    if os.environ.get("FASTBN_FORCE_CPU", "0") == "1":
        print("fastbn: FASTBN_FORCE_CPU=1, building the CPU-only extension")
        return False
    if torch.version.cuda is None or CUDA_HOME is None:
        print("fastbn: torch has no CUDA or no CUDA toolkit found, building CPU-only")
        return False
    nvcc = _nvcc_version(CUDA_HOME)
    torch_major = int(torch.version.cuda.split(".")[0])
    if nvcc is None or nvcc[0] != torch_major:
        print(f"fastbn: nvcc {nvcc} under {CUDA_HOME} does not match torch's CUDA "
              f"{torch.version.cuda}, building CPU-only")
        return False
    return True


def cpu_capability():
    """The x86 vector ISA the CPU kernels are compiled for (at::vec's CPU_CAPABILITY).

    Default: the best one the build machine supports, since fastbn is built from
    source where it runs; FASTBN_CPU_CAPABILITY=DEFAULT|AVX2|AVX512 overrides it.
    The package checks at import that the running CPU supports it.
    """
    forced = os.environ.get("FASTBN_CPU_CAPABILITY")
    if forced:
        return forced.upper()
    if platform.machine() not in ("x86_64", "AMD64"):
        return "DEFAULT"
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return "DEFAULT"
    if all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq")):
        return "AVX512"
    if "avx2" in flags and "fma" in flags:
        return "AVX2"
    return "DEFAULT"


CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def make_extension():
    capability = cpu_capability()
    if capability not in CAPABILITY_FLAGS:
        raise SystemExit(f"FASTBN_CPU_CAPABILITY must be one of {sorted(CAPABILITY_FLAGS)}, got {capability}")
    use_cuda = want_cuda()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    macros = [
        ("CPU_CAPABILITY", capability),
        (f"CPU_CAPABILITY_{capability}", None),
        ("FASTBN_CPU_CAPABILITY_NAME", f'"{capability}"'),
    ]
    cxx_flags = ["-O3", "-g0", "-fno-math-errno", "-Wno-unknown-pragmas"] + CAPABILITY_FLAGS[capability]
    # at::parallel_for runs its loop serially unless the extension itself is built
    # with OpenMP (ATen's header checks _OPENMP). torch ships libgomp.so.1, which
    # the extension then shares.
    link_flags = []
    if platform.system() == "Linux":
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if use_cuda:
        # No GPU visible means torch cannot guess the architectures (it crashes with IndexError).
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        macros.append(("FASTBN_WITH_CUDA", None))
        nvcc_flags = ["-O3", "-Xcompiler", "-g0", "-lineinfo", "--expt-relaxed-constexpr"]
        return CUDAExtension(
            "fastbn._C",
            sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
            py_limited_api=True,
        )
    return CppExtension(
        "fastbn._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
        py_limited_api=True,
    )


setup(
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
