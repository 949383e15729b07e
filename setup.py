"""Build the fastbn extension.

CUDA or not is decided by the installed torch (``torch.version.cuda``) and an nvcc
under CUDA_HOME, never by ``torch.cuda.is_available()``: a machine without a GPU
still compiles (and so checks) the CUDA sources. ``FASTBN_FORCE_CPU=1`` forces a
CPU-only build.
"""
import concurrent.futures
import glob
import os
import platform
import re
import shlex
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
    get_cxx_compiler,
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


# The CPU kernels (csrc/cpu/per_isa/) are compiled once per x86 vector ISA, lowest
# first, each with its flags and at::vec's CPU_CAPABILITY macros; the package runs
# the best one the CPU supports (csrc/cpu/cpu_capability.cpp). Elsewhere: DEFAULT.
_AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
X86_CAPABILITY_FLAGS = [
    ("DEFAULT", []),
    ("AVX2", ["-mavx2", "-mfma", "-mf16c"]),
    ("AVX512", _AVX512_FLAGS),
    # AVX512 with the bfloat16 conversion instructions (Cooper Lake, Sapphire Rapids, Zen 4):
    # a bfloat16 output is rounded by one instruction (vcvtne2ps2bf16) instead of at::vec's ten
    # or so integer operations (csrc/cpu/vec_lanes.h). at::vec runs its AVX-512 code for it.
    ("AVX512_BF16", _AVX512_FLAGS + ["-mavx512bf16"]),
]
# at::vec's CPU_CAPABILITY_* macros that a capability defines besides its own.
IMPLIED_CAPABILITY_MACROS = {"AVX512_BF16": ["AVX512"]}
PER_ISA_SOURCES = sorted(glob.glob("csrc/cpu/per_isa/*.cpp"))
# FASTBN_QUICK_CPU_KERNELS=1: the per-ISA CPU kernels at -O1, for builds where CPU speed does
# not matter (bench/gpu_run.sh's lease: a lent GPU's call has 10 minutes, and there the -O3
# objects took 443 s of them; one -O1 compile took 118 s here against ~400 s at -O3). -O1
# leaves the intrinsics' self-initialised temporaries to -Wuninitialized: 168 MB of warnings.
QUICK_CPU_KERNEL_FLAGS = ["-O1", "-Wno-uninitialized", "-Wno-maybe-uninitialized"]


def quick_cpu_kernels(environ=os.environ):
    return environ.get("FASTBN_QUICK_CPU_KERNELS", "0") == "1"


def per_isa_compile_flags(cxx_flags, isa_flags, environ=os.environ):
    """The flags of one ISA's compile of PER_ISA_SOURCES: the extension's, the ISA's, then
    QUICK_CPU_KERNEL_FLAGS where FASTBN_QUICK_CPU_KERNELS=1 (last, so that -O1 wins)."""
    return list(cxx_flags) + list(isa_flags) + (QUICK_CPU_KERNEL_FLAGS if quick_cpu_kernels(environ) else [])


def loaded_libstdcxx():
    """The path of the libstdc++ this process (torch) loaded, on Linux; else None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libstdc++.so" in line}
    except OSError:
        return None
    return min(paths) if paths else None


# A source that compiles only where the compiler knows AVX512_BF16: its conversion intrinsic
# and the CPU feature name that csrc/cpu/cpu_capability.cpp asks __builtin_cpu_supports about.
AVX512_BF16_PROBE = """
#include <immintrin.h>
__m512bh convert(__m512 lo, __m512 hi) { return _mm512_cvtne2ps_pbh(hi, lo); }
int cpu_has_it() { return __builtin_cpu_supports("avx512bf16"); }
"""


def compiler_accepts(compiler, flags, source):
    """Whether the C++ compiler (a command, as a list) compiles `source` with `flags`."""
    try:
        result = subprocess.run(compiler + ["-x", "c++", "-std=c++17", "-c", "-", "-o", os.devnull] + flags,
                                input=source, capture_output=True, text=True)
    except OSError:
        return False
    return result.returncode == 0


def cxx_compiler():
    """The C++ compiler command torch's build uses ($CXX or c++), as a list."""
    return shlex.split(get_cxx_compiler())


def cpu_capabilities(compiler=None):
    """(name, compiler flags) of each ISA the CPU kernels are compiled for, lowest first.

    AVX512_BF16 only where the compiler (torch's choice: $CXX or c++) builds it: an older
    one rejects -mavx512bf16, and the build then goes on without that capability (its
    CPUs run the AVX512 kernels) instead of failing.
    """
    if not (platform.machine().lower() in ("x86_64", "amd64") and platform.system() != "Windows"):
        return X86_CAPABILITY_FLAGS[:1]
    compiler = compiler or cxx_compiler()
    capabilities = []
    for name, flags in X86_CAPABILITY_FLAGS:
        if name == "AVX512_BF16" and not compiler_accepts(compiler, flags, AVX512_BF16_PROBE):
            print(f"fastbn: {' '.join(compiler)} does not compile AVX512_BF16 code (-mavx512bf16), "
                  "building without that CPU capability")
            continue
        capabilities.append((name, flags))
    return capabilities


def capability_macros(capabilities):
    """The macros that tell the ISA-free sources (csrc/cpu/cpu_capability.cpp) which
    capabilities' kernels are linked in."""
    names = [name for name, _ in capabilities]
    macros = [("FASTBN_X86_KERNELS", None)] if "AVX512" in names else []
    if "AVX512_BF16" in names:
        macros.append(("FASTBN_AVX512_BF16_KERNELS", None))
    return macros


