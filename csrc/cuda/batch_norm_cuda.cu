// CUDA entry points of fastbn's operators: argument checks, the choice between
// the on-chip and the general implementation, launches on the current stream.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "bn_checks.h"
#include "bn_math.h"
#include "cuda/batch_norm_kernels.cuh"
#include "cuda/launch.cuh"
#include "cuda/launch_config.cuh"
#include "impl_switch.h"

namespace fastbn::cuda {
namespace {

using at::Tensor;

// ------------------------------------------------------------------ operators

template <typename scalar_t>
const scalar_t* data_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

// Training forward of x (dense in o.g.format) into y, a tensor apart (the kernels take
// __restrict__ pointers); the statistics go into o.mean and o.var.
void train_into(const Tensor& x, const Tensor& r, const Tensor& y, const TrainOperands& o,
                const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps,
                double activation_param) {
  const Activation act_code = o.act;
  const Geometry& g = o.g;
  const Tensor &mean = o.mean, &var = o.var;
  if (g.count() == 0 || g.C == 0) {
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return;
  }
  const auto acc = accumulate_dtype(x.scalar_type());
  const Tensor w = to_accumulate(weight, acc), b = to_accumulate(bias, acc);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastbn_batch_norm_train_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto params = channel_params<acc_t>(w, b);
    const ActivationArgs<acc_t> act{act_code, acc_t(activation_param)};
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = data_or_null<scalar_t>(r);
    scalar_t* yp = y.data_ptr<scalar_t>();
    FASTBN_INDEX_SWITCH(x, [&] {
      if (use_onchip(g)) {
        FASTBN_BOOL_SWITCH(g.layout == Layout::Interleaved, kInterleaved, [&] {
          FASTBN_ITEMS_SWITCH(onchip_items(g), ITEMS, [&] {
            launch_kernel(onchip_forward_kernel<scalar_t, acc_t, index_t, kInterleaved, ITEMS>, onchip_grid(g),
                onchip_block(g), 0, stream, xp, rp, yp, mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(), params,
                acc_t(eps), act, index_t(g.C), index_t(g.S), index_t(g.count()));
          });
        });
        return;
      }
      const ReduceLaunch l = reduce_launch(g, x);
      Tensor partial = workspace(int64_t(sizeof(Moments<acc_t>)) * g.C * l.splits, x);
      Tensor coef = workspace(int64_t(sizeof(ForwardCoefficients<acc_t>)) * g.C, x);
      auto* partial_p = reinterpret_cast<Moments<acc_t>*>(partial.data_ptr());
      auto* coef_p = reinterpret_cast<ForwardCoefficients<acc_t>*>(coef.data_ptr());
      if (g.layout == Layout::Planar) {
        launch_kernel(planar_moments_kernel<scalar_t, acc_t, index_t>, l.grid, l.block, 0, stream, xp, partial_p,
            index_t(g.N), index_t(g.C), index_t(g.S));
      } else {
        launch_kernel(interleaved_moments_kernel<scalar_t, acc_t, index_t>, l.grid, l.block, 0, stream, xp, partial_p,
            index_t(g.count()), index_t(g.C));
      }
      launch_kernel(finalize_moments_kernel<acc_t>, unsigned(ceil_div(g.C, kThreads)), kThreads, 0, stream, partial_p,
          l.splits, g.C, params, acc_t(eps), mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(), coef_p);
      if (g.layout == Layout::Planar) {
        launch_kernel(planar_forward_kernel<scalar_t, acc_t, index_t>, elementwise_grid(g, x), kThreads, 0, stream, xp,
            rp, yp, coef_p, act, index_t(g.N * g.C), index_t(g.C), index_t(g.S));
      } else {
        launch_kernel(interleaved_forward_kernel<scalar_t, acc_t, index_t>, elementwise_grid(g, x), kThreads, 0, stream,
            xp, rp, yp, coef_p, act, index_t(x.numel()), index_t(g.C));
      }
    });
  });
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_train_cuda(const Tensor& input, const std::optional<Tensor>& weight,
                                                         const std::optional<Tensor>& bias, double eps,
                                                         int64_t activation, double activation_param,
                                                         const std::optional<Tensor>& residual) {
  constexpr const char* op = "fastbn.batch_norm_train";
  const TrainOperands o = train_operands(input, weight, bias, activation, activation_param, op);
  const Tensor r = dense_residual(input, residual, o.g, op);
  c10::cuda::CUDAGuard guard(input.device());
  const Tensor x = input.contiguous(o.g.format);
  Tensor y = at::empty(input.sizes(), input.options().memory_format(o.g.format));
  train_into(x, r, y, o, weight, bias, eps, activation_param);
  return {y, o.mean, o.var};
}

// Evaluation forward of x (dense in g.format) into y, a tensor apart.
void eval_into(const Tensor& x, const Tensor& r, const Tensor& y, const EvalOperands& o,
               const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, const Tensor& running_mean,
               const Tensor& running_var, double eps, double activation_param) {
  const Geometry& g = o.g;
  const Activation act_code = o.act;
  if (x.numel() == 0) return;
  const auto acc = accumulate_dtype(x.scalar_type());
  const Tensor w = to_accumulate(weight, acc), b = to_accumulate(bias, acc);
  const Tensor mean = to_accumulate(running_mean, acc), var = to_accumulate(running_var, acc);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastbn_batch_norm_eval_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ActivationArgs<acc_t> act{act_code, acc_t(activation_param)};
    Tensor coef = workspace(int64_t(sizeof(ForwardCoefficients<acc_t>)) * g.C, x);
    auto* coef_p = reinterpret_cast<ForwardCoefficients<acc_t>*>(coef.data_ptr());
    launch_kernel(eval_coefficients_kernel<acc_t>, unsigned(ceil_div(g.C, kThreads)), kThreads, 0, stream,
        mean.const_data_ptr<acc_t>(), var.const_data_ptr<acc_t>(), g.C, channel_params<acc_t>(w, b), acc_t(eps),
        coef_p);
    FASTBN_INDEX_SWITCH(x, [&] {
      if (g.layout == Layout::Planar) {
        launch_kernel(planar_forward_kernel<scalar_t, acc_t, index_t>, elementwise_grid(g, x), kThreads, 0, stream,
            x.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(r), y.data_ptr<scalar_t>(), coef_p, act,
            index_t(g.N * g.C), index_t(g.C), index_t(g.S));
      } else {
        launch_kernel(interleaved_forward_kernel<scalar_t, acc_t, index_t>, elementwise_grid(g, x), kThreads, 0, stream,
            x.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(r), y.data_ptr<scalar_t>(), coef_p, act,
            index_t(x.numel()), index_t(g.C));
      }
    });
  });
}

