#include "cpu/output_streaming.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <fstream>
#include <string>

namespace fastbn::cpu {
namespace {

// "32768K", "1M", "512" (bytes) as sysfs writes cache sizes; 0 for anything else.
int64_t parse_cache_size(const std::string& text) {
  size_t digits = 0;
  while (digits < text.size() && text[digits] >= '0' && text[digits] <= '9') ++digits;
  if (digits == 0 || digits > 12) return 0;
  const int64_t value = std::stoll(text.substr(0, digits));
  const std::string suffix = text.substr(digits);
  if (suffix.empty()) return value;
  if (suffix == "K") return value << 10;
  if (suffix == "M") return value << 20;
  if (suffix == "G") return value << 30;
  return 0;
}

std::string read_word(const std::string& path) {
  std::ifstream file(path);
  std::string word;
  file >> word;
  return word;
}

constexpr int64_t kUnset = -1;
std::atomic<int64_t> chosen{kUnset};

}  // namespace

int64_t last_level_cache_bytes() {
  int best_level = 0;
  int64_t bytes = 0;
  for (int index = 0; index < 16; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    const std::string type = read_word(dir + "type");
    if (type.empty()) break;  // no such index: the list ends
    if (type == "Instruction") continue;
    const std::string level = read_word(dir + "level");
    const int level_value = level.size() == 1 && level[0] >= '1' && level[0] <= '9' ? level[0] - '0' : 0;
    const int64_t size = parse_cache_size(read_word(dir + "size"));
    if (level_value > best_level && size > 0) {
      best_level = level_value;
      bytes = size;
    }
  }
  return bytes;
}

int64_t streaming_bytes_for_cache(int64_t cache_bytes) {
  if (cache_bytes <= 0) return kMaxStreamingBytes;
  return std::clamp(cache_bytes / 8, kMinStreamingBytes, kMaxStreamingBytes);
}

int64_t streaming_bytes() {
  int64_t value = chosen.load(std::memory_order_relaxed);
  if (value == kUnset) {
    int64_t expected = kUnset;
    // keeps what a concurrent first call or a test's set_streaming_bytes stored first
    chosen.compare_exchange_strong(expected, streaming_bytes_for_cache(last_level_cache_bytes()),
                                   std::memory_order_relaxed);
    value = chosen.load(std::memory_order_relaxed);
  }
  return value;
}

void set_streaming_bytes(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "fastbn: the streaming threshold must be a size in bytes (>= 0), got ", bytes);
  chosen.store(bytes, std::memory_order_relaxed);
}

}  // namespace fastbn::cpu
