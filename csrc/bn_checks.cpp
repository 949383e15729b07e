#include "bn_checks.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

namespace fastbn {

c10::MemoryFormat output_memory_format(const at::Tensor& input) {
  // A tensor with a size-1 spatial or channel dim can be contiguous in both
  // formats; it is then treated as plain contiguous.
  if (input.dim() == 4 && !input.is_contiguous() && input.is_contiguous(c10::MemoryFormat::ChannelsLast)) {
    return c10::MemoryFormat::ChannelsLast;
  }
  if (input.dim() == 5 && !input.is_contiguous() && input.is_contiguous(c10::MemoryFormat::ChannelsLast3d)) {
    return c10::MemoryFormat::ChannelsLast3d;
  }
  return c10::MemoryFormat::Contiguous;
}

Geometry describe(const at::Tensor& input) {
  Geometry g;
  g.N = input.size(0);
  g.C = input.size(1);
  g.S = 1;
  for (int64_t d = 2; d < input.dim(); ++d) g.S *= input.size(d);
  g.format = output_memory_format(input);
  // With S = 1 ((N, C), (N, C, 1, 1), ...) the values are both planar and
  // interleaved; interleaved vectorizes along C instead of one value per run.
  g.layout = (g.format != c10::MemoryFormat::Contiguous || g.S == 1) ? Layout::Interleaved : Layout::Planar;
  return g;
}

namespace {
// The dtypes the kernels dispatch on (at::isFloatingType also takes float8 and float4 types).
bool is_kernel_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}
}  // namespace

void check_defined(const at::Tensor& tensor, const char* name, const char* op) {
  TORCH_CHECK(tensor.defined(), op, ": ", name, " is required, got None");
}

void check_input(const at::Tensor& input, const char* op) {
  check_defined(input, "input", op);
  TORCH_CHECK(input.dim() >= 2, op, ": expected input of shape (N, C, *) with at least 2 dims, got ", input.dim(),
              "-D input of size ", input.sizes());
  TORCH_CHECK(is_kernel_dtype(input.scalar_type()), op, ": input must be float32, float64, float16 or bfloat16, got ",
              input.scalar_type());
}

void check_writable_input(const at::Tensor& input, const char* op) {
  TORCH_CHECK(at::has_internal_overlap(input) != at::MemOverlap::Yes, op,
              ": input: unsupported operation: more than one element of the written-to tensor refers to a single "
              "memory location. Please clone() the tensor before performing the operation.");
}

void check_channel_vector(const at::Tensor& input, const at::Tensor& vec, const char* name, const char* op) {
  if (!vec.defined()) return;
  const int64_t channels = input.size(1);
  TORCH_CHECK(vec.dim() == 1, op, ": ", name, " must be 1-D with one value per channel, got size ", vec.sizes());
  TORCH_CHECK(vec.numel() == channels, op, ": ", name, " should contain ", channels, " elements not ", vec.numel(),
              " (one per channel of input, of size ", input.sizes(), ")");
  TORCH_CHECK(vec.device() == input.device(), op, ": ", name, " is on ", vec.device(), " but input is on ",
              input.device());
  const auto in = input.scalar_type();
  const auto dt = vec.scalar_type();
  const bool reduced = in == at::kHalf || in == at::kBFloat16;
  TORCH_CHECK(dt == in || (reduced && dt == at::kFloat), op, ": ", name, " has dtype ", dt, " but input has dtype ",
              in, "; expected ", in, reduced ? " or Float" : "");
}

void check_channel_vector(const at::Tensor& input, const std::optional<at::Tensor>& vec, const char* name,
                          const char* op) {
  if (vec.has_value()) check_channel_vector(input, *vec, name, op);
}