Tensor batch_norm_eval_cuda(const Tensor& input, const std::optional<Tensor>& weight,
                            const std::optional<Tensor>& bias, const Tensor& running_mean, const Tensor& running_var,
                            double eps, int64_t activation, double activation_param,
                            const std::optional<Tensor>& residual) {
  constexpr const char* op = "fastbn.batch_norm_eval";
  const EvalOperands o =
      eval_operands(input, weight, bias, running_mean, running_var, activation, activation_param, op);
  const Tensor r = dense_residual(input, residual, o.g, op);
  c10::cuda::CUDAGuard guard(input.device());
  const Tensor x = input.contiguous(o.g.format);
  Tensor y = at::empty(input.sizes(), input.options().memory_format(o.g.format));
  eval_into(x, r, y, o, weight, bias, running_mean, running_var, eps, activation_param);
  return y;
}

// The fused backward: dx, grad_weight, grad_bias and, with a residual (added
// before the activation), grad_residual = the gradient reaching the sum.
void backward_into(const BackwardCall& call, double eps, bool train, double activation_param) {
  const PhaseOperands& o = call.o;
  const Geometry& g = o.g;
  if (call.empty()) return;
  const Tensor &residual = call.residual, &dx = call.grad_input, &grad_residual = call.grad_residual;
  const Tensor &grad_weight = call.grad_weight, &grad_bias = call.grad_bias;
  const Activation act_code = call.act;
  const Tensor &x = o.x, &dy = o.dy;
  const Tensor &w = o.w, &b = o.b, &mean_acc = o.mean, &var_acc = o.var;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastbn_batch_norm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto params = channel_params<acc_t>(w, b);
    const ActivationArgs<acc_t> act{act_code, acc_t(activation_param)};
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = data_or_null<scalar_t>(residual);
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    scalar_t* grp = grad_residual.defined() ? grad_residual.data_ptr<scalar_t>() : nullptr;
    const acc_t* mp = mean_acc.const_data_ptr<acc_t>();
    const acc_t* vp = var_acc.const_data_ptr<acc_t>();
    FASTBN_INDEX_SWITCH(x, [&] {
      if (use_onchip(g)) {
        FASTBN_BOOL_SWITCH(g.layout == Layout::Interleaved, kInterleaved, [&] {
          FASTBN_ITEMS_SWITCH(onchip_items(g), ITEMS, [&] {
            launch_kernel(onchip_backward_kernel<scalar_t, acc_t, index_t, kInterleaved, ITEMS>, onchip_grid(g),
                onchip_block(g), 0, stream, dyp, xp, rp, dxp, grp, mp, vp, params, acc_t(eps), train, act,
                grad_weight.data_ptr<acc_t>(), grad_bias.data_ptr<acc_t>(), index_t(g.C), index_t(g.S),
                index_t(g.count()));
          });
        });
        return;
      }
      const ReduceLaunch l = reduce_launch(g, x);
      Tensor partial = workspace(int64_t(sizeof(BackwardSums)) * g.C * l.splits, x);
      Tensor coef = workspace(int64_t(sizeof(BackwardCoefficients<acc_t>)) * g.C, x);
      Tensor fcoef = workspace(int64_t(sizeof(ForwardCoefficients<acc_t>)) * g.C, x);
      auto* partial_p = reinterpret_cast<BackwardSums*>(partial.data_ptr());
      auto* coef_p = reinterpret_cast<BackwardCoefficients<acc_t>*>(coef.data_ptr());
      // The forward coefficients recompute the pre-activation output from x.
      auto* fcoef_p = reinterpret_cast<ForwardCoefficients<acc_t>*>(fcoef.data_ptr());
      launch_kernel(eval_coefficients_kernel<acc_t>, unsigned(ceil_div(g.C, kThreads)), kThreads, 0, stream, mp, vp,
          g.C, params, acc_t(eps), fcoef_p);
      if (g.layout == Layout::Planar) {
        launch_kernel(planar_backward_sums_kernel<scalar_t, acc_t, index_t>, l.grid, l.block, 0, stream, dyp, xp, rp,
            mp, fcoef_p, act, partial_p, index_t(g.N), index_t(g.C), index_t(g.S));
      } else {
        launch_kernel(interleaved_backward_sums_kernel<scalar_t, acc_t, index_t>, l.grid, l.block, 0, stream, dyp, xp,
            rp, mp, fcoef_p, act, partial_p, index_t(g.count()), index_t(g.C));
      }
      launch_kernel(finalize_backward_kernel<acc_t>, unsigned(ceil_div(g.C, kThreads)), kThreads, 0, stream, partial_p,
          l.splits, g.C, mp, vp, params, acc_t(eps), g.count(), train, grad_weight.data_ptr<acc_t>(),
          grad_bias.data_ptr<acc_t>(), coef_p);
      if (g.layout == Layout::Planar) {
        launch_kernel(planar_backward_kernel<scalar_t, acc_t, index_t>, elementwise_grid(g, x), kThreads, 0, stream,
            dyp, xp, rp, dxp, grp, fcoef_p, coef_p, act, index_t(g.N * g.C), index_t(g.C), index_t(g.S));
      } else {
        launch_kernel(interleaved_backward_kernel<scalar_t, acc_t, index_t>, elementwise_grid(g, x), kThreads, 0,
            stream, dyp, xp, rp, dxp, grp, fcoef_p, coef_p, act, index_t(x.numel()), index_t(g.C));
      }
    });
  });
}

