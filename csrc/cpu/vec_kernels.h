// Vectorized inner loops of the CPU batch norm, built on at::vec::Vectorized.
//
// Two shapes of loop:
//  - span_*: one channel's contiguous run of values (planar layout, NCHW);
//  - row_*:  one row of C interleaved channels (channels_last, (N, C)),
//            updating per-channel arrays.
// Values are loaded as the accumulation type (float for half/bfloat16/float,
// double for double) in blocks of two vectors: two independent accumulators
// for the reductions, and exactly one Vectorized<half/bfloat16> per block.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "bn_math.h"

namespace fastbn::cpu {

using at::vec::Vectorized;

template <typename scalar_t>
struct Lanes {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;
  static constexpr int64_t kVec = Vec::size();
  static constexpr int64_t kBlock = 2 * kVec;  // scalar_t values per block

  static inline void load(const scalar_t* p, Vec& lo, Vec& hi) {
    if constexpr (kReduced) {
      at::vec::load_to_float<scalar_t>(p, lo, hi);
    } else {
      lo = Vec::loadu(p);
      hi = Vec::loadu(p + kVec);
    }
  }
  // Loads the first `count` < kBlock values; the other lanes are zero.
  static inline void load_partial(const scalar_t* p, int64_t count, Vec& lo, Vec& hi) {
    if constexpr (kReduced) {
      auto packed = Vectorized<scalar_t>::loadu(p, count);
      std::tie(lo, hi) = at::vec::convert_to_float<scalar_t>(packed);
    } else {
      lo = Vec::loadu(p, std::min<int64_t>(count, kVec));
      hi = count > kVec ? Vec::loadu(p + kVec, count - kVec) : Vec(acc_t(0));
    }
  }
  static inline void store(scalar_t* p, const Vec& lo, const Vec& hi) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(lo, hi).store(p);
    } else {
      lo.store(p);
      hi.store(p + kVec);
    }
  }
  static inline void store_partial(scalar_t* p, int64_t count, const Vec& lo, const Vec& hi) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(lo, hi).store(p, count);
    } else {
      lo.store(p, std::min<int64_t>(count, kVec));
      if (count > kVec) hi.store(p + kVec, count - kVec);
    }
  }
};

// ---------------------------------------------------------------- spans (planar)

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline acc_t span_sum(const scalar_t* x, int64_t n) {
  using L = Lanes<scalar_t>;
  typename L::Vec acc0(acc_t(0)), acc1(acc_t(0));
  int64_t i = 0;
  for (; i + L::kBlock <= n; i += L::kBlock) {
    typename L::Vec lo, hi;
    L::load(x + i, lo, hi);
    acc0 += lo;
    acc1 += hi;
  }
  acc_t total = at::vec::vec_reduce_all<acc_t>(std::plus<typename L::Vec>(), acc0 + acc1);
  for (; i < n; ++i) total += acc_t(x[i]);
  return total;
}

// sum((x - mean)^2)
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline acc_t span_sum_sq_dev(const scalar_t* x, int64_t n, acc_t mean) {
  using L = Lanes<scalar_t>;
  const typename L::Vec vmean(mean);
  typename L::Vec acc0(acc_t(0)), acc1(acc_t(0));
  int64_t i = 0;
  for (; i + L::kBlock <= n; i += L::kBlock) {
    typename L::Vec lo, hi;
    L::load(x + i, lo, hi);
    lo = lo - vmean;
    hi = hi - vmean;
    acc0 = at::vec::fmadd(lo, lo, acc0);
    acc1 = at::vec::fmadd(hi, hi, acc1);
  }
  acc_t total = at::vec::vec_reduce_all<acc_t>(std::plus<typename L::Vec>(), acc0 + acc1);
  for (; i < n; ++i) {
    const acc_t d = acc_t(x[i]) - mean;
    total += d * d;
  }
  return total;
}

