// Launch configuration of the CUDA entry points (batch_norm_cuda.cu, its only
// includer: hence the unnamed namespace): grid and block sizes, the index-width and
// item-count switches, and the one chooser between the on-chip and the general
// implementation.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "bn_checks.h"
#include "cuda/batch_norm_kernels.cuh"
#include "impl_switch.h"

namespace fastbn::cuda {
namespace {

using at::Tensor;

constexpr int kThreads = 256;

int multiprocessor_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// Blocks the general kernels aim for: enough to fill every SM several times.
int64_t target_blocks(const Tensor& t) { return 4 * int64_t(multiprocessor_count(t.get_device())); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Most values a tensor may have for int32 indexing: every offset fits with room
// for a grid-stride step past the end (a loop index must not wrap). The sanitizer
// harness (tests/cuemu) lowers it to run the int64 kernels on small tensors.
#ifndef FASTBN_INT32_INDEX_LIMIT
#define FASTBN_INT32_INDEX_LIMIT (std::numeric_limits<int32_t>::max() / 2)
#endif

// Defines index_t as int32_t when tensor `t` has at most FASTBN_INT32_INDEX_LIMIT
// values, int64_t otherwise.
#define FASTBN_INDEX_SWITCH(t, ...)                                  \
  [&] {                                                              \
    if ((t).numel() <= FASTBN_INT32_INDEX_LIMIT) {                   \
      using index_t = int32_t;                                       \
      return __VA_ARGS__();                                          \
    } else {                                                         \
      using index_t = int64_t;                                       \
      return __VA_ARGS__();                                          \
    }                                                                \
  }()

// Most values a thread of an on-chip block holds (its ITEMS template argument).
constexpr int kOnChipMaxItems = 16;

// Values of one channel that one on-chip block can hold: each thread holds up to
// kOnChipMaxItems of them; a planar block gives all its threads to one channel, an
// interleaved block kOnChipThreads / 32 threads to each of its 32 channels.
int64_t onchip_capacity(const Geometry& g) {
  return int64_t(kOnChipMaxItems) * (g.layout == Layout::Planar ? kOnChipThreads : kOnChipThreads / kWarpSize);
}

// The per-channel values each thread of an on-chip block holds (1, 2, 4, 8 or
// 16), or 0 when the channel is too large for one block.
int onchip_items(const Geometry& g) {
  const int64_t per_thread = ceil_div(g.count(), onchip_capacity(g) / kOnChipMaxItems);
  for (int items = 1; items <= kOnChipMaxItems; items *= 2) {
    if (per_thread <= items) return items;
  }
  return 0;
}

// The one place that picks the implementation; tests force either through
// fastbn.ops.cuda_implementation(...). Forcing the on-chip implementation on a
// channel it cannot hold is refused (not silently turned into the general one:
// a test that forces it must know it ran).
bool use_onchip(const Geometry& g) {
  const int items = onchip_items(g);
  switch (cuda_impl_override()) {
    case CudaImpl::General:
      return false;
    case CudaImpl::OnChip:
      TORCH_CHECK(items > 0, "fastbn: the on-chip implementation was forced, but a channel of ", g.count(),
                  " values is over its limit of ", onchip_capacity(g), " values per channel for the ",
                  g.layout == Layout::Planar ? "contiguous" : "channels_last", " layout");
      return true;
    default:
      return items > 0;
  }
}

// Switch turning the runtime item count into the template parameter.
#define FASTBN_ITEMS_SWITCH(items, ITEMS, ...)  \
  [&] {                                         \
    switch (items) {                            \
      case 1: { constexpr int ITEMS = 1; return __VA_ARGS__(); }   \
      case 2: { constexpr int ITEMS = 2; return __VA_ARGS__(); }   \
      case 4: { constexpr int ITEMS = 4; return __VA_ARGS__(); }   \
      case 8: { constexpr int ITEMS = 8; return __VA_ARGS__(); }   \
      default: { constexpr int ITEMS = kOnChipMaxItems; return __VA_ARGS__(); } \
    }                                           \
  }()

#define FASTBN_BOOL_SWITCH(cond, CONST, ...)   \
  [&] {                                        \
    if (cond) {                                \
      constexpr bool CONST = true;             \
      return __VA_ARGS__();                    \
    } else {                                   \
      constexpr bool CONST = false;            \
      return __VA_ARGS__();                    \
    }                                          \
  }()

template <typename acc_t>
ChannelParams<acc_t> channel_params(const Tensor& weight, const Tensor& bias) {
  return {weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr,
          bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr};
}

// Grid of the general reductions: (channel groups, splits of each channel's values).
struct ReduceLaunch {
  dim3 grid, block;
  int splits;
};

ReduceLaunch reduce_launch(const Geometry& g, const Tensor& t) {
  ReduceLaunch l;
  if (g.layout == Layout::Planar) {
    // x threads along S (coalesced), y threads along N.
    int tx = 32;
    while (tx < g.S && tx < kThreads) tx *= 2;
    const int ty = kThreads / tx;
    const int64_t max_splits = std::max<int64_t>(1, ceil_div(g.N, ty));
    l.splits = int(std::clamp<int64_t>(ceil_div(target_blocks(t), g.C), 1, std::min<int64_t>(max_splits, 65535)));
    l.grid = dim3(unsigned(g.C), unsigned(l.splits));
    l.block = dim3(tx, ty);
  } else {
    const int64_t groups = ceil_div(g.C, kWarpSize);
    const int64_t max_splits = std::max<int64_t>(1, ceil_div(g.count(), kInterleavedRows));
    l.splits = int(std::clamp<int64_t>(ceil_div(target_blocks(t), groups), 1, std::min<int64_t>(max_splits, 65535)));
    l.grid = dim3(unsigned(groups), unsigned(l.splits));
    l.block = dim3(kWarpSize, kInterleavedRows);
  }
  return l;
}

// Grid of the general elementwise kernels.
dim3 elementwise_grid(const Geometry& g, const Tensor& t) {
  const int64_t max_blocks = 8 * int64_t(multiprocessor_count(t.get_device()));
  if (g.layout == Layout::Planar) {
    const int64_t planes = g.N * g.C;
    const int64_t x_blocks = std::min<int64_t>(ceil_div(g.S, kThreads), std::max<int64_t>(1, max_blocks / planes));
    return dim3(unsigned(std::max<int64_t>(1, x_blocks)), unsigned(std::min<int64_t>(planes, 65535)));
  }
  return dim3(unsigned(std::clamp<int64_t>(ceil_div(g.N * g.C * g.S, kThreads), 1, max_blocks)));
}

dim3 onchip_grid(const Geometry& g) {
  return g.layout == Layout::Planar ? dim3(unsigned(g.C)) : dim3(unsigned(ceil_div(g.C, kWarpSize)));
}

dim3 onchip_block(const Geometry& g) {
  return g.layout == Layout::Planar ? dim3(kOnChipThreads) : dim3(kWarpSize, kOnChipThreads / kWarpSize);
}

Tensor workspace(int64_t bytes, const Tensor& like) { return at::empty({bytes}, like.options().dtype(at::kByte)); }

}  // namespace
}  // namespace fastbn::cuda
