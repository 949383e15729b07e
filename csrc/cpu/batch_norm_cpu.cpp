// CPU kernels of fastbn's batch-norm operators.
//
// Planar layout (NCHW): a task owns whole channels when there are at least as
// many channels as threads, and computes the statistics and then the output of
// its channel while the channel's values are still in cache. With fewer
// channels than threads, each channel is split into parts whose partial
// statistics are merged first.
// Interleaved layout (channels_last, (N, C)): each thread reduces a block of
// rows into per-channel partial statistics, walking down columns of a few
// channels with the accumulators in registers; the partials are merged, and a
// second parallel pass over rows writes the output.
//
// Statistics are computed in pieces of kPiece values: the mean of a piece, then
// the squared deviations from it while the piece is in L1, and pieces are
// merged with Chan's formula (bn_math.h). This is as stable as a two-pass
// algorithm and reads memory once.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "bn_checks.h"
#include "bn_math.h"
#include "cpu/vec_kernels.h"

namespace fastbn::cpu {
namespace {

using at::Tensor;

// Values per statistics piece: 16 KiB of float, so its second pass hits L1.
constexpr int64_t kPiece = 4096;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Calls f(offset, length) for each contiguous segment of the flat range
// [begin, end) of one planar channel, whose values are N rows of S with
// `row_stride` between rows. Offsets are relative to the channel's first value.
template <typename F>
inline void for_each_segment(int64_t begin, int64_t end, int64_t S, int64_t row_stride, const F& f) {
  int64_t row = begin / S;
  int64_t offset = begin % S;
  while (begin < end) {
    const int64_t length = std::min(S - offset, end - begin);
    f(row * row_stride + offset, length);
    begin += length;
    ++row;
    offset = 0;
  }
}

// How many parts each planar channel is split into, so that all threads work
// even when C is small. Parts are at least kPiece values long.
int64_t planar_parts(const Geometry& g) {
  const int64_t threads = at::get_num_threads();
  if (g.C >= threads) return 1;
  return std::max<int64_t>(1, std::min(ceil_div(threads, g.C), g.count() / kPiece));
}

// The j-th of `parts` near-equal ranges of [0, count).
inline std::pair<int64_t, int64_t> part_range(int64_t count, int64_t parts, int64_t j) {
  return {count * j / parts, count * (j + 1) / parts};
}

// Moments of the flat range [begin, end) of one planar channel, kept in double.
// One pass per piece of kPiece values for the sum and the sum of squares about a
// shift; the shift follows the running mean, so only a first piece far from its
// first value (an outlier there) needs its second pass from L1.
template <typename scalar_t, typename acc_t>
Moments<double> planar_moments(const scalar_t* xc, const Geometry& g, int64_t begin, int64_t end) {
  using red_t = typename ReduceLanes<scalar_t>::red_t;
  const int64_t row_stride = g.C * g.S;
  red_t shift = red_t(xc[(begin / g.S) * row_stride + begin % g.S]);  // the range's first value
  Moments<double> total{0.0, 0.0, 0};
  LaneSums<scalar_t> sums, squares;
  for (int64_t p = begin; p < end; p += kPiece) {
    const int64_t q = std::min(end, p + kPiece);
    for_each_segment(p, q, g.S, row_stride,
                     [&](int64_t off, int64_t len) { span_sum_and_squares(xc + off, len, shift, sums, squares); });
    Moments<double> piece = moments_from_shifted_sums<double>(shift, sums.flush(), squares.flush(), q - p);
    if (statistics_need_second_pass<double>(shift, piece)) {
      for_each_segment(p, q, g.S, row_stride,
                       [&](int64_t off, int64_t len) { span_sum_sq_dev(xc + off, len, red_t(piece.mean), squares); });
      piece.m2 = squares.flush();
    }
    total = moments_merge(total, piece);
    shift = red_t(total.mean);
  }
  return total;
}

// Per-channel parameters as acc_t, with the identity where a tensor is absent.
template <typename acc_t>
struct ChannelParams {
  const acc_t* weight;
  const acc_t* bias;
  acc_t w(int64_t c) const { return weight ? weight[c] : acc_t(1); }
  acc_t b(int64_t c) const { return bias ? bias[c] : acc_t(0); }
};

template <typename acc_t>
ChannelParams<acc_t> channel_params(const Tensor& weight, const Tensor& bias) {
  return {weight.defined() ? weight.data_ptr<acc_t>() : nullptr, bias.defined() ? bias.data_ptr<acc_t>() : nullptr};
}

// ------------------------------------------------------------------ statistics

// Number of row blocks the interleaved reductions split R rows into.
int64_t interleaved_tasks(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / 8));
}

// Rows per statistics piece: about 128 KiB of float, so the second pass over
// the piece hits L2.
int64_t rows_per_piece(int64_t C) { return std::clamp<int64_t>(32768 / std::max<int64_t>(C, 1), 8, 1024); }

// Rows per parallel chunk of the elementwise passes.
int64_t row_grain(int64_t C) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)); }

// Calls f(c0, width) for each block of interleaved channels.
template <typename scalar_t, typename F>
inline void for_each_channel_block(int64_t C, const F& f) {
  constexpr int64_t kBlock = Lanes<scalar_t>::kBlock;
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) f(c0, std::min(kBlock, C - c0));
}