BackwardCall backward_cuda(const Tensor& grad_output, const Tensor& input, const std::optional<Tensor>& residual,
                           const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                           const Tensor& mean, const Tensor& var, double eps, bool train, int64_t activation,
                           double activation_param, const char* op) {
  BackwardCall b = backward_call(grad_output, input, residual, weight, bias, mean, var, activation, activation_param, op);
  c10::cuda::CUDAGuard guard(input.device());
  backward_into(b, eps, train, activation_param);
  return b;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cuda(const Tensor& grad_output, const Tensor& input,
                                                            const std::optional<Tensor>& weight,
                                                            const std::optional<Tensor>& bias, const Tensor& mean,
                                                            const Tensor& var, double eps, bool train,
                                                            int64_t activation, double activation_param,
                                                            OutputMask output_mask) {
  // The CUDA kernels compute every output (the mask's skipped passes are the CPU's);
  // the unwanted ones are then returned empty, as the op's schema says.
  const BackwardCall b = backward_cuda(grad_output, input, std::nullopt, weight, bias, mean, var, eps, train,
                                       activation, activation_param, "fastbn.batch_norm_backward");
  return masked_backward_outputs(b, output_mask);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_add_act_backward_cuda(
    const Tensor& grad_output, const Tensor& input, const Tensor& residual, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& var, double eps, bool train,
    int64_t activation, double activation_param) {
  check_defined(residual, "residual", "fastbn.batch_norm_add_act_backward");  // None would pass as "no residual"
  const BackwardCall b = backward_cuda(grad_output, input, residual, weight, bias, mean, var, eps, train, activation,
                                       activation_param, "fastbn.batch_norm_add_act_backward");
  return {b.grad_input, b.grad_residual, b.grad_weight, b.grad_bias};
}

// In-place activated BN. The kernels take __restrict__ pointers, so the output
// is computed apart and copied over the input: the input's storage ends up
// holding the output (what in-place ABN saves, the memory kept for backward),
// at the cost of one transient copy.
std::tuple<Tensor, Tensor> batch_norm_train_inplace_cuda(const Tensor& input, const std::optional<Tensor>& weight,
                                                         const std::optional<Tensor>& bias, double eps,
                                                         int64_t activation, double activation_param) {
  const TrainOperands o =
      train_inplace_operands(input, weight, bias, activation, activation_param, "fastbn.batch_norm_train_");
  c10::cuda::CUDAGuard guard(input.device());
  const Tensor x = input.contiguous(o.g.format);
  Tensor y = at::empty(input.sizes(), input.options().memory_format(o.g.format));
  train_into(x, Tensor(), y, o, weight, bias, eps, activation_param);
  input.copy_(y);
  return {o.mean, o.var};
}

void batch_norm_eval_inplace_cuda(const Tensor& input, const std::optional<Tensor>& weight,
                                  const std::optional<Tensor>& bias, const Tensor& running_mean,
                                  const Tensor& running_var, double eps, int64_t activation, double activation_param) {
  const EvalOperands o = eval_inplace_operands(input, weight, bias, running_mean, running_var, activation,
                                              activation_param, "fastbn.batch_norm_eval_");
  c10::cuda::CUDAGuard guard(input.device());
  const Tensor x = input.contiguous(o.g.format);
  Tensor y = at::empty(input.sizes(), input.options().memory_format(o.g.format));
  eval_into(x, Tensor(), y, o, weight, bias, running_mean, running_var, eps, activation_param);
  input.copy_(y);
}

// Launches op over every value of a tensor of geometry g (planar or interleaved).
template <typename index_t, typename Op>
void launch_map(const Op& op, const Geometry& g, const Tensor& like, cudaStream_t stream) {
  if (g.layout == Layout::Planar) {
    launch_kernel(planar_map_kernel<index_t, Op>, elementwise_grid(g, like), kThreads, 0, stream, op,
        index_t(g.N * g.C), index_t(g.C), index_t(g.S));
  } else {
    launch_kernel(interleaved_map_kernel<index_t, Op>, elementwise_grid(g, like), kThreads, 0, stream, op,
        index_t(like.numel()), index_t(g.C));
  }
}

std::tuple<Tensor, Tensor> batch_norm_invert_output_cuda(const Tensor& grad_output, const Tensor& output,
                                                         const std::optional<Tensor>& weight,
                                                         const std::optional<Tensor>& bias, const Tensor& var,
                                                         double eps, int64_t activation, double activation_param) {
  const InvertCall call = invert_output_call(grad_output, output, weight, bias, var, activation, activation_param,
                                             "fastbn.batch_norm_invert_output");
  c10::cuda::CUDAGuard guard(output.device());
  if (call.empty()) return {call.grad, call.centered};
  const PhaseOperands& o = call.o;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const Tensor zero_mean = at::zeros({o.g.C}, o.var.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, output.scalar_type(), "fastbn_invert_output_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Tensor coef = workspace(int64_t(sizeof(ForwardCoefficients<acc_t>)) * o.g.C, o.x);
    auto* coef_p = reinterpret_cast<ForwardCoefficients<acc_t>*>(coef.data_ptr());
    launch_kernel(eval_coefficients_kernel<acc_t>, unsigned(ceil_div(o.g.C, kThreads)), kThreads, 0, stream,
        zero_mean.const_data_ptr<acc_t>(), o.var.const_data_ptr<acc_t>(), o.g.C, channel_params<acc_t>(o.w, o.b),
        acc_t(eps), coef_p);
    const InvertOutputOp<scalar_t, acc_t> map{o.dy.const_data_ptr<scalar_t>(), o.x.const_data_ptr<scalar_t>(), coef_p,
                                              ActivationArgs<acc_t>{call.act, acc_t(activation_param)},
                                              acc_t(elu_inverse_floor<scalar_t>()), call.grad.data_ptr<acc_t>(),
                                              call.centered.data_ptr<acc_t>()};
    FASTBN_INDEX_SWITCH(o.x, [&] { launch_map<index_t>(map, o.g, o.x, stream); });
  });
  return {call.grad, call.centered};
}

// ------------------------------------------------------------------ SyncBatchNorm phases

std::tuple<Tensor, Tensor> batch_norm_stats_cuda(const Tensor& input) {
  constexpr const char* op = "fastbn.batch_norm_stats";
  check_input(input, op);
  c10::cuda::CUDAGuard guard(input.device());
  const Geometry g = describe(input);
  const auto acc = accumulate_dtype(input.scalar_type());
  const Tensor x = input.contiguous(g.format);
  Tensor mean = at::empty({g.C}, input.options().dtype(acc));
  Tensor var = at::empty({g.C}, input.options().dtype(acc));
  if (g.count() == 0 || g.C == 0) {
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return {mean, var};
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastbn_batch_norm_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FASTBN_INDEX_SWITCH(x, [&] {
      const ReduceLaunch l = reduce_launch(g, x);
      Tensor partial = workspace(int64_t(sizeof(Moments<acc_t>)) * g.C * l.splits, x);
      Tensor coef = workspace(int64_t(sizeof(ForwardCoefficients<acc_t>)) * g.C, x);
      auto* partial_p = reinterpret_cast<Moments<acc_t>*>(partial.data_ptr());
      if (g.layout == Layout::Planar) {
        launch_kernel(planar_moments_kernel<scalar_t, acc_t, index_t>, l.grid, l.block, 0, stream,
            x.const_data_ptr<scalar_t>(), partial_p, index_t(g.N), index_t(g.C), index_t(g.S));
      } else {
        launch_kernel(interleaved_moments_kernel<scalar_t, acc_t, index_t>, l.grid, l.block, 0, stream,
            x.const_data_ptr<scalar_t>(), partial_p, index_t(g.count()), index_t(g.C));
      }
      launch_kernel(finalize_moments_kernel<acc_t>, unsigned(ceil_div(g.C, kThreads)), kThreads, 0, stream, partial_p,
          l.splits, g.C, ChannelParams<acc_t>{nullptr, nullptr}, acc_t(0), mean.data_ptr<acc_t>(),
          var.data_ptr<acc_t>(), reinterpret_cast<ForwardCoefficients<acc_t>*>(coef.data_ptr()));
    });
  });
  return {mean, var};
}


