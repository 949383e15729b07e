// Reductions: per-channel sums for the statistics and the backward, over one channel's
// run (span_*, planar layout) or down a block of interleaved channels (column_*, channels_last).
// They accumulate in double (red_t) for every input dtype.
// Part of the CPU kernels' vector loops (vec_kernels.h lists them all); compiled once per ISA.
#pragma once

#include "cpu/vec_activations.h"

namespace fastbn::cpu::CPU_CAPABILITY {

// float -> two double vectors (low and high halves).
C10_ALWAYS_INLINE void widen(const Vectorized<float>& v, Vectorized<double>& lo, Vectorized<double>& hi) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 f = v;
  lo = _mm512_cvtps_pd(_mm512_castps512_ps256(f));
  hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1)));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 f = v;
  lo = _mm256_cvtps_pd(_mm256_castps256_ps128(f));
  hi = _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1));
#else
  __at_align__ float f[Vectorized<float>::size()];
  __at_align__ double d[Vectorized<float>::size()];
  v.store(f);
  for (int64_t i = 0; i < Vectorized<float>::size(); ++i) d[i] = f[i];
  lo = Vectorized<double>::loadu(d);
  hi = Vectorized<double>::loadu(d + Vectorized<double>::size());
#endif
}

// v with the lanes past `valid` set to 0 (multiplied by a 1/0 mask: a short
// run's tail costs a load and a multiply, not a branchy lane blend).
template <typename T>
C10_ALWAYS_INLINE Vectorized<T> keep_first(const Vectorized<T>& v, int64_t valid) {
  constexpr int64_t kLanes = Vectorized<T>::size();
  if (valid == kLanes) return v;
  // kLanes ones then kLanes zeros: from index kLanes - valid, `valid` ones.
  static const std::array<T, 2 * kLanes> ones_then_zeros = [] {
    std::array<T, 2 * kLanes> mask{};
    for (int64_t i = 0; i < kLanes; ++i) mask[i] = T(1);
    return mask;
  }();
  return v * Vectorized<T>::loadu(ones_then_zeros.data() + kLanes - valid);
}

template <typename scalar_t>
struct ReduceLanes {
  using red_t = double;
  using Vec = Vectorized<red_t>;
  static constexpr int64_t kBlock = Lanes<scalar_t>::kBlock;     // scalar_t values per block
  static constexpr int kParts = int(kBlock / Vec::size());      // red_t vectors per block
  static_assert(kParts * Vec::size() == kBlock, "a block is a whole number of reduction vectors");

  static C10_ALWAYS_INLINE void widen_block(const typename Lanes<scalar_t>::Vec& lo, const typename Lanes<scalar_t>::Vec& hi,
                                 Vec (&out)[kParts]) {
    if constexpr (std::is_same_v<typename Lanes<scalar_t>::acc_t, float>) {
      widen(lo, out[0], out[1]);
      widen(hi, out[2], out[3]);
    } else {
      out[0] = lo;
      out[1] = hi;
    }
  }
  static C10_ALWAYS_INLINE void load(const scalar_t* p, Vec (&out)[kParts]) {
    typename Lanes<scalar_t>::Vec lo, hi;
    Lanes<scalar_t>::load(p, lo, hi);
    widen_block(lo, hi, out);
  }
  // The first `count` < kBlock values; `valid[j]` lanes of part j hold data, the rest 0.
  static C10_ALWAYS_INLINE void load_partial(const scalar_t* p, int64_t count, Vec (&out)[kParts], int64_t (&valid)[kParts]) {
    typename Lanes<scalar_t>::Vec lo, hi;
    Lanes<scalar_t>::load_partial(p, count, lo, hi);
    widen_block(lo, hi, out);
    FASTBN_UNROLL for (int j = 0; j < kParts; ++j) valid[j] = std::clamp<int64_t>(count - j * Vec::size(), 0, Vec::size());
  }
  static C10_ALWAYS_INLINE Vec keep(const Vec& v, int64_t valid) { return keep_first(v, valid); }
};

// Column reductions sum a few rows in the accumulation type acc_t (float for
// float/half/bfloat16: no conversion, half the vector work of double) and add
// each group's sums into the double accumulators, so the long sums over many
// rows stay in double; the planar (span) reductions of reduced dtypes do the
// same with groups of that many blocks of a run. In the column loops rows go in
// pairs into two sets of accumulators (two dependency chains: an add or fma
// every row on one chain would wait on its latency). Group sizes:
//  - statistics: deviations from a shift near the mean, whose sum is small next
//    to the mean it corrects: 16 rows (see shifted_sums_need_second_pass);
//  - backward sums: the result itself (grad_bias, grad_weight) is a sum of the
//    terms, each float rounding costs a fraction of its last place. 4 rows: in
//    a simulation (random normal terms, 63 to 250 rows) the error of the float
//    result stayed within 1.24 units in the last place of the largest channel
//    (16 rows: 2.03; torch's own float32 results, within 2x of which the tests
//    hold us, were 0.4-2.5 units off on small shapes). Interleaved tensors whose
//    channels sum many values take 16 (backward_group_rows).
constexpr int64_t kStatisticsGroupRows = 16;
constexpr int64_t kBackwardGroupRows = 4;