void check_like_input(const at::Tensor& input, const at::Tensor& other, const char* name, const char* op) {
  TORCH_CHECK(other.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(other.sizes() == input.sizes(), op, ": ", name, " has size ", other.sizes(), " but input has size ",
              input.sizes());
  TORCH_CHECK(other.scalar_type() == input.scalar_type(), op, ": ", name, " has dtype ", other.scalar_type(),
              " but input has dtype ", input.scalar_type());
  TORCH_CHECK(other.device() == input.device(), op, ": ", name, " is on ", other.device(), " but input is on ",
              input.device());
}

at::Tensor dense_residual(const at::Tensor& input, const std::optional<at::Tensor>& residual, const Geometry& g,
                          const char* op) {
  if (!residual.has_value() || !residual->defined()) return at::Tensor();
  check_like_input(input, *residual, "residual", op);
  return residual->contiguous(g.format);
}

namespace {

// Whether two 1-D tensors have a byte of memory in common. at::get_overlap_status
// answers for dense tensors; strided ones in one storage (halves of one buffer taken
// every other value, say) are compared element by element.
bool share_memory(const at::Tensor& a, const at::Tensor& b) {
  const auto status = at::get_overlap_status(a, b);
  if (status != at::MemOverlapStatus::TooHard) return status != at::MemOverlapStatus::No;
  if (!a.storage().is_alias_of(b.storage())) return false;
  auto first_bytes = [](const at::Tensor& t) {  // first byte of each element, in the storage
    std::vector<int64_t> starts(t.numel());
    for (int64_t i = 0; i < t.numel(); ++i) starts[i] = (t.storage_offset() + i * t.stride(0)) * t.element_size();
    std::sort(starts.begin(), starts.end());
    return starts;
  };
  const std::vector<int64_t> a_starts = first_bytes(a);
  for (const int64_t b_start : first_bytes(b)) {
    // the first element of a ending after b's element starts must start after it ends
    auto it = std::lower_bound(a_starts.begin(), a_starts.end(), b_start - a.element_size() + 1);
    if (it != a_starts.end() && *it < b_start + b.element_size()) return true;
  }
  return false;
}

}  // namespace

void check_running_stats_update(const at::Tensor& running_mean, const at::Tensor& running_var,
                                const at::Tensor& mean, const at::Tensor& var, int64_t count, const char* op) {
  TORCH_CHECK(count >= 0, op, ": count must be non-negative, got ", count);
  // torch's batch norm refuses one value per channel in training ("Expected more than 1
  // value per channel when training"): its unbiased variance would divide by 0.
  TORCH_CHECK(count != 1, op, ": count must be 0 (no values: nothing to update) or more than 1 (the variance is ",
              "unbiased by count / (count - 1)), got 1");
  check_defined(running_mean, "running_mean", op);
  check_defined(running_var, "running_var", op);
  check_defined(mean, "mean", op);
  check_defined(var, "var", op);
  TORCH_CHECK(mean.dim() == 1 && var.sizes() == mean.sizes() && running_mean.sizes() == mean.sizes() &&
                  running_var.sizes() == mean.sizes(),
              op, ": running_mean ", running_mean.sizes(), ", running_var ", running_var.sizes(), ", mean ",
              mean.sizes(), " and var ", var.sizes(), " must be 1-D of one size");
  TORCH_CHECK(mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble, op,
              ": mean must be float32 or float64, got ", mean.scalar_type());
  TORCH_CHECK(var.scalar_type() == mean.scalar_type(), op, ": var has dtype ", var.scalar_type(), " but mean has ",
              mean.scalar_type());
  for (const auto& [t, name] : {std::pair{&running_mean, "running_mean"}, std::pair{&running_var, "running_var"}}) {
    // an integer buffer would silently truncate the averages; a float8 one would fail after the other was written
    TORCH_CHECK(is_kernel_dtype(t->scalar_type()), op, ": ", name,
                " must be a floating tensor (float32, float64, float16 or bfloat16), got ", t->scalar_type());
  }
  for (const auto& [t, name] : {std::pair{&running_mean, "running_mean"}, std::pair{&running_var, "running_var"},
                                std::pair{&var, "var"}}) {
    TORCH_CHECK(t->device() == mean.device(), op, ": ", name, " is on ", t->device(), " but mean is on ",
                mean.device());
  }
  // one buffer as both statistics would take both updates in an order of the kernel's choosing
  TORCH_CHECK(running_mean.numel() == 0 || !share_memory(running_mean, running_var), op,
              ": running_mean and running_var share memory; pass separate buffers");
}

void check_backward_elemt_sums(const at::Tensor& input, const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu,
                               int64_t count, const Geometry& g, const char* op) {
  check_defined(sum_dy, "sum_dy", op);
  check_defined(sum_dy_xmu, "sum_dy_xmu", op);
  check_channel_vector(input, sum_dy, "sum_dy", op);
  check_channel_vector(input, sum_dy_xmu, "sum_dy_xmu", op);
  TORCH_CHECK(count >= g.count(), op, ": count (values per channel over all processes) must be at least this ",
              "input's ", g.count(), ", got ", count);
}

Activation check_activation(int64_t activation, const char* op) {
  TORCH_CHECK(activation >= 0 && activation <= static_cast<int64_t>(Activation::SiLU), op,
              ": activation must be 0 (none), 1 (relu), 2 (leaky_relu), 3 (elu) or 4 (silu), got ", activation);
  return static_cast<Activation>(activation);
}

void check_activation_param(Activation act, double param, const char* op) {
  TORCH_CHECK((act != Activation::LeakyReLU && act != Activation::ELU) || std::isfinite(param), op,
              ": activation_param must be a finite number for leaky_relu and elu, got ", param);
}

void check_invertible(Activation act, double param, const char* op) {
  // the kernels divide by the parameter in float: it must stay a normal float there (a subnormal
  // slope turns y / slope into inf), the bound fastbn.inplace.check_invertible uses too
  TORCH_CHECK(activation_invertible(act, param) &&
                  (act == Activation::Identity || float(param) >= std::numeric_limits<float>::min()),
              op,
              ": in-place activated batch norm needs an invertible activation (none, leaky_relu with a positive "
              "slope, elu with a positive alpha), got activation ", static_cast<int>(act), " with activation_param ", param);
}

Activation check_activation(int64_t activation, double param, const char* op) {
  const Activation act = check_activation(activation, op);
  check_activation_param(act, param, op);
  return act;
}

at::ScalarType accumulate_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor to_accumulate(const std::optional<at::Tensor>& vec, at::ScalarType acc_dtype) {
  if (!vec.has_value() || !vec->defined()) return at::Tensor();
  // (the usual case returns at once: Tensor::to is a dispatcher call even when it changes nothing)
  if (vec->scalar_type() == acc_dtype && vec->is_contiguous()) return *vec;
  return vec->to(acc_dtype).contiguous();
}

TrainOperands train_operands(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias, int64_t activation, double activation_param,
                             const char* op) {
  check_input(input, op);
  TrainOperands o{describe(input), check_activation(activation, op)};
  check_channel_vector(input, weight, "weight", op);
  check_channel_vector(input, bias, "bias", op);
  check_activation_param(o.act, activation_param, op);
  const auto acc = accumulate_dtype(input.scalar_type());
  o.mean = at::empty({o.g.C}, input.options().dtype(acc));
  o.var = at::empty({o.g.C}, input.options().dtype(acc));
  return o;
}

TrainOperands train_inplace_operands(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias, int64_t activation,
                                     double activation_param, const char* op) {
  TrainOperands o = train_operands(input, weight, bias, activation, activation_param, op);
  check_invertible(o.act, activation_param, op);
  check_writable_input(input, op);
  return o;
}

EvalOperands eval_operands(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                           const at::Tensor& running_var, int64_t activation, double activation_param,
                           const char* op) {
  check_input(input, op);
  check_channel_vector(input, weight, "weight", op);
  check_channel_vector(input, bias, "bias", op);
  check_defined(running_mean, "running_mean", op);
  check_defined(running_var, "running_var", op);
  check_channel_vector(input, running_mean, "running_mean", op);
  check_channel_vector(input, running_var, "running_var", op);
  return {describe(input), check_activation(activation, activation_param, op)};
}

EvalOperands eval_inplace_operands(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                                   const at::Tensor& running_var, int64_t activation, double activation_param,
                                   const char* op) {
  const EvalOperands o =
      eval_operands(input, weight, bias, running_mean, running_var, activation, activation_param, op);
  check_invertible(o.act, activation_param, op);
  check_writable_input(input, op);
  return o;
}

PhaseOperands backward_phase_operands(const at::Tensor& grad_output, const at::Tensor& input,
                                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                      const at::Tensor& mean, const at::Tensor& var, const char* op) {
  check_input(input, op);
  check_defined(grad_output, "grad_output", op);
  check_defined(mean, "mean", op);
  check_defined(var, "var", op);
  TORCH_CHECK(grad_output.sizes() == input.sizes(), op, ": grad_output has size ", grad_output.sizes(),
              " but input has size ", input.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type() && grad_output.device() == input.device(), op,
              ": grad_output must match input's dtype and device, got ", grad_output.scalar_type(), " on ",
              grad_output.device(), " for input ", input.scalar_type(), " on ", input.device());
  check_channel_vector(input, weight, "weight", op);
  check_channel_vector(input, bias, "bias", op);
  check_channel_vector(input, mean, "mean", op);
  check_channel_vector(input, var, "var", op);
  const auto acc = accumulate_dtype(input.scalar_type());
  PhaseOperands o{describe(input)};
  o.x = input.contiguous(o.g.format);
  // grad_output can come in any strides (an expanded ones_like, say): match x's.
  o.dy = grad_output.contiguous(o.g.format);
  o.w = to_accumulate(weight, acc);
  o.b = to_accumulate(bias, acc);
  o.mean = to_accumulate(mean, acc);
  o.var = to_accumulate(var, acc);
  return o;
}

BackwardCall backward_call(const at::Tensor& grad_output, const at::Tensor& input,
                           const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var,
                           int64_t activation, double activation_param, const char* op, OutputMask output_mask) {
  const Activation act = check_activation(activation, op);
  BackwardCall b{backward_phase_operands(grad_output, input, weight, bias, mean, var, op)};
  b.act = act;
  b.residual = dense_residual(input, residual, b.o.g, op);
  b.need_input = output_mask[0];
  b.need_params = output_mask[1] || output_mask[2];
  const auto layout = input.options().memory_format(b.o.g.format);
  b.grad_input = b.need_input ? at::empty(input.sizes(), layout) : at::empty({0}, input.options());
  if (b.residual.defined()) b.grad_residual = at::empty(input.sizes(), layout);
  const auto acc = input.options().dtype(accumulate_dtype(input.scalar_type()));
  // The kernels write every channel's gradient; without values they do not run, and the gradients are 0.
  b.grad_weight = b.empty() ? at::zeros({b.o.g.C}, acc) : at::empty({b.o.g.C}, acc);
  b.grad_bias = b.empty() ? at::zeros({b.o.g.C}, acc) : at::empty({b.o.g.C}, acc);
  check_activation_param(act, activation_param, op);
  return b;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_backward_outputs(const BackwardCall& b, OutputMask output_mask) {
  const auto wanted = [](const at::Tensor& grad, bool want) {
    return want ? grad : at::empty({0}, grad.options());
  };
  return {wanted(b.grad_input, output_mask[0]), wanted(b.grad_weight, output_mask[1]),
          wanted(b.grad_bias, output_mask[2])};
}

InvertCall invert_output_call(const at::Tensor& grad_output, const at::Tensor& output,
                              const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& var, int64_t activation, double activation_param, const char* op) {
  const Activation act = check_activation(activation, op);
  check_activation_param(act, activation_param, op);
  check_invertible(act, activation_param, op);
  check_input(output, op);
  // There is no mean argument: var stands in for it below, so check it under its own name first.
  check_defined(var, "var", op);
  check_channel_vector(output, var, "var", op);
  check_channel_vector(output, weight, "weight", op);
  if (weight.has_value() && weight->defined() && weight->numel() > 0) {
    // a channel of weight 0 maps every input to its bias: x - mean = (z - bias) / 0 is lost
    // (reading the weight waits for a GPU: in-place ABN's backward pays that once per call)
    const at::Tensor is_zero = weight->eq(0);
    if (is_zero.any().item<bool>()) {
      TORCH_CHECK(false, op, ": weight is 0 in channel ", is_zero.nonzero()[0][0].item<int64_t>(),
                  ": its input cannot be recovered from the output");
    }
  }
  InvertCall call{backward_phase_operands(grad_output, output, weight, bias, var, var, op), act};
  const auto options = output.options().dtype(accumulate_dtype(output.scalar_type())).memory_format(call.o.g.format);
  call.grad = at::empty(output.sizes(), options);
  call.centered = at::empty(output.sizes(), options);
  return call;
}

}  // namespace fastbn