std::tuple<Tensor, Tensor> batch_norm_backward_reduce_cuda(const Tensor& grad_output, const Tensor& input,
                                                           const std::optional<Tensor>& weight,
                                                           const std::optional<Tensor>& bias, const Tensor& mean,
                                                           const Tensor& var, double eps, int64_t activation,
                                                           double activation_param) {
  constexpr const char* op = "fastbn.batch_norm_backward_reduce";
  const Activation act_code = check_activation(activation, activation_param, op);
  const PhaseOperands o = backward_phase_operands(grad_output, input, weight, bias, mean, var, op);
  c10::cuda::CUDAGuard guard(input.device());
  const Geometry& g = o.g;
  const auto acc = accumulate_dtype(input.scalar_type());
  Tensor sum_dy = at::zeros({g.C}, input.options().dtype(acc));
  Tensor sum_dy_xmu = at::zeros({g.C}, input.options().dtype(acc));
  if (g.count() == 0 || g.C == 0) return {sum_dy, sum_dy_xmu};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastbn_backward_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto params = channel_params<acc_t>(o.w, o.b);
    const ActivationArgs<acc_t> act{act_code, acc_t(activation_param)};
    const acc_t* mp = o.mean.const_data_ptr<acc_t>();
    FASTBN_INDEX_SWITCH(o.x, [&] {
      const ReduceLaunch l = reduce_launch(g, o.x);
      Tensor partial = workspace(int64_t(sizeof(BackwardSums)) * g.C * l.splits, o.x);
      Tensor fcoef = workspace(int64_t(sizeof(ForwardCoefficients<acc_t>)) * g.C, o.x);
      auto* partial_p = reinterpret_cast<BackwardSums*>(partial.data_ptr());
      auto* fcoef_p = reinterpret_cast<ForwardCoefficients<acc_t>*>(fcoef.data_ptr());
      launch_kernel(eval_coefficients_kernel<acc_t>, unsigned(ceil_div(g.C, kThreads)), kThreads, 0, stream, mp,
          o.var.const_data_ptr<acc_t>(), g.C, params, acc_t(eps), fcoef_p);
      if (g.layout == Layout::Planar) {
        launch_kernel(planar_backward_sums_kernel<scalar_t, acc_t, index_t>, l.grid, l.block, 0, stream,
            o.dy.const_data_ptr<scalar_t>(), o.x.const_data_ptr<scalar_t>(), nullptr, mp, fcoef_p, act, partial_p,
            index_t(g.N), index_t(g.C), index_t(g.S));
      } else {
        launch_kernel(interleaved_backward_sums_kernel<scalar_t, acc_t, index_t>, l.grid, l.block, 0, stream,
            o.dy.const_data_ptr<scalar_t>(), o.x.const_data_ptr<scalar_t>(), nullptr, mp, fcoef_p, act, partial_p,
            index_t(g.count()), index_t(g.C));
      }
      launch_kernel(finalize_sums_kernel<acc_t>, unsigned(ceil_div(g.C, kThreads)), kThreads, 0, stream, partial_p,
          l.splits, g.C, sum_dy.data_ptr<acc_t>(), sum_dy_xmu.data_ptr<acc_t>());
    });
  });
  return {sum_dy, sum_dy_xmu};
}

