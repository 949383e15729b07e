"""The training and eval ops as autograd.Functions with a jvp: the path taken while a
forward-AD level is open or a torch.func transform runs.

Plain calls (eager and torch.compile) use the ops' own autograd, written in C++
(csrc/autograd.cpp). A C++ autograd Function has no jvp and refuses to run under
torch.func, so here ``BatchNormTrainFunction`` / ``BatchNormEvalFunction`` (with
``setup_context``, as torch.func needs, a ``jvp`` and a generated vmap rule) call the
same kernels below autograd. The ``jvp`` is written in torch ops, so that transforms
nest (jacfwd, forward-over-reverse, hessian); for the same reason the backward switches
to the torch-op formula (``ops.composite_backward``) under a transform. Dynamo cannot
trace a custom ``jvp``, which is one reason compiled calls keep to the ops.
"""
import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import ops


def _centered(input: Tensor, mean: Tensor, var: Tensor, eps: float):
    """(x - mean, invstd) in mean's dtype (the accumulation dtype), invstd of per-channel shape."""
    shape = ops.channel_shape(input)
    return input.to(mean.dtype) - mean.view(shape), torch.rsqrt(var.view(shape) + eps)


def _affine_act_tangent(ctx, xhat: Tensor, xhat_tangent, weight_tangent, bias_tangent, residual_tangent,
                        input: Tensor, weight, bias, residual) -> Tensor:
    """Tangent of act(xhat * weight + bias [+ residual]) given xhat's tangent (None: zero)."""
    shape, acc = ops.channel_shape(input), xhat.dtype
    tangent = torch.zeros_like(xhat) if xhat_tangent is None else xhat_tangent
    if weight is not None:
        tangent = tangent * weight.to(acc).view(shape)
        if weight_tangent is not None:
            tangent = tangent + xhat * weight_tangent.to(acc).view(shape)
    if bias_tangent is not None:
        tangent = tangent + bias_tangent.to(acc).view(shape)
    if residual_tangent is not None:
        tangent = tangent + residual_tangent.to(acc)
    if ctx.activation:
        z = xhat if weight is None else xhat * weight.to(acc).view(shape)
        if bias is not None:
            z = z + bias.to(acc).view(shape)
        if residual is not None:
            z = z + residual.to(acc)
        tangent = tangent * ops.activation_grad(z, ctx.activation, ctx.activation_param)
    return tangent.to(input.dtype)


class BatchNormTrainFunction(torch.autograd.Function):
    """torch.ops.fastbn.batch_norm_train with a jvp: (output, batch mean, biased batch variance)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, eps, activation, activation_param, residual):
        with torch._C._AutoDispatchBelowAutograd():  # straight to the kernel: this Function is the autograd
            return torch.ops.fastbn.batch_norm_train.default(input, weight, bias, eps, activation, activation_param,
                                                             residual)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ops._train_setup_context(ctx, inputs, output)
        input, weight, bias, *_, residual = inputs
        _, mean, var = output
        ctx.save_for_forward(input, weight, bias, mean, var, residual)

    @staticmethod
    def backward(ctx, grad_output, grad_mean, grad_var):
        return ops._train_backward(ctx, grad_output, grad_mean, grad_var)

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t, eps_t, activation_t, activation_param_t, residual_t):
        input, weight, bias, mean, var, residual = ctx.saved_tensors
        dims = ops.reduce_dims(input)
        shape = ops.channel_shape(input)
        centered, invstd = _centered(input, mean, var, ctx.eps)
        xhat = centered * invstd
        if input_t is None:
            mean_t, var_t, xhat_t = torch.zeros_like(mean), torch.zeros_like(var), None
        else:
            x_t = input_t.to(mean.dtype)
            mean_t = x_t.mean(dims)
            # var = mean((x - mean)^2): its tangent is 2 mean((x - mean) x_t), as mean(x - mean) = 0
            var_t = 2 * (centered * x_t).mean(dims)
            # xhat = (x - mean) invstd, invstd = (var + eps)^-1/2
            xhat_t = (x_t - mean_t.view(shape)) * invstd - 0.5 * xhat * (var_t.view(shape) * invstd * invstd)
        output_t = _affine_act_tangent(ctx, xhat, xhat_t, weight_t, bias_t, residual_t, input, weight, bias,
                                       residual)
        return output_t, mean_t, var_t


class BatchNormEvalFunction(torch.autograd.Function):
    """torch.ops.fastbn.batch_norm_eval with a jvp (running statistics: constants)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, eps, activation, activation_param, residual):
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.fastbn.batch_norm_eval.default(input, weight, bias, running_mean, running_var, eps,
                                                            activation, activation_param, residual)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ops._eval_setup_context(ctx, inputs, output)
        ctx.set_materialize_grads(False)  # inputs without a tangent reach jvp as None
        input, weight, bias, running_mean, running_var, *_, residual = inputs
        ctx.save_for_forward(input, weight, bias, running_mean, running_var, residual)

    @staticmethod
    def backward(ctx, grad_output):
        return ops._eval_backward(ctx, grad_output)

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t, running_mean_t, running_var_t, eps_t, activation_t, activation_param_t,
            residual_t):
        if running_mean_t is not None or running_var_t is not None:
            if all(t is None for t in (input_t, weight_t, bias_t, residual_t)):
                # as torch, no error when only the running statistics have a tangent: a zero tangent
                return torch.zeros_like(ctx.saved_tensors[0])
            # torch's message
            raise RuntimeError("batch_norm is not differentiable wrt running_mean and running_var, they cannot have "
                               "forward grad defined")
        input, weight, bias, running_mean, running_var, residual = ctx.saved_tensors
        acc = ops.accumulate_dtype(input.dtype)
        centered, invstd = _centered(input, running_mean.to(acc), running_var.to(acc), ctx.eps)
        xhat = centered * invstd
        xhat_t = None if input_t is None else input_t.to(acc) * invstd
        return _affine_act_tangent(ctx, xhat, xhat_t, weight_t, bias_t, residual_t, input, weight, bias, residual)


