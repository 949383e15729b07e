// Warp and block reductions of fastbn's CUDA kernels: Chan merges of Moments
// (statistics) and plain sums (on-chip forward, backward).
#pragma once

#include <cuda_runtime.h>

#include "bn_math.h"

namespace fastbn::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Sum of two per-channel quantities, reduced together (the on-chip forward's sums).
template <typename acc_t>
struct SumPair {
  acc_t a;
  acc_t b;
};

// One channel's backward sums: sum(dy), sum(dy * (x - mean)) and sum(x - mean), about
// the mean the forward saved (rounded to acc_t). They accumulate in double for every
// input dtype, each term formed in double from the float values, so grad_bias,
// grad_weight and SyncBatchNorm's sums are rounded once, at the end (the CPU kernels'
// double lanes do the same). Summed in float (per thread, then the warp and block
// trees), they landed 1.6-11 units in the last place off on small shapes on an H200,
// where torch (cuDNN) stayed under 1: where a channel's terms cancel, float's error
// follows the terms, not the total. sum(x - mean) says how far the saved mean is from
// the values' own (sum_dy_xmu_about_batch_mean). The reductions are memory-bound, so
// the double adds cost little time.
struct BackwardSums {
  double dy;
  double dy_xmu;
  double xmu;
};

template <typename acc_t>
__device__ __forceinline__ Moments<acc_t> shuffle_down(const Moments<acc_t>& m, int offset) {
  Moments<acc_t> other;
  other.mean = __shfl_down_sync(kFullMask, m.mean, offset);
  other.m2 = __shfl_down_sync(kFullMask, m.m2, offset);
  other.count = __shfl_down_sync(kFullMask, static_cast<long long>(m.count), offset);
  return other;
}

template <typename acc_t>
__device__ __forceinline__ SumPair<acc_t> shuffle_down(const SumPair<acc_t>& p, int offset) {
  return {__shfl_down_sync(kFullMask, p.a, offset), __shfl_down_sync(kFullMask, p.b, offset)};
}

__device__ __forceinline__ BackwardSums shuffle_down(const BackwardSums& s, int offset) {
  return {__shfl_down_sync(kFullMask, s.dy, offset), __shfl_down_sync(kFullMask, s.dy_xmu, offset),
          __shfl_down_sync(kFullMask, s.xmu, offset)};
}

template <typename acc_t>
__device__ __forceinline__ Moments<acc_t> combine(const Moments<acc_t>& a, const Moments<acc_t>& b) {
  return moments_merge(a, b);
}

template <typename acc_t>
__device__ __forceinline__ SumPair<acc_t> combine(const SumPair<acc_t>& a, const SumPair<acc_t>& b) {
  return {a.a + b.a, a.b + b.b};
}

__device__ __forceinline__ BackwardSums combine(const BackwardSums& a, const BackwardSums& b) {
  return {a.dy + b.dy, a.dy_xmu + b.dy_xmu, a.xmu + b.xmu};
}

// The total of values[0 .. n) merged pairwise (as a tree: 1+1, 2+2, 4+4, ...), so
// that rounding grows with log2(n), not with n as a running total's does: a float32
// mean merged from 512 splits one by one drifted by 7 units in the last place for
// data near 1e4. n < 2^kMaxLevels. `identity`: the total of no values.
template <typename T>
__device__ T combine_pairwise(const T* __restrict__ values, int n, const T& identity) {
  constexpr int kMaxLevels = 32;
  T pending[kMaxLevels];  // pending[k]: the total of a run of 2^levels[k] values
  int levels[kMaxLevels];
  int top = 0;
  for (int j = 0; j < n; ++j) {
    T total = values[j];
    int level = 0;
    for (; top > 0 && levels[top - 1] == level; ++level) total = combine(pending[--top], total);
    pending[top] = total;
    levels[top++] = level;
  }
  T total = identity;
  while (top > 0) total = combine(pending[--top], total);
  return total;
}

// Lane 0 of each warp gets the warp's total.
template <typename T>
__device__ __forceinline__ T warp_reduce(T value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) value = combine(value, shuffle_down(value, offset));
  return value;
}

// Every thread of the block gets the block's total. `shared` holds kWarpSize
// values; the block size is a multiple of 32 and at most 1024. Ends with a
// barrier, so `shared` can be reused right after.
template <typename T>
__device__ T block_reduce_broadcast(T value, T* shared, const T& identity) {
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  const int warps = (blockDim.x * blockDim.y) / kWarpSize;
  value = warp_reduce(value);
  if (tid % kWarpSize == 0) shared[tid / kWarpSize] = value;
  __syncthreads();
  if (tid < kWarpSize) {
    value = warp_reduce(tid < warps ? shared[tid] : identity);
    if (tid == 0) shared[0] = value;
  }
  __syncthreads();
  value = shared[0];
  __syncthreads();
  return value;
}

// Blocks shaped (32 channels, rows): every thread of column threadIdx.x gets
// the total of its column. `shared` holds blockDim.y * 32 values. Ends with a barrier.
template <typename T>
__device__ T column_reduce_broadcast(T value, T* shared) {
  shared[threadIdx.y * kWarpSize + threadIdx.x] = value;
  __syncthreads();
  if (threadIdx.y == 0) {
    for (int row = 1; row < blockDim.y; ++row) value = combine(value, shared[row * kWarpSize + threadIdx.x]);
    shared[threadIdx.x] = value;
  }
  __syncthreads();
  value = shared[threadIdx.x];
  __syncthreads();
  return value;
}

}  // namespace fastbn::cuda