template <typename scalar_t>
std::vector<Moments<double>> planar_channel_moments(const scalar_t* x, const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t parts = planar_parts(g);
  std::vector<Moments<double>> partial(g.C * parts);
  at::parallel_for(0, g.C * parts, 1, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      const auto [begin, end] = part_range(g.count(), parts, t % parts);
      partial[t] = planar_moments<scalar_t, acc_t>(x + (t / parts) * g.S, g, begin, end);
    }
  });
  std::vector<Moments<double>> moments(g.C, Moments<double>{0.0, 0.0, 0});
  for (int64_t c = 0; c < g.C; ++c) {
    for (int64_t j = 0; j < parts; ++j) moments[c] = moments_merge(moments[c], partial[c * parts + j]);
  }
  return moments;
}

template <typename scalar_t>
std::vector<Moments<double>> interleaved_channel_moments(const scalar_t* x, const Geometry& g) {
  using red_t = typename ReduceLanes<scalar_t>::red_t;
  const int64_t C = g.C, rows = g.count(), padded = round_up(C, 64);
  const int64_t tasks = interleaved_tasks(rows);
  // Per-task moments, merged piece by piece (Chan).
  std::vector<Moments<double>> task_moments(tasks * C, Moments<double>{0.0, 0.0, 0});
  std::vector<red_t> first_row(padded, red_t(0));  // the first shift: keeps the sums small (see span_sum_and_squares)
  for (int64_t c = 0; c < C; ++c) first_row[c] = red_t(x[c]);
  at::parallel_for(0, tasks, 1, [&](int64_t t_begin, int64_t t_end) {
    std::vector<red_t> piece_mean(padded, red_t(0)), piece_m2(padded, red_t(0));
    for (int64_t t = t_begin; t < t_end; ++t) {
      Moments<double>* moments = task_moments.data() + t * C;
      std::vector<red_t> shift = first_row;  // this task's, following its running means
      const auto [r_begin, r_end] = part_range(rows, tasks, t);
      for (int64_t r = r_begin; r < r_end; r += rows_per_piece(C)) {
        const int64_t n = std::min(r_end, r + rows_per_piece(C)) - r;
        const scalar_t* piece = x + r * C;
        for_each_channel_block<scalar_t>(C, [&](int64_t c0, int64_t width) {
          column_sum_and_squares(piece + c0, n, C, width, shift.data() + c0, piece_mean.data() + c0,
                                 piece_m2.data() + c0);
          bool second_pass = false;
          for (int64_t c = c0; c < c0 + width; ++c) {
            const auto m = moments_from_shifted_sums<double>(shift[c], piece_mean[c], piece_m2[c], n);
            piece_mean[c] = m.mean;
            piece_m2[c] = m.m2;
            second_pass = second_pass || statistics_need_second_pass<double>(shift[c], m);
          }
          if (second_pass) column_sum_sq_dev(piece + c0, n, C, width, piece_mean.data() + c0, piece_m2.data() + c0);
        });
        for (int64_t c = 0; c < C; ++c) {
          moments[c] = moments_merge(moments[c], Moments<double>{piece_mean[c], piece_m2[c], n});
          shift[c] = red_t(moments[c].mean);  // the next piece sums about the running mean
        }
      }
    }
  });
  std::vector<Moments<double>> merged(C, Moments<double>{0.0, 0.0, 0});
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t t = 0; t < tasks; ++t) merged[c] = moments_merge(merged[c], task_moments[t * C + c]);
  }
  return merged;
}

template <typename scalar_t>
std::vector<Moments<double>> channel_moments(const scalar_t* x, const Geometry& g) {
  return g.layout == Layout::Planar ? planar_channel_moments(x, g) : interleaved_channel_moments(x, g);
}

// ------------------------------------------------------------------ forward

// Pointer arithmetic on a tensor that may be absent (null stays null).
template <typename T>
inline T* offset_or_null(T* p, int64_t offset) {
  return p == nullptr ? nullptr : p + offset;
}

// Rows of planar values per parallel chunk of the elementwise passes.
int64_t plane_grain(int64_t S) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(S, 1)); }

// y = act(forward_apply(coef[c], x) [+ residual]) over every value; residual may be null.
template <Activation A, typename scalar_t, typename acc_t>
void forward_apply_all(const scalar_t* x, const scalar_t* residual, scalar_t* y, const ForwardArrays<acc_t>& coef,
                       const Geometry& g, acc_t act_param) {
  if (g.layout == Layout::Interleaved) {
    at::parallel_for(0, g.count(), row_grain(g.C), [&](int64_t r_begin, int64_t r_end) {
      for (int64_t r = r_begin; r < r_end; ++r) {
        row_forward<A>(x + r * g.C, offset_or_null(residual, r * g.C), y + r * g.C, g.C, coef, act_param);
      }
    });
    return;
  }
  // Planar: N * C rows of S values, each with its channel's coefficients.
  at::parallel_for(0, g.N * g.C, plane_grain(g.S), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      span_forward<A>(x + i * g.S, offset_or_null(residual, i * g.S), y + i * g.S, g.S, coef.get(i % g.C), act_param);
    }
  });
}

