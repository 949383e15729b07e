// The passes over memory that the CPU operators are made of: per-channel
// statistics, the forward transform, and the two backward phases.
//
// Planar layout (NCHW): every pass walks memory in order. The N * C * S values
// are split into one contiguous part per thread; a part is a sequence of runs
// (one sample's S values of one channel), each reduced into or transformed with
// its channel's per-thread state. (Walking one channel at a time instead, to
// reuse it from cache, touches N separate runs per channel and measured about
// half the bandwidth; except the training passes where a group of channels fits
// in L2 and its runs are long enough: planar_channel_group, work_division.h.)
// Interleaved layout (channels_last, (N, C)): each thread reduces a block of
// rows into per-channel partial statistics, walking down columns of a few
// channels with the accumulators in registers; the partials are merged, and a
// parallel pass over rows writes the output.
//
// Statistics are sums and sums of squares about a shift near the data in one
// pass (a planar part's channel about its first value there; interleaved rows
// in pieces about the running mean), redone exactly where the shift turns out
// far from the mean (statistics_need_second_pass, bn_math.h), and merged with
// Chan's formula. This is as stable as a two-pass algorithm and reads memory once.
// Outputs from streaming_bytes() on (output_streaming.h) are written with streaming
// stores (stream_output, work_division.h).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include "bn_checks.h"
#include "bn_math.h"
#include "cpu/vec_kernels.h"
#include "cpu/work_division.h"

#ifndef CPU_CAPABILITY
#error "compiled once per ISA with CPU_CAPABILITY set: include only from csrc/cpu/per_isa/ (see setup.py)"
#endif

