// The fused activations on vectors, and the per-channel coefficients as vectors
// and as padded arrays (the formulas are bn_math.h's).
// Part of the CPU kernels' vector loops (vec_kernels.h lists them all); compiled once per ISA.
#pragma once

#include "cpu/vec_lanes.h"

namespace fastbn::cpu::CPU_CAPABILITY {

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
template <Activation A, Order O = Order::Memory, typename scalar_t, typename Vec>
C10_ALWAYS_INLINE void load_residual(const scalar_t* residual, int64_t offset, int64_t count, Vec& lo, Vec& hi) {
  if (A == Activation::Identity || residual == nullptr) {
    lo = hi = Vec(typename Vec::value_type(0));
  } else {
    load_values<O>(residual + offset, count, lo, hi);
  }
}

template <typename acc_t>
C10_ALWAYS_INLINE ForwardVecs<Vectorized<acc_t>> forward_vecs(const ForwardCoefficients<acc_t>& k) {
  using Vec = Vectorized<acc_t>;
  return {Vec(k.mean_hi), Vec(k.mean_lo), Vec(k.scale), Vec(k.bias)};
}

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

}  // namespace fastbn::cpu::CPU_CAPABILITY
