// Batch-norm formulas shared by the CPU and CUDA kernels.
//
// Everything here is a small inline function usable from host and device code,
// so the CPU tests exercise exactly the arithmetic the GPU kernels run.
// acc_t is the accumulation type: float for float/half/bfloat16 inputs,
// double for double inputs.
#pragma once

#include <math.h>
#include <stdint.h>

#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTBN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTBN_HOST_DEVICE inline
#endif

namespace fastbn {

FASTBN_HOST_DEVICE float sqrt_acc(float x) { return sqrtf(x); }
FASTBN_HOST_DEVICE double sqrt_acc(double x) { return sqrt(x); }

// Count, mean and M2 (sum of squared deviations from the mean) of one channel's
// values, the state of Welford's / Chan's algorithm. Merging two of these is
// stable however far the data's mean is from zero (x = 1e4 + randn keeps its
// variance), unlike E[x^2] - E[x]^2.
template <typename acc_t>
struct Moments {
  acc_t mean;
  acc_t m2;
  int64_t count;
};

template <typename acc_t>
FASTBN_HOST_DEVICE Moments<acc_t> moments_merge(const Moments<acc_t>& a, const Moments<acc_t>& b) {
  if (a.count == 0) return b;
  if (b.count == 0) return a;
  const int64_t count = a.count + b.count;
  const acc_t b_share = acc_t(b.count) / acc_t(count);
  const acc_t delta = b.mean - a.mean;
  Moments<acc_t> out;
  // With an infinite mean on one side (an infinite value in its data) a.mean + delta would
  // be inf - inf: the weighted sum keeps it infinite, as torch's sum / n does (and NaN for +inf with -inf).
  out.mean = delta - delta == acc_t(0) ? a.mean + delta * b_share : a.mean * (acc_t(1) - b_share) + b.mean * b_share;
  out.m2 = a.m2 + b.m2 + delta * delta * acc_t(a.count) * b_share;
  out.count = count;
  return out;
}

// One more value into the moments (Welford's update).
// Once the mean is infinite (an infinite value came) mean + delta / count would be
// inf - inf = NaN at the next finite value; torch's sum / n stays infinite. The mean then
// takes mean + x instead: still +-inf, NaN for the opposite infinity or a NaN, as the sum.
// A select, not a branch (no divergence in the kernels' hot loops); M2 is NaN by then.
template <typename acc_t>
FASTBN_HOST_DEVICE void moments_push(Moments<acc_t>& m, acc_t x) {
  m.count += 1;
  const acc_t delta = x - m.mean;
  const acc_t finite_step = m.mean + delta / acc_t(m.count);
  m.mean = m.mean - m.mean == acc_t(0) ? finite_step : m.mean + x;
  m.m2 += delta * (x - m.mean);
}

// Moments of n values from their sum and sum of squares about a shift:
// mean = shift + sum / n, M2 = squares - sum^2 / n. Exact enough while the shift
// is near the mean; statistics_need_second_pass says when it was not (the
// cancellation would eat more than about 6 of double's 16 digits).
template <typename acc_t>
FASTBN_HOST_DEVICE Moments<acc_t> moments_from_shifted_sums(acc_t shift, acc_t sum, acc_t squares, int64_t n) {
  Moments<acc_t> m;
  const acc_t offset = sum / acc_t(n);
  m.mean = shift + offset;
  m.m2 = squares - sum * offset;
  m.count = n;
  return m;
}

template <typename acc_t>
FASTBN_HOST_DEVICE bool statistics_need_second_pass(acc_t shift, const Moments<acc_t>& m) {
  const acc_t offset = m.mean - shift;
  // false for NaN too: a NaN then stays NaN through the second pass
  return !(offset * offset * acc_t(m.count) <= acc_t(1e6) * m.m2) && !(offset == acc_t(0));
}

// Biased (population) variance, the one batch norm normalizes with.
template <typename acc_t>
FASTBN_HOST_DEVICE acc_t moments_biased_var(const Moments<acc_t>& m) {
  return m.count > 0 ? m.m2 / acc_t(m.count) : acc_t(0);
}

template <typename acc_t>
FASTBN_HOST_DEVICE acc_t invstd_from_var(acc_t var, acc_t eps) {
  return acc_t(1) / sqrt_acc(var + eps);
}

// The forward transform of one channel, y = ((x - mean_hi) - mean_lo) * scale + bias.
// Subtracting the mean first keeps the result exact for data far from zero,
// where x * scale + (bias - mean * scale) would cancel catastrophically. The mean
// comes as a float pair hi + lo when it was computed in double (CPU): rounding it
// to one float would shift every output of x = 1e4 + randn by up to 5e-4.
template <typename acc_t>
struct ForwardCoefficients {
  acc_t mean_hi;
  acc_t mean_lo;
  acc_t scale;  // weight * invstd
  acc_t bias;
};

template <typename acc_t, typename mean_t>
FASTBN_HOST_DEVICE ForwardCoefficients<acc_t> forward_coefficients(
    mean_t mean, acc_t var, acc_t eps, acc_t weight, acc_t bias) {
  ForwardCoefficients<acc_t> c;
  c.mean_hi = acc_t(mean);
  // an infinite (or NaN) mean_hi has no low part: inf - inf would turn x - mean's +-inf into NaN
  c.mean_lo = c.mean_hi - c.mean_hi == acc_t(0) ? acc_t(mean - mean_t(c.mean_hi)) : acc_t(0);
  c.scale = weight * invstd_from_var(var, eps);
  c.bias = bias;
  return c;
}

template <typename acc_t>
FASTBN_HOST_DEVICE acc_t forward_apply(const ForwardCoefficients<acc_t>& c, acc_t x) {
  return ((x - c.mean_hi) - c.mean_lo) * c.scale + c.bias;
}

// The input gradient of one channel as dx = dy * k_dy + (x - mean) * k_xmu + k_const.
// Training mode (statistics from the batch):
//   dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))
// Evaluation mode (running statistics are constants): dx = w * invstd * dy.
template <typename acc_t>
struct BackwardCoefficients {
  acc_t mean;
  acc_t k_dy;
  acc_t k_xmu;
  acc_t k_const;
};

// sum_dy = sum(dy), sum_dy_xmu = sum(dy * (x - mean)) over the channel's count values;
// invstd = invstd_from_var(var, eps) (the CPU computes it for every channel at once).
template <typename acc_t>
FASTBN_HOST_DEVICE BackwardCoefficients<acc_t> backward_coefficients_from_invstd(
    acc_t mean, acc_t invstd, acc_t weight, acc_t sum_dy, acc_t sum_dy_xmu, int64_t count, bool train) {
  BackwardCoefficients<acc_t> c;
  c.mean = mean;
  c.k_dy = weight * invstd;
  if (train && count > 0) {
    const acc_t inv_count = acc_t(1) / acc_t(count);
    c.k_xmu = -c.k_dy * sum_dy_xmu * invstd * invstd * inv_count;
    c.k_const = -c.k_dy * sum_dy * inv_count;
  } else {
    c.k_xmu = acc_t(0);
    c.k_const = acc_t(0);
  }
  return c;
}

template <typename acc_t>
FASTBN_HOST_DEVICE BackwardCoefficients<acc_t> backward_coefficients(
    acc_t mean, acc_t var, acc_t eps, acc_t weight, acc_t sum_dy, acc_t sum_dy_xmu,
    int64_t count, bool train) {
  return backward_coefficients_from_invstd(mean, invstd_from_var(var, eps), weight, sum_dy, sum_dy_xmu, count, train);
}

// k_xmu is 0 in evaluation mode: x then takes no part, so a NaN or infinite x leaves
// dx = dy * k_dy as in torch (not (x - mean) * 0 = NaN). The select is uniform per channel.
template <typename acc_t>
FASTBN_HOST_DEVICE acc_t backward_apply(const BackwardCoefficients<acc_t>& c, acc_t dy, acc_t x) {
  const acc_t xmu_term = c.k_xmu == acc_t(0) ? acc_t(0) : (x - c.mean) * c.k_xmu;
  return dy * c.k_dy + xmu_term + c.k_const;
}

// sum(dy * (x - mean)) about the values' own mean, from sums taken about mean_r, the
// forward's mean rounded to acc_t: sum(dy * (x - mean_r)) - shift * sum(dy), shift =
// sum(x - mean_r) / count. The rounding moves mean_r by up to a few eps * |mean|, and the
// sum about it by that times sum(dy): on data far from zero with a large sum(dy), many
// units in the last place of grad_weight (8.5 in float32 on an H200, 2026-12-04, where
// torch's was 3.7). Only a shift at the scale of rounding is taken back (at most 256
// rounding_eps of |mean_r| + std, rounding_eps the epsilon of mean_r's type): a mean
// that is not the batch's, passed on purpose, keeps its meaning. Training only: in
// evaluation the mean given is the one the output used.
template <typename T>
FASTBN_HOST_DEVICE T sum_dy_xmu_about_batch_mean(T sum_dy_xmu_r, T sum_xmu_r, T sum_dy, int64_t count, T mean_r,
                                                 T var, T rounding_eps) {
  if (count == 0) return sum_dy_xmu_r;
  const T shift = sum_xmu_r / T(count);
  const T rounding_scale = T(256) * rounding_eps * (fabs(mean_r) + sqrt(var));
  const T correction = shift * sum_dy;
  // Nothing is taken back for a shift beyond rounding (false for a NaN too), a zero shift,
  // an infinite mean or var (an infinite scale would pass any shift) or an infinite
  // correction (an infinite or overflowing sum(dy)): the sum stays as torch's, not inf - inf.
  const bool finite = rounding_scale - rounding_scale == T(0) && correction - correction == T(0);
  if (!(fabs(shift) <= rounding_scale) || shift == T(0) || !finite) return sum_dy_xmu_r;
  return sum_dy_xmu_r - correction;
}

// grad_weight = sum(dy * xhat) = sum(dy * (x - mean)) * invstd; grad_bias = sum(dy).
template <typename acc_t>
FASTBN_HOST_DEVICE acc_t grad_weight_from_invstd(acc_t sum_dy_xmu, acc_t invstd) {
  return sum_dy_xmu * invstd;
}

template <typename acc_t>
FASTBN_HOST_DEVICE acc_t grad_weight_from_sums(acc_t sum_dy_xmu, acc_t var, acc_t eps) {
  return grad_weight_from_invstd(sum_dy_xmu, invstd_from_var(var, eps));
}

// Activations fused after the normalization: y = act(z), z = the BN output.
// Backward recomputes z from the saved input, so a fused BN + activation saves
// only x for backward (torch's BN followed by ReLU also keeps the ReLU output).
// Derivatives at z = 0 follow torch: ReLU 0, LeakyReLU the slope, ELU alpha.
enum class Activation : int { Identity = 0, ReLU = 1, LeakyReLU = 2, ELU = 3, SiLU = 4 };

FASTBN_HOST_DEVICE float exp_acc(float x) { return expf(x); }
FASTBN_HOST_DEVICE double exp_acc(double x) { return exp(x); }
FASTBN_HOST_DEVICE float expm1_acc(float x) { return expm1f(x); }
FASTBN_HOST_DEVICE double expm1_acc(double x) { return expm1(x); }

// param: LeakyReLU's negative slope, ELU's alpha; unused otherwise.
template <typename acc_t>
FASTBN_HOST_DEVICE acc_t activation_forward(Activation act, acc_t z, acc_t param) {
  switch (act) {
    case Activation::ReLU:
      return z < acc_t(0) ? acc_t(0) : z;  // NaN stays NaN, as in torch.relu
    case Activation::LeakyReLU:
      return z > acc_t(0) ? z : z * param;
    case Activation::ELU:
      return z > acc_t(0) ? z : param * expm1_acc(z);
    case Activation::SiLU:
      return z / (acc_t(1) + exp_acc(-z));
    default:
      return z;
  }
}

// d act / dz at z. At a NaN z (an infinite or NaN statistic) as torch's backward:
// relu and elu pass the gradient (their test is z <= 0), leaky_relu scales it (z > 0).
template <typename acc_t>
FASTBN_HOST_DEVICE acc_t activation_grad(Activation act, acc_t z, acc_t param) {
  switch (act) {
    case Activation::ReLU:
      return z <= acc_t(0) ? acc_t(0) : acc_t(1);
    case Activation::LeakyReLU:
      return z > acc_t(0) ? acc_t(1) : param;
    case Activation::ELU:
      return z <= acc_t(0) ? param * exp_acc(z) : acc_t(1);
    case Activation::SiLU: {
      const acc_t sigmoid = acc_t(1) / (acc_t(1) + exp_acc(-z));
      return sigmoid * (acc_t(1) + z * (acc_t(1) - sigmoid));
    }
    default:
      return acc_t(1);
  }
}

// In-place activated BN keeps only the output y = act(z) and recovers z, then
// the centered input, from it. That needs an invertible activation: identity,
// LeakyReLU with a positive slope, ELU with a positive alpha. Its derivative is
// read from y itself (y > 0 exactly where z > 0), so the recomputation cannot
// move a value across the kink.
FASTBN_HOST_DEVICE bool activation_invertible(Activation act, double param) {
  return act == Activation::Identity || ((act == Activation::LeakyReLU || act == Activation::ELU) && param > 0);
}

FASTBN_HOST_DEVICE float log1p_acc(float x) { return log1pf(x); }
FASTBN_HOST_DEVICE double log1p_acc(double x) { return log1p(x); }

// z from y = act(z). ELU saturates: once exp(z) is below the stored dtype's
// resolution, y rounds to -alpha and z is lost. `elu_floor` (elu_inverse_floor)
// is then returned instead of -inf: such values have act'(z) = y + alpha = 0, so
// grad_weight and eval-mode grad_input stay exact, and only training-mode
// grad_input of those values depends on the guess.
template <typename acc_t>
FASTBN_HOST_DEVICE acc_t activation_inverse(Activation act, acc_t y, acc_t param, acc_t elu_floor) {
  switch (act) {
    case Activation::LeakyReLU:
      return y > acc_t(0) ? y : y / param;
    case Activation::ELU: {
      if (y > acc_t(0)) return y;
      // y can round below -alpha when alpha is not exact in the stored dtype
      const acc_t q = y / param < acc_t(-1) ? acc_t(-1) : y / param;
      const acc_t z = log1p_acc(q);
      return z < elu_floor ? elu_floor : z;  // NaN stays NaN
    }
    default:
      return y;
  }
}

// The smallest z whose ELU output a scalar_t still tells from -alpha: half the
// step of scalar_t just below 1, so exp(z) = epsilon / 4 = 2^-(digits + 1).
// Host code; from `digits` so no half -> float conversion runs on the host.
template <typename scalar_t>
inline double elu_inverse_floor() {
  return -double(std::numeric_limits<scalar_t>::digits + 1) * log(2.0);
}

// d act / dz from y = act(z) (ELU: alpha * exp(z) = y + alpha).
template <typename acc_t>
FASTBN_HOST_DEVICE acc_t activation_grad_from_output(Activation act, acc_t y, acc_t param) {
  switch (act) {
    case Activation::LeakyReLU:
      return y > acc_t(0) ? acc_t(1) : param;
    case Activation::ELU:
      return y > acc_t(0) ? acc_t(1) : (y + param < acc_t(0) ? acc_t(0) : y + param);
    default:
      return acc_t(1);
  }
}

// The centered input x - mean from the pre-activation z = (x - mean) * scale + bias.
template <typename acc_t>
FASTBN_HOST_DEVICE acc_t centered_input_from_z(const ForwardCoefficients<acc_t>& c, acc_t z) {
  return (z - c.bias) / c.scale;
}

// Running statistics: exponential moving average with `factor` (torch's momentum,
// or 1/num_batches_tracked for the cumulative average), the variance unbiased by
// count / (count - 1) as torch does.
template <typename acc_t>
FASTBN_HOST_DEVICE acc_t running_mean_update(acc_t running_mean, acc_t batch_mean, acc_t factor) {
  return (acc_t(1) - factor) * running_mean + factor * batch_mean;
}

template <typename acc_t>
FASTBN_HOST_DEVICE acc_t running_var_update(acc_t running_var, acc_t batch_var, acc_t factor, int64_t count) {
  const acc_t unbiased = count > 1 ? batch_var * (acc_t(count) / acc_t(count - 1)) : batch_var;
  return (acc_t(1) - factor) * running_var + factor * unbiased;
}

// running_var_update for the variance, running_mean_update for the mean.
template <typename acc_t>
FASTBN_HOST_DEVICE acc_t running_stat_update(acc_t running, acc_t batch, bool is_var, acc_t factor, int64_t count) {
  return is_var ? running_var_update(running, batch, factor, count) : running_mean_update(running, batch, factor);
}

}  // namespace fastbn