// kParts vector accumulators whose lanes are added up in double when flushed
// (per piece of a few thousand values, or per channel and part of a planar pass).
template <typename scalar_t>
struct LaneSums {
  using R = ReduceLanes<scalar_t>;
  using red_t = typename R::red_t;
  typename R::Vec acc[R::kParts];
  LaneSums() { clear(); }
  void clear() {
    for (auto& a : acc) a = typename R::Vec(red_t(0));
  }
  // The parts added into one vector (lane sums).
  typename R::Vec vector_total() const {
    typename R::Vec sum = acc[0];
    for (int j = 1; j < R::kParts; ++j) sum = sum + acc[j];
    return sum;
  }
  // The total of every lane, added pairwise (a short dependency chain).
  double flush() {
    typename R::Vec sum = acc[0];
    if constexpr (R::kParts == 4) {
      sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    } else {
      for (int j = 1; j < R::kParts; ++j) sum = sum + acc[j];
    }
    constexpr int64_t kLanes = R::Vec::size();
    __at_align__ red_t lanes[kLanes];
    sum.store(lanes);
    for (int64_t width = kLanes / 2; width > 0; width /= 2) {
      for (int64_t i = 0; i < width; ++i) lanes[i] += lanes[i + width];
    }
    clear();
    return lanes[0];
  }
};

// Adds a float group sum (the two halves of a block already added: one float
// vector) into the double lanes of a span reduction. Adding the halves first
// halves the conversions and double adds of each flush, which for short runs
// (49 values of a 7x7 plane: one flush per run) were most of the reduction.
template <typename scalar_t>
C10_ALWAYS_INLINE void add_group(const Vectorized<float>& group, LaneSums<scalar_t>& lanes) {
  static_assert(ReduceLanes<scalar_t>::kParts >= 2, "a float vector widens into two double vectors");
  Vectorized<double> lo, hi;
  widen(group, lo, hi);
  lanes.acc[0] += lo;
  lanes.acc[1] += hi;
}

// Lane j of the result: the sum of all lanes of v[j] (kLanes vectors added up across
// their lanes at once, about 3 operations per vector instead of a shuffle tree each).
// Each level interleaves pairs of vectors and adds the two halves: a vector then holds
// twice as many partial sums, each over half as many lanes. Pairing v[j] with
// v[j + half], half = kLanes / 2 first, puts the sums in natural order: bit b of a
// result lane is the choice made at the level where half = 2^b. v is overwritten.
template <typename T>
C10_ALWAYS_INLINE Vectorized<T> sum_lanes_of_each(Vectorized<T> (&v)[Vectorized<T>::size()]) {
  constexpr int64_t kLanes = Vectorized<T>::size();
  FASTBN_UNROLL for (int64_t half = kLanes / 2; half >= 1; half /= 2) {
    FASTBN_UNROLL for (int64_t j = 0; j < half; ++j) {
      const auto interleaved = at::vec::interleave2(v[j], v[j + half]);
      v[j] = interleaved.first + interleaved.second;
    }
  }
  return v[0];
}

// A float group of n <= kStatisticsGroupRows * kBlock values (float32, bfloat16, half):
// the lanes of sum(x - shift) and sum((x - shift)^2), for the caller to add up.
template <typename scalar_t, typename AVec = typename Lanes<scalar_t>::Vec>
C10_ALWAYS_INLINE void group_sum_and_squares(const scalar_t* x, int64_t n, const AVec& vshift, AVec& sum,
                                             AVec& squares) {
  using L = Lanes<scalar_t>;
  static_assert(L::kFloatStatistics, "float groups are for dtypes that accumulate in float");
  const AVec zero(typename L::acc_t(0));
  AVec s0 = zero, s1 = zero, q0 = zero, q1 = zero;
  for (int64_t i = 0; i < n; i += L::kBlock) {
    const int64_t count = std::min<int64_t>(L::kBlock, n - i);
    AVec a0, a1;
    load_values<Order::AnyWholeBlocks>(x + i, count, a0, a1);
    if (count != L::kBlock) {  // padding lanes load as 0: mask them after the shift
      int64_t valid[2] = {std::min<int64_t>(count, L::kVec), std::max<int64_t>(count - L::kVec, 0)};
      a0 = keep_first(a0 - vshift, valid[0]);
      a1 = keep_first(a1 - vshift, valid[1]);
    } else {
      a0 = a0 - vshift, a1 = a1 - vshift;
    }
    s0 += a0, s1 += a1;
    q0 = at::vec::fmadd(a0, a0, q0), q1 = at::vec::fmadd(a1, a1, q1);
  }
  sum = s0 + s1;
  squares = q0 + q1;
}