# ---------------------------------------------------------------- vmap
# Batching rules for the two ops (torch.func.vmap; without them torch loops over the samples
# and warns). Each of the B vmapped problems normalizes its own channels, so the B problems
# are one batch norm over B * C channels: input (B, N, C, ...) becomes (N, B * C, ...), and
# per-channel tensors (B, C) become (B * C,) (an unbatched one is repeated B times).


def _batched(value, in_dim, batch_size: int):
    """value with its vmapped dim first (expanded to batch_size when it has none)."""
    if value is None:
        return None
    if in_dim is None:
        return value.unsqueeze(0).expand(batch_size, *value.shape)
    return value.movedim(in_dim, 0)


def _fold_input(value, in_dim, batch_size: int):
    """(B, N, C, *rest) -> (N, B * C, *rest)."""
    if value is None:
        return None
    batched = _batched(value, in_dim, batch_size).movedim(0, 1)
    return batched.reshape(batched.shape[0], -1, *batched.shape[3:])


def _fold_channels(value, in_dim, batch_size: int):
    """(B, C) -> (B * C,)."""
    return None if value is None else _batched(value, in_dim, batch_size).reshape(-1)


def _unfold_output(output: Tensor, batch_size: int) -> Tensor:
    """(N, B * C, *rest) -> (B, N, C, *rest)."""
    return output.reshape(output.shape[0], batch_size, -1, *output.shape[2:]).movedim(1, 0)


def _dim(in_dims, index: int):
    """in_dims[index]; the dispatcher leaves out trailing arguments equal to their defaults."""
    return in_dims[index] if index < len(in_dims) else None


def _train_vmap(info, in_dims, input, weight, bias, eps, activation=0, activation_param=0.0, residual=None):
    B = info.batch_size
    output, mean, var = torch.ops.fastbn.batch_norm_train.default(
        _fold_input(input, in_dims[0], B), _fold_channels(weight, in_dims[1], B), _fold_channels(bias, in_dims[2], B),
        eps, activation, activation_param, _fold_input(residual, _dim(in_dims, 6), B))
    return (_unfold_output(output, B), mean.view(B, -1), var.view(B, -1)), (0, 0, 0)


def _eval_vmap(info, in_dims, input, weight, bias, running_mean, running_var, eps, activation=0, activation_param=0.0,
               residual=None):
    B = info.batch_size
    output = torch.ops.fastbn.batch_norm_eval.default(
        _fold_input(input, in_dims[0], B), _fold_channels(weight, in_dims[1], B), _fold_channels(bias, in_dims[2], B),
        _fold_channels(running_mean, in_dims[3], B), _fold_channels(running_var, in_dims[4], B), eps, activation,
        activation_param, _fold_input(residual, _dim(in_dims, 8), B))
    return _unfold_output(output, B), 0


if hasattr(torch.library, "register_vmap"):  # torch >= 2.4; older ones loop over the samples
    torch.library.register_vmap("fastbn::batch_norm_train", _train_vmap)
    torch.library.register_vmap("fastbn::batch_norm_eval", _eval_vmap)
