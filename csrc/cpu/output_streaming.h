// The output size from which the CPU kernels write y and dx with streaming stores
// (stream_output in work_division.h). Whether that pays depends on whether a layer's
// output would still be in the last-level cache when the next layer reads it, so the
// threshold follows this machine's L3 rather than one fixed size (bench/NOTES.md,
// twenty-second and twenty-third sessions). Compiled without ISA flags, like
// everything outside csrc/cpu/per_isa/.
#pragma once

#include <cstdint>

namespace fastbn::cpu {

// The bounds of the rule: never from below the size from which the channels_last
// passes walk rows in memory order (kRowOrderBytes: smaller tensors come back from
// L2), never from above the size past which a tensor counts as out of cache
// (kOutOfCacheBytes).
constexpr int64_t kMinStreamingBytes = int64_t(4) << 20;
constexpr int64_t kMaxStreamingBytes = int64_t(16) << 20;

// Bytes of the largest data cache cpu0 reports in sysfs (Linux:
// /sys/devices/system/cpu/cpu0/cache/index*/), 0 where there is none to read.
// Not sysconf(_SC_LEVEL3_CACHE_SIZE): glibc derives it from cpuid, which a KVM
// guest on a Zen 4 host reported as 320 MiB where sysfs and lscpu say 32 MiB.
int64_t last_level_cache_bytes();

// The rule: an eighth of the last-level cache, within [kMinStreamingBytes,
// kMaxStreamingBytes]; kMaxStreamingBytes where the cache size is unknown (0).
int64_t streaming_bytes_for_cache(int64_t last_level_cache_bytes);

// The threshold in use: streaming_bytes_for_cache(last_level_cache_bytes()) unless a
// test or benchmark set another (set_streaming_bytes, process-wide).
int64_t streaming_bytes();
void set_streaming_bytes(int64_t bytes);

}  // namespace fastbn::cpu
