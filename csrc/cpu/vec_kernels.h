// Vectorized inner loops of the CPU batch norm, built on at::vec::Vectorized.
//
// Two shapes of loop:
//  - span_*:   one channel's contiguous run of values (planar layout, NCHW);
//  - column_*: a block of interleaved channels down many rows (channels_last,
//              (N, C)), with the per-channel state in registers.
// Elementwise passes compute in the accumulation type acc_t (float for
// half/bfloat16/float, double for double), loading blocks of two vectors
// (exactly one Vectorized<half/bfloat16>). Reductions accumulate in red_t =
// double for every input dtype, as torch's CPU kernels do for float
// (at::acc_type<float, false>): sums over many values stay correctly rounded.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>

#include <array>
#include <vector>

#include "bn_math.h"

#ifndef CPU_CAPABILITY
#error "compiled once per ISA with CPU_CAPABILITY set: include only from csrc/cpu/per_isa/ (see setup.py)"
#endif

// One copy per ISA (see per_isa/batch_norm_kernels.cpp).
namespace fastbn::cpu::CPU_CAPABILITY {

// Fully unrolls the loops over a block's reduction vectors, so that arrays of
// accumulators live in registers (not unrolled, GCC keeps them on the stack and
// every add waits for a store to forward).
#if defined(__clang__)
#define FASTBN_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define FASTBN_UNROLL _Pragma("GCC unroll 8")
#else
#define FASTBN_UNROLL
#endif

using at::vec::Vectorized;

template <typename scalar_t>
struct Lanes {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;
  static constexpr int64_t kVec = Vec::size();
  static constexpr int64_t kBlock = 2 * kVec;  // scalar_t values per block

  static C10_ALWAYS_INLINE void load(const scalar_t* p, Vec& lo, Vec& hi) {
    if constexpr (kReduced) {
      at::vec::load_to_float<scalar_t>(p, lo, hi);
    } else {
      lo = Vec::loadu(p);
      hi = Vec::loadu(p + kVec);
    }
  }
  // Loads the first `count` < kBlock values; the other lanes are zero.
  static C10_ALWAYS_INLINE void load_partial(const scalar_t* p, int64_t count, Vec& lo, Vec& hi) {
    if constexpr (kReduced) {
      auto packed = Vectorized<scalar_t>::loadu(p, count);
      std::tie(lo, hi) = at::vec::convert_to_float<scalar_t>(packed);
    } else {
      lo = Vec::loadu(p, std::min<int64_t>(count, kVec));
      hi = count > kVec ? Vec::loadu(p + kVec, count - kVec) : Vec(acc_t(0));
    }
  }
  static C10_ALWAYS_INLINE void store(scalar_t* p, const Vec& lo, const Vec& hi) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(lo, hi).store(p);
    } else {
      lo.store(p);
      hi.store(p + kVec);
    }
  }
  // store() bypassing the caches (a streaming store: no read of the destination
  // line first, none of the cache evicted). p must be aligned to the vector size
  // (stream_head gives the values to store normally first); end the loop with
  // stream_fence(). Without AVX2/AVX-512 a plain store.
  static C10_ALWAYS_INLINE void store_stream(scalar_t* p, const Vec& lo, const Vec& hi) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (kReduced) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(p), __m512i(at::vec::convert_from_float<scalar_t>(lo, hi)));
    } else if constexpr (std::is_same_v<scalar_t, float>) {
      _mm512_stream_ps(p, lo);
      _mm512_stream_ps(p + kVec, hi);
    } else {
      _mm512_stream_pd(p, lo);
      _mm512_stream_pd(p + kVec, hi);
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (kReduced) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), __m256i(at::vec::convert_from_float<scalar_t>(lo, hi)));
    } else if constexpr (std::is_same_v<scalar_t, float>) {
      _mm256_stream_ps(p, lo);
      _mm256_stream_ps(p + kVec, hi);
    } else {
      _mm256_stream_pd(p, lo);
      _mm256_stream_pd(p + kVec, hi);
    }
#else
    store(p, lo, hi);
#endif
  }
  static C10_ALWAYS_INLINE void store_partial(scalar_t* p, int64_t count, const Vec& lo, const Vec& hi) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(lo, hi).store(p, count);
    } else {
      lo.store(p, std::min<int64_t>(count, kVec));
      if (count > kVec) hi.store(p + kVec, count - kVec);
    }
  }
};