// y = (x - mean) * scale + bias
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline void span_forward(const scalar_t* x, scalar_t* y, int64_t n, const ForwardCoefficients<acc_t>& k) {
  using L = Lanes<scalar_t>;
  using Vec = typename L::Vec;
  const Vec vmean(k.mean), vscale(k.scale), vbias(k.bias);
  int64_t i = 0;
  for (; i + L::kBlock <= n; i += L::kBlock) {
    Vec lo, hi;
    L::load(x + i, lo, hi);
    L::store(y + i, at::vec::fmadd(lo - vmean, vscale, vbias), at::vec::fmadd(hi - vmean, vscale, vbias));
  }
  if (i < n) {
    Vec lo, hi;
    L::load_partial(x + i, n - i, lo, hi);
    L::store_partial(y + i, n - i, at::vec::fmadd(lo - vmean, vscale, vbias), at::vec::fmadd(hi - vmean, vscale, vbias));
  }
}

// (sum(dy), sum(dy * (x - mean)))
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline std::pair<acc_t, acc_t> span_backward_sums(const scalar_t* dy, const scalar_t* x, int64_t n, acc_t mean) {
  using L = Lanes<scalar_t>;
  using Vec = typename L::Vec;
  const Vec vmean(mean);
  Vec sdy0(acc_t(0)), sdy1(acc_t(0)), sdx0(acc_t(0)), sdx1(acc_t(0));
  int64_t i = 0;
  for (; i + L::kBlock <= n; i += L::kBlock) {
    Vec dlo, dhi, xlo, xhi;
    L::load(dy + i, dlo, dhi);
    L::load(x + i, xlo, xhi);
    sdy0 += dlo;
    sdy1 += dhi;
    sdx0 = at::vec::fmadd(dlo, xlo - vmean, sdx0);
    sdx1 = at::vec::fmadd(dhi, xhi - vmean, sdx1);
  }
  acc_t sum_dy = at::vec::vec_reduce_all<acc_t>(std::plus<Vec>(), sdy0 + sdy1);
  acc_t sum_dy_xmu = at::vec::vec_reduce_all<acc_t>(std::plus<Vec>(), sdx0 + sdx1);
  for (; i < n; ++i) {
    const acc_t d = acc_t(dy[i]);
    sum_dy += d;
    sum_dy_xmu += d * (acc_t(x[i]) - mean);
  }
  return {sum_dy, sum_dy_xmu};
}

// dx = dy * k_dy + (x - mean) * k_xmu + k_const
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline void span_backward(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t n,
                          const BackwardCoefficients<acc_t>& k) {
  using L = Lanes<scalar_t>;
  using Vec = typename L::Vec;
  const Vec vmean(k.mean), vkdy(k.k_dy), vkxmu(k.k_xmu), vkconst(k.k_const);
  auto apply = [&](const Vec& d, const Vec& v) { return at::vec::fmadd(d, vkdy, at::vec::fmadd(v - vmean, vkxmu, vkconst)); };
  int64_t i = 0;
  for (; i + L::kBlock <= n; i += L::kBlock) {
    Vec dlo, dhi, xlo, xhi;
    L::load(dy + i, dlo, dhi);
    L::load(x + i, xlo, xhi);
    L::store(dx + i, apply(dlo, xlo), apply(dhi, xhi));
  }
  if (i < n) {
    Vec dlo, dhi, xlo, xhi;
    L::load_partial(dy + i, n - i, dlo, dhi);
    L::load_partial(x + i, n - i, xlo, xhi);
    L::store_partial(dx + i, n - i, apply(dlo, xlo), apply(dhi, xhi));
  }
}

// ---------------------------------------------------------------- rows (interleaved)
// Per-channel arrays are acc_t[C]. Tails (C not a multiple of the block) run scalar
// in reductions, so padding lanes never enter a sum.

// sums[c] += x[c]
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline void row_add(const scalar_t* x, acc_t* sums, int64_t C) {
  using L = Lanes<scalar_t>;
  using Vec = typename L::Vec;
  int64_t c = 0;
  for (; c + L::kBlock <= C; c += L::kBlock) {
    Vec lo, hi;
    L::load(x + c, lo, hi);
    (Vec::loadu(sums + c) + lo).store(sums + c);
    (Vec::loadu(sums + c + L::kVec) + hi).store(sums + c + L::kVec);
  }
  for (; c < C; ++c) sums[c] += acc_t(x[c]);
}

