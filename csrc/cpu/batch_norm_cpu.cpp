// fastbn's batch-norm operators on CPU: argument checks and outputs, then the
// kernels of the ISA chosen at run time (cpu_capability.h), which dispatch on
// dtype and activation (per_isa/batch_norm_kernels.cpp).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <limits>

#include "bn_checks.h"
#include "bn_math.h"
#include "cpu/cpu_capability.h"

namespace fastbn::cpu {
namespace {

using at::Tensor;

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
  active_kernels().train(x, residual, y, mean, var, w, b, eps, act, activation_param, g);
}

// Evaluation forward of x (dense in g.format) into y, which may be x itself.
void eval_into(const Tensor& x, const Tensor& residual, const Tensor& y, const Tensor& running_mean,
               const Tensor& running_var, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
               double eps, Activation act, double activation_param, const Geometry& g) {
  if (g.count() == 0 || g.C == 0) return;
  const auto acc = accumulate_dtype(x.scalar_type());
  const Tensor w = to_accumulate(weight, acc), b = to_accumulate(bias, acc);
  const Tensor mean = to_accumulate(running_mean, acc), var = to_accumulate(running_var, acc);
  active_kernels().eval(x, residual, y, mean, var, w, b, eps, act, activation_param, g);
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
  const TrainOperands o = train_operands(input, weight, bias, activation, activation_param, op);
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
  const TrainOperands o = train_inplace_operands(input, weight, bias, activation, activation_param, op);
  // The kernels overwrite each value after reading it: they write into input when
  // it is dense, else into its dense copy, which then goes back into input.
  const Tensor x = input.contiguous(o.g.format);
  train_into(x, Tensor(), x, o.mean, o.var, weight, bias, eps, o.act, activation_param, o.g);
  store_in_place(input, x);
  return {o.mean, o.var};
}

Tensor batch_norm_eval_cpu(const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                           const Tensor& running_mean, const Tensor& running_var, double eps, int64_t activation,
                           double activation_param, const std::optional<Tensor>& residual) {
  constexpr const char* op = "fastbn.batch_norm_eval";
  const auto [g, act] = eval_operands(input, weight, bias, running_mean, running_var, activation, activation_param, op);
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
  const auto [g, act] =
      eval_inplace_operands(input, weight, bias, running_mean, running_var, activation, activation_param, op);
  const Tensor x = input.contiguous(g.format);  // as in batch_norm_train_inplace_cpu
  eval_into(x, Tensor(), x, running_mean, running_var, weight, bias, eps, act, activation_param, g);
  store_in_place(input, x);
}

// The fused backward; with a residual also its gradient g = dy * act'(bn(x) + residual),
// computed in the accumulation dtype inside both passes and written once.
BackwardCall backward_cpu(const Tensor& grad_output, const Tensor& input, const std::optional<Tensor>& residual,
                          const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, const Tensor& mean,
                          const Tensor& var, double eps, bool train, int64_t activation, double activation_param,
                          const char* op, OutputMask output_mask = kEveryOutput) {
  BackwardCall b = backward_call(grad_output, input, residual, weight, bias, mean, var, activation, activation_param, op,
                                 output_mask);
  if (b.empty() || !(b.need_input || b.need_params)) return b;
  active_kernels().backward(b, eps, activation_param, train);
  return b;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cpu(const Tensor& grad_output, const Tensor& input,
                                                           const std::optional<Tensor>& weight,
                                                           const std::optional<Tensor>& bias, const Tensor& mean,
                                                           const Tensor& var, double eps, bool train,
                                                           int64_t activation, double activation_param,
                                                           OutputMask output_mask) {
  const BackwardCall b = backward_cpu(grad_output, input, std::nullopt, weight, bias, mean, var, eps, train,
                                      activation, activation_param, "fastbn.batch_norm_backward", output_mask);
  return masked_backward_outputs(b, output_mask);
}

// Backward of act(bn(x) + residual): (dx, grad_residual, grad_weight, grad_bias).
std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_add_act_backward_cpu(
    const Tensor& grad_output, const Tensor& input, const Tensor& residual, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& var, double eps, bool train,
    int64_t activation, double activation_param) {
  constexpr const char* op = "fastbn.batch_norm_add_act_backward";
  check_defined(residual, "residual", op);  // None would pass as "no residual"
  const BackwardCall b = backward_cpu(grad_output, input, residual, weight, bias, mean, var, eps, train, activation,
                                      activation_param, op);
  return {b.grad_input, b.grad_residual, b.grad_weight, b.grad_bias};
}

// In-place activated BN: from y = act(z), z = (x - mean) * scale + bias, the
// gradient g = dy * act'(z) and the centered input x - mean = (z - bias) / scale,
// in the accumulation dtype (the backward then runs on them with mean 0).
std::tuple<Tensor, Tensor> batch_norm_invert_output_cpu(const Tensor& grad_output, const Tensor& output,
                                                        const std::optional<Tensor>& weight,
                                                        const std::optional<Tensor>& bias, const Tensor& var,
                                                        double eps, int64_t activation, double activation_param) {
  const InvertCall call = invert_output_call(grad_output, output, weight, bias, var, activation, activation_param,
                                             "fastbn.batch_norm_invert_output");
  if (call.empty()) return {call.grad, call.centered};
  active_kernels().invert_output(call, eps, activation_param);
  return {call.grad, call.centered};
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
  active_kernels().stats(x, g, mean, var);
  return {mean, var};
}


std::tuple<Tensor, Tensor> batch_norm_backward_reduce_cpu(const Tensor& grad_output, const Tensor& input,
                                                          const std::optional<Tensor>& weight,
                                                          const std::optional<Tensor>& bias, const Tensor& mean,
                                                          const Tensor& var, double eps, int64_t activation,
                                                          double activation_param) {
  constexpr const char* op = "fastbn.batch_norm_backward_reduce";
  const Activation act = check_activation(activation, activation_param, op);
  const PhaseOperands o = backward_phase_operands(grad_output, input, weight, bias, mean, var, op);
  const auto acc = accumulate_dtype(input.scalar_type());
  Tensor sum_dy = at::zeros({o.g.C}, input.options().dtype(acc));
  Tensor sum_dy_xmu = at::zeros({o.g.C}, input.options().dtype(acc));
  if (o.g.count() == 0) return {sum_dy, sum_dy_xmu};
  active_kernels().backward_reduce(o, act, eps, activation_param, sum_dy, sum_dy_xmu);
  return {sum_dy, sum_dy_xmu};
}

Tensor batch_norm_backward_elemt_cpu(const Tensor& grad_output, const Tensor& input,
                                     const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                                     const Tensor& mean, const Tensor& var, const Tensor& sum_dy,
                                     const Tensor& sum_dy_xmu, double eps, int64_t count, int64_t activation,
                                     double activation_param) {
  constexpr const char* op = "fastbn.batch_norm_backward_elemt";
  const Activation act = check_activation(activation, activation_param, op);
  TORCH_CHECK(count >= 0, op, ": count must be non-negative, got ", count);
  const PhaseOperands o = backward_phase_operands(grad_output, input, weight, bias, mean, var, op);
  check_backward_elemt_sums(input, sum_dy, sum_dy_xmu, count, o.g, op);
  Tensor dx = at::empty(input.sizes(), input.options().memory_format(o.g.format));
  if (o.g.count() == 0) return dx;
  const Tensor sdy = sum_dy.to(at::kDouble).contiguous(), sdx = sum_dy_xmu.to(at::kDouble).contiguous();
  active_kernels().backward_elemt(o, act, eps, activation_param, sdy, sdx, count, dx);
  return dx;
}

// One running statistic updated in double, channel after channel, and rounded once
// into the buffer's dtype. A statistic expanded from one value (stride 0, which torch
// accepts) takes every channel's update in turn, as torch's kernel does on one thread,
// and is written back through its one element.
void update_running_stat(const Tensor& running, const Tensor& batch, bool is_var, double factor, int64_t count) {
  const int64_t C = running.numel();
  if ((C <= 1 || running.stride(0) == 1) && batch.is_contiguous()) {
    // A dense buffer (the usual case) is updated where it lies: this runs on every training
    // call, and on small layers the temporaries of the general path cost more than the update.
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running.scalar_type(), "update_running_stat", [&] {
      using running_t = scalar_t;
      running_t* r = running.data_ptr<running_t>();
      AT_DISPATCH_FLOATING_TYPES(batch.scalar_type(), "update_running_stat", [&] {
        const scalar_t* b = batch.const_data_ptr<scalar_t>();
        for (int64_t c = 0; c < C; ++c) {
          r[c] = static_cast<running_t>(running_stat_update(double(r[c]), double(b[c]), is_var, factor, count));
        }
      });
    });
    return;
  }
  const bool shared = C > 1 && running.stride(0) == 0;
  Tensor values = running.to(at::kDouble).contiguous().clone();
  const Tensor batch_values = batch.to(at::kDouble).contiguous();
  double* r = values.data_ptr<double>();
  const double* b = batch_values.const_data_ptr<double>();
  for (int64_t c = 0; c < C; ++c) {
    const double old = shared && c > 0 ? r[c - 1] : r[c];
    r[c] = running_stat_update(old, b[c], is_var, factor, count);
  }
  if (shared) {
    running.narrow(0, 0, 1).copy_(values.narrow(0, C - 1, 1));
  } else {
    running.copy_(values);
  }
}

void update_running_stats_cpu(const Tensor& running_mean, const Tensor& running_var, const Tensor& mean, const Tensor& var,
                              double factor, int64_t count) {
  constexpr const char* op = "fastbn.update_running_stats";
  check_running_stats_update(running_mean, running_var, mean, var, count, op);
  if (count == 0) return;  // an empty batch leaves the running statistics as they are (as torch does)
  update_running_stat(running_mean, mean, false, factor, count);
  update_running_stat(running_var, var, true, factor, count);
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