// One copy per ISA (see per_isa/batch_norm_kernels.cpp).
namespace fastbn::cpu::CPU_CAPABILITY {

// Pointer arithmetic on a tensor that may be absent (null stays null).
template <typename T>
inline T* offset_or_null(T* p, int64_t offset) {
  return p == nullptr ? nullptr : p + offset;
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
ChannelParams<acc_t> channel_params(const at::Tensor& weight, const at::Tensor& bias) {
  return {weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr,
          bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr};
}

// ------------------------------------------------------------------ statistics

// A shift for the shifted sums: `value` when finite, else 0. An infinite shift would make
// x - shift NaN (inf - inf) for the infinite value itself, and the mean NaN instead of +-inf.
template <typename red_t>
inline red_t finite_shift(red_t value) {
  return value - value == red_t(0) ? value : red_t(0);
}

// Whether shifted sums (span_sum_and_squares, column_sum_and_squares) need
// the second pass about the piece's mean. Sums in double keep their precision
// with the shift within about a thousand standard deviations of the mean
// (statistics_need_second_pass). Float groups (the column and span sums of
// float32, bfloat16 and half) round their squares to about
// kStatisticsGroupRows float eps, which M2 = squares - sum * offset multiplies
// by 1 + n * offset^2 / M2: they need the shift within about one standard
// deviation of the piece's mean (a mean of the first values, and the running
// means, are).
template <bool kFloatGroups>
inline bool shifted_sums_need_second_pass(double shift, const Moments<double>& m) {
  if constexpr (!kFloatGroups) {
    return statistics_need_second_pass<double>(shift, m);
  } else {
    const double offset = m.mean - shift;
    // false for NaN too, as statistics_need_second_pass
    return !(offset * offset * double(m.count) <= m.m2) && !(offset == 0.0);
  }
}

// A shift for span_sum_and_squares: finite (see finite_shift) and, for its
// float groups, a float value (they subtract it in float; the moments add back
// the same value in double).
template <typename scalar_t>
inline double span_shift(double value) {
  if constexpr (Lanes<scalar_t>::kFloatStatistics) value = double(static_cast<typename Lanes<scalar_t>::acc_t>(value));
  return finite_shift(value);
}

// The first shift of a planar run's statistics: for double sums the first
// value; for float groups the mean of the first block of values (closer to
// the mean: see shifted_sums_need_second_pass).
template <typename scalar_t>
inline double first_shift(const scalar_t* x, int64_t n) {
  using L = Lanes<scalar_t>;
  if constexpr (!L::kFloatStatistics) {
    return span_shift<scalar_t>(double(x[0]));
  } else {
    const int64_t count = std::min(n, L::kBlock);
    typename L::Vec lo, hi;
    load_values(x, count, lo, hi);  // lanes past count load as 0
    __at_align__ typename L::acc_t lanes[L::kVec];
    (lo + hi).store(lanes);
    double sum = 0.0;
    for (int64_t i = 0; i < L::kVec; ++i) sum += double(lanes[i]);
    return span_shift<scalar_t>(sum / double(count));
  }
}

// Moments of n contiguous values, kept in double.
template <typename scalar_t>
Moments<double> span_moments(const scalar_t* x, int64_t n) {
  using red_t = typename ReduceLanes<scalar_t>::red_t;
  red_t shift = first_shift(x, n);  // then the running mean
  Moments<double> total{0.0, 0.0, 0};
  LaneSums<scalar_t> sums, squares;
  for (int64_t p = 0; p < n; p += kPiece) {
    const int64_t len = std::min(n - p, kPiece);
    span_sum_and_squares(x + p, len, shift, sums, squares);
    Moments<double> piece = moments_from_shifted_sums<double>(shift, sums.flush(), squares.flush(), len);
    if (shifted_sums_need_second_pass<Lanes<scalar_t>::kFloatStatistics>(shift, piece)) {
      span_sum_sq_dev(x + p, len, red_t(piece.mean), squares);
      piece.m2 = squares.flush();
    }
    total = moments_merge(total, piece);
    shift = span_shift<scalar_t>(total.mean);
  }
  return total;
}

// Per-part moments of each channel, merged part by part (Chan) in a fixed order.
inline std::vector<Moments<double>> merge_parts(const std::vector<Moments<double>>& parts, int64_t tasks, int64_t C) {
  std::vector<Moments<double>> merged(C, Moments<double>{0.0, 0.0, 0});
  for (int64_t t = 0; t < tasks; ++t) {
    for (int64_t c = 0; c < C; ++c) merged[c] = moments_merge(merged[c], parts[t * C + c]);
  }
  return merged;
}

// Channel c's moments over the planar part [begin, end) from its shifted sums (count
// values about `shift`), redone run by run (span_moments) where the shift turns out far
// from the mean (shifted_sums_need_second_pass).
template <typename scalar_t>
Moments<double> part_moments(const scalar_t* x, const Geometry& g, int64_t begin, int64_t end, int64_t c, double shift,
                             double sum, double squares, int64_t count) {
  Moments<double> m = moments_from_shifted_sums<double>(shift, sum, squares, count);
  if (!shifted_sums_need_second_pass<Lanes<scalar_t>::kFloatStatistics>(shift, m)) return m;
  m = Moments<double>{0.0, 0.0, 0};
  for_each_plane_run(begin, end, g, [&](int64_t offset, int64_t length, int64_t run_c) {
    if (run_c == c) m = moments_merge(m, span_moments(x + offset, length));
  });
  return m;
}

// Each part sums every channel's runs about one shift per channel (its first
// value in the part) into that channel's lane sums, added up once per part: no
// merge per run, which for short runs (S of 100-200) cost more than the run
// itself, nor a sum across lanes per run (two thirds of the time with S = 25).
// A channel whose shift turns out far from its mean
// (statistics_need_second_pass) is redone with span_moments per run.
template <typename scalar_t>
std::vector<Moments<double>> planar_channel_moments(const scalar_t* x, const Geometry& g) {
  using red_t = typename ReduceLanes<scalar_t>::red_t;
  const int64_t tasks = planar_tasks(g), C = g.C;
  std::vector<Moments<double>> parts(tasks * C, Moments<double>{0.0, 0.0, 0});
  parallel_parts(g.N * C * g.S, tasks, [&](int64_t t, int64_t begin, int64_t end) {
    std::vector<red_t> shift(C, red_t(0));
    std::vector<LaneSums<scalar_t>> sums(C), squares(C);
    std::vector<int64_t> counts(C, 0);
    for_each_plane_run(begin, end, g, [&](int64_t offset, int64_t length, int64_t c) {
      if (counts[c] == 0) shift[c] = first_shift(x + offset, length);
      span_sum_and_squares(x + offset, length, shift[c], sums[c], squares[c]);
      counts[c] += length;
    });
    for (int64_t c = 0; c < C; ++c) {
      if (counts[c] > 0) {
        parts[t * C + c] = part_moments(x, g, begin, end, c, shift[c], sums[c].flush(), squares[c].flush(), counts[c]);
      }
    }
  });
  return merge_parts(parts, tasks, C);
}

// Adds lane j of `lanes` (float or double) to out[channels[j]], j < kLanes (the
// channels of a group of runs, see for_each_plane_run_group).
template <typename T>
inline void add_lanes_to_channels(const Vectorized<T>& lanes, const int64_t* channels, double* out) {
  constexpr int64_t kLanes = Vectorized<T>::size();
  if (channels[kLanes - 1] == channels[0] + kLanes - 1) {  // consecutive channels (no wrap around C)
    double* at = out + channels[0];
    if constexpr (std::is_same_v<T, float>) {
      Vectorized<double> lo, hi;
      widen(lanes, lo, hi);
      (Vectorized<double>::loadu(at) + lo).store(at);
      (Vectorized<double>::loadu(at + Vectorized<double>::size()) + hi).store(at + Vectorized<double>::size());
    } else {
      (Vectorized<double>::loadu(at) + lanes).store(at);
    }
    return;
  }
  __at_align__ T values[kLanes];
  lanes.store(values);
  for (int64_t j = 0; j < kLanes; ++j) out[channels[j]] += double(values[j]);
}

// Planar runs this short are reduced several runs at a time (planar_grouped_moments,
// planar_grouped_backward_sums): a run is then one float group of the statistics, and
// of the backward sums where float_backward_runs.
template <typename scalar_t>
constexpr int64_t kMaxGroupedRun = kStatisticsGroupRows * Lanes<scalar_t>::kBlock;

// planar_channel_moments for short runs (S up to kMaxGroupedRun, e.g. 7x7 or 14x14
// planes). Each run is summed as span_sum_and_squares would (float32, bfloat16, half:
// in one float group), about its channel's shift, but RunVec's width of runs at once
// (runs_sum_and_squares): their lanes are added across runs together and added into
// per-channel double sums, so there are no per-channel lane accumulators to flush and
// clear, and one run's reduction overlaps the next ones'. (16,512,7,7) bfloat16,
// 1 thread: 8192 runs of 49 values cost about 16 ns each in planar_channel_moments.
template <typename scalar_t>
std::vector<Moments<double>> planar_grouped_moments(const scalar_t* x, const Geometry& g) {
  using V = RunVec<scalar_t>;
  constexpr int64_t kRuns = V::size();
  const int64_t tasks = planar_tasks(g), C = g.C, S = g.S;
  std::vector<Moments<double>> parts(tasks * C, Moments<double>{0.0, 0.0, 0});
  parallel_parts(g.N * C * S, tasks, [&](int64_t t, int64_t begin, int64_t end) {
    std::vector<double> shift(C, 0.0), sums(C, 0.0), squares(C, 0.0);
    std::vector<int64_t> counts(C, 0);
    // a channel's shift: its first values in the part (see first_shift)
    auto shift_for_run = [&](int64_t offset, int64_t length, int64_t c) C10_ALWAYS_INLINE_ATTRIBUTE {
      if (counts[c] == 0) shift[c] = first_shift(x + offset, length);
      counts[c] += length;
      return shift[c];
    };
    for_each_plane_run_group<kRuns>(
        begin, end, g,
        [&](int64_t offset, int64_t length, int64_t c) {
          const double run_shift = shift_for_run(offset, length, c);
          LaneSums<scalar_t> run_sums, run_squares;
          span_sum_and_squares(x + offset, length, run_shift, run_sums, run_squares);
          sums[c] += run_sums.flush();
          squares[c] += run_squares.flush();
        },
        [&](int64_t offset, const int64_t* channels) {
          double run_shifts[kRuns];
          for (int64_t j = 0; j < kRuns; ++j) run_shifts[j] = shift_for_run(offset + j * S, S, channels[j]);
          V run_sums, run_squares;
          runs_sum_and_squares(x + offset, S, run_shifts, run_sums, run_squares);
          add_lanes_to_channels(run_sums, channels, sums.data());
          add_lanes_to_channels(run_squares, channels, squares.data());
        });
    for (int64_t c = 0; c < C; ++c) {
      if (counts[c] > 0) parts[t * C + c] = part_moments(x, g, begin, end, c, shift[c], sums[c], squares[c], counts[c]);
    }
  });
  return merge_parts(parts, tasks, C);
}

// Rows whose mean is the first shift of the interleaved statistics: near the
// channel's mean, so that the first piece's float sums rarely need a second pass.
constexpr int64_t kFirstShiftRows = 16;

template <typename scalar_t>
std::vector<Moments<double>> interleaved_channel_moments(const scalar_t* x, const Geometry& g) {
  using red_t = typename ReduceLanes<scalar_t>::red_t;
  using acc_t = at::opmath_type<scalar_t>;  // the shifts' type (column_sum_and_squares subtracts in acc_t)
  const int64_t C = g.C, rows = g.count(), padded = round_up(C, 64);
  const int64_t tasks = interleaved_tasks(rows);
  const int64_t row_group = row_walk_group_rows<scalar_t>(g, RowReduction::Statistics);
  // Per-task moments, merged piece by piece (Chan), as arrays (every channel has
  // the same count): the loops over channels at the end of each piece vectorize.
  std::vector<double> task_mean(tasks * C, 0.0), task_m2(tasks * C, 0.0);
  std::vector<int64_t> task_count(tasks, 0);
  // the first shift, the mean of the first rows: keeps the sums small (see span_sum_and_squares)
  std::vector<double> first_rows_sum(C, 0.0);
  const int64_t first_rows = std::min(rows, kFirstShiftRows);
  for (int64_t r = 0; r < first_rows; ++r) {
    for (int64_t c = 0; c < C; ++c) first_rows_sum[c] += double(x[r * C + c]);
  }
  std::vector<acc_t> first_shifts(padded, acc_t(0));
  for (int64_t c = 0; c < C; ++c) first_shifts[c] = finite_shift(acc_t(first_rows_sum[c] / double(first_rows)));
  at::parallel_for(0, tasks, 1, [&](int64_t t_begin, int64_t t_end) {
    std::vector<red_t> piece_mean(padded, red_t(0)), piece_m2(padded, red_t(0));
    for (int64_t t = t_begin; t < t_end; ++t) {
      double* mean = task_mean.data() + t * C;
      double* m2 = task_m2.data() + t * C;
      std::vector<acc_t> shift = first_shifts;  // this task's, following its running means
      const auto [r_begin, r_end] = part_range(rows, tasks, t);
      for (int64_t r = r_begin; r < r_end; r += rows_per_piece(C)) {
        const int64_t n = std::min(r_end, r + rows_per_piece(C)) - r;
        const scalar_t* piece = x + r * C;
        std::fill(piece_mean.begin(), piece_mean.end(), red_t(0));
        std::fill(piece_m2.begin(), piece_m2.end(), red_t(0));
        if (row_group > 0) {
          for_each_row_panel<scalar_t>(0, n, C, row_group, [&](int64_t first, int64_t group, int64_t c0,
                                                               int64_t width, auto blocks) {
            rows_sum_and_squares<decltype(blocks)::value>(piece + first * C + c0, group, C, width,
                                                          shift.data() + c0, piece_mean.data() + c0,
                                                          piece_m2.data() + c0);
          });
        } else {
          for_each_row_group(0, n, reduction_group_rows<scalar_t>(g, n), [&](int64_t first, int64_t group) {
            for_each_channel_block<scalar_t>(C, [&](int64_t c0, int64_t width) {
              column_sum_and_squares(piece + first * C + c0, group, C, width, shift.data() + c0,
                                     piece_mean.data() + c0, piece_m2.data() + c0);
            });
          });
        }
        for_each_channel_block<scalar_t>(C, [&](int64_t c0, int64_t width) {
          bool second_pass = false;
          for (int64_t c = c0; c < c0 + width; ++c) {
            const auto m = moments_from_shifted_sums<double>(double(shift[c]), piece_mean[c], piece_m2[c], n);
            piece_mean[c] = m.mean;
            piece_m2[c] = m.m2;
            second_pass |= shifted_sums_need_second_pass<std::is_same_v<acc_t, float>>(double(shift[c]), m);
          }
          if (second_pass) column_sum_sq_dev(piece + c0, n, C, width, piece_mean.data() + c0, piece_m2.data() + c0);
        });
        const int64_t count = task_count[t];
        for (int64_t c = 0; c < C; ++c) {
          const auto merged = moments_merge(Moments<double>{mean[c], m2[c], count},
                                            Moments<double>{piece_mean[c], piece_m2[c], n});
          mean[c] = merged.mean;
          m2[c] = merged.m2;
          // the next piece sums about the running mean (rounded to acc_t, so that the sums are about this value)
          shift[c] = finite_shift(acc_t(merged.mean));
        }
        task_count[t] += n;
      }
    }
  });
  std::vector<Moments<double>> task_moments(tasks * C);
  for (int64_t t = 0; t < tasks; ++t) {
    for (int64_t c = 0; c < C; ++c) task_moments[t * C + c] = {task_mean[t * C + c], task_m2[t * C + c], task_count[t]};
  }
  return merge_parts(task_moments, tasks, C);
}

template <typename scalar_t>
std::vector<Moments<double>> channel_moments(const scalar_t* x, const Geometry& g) {
  if (g.layout == Layout::Interleaved) return interleaved_channel_moments(x, g);
  return g.S <= kMaxGroupedRun<scalar_t> ? planar_grouped_moments(x, g) : planar_channel_moments(x, g);
}

// ------------------------------------------------------------------ forward

// invstd_from_var of every channel in double, in a loop of its own so that the square
// roots and divisions vectorize. Inside the loops that build each channel's coefficients
// they ran one at a time, serial on the calling thread: about 7 ns a channel each, and the
// backward took four (bench/NOTES.md, thirtieth session).
template <typename acc_t>
std::vector<double> channel_invstd(const acc_t* var, int64_t C, acc_t eps) {
  std::vector<double> invstd(C);
  double* out = invstd.data();
  const double eps_d = double(eps);
  for (int64_t c = 0; c < C; ++c) out[c] = invstd_from_var(double(var[c]), eps_d);
  return invstd;
}

// The forward coefficients of every channel (backward uses them to recompute
// z = bn(x) for the activation's derivative); a null mean is 0 (centered input);
// invstd from channel_invstd(var, C, eps).
template <typename acc_t>
ForwardArrays<acc_t> forward_arrays(const acc_t* mean, const acc_t* var, const double* invstd,
                                    ChannelParams<acc_t> params, int64_t C, acc_t eps) {
  ForwardArrays<acc_t> coef(C);
  for (int64_t c = 0; c < C; ++c) {
    ForwardCoefficients<acc_t> k = forward_coefficients(mean ? mean[c] : acc_t(0), var[c], eps, params.w(c),
                                                        params.b(c));
    // weight * invstd in double, rounded once (as torch's CPU kernels, which use double here):
    // in float its three roundings cost up to 2 ulp of every eval-mode output and grad_input
    k.scale = acc_t(double(params.w(c)) * invstd[c]);
    coef.set(c, k);
  }
  return coef;
}

template <typename acc_t>
ForwardArrays<acc_t> forward_arrays(const acc_t* mean, const acc_t* var, ChannelParams<acc_t> params, int64_t C,
                                    acc_t eps) {
  return forward_arrays(mean, var, channel_invstd(var, C, eps).data(), params, C, eps);
}

// y = act(forward_apply(coef[c], x) [+ residual]) over every value; residual may be null.
template <Activation A, typename scalar_t, typename acc_t>
void forward_apply_all(const scalar_t* x, const scalar_t* residual, scalar_t* y, const ForwardArrays<acc_t>& coef,
                       const Geometry& g, acc_t act_param) {
  const bool stream = stream_output(g, y), in_row_order = tiles_in_row_order<scalar_t>(g);
  if (g.layout == Layout::Interleaved) {
    at::parallel_for(0, g.count(), row_grain(g.C), [&](int64_t r_begin, int64_t r_end) {
      for_each_row_tile(r_begin, r_end, g.C, [&](int64_t r, int64_t rows) {
        tile_forward<A>(x + r * g.C, offset_or_null(residual, r * g.C), y + r * g.C, rows, g.C, coef, act_param,
                        stream, in_row_order);
      });
      stream_fence(stream);
    });
    return;
  }
  const bool flat = flat_planar_walk<scalar_t>(g);
  parallel_parts(g.N * g.C * g.S, planar_tasks(g), [&](int64_t, int64_t begin, int64_t end) {
    if (flat) {
      flat_forward<A>(x, residual, y, begin, end, g.S, g.C, [&](int64_t c) { return coef.get(c); }, act_param,
                      stream);
    } else {
      for_each_plane_run(begin, end, g, [&](int64_t offset, int64_t length, int64_t c) {
        span_forward<A>(x + offset, offset_or_null(residual, offset), y + offset, length, coef.get(c), act_param,
                        stream);
      });
    }
    stream_fence(stream);
  });
}

// Writes channel c's batch mean and biased variance from its moments; returns its
// forward coefficients.
template <typename acc_t>
ForwardCoefficients<acc_t> store_channel_statistics(const Moments<double>& m, int64_t c, acc_t* mean_out,
                                                    acc_t* var_out, ChannelParams<acc_t> params, acc_t eps) {
  mean_out[c] = acc_t(m.mean);
  var_out[c] = acc_t(moments_biased_var(m));
  // the double mean: see forward_coefficients
  return forward_coefficients(m.mean, var_out[c], eps, params.w(c), params.b(c));
}

// The planar training forward a group of channels at a time, in parallel over groups:
// the channels' moments over their N chunks, then their output from the same chunks
// while they are still in L2 (see planar_channel_group).
template <Activation A, typename scalar_t, typename acc_t>
void planar_channel_train_forward(const scalar_t* x, const scalar_t* residual, scalar_t* y, acc_t* mean_out,
                                  acc_t* var_out, ChannelParams<acc_t> params, const Geometry& g, acc_t eps,
                                  acc_t act_param, int64_t group) {
  const bool stream = stream_output(g, y), flat = flat_planar_walk<scalar_t>(g);
  const int64_t groups = (g.C + group - 1) / group;
  using red_t = typename ReduceLanes<scalar_t>::red_t;
  at::parallel_for(0, groups, 1, [&](int64_t g_begin, int64_t g_end) {
    std::vector<red_t> shift(group);
    std::vector<LaneSums<scalar_t>> sums(group), squares(group);
    std::vector<ForwardCoefficients<acc_t>> k(group);
    for (int64_t gi = g_begin; gi < g_end; ++gi) {
      const int64_t c0 = gi * group, width = std::min(group, g.C - c0);
      // each channel's N runs summed about one shift, its lanes added up once (see
      // planar_channel_moments; merging per-run moments cost about 80 ns a run)
      for (int64_t j = 0; j < width; ++j) shift[j] = first_shift(x + (c0 + j) * g.S, g.S);
      for (int64_t n = 0; n < g.N; ++n) {
        for (int64_t j = 0; j < width; ++j) {
          span_sum_and_squares(x + (n * g.C + c0 + j) * g.S, g.S, shift[j], sums[j], squares[j]);
        }
      }
      for (int64_t j = 0; j < width; ++j) {
        Moments<double> m = moments_from_shifted_sums<double>(shift[j], sums[j].flush(), squares[j].flush(), g.N * g.S);
        if (shifted_sums_need_second_pass<Lanes<scalar_t>::kFloatStatistics>(shift[j], m)) {
          m = Moments<double>{0.0, 0.0, 0};  // run by run about their own means, from L2
          for (int64_t n = 0; n < g.N; ++n) m = moments_merge(m, span_moments(x + (n * g.C + c0 + j) * g.S, g.S));
        }
        k[j] = store_channel_statistics(m, c0 + j, mean_out, var_out, params, eps);
      }
      for (int64_t n = 0; n < g.N; ++n) {
        if (flat) {  // the sample's chunk of the group's runs
          const int64_t begin = (n * g.C + c0) * g.S;
          flat_forward<A>(x, residual, y, begin, begin + width * g.S, g.S, g.C,
                          [&](int64_t c) { return k[c - c0]; }, act_param, stream);
          continue;
        }
        for (int64_t j = 0; j < width; ++j) {
          const int64_t offset = (n * g.C + c0 + j) * g.S;
          span_forward<A>(x + offset, offset_or_null(residual, offset), y + offset, g.S, k[j], act_param, stream);
        }
      }
    }
    stream_fence(stream);
  });
}

template <Activation A, typename scalar_t, typename acc_t>
void train_forward(const scalar_t* x, const scalar_t* residual, scalar_t* y, acc_t* mean_out, acc_t* var_out,
                   ChannelParams<acc_t> params, const Geometry& g, acc_t eps, acc_t act_param) {
  if (const int64_t group = planar_channel_group<scalar_t>(g, residual != nullptr ? 2 : 1)) {
    return planar_channel_train_forward<A>(x, residual, y, mean_out, var_out, params, g, eps, act_param, group);
  }
  const auto moments = channel_moments(x, g);
  ForwardArrays<acc_t> coef(g.C);
  for (int64_t c = 0; c < g.C; ++c) {
    coef.set(c, store_channel_statistics(moments[c], c, mean_out, var_out, params, eps));
  }
  forward_apply_all<A>(x, residual, y, coef, g, act_param);
}

template <Activation A, typename scalar_t, typename acc_t>
void eval_forward(const scalar_t* x, const scalar_t* residual, scalar_t* y, const acc_t* mean, const acc_t* var,
                  ChannelParams<acc_t> params, const Geometry& g, acc_t eps, acc_t act_param) {
  forward_apply_all<A>(x, residual, y, forward_arrays(mean, var, params, g.C, eps), g, act_param);
}

// Calls op(offset, width, f_lo, f_hi) in parallel for every block of at most
// kBlock values, with the forward coefficients of the block's low and high
// vector of lanes. Planar blocks lie within one run; interleaved blocks are
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
  parallel_parts(g.N * g.C * g.S, planar_tasks(g), [&](int64_t, int64_t begin, int64_t end) {
    for_each_plane_run(begin, end, g, [&](int64_t offset, int64_t length, int64_t c) {
      const auto f = forward_vecs(coef.get(c));
      for (int64_t s = 0; s < length; s += L::kBlock) op(offset + s, std::min<int64_t>(L::kBlock, length - s), f, f);
    });
  });
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
  std::vector<double> invstd;  // channel_invstd(var, C, eps): every phase needs it
};

template <typename scalar_t, typename acc_t>
BackwardArgs<scalar_t, acc_t> backward_args(const PhaseOperands& o, double eps, double activation_param,
                                            const at::Tensor& residual = at::Tensor()) {
  const acc_t* var = o.var.const_data_ptr<acc_t>();
  return {o.dy.const_data_ptr<scalar_t>(), o.x.const_data_ptr<scalar_t>(),
          residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr, o.mean.const_data_ptr<acc_t>(),
          var, channel_params<acc_t>(o.w, o.b), o.g, acc_t(eps), acc_t(activation_param),
          channel_invstd(var, o.g.C, acc_t(eps))};
}

// The forward coefficients of a backward's channels (see forward_arrays).
template <typename scalar_t, typename acc_t>
ForwardArrays<acc_t> forward_arrays(const BackwardArgs<scalar_t, acc_t>& a) {
  return forward_arrays(a.mean, a.var, a.invstd.data(), a.params, a.g.C, a.eps);
}

// Where the backward writes: dx, and the residual's gradient (null without a residual).
template <typename scalar_t>
struct BackwardOutputs {
  scalar_t* dx;
  scalar_t* grad_residual;
};

// Whether the planar backward sums' grouped runs (planar_grouped_backward_sums, S up to
// kMaxGroupedRun) are each summed as one float group (runs_backward_sums' kFloatRuns):
// bfloat16 and half runs up to kMaxGroupedRun, float32 runs up to kBackwardGroupRows
// blocks (where the rest of float32's backward sums are in double: span_backward_sums).
// Before, float32 summed its grouped runs in double lanes and bfloat16 its runs past
// kBackwardGroupRows blocks one channel at a time (span_backward_sums). Ops, 2 threads,
// NCHW, a 2-vCPU Xeon guest: backward sums of float32 (16,512,7,7) 89 -> 53 µs,
// (250,64,5,5) 124 -> 79, (250,64,11,11) 340 -> 306; bfloat16 (32,256,14,14) 150-162 ->
// 137. Against float64, float32 grad_bias of (16,512,7,7) (dy of mean 0) went from
// 3.5e-6 to 7.2e-6 (torch's 7.4e-6), of (250,64,5,5) from 6.5e-6 to 1.6e-5 (torch's
// 9.7e-6; torch sums float32 in double there). Float groups of whole float32 runs up to
// kMaxGroupedRun failed the budget (2x torch's error + a unit in the last place) on
// planar (16,3,9,9) with the DEFAULT kernels, data whose deviations x - mean are large
// and cancel (test_float_group_statistics_far_from_the_first_values): 7.8e-6 > 7.5e-6.
template <typename scalar_t>
inline bool float_backward_runs(const Geometry& g) {
  if constexpr (!Lanes<scalar_t>::kFloatStatistics) {
    return false;
  } else if constexpr (Lanes<scalar_t>::kReduced) {
    return true;
  } else {
    return g.S <= kBackwardGroupRows * Lanes<scalar_t>::kBlock;
  }
}

// The planar backward sums of short runs into per-part double arrays (out + t *
// padded), BackwardRunVec's width of runs at a time (see planar_grouped_moments).
template <Activation A, bool kFloatRuns, typename scalar_t, typename acc_t>
void planar_grouped_backward_sums(const BackwardArgs<scalar_t, acc_t>& a, const ForwardArrays<acc_t>& forward_k,
                                  int64_t tasks, int64_t padded, double* part_dy, double* part_dy_xmu) {
  using V = BackwardRunVec<kFloatRuns>;
  constexpr int64_t kRuns = V::size();
  const Geometry& g = a.g;
  const int64_t C = g.C;
  parallel_parts(g.N * C * g.S, tasks, [&](int64_t t, int64_t begin, int64_t end) {
    double* out_dy = part_dy + t * padded;
    double* out_dy_xmu = part_dy_xmu + t * padded;
    for_each_plane_run_group<kRuns>(
        begin, end, g,
        [&](int64_t offset, int64_t length, int64_t c) {
          LaneSums<scalar_t> run_dy, run_dy_xmu;
          span_backward_sums<A>(a.dy + offset, a.x + offset, offset_or_null(a.residual, offset), length,
                                double(a.mean[c]), forward_k.get(c), a.act_param, run_dy, run_dy_xmu);
          out_dy[c] += run_dy.flush();
          out_dy_xmu[c] += run_dy_xmu.flush();
        },
        [&](int64_t offset, const int64_t* channels) {
          V run_dy, run_dy_xmu;
          runs_backward_sums<A, kFloatRuns>(a.dy + offset, a.x + offset, offset_or_null(a.residual, offset), g.S,
                                            channels, a.mean, forward_k, a.act_param, run_dy, run_dy_xmu);
          add_lanes_to_channels(run_dy, channels, out_dy);
          add_lanes_to_channels(run_dy_xmu, channels, out_dy_xmu);
        });
  });
}

template <Activation A, typename scalar_t, typename acc_t>
BackwardSums backward_sums(const BackwardArgs<scalar_t, acc_t>& a) {
  using red_t = typename ReduceLanes<scalar_t>::red_t;
  const Geometry& g = a.g;
  const int64_t C = g.C, padded = round_up(C, 64);
  const ForwardArrays<acc_t> forward_k = forward_arrays(a);
  // Per-part sums in double (red_t), padded per part for the column loops' block stores.
  const int64_t tasks = g.layout == Layout::Planar ? planar_tasks(g) : interleaved_tasks(g.count());
  std::vector<red_t> part_dy(tasks * padded, red_t(0)), part_dy_xmu(tasks * padded, red_t(0));
  if (g.layout == Layout::Planar && g.S <= kMaxGroupedRun<scalar_t>) {  // as channel_moments
    if (float_backward_runs<scalar_t>(g)) {  // (never for double)
      if constexpr (Lanes<scalar_t>::kFloatStatistics) {
        planar_grouped_backward_sums<A, true>(a, forward_k, tasks, padded, part_dy.data(), part_dy_xmu.data());
      }
    } else {
      planar_grouped_backward_sums<A, false>(a, forward_k, tasks, padded, part_dy.data(), part_dy_xmu.data());
    }
  } else if (g.layout == Layout::Planar) {
    parallel_parts(g.N * C * g.S, tasks, [&](int64_t t, int64_t begin, int64_t end) {
      // per channel, added up across lanes once per part (see planar_channel_moments)
      std::vector<LaneSums<scalar_t>> lanes_dy(C), lanes_dy_xmu(C);
      for_each_plane_run(begin, end, g, [&](int64_t offset, int64_t length, int64_t c) {
        span_backward_sums<A>(a.dy + offset, a.x + offset, offset_or_null(a.residual, offset), length,
                              red_t(a.mean[c]), forward_k.get(c), a.act_param, lanes_dy[c], lanes_dy_xmu[c]);
      });
      for (int64_t c = 0; c < C; ++c) {
        part_dy[t * padded + c] = lanes_dy[c].flush();
        part_dy_xmu[t * padded + c] = lanes_dy_xmu[c].flush();
      }
    });
  } else {
    std::vector<acc_t> mean_padded(padded, acc_t(0));  // padded for the column loops' block loads
    std::copy(a.mean, a.mean + C, mean_padded.begin());
    const int64_t row_group = row_walk_group_rows<scalar_t>(g, RowReduction::BackwardSums);
    const int64_t float_group_rows = backward_group_rows(g);  // float groups of the sums
    parallel_parts(g.count(), tasks, [&](int64_t t, int64_t r_begin, int64_t r_end) {
      if (row_group > 0) {  // rows in memory order
        for_each_row_panel<scalar_t>(r_begin, r_end, C, row_group, [&](int64_t r, int64_t n, int64_t c0,
                                                                       int64_t width, auto blocks) {
          const int64_t at = r * C + c0;
          rows_backward_sums<decltype(blocks)::value, A>(a.dy + at, a.x + at, offset_or_null(a.residual, at), n,
                                                         C, width, c0, float_group_rows,
                                                         mean_padded.data() + c0, forward_k,
                                                         a.act_param, part_dy.data() + t * padded + c0,
                                                         part_dy_xmu.data() + t * padded + c0);
        });
        return;
      }
      // down columns of rows, a piece (or group, see reduction_group_rows) of rows at a time
      for_each_row_group(r_begin, r_end, reduction_group_rows<scalar_t>(g, rows_per_piece(C)), [&](int64_t r, int64_t n) {
        for_each_channel_block<scalar_t>(C, [&](int64_t c0, int64_t width) {
          column_backward_sums<A>(a.dy + r * C + c0, a.x + r * C + c0, offset_or_null(a.residual, r * C + c0), n, C,
                                  width, mean_padded.data() + c0, forward_k, c0, a.act_param,
                                  part_dy.data() + t * padded + c0, part_dy_xmu.data() + t * padded + c0,
                                  float_group_rows);
        });
      });
    });
  }
  BackwardSums sums(C);
  for (int64_t t = 0; t < tasks; ++t) {
    for (int64_t c = 0; c < C; ++c) {
      sums.dy[c] += part_dy[t * padded + c];
      sums.dy_xmu[c] += part_dy_xmu[t * padded + c];
    }
  }
  return sums;
}

// Evaluation mode (the statistics are constants): dx = g * weight * invstd, which is the
// forward coefficients' scale; x enters only through act'(z), so a NaN or infinite x
// gives what torch gives, not (x - mean) * 0 = NaN.
template <Activation A, typename scalar_t, typename acc_t>
void eval_backward_apply_all(const BackwardArgs<scalar_t, acc_t>& a, BackwardOutputs<scalar_t> out,
                             const ForwardArrays<acc_t>& forward_k) {
  using Vec = typename Lanes<scalar_t>::Vec;
  const Vec vparam(a.act_param);
  for_each_block<scalar_t>(a.g, forward_k, [&](int64_t off, int64_t width, const ForwardVecs<Vec>& f0,
                                                const ForwardVecs<Vec>& f1) C10_ALWAYS_INLINE_ATTRIBUTE {
    Vec d0, d1, x0, x1, r0, r1;
    load_values(a.dy + off, width, d0, d1);
    load_values(a.x + off, width, x0, x1);
    load_residual<A>(a.residual, off, width, r0, r1);
    const Vec g0 = grad_before_activation<A>(d0, x0, r0, f0, vparam);
    const Vec g1 = grad_before_activation<A>(d1, x1, r1, f1, vparam);
    store_values(out.dx + off, width, g0 * f0.scale, g1 * f1.scale);
    if (out.grad_residual != nullptr) store_values(out.grad_residual + off, width, g0, g1);
  });
}

// Channel c's backward coefficients from its sums, in double, each rounded once
// (see forward_arrays).
template <typename scalar_t, typename acc_t>
BackwardCoefficients<acc_t> channel_backward_coefficients(const BackwardArgs<scalar_t, acc_t>& a, int64_t c,
                                                          double sum_dy, double sum_dy_xmu, int64_t count,
                                                          bool train) {
  const BackwardCoefficients<double> k = backward_coefficients_from_invstd(double(a.mean[c]), a.invstd[c],
                                                                           double(a.params.w(c)), sum_dy, sum_dy_xmu,
                                                                           count, train);
  return {acc_t(k.mean), acc_t(k.k_dy), acc_t(k.k_xmu), acc_t(k.k_const)};
}

// dx from the channel sums; `count` is the number of values the statistics
// came from (the global batch under SyncBatchNorm).
template <Activation A, typename scalar_t, typename acc_t>
void backward_apply_all(const BackwardArgs<scalar_t, acc_t>& a, BackwardOutputs<scalar_t> out, const double* sum_dy,
                        const double* sum_dy_xmu, int64_t count, bool train) {
  const Geometry& g = a.g;
  const ForwardArrays<acc_t> forward_k = forward_arrays(a);
  if (!train) return eval_backward_apply_all<A>(a, out, forward_k);
  BackwardArrays<acc_t> coef(g.C);
  std::vector<BackwardCoefficients<acc_t>> channel_coef(g.C);
  for (int64_t c = 0; c < g.C; ++c) {
    channel_coef[c] = channel_backward_coefficients(a, c, sum_dy[c], sum_dy_xmu[c], count, train);
    coef.set(c, channel_coef[c]);
  }
  const bool stream = stream_output(g, out.dx), in_row_order = tiles_in_row_order<scalar_t>(g);
  if (g.layout == Layout::Planar) {
    const bool flat = flat_planar_walk<scalar_t>(g);
    parallel_parts(g.N * g.C * g.S, planar_tasks(g), [&](int64_t, int64_t begin, int64_t end) {
      if (flat) {
        flat_backward<A>(a.dy, a.x, a.residual, out.dx, out.grad_residual, begin, end, g.S, g.C,
                         [&](int64_t c) { return backward_vecs(forward_k.get(c), channel_coef[c]); }, a.act_param,
                         stream);
      } else {
        for_each_plane_run(begin, end, g, [&](int64_t offset, int64_t length, int64_t c) {
          span_backward<A>(a.dy + offset, a.x + offset, offset_or_null(a.residual, offset), out.dx + offset,
                           offset_or_null(out.grad_residual, offset), length, forward_k.get(c), channel_coef[c],
                           a.act_param, stream);
        });
      }
      stream_fence(stream);
    });
    return;
  }
  at::parallel_for(0, g.count(), row_grain(g.C), [&](int64_t r_begin, int64_t r_end) {
    for_each_row_tile(r_begin, r_end, g.C, [&](int64_t r, int64_t rows) {
      const int64_t at = r * g.C;
      tile_backward<A>(a.dy + at, a.x + at, offset_or_null(a.residual, at), out.dx + at,
                       offset_or_null(out.grad_residual, at), rows, g.C, forward_k, coef, a.act_param, stream,
                       in_row_order);
    });
    stream_fence(stream);
  });
}

// invstd: channel_invstd's
template <typename acc_t>
void write_channel_param_grads(int64_t c, double sum_dy, double sum_dy_xmu, const double* invstd, acc_t* grad_weight,
                               acc_t* grad_bias) {
  grad_bias[c] = acc_t(sum_dy);
  grad_weight[c] = acc_t(grad_weight_from_invstd(sum_dy_xmu, invstd[c]));
}

template <typename acc_t>
void write_param_grads(const BackwardSums& sums, const double* invstd, acc_t* grad_weight, acc_t* grad_bias) {
  for (size_t c = 0; c < sums.dy.size(); ++c) {
    write_channel_param_grads(int64_t(c), sums.dy[c], sums.dy_xmu[c], invstd, grad_weight, grad_bias);
  }
}

// The planar training backward a group of channels at a time, in parallel over groups:
// the channels' sums over their N chunks, then their dx from the same chunks while
// they are still in L2 (torch's channels-first backward walks one channel so). Without
// out.dx (no grad_input wanted) the sums alone, in the same order: the parameters'
// gradients are bit for bit those of a call that wants dx too.
template <Activation A, typename scalar_t, typename acc_t>
void planar_channel_backward(const BackwardArgs<scalar_t, acc_t>& a, BackwardOutputs<scalar_t> out,
                             acc_t* grad_weight, acc_t* grad_bias, int64_t group) {
  using red_t = typename ReduceLanes<scalar_t>::red_t;
  const Geometry& g = a.g;
  const ForwardArrays<acc_t> forward_k = forward_arrays(a);
  const bool stream = stream_output(g, out.dx), flat = flat_planar_walk<scalar_t>(g);
  const int64_t groups = (g.C + group - 1) / group;
  at::parallel_for(0, groups, 1, [&](int64_t g_begin, int64_t g_end) {
    std::vector<LaneSums<scalar_t>> lanes_dy(group), lanes_dy_xmu(group);
    std::vector<BackwardCoefficients<acc_t>> k(group);
    for (int64_t gi = g_begin; gi < g_end; ++gi) {
      const int64_t c0 = gi * group, width = std::min(group, g.C - c0);
      for (int64_t n = 0; n < g.N; ++n) {
        for (int64_t j = 0; j < width; ++j) {
          const int64_t c = c0 + j, offset = (n * g.C + c) * g.S;
          span_backward_sums<A>(a.dy + offset, a.x + offset, offset_or_null(a.residual, offset), g.S,
                                red_t(a.mean[c]), forward_k.get(c), a.act_param, lanes_dy[j], lanes_dy_xmu[j]);
        }
      }
      for (int64_t j = 0; j < width; ++j) {
        const int64_t c = c0 + j;
        const double sum_dy = lanes_dy[j].flush(), sum_dy_xmu = lanes_dy_xmu[j].flush();
        write_channel_param_grads(c, sum_dy, sum_dy_xmu, a.invstd.data(), grad_weight, grad_bias);
        k[j] = channel_backward_coefficients(a, c, sum_dy, sum_dy_xmu, g.count(), true);
      }
      for (int64_t n = 0; n < (out.dx != nullptr ? g.N : 0); ++n) {
        if (flat) {  // the sample's chunk of the group's runs
          const int64_t begin = (n * g.C + c0) * g.S;
          flat_backward<A>(a.dy, a.x, a.residual, out.dx, out.grad_residual, begin, begin + width * g.S, g.S,
                           g.C, [&](int64_t c) { return backward_vecs(forward_k.get(c), k[c - c0]); },
                           a.act_param, stream);
          continue;
        }
        for (int64_t j = 0; j < width; ++j) {
          const int64_t c = c0 + j, offset = (n * g.C + c) * g.S;
          span_backward<A>(a.dy + offset, a.x + offset, offset_or_null(a.residual, offset), out.dx + offset,
                           offset_or_null(out.grad_residual, offset), g.S, forward_k.get(c), k[j], a.act_param,
                           stream);
        }
      }
    }
    stream_fence(stream);
  });
}

// The fused backward. Without out.dx (output_mask: no grad_input wanted) only the
// sums and the parameters' gradients; without need_params, evaluation's dx pass alone
// (it does not use the sums), as torch's backward skips what its output mask leaves out.
// Either way the outputs computed are those of a call that wants every output.
template <Activation A, typename scalar_t, typename acc_t>
void backward(const BackwardArgs<scalar_t, acc_t>& a, BackwardOutputs<scalar_t> out, acc_t* grad_weight,
              acc_t* grad_bias, bool train, bool need_params) {
  const bool need_input = out.dx != nullptr;
  if (need_input && !train && !need_params) {
    return backward_apply_all<A>(a, out, nullptr, nullptr, a.g.count(), train);
  }
  if (const int64_t group = train ? planar_channel_group<scalar_t>(a.g, a.residual != nullptr ? 3 : 2) : 0) {
    return planar_channel_backward<A>(a, out, grad_weight, grad_bias, group);
  }
  const BackwardSums sums = backward_sums<A>(a);
  write_param_grads(sums, a.invstd.data(), grad_weight, grad_bias);
  if (need_input) backward_apply_all<A>(a, out, sums.dy.data(), sums.dy_xmu.data(), a.g.count(), train);
}

}  // namespace fastbn::cpu::CPU_CAPABILITY