// m2[c] += (x[c] - mean[c])^2
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline void row_add_sq_dev(const scalar_t* x, const acc_t* mean, acc_t* m2, int64_t C) {
  using L = Lanes<scalar_t>;
  using Vec = typename L::Vec;
  int64_t c = 0;
  for (; c + L::kBlock <= C; c += L::kBlock) {
    Vec lo, hi;
    L::load(x + c, lo, hi);
    lo = lo - Vec::loadu(mean + c);
    hi = hi - Vec::loadu(mean + c + L::kVec);
    at::vec::fmadd(lo, lo, Vec::loadu(m2 + c)).store(m2 + c);
    at::vec::fmadd(hi, hi, Vec::loadu(m2 + c + L::kVec)).store(m2 + c + L::kVec);
  }
  for (; c < C; ++c) {
    const acc_t d = acc_t(x[c]) - mean[c];
    m2[c] += d * d;
  }
}

// y[c] = (x[c] - mean[c]) * scale[c] + bias[c]
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline void row_forward(const scalar_t* x, scalar_t* y, const acc_t* mean, const acc_t* scale, const acc_t* bias,
                        int64_t C) {
  using L = Lanes<scalar_t>;
  using Vec = typename L::Vec;
  auto apply = [&](const Vec& v, int64_t c) {
    return at::vec::fmadd(v - Vec::loadu(mean + c), Vec::loadu(scale + c), Vec::loadu(bias + c));
  };
  int64_t c = 0;
  for (; c + L::kBlock <= C; c += L::kBlock) {
    Vec lo, hi;
    L::load(x + c, lo, hi);
    L::store(y + c, apply(lo, c), apply(hi, c + L::kVec));
  }
  for (; c < C; ++c) y[c] = scalar_t((acc_t(x[c]) - mean[c]) * scale[c] + bias[c]);
}

// sum_dy[c] += dy[c]; sum_dy_xmu[c] += dy[c] * (x[c] - mean[c])
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline void row_add_backward_sums(const scalar_t* dy, const scalar_t* x, const acc_t* mean, acc_t* sum_dy,
                                  acc_t* sum_dy_xmu, int64_t C) {
  using L = Lanes<scalar_t>;
  using Vec = typename L::Vec;
  int64_t c = 0;
  for (; c + L::kBlock <= C; c += L::kBlock) {
    Vec dlo, dhi, xlo, xhi;
    L::load(dy + c, dlo, dhi);
    L::load(x + c, xlo, xhi);
    const int64_t c1 = c + L::kVec;
    (Vec::loadu(sum_dy + c) + dlo).store(sum_dy + c);
    (Vec::loadu(sum_dy + c1) + dhi).store(sum_dy + c1);
    at::vec::fmadd(dlo, xlo - Vec::loadu(mean + c), Vec::loadu(sum_dy_xmu + c)).store(sum_dy_xmu + c);
    at::vec::fmadd(dhi, xhi - Vec::loadu(mean + c1), Vec::loadu(sum_dy_xmu + c1)).store(sum_dy_xmu + c1);
  }
  for (; c < C; ++c) {
    const acc_t d = acc_t(dy[c]);
    sum_dy[c] += d;
    sum_dy_xmu[c] += d * (acc_t(x[c]) - mean[c]);
  }
}

// dx[c] = dy[c] * k_dy[c] + (x[c] - mean[c]) * k_xmu[c] + k_const[c]
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline void row_backward(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const acc_t* mean, const acc_t* k_dy,
                         const acc_t* k_xmu, const acc_t* k_const, int64_t C) {
  using L = Lanes<scalar_t>;
  using Vec = typename L::Vec;
  auto apply = [&](const Vec& d, const Vec& v, int64_t c) {
    return at::vec::fmadd(d, Vec::loadu(k_dy + c),
                          at::vec::fmadd(v - Vec::loadu(mean + c), Vec::loadu(k_xmu + c), Vec::loadu(k_const + c)));
  };
  int64_t c = 0;
  for (; c + L::kBlock <= C; c += L::kBlock) {
    Vec dlo, dhi, xlo, xhi;
    L::load(dy + c, dlo, dhi);
    L::load(x + c, xlo, xhi);
    L::store(dx + c, apply(dlo, xlo, c), apply(dhi, xhi, c + L::kVec));
  }
  for (; c < C; ++c) {
    dx[c] = scalar_t(acc_t(dy[c]) * k_dy[c] + (acc_t(x[c]) - mean[c]) * k_xmu[c] + k_const[c]);
  }
}

}  // namespace fastbn::cpu
