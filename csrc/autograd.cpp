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
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "autograd.h"
#include "bn_checks.h"
#include "op_handles.h"

namespace fastbn {

namespace {
thread_local bool plain_autograd_nodes = false;
}  // namespace

PlainAutogradNodes::PlainAutogradNodes(bool enabled) : previous_(plain_autograd_nodes) {
  plain_autograd_nodes = enabled;
}
PlainAutogradNodes::~PlainAutogradNodes() { plain_autograd_nodes = previous_; }
bool PlainAutogradNodes::enabled() { return plain_autograd_nodes; }

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
// The arguments of a forward call that its backward needs besides the saved tensors.
struct Arguments {
  double eps;
  int64_t activation;
  double activation_param;
};

// `wanted`: which of (input, weight, bias) need a gradient (the node's edges in this
// backward): the fused op then skips the passes only the others need, as torch's
// batch-norm backward does with its output mask; an unwanted gradient comes back
// undefined. (The composite and the residual-with-activation ops compute them all.)
InputGrads input_grads(const Arguments& args, const Tensor& grad_output, const Tensor& input, const Tensor& residual,
                       const Tensor& weight, const Tensor& bias, const Tensor& mean, const Tensor& var, bool train,
                       OutputMask wanted) {
  const double eps = args.eps, activation_param = args.activation_param;
  const int64_t activation = args.activation;
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
        ops().backward.call(grad_output, input, w, b, mean, var, eps, train, activation, activation_param, wanted);
    const auto if_wanted = [&](const Tensor& grad, int64_t i) { return wanted[i] ? grad : Tensor(); };
    return {if_wanted(grad_input, 0), if_wanted(grad_weight, 1), if_wanted(grad_bias, 2),
            residual.defined() ? grad_output : Tensor()};
  }
  const auto [grad_input, grad_residual, grad_weight, grad_bias] = ops().add_act_backward.call(
      grad_output, input, residual, w, b, mean, var, eps, train, activation, activation_param);
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

// A parameter's gradient in the parameter's dtype (the kernels give the accumulation dtype);
// undefined for an absent parameter or a gradient not wanted.
Tensor grad_for(const Tensor& parameter, const Tensor& grad) {
  if (!parameter.defined() || !grad.defined()) return Tensor();
  return grad.scalar_type() == parameter.scalar_type() ? grad : grad.to(parameter.scalar_type());
}

void save_arguments(AutogradContext* ctx, double eps, int64_t activation, double activation_param) {
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["activation"] = activation;
  ctx->saved_data["activation_param"] = activation_param;
}

Arguments saved_arguments(AutogradContext* ctx) {
  return {ctx->saved_data["eps"].toDouble(), ctx->saved_data["activation"].toInt(),
          ctx->saved_data["activation_param"].toDouble()};
}

// Which of (input, weight, bias) need a gradient in this backward; the plain nodes below
// ask their edges the same. A Function has edges only for the tensors it was given (an
// absent weight or bias has none), in argument order.
OutputMask wanted_grads(AutogradContext* ctx, const Tensor& weight, const Tensor& bias) {
  size_t edge = 0;
  const bool input = ctx->needs_input_grad(edge++);
  const bool for_weight = weight.defined() && ctx->needs_input_grad(edge++);
  const bool for_bias = bias.defined() && ctx->needs_input_grad(edge++);
  return {input, for_weight, for_bias};
}

// batch_norm_train's backward: gradients for (input, weight, bias, residual) from the
// gradients of (output, mean, var), any of them undefined where unused.
variable_list train_backward(const Arguments& args, const variable_list& grads, const Tensor& input,
                             const Tensor& weight, const Tensor& bias, const Tensor& mean, const Tensor& var,
                             const Tensor& residual, OutputMask wanted) {
  const Tensor grad_output = grads[0].defined() ? grads[0] : at::zeros_like(input);
  InputGrads g = input_grads(args, grad_output, input, residual, weight, bias, mean, var, /*train=*/true, wanted);
  const Tensor &grad_mean = grads[1], &grad_var = grads[2];
  if (g.input.defined() && (grad_mean.defined() || grad_var.defined())) {
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
  return {g.input, grad_for(weight, g.weight), grad_for(bias, g.bias), g.residual};
}

// batch_norm_eval's backward: gradients for (input, weight, bias, residual); the running
// statistics are constants (no gradient, as in torch).
variable_list eval_backward(const Arguments& args, const Tensor& grad_output, const Tensor& input,
                            const Tensor& weight, const Tensor& bias, const Tensor& running_mean,
                            const Tensor& running_var, const Tensor& residual, OutputMask wanted) {
  const InputGrads g = input_grads(args, grad_output, input, residual, weight, bias, running_mean, running_var,
                                   /*train=*/false, wanted);
  return {g.input, grad_for(weight, g.weight), grad_for(bias, g.bias), g.residual};
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
    variable_list g = train_backward(saved_arguments(ctx), grads, saved[0], saved[1], saved[2], saved[3], saved[4],
                                     saved[5], wanted_grads(ctx, saved[1], saved[2]));
    // (input, weight, bias, eps, activation, activation_param, residual)
    return {g[0], g[1], g[2], Tensor(), Tensor(), Tensor(), g[3]};
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
    variable_list g = eval_backward(saved_arguments(ctx), grads[0], saved[0], saved[1], saved[2], saved[3], saved[4],
                                    saved[5], wanted_grads(ctx, saved[1], saved[2]));
    // (input, weight, bias, running_mean, running_var, eps, activation, activation_param, residual)
    return {g[0], g[1], g[2], Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), g[3]};
  }
};

