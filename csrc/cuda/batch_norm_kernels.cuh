// CUDA kernels of fastbn's batch norm. Two implementations:
//
// General (any size): a reduction kernel writes per-(channel, split) partial
// statistics, a per-channel kernel merges them into the outputs and the
// per-channel coefficients of bn_math.h, and an elementwise kernel applies them.
//
// On-chip (a channel's values fit in the registers of one block): one kernel
// reads each value from global memory once, keeps it in registers for the
// reduction and the transform, and writes each output once (forward: 1 read +
// 1 write; backward: 2 reads + 1 write).
//
// Planar layout: (N, C, S) with S contiguous. Interleaved: (R, C) with C contiguous.
// index_t is int32_t when every offset fits, int64_t otherwise.
#pragma once

#include <cuda_runtime.h>

#include "bn_math.h"
#include "cuda/block_reduce.cuh"

namespace fastbn::cuda {

constexpr int kInterleavedRows = 8;  // rows per block of the interleaved general kernels (x 32 channels)

// The fused activation, a runtime argument: the switch is uniform across a
// launch, so it costs a few instructions, not a template instantiation each.
template <typename acc_t>
struct ActivationArgs {
  Activation act;
  acc_t param;
  __device__ __forceinline__ acc_t forward(acc_t z) const { return activation_forward(act, z, param); }
  // dy * act'(z) with z recomputed from x by the forward coefficients, plus
  // batch_norm_add_act's residual r (0 without one).
  __device__ __forceinline__ acc_t grad(acc_t dy, const ForwardCoefficients<acc_t>& k, acc_t x, acc_t r) const {
    return act == Activation::Identity ? dy : dy * activation_grad(act, forward_apply(k, x) + r, param);
  }
};

// The residual's value i in acc_t, 0 where there is none.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t residual_at(const scalar_t* __restrict__ residual, int64_t i) {
  return residual == nullptr ? acc_t(0) : acc_t(residual[i]);
}

template <typename acc_t>
struct ChannelParams {
  const acc_t* weight;  // null: 1
  const acc_t* bias;    // null: 0
  __device__ __forceinline__ acc_t w(int64_t c) const { return weight ? weight[c] : acc_t(1); }
  __device__ __forceinline__ acc_t b(int64_t c) const { return bias ? bias[c] : acc_t(0); }
};

// One value's terms of the backward sums, formed in double (BackwardSums says why):
// g = dy * act'(z), v = x, mu = the channel's mean.
template <typename acc_t>
__device__ __forceinline__ void backward_sums_push(BackwardSums& sums, acc_t g, acc_t v, acc_t mu) {
  const double xmu = double(v) - double(mu);  // exact for float32 values of similar exponents
  sums.dy += double(g);
  sums.dy_xmu += double(g) * xmu;
  sums.xmu += xmu;
}

// sum(dy * (x - mean)) of one channel from its sums, in training about the batch's
// own mean rather than the rounded one the forward saved (sum_dy_xmu_about_batch_mean).
template <typename acc_t>
__device__ __forceinline__ double channel_sum_dy_xmu(const BackwardSums& sums, acc_t mean, acc_t var, int64_t count,
                                                    bool train) {
  return train ? sum_dy_xmu_about_batch_mean(sums.dy_xmu, sums.xmu, sums.dy, count, double(mean), double(var),
                                             double(std::numeric_limits<acc_t>::epsilon()))
               : sums.dy_xmu;
}

// grad_weight from the double sum, rounded once (in float, 1/sqrt(var + eps) and the
// product would add two roundings: 1 unit in the last place where torch had 0.06).
template <typename acc_t>
__device__ __forceinline__ acc_t channel_grad_weight(double sum_dy_xmu, acc_t var, acc_t eps) {
  return acc_t(grad_weight_from_sums(sum_dy_xmu, double(var), double(eps)));
}

// ------------------------------------------------------------------ general: reductions