// sums += x - shift; squares += (x - shift)^2: both moments in one pass.
// Summing deviations from a value near the data (the running mean) keeps the
// rounding relative to the spread, not to the mean (x = 1e4 + randn). The
// caller checks that the shift was close enough to the mean for the squares to
// keep their precision (shifted_sums_need_second_pass) and re-reads the piece
// from L1 with span_sum_sq_dev otherwise. Dtypes that accumulate in float
// (float32, bfloat16, half) sum groups of kStatisticsGroupRows blocks in float
// about a float shift and add each group into the double lanes, as the column
// statistics do (which needs a shift within about a standard deviation); double
// sums in double. float32 summed every block in double before: in L2, 1 thread,
// (4,256,14,14) statistics took 56-69 µs against 15 µs for x.sum(), most of it
// in that double loop (18 vector operations per block of 32 floats, 6 here).
template <typename scalar_t, typename red_t = typename ReduceLanes<scalar_t>::red_t>
inline void span_sum_and_squares(const scalar_t* x, int64_t n, red_t shift, LaneSums<scalar_t>& sums,
                                 LaneSums<scalar_t>& squares) {
  using L = Lanes<scalar_t>;
  using R = ReduceLanes<scalar_t>;
  if constexpr (L::kFloatStatistics) {
    using AVec = typename L::Vec;
    const AVec vshift(static_cast<typename L::acc_t>(shift));
    constexpr int64_t kGroup = kStatisticsGroupRows * L::kBlock;
    for (int64_t start = 0; start < n; start += kGroup) {
      AVec group_sum, group_squares;
      group_sum_and_squares(x + start, std::min(n - start, kGroup), vshift, group_sum, group_squares);
      add_group(group_sum, sums);
      add_group(group_squares, squares);
    }
  } else {
    const typename R::Vec vshift(shift);
    typename R::Vec v[R::kParts];
    int64_t i = 0;
    for (; i + R::kBlock <= n; i += R::kBlock) {
      R::load(x + i, v);
      FASTBN_UNROLL for (int j = 0; j < R::kParts; ++j) {
        const auto d = v[j] - vshift;
        sums.acc[j] += d;
        squares.acc[j] = at::vec::fmadd(d, d, squares.acc[j]);
      }
    }
    if (i < n) {  // padding lanes load as 0: mask them after the shift
      int64_t valid[R::kParts];
      R::load_partial(x + i, n - i, v, valid);
      FASTBN_UNROLL for (int j = 0; j < R::kParts; ++j) {
        const auto d = R::keep(v[j] - vshift, valid[j]);
        sums.acc[j] += d;
        squares.acc[j] = at::vec::fmadd(d, d, squares.acc[j]);
      }
    }
  }
}

// The vector of one run's lane sums in the grouped planar statistics (runs_sum_and_squares):
// float for the dtypes that accumulate in float (a run is one float group), double for double.
template <typename scalar_t>
using RunVec = typename Lanes<scalar_t>::Vec;

// The statistics of RunVec's width of consecutive runs of n values each (float
// groups: n <= kStatisticsGroupRows * kBlock, one group per run), run j about shifts[j]:
// lane j of `sums` is run j's sum(x - shifts[j]), of `squares` its sum((x - shifts[j])^2).
// For short planar runs (7x7 planes), where flushing one run's lanes into its channel's
// double lanes cost more than summing the run.
template <typename scalar_t>
inline void runs_sum_and_squares(const scalar_t* x, int64_t n, const double* shifts,
                                 RunVec<scalar_t>& sums, RunVec<scalar_t>& squares) {
  using V = RunVec<scalar_t>;
  constexpr int64_t kRuns = V::size();
  V run_sums[kRuns], run_squares[kRuns];
  for (int64_t j = 0; j < kRuns; ++j) {
    if constexpr (Lanes<scalar_t>::kFloatStatistics) {  // (the shifts are float values: span_shift)
      group_sum_and_squares(x + j * n, n, V(typename V::value_type(shifts[j])), run_sums[j], run_squares[j]);
    } else {
      LaneSums<scalar_t> lane_sums, lane_squares;
      span_sum_and_squares(x + j * n, n, shifts[j], lane_sums, lane_squares);
      run_sums[j] = lane_sums.vector_total();
      run_squares[j] = lane_squares.vector_total();
    }
  }
  sums = sum_lanes_of_each(run_sums);
  squares = sum_lanes_of_each(run_squares);
}