// Loads the first `count` <= kBlock values at p (the rest of the lanes 0).
template <typename scalar_t, typename Vec>
C10_ALWAYS_INLINE void load_values(const scalar_t* p, int64_t count, Vec& lo, Vec& hi) {
  if (count == Lanes<scalar_t>::kBlock) {
    Lanes<scalar_t>::load(p, lo, hi);
  } else {
    Lanes<scalar_t>::load_partial(p, count, lo, hi);
  }
}

// ---------------------------------------------------------------- reductions

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
  // v with the lanes past `valid` set to 0 (multiplied by a 1/0 mask: a short
  // run's tail costs a load and a multiply, not a branchy lane blend).
  static C10_ALWAYS_INLINE Vec keep(const Vec& v, int64_t valid) {
    if (valid == Vec::size()) return v;
    // Vec::size() ones then Vec::size() zeros: from index size - valid, `valid` ones.
    static const std::array<red_t, 2 * Vec::size()> ones_then_zeros = [] {
      std::array<red_t, 2 * Vec::size()> mask{};
      for (int64_t i = 0; i < Vec::size(); ++i) mask[i] = red_t(1);
      return mask;
    }();
    return v * Vec::loadu(ones_then_zeros.data() + Vec::size() - valid);
  }
};

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

// sums += x - shift; squares += (x - shift)^2: both moments in one pass.
// Summing deviations from a value near the data (the running mean) keeps the
// rounding relative to the spread, not to the mean (x = 1e4 + randn). The
// caller checks that the shift was close enough to the mean for the squares to
// keep their precision (statistics_need_second_pass) and re-reads the piece
// from L1 with span_sum_sq_dev otherwise.
template <typename scalar_t, typename red_t = typename ReduceLanes<scalar_t>::red_t>
inline void span_sum_and_squares(const scalar_t* x, int64_t n, red_t shift, LaneSums<scalar_t>& sums,
                                 LaneSums<scalar_t>& squares) {
  using R = ReduceLanes<scalar_t>;
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

// ---------------------------------------------------------------- activations
// Vector forms of activation_forward / activation_grad (bn_math.h), the
// activation fixed at compile time.

template <Activation A, typename Vec>
C10_ALWAYS_INLINE Vec vec_activation(const Vec& z, const Vec& param) {
  using T = typename Vec::value_type;
  const Vec zero(T(0));
  if constexpr (A == Activation::ReLU) {
    return at::vec::maximum(z, zero);  // NaN stays NaN, as in torch.relu
  } else if constexpr (A == Activation::LeakyReLU) {
    return Vec::blendv(z * param, z, z > zero);
  } else if constexpr (A == Activation::ELU) {
    return Vec::blendv(param * z.expm1(), z, z > zero);
  } else if constexpr (A == Activation::SiLU) {
    return z / (Vec(T(1)) + z.neg().exp());
  } else {
    return z;
  }
}

template <Activation A, typename Vec>
C10_ALWAYS_INLINE Vec vec_activation_grad(const Vec& z, const Vec& param) {
  using T = typename Vec::value_type;
  const Vec zero(T(0)), one(T(1));
  // at a NaN z, torch's relu/elu backward pass the gradient (z <= 0 is false), leaky_relu's scales it
  if constexpr (A == Activation::ReLU) {
    return Vec::blendv(one, zero, z <= zero);
  } else if constexpr (A == Activation::LeakyReLU) {
    return Vec::blendv(param, one, z > zero);
  } else if constexpr (A == Activation::ELU) {
    return Vec::blendv(one, param * z.exp(), z <= zero);
  } else if constexpr (A == Activation::SiLU) {
    const Vec sigmoid = one / (one + z.neg().exp());
    return sigmoid * (one + z * (one - sigmoid));
  } else {
    return one;
  }
}

// Vector forms of activation_inverse / activation_grad_from_output (bn_math.h),
// for in-place activated BN.
template <Activation A, typename Vec>
C10_ALWAYS_INLINE Vec vec_activation_inverse(const Vec& y, const Vec& param, const Vec& elu_floor) {
  using T = typename Vec::value_type;
  const Vec zero(T(0));
  if constexpr (A == Activation::LeakyReLU) {
    return Vec::blendv(y / param, y, y > zero);
  } else if constexpr (A == Activation::ELU) {
    // y can round below -alpha when alpha is not exact in the stored dtype: clamp to -1
    const Vec q = at::vec::maximum(y / param, Vec(T(-1)));
    return Vec::blendv(at::vec::maximum(q.log1p(), elu_floor), y, y > zero);
  } else {
    return y;
  }
}

template <Activation A, typename Vec>
C10_ALWAYS_INLINE Vec vec_activation_grad_from_output(const Vec& y, const Vec& param) {
  using T = typename Vec::value_type;
  const Vec zero(T(0)), one(T(1));
  if constexpr (A == Activation::LeakyReLU) {
    return Vec::blendv(param, one, y > zero);
  } else if constexpr (A == Activation::ELU) {
    return Vec::blendv(at::vec::maximum(y + param, zero), one, y > zero);
  } else {
    return one;
  }
}

// Forward coefficients of one channel as vectors.
template <typename Vec>
struct ForwardVecs {
  Vec hi, lo, scale, bias;
  inline Vec z(const Vec& x) const { return at::vec::fmadd((x - hi) - lo, scale, bias); }
};

// The gradient reaching the normalized output: dy * act'(z), z recomputed from
// x (plus the residual r of batch_norm_add_act; 0 without one).
template <Activation A, typename Vec>
C10_ALWAYS_INLINE Vec grad_before_activation(const Vec& dy, const Vec& x, const Vec& r, const ForwardVecs<Vec>& f,
                                  const Vec& param) {
  if constexpr (A == Activation::Identity) {
    return dy;
  } else {
    return dy * vec_activation_grad<A>(f.z(x) + r, param);
  }
}

// Loads the residual's block, or zeros where there is none (only activations read it).
template <Activation A, typename scalar_t, typename Vec>
C10_ALWAYS_INLINE void load_residual(const scalar_t* residual, int64_t offset, int64_t count, Vec& lo, Vec& hi) {
  if (A == Activation::Identity || residual == nullptr) {
    lo = hi = Vec(typename Vec::value_type(0));
  } else {
    load_values(residual + offset, count, lo, hi);
  }
}

template <typename acc_t>
C10_ALWAYS_INLINE ForwardVecs<Vectorized<acc_t>> forward_vecs(const ForwardCoefficients<acc_t>& k) {
  using Vec = Vectorized<acc_t>;
  return {Vec(k.mean_hi), Vec(k.mean_lo), Vec(k.scale), Vec(k.bias)};
}

// sum_dy += g; sum_dy_xmu += g * (x - mean), g = dy * act'(z [+ residual]); residual may be null.
template <Activation A, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>,
          typename red_t = typename ReduceLanes<scalar_t>::red_t>
inline void span_backward_sums(const scalar_t* dy, const scalar_t* x, const scalar_t* residual, int64_t n, red_t mean,
                               const ForwardCoefficients<acc_t>& fk, acc_t param, LaneSums<scalar_t>& sum_dy,
                               LaneSums<scalar_t>& sum_dy_xmu) {
  using L = Lanes<scalar_t>;
  using R = ReduceLanes<scalar_t>;
  const typename R::Vec vmean(mean);
  const auto f = forward_vecs(fk);
  const typename L::Vec vparam(param);
  // padding lanes load dy = 0, so g = 0 there and adds nothing
  for (int64_t i = 0; i < n; i += L::kBlock) {
    const int64_t count = std::min<int64_t>(L::kBlock, n - i);
    typename L::Vec dlo, dhi, xlo, xhi, rlo, rhi;
    load_values(dy + i, count, dlo, dhi);
    load_values(x + i, count, xlo, xhi);
    load_residual<A>(residual, i, count, rlo, rhi);
    typename R::Vec d[R::kParts], v[R::kParts];
    R::widen_block(grad_before_activation<A>(dlo, xlo, rlo, f, vparam),
                   grad_before_activation<A>(dhi, xhi, rhi, f, vparam), d);
    R::widen_block(xlo, xhi, v);
    FASTBN_UNROLL for (int j = 0; j < R::kParts; ++j) {
      sum_dy.acc[j] += d[j];
      sum_dy_xmu.acc[j] = at::vec::fmadd(d[j], v[j] - vmean, sum_dy_xmu.acc[j]);
    }
  }
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
template <typename scalar_t, typename red_t = typename ReduceLanes<scalar_t>::red_t>
inline void column_sum_and_squares(const scalar_t* x, int64_t rows, int64_t stride, int64_t width, const red_t* shift,
                                   red_t* sums, red_t* squares) {
  using R = ReduceLanes<scalar_t>;
  using Vec = typename R::Vec;
  Vec acc[R::kParts], acc_sq[R::kParts], vshift[R::kParts], v[R::kParts];
  FASTBN_UNROLL for (int j = 0; j < R::kParts; ++j) {
    acc[j] = Vec::loadu(sums + j * Vec::size());
    acc_sq[j] = Vec::loadu(squares + j * Vec::size());
    vshift[j] = Vec::loadu(shift + j * Vec::size());
  }
  for (int64_t r = 0; r < rows; ++r) {
    load_row_block(x + r * stride, width, v);
    FASTBN_UNROLL for (int j = 0; j < R::kParts; ++j) {
      const Vec d = v[j] - vshift[j];
      acc[j] += d;
      acc_sq[j] = at::vec::fmadd(d, d, acc_sq[j]);
    }
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

// ---------------------------------------------------------------- elementwise

// Stores the first `count` <= kBlock values at p; a whole block as a streaming
// store when `stream` (p then aligned, see stream_head).
template <typename T, typename Vec>
C10_ALWAYS_INLINE void store_values(T* p, int64_t count, const Vec& lo, const Vec& hi, bool stream = false) {
  if (count != Lanes<T>::kBlock) {
    Lanes<T>::store_partial(p, count, lo, hi);
  } else if (stream) {
    Lanes<T>::store_stream(p, lo, hi);
  } else {
    Lanes<T>::store(p, lo, hi);
  }
}

// Outputs this large are written with streaming stores: they cannot stay in
// cache for whoever reads them next, and a normal store would first read every
// destination line from memory (a third of the traffic of a read + write pass).
constexpr int64_t kStreamingBytes = int64_t(16) << 20;

// How many values of a span of n at p to store normally so that the rest
// starts 64-byte aligned (ready for streaming stores); 0 when not streaming.
// Only called where p is aligned to its element size (see for_each_span_block).
template <typename T>
inline int64_t stream_head(const T* p, int64_t n, bool stream) {
  if (!stream) return 0;
  const auto misaligned = int64_t(reinterpret_cast<uintptr_t>(p) % 64);
  return std::min<int64_t>(n, misaligned == 0 ? 0 : (64 - misaligned) / int64_t(sizeof(T)));
}

// Orders this thread's streaming stores before whatever follows the pass.
inline void stream_fence(bool stream) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if (stream) _mm_sfence();
#endif
}

// Calls block(i, count, streamed) over the span [0, n) in blocks of at most
// kBlock values: when streaming, first the head up to the output's 64-byte
// alignment in plain stores, then whole blocks (streamed) and a short tail.
template <typename scalar_t, typename F>
inline void for_each_span_block(const scalar_t* out, int64_t n, bool stream, const F& block) {
  constexpr int64_t kBlock = Lanes<scalar_t>::kBlock;
  // an output not aligned to its element size (a view of raw bytes) can never be
  // aligned for streaming stores: plain stores, in whole blocks, throughout
  stream = stream && reinterpret_cast<uintptr_t>(out) % sizeof(scalar_t) == 0;
  // The head can span several blocks: 64 bytes are up to 31 half/bfloat16
  // values, and a block of them is 16 values on AVX2 and DEFAULT.
  const int64_t head = stream_head(out, n, stream);
  for (int64_t i = 0; i < head; i += kBlock) block(i, std::min<int64_t>(kBlock, head - i), false);
  for (int64_t i = head; i < n; i += kBlock) block(i, std::min<int64_t>(kBlock, n - i), stream);
}

// y = act(((x - mean_hi) - mean_lo) * scale + bias [+ residual]) (forward_apply in
// bn_math.h) over a span; residual may be null; y may be x (in-place activated BN).
template <Activation A, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline void span_forward(const scalar_t* x, const scalar_t* residual, scalar_t* y, int64_t n,
                         const ForwardCoefficients<acc_t>& k, acc_t param, bool stream) {
  using Vec = typename Lanes<scalar_t>::Vec;
  const auto f = forward_vecs(k);
  const Vec vparam(param);
  for_each_span_block(y, n, stream, [&](int64_t i, int64_t count, bool streamed) {
    Vec lo, hi;
    load_values(x + i, count, lo, hi);
    lo = f.z(lo);
    hi = f.z(hi);
    if (residual != nullptr) {
      Vec rlo, rhi;
      load_values(residual + i, count, rlo, rhi);
      lo = lo + rlo;
      hi = hi + rhi;
    }
    store_values(y + i, count, vec_activation<A>(lo, vparam), vec_activation<A>(hi, vparam), streamed);
  });
}

// dx = g * k_dy + (x - mean) * k_xmu + k_const over a span, g = dy * act'(z [+ residual]);
// grad_residual (may be null) gets g. residual may be null.
template <Activation A, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline void span_backward(const scalar_t* dy, const scalar_t* x, const scalar_t* residual, scalar_t* dx,
                          scalar_t* grad_residual, int64_t n, const ForwardCoefficients<acc_t>& fk,
                          const BackwardCoefficients<acc_t>& k, acc_t param, bool stream) {
  using Vec = typename Lanes<scalar_t>::Vec;
  const auto f = forward_vecs(fk);
  const Vec vparam(param), vmean(k.mean), vkdy(k.k_dy), vkxmu(k.k_xmu), vkconst(k.k_const);
  for_each_span_block(dx, n, stream, [&](int64_t i, int64_t count, bool streamed) {
    Vec dlo, dhi, xlo, xhi, rlo, rhi;
    load_values(dy + i, count, dlo, dhi);
    load_values(x + i, count, xlo, xhi);
    load_residual<A>(residual, i, count, rlo, rhi);
    const Vec glo = grad_before_activation<A>(dlo, xlo, rlo, f, vparam);
    const Vec ghi = grad_before_activation<A>(dhi, xhi, rhi, f, vparam);
    store_values(dx + i, count, at::vec::fmadd(glo, vkdy, at::vec::fmadd(xlo - vmean, vkxmu, vkconst)),
                 at::vec::fmadd(ghi, vkdy, at::vec::fmadd(xhi - vmean, vkxmu, vkconst)), streamed);
    // grad_residual's alignment may differ from dx's: plain stores
    if (grad_residual != nullptr) store_values(grad_residual + i, count, glo, ghi);
  });
}

inline int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// Per-channel coefficients as arrays (structure of arrays, for vector loads),
// padded to whole blocks so a column's loads never run past the end.
template <typename acc_t>
struct ForwardArrays {
  std::vector<acc_t> mean_hi, mean_lo, scale, bias;
  explicit ForwardArrays(int64_t C)
      : mean_hi(round_up(C, 64)), mean_lo(round_up(C, 64)), scale(round_up(C, 64)), bias(round_up(C, 64)) {}
  void set(int64_t c, const ForwardCoefficients<acc_t>& k) {
    mean_hi[c] = k.mean_hi;
    mean_lo[c] = k.mean_lo;
    scale[c] = k.scale;
    bias[c] = k.bias;
  }
  ForwardCoefficients<acc_t> get(int64_t c) const { return {mean_hi[c], mean_lo[c], scale[c], bias[c]}; }
};

template <typename acc_t>
struct BackwardArrays {
  std::vector<acc_t> mean, k_dy, k_xmu, k_const;
  explicit BackwardArrays(int64_t C)
      : mean(round_up(C, 64)), k_dy(round_up(C, 64)), k_xmu(round_up(C, 64)), k_const(round_up(C, 64)) {}
  void set(int64_t c, const BackwardCoefficients<acc_t>& k) {
    mean[c] = k.mean;
    k_dy[c] = k.k_dy;
    k_xmu[c] = k.k_xmu;
    k_const[c] = k.k_const;
  }
};

template <typename acc_t>
C10_ALWAYS_INLINE ForwardVecs<Vectorized<acc_t>> forward_vecs(const ForwardArrays<acc_t>& k, int64_t c) {
  using Vec = Vectorized<acc_t>;
  return {Vec::loadu(k.mean_hi.data() + c), Vec::loadu(k.mean_lo.data() + c), Vec::loadu(k.scale.data() + c),
          Vec::loadu(k.bias.data() + c)};
}

// Row tiles: `rows` consecutive rows of C interleaved channels, walked one
// block of channels at a time down the tile, so each block's per-channel
// coefficients are loaded once per tile rather than once per row (with C = 32
// a row is a single block: per-row loads would double the instructions per
// value). The tile stays in L1/L2 across its channel blocks. rows_in_order
// (for tensors too large for the cache): with several blocks, rows are walked
// in memory order instead and the coefficients come from L1 each time: a
// block-by-block walk reads each row in pieces, which the hardware prefetchers
// follow poorly from memory (32,64,56,56 channels_last eval 1136 -> 848 µs;
// in cache the block walk is faster: 32,256,14,14 161 against 182 µs).

// y[r][c] = act(forward_apply(k[c], x[r][c]) [+ residual[r][c]]); residual may be
// null. stream: whole blocks as streaming stores (rows must start aligned).
template <Activation A, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline void tile_forward(const scalar_t* x, const scalar_t* residual, scalar_t* y, int64_t rows, int64_t C,
                         const ForwardArrays<acc_t>& k, acc_t param, bool stream, bool rows_in_order) {
  using L = Lanes<scalar_t>;
  using Vec = typename L::Vec;
  const Vec vparam(param);
  auto block = [&](int64_t r, int64_t c0, const ForwardVecs<Vec>& f0, const ForwardVecs<Vec>& f1) {
    const int64_t width = std::min<int64_t>(L::kBlock, C - c0);
    const int64_t at = r * C + c0;
    Vec v0, v1;
    load_values(x + at, width, v0, v1);
    Vec z0 = f0.z(v0), z1 = f1.z(v1);
    if (residual != nullptr) {
      Vec r0, r1;
      load_values(residual + at, width, r0, r1);
      z0 = z0 + r0;
      z1 = z1 + r1;
    }
    store_values(y + at, width, vec_activation<A>(z0, vparam), vec_activation<A>(z1, vparam), stream);
  };
  if (rows_in_order && C > L::kBlock) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c0 = 0; c0 < C; c0 += L::kBlock) block(r, c0, forward_vecs(k, c0), forward_vecs(k, c0 + L::kVec));
    }
    return;
  }
  for (int64_t c0 = 0; c0 < C; c0 += L::kBlock) {
    const ForwardVecs<Vec> f0 = forward_vecs(k, c0), f1 = forward_vecs(k, c0 + L::kVec);
    for (int64_t r = 0; r < rows; ++r) block(r, c0, f0, f1);
  }
}