// grid (C, splits), block (tx, ty): thread (tx, ty) of split j reads rows n = j * ty + y (+ k * splits * ty).
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void planar_moments_kernel(const scalar_t* __restrict__ x, Moments<acc_t>* __restrict__ partial,
                                      index_t N, index_t C, index_t S) {
  __shared__ Moments<acc_t> shared[kWarpSize];
  const index_t c = blockIdx.x;
  Moments<acc_t> m{acc_t(0), acc_t(0), 0};
  for (index_t n = blockIdx.y * blockDim.y + threadIdx.y; n < N; n += gridDim.y * blockDim.y) {
    const scalar_t* row = x + (n * C + c) * S;
    for (index_t s = threadIdx.x; s < S; s += blockDim.x) moments_push(m, acc_t(row[s]));
  }
  m = block_reduce_broadcast(m, shared, Moments<acc_t>{acc_t(0), acc_t(0), 0});
  if (threadIdx.x == 0 && threadIdx.y == 0) partial[int64_t(c) * gridDim.y + blockIdx.y] = m;
}

// grid (ceil(C / 32), splits), block (32, kInterleavedRows).
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void interleaved_moments_kernel(const scalar_t* __restrict__ x, Moments<acc_t>* __restrict__ partial,
                                           index_t R, index_t C) {
  __shared__ Moments<acc_t> shared[kInterleavedRows * kWarpSize];
  const index_t c = blockIdx.x * kWarpSize + threadIdx.x;
  Moments<acc_t> m{acc_t(0), acc_t(0), 0};
  if (c < C) {
    for (index_t r = blockIdx.y * blockDim.y + threadIdx.y; r < R; r += gridDim.y * blockDim.y) {
      moments_push(m, acc_t(x[r * C + c]));
    }
  }
  m = column_reduce_broadcast(m, shared);
  if (threadIdx.y == 0 && c < C) partial[int64_t(c) * gridDim.y + blockIdx.y] = m;
}

// One thread per channel: merge the splits' moments; write mean, biased var and
// the forward coefficients.
template <typename acc_t>
__global__ void finalize_moments_kernel(const Moments<acc_t>* __restrict__ partial, int splits, int64_t C,
                                        ChannelParams<acc_t> params, acc_t eps, acc_t* __restrict__ mean_out,
                                        acc_t* __restrict__ var_out, ForwardCoefficients<acc_t>* __restrict__ coef) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const Moments<acc_t> m = combine_pairwise(partial + c * splits, splits, Moments<acc_t>{acc_t(0), acc_t(0), 0});
  const acc_t var = moments_biased_var(m);
  mean_out[c] = m.mean;
  var_out[c] = var;
  coef[c] = forward_coefficients(m.mean, var, eps, params.w(c), params.b(c));
}