// acc += (x - mean)^2
template <typename scalar_t, typename red_t = typename ReduceLanes<scalar_t>::red_t>
inline void span_sum_sq_dev(const scalar_t* x, int64_t n, red_t mean, LaneSums<scalar_t>& sums) {
  using R = ReduceLanes<scalar_t>;
  const typename R::Vec vmean(mean);
  typename R::Vec v[R::kParts];
  int64_t i = 0;
  for (; i + R::kBlock <= n; i += R::kBlock) {
    R::load(x + i, v);
    FASTBN_UNROLL for (int j = 0; j < R::kParts; ++j) {
      const auto d = v[j] - vmean;
      sums.acc[j] = at::vec::fmadd(d, d, sums.acc[j]);
    }
  }
  if (i < n) {
    int64_t valid[R::kParts];
    R::load_partial(x + i, n - i, v, valid);
    FASTBN_UNROLL for (int j = 0; j < R::kParts; ++j) {
      const auto d = R::keep(v[j] - vmean, valid[j]);
      sums.acc[j] = at::vec::fmadd(d, d, sums.acc[j]);
    }
  }
}

// A float group of n values (float32, bfloat16, half; kBackwardGroupRows blocks in
// span_backward_sums, a whole short run in runs_backward_sums): the lanes of sum(g) and
// sum(g * (x - mean)), g = dy * act'(z [+ residual]), for the caller to add up.
template <Activation A, typename scalar_t, typename AVec = typename Lanes<scalar_t>::Vec>
C10_ALWAYS_INLINE void group_backward_sums(const scalar_t* dy, const scalar_t* x, const scalar_t* residual, int64_t n,
                                           const AVec& vmean, const ForwardVecs<AVec>& f, const AVec& vparam,
                                           AVec& sum_dy, AVec& sum_dy_xmu) {
  using L = Lanes<scalar_t>;
  static_assert(L::kFloatStatistics, "float groups are for dtypes that accumulate in float");
  const AVec zero(typename L::acc_t(0));
  AVec s0 = zero, s1 = zero, p0 = zero, p1 = zero;
  for (int64_t i = 0; i < n; i += L::kBlock) {
    // padding lanes load dy = 0, so g = 0 there and adds nothing
    const int64_t count = std::min<int64_t>(L::kBlock, n - i);
    AVec g0, g1, x0, x1, r0, r1;
    load_values<Order::Any>(dy + i, count, g0, g1);
    load_values<Order::Any>(x + i, count, x0, x1);
    load_residual<A, Order::Any>(residual, i, count, r0, r1);
    g0 = grad_before_activation<A>(g0, x0, r0, f, vparam);
    g1 = grad_before_activation<A>(g1, x1, r1, f, vparam);
    s0 += g0, s1 += g1;
    p0 = at::vec::fmadd(g0, x0 - vmean, p0), p1 = at::vec::fmadd(g1, x1 - vmean, p1);
  }
  sum_dy = s0 + s1;
  sum_dy_xmu = p0 + p1;
}

// sum_dy += g; sum_dy_xmu += g * (x - mean), g = dy * act'(z [+ residual]); residual may be null.
// float32 widens every block to double: grad_weight is a sum of terms that
// largely cancel, and a float rounding per term failed the parity budget against
// torch's double sums (short runs of up to kBackwardGroupRows blocks are summed in one
// float group each, which stays within it: float_backward_runs). Reduced dtypes
// (bfloat16, half) sum groups of kBackwardGroupRows blocks in float (acc_t) and add each
// group into the double lanes, as the column sums do: torch sums them in float too.
template <Activation A, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>,
          typename red_t = typename ReduceLanes<scalar_t>::red_t>
inline void span_backward_sums(const scalar_t* dy, const scalar_t* x, const scalar_t* residual, int64_t n, red_t mean,
                               const ForwardCoefficients<acc_t>& fk, acc_t param, LaneSums<scalar_t>& sum_dy,
                               LaneSums<scalar_t>& sum_dy_xmu) {
  using L = Lanes<scalar_t>;
  using R = ReduceLanes<scalar_t>;
  const auto f = forward_vecs(fk);
  const typename L::Vec vparam(param);
  if constexpr (L::kReduced) {
    using AVec = typename L::Vec;
    const AVec vmean(static_cast<acc_t>(mean));  // mean is the operator's acc_t batch mean
    constexpr int64_t kGroup = kBackwardGroupRows * L::kBlock;
    for (int64_t start = 0; start < n; start += kGroup) {
      AVec group_dy, group_dy_xmu;
      group_backward_sums<A>(dy + start, x + start, residual == nullptr ? nullptr : residual + start,
                             std::min(n - start, kGroup), vmean, f, vparam, group_dy, group_dy_xmu);
      add_group(group_dy, sum_dy);
      add_group(group_dy_xmu, sum_dy_xmu);
    }
  } else {
    // g and x of the block at i (padding lanes load dy = 0, so g = 0 there and adds nothing)
    auto block = [&](int64_t i, typename L::Vec& glo, typename L::Vec& ghi, typename L::Vec& xlo,
                     typename L::Vec& xhi) C10_ALWAYS_INLINE_ATTRIBUTE {
      const int64_t count = std::min<int64_t>(L::kBlock, n - i);
      typename L::Vec rlo, rhi;
      load_values<Order::Any>(dy + i, count, glo, ghi);
      load_values<Order::Any>(x + i, count, xlo, xhi);
      load_residual<A, Order::Any>(residual, i, count, rlo, rhi);
      glo = grad_before_activation<A>(glo, xlo, rlo, f, vparam);
      ghi = grad_before_activation<A>(ghi, xhi, rhi, f, vparam);
    };
    const typename R::Vec vmean(mean);
    for (int64_t i = 0; i < n; i += L::kBlock) {
      typename L::Vec glo, ghi, xlo, xhi;
      block(i, glo, ghi, xlo, xhi);
      typename R::Vec d[R::kParts], v[R::kParts];
      R::widen_block(glo, ghi, d);
      R::widen_block(xlo, xhi, v);
      FASTBN_UNROLL for (int j = 0; j < R::kParts; ++j) {
        sum_dy.acc[j] += d[j];
        sum_dy_xmu.acc[j] = at::vec::fmadd(d[j], v[j] - vmean, sum_dy_xmu.acc[j]);
      }
    }
  }
}

