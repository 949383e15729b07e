"""How the extension is built: what a toolchain can get wrong without any kernel being wrong."""
import os
import shlex
import struct
import subprocess
import sys

import pytest
import torch

import fastbn  # noqa: F401  (loads fastbn._C)
from conftest import X86_LINUX, load_setup_script

EXTENSION_PATH = sys.modules["fastbn._C"].__file__
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def needed_libraries(path):
    """The DT_NEEDED entries of a 64-bit little-endian ELF shared object."""
    with open(path, "rb") as file:
        data = file.read()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path}: not a 64-bit little-endian ELF file"
    section_offset = struct.unpack_from("<Q", data, 0x28)[0]
    section_size, section_count = struct.unpack_from("<HH", data, 0x3A)
    # (name, type, flags, address, offset, size, link, info, align, entry size)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, section_offset + i * section_size) for i in range(section_count)]
    dynamic = next(section for section in sections if section[1] == 6)  # SHT_DYNAMIC
    strings_offset = sections[dynamic[6]][4]  # its string table
    names = []
    for entry in range(dynamic[4], dynamic[4] + dynamic[5], 16):
        tag, value = struct.unpack_from("<qQ", data, entry)
        if tag == 0:  # DT_NULL
            break
        if tag == 1:  # DT_NEEDED
            start = strings_offset + value
            names.append(data[start:data.index(b"\0", start)].decode())
    return names


def loaded_libstdcxx():
    with open("/proc/self/maps") as maps:
        return {line.split()[-1] for line in maps if "/libstdc++.so" in line}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads ELF files and /proc (Linux)")
def test_extension_shares_torchs_cpp_runtime():
    """The extension links the shared libstdc++ that torch runs with, not a copy of its own.

    A toolchain that finds only libstdc++.a (a g++ wrapper on a GPU machine did) links a
    second C++ runtime into the extension: then the messages of fastbn's errors, written
    through one copy's streams with the other's locale, come out cut short after the first
    number (test_errors.py failed so) or crash the process (a SIGSEGV in std::ostream, seen
    on the GPU). setup.py links torch's libstdc++ by its path to prevent it.
    """
    torch.zeros(1)  # (torch's libraries are loaded)
    assert loaded_libstdcxx(), "torch runs without a shared libstdc++ here: nothing to share"
    needed = needed_libraries(EXTENSION_PATH)
    assert any(name.startswith("libstdc++.so") for name in needed), (
        f"{EXTENSION_PATH} does not link libstdc++ dynamically (it needs {needed}): "
        "the C++ runtime was linked in statically")


def test_error_messages_keep_their_numbers():
    """A check's message formats its numbers (the C++ runtime's streams work in the extension)."""
    x = torch.randn(4, 3, 5, 5)
    with pytest.raises(RuntimeError, match=r"weight should contain 3 elements not 5 \(one per channel"):
        torch.ops.fastbn.batch_norm_train(x, torch.randn(5), None, 1e-5)


@pytest.mark.skipif(not X86_LINUX, reason="the per-ISA build is for x86-64 Linux")
def test_build_leaves_out_avx512_bf16_where_the_compiler_rejects_it(tmp_path):
    """A compiler that rejects -mavx512bf16 (an older GCC or clang) builds the other capabilities, without the
    macro that links AVX512_BF16's kernels in, instead of failing the whole build."""
    setup_script = load_setup_script()
    compiler = setup_script.cxx_compiler()
    assert setup_script.compiler_accepts(compiler, [], "int f() { return 0; }\n")
    assert not setup_script.compiler_accepts(compiler, [], "int f() { return undeclared; }\n")

    old_compiler = tmp_path / "old-c++"  # the real compiler, refusing -mavx512bf16 as an older one does
    old_compiler.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -mavx512bf16 ] && '
                            '{ echo "unrecognized option $a" >&2; exit 1; }; done\n'
                            f'exec {shlex.join(compiler)} "$@"\n')
    old_compiler.chmod(0o755)
    built = setup_script.cpu_capabilities([str(old_compiler)])
    assert [name for name, _ in built] == ["DEFAULT", "AVX2", "AVX512"]
    assert setup_script.capability_macros(built) == [("FASTBN_X86_KERNELS", None)]

    full = setup_script.cpu_capabilities(compiler)
    assert [name for name, _ in full][:3] == ["DEFAULT", "AVX2", "AVX512"]
    assert (("FASTBN_AVX512_BF16_KERNELS", None) in setup_script.capability_macros(full)) == (
        [name for name, _ in full][3:] == ["AVX512_BF16"])


@pytest.mark.skipif(not X86_LINUX, reason="the per-ISA build is for x86-64 Linux")
def test_capability_choice_names_avx512_bf16_only_when_built_with_it():
    """Without FASTBN_AVX512_BF16_KERNELS, the ISA-free source that picks the kernels refers to
    neither AVX512_BF16's kernels nor the CPU feature name an old compiler does not know."""
    from torch.utils.cpp_extension import include_paths

    setup_script = load_setup_script()
    compiler = setup_script.cxx_compiler()
    includes = [f"-I{path}" for path in include_paths() + [os.path.join(ROOT, "csrc")]]

    def preprocessed(macros):
        command = compiler + ["-std=c++17", "-E", "-P", *macros, *includes,
                              os.path.join(ROOT, "csrc", "cpu", "cpu_capability.cpp")]
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    without = preprocessed(["-DFASTBN_X86_KERNELS"])
    assert "avx512bf16" not in without and "AVX512_BF16::kernels" not in without
    assert "AVX512::kernels" in without
    with_it = preprocessed(["-DFASTBN_X86_KERNELS", "-DFASTBN_AVX512_BF16_KERNELS"])
    assert "avx512bf16" in with_it and "AVX512_BF16::kernels" in with_it


def test_quick_cpu_kernels_flag_builds_the_per_isa_objects_at_o1():
    """FASTBN_QUICK_CPU_KERNELS=1 (bench/gpu_run.sh's lease) compiles the per-ISA kernels at -O1: the last -O
    flag wins, so QUICK_CPU_KERNEL_FLAGS must come after the extension's -O3 and the ISA's flags; unset, the
    flags are the extension's and the ISA's alone."""
    setup_script = load_setup_script()
    cxx_flags, isa_flags = ["-O3", "-g0", "-fopenmp"], ["-mavx2", "-mfma"]
    plain = setup_script.per_isa_compile_flags(cxx_flags, isa_flags, environ={})
    assert plain == cxx_flags + isa_flags
    quick = setup_script.per_isa_compile_flags(cxx_flags, isa_flags, environ={"FASTBN_QUICK_CPU_KERNELS": "1"})
    assert quick[:len(plain)] == plain
    assert [flag for flag in quick if flag.startswith("-O")][-1] == "-O1"
    compiler = setup_script.cxx_compiler()
    assert setup_script.compiler_accepts(compiler, setup_script.QUICK_CPU_KERNEL_FLAGS, "int f() { return 0; }\n")