// dx[r][c] = backward_apply(k[c], g, x[r][c]), g = dy * act'(z [+ residual]);
// grad_residual (may be null) gets g. residual may be null. stream as in tile_forward.
template <Activation A, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline void tile_backward(const scalar_t* dy, const scalar_t* x, const scalar_t* residual, scalar_t* dx,
                          scalar_t* grad_residual, int64_t rows, int64_t C, const ForwardArrays<acc_t>& fk,
                          const BackwardArrays<acc_t>& k, acc_t param, bool stream, bool rows_in_order) {
  using L = Lanes<scalar_t>;
  using Vec = typename L::Vec;
  const Vec vparam(param);
  // One block of channels c0 .. c0 + kBlock of one row, with its coefficients.
  struct Coefficients {
    ForwardVecs<Vec> f0, f1;
    Vec mean0, mean1, kdy0, kdy1, kxmu0, kxmu1, kconst0, kconst1;
  };
  auto coefficients = [&](int64_t c0) {
    const int64_t c1 = c0 + L::kVec;
    return Coefficients{forward_vecs(fk, c0), forward_vecs(fk, c1),
                        Vec::loadu(k.mean.data() + c0), Vec::loadu(k.mean.data() + c1),
                        Vec::loadu(k.k_dy.data() + c0), Vec::loadu(k.k_dy.data() + c1),
                        Vec::loadu(k.k_xmu.data() + c0), Vec::loadu(k.k_xmu.data() + c1),
                        Vec::loadu(k.k_const.data() + c0), Vec::loadu(k.k_const.data() + c1)};
  };
  auto block = [&](int64_t r, int64_t c0, const Coefficients& q) {
    const int64_t width = std::min<int64_t>(L::kBlock, C - c0);
    const int64_t at = r * C + c0;
    Vec d0, d1, v0, v1, r0, r1;
    load_values(dy + at, width, d0, d1);
    load_values(x + at, width, v0, v1);
    load_residual<A>(residual, at, width, r0, r1);
    const Vec g0 = grad_before_activation<A>(d0, v0, r0, q.f0, vparam);
    const Vec g1 = grad_before_activation<A>(d1, v1, r1, q.f1, vparam);
    store_values(dx + at, width, at::vec::fmadd(g0, q.kdy0, at::vec::fmadd(v0 - q.mean0, q.kxmu0, q.kconst0)),
                 at::vec::fmadd(g1, q.kdy1, at::vec::fmadd(v1 - q.mean1, q.kxmu1, q.kconst1)), stream);
    if (grad_residual != nullptr) store_values(grad_residual + at, width, g0, g1);
  };
  if (rows_in_order && C > L::kBlock) {  // see tile_forward
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c0 = 0; c0 < C; c0 += L::kBlock) block(r, c0, coefficients(c0));
    }
    return;
  }
  for (int64_t c0 = 0; c0 < C; c0 += L::kBlock) {
    const Coefficients q = coefficients(c0);
    for (int64_t r = 0; r < rows; ++r) block(r, c0, q);
  }
}