// Calls op(offset, width, f_lo, f_hi) in parallel for every block of at most
// kBlock values, with the forward coefficients of the block's low and high
// vector of lanes. Planar blocks lie within one channel; interleaved blocks are
// channels c0 .. c0 + width of one row.
template <typename scalar_t, typename acc_t, typename Op>
void for_each_block(const Geometry& g, const ForwardArrays<acc_t>& coef, const Op& op) {
  using L = Lanes<scalar_t>;
  if (g.layout == Layout::Interleaved) {
    at::parallel_for(0, g.count(), row_grain(g.C), [&](int64_t r_begin, int64_t r_end) {
      for (int64_t r = r_begin; r < r_end; ++r) {
        for (int64_t c0 = 0; c0 < g.C; c0 += L::kBlock) {
          op(r * g.C + c0, std::min<int64_t>(L::kBlock, g.C - c0), forward_vecs(coef, c0),
             forward_vecs(coef, c0 + L::kVec));
        }
      }
    });
    return;
  }
  at::parallel_for(0, g.N * g.C, plane_grain(g.S), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const auto f = forward_vecs(coef.get(i % g.C));
      for (int64_t s = 0; s < g.S; s += L::kBlock) op(i * g.S + s, std::min<int64_t>(L::kBlock, g.S - s), f, f);
    }
  });
}

// Loads / stores the first `width` <= kBlock values at p.
template <typename scalar_t, typename Vec>
inline void load_values(const scalar_t* p, int64_t width, Vec& lo, Vec& hi) {
  if (width == Lanes<scalar_t>::kBlock) {
    Lanes<scalar_t>::load(p, lo, hi);
  } else {
    Lanes<scalar_t>::load_partial(p, width, lo, hi);
  }
}

template <typename T, typename Vec>
inline void store_values(T* p, int64_t width, const Vec& lo, const Vec& hi) {
  if (width == Lanes<T>::kBlock) {
    Lanes<T>::store(p, lo, hi);
  } else {
    Lanes<T>::store_partial(p, width, lo, hi);
  }
}

template <Activation A, typename scalar_t, typename acc_t>
void train_forward(const scalar_t* x, const scalar_t* residual, scalar_t* y, acc_t* mean_out, acc_t* var_out,
                   ChannelParams<acc_t> params, const Geometry& g, acc_t eps, acc_t act_param) {
  if (g.layout == Layout::Planar && planar_parts(g) == 1) {
    // A task per channel: statistics then output back to back, so the second
    // read of the channel's values hits cache.
    at::parallel_for(0, g.C, 1, [&](int64_t c_begin, int64_t c_end) {
      for (int64_t c = c_begin; c < c_end; ++c) {
        const auto m = planar_moments<scalar_t, acc_t>(x + c * g.S, g, 0, g.count());
        mean_out[c] = acc_t(m.mean);
        var_out[c] = acc_t(moments_biased_var(m));
        const auto k = forward_coefficients(m.mean, var_out[c], eps, params.w(c), params.b(c));
        for_each_segment(0, g.count(), g.S, g.C * g.S, [&](int64_t off, int64_t len) {
          span_forward<A>(x + c * g.S + off, offset_or_null(residual, c * g.S + off), y + c * g.S + off, len, k,
                          act_param);
        });
      }
    });
    return;
  }
  const auto moments = channel_moments(x, g);
  ForwardArrays<acc_t> coef(g.C);
  for (int64_t c = 0; c < g.C; ++c) {
    mean_out[c] = acc_t(moments[c].mean);
    var_out[c] = acc_t(moments_biased_var(moments[c]));
    // the double mean: see forward_coefficients
    coef.set(c, forward_coefficients(moments[c].mean, var_out[c], eps, params.w(c), params.b(c)));
  }
  forward_apply_all<A>(x, residual, y, coef, g, act_param);
}

template <typename acc_t>
ForwardArrays<acc_t> forward_arrays(const acc_t* mean, const acc_t* var, ChannelParams<acc_t> params, int64_t C,
                                    acc_t eps) {
  ForwardArrays<acc_t> coef(C);
  for (int64_t c = 0; c < C; ++c) {
    coef.set(c, forward_coefficients(mean ? mean[c] : acc_t(0), var[c], eps, params.w(c), params.b(c)));
  }
  return coef;
}

template <Activation A, typename scalar_t, typename acc_t>
void eval_forward(const scalar_t* x, const scalar_t* residual, scalar_t* y, const acc_t* mean, const acc_t* var,
                  ChannelParams<acc_t> params, const Geometry& g, acc_t eps, acc_t act_param) {
  forward_apply_all<A>(x, residual, y, forward_arrays(mean, var, params, g.C, eps), g, act_param);
}

// ------------------------------------------------------------------ backward
// Phase 1: per channel, sum(g) and sum(g * (x - mean)) with g = dy * act'(z)
// (grad_bias, and grad_weight after a factor invstd). Phase 2: dx from those
// sums. SyncBatchNorm runs the phases as separate ops with an all_reduce between.

struct BackwardSums {
  std::vector<double> dy, dy_xmu;
  explicit BackwardSums(int64_t C) : dy(C, 0.0), dy_xmu(C, 0.0) {}
};

