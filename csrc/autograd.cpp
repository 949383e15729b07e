// Autograd of the two forward ops, batch_norm_train and batch_norm_eval, in C++:
// registered for the Autograd key, so the modules' eager calls, torch.compile
// (AOTAutograd traces through it) and opcheck all go through it.
//
// Why C++: on a small layer the per-call cost is what is left, and a Python
// autograd formula (torch.library.register_autograd) adds Python work to both
// directions (~25 us of backward on a (2, 4, 3, 3) input against ~6 us of kernel).
//
// The backward calls the fused backward ops below autograd. When a graph of the
// backward is wanted (double backward: grad mode on and something requires grad),
// it calls batch_norm_backward_composite instead, the same formula in
// differentiable torch ops, written once in Python (fastbn/ops.py). Forward-mode
// AD and torch.func transforms, which a C++ autograd Function cannot serve, use
// the Python autograd.Functions of fastbn/functions.py, which call the kernels
// below autograd.
#include <ATen/core/Tensor.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "bn_checks.h"
#include "op_handles.h"

namespace fastbn {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<Tensor> optional_tensor(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

struct InputGrads {
  Tensor input, weight, bias, residual;  // residual's: undefined without a residual
};

// The gradients of act(bn(input) [+ residual]) with respect to input, weight, bias
// (in the accumulation dtype) and the residual. mean/var: the saved statistics.
InputGrads input_grads(AutogradContext* ctx, const Tensor& grad_output, const Tensor& input, const Tensor& residual,
                       const Tensor& weight, const Tensor& bias, const Tensor& mean, const Tensor& var, bool train) {
  const double eps = ctx->saved_data["eps"].toDouble();
  const int64_t activation = ctx->saved_data["activation"].toInt();
  const double activation_param = ctx->saved_data["activation_param"].toDouble();
  const auto w = optional_tensor(weight), b = optional_tensor(bias);
  const bool wants_graph =
      at::GradMode::is_enabled() && (grad_output.requires_grad() || input.requires_grad() ||
                                     (weight.defined() && weight.requires_grad()) ||
                                     (bias.defined() && bias.requires_grad()) ||
                                     (residual.defined() && residual.requires_grad()));
  if (wants_graph) {  // differentiable torch ops; training recomputes the statistics from input
    const auto [grad_input, grad_weight, grad_bias, grad_residual] = ops().composite_backward.call(
        grad_output, input, w, b, train ? std::nullopt : optional_tensor(mean),
        train ? std::nullopt : optional_tensor(var), eps, train, activation, activation_param,
        optional_tensor(residual));
    return {grad_input, grad_weight, grad_bias, residual.defined() ? grad_residual : Tensor()};
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (!residual.defined() || activation == 0) {  // without an activation the sum's gradient is grad_output itself
    const auto [grad_input, grad_weight, grad_bias] =
        ops().backward.call(grad_output, input, w, b, mean, var, eps, train, activation, activation_param);
    return {grad_input, grad_weight, grad_bias, residual.defined() ? grad_output : Tensor()};
  }
  const auto [grad_input, grad_residual, grad_weight, grad_bias] = ops().add_act_backward.call(
      grad_output, input, residual, w, b, mean, var, eps, train, activation, activation_param);
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

// A parameter's gradient in the parameter's dtype (the kernels give the accumulation dtype);
// undefined for an absent parameter.
Tensor grad_for(const Tensor& parameter, const Tensor& grad) {
  if (!parameter.defined()) return Tensor();
  return grad.scalar_type() == parameter.scalar_type() ? grad : grad.to(parameter.scalar_type());
}

void save_arguments(AutogradContext* ctx, double eps, int64_t activation, double activation_param) {
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["activation"] = activation;
  ctx->saved_data["activation_param"] = activation_param;
}

struct BatchNormTrain : public torch::autograd::Function<BatchNormTrain> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const std::optional<Tensor>& weight,
                               const std::optional<Tensor>& bias, double eps, int64_t activation,
                               double activation_param, const std::optional<Tensor>& residual) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, mean, var] = ops().train.call(input, weight, bias, eps, activation, activation_param, residual);
    ctx->set_materialize_grads(false);  // unused outputs (the statistics, mostly) arrive undefined
    ctx->save_for_backward({input, weight.value_or(Tensor()), bias.value_or(Tensor()), mean, var,
                            residual.value_or(Tensor())});
    save_arguments(ctx, eps, activation, activation_param);
    return {output, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3], &var = saved[4],
                 &residual = saved[5];
    const Tensor grad_output = grads[0].defined() ? grads[0] : at::zeros_like(input);
    InputGrads g = input_grads(ctx, grad_output, input, residual, weight, bias, mean, var, /*train=*/true);
    const Tensor &grad_mean = grads[1], &grad_var = grads[2];
    if (grad_mean.defined() || grad_var.defined()) {
      // The batch statistics are outputs too: d mean / dx = 1/n, d var / dx = 2 (x - mean) / n.
      std::vector<int64_t> channel_shape(input.dim(), 1);
      channel_shape[1] = -1;
      const c10::Scalar count(input.sym_numel() / input.sym_size(1));
      Tensor grad_input = g.input.to(mean.scalar_type());
      if (grad_mean.defined()) grad_input = grad_input.add(grad_mean.view(channel_shape).div(count));
      if (grad_var.defined()) {
        const Tensor centered = input.to(mean.scalar_type()).sub(mean.view(channel_shape));
        grad_input = grad_input.add(grad_var.view(channel_shape).mul(2).mul(centered).div(count));
      }
      g.input = grad_input.to(input.scalar_type());
    }
    return {g.input, grad_for(weight, g.weight), grad_for(bias, g.bias), Tensor(), Tensor(), Tensor(), g.residual};
  }
};