// Evaluation: coefficients from given statistics.
template <typename acc_t>
__global__ void eval_coefficients_kernel(const acc_t* __restrict__ mean, const acc_t* __restrict__ var, int64_t C,
                                         ChannelParams<acc_t> params, acc_t eps,
                                         ForwardCoefficients<acc_t>* __restrict__ coef) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < C) coef[c] = forward_coefficients(mean[c], var[c], eps, params.w(c), params.b(c));
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void planar_backward_sums_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                            const scalar_t* __restrict__ residual, const acc_t* __restrict__ mean,
                                            const ForwardCoefficients<acc_t>* __restrict__ fcoef,
                                            ActivationArgs<acc_t> act, BackwardSums* __restrict__ partial,
                                            index_t N, index_t C, index_t S) {
  __shared__ BackwardSums shared[kWarpSize];
  const index_t c = blockIdx.x;
  const acc_t mu = mean[c];
  const ForwardCoefficients<acc_t> fk = fcoef[c];
  BackwardSums sums{0.0, 0.0, 0.0};
  for (index_t n = blockIdx.y * blockDim.y + threadIdx.y; n < N; n += gridDim.y * blockDim.y) {
    const index_t base = (n * C + c) * S;
    for (index_t s = threadIdx.x; s < S; s += blockDim.x) {
      const acc_t v = acc_t(x[base + s]);
      const acc_t g = act.grad(acc_t(dy[base + s]), fk, v, residual_at<scalar_t, acc_t>(residual, base + s));
      backward_sums_push(sums, g, v, mu);
    }
  }
  sums = block_reduce_broadcast(sums, shared, BackwardSums{0.0, 0.0, 0.0});
  if (threadIdx.x == 0 && threadIdx.y == 0) partial[int64_t(c) * gridDim.y + blockIdx.y] = sums;
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void interleaved_backward_sums_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                                 const scalar_t* __restrict__ residual, const acc_t* __restrict__ mean,
                                                 const ForwardCoefficients<acc_t>* __restrict__ fcoef,
                                                 ActivationArgs<acc_t> act, BackwardSums* __restrict__ partial,
                                                 index_t R, index_t C) {
  __shared__ BackwardSums shared[kInterleavedRows * kWarpSize];
  const index_t c = blockIdx.x * kWarpSize + threadIdx.x;
  BackwardSums sums{0.0, 0.0, 0.0};
  if (c < C) {
    const acc_t mu = mean[c];
    const ForwardCoefficients<acc_t> fk = fcoef[c];
    for (index_t r = blockIdx.y * blockDim.y + threadIdx.y; r < R; r += gridDim.y * blockDim.y) {
      const acc_t v = acc_t(x[r * C + c]);
      const acc_t g = act.grad(acc_t(dy[r * C + c]), fk, v, residual_at<scalar_t, acc_t>(residual, r * C + c));
      backward_sums_push(sums, g, v, mu);
    }
  }
  sums = column_reduce_broadcast(sums, shared);
  if (threadIdx.y == 0 && c < C) partial[int64_t(c) * gridDim.y + blockIdx.y] = sums;
}

// One thread per channel: grad_weight, grad_bias and the dx coefficients.
template <typename acc_t>
__global__ void finalize_backward_kernel(const BackwardSums* __restrict__ partial, int splits, int64_t C,
                                         const acc_t* __restrict__ mean, const acc_t* __restrict__ var,
                                         ChannelParams<acc_t> params, acc_t eps, int64_t count, bool train,
                                         acc_t* __restrict__ grad_weight, acc_t* __restrict__ grad_bias,
                                         BackwardCoefficients<acc_t>* __restrict__ coef) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const BackwardSums sums = combine_pairwise(partial + c * splits, splits, BackwardSums{0.0, 0.0, 0.0});
  const double sum_dy_xmu = channel_sum_dy_xmu(sums, mean[c], var[c], count, train);
  grad_bias[c] = acc_t(sums.dy);
  grad_weight[c] = channel_grad_weight(sum_dy_xmu, var[c], eps);
  coef[c] = backward_coefficients(mean[c], var[c], eps, params.w(c), acc_t(sums.dy), acc_t(sum_dy_xmu), count, train);
}

// SyncBatchNorm's phases: the channel sums alone, and dx coefficients from sums
// reduced across processes (count: values of the global batch). sum(dy * (x - mean))
// stays about the saved mean, as in torch's SyncBatchNorm: its correction needs the
// global sum(dy) and sum(x - mean), which the op's outputs do not carry.
template <typename acc_t>
__global__ void finalize_sums_kernel(const BackwardSums* __restrict__ partial, int splits, int64_t C,
                                     acc_t* __restrict__ sum_dy, acc_t* __restrict__ sum_dy_xmu) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const BackwardSums sums = combine_pairwise(partial + c * splits, splits, BackwardSums{0.0, 0.0, 0.0});
  sum_dy[c] = acc_t(sums.dy);
  sum_dy_xmu[c] = acc_t(sums.dy_xmu);
}

template <typename acc_t>
__global__ void backward_coefficients_kernel(const acc_t* __restrict__ mean, const acc_t* __restrict__ var,
                                             const acc_t* __restrict__ sum_dy, const acc_t* __restrict__ sum_dy_xmu,
                                             int64_t C, ChannelParams<acc_t> params, acc_t eps, int64_t count,
                                             BackwardCoefficients<acc_t>* __restrict__ coef) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < C) coef[c] = backward_coefficients(mean[c], var[c], eps, params.w(c), sum_dy[c], sum_dy_xmu[c], count, true);
}

// ------------------------------------------------------------------ general: elementwise