Tensor batch_norm_backward_elemt_cuda(const Tensor& grad_output, const Tensor& input,
                                      const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                                      const Tensor& mean, const Tensor& var, const Tensor& sum_dy,
                                      const Tensor& sum_dy_xmu, double eps, int64_t count, int64_t activation,
                                      double activation_param) {
  constexpr const char* op = "fastbn.batch_norm_backward_elemt";
  const Activation act_code = check_activation(activation, activation_param, op);
  TORCH_CHECK(count >= 0, op, ": count must be non-negative, got ", count);
  const PhaseOperands o = backward_phase_operands(grad_output, input, weight, bias, mean, var, op);
  check_backward_elemt_sums(input, sum_dy, sum_dy_xmu, count, o.g, op);
  c10::cuda::CUDAGuard guard(input.device());
  const Geometry& g = o.g;
  const auto acc = accumulate_dtype(input.scalar_type());
  Tensor dx = at::empty(input.sizes(), input.options().memory_format(g.format));
  if (o.x.numel() == 0) return dx;
  const Tensor sdy = sum_dy.to(acc).contiguous(), sdx = sum_dy_xmu.to(acc).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastbn_backward_elemt_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto params = channel_params<acc_t>(o.w, o.b);
    const ActivationArgs<acc_t> act{act_code, acc_t(activation_param)};
    const acc_t* mp = o.mean.const_data_ptr<acc_t>();
    const acc_t* vp = o.var.const_data_ptr<acc_t>();
    Tensor coef = workspace(int64_t(sizeof(BackwardCoefficients<acc_t>)) * g.C, o.x);
    Tensor fcoef = workspace(int64_t(sizeof(ForwardCoefficients<acc_t>)) * g.C, o.x);
    auto* coef_p = reinterpret_cast<BackwardCoefficients<acc_t>*>(coef.data_ptr());
    auto* fcoef_p = reinterpret_cast<ForwardCoefficients<acc_t>*>(fcoef.data_ptr());
    const unsigned channel_blocks = unsigned(ceil_div(g.C, kThreads));
    launch_kernel(eval_coefficients_kernel<acc_t>, channel_blocks, kThreads, 0, stream, mp, vp, g.C, params, acc_t(eps),
        fcoef_p);
    launch_kernel(backward_coefficients_kernel<acc_t>, channel_blocks, kThreads, 0, stream, mp, vp,
        sdy.const_data_ptr<acc_t>(), sdx.const_data_ptr<acc_t>(), g.C, params, acc_t(eps), count, coef_p);
    FASTBN_INDEX_SWITCH(o.x, [&] {
      if (g.layout == Layout::Planar) {
        launch_kernel(planar_backward_kernel<scalar_t, acc_t, index_t>, elementwise_grid(g, o.x), kThreads, 0, stream,
            o.dy.const_data_ptr<scalar_t>(), o.x.const_data_ptr<scalar_t>(), nullptr, dx.data_ptr<scalar_t>(), nullptr,
            fcoef_p, coef_p, act, index_t(g.N * g.C), index_t(g.C), index_t(g.S));
      } else {
        launch_kernel(interleaved_backward_kernel<scalar_t, acc_t, index_t>, elementwise_grid(g, o.x), kThreads, 0,
            stream, o.dy.const_data_ptr<scalar_t>(), o.x.const_data_ptr<scalar_t>(), nullptr, dx.data_ptr<scalar_t>(),
            nullptr, fcoef_p, coef_p, act, index_t(o.x.numel()), index_t(g.C));
      }
    });
  });
  return dx;
}