// The vector of one run's lane sums in runs_backward_sums: float where each run is one
// float group (kFloatRuns), else double.
template <bool kFloatRuns>
using BackwardRunVec = Vectorized<std::conditional_t<kFloatRuns, float, double>>;

// The backward sums of BackwardRunVec's width of consecutive runs of n values each, run j
// of channel channels[j]: lane j of `sum_dy` / `sum_dy_xmu` is run j's sum(g) /
// sum(g * (x - mean)) (see runs_sum_and_squares). kFloatRuns: each run is one float group
// (float32, bfloat16, half), else summed as span_backward_sums does (see float_backward_runs).
template <Activation A, bool kFloatRuns, typename scalar_t, typename acc_t = typename Lanes<scalar_t>::acc_t>
inline void runs_backward_sums(const scalar_t* dy, const scalar_t* x, const scalar_t* residual, int64_t n,
                               const int64_t* channels, const acc_t* mean, const ForwardArrays<acc_t>& fk,
                               acc_t param, BackwardRunVec<kFloatRuns>& sum_dy,
                               BackwardRunVec<kFloatRuns>& sum_dy_xmu) {
  using V = BackwardRunVec<kFloatRuns>;
  constexpr int64_t kRuns = V::size();
  const Vectorized<acc_t> vparam(param);
  V run_dy[kRuns], run_dy_xmu[kRuns];
  for (int64_t j = 0; j < kRuns; ++j) {
    const int64_t c = channels[j];
    const scalar_t* run_residual = residual == nullptr ? nullptr : residual + j * n;
    if constexpr (kFloatRuns) {
      group_backward_sums<A>(dy + j * n, x + j * n, run_residual, n, Vectorized<acc_t>(mean[c]),
                             forward_vecs(fk.get(c)), vparam, run_dy[j], run_dy_xmu[j]);
    } else {
      LaneSums<scalar_t> lane_dy, lane_dy_xmu;
      span_backward_sums<A>(dy + j * n, x + j * n, run_residual, n, typename ReduceLanes<scalar_t>::red_t(mean[c]),
                            fk.get(c), param, lane_dy, lane_dy_xmu);
      run_dy[j] = lane_dy.vector_total();
      run_dy_xmu[j] = lane_dy_xmu.vector_total();
    }
  }
  sum_dy = sum_lanes_of_each(run_dy);
  sum_dy_xmu = sum_lanes_of_each(run_dy_xmu);
}

// Columns: a block of `width` <= kBlock interleaved channels over `rows` rows
// that lie `stride` values apart (channels_last, (N, C)). Accumulators stay in
// registers down the column; per-channel arrays are padded to whole blocks.

template <typename scalar_t, typename R = ReduceLanes<scalar_t>>
C10_ALWAYS_INLINE void load_row_block(const scalar_t* p, int64_t width, typename R::Vec (&v)[R::kParts]) {
  if (width == R::kBlock) {
    R::load(p, v);
  } else {  // lanes past width hold 0; their results are never stored
    int64_t valid[R::kParts];
    R::load_partial(p, width, v, valid);
  }
}

template <typename red_t, int kParts, typename Vec>
inline void store_block(const Vec (&acc)[kParts], red_t* out, int64_t width) {
  __at_align__ red_t lanes[kParts * Vec::size()];
  FASTBN_UNROLL for (int j = 0; j < kParts; ++j) acc[j].store(lanes + j * Vec::size());
  for (int64_t i = 0; i < width; ++i) out[i] = lanes[i];
}

// sums[c] += sum over rows of (x[c] - shift[c]), squares[c] += of (x[c] - shift[c])^2.
// sums and squares hold a whole block (padded arrays); lanes past width gather junk.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>,
          typename red_t = typename ReduceLanes<scalar_t>::red_t>