// ---------------------------------------------------------------- eager calls: plain Nodes
// A torch::autograd::Function (above) carries a context built for any user function: a
// hash map of saved values, a vector of saved variables, input and output descriptions
// (about 30 heap allocations a call). torch's own ops use a Node with its saved
// variables as members; so do these, where PlainAutogradNodes (autograd.h) allows.
// (2, 4, 3, 3) BatchNorm2d forward+backward, 1 thread: 66.5 -> 55.3 us (torch 55.5).

// torch 2.12+ holds nodes in c10::intrusive_ptr, earlier versions in std::shared_ptr;
// the helpers below take whichever this torch's Node is built for.
template <typename NodeType>
auto make_node() {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, NodeType>) {
    return c10::make_intrusive<NodeType>();
  } else {
    // torch's deleter, which frees long chains of nodes without deep recursion (an
    // unqualified call on a dependent argument: found by ADL, in the versions that have it)
    return std::shared_ptr<NodeType>(new NodeType(), [](NodeType* node) { deleteNode(node); });
  }
}

// torch.autograd.graph.node_creation_hook (torch 2.14+) sees each node once it is complete,
// as torch's own attachment sites call it.
template <typename NodePointer>
void node_created(const NodePointer& node) {
#if __has_include(<torch/csrc/autograd/node_creation_hook.h>)
  torch::autograd::fire_node_creation_hooks(node);
#else
  (void)node;
#endif
}

template <typename NodeType>
auto pointer_to(NodeType* node) {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, NodeType>) {
    return node->getptr();
  } else {
    return node->shared_from_this();
  }
}

// What both nodes save. mean, var: the batch statistics (outputs of the training node) or the
// running statistics (inputs of the eval node).
struct BatchNormNode : public torch::autograd::Node {
  torch::autograd::SavedVariable input, weight, bias, residual, mean, var;
  Arguments args{};

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (torch::autograd::SavedVariable* saved : {&input, &weight, &bias, &residual, &mean, &var}) saved->reset_data();
  }

  // Which of the next edges (input, weight, bias) need a gradient in this backward.
  OutputMask wanted_grads() const {
    return {task_should_compute_output(0), task_should_compute_output(1), task_should_compute_output(2)};
  }
};

struct BatchNormTrainBackward : public BatchNormNode {
  std::string name() const override { return "fastbn::BatchNormTrainBackward"; }
  // grads: of (output, mean, var); returns those of the next edges (input, weight, bias, residual)
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto self = pointer_to(this);  // mean and var are this node's outputs
    return train_backward(args, grads, input.unpack(), weight.unpack(), bias.unpack(), mean.unpack(self),
                          var.unpack(self), residual.unpack(), wanted_grads());
  }
};

struct BatchNormEvalBackward : public BatchNormNode {
  std::string name() const override { return "fastbn::BatchNormEvalBackward"; }
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!grads[0].defined()) return variable_list(4);  // the output was not used
    return eval_backward(args, grads[0], input.unpack(), weight.unpack(), bias.unpack(), mean.unpack(), var.unpack(),
                         residual.unpack(), wanted_grads());
  }
};