// out_dy[c] += sum of g[c]; out_dy_xmu[c] += sum of g[c] * (x[c] - mean[c]), g = dy * act'(z [+ residual]);
// out_dy and out_dy_xmu hold a whole block (padded arrays; lanes past width stay 0).
template <Activation A, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>,
          typename red_t = typename ReduceLanes<scalar_t>::red_t>
inline void column_backward_sums(const scalar_t* dy, const scalar_t* x, const scalar_t* residual, int64_t rows,
                                 int64_t stride, int64_t width,
                                 const red_t* mean, const ForwardArrays<acc_t>& fk, int64_t c0, acc_t param,
                                 red_t* out_dy, red_t* out_dy_xmu) {
  using L = Lanes<scalar_t>;
  using R = ReduceLanes<scalar_t>;
  using RVec = typename R::Vec;
  const ForwardVecs<typename L::Vec> f[2] = {forward_vecs(fk, c0), forward_vecs(fk, c0 + L::kVec)};
  const typename L::Vec vparam(param);
  RVec acc_dy[R::kParts], acc_dx[R::kParts], vmean[R::kParts], d[R::kParts], v[R::kParts];
  FASTBN_UNROLL for (int j = 0; j < R::kParts; ++j) {
    acc_dy[j] = RVec::loadu(out_dy + j * RVec::size());
    acc_dx[j] = RVec::loadu(out_dy_xmu + j * RVec::size());
    vmean[j] = RVec::loadu(mean + j * RVec::size());
  }
  for (int64_t r = 0; r < rows; ++r) {
    typename L::Vec g0, g1, x0, x1, r0, r1;
    load_values(dy + r * stride, width, g0, g1);  // lanes past width: dy = 0, never stored
    load_values(x + r * stride, width, x0, x1);
    load_residual<A>(residual, r * stride, width, r0, r1);
    R::widen_block(grad_before_activation<A>(g0, x0, r0, f[0], vparam),
                   grad_before_activation<A>(g1, x1, r1, f[1], vparam), d);
    R::widen_block(x0, x1, v);
    FASTBN_UNROLL for (int j = 0; j < R::kParts; ++j) {
      acc_dy[j] += d[j];
      acc_dx[j] = at::vec::fmadd(d[j], v[j] - vmean[j], acc_dx[j]);
    }
  }
  FASTBN_UNROLL for (int j = 0; j < R::kParts; ++j) {
    acc_dy[j].store(out_dy + j * RVec::size());
    acc_dx[j].store(out_dy_xmu + j * RVec::size());
  }
}

}  // namespace fastbn::cpu::CPU_CAPABILITY