inline void column_sum_and_squares(const scalar_t* x, int64_t rows, int64_t stride, int64_t width, const acc_t* shift,
                                   red_t* sums, red_t* squares) {
  using R = ReduceLanes<scalar_t>;
  using Vec = typename R::Vec;
  using AVec = typename Lanes<scalar_t>::Vec;
  constexpr int64_t kVec = Lanes<scalar_t>::kVec;
  Vec acc[R::kParts], acc_sq[R::kParts], wide[R::kParts];
  FASTBN_UNROLL for (int j = 0; j < R::kParts; ++j) {
    acc[j] = Vec::loadu(sums + j * Vec::size());
    acc_sq[j] = Vec::loadu(squares + j * Vec::size());
  }
  const AVec shift0 = AVec::loadu(shift), shift1 = AVec::loadu(shift + kVec), zero(acc_t(0));
  for (int64_t g = 0; g < rows; g += kStatisticsGroupRows) {
    const int64_t end = std::min(rows, g + kStatisticsGroupRows);
    AVec s0 = zero, s1 = zero, qa0 = zero, qa1 = zero, qb0 = zero, qb1 = zero;
    int64_t r = g;
    for (; r + 2 <= end; r += 2) {
      AVec a0, a1, b0, b1;
      load_values(x + r * stride, width, a0, a1);
      load_values(x + (r + 1) * stride, width, b0, b1);
      a0 = a0 - shift0, a1 = a1 - shift1, b0 = b0 - shift0, b1 = b1 - shift1;
      s0 += a0 + b0;
      s1 += a1 + b1;
      qa0 = at::vec::fmadd(a0, a0, qa0), qa1 = at::vec::fmadd(a1, a1, qa1);
      qb0 = at::vec::fmadd(b0, b0, qb0), qb1 = at::vec::fmadd(b1, b1, qb1);
    }
    if (r < end) {
      AVec a0, a1;
      load_values(x + r * stride, width, a0, a1);
      a0 = a0 - shift0, a1 = a1 - shift1;
      s0 += a0, s1 += a1;
      qa0 = at::vec::fmadd(a0, a0, qa0), qa1 = at::vec::fmadd(a1, a1, qa1);
    }
    R::widen_block(s0, s1, wide);
    FASTBN_UNROLL for (int j = 0; j < R::kParts; ++j) acc[j] += wide[j];
    R::widen_block(qa0 + qb0, qa1 + qb1, wide);
    FASTBN_UNROLL for (int j = 0; j < R::kParts; ++j) acc_sq[j] += wide[j];
  }
  FASTBN_UNROLL for (int j = 0; j < R::kParts; ++j) {
    acc[j].store(sums + j * Vec::size());
    acc_sq[j].store(squares + j * Vec::size());
  }
}

// out[c] = sum over rows of (x[c] - mean[c])^2
template <typename scalar_t, typename red_t = typename ReduceLanes<scalar_t>::red_t>
inline void column_sum_sq_dev(const scalar_t* x, int64_t rows, int64_t stride, int64_t width, const red_t* mean,
                              red_t* out) {
  using R = ReduceLanes<scalar_t>;
  using Vec = typename R::Vec;
  Vec acc[R::kParts], vmean[R::kParts], v[R::kParts];
  FASTBN_UNROLL for (int j = 0; j < R::kParts; ++j) {
    acc[j] = Vec(red_t(0));
    vmean[j] = Vec::loadu(mean + j * Vec::size());
  }
  for (int64_t r = 0; r < rows; ++r) {
    load_row_block(x + r * stride, width, v);
    FASTBN_UNROLL for (int j = 0; j < R::kParts; ++j) {
      const Vec d = v[j] - vmean[j];
      acc[j] = at::vec::fmadd(d, d, acc[j]);
    }
  }
  store_block<red_t, R::kParts>(acc, out, width);
}

// out_dy[c] += sum of g[c]; out_dy_xmu[c] += sum of g[c] * (x[c] - mean[c]), g = dy * act'(z [+ residual]);
// out_dy and out_dy_xmu hold a whole block (padded arrays; lanes past width stay 0).
// Summed in acc_t over groups of float_group_rows rows (backward_group_rows); mean comes
// in acc_t (the operator's batch mean), so x - mean is the same value in float as in double.
template <Activation A, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>,
          typename red_t = typename ReduceLanes<scalar_t>::red_t>