// Dual tensors (forward AD) or a functorch transform active now (what
// torch._C._are_functorch_transforms_active tests; functorch's thread-local state itself
// stays allocated after the first transform).
template <typename... Tensors>
bool transforms_or_dual(const Tensors&... tensors) {
  const auto included = c10::impl::tls_local_dispatch_key_set().included_;
  if (included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
      included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode)) {
    return true;
  }
  return (torch::autograd::isFwGradDefined(tensors) || ...);
}

enum class Autograd { None, Function, PlainNode };

// What a call's autograd is. As in torch's generated kernels, autograd sees a call only with
// grad mode on and an input that requires grad (compute_requires_grad): every other call
// (no_grad, inference, constants) runs the kernel without building a node (the node, its
// context and saved variables are most of a small layer's forward). Dual tensors and
// functorch transforms go to the Function, which refuses them with its own message; so does
// every call where PlainAutogradNodes (autograd.h) does not allow a plain Node.
template <typename... Tensors>
Autograd autograd_for(const Tensors&... tensors) {
  if (transforms_or_dual(tensors...)) return Autograd::Function;
  if (!torch::autograd::compute_requires_grad(tensors...)) return Autograd::None;
  return PlainAutogradNodes::enabled() ? Autograd::PlainNode : Autograd::Function;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_train_autograd(const Tensor& input, const std::optional<Tensor>& weight,
                                                             const std::optional<Tensor>& bias, double eps,
                                                             int64_t activation, double activation_param,
                                                             const std::optional<Tensor>& residual) {
  // (an autograd Function cannot take an undefined tensor: the kernels' message first)
  check_defined(input, "input", "fastbn.batch_norm_train");
  const Autograd autograd = autograd_for(input, weight, bias, residual);
  if (autograd == Autograd::None) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ops().train.call(input, weight, bias, eps, activation, activation_param, residual);
  }
  if (autograd == Autograd::Function) {
    variable_list outputs = BatchNormTrain::apply(input, weight, bias, eps, activation, activation_param, residual);
    return {std::move(outputs[0]), std::move(outputs[1]), std::move(outputs[2])};
  }
  Tensor output, mean, var;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(output, mean, var) = ops().train.call(input, weight, bias, eps, activation, activation_param, residual);
  }
  auto node = make_node<BatchNormTrainBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias, residual));
  // Saved in the Function's order (input, weight, bias, mean, var, residual): saved-tensor hooks
  // (checkpointing) see the same sequence whichever node a call builds.
  node->input = torch::autograd::SavedVariable(input, false);
  node->weight = torch::autograd::SavedVariable(weight, false);
  node->bias = torch::autograd::SavedVariable(bias, false);
  node->args = {eps, activation, activation_param};
  torch::autograd::set_history({output, mean, var}, node);
  node->mean = torch::autograd::SavedVariable(mean, true);
  node->var = torch::autograd::SavedVariable(var, true);
  node->residual = torch::autograd::SavedVariable(residual, false);
  node_created(node);
  return {std::move(output), std::move(mean), std::move(var)};
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
  const Autograd autograd = autograd_for(input, weight, bias, running_mean, running_var, residual);
  if (autograd == Autograd::None) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ops().eval.call(input, weight, bias, running_mean, running_var, eps, activation, activation_param,
                           residual);
  }
  if (autograd == Autograd::Function) {
    return BatchNormEval::apply(input, weight, bias, running_mean, running_var, eps, activation, activation_param,
                                residual)[0];
  }
  Tensor output;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    output = ops().eval.call(input, weight, bias, running_mean, running_var, eps, activation, activation_param,
                             residual);
  }
  auto node = make_node<BatchNormEvalBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias, residual));
  node->input = torch::autograd::SavedVariable(input, false);
  node->weight = torch::autograd::SavedVariable(weight, false);
  node->bias = torch::autograd::SavedVariable(bias, false);
  node->mean = torch::autograd::SavedVariable(running_mean, false);
  node->var = torch::autograd::SavedVariable(running_var, false);
  node->residual = torch::autograd::SavedVariable(residual, false);
  node->args = {eps, activation, activation_param};
  torch::autograd::set_history(output, node);
  node_created(node);
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbn, Autograd, m) {
  m.impl("batch_norm_train", &batch_norm_train_autograd);
  m.impl("batch_norm_eval", &batch_norm_eval_autograd);
}

}  // namespace fastbn