struct BatchNormEval : public torch::autograd::Function<BatchNormEval> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const std::optional<Tensor>& weight,
                               const std::optional<Tensor>& bias, const Tensor& running_mean,
                               const Tensor& running_var, double eps, int64_t activation, double activation_param,
                               const std::optional<Tensor>& residual) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor output = ops().eval.call(input, weight, bias, running_mean, running_var, eps, activation,
                                   activation_param, residual);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({input, weight.value_or(Tensor()), bias.value_or(Tensor()), running_mean, running_var,
                            residual.value_or(Tensor())});
    save_arguments(ctx, eps, activation, activation_param);
    return {output};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(9);  // the output was not used
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1], &bias = saved[2], &running_mean = saved[3],
                 &running_var = saved[4], &residual = saved[5];
    const InputGrads g =
        input_grads(ctx, grads[0], input, residual, weight, bias, running_mean, running_var, /*train=*/false);
    // (the running statistics are constants: no gradient, as in torch)
    return {g.input, grad_for(weight, g.weight), grad_for(bias, g.bias), Tensor(), Tensor(), Tensor(), Tensor(),
            Tensor(), g.residual};
  }
};

// Whether autograd must see the call, as in torch's generated kernels: grad mode on and an
// input that requires grad (compute_requires_grad). Dual tensors (forward AD) and functorch
// transforms also go to the Function, which refuses them with its own message; every
// other call (no_grad, inference, constants) runs the kernel without building a node
// (the node, its context and saved variables are most of a small layer's forward).
template <typename... Tensors>
bool needs_autograd(const Tensors&... tensors) {
  // a transform active now (what torch._C._are_functorch_transforms_active tests; functorch's
  // thread-local state itself stays allocated after the first transform)
  const auto included = c10::impl::tls_local_dispatch_key_set().included_;
  if (included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
      included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode)) {
    return true;
  }
  return torch::autograd::compute_requires_grad(tensors...) || (torch::autograd::isFwGradDefined(tensors) || ...);
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_train_autograd(const Tensor& input, const std::optional<Tensor>& weight,
                                                             const std::optional<Tensor>& bias, double eps,
                                                             int64_t activation, double activation_param,
                                                             const std::optional<Tensor>& residual) {
  // (an autograd Function cannot take an undefined tensor: the kernels' message first)
  check_defined(input, "input", "fastbn.batch_norm_train");
  if (!needs_autograd(input, weight, bias, residual)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ops().train.call(input, weight, bias, eps, activation, activation_param, residual);
  }
  variable_list outputs = BatchNormTrain::apply(input, weight, bias, eps, activation, activation_param, residual);
  return {std::move(outputs[0]), std::move(outputs[1]), std::move(outputs[2])};
}

Tensor batch_norm_eval_autograd(const Tensor& input, const std::optional<Tensor>& weight,
                                const std::optional<Tensor>& bias, const Tensor& running_mean,
                                const Tensor& running_var, double eps, int64_t activation, double activation_param,
                                const std::optional<Tensor>& residual) {
  constexpr const char* op = "fastbn.batch_norm_eval";
  check_defined(input, "input", op);
  check_defined(running_mean, "running_mean", op);
  check_defined(running_var, "running_var", op);
  // (the running statistics get no gradient, but a dual one still needs the Function's refusal)
  if (!needs_autograd(input, weight, bias, running_mean, running_var, residual)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ops().eval.call(input, weight, bias, running_mean, running_var, eps, activation, activation_param,
                           residual);
  }
  return BatchNormEval::apply(input, weight, bias, running_mean, running_var, eps, activation, activation_param,
                              residual)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbn, Autograd, m) {
  m.impl("batch_norm_train", &batch_norm_train_autograd);
  m.impl("batch_norm_eval", &batch_norm_eval_autograd);
}

}  // namespace fastbn