class BuildExtensionPerIsa(BuildExtension):
    """torch's BuildExtension (ninja when available), plus PER_ISA_SOURCES compiled
    once per ISA of the extension's cpu_capabilities with that ISA's flags and linked into the
    extension after every other object, lowest ISA first.

    Why that order: an inline function of a shared header (c10, std, bn_math.h)
    that several objects emit out of line is resolved to the first copy in link
    order. Every object that calls it emits its own, so the copy kept comes from
    an object compiled for the caller's ISA or a lower one: DEFAULT code never
    runs an AVX-512 copy.
    """

    def build_extension(self, ext):
        cxx_flags = ext.extra_compile_args["cxx"]  # with the flags BuildExtension added
        if quick_cpu_kernels():
            print("fastbn: FASTBN_QUICK_CPU_KERNELS=1, CPU kernels built with " + " ".join(QUICK_CPU_KERNEL_FLAGS))

        def compile_for(capability, flags):
            return self.compiler.compile(
                PER_ISA_SOURCES,
                output_dir=os.path.join(self.build_temp, f"cpu_{capability}"),
                macros=ext.define_macros + [("CPU_CAPABILITY", capability), (f"CPU_CAPABILITY_{capability}", None)]
                + [(f"CPU_CAPABILITY_{implied}", None) for implied in IMPLIED_CAPABILITY_MACROS.get(capability, [])],
                include_dirs=ext.include_dirs,
                debug=self.debug,
                extra_postargs=per_isa_compile_flags(cxx_flags, flags),
                depends=ext.depends,
            )

        # The ISAs side by side, and beside the extension's own sources (nvcc's the
        # longest): each is its own ninja build in its own folder. The per-ISA objects
        # are needed only at the link, so the link waits for them. One after the
        # other, the ISAs took three times one compile (~35 s each), and before the
        # nvcc compile a GPU machine's build (16 cores) spent its first ~100 s on them.
        capabilities = ext.cpu_capabilities
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(capabilities)) as pool:
            per_isa = [pool.submit(compile_for, capability, flags) for capability, flags in capabilities]

            def isa_objects():  # lowest ISA first; raises an ISA's compile error
                return [obj for future in per_isa for obj in future.result()]

            if not self.use_ninja:
                # Without ninja, torch swaps the compiler itself (compiler_so) for each .cu file
                # on the shared compiler object: no C++ compile may run beside the nvcc ones.
                ext.extra_objects = isa_objects()
                super().build_extension(ext)
                return
            link = self.compiler.link_shared_object
            self.compiler.link_shared_object = lambda objects, *args, **kwargs: link(
                list(objects) + isa_objects(), *args, **kwargs)
            try:
                super().build_extension(ext)
            finally:
                self.compiler.link_shared_object = link
            isa_objects()  # an ISA's compile error, also where nothing was linked


def make_extension(capabilities):
    use_cuda = want_cuda()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    # Without ISA flags: the operator entry points, checks and the ISA choice.
    macros = capability_macros(capabilities)
    # setuptools relinks when one of these is newer than the extension; the
    # per-ISA objects are rebuilt by their own (ninja) dependency tracking.
    depends = sorted(PER_ISA_SOURCES + glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/**/*.cuh", recursive=True))
    cxx_flags = ["-O3", "-g0", "-fno-math-errno", "-Wno-unknown-pragmas"]
    # at::parallel_for runs its loop serially unless the extension itself is built
    # with OpenMP (ATen's header checks _OPENMP). torch ships libgomp.so.1, which
    # the extension then shares.
    link_flags = []
    if platform.system() == "Linux":
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
        # Link the C++ runtime torch runs with, by its path, ahead of the compiler's own
        # choice. A toolchain that finds only a static libstdc++ (seen on a GPU machine:
        # a g++ wrapper whose -B folder holds libstdc++.a) otherwise puts a second copy
        # of the runtime into the extension, and torch's error messages, built with one
        # copy's streams and locale and read with the other's, crash the process
        # (SIGSEGV in std::ostream, at the first TORCH_CHECK that fails in a CUDA file).
        libstdcxx = loaded_libstdcxx()
        if libstdcxx:
            link_flags.append(libstdcxx)
    if use_cuda:
        # No GPU visible means torch cannot guess the architectures (it crashes with IndexError).
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        macros.append(("FASTBN_WITH_CUDA", None))
        nvcc_flags = ["-O3", "-Xcompiler", "-g0", "-lineinfo", "--expt-relaxed-constexpr"]
        extension = CUDAExtension(
            "fastbn._C",
            sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=macros,
            depends=depends,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    else:
        extension = CppExtension(
            "fastbn._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=macros,
            depends=depends,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    extension.cpu_capabilities = capabilities  # for BuildExtensionPerIsa
    return extension


# Not built for Python's limited API: csrc/eager.cpp uses torch's Python bindings
# (libtorch_python), which torch builds per Python version anyway.
# (Guarded so that tests can import the helpers above; pip runs this file as __main__.)
if __name__ == "__main__":
    setup(
        ext_modules=[make_extension(cpu_capabilities())],
        cmdclass={"build_ext": BuildExtensionPerIsa},
    )