inline void column_backward_sums(const scalar_t* dy, const scalar_t* x, const scalar_t* residual, int64_t rows,
                                 int64_t stride, int64_t width, const acc_t* mean, const ForwardArrays<acc_t>& fk,
                                 int64_t c0, acc_t param, red_t* out_dy, red_t* out_dy_xmu,
                                 int64_t float_group_rows) {
  using L = Lanes<scalar_t>;
  using R = ReduceLanes<scalar_t>;
  using RVec = typename R::Vec;
  using AVec = typename L::Vec;
  const ForwardVecs<AVec> f[2] = {forward_vecs(fk, c0), forward_vecs(fk, c0 + L::kVec)};
  const AVec vparam(param), mean0 = AVec::loadu(mean), mean1 = AVec::loadu(mean + L::kVec), zero(acc_t(0));
  RVec acc_dy[R::kParts], acc_dx[R::kParts], wide[R::kParts];
  FASTBN_UNROLL for (int j = 0; j < R::kParts; ++j) {
    acc_dy[j] = RVec::loadu(out_dy + j * RVec::size());
    acc_dx[j] = RVec::loadu(out_dy_xmu + j * RVec::size());
  }
  // g of one row's block and x - mean; lanes past width: dy = 0, so g = 0 (never stored)
  auto row = [&](int64_t r, AVec& g0, AVec& g1, AVec& d0, AVec& d1) C10_ALWAYS_INLINE_ATTRIBUTE {
    AVec x0, x1, r0, r1;
    load_values(dy + r * stride, width, g0, g1);
    load_values(x + r * stride, width, x0, x1);
    load_residual<A>(residual, r * stride, width, r0, r1);
    g0 = grad_before_activation<A>(g0, x0, r0, f[0], vparam);
    g1 = grad_before_activation<A>(g1, x1, r1, f[1], vparam);
    d0 = x0 - mean0;
    d1 = x1 - mean1;
  };
  for (int64_t g = 0; g < rows; g += float_group_rows) {
    const int64_t end = std::min(rows, g + float_group_rows);
    AVec s0 = zero, s1 = zero, pa0 = zero, pa1 = zero, pb0 = zero, pb1 = zero;
    int64_t r = g;
    for (; r + 2 <= end; r += 2) {
      AVec ga0, ga1, da0, da1, gb0, gb1, db0, db1;
      row(r, ga0, ga1, da0, da1);
      row(r + 1, gb0, gb1, db0, db1);
      s0 += ga0 + gb0;
      s1 += ga1 + gb1;
      pa0 = at::vec::fmadd(ga0, da0, pa0), pa1 = at::vec::fmadd(ga1, da1, pa1);
      pb0 = at::vec::fmadd(gb0, db0, pb0), pb1 = at::vec::fmadd(gb1, db1, pb1);
    }
    if (r < end) {
      AVec ga0, ga1, da0, da1;
      row(r, ga0, ga1, da0, da1);
      s0 += ga0, s1 += ga1;
      pa0 = at::vec::fmadd(ga0, da0, pa0), pa1 = at::vec::fmadd(ga1, da1, pa1);
    }
    R::widen_block(s0, s1, wide);
    FASTBN_UNROLL for (int j = 0; j < R::kParts; ++j) acc_dy[j] += wide[j];
    R::widen_block(pa0 + pb0, pa1 + pb1, wide);
    FASTBN_UNROLL for (int j = 0; j < R::kParts; ++j) acc_dx[j] += wide[j];
  }
  FASTBN_UNROLL for (int j = 0; j < R::kParts; ++j) {
    acc_dy[j].store(out_dy + j * RVec::size());
    acc_dx[j].store(out_dy_xmu + j * RVec::size());
  }
}

// Rows: `rows` rows `stride` values apart, of which C interleaved channels (a whole
// row, or a panel of a wider one: for_each_row_panel) in kBlocks blocks (the last one
// may be partial), walked in memory order with every channel's float group sums in
// registers; each group of rows is added into the double arrays (padded to whole
// blocks). For tensors past the L2 with a few blocks per row, and panels of wider rows
// past the cache (row_walk_group_rows): the column loops took a group of about 1 KiB
// at a time there, and loading and storing their double accumulators for every such
// group made the statistics about twice as slow as torch's x.sum over the same
// channels_last tensor.

// The width of block b of a row of C channels in kBlocks blocks of kBlock.
template <int kBlocks, int64_t kBlock>
C10_ALWAYS_INLINE int64_t row_block_width(int b, int64_t C) {
  return b + 1 < kBlocks ? kBlock : C - (kBlocks - 1) * kBlock;
}

// Adds a float group's block sums (two vectors) into the double array at out.
template <typename scalar_t, typename AVec, typename red_t>
C10_ALWAYS_INLINE void add_block_group(const AVec& lo, const AVec& hi, red_t* out) {
  using R = ReduceLanes<scalar_t>;
  typename R::Vec wide[R::kParts];
  R::widen_block(lo, hi, wide);
  FASTBN_UNROLL for (int j = 0; j < R::kParts; ++j) {
    (R::Vec::loadu(out + j * R::Vec::size()) + wide[j]).store(out + j * R::Vec::size());
  }
}

// sums[c] += sum over rows of (x[c] - shift[c]), squares[c] += of (x[c] - shift[c])^2
// (column_sum_and_squares for whole rows or panels: C channels of rows `stride` values apart).
template <int kBlocks, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>,
          typename red_t = typename ReduceLanes<scalar_t>::red_t>