// The inputs every backward phase reads.
template <typename scalar_t, typename acc_t>
struct BackwardArgs {
  const scalar_t* dy;
  const scalar_t* x;
  const scalar_t* residual;  // batch_norm_add_act's, added before the activation; null without
  const acc_t* mean;
  const acc_t* var;
  ChannelParams<acc_t> params;
  const Geometry& g;
  acc_t eps;
  acc_t act_param;
  // z = the BN output before the activation, recomputed from x.
  ForwardCoefficients<acc_t> forward_k(int64_t c) const {
    return forward_coefficients(mean[c], var[c], eps, params.w(c), params.b(c));
  }
};

template <typename scalar_t, typename acc_t>
BackwardArgs<scalar_t, acc_t> backward_args(const PhaseOperands& o, double eps, double activation_param,
                                            const Tensor& residual = Tensor()) {
  return {o.dy.const_data_ptr<scalar_t>(), o.x.const_data_ptr<scalar_t>(),
          residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr, o.mean.const_data_ptr<acc_t>(),
          o.var.const_data_ptr<acc_t>(), channel_params<acc_t>(o.w, o.b), o.g, acc_t(eps), acc_t(activation_param)};
}

template <Activation A, typename scalar_t, typename acc_t>
std::pair<double, double> planar_backward_sums(const BackwardArgs<scalar_t, acc_t>& a, int64_t c, int64_t begin,
                                               int64_t end) {
  using red_t = typename ReduceLanes<scalar_t>::red_t;
  double sum_dy = 0, sum_dy_xmu = 0;
  LaneSums<scalar_t> lanes_dy, lanes_dy_xmu;
  const auto fk = a.forward_k(c);
  const int64_t base = c * a.g.S;
  for (int64_t p = begin; p < end; p += kPiece) {
    for_each_segment(p, std::min(end, p + kPiece), a.g.S, a.g.C * a.g.S, [&](int64_t off, int64_t len) {
      span_backward_sums<A>(a.dy + base + off, a.x + base + off, offset_or_null(a.residual, base + off), len,
                            red_t(a.mean[c]), fk, a.act_param, lanes_dy, lanes_dy_xmu);
    });
    sum_dy += lanes_dy.flush();
    sum_dy_xmu += lanes_dy_xmu.flush();
  }
  return {sum_dy, sum_dy_xmu};
}

// Where the backward writes: dx, and the residual's gradient (null without a residual).
template <typename scalar_t>
struct BackwardOutputs {
  scalar_t* dx;
  scalar_t* grad_residual;
};

template <Activation A, typename scalar_t, typename acc_t>
void planar_backward_apply(const BackwardArgs<scalar_t, acc_t>& a, BackwardOutputs<scalar_t> out, int64_t c,
                           const BackwardCoefficients<acc_t>& k, int64_t begin, int64_t end) {
  const int64_t base = c * a.g.S;
  const auto fk = a.forward_k(c);
  for_each_segment(begin, end, a.g.S, a.g.C * a.g.S, [&](int64_t off, int64_t len) {
    const int64_t at = base + off;
    span_backward<A>(a.dy + at, a.x + at, offset_or_null(a.residual, at), out.dx + at,
                     offset_or_null(out.grad_residual, at), len, fk, k, a.act_param);
  });
}

template <Activation A, typename scalar_t, typename acc_t>
BackwardSums backward_sums(const BackwardArgs<scalar_t, acc_t>& a) {
  const Geometry& g = a.g;
  BackwardSums sums(g.C);
  if (g.layout == Layout::Planar) {
    const int64_t parts = planar_parts(g);
    std::vector<std::pair<double, double>> partial(g.C * parts);
    at::parallel_for(0, g.C * parts, 1, [&](int64_t t_begin, int64_t t_end) {
      for (int64_t t = t_begin; t < t_end; ++t) {
        const auto [begin, end] = part_range(g.count(), parts, t % parts);
        partial[t] = planar_backward_sums<A>(a, t / parts, begin, end);
      }
    });
    for (int64_t t = 0; t < g.C * parts; ++t) {
      sums.dy[t / parts] += partial[t].first;
      sums.dy_xmu[t / parts] += partial[t].second;
    }
    return sums;
  }
  using red_t = typename ReduceLanes<scalar_t>::red_t;
  const int64_t C = g.C, rows = g.count(), padded = round_up(C, 64);
  const int64_t tasks = interleaved_tasks(rows);
  std::vector<red_t> mean_red(padded, red_t(0));
  ForwardArrays<acc_t> forward_k(C);
  for (int64_t c = 0; c < C; ++c) {
    mean_red[c] = red_t(a.mean[c]);
    forward_k.set(c, a.forward_k(c));
  }
  // Per-task sums in double (red_t), accumulated down columns of rows.
  std::vector<red_t> task_dy(tasks * padded, red_t(0)), task_dy_xmu(tasks * padded, red_t(0));
  at::parallel_for(0, tasks, 1, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      const auto [r_begin, r_end] = part_range(rows, tasks, t);
      for (int64_t r = r_begin; r < r_end; r += rows_per_piece(C)) {
        const int64_t n = std::min(r_end, r + rows_per_piece(C)) - r;
        for_each_channel_block<scalar_t>(C, [&](int64_t c0, int64_t width) {
          column_backward_sums<A>(a.dy + r * C + c0, a.x + r * C + c0, offset_or_null(a.residual, r * C + c0), n, C,
                                  width, mean_red.data() + c0, forward_k,
                                  c0, a.act_param, task_dy.data() + t * padded + c0,
                                  task_dy_xmu.data() + t * padded + c0);
        });
      }
    }
  });
  for (int64_t t = 0; t < tasks; ++t) {
    for (int64_t c = 0; c < C; ++c) {
      sums.dy[c] += task_dy[t * padded + c];
      sums.dy_xmu[c] += task_dy_xmu[t * padded + c];
    }
  }
  return sums;
}

