#include "cpu/cpu_capability.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>

namespace fastbn::cpu {
namespace {

constexpr CpuCapability kAll[] = {CpuCapability::Default, CpuCapability::AVX2, CpuCapability::AVX512,
                                   CpuCapability::AVX512_BF16};

// The best capability the running CPU (and OS: __builtin_cpu_supports checks
// that it saves the AVX / AVX-512 registers) supports among those compiled in.
CpuCapability best_supported() {
#if defined(FASTBN_X86_KERNELS)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#if defined(FASTBN_AVX512_BF16_KERNELS)  // (setup.py leaves them out where the compiler cannot build them)
  if (avx512 && __builtin_cpu_supports("avx512bf16")) return CpuCapability::AVX512_BF16;
#endif
  if (avx512) return CpuCapability::AVX512;
  if (avx2) return CpuCapability::AVX2;
#endif
  return CpuCapability::Default;
}

std::string supported_names() {
  std::string names;
  for (const CpuCapability c : supported_capabilities()) names += std::string(names.empty() ? "" : ", ") + capability_name(c);
  return names;
}

// The supported capability called `name` (any case); `what` names the setting in errors.
CpuCapability supported_by_name(const std::string& name, const std::string& what) {
  std::string upper = name;
  std::transform(upper.begin(), upper.end(), upper.begin(), [](unsigned char ch) { return char(std::toupper(ch)); });
  const auto* known = std::find_if(std::begin(kAll), std::end(kAll),
                                   [&](CpuCapability c) { return upper == capability_name(c); });
  TORCH_CHECK(known != std::end(kAll), "fastbn: ", what, " must be DEFAULT, AVX2, AVX512 or AVX512_BF16, got '",
              name, "'");
  TORCH_CHECK(*known <= best_supported(), "fastbn: ", what, "=", upper, " is not available here: this CPU and build ",
              "run ", supported_names(), " (AVX2 needs avx2, fma and f16c; AVX512 also avx512f, avx512bw, avx512vl ",
              "and avx512dq; AVX512_BF16 also avx512_bf16; a build for a CPU other than x86-64 carries DEFAULT only)");
  return *known;
}

constexpr int kUnset = -1;
std::atomic<int> chosen{kUnset};

}  // namespace

const char* capability_name(CpuCapability capability) {
  switch (capability) {
    case CpuCapability::AVX2:
      return "AVX2";
    case CpuCapability::AVX512:
      return "AVX512";
    case CpuCapability::AVX512_BF16:
      return "AVX512_BF16";
    default:
      return "DEFAULT";
  }
}

std::vector<CpuCapability> supported_capabilities() {
  std::vector<CpuCapability> supported;
  for (const CpuCapability c : kAll) {
    if (c <= best_supported()) supported.push_back(c);
  }
  return supported;
}

CpuCapability active_capability() {
  int value = chosen.load(std::memory_order_relaxed);
  if (value == kUnset) {
    const char* env = std::getenv("FASTBN_CPU_CAPABILITY");
    const CpuCapability from_env =
        env != nullptr && *env != '\0' ? supported_by_name(env, "FASTBN_CPU_CAPABILITY") : best_supported();
    // keeps what a concurrent first call or a test's set_active_capability stored first
    chosen.compare_exchange_strong(value, static_cast<int>(from_env), std::memory_order_relaxed);
    value = chosen.load(std::memory_order_relaxed);
  }
  return static_cast<CpuCapability>(value);
}

void set_active_capability(const std::string& name) {
  chosen.store(static_cast<int>(supported_by_name(name, "cpu capability")), std::memory_order_relaxed);
}

const CpuKernels& active_kernels() {
  switch (active_capability()) {
#if defined(FASTBN_AVX512_BF16_KERNELS)
    case CpuCapability::AVX512_BF16:
      return AVX512_BF16::kernels;
#endif
#if defined(FASTBN_X86_KERNELS)
    case CpuCapability::AVX512:
      return AVX512::kernels;
    case CpuCapability::AVX2:
      return AVX2::kernels;
#endif
    default:
      return DEFAULT::kernels;
  }
}

}  // namespace fastbn::cpu