// grid (S blocks, planes), planes = N * C looped over gridDim.y.
// residual (may be null) is added before the activation: act(bn(x) + residual).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t add_residual(acc_t z, const scalar_t* __restrict__ residual, int64_t i) {
  return residual == nullptr ? z : z + acc_t(residual[i]);
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void planar_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual,
                                      scalar_t* __restrict__ y, const ForwardCoefficients<acc_t>* __restrict__ coef,
                                      ActivationArgs<acc_t> act, index_t planes, index_t C, index_t S) {
  for (index_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
    const ForwardCoefficients<acc_t> k = coef[plane % C];
    const index_t base = plane * S;
    for (index_t s = blockIdx.x * blockDim.x + threadIdx.x; s < S; s += gridDim.x * blockDim.x) {
      y[base + s] = scalar_t(act.forward(add_residual(forward_apply(k, acc_t(x[base + s])), residual, base + s)));
    }
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void interleaved_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual,
                                           scalar_t* __restrict__ y,
                                           const ForwardCoefficients<acc_t>* __restrict__ coef,
                                           ActivationArgs<acc_t> act, index_t total, index_t C) {
  for (index_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    y[i] = scalar_t(act.forward(add_residual(forward_apply(coef[i % C], acc_t(x[i])), residual, i)));
  }
}

// Elementwise maps with per-channel coefficients: op(i, c) for every value i of channel c.
template <typename index_t, typename Op>
__global__ void planar_map_kernel(Op op, index_t planes, index_t C, index_t S) {
  for (index_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
    const index_t base = plane * S, c = plane % C;
    for (index_t s = blockIdx.x * blockDim.x + threadIdx.x; s < S; s += gridDim.x * blockDim.x) op(base + s, c);
  }
}

template <typename index_t, typename Op>
__global__ void interleaved_map_kernel(Op op, index_t total, index_t C) {
  for (index_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) op(i, i % C);
}

// In-place activated BN (batch_norm_invert_output): from y = act(z), the
// gradient dy * act'(z) and the centered input (z - bias) / scale.
template <typename scalar_t, typename acc_t>
struct InvertOutputOp {
  const scalar_t* __restrict__ dy;
  const scalar_t* __restrict__ y;
  const ForwardCoefficients<acc_t>* __restrict__ coef;
  ActivationArgs<acc_t> act;
  acc_t elu_floor;  // elu_inverse_floor<scalar_t>()
  acc_t* __restrict__ grad;
  acc_t* __restrict__ centered;
  template <typename index_t>
  __device__ __forceinline__ void operator()(index_t i, index_t c) const {
    const acc_t out = acc_t(y[i]);
    grad[i] = acc_t(dy[i]) * activation_grad_from_output(act.act, out, act.param);
    centered[i] = centered_input_from_z(coef[c], activation_inverse(act.act, out, act.param, elu_floor));
  }
};

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void planar_backward_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                       const scalar_t* __restrict__ residual, scalar_t* __restrict__ dx,
                                       scalar_t* __restrict__ grad_residual,
                                       const ForwardCoefficients<acc_t>* __restrict__ fcoef,
                                       const BackwardCoefficients<acc_t>* __restrict__ coef, ActivationArgs<acc_t> act,
                                       index_t planes, index_t C, index_t S) {
  for (index_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
    const BackwardCoefficients<acc_t> k = coef[plane % C];
    const ForwardCoefficients<acc_t> fk = fcoef[plane % C];
    const index_t base = plane * S;
    for (index_t s = blockIdx.x * blockDim.x + threadIdx.x; s < S; s += gridDim.x * blockDim.x) {
      const index_t i = base + s;
      const acc_t v = acc_t(x[i]);
      const acc_t g = act.grad(acc_t(dy[i]), fk, v, residual_at<scalar_t, acc_t>(residual, i));
      dx[i] = scalar_t(backward_apply(k, g, v));
      if (grad_residual != nullptr) grad_residual[i] = scalar_t(g);
    }
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void interleaved_backward_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                            const scalar_t* __restrict__ residual, scalar_t* __restrict__ dx,
                                            scalar_t* __restrict__ grad_residual,
                                            const ForwardCoefficients<acc_t>* __restrict__ fcoef,
                                            const BackwardCoefficients<acc_t>* __restrict__ coef,
                                            ActivationArgs<acc_t> act, index_t total, index_t C) {
  for (index_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    const index_t c = i % C;
    const acc_t v = acc_t(x[i]);
    const acc_t g = act.grad(acc_t(dy[i]), fcoef[c], v, residual_at<scalar_t, acc_t>(residual, i));
    dx[i] = scalar_t(backward_apply(coef[c], g, v));
    if (grad_residual != nullptr) grad_residual[i] = scalar_t(g);
  }
}

// ------------------------------------------------------------------ on-chip
// Planar: one block of kOnChipThreads threads per channel; thread t holds the
// channel's values t, t + T, t + 2T, ... (flat index over N * S), ITEMS of them.
// Interleaved: one block per 32 channels, shaped (32, kOnChipThreads / 32);
// thread (tx, ty) holds rows ty, ty + T/32, ... of channel tx.

constexpr int kOnChipThreads = 512;

// Offset of the flat value i of channel c.
template <typename index_t>
__device__ __forceinline__ index_t planar_offset(index_t i, index_t c, index_t C, index_t S) {
  const index_t n = i / S;
  return (n * C + c) * S + (i - n * S);
}

template <bool kInterleaved, typename index_t>
struct OnChipTile {
  index_t C, S, count;  // count: values per channel (N * S, or R rows)
  index_t c;            // this thread's channel
  index_t first;        // this thread's first value index within the channel
  index_t stride;       // between its values
  bool active;          // the thread's channel exists (interleaved tail)

  __device__ OnChipTile(index_t C_, index_t S_, index_t count_) : C(C_), S(S_), count(count_) {
    if (kInterleaved) {
      c = blockIdx.x * kWarpSize + threadIdx.x;
      first = threadIdx.y;
      stride = blockDim.y;
      active = c < C;
    } else {
      c = blockIdx.x;
      first = threadIdx.x;
      stride = blockDim.x;
      active = true;
    }
  }
  __device__ __forceinline__ bool has(int k) const { return active && first + k * stride < count; }
  __device__ __forceinline__ index_t offset(int k) const {
    const index_t i = first + k * stride;
    return kInterleaved ? i * C + c : planar_offset(i, c, C, S);
  }
  // Sum over the channel, broadcast to its threads. shared: kOnChipThreads values.
  template <typename T>
  __device__ T reduce(T value, T* shared, const T& identity) const {
    return kInterleaved ? column_reduce_broadcast(value, shared) : block_reduce_broadcast(value, shared, identity);
  }
};

template <typename scalar_t, typename acc_t, typename index_t, bool kInterleaved, int ITEMS>
__global__ void __launch_bounds__(kOnChipThreads) onchip_forward_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual, scalar_t* __restrict__ y,
    acc_t* __restrict__ mean_out,
    acc_t* __restrict__ var_out, ChannelParams<acc_t> params, acc_t eps, ActivationArgs<acc_t> act, index_t C,
    index_t S, index_t count) {
  __shared__ SumPair<acc_t> shared[kOnChipThreads];
  const OnChipTile<kInterleaved, index_t> tile(C, S, count);
  acc_t v[ITEMS];
  acc_t sum = 0;
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    v[k] = tile.has(k) ? acc_t(x[tile.offset(k)]) : acc_t(0);
    sum += v[k];
  }
  const SumPair<acc_t> zero{acc_t(0), acc_t(0)};
  // Two passes over registers: the mean, then squared deviations from it (exact two-pass variance).
  const acc_t mean = tile.reduce(SumPair<acc_t>{sum, acc_t(0)}, shared, zero).a / acc_t(count);
  acc_t m2 = 0;
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const acc_t d = v[k] - mean;
    m2 += tile.has(k) ? d * d : acc_t(0);
  }
  const acc_t var = tile.reduce(SumPair<acc_t>{m2, acc_t(0)}, shared, zero).a / acc_t(count);
  if (!tile.active) return;
  if (tile.first == 0) {
    mean_out[tile.c] = mean;
    var_out[tile.c] = var;
  }
  const auto coef = forward_coefficients(mean, var, eps, params.w(tile.c), params.b(tile.c));
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    if (tile.has(k)) {
      const index_t i = tile.offset(k);
      y[i] = scalar_t(act.forward(add_residual(forward_apply(coef, v[k]), residual, i)));
    }
  }
}