// dx from the channel sums; `count` is the number of values the statistics
// came from (the global batch under SyncBatchNorm).
template <Activation A, typename scalar_t, typename acc_t>
void backward_apply_all(const BackwardArgs<scalar_t, acc_t>& a, BackwardOutputs<scalar_t> out, const double* sum_dy,
                        const double* sum_dy_xmu, int64_t count, bool train) {
  const Geometry& g = a.g;
  BackwardArrays<acc_t> coef(g.C);
  std::vector<BackwardCoefficients<acc_t>> planar_coef(g.C);
  for (int64_t c = 0; c < g.C; ++c) {
    planar_coef[c] = backward_coefficients(a.mean[c], a.var[c], a.eps, a.params.w(c), acc_t(sum_dy[c]),
                                           acc_t(sum_dy_xmu[c]), count, train);
    coef.set(c, planar_coef[c]);
  }
  if (g.layout == Layout::Planar) {
    const int64_t parts = planar_parts(g);
    at::parallel_for(0, g.C * parts, 1, [&](int64_t t_begin, int64_t t_end) {
      for (int64_t t = t_begin; t < t_end; ++t) {
        const auto [begin, end] = part_range(g.count(), parts, t % parts);
        planar_backward_apply<A>(a, out, t / parts, planar_coef[t / parts], begin, end);
      }
    });
    return;
  }
  ForwardArrays<acc_t> forward_k(g.C);
  for (int64_t c = 0; c < g.C; ++c) forward_k.set(c, a.forward_k(c));
  at::parallel_for(0, g.count(), row_grain(g.C), [&](int64_t r_begin, int64_t r_end) {
    for (int64_t r = r_begin; r < r_end; ++r) {
      const int64_t at = r * g.C;
      row_backward<A>(a.dy + at, a.x + at, offset_or_null(a.residual, at), out.dx + at,
                      offset_or_null(out.grad_residual, at), g.C, forward_k, coef, a.act_param);
    }
  });
}

template <typename acc_t>
void write_param_grads(const BackwardSums& sums, const acc_t* var, acc_t eps, acc_t* grad_weight, acc_t* grad_bias) {
  for (size_t c = 0; c < sums.dy.size(); ++c) {
    grad_bias[c] = acc_t(sums.dy[c]);
    grad_weight[c] = acc_t(grad_weight_from_sums(sums.dy_xmu[c], double(var[c]), double(eps)));
  }
}

template <Activation A, typename scalar_t, typename acc_t>
void backward(const BackwardArgs<scalar_t, acc_t>& a, BackwardOutputs<scalar_t> out, acc_t* grad_weight,
              acc_t* grad_bias, bool train) {
  const Geometry& g = a.g;
  if (g.layout == Layout::Planar && planar_parts(g) == 1) {
    // A task per channel: sums then dx back to back, the second read from cache.
    at::parallel_for(0, g.C, 1, [&](int64_t c_begin, int64_t c_end) {
      for (int64_t c = c_begin; c < c_end; ++c) {
        const auto [sum_dy, sum_dy_xmu] = planar_backward_sums<A>(a, c, 0, g.count());
        grad_bias[c] = acc_t(sum_dy);
        grad_weight[c] = acc_t(grad_weight_from_sums(sum_dy_xmu, double(a.var[c]), double(a.eps)));
        const auto k = backward_coefficients(a.mean[c], a.var[c], a.eps, a.params.w(c), acc_t(sum_dy),
                                             acc_t(sum_dy_xmu), g.count(), train);
        planar_backward_apply<A>(a, out, c, k, 0, g.count());
      }
    });
    return;
  }
  const BackwardSums sums = backward_sums<A>(a);
  write_param_grads(sums, a.var, a.eps, grad_weight, grad_bias);
  backward_apply_all<A>(a, out, sums.dy.data(), sums.dy_xmu.data(), g.count(), train);
}

// ------------------------------------------------------------------ operator entry points

// Training forward of x (dense in g.format) into y, which may be x itself.
void train_into(const Tensor& x, const Tensor& residual, const Tensor& y, const Tensor& mean, const Tensor& var,
                const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps, Activation act,
                double activation_param, const Geometry& g) {
  if (g.count() == 0) {  // no values: the statistics are undefined, like torch's mean of nothing
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return;
  }
  const Tensor w = to_accumulate(weight, mean.scalar_type()), b = to_accumulate(bias, mean.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastbn_batch_norm_train_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* r = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
    FASTBN_ACTIVATION_SWITCH(act, A, [&] {
      train_forward<A, scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), r, y.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(),
                                        var.data_ptr<acc_t>(), channel_params<acc_t>(w, b), g, acc_t(eps),
                                        acc_t(activation_param));
    });
  });
}