// One running statistic updated in double from the batch's (as update_running_stat in
// batch_norm_cpu.cpp); one expanded from one value (stride 0) takes every channel's
// update in turn through that value.
void update_running_stat(const Tensor& running, const Tensor& batch, bool is_var, double factor, int64_t count,
                         cudaStream_t stream) {
  const int64_t C = running.numel();
  const bool shared = C > 1 && running.stride(0) == 0;
  const Tensor target = shared ? running.narrow(0, 0, 1) : running;
  // Work on a contiguous buffer; copy back only if the caller's was not.
  Tensor r = target.contiguous();
  const Tensor b = batch.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "fastbn_update_running_stat_cuda", [&] {
    using stat_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(b.scalar_type(), "fastbn_update_running_stat_cuda_acc", [&] {
      if (shared) {
        launch_kernel(update_shared_running_stat_kernel<stat_t, scalar_t>, 1, 1, 0, stream, r.data_ptr<stat_t>(),
            b.const_data_ptr<scalar_t>(), is_var, factor, count, C);
      } else {
        launch_kernel(update_running_stat_kernel<stat_t, scalar_t>, unsigned(ceil_div(C, kThreads)), kThreads, 0,
            stream, r.data_ptr<stat_t>(), b.const_data_ptr<scalar_t>(), is_var, factor, count, C);
      }
    });
  });
  if (!r.is_same(target)) target.copy_(r);
}