inline void rows_sum_and_squares(const scalar_t* x, int64_t rows, int64_t stride, int64_t C, const acc_t* shift,
                                 red_t* sums, red_t* squares) {
  using L = Lanes<scalar_t>;
  using AVec = typename L::Vec;
  AVec shifts[kBlocks][2];
  FASTBN_UNROLL for (int b = 0; b < kBlocks; ++b) {
    shifts[b][0] = AVec::loadu(shift + b * L::kBlock);
    shifts[b][1] = AVec::loadu(shift + b * L::kBlock + L::kVec);
  }
  const AVec zero(acc_t(0));
  for (int64_t g = 0; g < rows; g += kStatisticsGroupRows) {
    const int64_t end = std::min(rows, g + kStatisticsGroupRows);
    AVec s[kBlocks][2], q[kBlocks][2];
    FASTBN_UNROLL for (int b = 0; b < kBlocks; ++b) s[b][0] = s[b][1] = q[b][0] = q[b][1] = zero;
    for (int64_t r = g; r < end; ++r) {
      FASTBN_UNROLL for (int b = 0; b < kBlocks; ++b) {
        AVec a0, a1;  // a partial block's padding lanes: 0 - 0 (the shift arrays are padded with 0)
        load_values(x + r * stride + b * L::kBlock, row_block_width<kBlocks, L::kBlock>(b, C), a0, a1);
        a0 = a0 - shifts[b][0], a1 = a1 - shifts[b][1];
        s[b][0] += a0, s[b][1] += a1;
        q[b][0] = at::vec::fmadd(a0, a0, q[b][0]), q[b][1] = at::vec::fmadd(a1, a1, q[b][1]);
      }
    }
    FASTBN_UNROLL for (int b = 0; b < kBlocks; ++b) {
      add_block_group<scalar_t>(s[b][0], s[b][1], sums + b * L::kBlock);
      add_block_group<scalar_t>(q[b][0], q[b][1], squares + b * L::kBlock);
    }
  }
}

// out_dy[c] += sum of g[c]; out_dy_xmu[c] += sum of g[c] * (x[c] - mean[c]) over rows
// (column_backward_sums for whole rows or panels: mean starts at the panel's first
// channel, c_first, while fk's arrays are indexed by channel; both padded), in float
// groups of float_group_rows rows (backward_group_rows).
template <int kBlocks, Activation A, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>,
          typename red_t = typename ReduceLanes<scalar_t>::red_t>
inline void rows_backward_sums(const scalar_t* dy, const scalar_t* x, const scalar_t* residual, int64_t rows,
                               int64_t stride, int64_t C, int64_t c_first, int64_t float_group_rows,
                               const acc_t* mean, const ForwardArrays<acc_t>& fk, acc_t param, red_t* out_dy,
                               red_t* out_dy_xmu) {
  using L = Lanes<scalar_t>;
  using AVec = typename L::Vec;
  const AVec vparam(param), zero(acc_t(0));
  AVec means[kBlocks][2];
  FASTBN_UNROLL for (int b = 0; b < kBlocks; ++b) {
    means[b][0] = AVec::loadu(mean + b * L::kBlock);
    means[b][1] = AVec::loadu(mean + b * L::kBlock + L::kVec);
  }
  for (int64_t g = 0; g < rows; g += float_group_rows) {
    const int64_t end = std::min(rows, g + float_group_rows);
    AVec s[kBlocks][2], p[kBlocks][2];
    FASTBN_UNROLL for (int b = 0; b < kBlocks; ++b) s[b][0] = s[b][1] = p[b][0] = p[b][1] = zero;
    for (int64_t r = g; r < end; ++r) {
      FASTBN_UNROLL for (int b = 0; b < kBlocks; ++b) {
        // lanes past the width: dy = 0, so g = 0 (never stored)
        const int64_t at = r * stride + b * L::kBlock, width = row_block_width<kBlocks, L::kBlock>(b, C);
        AVec g0, g1, x0, x1, r0, r1;
        load_values(dy + at, width, g0, g1);
        load_values(x + at, width, x0, x1);
        load_residual<A>(residual, at, width, r0, r1);
        if constexpr (A != Activation::Identity) {  // (the identity's gradient needs no coefficients)
          const int64_t c = c_first + b * L::kBlock;
          g0 = grad_before_activation<A>(g0, x0, r0, forward_vecs(fk, c), vparam);
          g1 = grad_before_activation<A>(g1, x1, r1, forward_vecs(fk, c + L::kVec), vparam);
        }
        s[b][0] += g0, s[b][1] += g1;
        p[b][0] = at::vec::fmadd(g0, x0 - means[b][0], p[b][0]);
        p[b][1] = at::vec::fmadd(g1, x1 - means[b][1], p[b][1]);
      }
    }
    FASTBN_UNROLL for (int b = 0; b < kBlocks; ++b) {
      add_block_group<scalar_t>(s[b][0], s[b][1], out_dy + b * L::kBlock);
      add_block_group<scalar_t>(p[b][0], p[b][1], out_dy_xmu + b * L::kBlock);
    }
  }
}

}  // namespace fastbn::cpu::CPU_CAPABILITY