// Evaluation forward of x (dense in g.format) into y, which may be x itself.
void eval_into(const Tensor& x, const Tensor& residual, const Tensor& y, const Tensor& running_mean,
               const Tensor& running_var, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
               double eps, Activation act, double activation_param, const Geometry& g) {
  if (g.count() == 0 || g.C == 0) return;
  const auto acc = accumulate_dtype(x.scalar_type());
  const Tensor w = to_accumulate(weight, acc), b = to_accumulate(bias, acc);
  const Tensor mean = to_accumulate(running_mean, acc), var = to_accumulate(running_var, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastbn_batch_norm_eval_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* r = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
    FASTBN_ACTIVATION_SWITCH(act, A, [&] {
      eval_forward<A, scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), r, y.data_ptr<scalar_t>(),
                                       mean.const_data_ptr<acc_t>(), var.const_data_ptr<acc_t>(),
                                       channel_params<acc_t>(w, b), g, acc_t(eps), acc_t(activation_param));
    });
  });
}

// Writes `result` over `input` unless the kernels already wrote there.
void store_in_place(const Tensor& input, const Tensor& result) {
  if (!result.is_same(input)) input.copy_(result);
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_train_cpu(const Tensor& input, const std::optional<Tensor>& weight,
                                                        const std::optional<Tensor>& bias, double eps,
                                                        int64_t activation, double activation_param,
                                                        const std::optional<Tensor>& residual) {
  constexpr const char* op = "fastbn.batch_norm_train";
  const TrainOperands o = train_operands(input, weight, bias, activation, op);
  const Tensor x = input.contiguous(o.g.format);
  const Tensor r = dense_residual(input, residual, o.g, op);
  Tensor y = at::empty(input.sizes(), input.options().memory_format(o.g.format));
  train_into(x, r, y, o.mean, o.var, weight, bias, eps, o.act, activation_param, o.g);
  return {y, o.mean, o.var};
}

std::tuple<Tensor, Tensor> batch_norm_train_inplace_cpu(const Tensor& input, const std::optional<Tensor>& weight,
                                                        const std::optional<Tensor>& bias, double eps,
                                                        int64_t activation, double activation_param) {
  constexpr const char* op = "fastbn.batch_norm_train_";
  const TrainOperands o = train_operands(input, weight, bias, activation, op);
  check_invertible(o.act, activation_param, op);
  // Dense input: the kernels overwrite it value by value after reading it.
  const Tensor x = input.contiguous(o.g.format);
  const Tensor y = x.is_same(input) ? input : at::empty_like(x);
  train_into(x, Tensor(), y, o.mean, o.var, weight, bias, eps, o.act, activation_param, o.g);
  store_in_place(input, y);
  return {o.mean, o.var};
}

Tensor batch_norm_eval_cpu(const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                           const Tensor& running_mean, const Tensor& running_var, double eps, int64_t activation,
                           double activation_param, const std::optional<Tensor>& residual) {
  constexpr const char* op = "fastbn.batch_norm_eval";
  const Geometry g = eval_operands(input, weight, bias, running_mean, running_var, op);
  const Activation act = check_activation(activation, op);
  const Tensor x = input.contiguous(g.format);
  const Tensor r = dense_residual(input, residual, g, op);
  Tensor y = at::empty(input.sizes(), input.options().memory_format(g.format));
  eval_into(x, r, y, running_mean, running_var, weight, bias, eps, act, activation_param, g);
  return y;
}

void batch_norm_eval_inplace_cpu(const Tensor& input, const std::optional<Tensor>& weight,
                                 const std::optional<Tensor>& bias, const Tensor& running_mean,
                                 const Tensor& running_var, double eps, int64_t activation, double activation_param) {
  constexpr const char* op = "fastbn.batch_norm_eval_";
  const Geometry g = eval_operands(input, weight, bias, running_mean, running_var, op);
  const Activation act = check_activation(activation, op);
  check_invertible(act, activation_param, op);
  const Tensor x = input.contiguous(g.format);
  const Tensor y = x.is_same(input) ? input : at::empty_like(x);
  eval_into(x, Tensor(), y, running_mean, running_var, weight, bias, eps, act, activation_param, g);
  store_in_place(input, y);
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cpu(const Tensor& grad_output, const Tensor& input,
                                                           const std::optional<Tensor>& weight,
                                                           const std::optional<Tensor>& bias, const Tensor& mean,
                                                           const Tensor& var, double eps, bool train,
                                                           int64_t activation, double activation_param) {
  constexpr const char* op = "fastbn.batch_norm_backward";
  const Activation act = check_activation(activation, op);
  const PhaseOperands o = backward_phase_operands(grad_output, input, weight, bias, mean, var, op);
  const auto acc = accumulate_dtype(input.scalar_type());
  Tensor dx = at::empty(input.sizes(), input.options().memory_format(o.g.format));
  Tensor grad_weight = at::zeros({o.g.C}, input.options().dtype(acc));
  Tensor grad_bias = at::zeros({o.g.C}, input.options().dtype(acc));
  if (o.g.count() == 0) return {dx, grad_weight, grad_bias};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastbn_batch_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto args = backward_args<scalar_t, acc_t>(o, eps, activation_param);
    FASTBN_ACTIVATION_SWITCH(act, A, [&] {
      backward<A>(args, BackwardOutputs<scalar_t>{dx.data_ptr<scalar_t>(), nullptr}, grad_weight.data_ptr<acc_t>(),
                  grad_bias.data_ptr<acc_t>(), train);
    });
  });
  return {dx, grad_weight, grad_bias};
}

