// Which ISA's CPU kernels run (see cpu_kernels.h): the best one this CPU
// supports, a lower one named by FASTBN_CPU_CAPABILITY=DEFAULT|AVX2|AVX512|AVX512_BF16 in
// the environment (read at the first use), or one a test sets in-process.
// Compiled without ISA flags, like everything outside csrc/cpu/per_isa/.
#pragma once

#include <string>
#include <vector>

#include "cpu/cpu_kernels.h"

namespace fastbn::cpu {

enum class CpuCapability : int { Default = 0, AVX2 = 1, AVX512 = 2, AVX512_BF16 = 3 };

// "DEFAULT", "AVX2", "AVX512" (at::vec's names) or "AVX512_BF16".
const char* capability_name(CpuCapability capability);

// The capabilities this build carries and this CPU can run, lowest first
// (AVX2: avx2, fma, f16c; AVX512: avx512 f, bw, vl, dq as well; AVX512_BF16:
// avx512_bf16 as well).
std::vector<CpuCapability> supported_capabilities();

// The capability whose kernels run. The first call reads FASTBN_CPU_CAPABILITY;
// a value that names no capability, or one this CPU or build lacks, is an error
// (c10::Error, on this and every later call) rather than a silent substitute.
CpuCapability active_capability();

// Runs `name`'s kernels from now on (tests compare the ISAs in one process);
// an error, changing nothing, for a name that is not supported here.
void set_active_capability(const std::string& name);

// The kernels of active_capability().
const CpuKernels& active_kernels();

}  // namespace fastbn::cpu
