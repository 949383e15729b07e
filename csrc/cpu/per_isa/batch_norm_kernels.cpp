// The CPU kernels behind cpu_kernels.h: dtype and activation dispatch onto the
// passes of batch_norm_passes.h. setup.py compiles this file once per x86
// vector ISA (DEFAULT, AVX2, AVX512, AVX512_BF16; DEFAULT elsewhere) with that ISA's flags
// and CPU_CAPABILITY=<ISA>, which puts each copy in namespace
// fastbn::cpu::<ISA> (and at::vec's in at::vec::<ISA>).
//
// Only kernels belong here: setup.py links these objects last, lowest ISA
// first, so that an inline function from a shared header (c10, std, bn_math.h)
// that several objects emit resolves to a copy from a lower ISA than its
// caller's (the linker keeps the first copy), never to an AVX-512 copy reached
// from DEFAULT code.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include "cpu/batch_norm_passes.h"
#include "cpu/cpu_kernels.h"
#include "cpu/vec_kernels.h"

namespace fastbn::cpu::CPU_CAPABILITY {
namespace {

using at::Tensor;

void train_into(const Tensor& x, const Tensor& residual, const Tensor& y, const Tensor& mean, const Tensor& var,
                const Tensor& w, const Tensor& b, double eps, Activation act, double activation_param,
                const Geometry& g) {
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

void eval_into(const Tensor& x, const Tensor& residual, const Tensor& y, const Tensor& mean, const Tensor& var,
               const Tensor& w, const Tensor& b, double eps, Activation act, double activation_param,
               const Geometry& g) {
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

void backward_into(const BackwardCall& b, double eps, double activation_param, bool train) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.o.x.scalar_type(), "fastbn_batch_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto args = backward_args<scalar_t, acc_t>(b.o, eps, activation_param, b.residual);
    // (no dx wanted: no dx pointer, and the passes skip it)
    const BackwardOutputs<scalar_t> out{
        b.need_input ? b.grad_input.data_ptr<scalar_t>() : nullptr,
        b.grad_residual.defined() ? b.grad_residual.data_ptr<scalar_t>() : nullptr};
    FASTBN_ACTIVATION_SWITCH(b.act, A, [&] {
      backward<A>(args, out, b.grad_weight.data_ptr<acc_t>(), b.grad_bias.data_ptr<acc_t>(), train, b.need_params);
    });
  });
}

// In-place activated BN: from y = act(z), z = (x - mean) * scale + bias, the
// gradient g = dy * act'(z) and the centered input x - mean = (z - bias) / scale,
// in the accumulation dtype (the backward then runs on them with mean 0).
void invert_output_into(const InvertCall& call, double eps, double activation_param) {
  const PhaseOperands& o = call.o;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.x.scalar_type(), "fastbn_invert_output_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = typename Lanes<scalar_t>::Vec;
    const auto coef = forward_arrays<acc_t>(nullptr, o.var.const_data_ptr<acc_t>(), channel_params<acc_t>(o.w, o.b),
                                            o.g.C, acc_t(eps));
    const scalar_t* dy = o.dy.const_data_ptr<scalar_t>();
    const scalar_t* y = o.x.const_data_ptr<scalar_t>();
    acc_t* grad_out = call.grad.data_ptr<acc_t>();
    acc_t* centered_out = call.centered.data_ptr<acc_t>();
    const Vec vparam{acc_t(activation_param)}, elu_floor{acc_t(elu_inverse_floor<scalar_t>())};
    FASTBN_ACTIVATION_SWITCH(call.act, A, [&] {
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
}

void stats_into(const Tensor& x, const Geometry& g, const Tensor& mean, const Tensor& var) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastbn_batch_norm_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto moments = channel_moments(x.const_data_ptr<scalar_t>(), g);
    acc_t* mean_out = mean.data_ptr<acc_t>();  // data_ptr() checks the dtype: once, not per channel
    acc_t* var_out = var.data_ptr<acc_t>();
    for (int64_t c = 0; c < g.C; ++c) {
      mean_out[c] = acc_t(moments[c].mean);
      var_out[c] = acc_t(moments_biased_var(moments[c]));
    }
  });
}

void backward_reduce_into(const PhaseOperands& o, Activation act, double eps, double activation_param,
                          const Tensor& sum_dy, const Tensor& sum_dy_xmu) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.x.scalar_type(), "fastbn_backward_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto args = backward_args<scalar_t, acc_t>(o, eps, activation_param);
    FASTBN_ACTIVATION_SWITCH(act, A, [&] {
      const BackwardSums sums = backward_sums<A>(args);
      acc_t* sum_dy_out = sum_dy.data_ptr<acc_t>();  // as in stats_into
      acc_t* sum_dy_xmu_out = sum_dy_xmu.data_ptr<acc_t>();
      for (int64_t c = 0; c < o.g.C; ++c) {
        sum_dy_out[c] = acc_t(sums.dy[c]);
        sum_dy_xmu_out[c] = acc_t(sums.dy_xmu[c]);
      }
    });
  });
}

void backward_elemt_into(const PhaseOperands& o, Activation act, double eps, double activation_param,
                         const Tensor& sum_dy, const Tensor& sum_dy_xmu, int64_t count, const Tensor& dx) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.x.scalar_type(), "fastbn_backward_elemt_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto args = backward_args<scalar_t, acc_t>(o, eps, activation_param);
    FASTBN_ACTIVATION_SWITCH(act, A, [&] {
      backward_apply_all<A>(args, BackwardOutputs<scalar_t>{dx.data_ptr<scalar_t>(), nullptr},
                            sum_dy.const_data_ptr<double>(), sum_dy_xmu.const_data_ptr<double>(), count, true);
    });
  });
}

}  // namespace

// declared extern in cpu_kernels.h, so this constant has external linkage
const CpuKernels kernels{&train_into, &eval_into,           &backward_into,      &invert_output_into,
                         &stats_into, &backward_reduce_into, &backward_elemt_into};

}  // namespace fastbn::cpu::CPU_CAPABILITY