// Backward of act(bn(x) + residual): (dx, grad_residual, grad_weight, grad_bias).
// The gradient reaching the sum, g = dy * act'(bn(x) + residual), is computed in
// the accumulation dtype inside both passes and written once, as grad_residual.
std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_add_act_backward_cpu(
    const Tensor& grad_output, const Tensor& input, const Tensor& residual, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& var, double eps, bool train,
    int64_t activation, double activation_param) {
  constexpr const char* op = "fastbn.batch_norm_add_act_backward";
  const Activation act = check_activation(activation, op);
  const PhaseOperands o = backward_phase_operands(grad_output, input, weight, bias, mean, var, op);
  const Tensor r = dense_residual(input, residual, o.g, op);
  const auto acc = accumulate_dtype(input.scalar_type());
  const auto layout = input.options().memory_format(o.g.format);
  Tensor dx = at::empty(input.sizes(), layout), grad_residual = at::empty(input.sizes(), layout);
  Tensor grad_weight = at::zeros({o.g.C}, input.options().dtype(acc));
  Tensor grad_bias = at::zeros({o.g.C}, input.options().dtype(acc));
  if (o.g.count() == 0 || o.g.C == 0) return {dx, grad_residual, grad_weight, grad_bias};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastbn_add_act_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto args = backward_args<scalar_t, acc_t>(o, eps, activation_param, r);
    const BackwardOutputs<scalar_t> out{dx.data_ptr<scalar_t>(), grad_residual.data_ptr<scalar_t>()};
    FASTBN_ACTIVATION_SWITCH(act, A, [&] {
      backward<A>(args, out, grad_weight.data_ptr<acc_t>(), grad_bias.data_ptr<acc_t>(), train);
    });
  });
  return {dx, grad_residual, grad_weight, grad_bias};
}

// In-place activated BN: from y = act(z), z = (x - mean) * scale + bias, the
// gradient g = dy * act'(z) and the centered input x - mean = (z - bias) / scale,
// in the accumulation dtype (the backward then runs on them with mean 0).
std::tuple<Tensor, Tensor> batch_norm_invert_output_cpu(const Tensor& grad_output, const Tensor& output,
                                                        const std::optional<Tensor>& weight,
                                                        const std::optional<Tensor>& bias, const Tensor& var,
                                                        double eps, int64_t activation, double activation_param) {
  constexpr const char* op = "fastbn.batch_norm_invert_output";
  const Activation act = check_activation(activation, op);
  check_invertible(act, activation_param, op);
  const PhaseOperands o = backward_phase_operands(grad_output, output, weight, bias, var, var, op);
  const auto acc = accumulate_dtype(output.scalar_type());
  const auto options = output.options().dtype(acc).memory_format(o.g.format);
  Tensor grad = at::empty(output.sizes(), options), centered = at::empty(output.sizes(), options);
  if (o.g.count() == 0 || o.g.C == 0) return {grad, centered};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, output.scalar_type(), "fastbn_invert_output_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = typename Lanes<scalar_t>::Vec;
    const auto coef = forward_arrays<acc_t>(nullptr, o.var.const_data_ptr<acc_t>(), channel_params<acc_t>(o.w, o.b),
                                            o.g.C, acc_t(eps));
    const scalar_t* dy = o.dy.const_data_ptr<scalar_t>();
    const scalar_t* y = o.x.const_data_ptr<scalar_t>();
    acc_t* grad_out = grad.data_ptr<acc_t>();
    acc_t* centered_out = centered.data_ptr<acc_t>();
    const Vec vparam{acc_t(activation_param)}, elu_floor{acc_t(elu_inverse_floor<scalar_t>())};
    FASTBN_ACTIVATION_SWITCH(act, A, [&] {
      for_each_block<scalar_t>(o.g, coef, [&](int64_t off, int64_t width, const ForwardVecs<Vec>& f0,
                                              const ForwardVecs<Vec>& f1) {
        Vec d0, d1, y0, y1;
        load_values(dy + off, width, d0, d1);
        load_values(y + off, width, y0, y1);
        store_values(grad_out + off, width, d0 * vec_activation_grad_from_output<A>(y0, vparam),
                     d1 * vec_activation_grad_from_output<A>(y1, vparam));
        store_values(centered_out + off, width, (vec_activation_inverse<A>(y0, vparam, elu_floor) - f0.bias) / f0.scale,
                     (vec_activation_inverse<A>(y1, vparam, elu_floor) - f1.bias) / f1.scale);
      });
    });
  });
  return {grad, centered};
}

// ------------------------------------------------------------------ SyncBatchNorm phases

std::tuple<Tensor, Tensor> batch_norm_stats_cpu(const Tensor& input) {
  constexpr const char* op = "fastbn.batch_norm_stats";
  check_input(input, op);
  const Geometry g = describe(input);
  const auto acc = accumulate_dtype(input.scalar_type());
  const Tensor x = input.contiguous(g.format);
  Tensor mean = at::empty({g.C}, input.options().dtype(acc));
  Tensor var = at::empty({g.C}, input.options().dtype(acc));
  if (g.count() == 0) {
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return {mean, var};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastbn_batch_norm_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto moments = channel_moments(x.const_data_ptr<scalar_t>(), g);
    for (int64_t c = 0; c < g.C; ++c) {
      mean.data_ptr<acc_t>()[c] = acc_t(moments[c].mean);
      var.data_ptr<acc_t>()[c] = acc_t(moments_biased_var(moments[c]));
    }
  });
  return {mean, var};
}