void update_running_stats_cuda(const Tensor& running_mean, const Tensor& running_var, const Tensor& mean,
                               const Tensor& var, double factor, int64_t count) {
  constexpr const char* op = "fastbn.update_running_stats";
  check_running_stats_update(running_mean, running_var, mean, var, count, op);
  if (count == 0 || mean.numel() == 0) return;  // an empty batch leaves them as they are (as torch does)
  c10::cuda::CUDAGuard guard(mean.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  update_running_stat(running_mean, mean, false, factor, count, stream);
  update_running_stat(running_var, var, true, factor, count, stream);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbn, FASTBN_CUDA_DISPATCH_KEY, m) {
  m.impl("batch_norm_train", &batch_norm_train_cuda);
  m.impl("batch_norm_eval", &batch_norm_eval_cuda);
  m.impl("batch_norm_train_", &batch_norm_train_inplace_cuda);
  m.impl("batch_norm_eval_", &batch_norm_eval_inplace_cuda);
  m.impl("batch_norm_add_act_backward", &batch_norm_add_act_backward_cuda);
  m.impl("batch_norm_invert_output", &batch_norm_invert_output_cuda);
  m.impl("batch_norm_backward", &batch_norm_backward_cuda);
  m.impl("update_running_stats", &update_running_stats_cuda);
  m.impl("batch_norm_stats", &batch_norm_stats_cuda);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce_cuda);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt_cuda);
}

}  // namespace fastbn::cuda