template <typename scalar_t, typename acc_t, typename index_t, bool kInterleaved, int ITEMS>
__global__ void __launch_bounds__(kOnChipThreads) onchip_backward_kernel(
    const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual,
    scalar_t* __restrict__ dx, scalar_t* __restrict__ grad_residual, const acc_t* __restrict__ mean,
    const acc_t* __restrict__ var, ChannelParams<acc_t> params, acc_t eps,
    bool train, ActivationArgs<acc_t> act, acc_t* __restrict__ grad_weight, acc_t* __restrict__ grad_bias, index_t C,
    index_t S, index_t count) {
  __shared__ BackwardSums shared[kOnChipThreads];
  const OnChipTile<kInterleaved, index_t> tile(C, S, count);
  const acc_t mu = tile.active ? mean[tile.c] : acc_t(0);
  const acc_t channel_var = tile.active ? var[tile.c] : acc_t(1);
  const auto fk = forward_coefficients(mu, channel_var, eps, tile.active ? params.w(tile.c) : acc_t(1),
                                       tile.active ? params.b(tile.c) : acc_t(0));
  acc_t g[ITEMS], v[ITEMS];
  BackwardSums sums{0.0, 0.0, 0.0};
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const bool has = tile.has(k);
    v[k] = has ? acc_t(x[tile.offset(k)]) : mu;  // mu where absent: adds 0 to sum(x - mean)
    g[k] = has ? act.grad(acc_t(dy[tile.offset(k)]), fk, v[k], residual_at<scalar_t, acc_t>(residual, tile.offset(k)))
               : acc_t(0);
    backward_sums_push(sums, g[k], v[k], mu);  // g = 0, v = mu where absent
  }
  sums = tile.reduce(sums, shared, BackwardSums{0.0, 0.0, 0.0});
  if (!tile.active) return;
  const double sum_dy_xmu = channel_sum_dy_xmu(sums, mu, channel_var, int64_t(count), train);
  if (tile.first == 0) {
    grad_bias[tile.c] = acc_t(sums.dy);
    grad_weight[tile.c] = channel_grad_weight(sum_dy_xmu, channel_var, eps);
  }
  const auto coef = backward_coefficients(mu, channel_var, eps, params.w(tile.c), acc_t(sums.dy), acc_t(sum_dy_xmu),
                                          int64_t(count), train);
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    if (tile.has(k)) {
      dx[tile.offset(k)] = scalar_t(backward_apply(coef, g[k], v[k]));
      if (grad_residual != nullptr) grad_residual[tile.offset(k)] = scalar_t(g[k]);
    }
  }
}

// Running statistics, one thread per channel, in double like the CPU kernel.
template <typename stat_t, typename acc_t>
__global__ void update_running_stat_kernel(stat_t* __restrict__ running, const acc_t* __restrict__ batch, bool is_var,
                                           double factor, int64_t count, int64_t C) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  running[c] = stat_t(running_stat_update(double(running[c]), double(batch[c]), is_var, factor, count));
}

// A running statistic expanded from one value (stride 0, which torch accepts): that value
// takes every channel's update in turn, as torch's kernel does on one thread (and the CPU
// entry point), in double, rounded once. One thread: rare, and C updates are few.
template <typename stat_t, typename acc_t>
__global__ void update_shared_running_stat_kernel(stat_t* __restrict__ running, const acc_t* __restrict__ batch,
                                                  bool is_var, double factor, int64_t count, int64_t C) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  double value = double(running[0]);
  for (int64_t c = 0; c < C; ++c) value = running_stat_update(value, double(batch[c]), is_var, factor, count);
  running[0] = stat_t(value);
}

}  // namespace fastbn::cuda