std::tuple<Tensor, Tensor> batch_norm_backward_reduce_cpu(const Tensor& grad_output, const Tensor& input,
                                                          const std::optional<Tensor>& weight,
                                                          const std::optional<Tensor>& bias, const Tensor& mean,
                                                          const Tensor& var, double eps, int64_t activation,
                                                          double activation_param) {
  constexpr const char* op = "fastbn.batch_norm_backward_reduce";
  const Activation act = check_activation(activation, op);
  const PhaseOperands o = backward_phase_operands(grad_output, input, weight, bias, mean, var, op);
  const auto acc = accumulate_dtype(input.scalar_type());
  Tensor sum_dy = at::zeros({o.g.C}, input.options().dtype(acc));
  Tensor sum_dy_xmu = at::zeros({o.g.C}, input.options().dtype(acc));
  if (o.g.count() == 0) return {sum_dy, sum_dy_xmu};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastbn_backward_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto args = backward_args<scalar_t, acc_t>(o, eps, activation_param);
    FASTBN_ACTIVATION_SWITCH(act, A, [&] {
      const BackwardSums sums = backward_sums<A>(args);
      for (int64_t c = 0; c < o.g.C; ++c) {
        sum_dy.data_ptr<acc_t>()[c] = acc_t(sums.dy[c]);
        sum_dy_xmu.data_ptr<acc_t>()[c] = acc_t(sums.dy_xmu[c]);
      }
    });
  });
  return {sum_dy, sum_dy_xmu};
}

Tensor batch_norm_backward_elemt_cpu(const Tensor& grad_output, const Tensor& input,
                                     const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                                     const Tensor& mean, const Tensor& var, const Tensor& sum_dy,
                                     const Tensor& sum_dy_xmu, double eps, int64_t count, int64_t activation,
                                     double activation_param) {
  constexpr const char* op = "fastbn.batch_norm_backward_elemt";
  const Activation act = check_activation(activation, op);
  TORCH_CHECK(count >= 0, op, ": count must be non-negative, got ", count);
  const PhaseOperands o = backward_phase_operands(grad_output, input, weight, bias, mean, var, op);
  check_channel_vector(input, sum_dy, "sum_dy", op);
  check_channel_vector(input, sum_dy_xmu, "sum_dy_xmu", op);
  Tensor dx = at::empty(input.sizes(), input.options().memory_format(o.g.format));
  if (o.g.count() == 0) return dx;
  const Tensor sdy = sum_dy.to(at::kDouble).contiguous(), sdx = sum_dy_xmu.to(at::kDouble).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastbn_backward_elemt_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto args = backward_args<scalar_t, acc_t>(o, eps, activation_param);
    FASTBN_ACTIVATION_SWITCH(act, A, [&] {
      backward_apply_all<A>(args, BackwardOutputs<scalar_t>{dx.data_ptr<scalar_t>(), nullptr},
                            sdy.const_data_ptr<double>(), sdx.const_data_ptr<double>(), count, true);
    });
  });
  return dx;
}

void update_running_stats_cpu(const Tensor& running_mean, const Tensor& running_var, const Tensor& mean, const Tensor& var,
                              double factor, int64_t count) {
  constexpr const char* op = "fastbn.update_running_stats";
  check_running_stats_update(running_mean, running_var, mean, var, count, op);
  if (count == 0) return;  // an empty batch leaves the running statistics as they are (as torch does)
  // C values: computed in double and rounded once into the buffers' dtype.
  Tensor new_mean = running_mean.to(at::kDouble).contiguous().clone();
  Tensor new_var = running_var.to(at::kDouble).contiguous().clone();
  const Tensor batch_mean = mean.to(at::kDouble).contiguous(), batch_var = var.to(at::kDouble).contiguous();
  double* rm = new_mean.data_ptr<double>();
  double* rv = new_var.data_ptr<double>();
  const double* bm = batch_mean.const_data_ptr<double>();
  const double* bv = batch_var.const_data_ptr<double>();
  for (int64_t c = 0; c < mean.numel(); ++c) {
    rm[c] = running_mean_update(rm[c], bm[c], factor);
    rv[c] = running_var_update(rv[c], bv[c], factor, count);
  }
  running_mean.copy_(new_mean);
  running_var.copy_(new_var);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbn, CPU, m) {
  m.impl("batch_norm_train", &batch_norm_train_cpu);
  m.impl("batch_norm_eval", &batch_norm_eval_cpu);
  m.impl("batch_norm_train_", &batch_norm_train_inplace_cpu);
  m.impl("batch_norm_eval_", &batch_norm_eval_inplace_cpu);
  m.impl("batch_norm_add_act_backward", &batch_norm_add_act_backward_cpu);
  m.impl("batch_norm_invert_output", &batch_norm_invert_output_cpu);
  m.impl("batch_norm_backward", &batch_norm_backward_cpu);
  m.impl("update_running_stats", &update_running_stats_cpu);
  m.impl("batch_norm_stats", &batch_norm_stats_cpu);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce_cpu);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt_cpu);
}

}  // namespace fastbn::cpu
