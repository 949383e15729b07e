"""In-place activated batch norm (the memory-saving idea of InPlace-ABN).

``y = act(bn(x))`` is written over ``x``, and backward needs only ``y``: the
pre-activation ``z = act^-1(y)``, the centered input ``x - mean = (z - bias) / (weight * invstd)``
and ``act'(z)`` (read from ``y``) are recomputed from it. A BN + activation pair
then keeps one activation-sized tensor alive for backward (``y``, which the
next layer keeps anyway) instead of two (``x`` for BN and ``y`` for the next layer).

Limits, checked where they can be:
- the activation must be invertible: none, leaky_relu with a positive slope,
  elu with a positive alpha (not relu or silu);
- a channel with weight 0 maps every value to the bias, so its inputs cannot be
  recovered: rejected when gradients are needed;
- recovery costs precision where the map is steep to invert: a weight close to 0
  amplifies the output's rounding by 1/|weight|, and elu's saturated tail keeps
  few digits of z: once y rounds to -alpha (z below about -17 in float32, -7 in
  bfloat16), z is replaced by that bound. Such values have zero gradient through
  the activation, so grad_weight, grad_bias and eval-mode grad_input stay
  exact; training-mode grad_input of those values uses the bound.
- in float16/bfloat16 the stored output is rounded to the dtype, so the
  recovered input is only as precise as the output (tests allow for exactly
  that); float32/float64 meet the same error budget as the out-of-place path.
  Negative weights are fine.
- no double backward (the backward is not itself differentiable).
"""
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import interop, ops

INVERTIBLE = "none, 'leaky_relu' with a positive slope or 'elu' with a positive alpha"


def check_invertible(activation: int, activation_param: float) -> None:
    """Raise ValueError unless in-place activated BN can undo this activation."""
    # the kernels divide by the parameter in float32: it must stay positive there
    if activation == ops.Activation.IDENTITY or (activation in ops.PARAMETRIZED_ACTIVATIONS
                                                 and activation_param >= 1.1754943508222875e-38):
        return
    name = ops.ACTIVATION_NAMES[activation]
    if activation == ops.Activation.RELU:
        why = "relu is not invertible (it maps every negative value to 0); use 'leaky_relu' with a small slope"
    elif activation == ops.Activation.SILU:
        why = "silu is not invertible (not monotonic)"
    else:
        why = f"{name} with parameter {activation_param} is not invertible"
    raise ValueError(f"fastbn: inplace=True needs an invertible activation ({INVERTIBLE}): {why}")


class InPlaceBatchNormAct(torch.autograd.Function):
    """act(batch_norm(input)) written over ``input``; backward from the output alone."""

    @staticmethod
    def forward(ctx, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool, momentum: float,
                eps: float, activation: int, activation_param: float) -> Tensor:
        if training:
            mean, var = torch.ops.fastbn.batch_norm_train_(input, weight, bias, eps, activation, activation_param)
            if running_mean is not None:
                ops.update_running_stats(running_mean, running_var, mean, var, momentum,
                                         input.numel() // input.shape[1])
        else:
            torch.ops.fastbn.batch_norm_eval_(input, weight, bias, running_mean, running_var, eps, activation,
                                              activation_param)
            var = running_var
        ctx.mark_dirty(input)
        ctx.save_for_backward(input, weight, bias, var)
        ctx.training, ctx.eps, ctx.activation, ctx.activation_param = training, eps, activation, activation_param
        return input

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        output, weight, bias, var = ctx.saved_tensors
        grad, centered = torch.ops.fastbn.batch_norm_invert_output(grad_output, output, weight, bias, var, ctx.eps,
                                                                   ctx.activation, ctx.activation_param)
        # The rest is batch norm's backward (no activation) on the centered input, in the
        # accumulation dtype the recovered values come in.
        acc = grad.dtype
        weight_acc = None if weight is None else weight.to(acc)
        zero_mean = torch.zeros(var.shape, dtype=acc, device=var.device)
        grad_input, grad_weight, grad_bias = torch.ops.fastbn.batch_norm_backward(
            grad, centered, weight_acc, None, zero_mean, var.to(acc), ctx.eps, ctx.training, 0, 0.0)
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        return (grad_input.to(output.dtype) if needs_input else None,
                grad_weight.to(weight.dtype) if needs_weight else None,
                grad_bias.to(bias.dtype) if needs_bias else None,
                None, None, None, None, None, None, None)


_OVERLAP_MESSAGE = ("unsupported operation: more than one element of the written-to tensor refers to a single memory "
                    "location. Please clone() the tensor before performing the operation.")
_NO_GRAD_VIEW_MESSAGE = (
    "A view was created in no_grad mode and is being modified inplace with grad mode enabled. Given that this use "
    "case is ambiguous and error-prone, it is forbidden. You can clarify your code by moving both the view and the "
    "inplace either both inside the no_grad block (if you don't want the inplace to be tracked) or both outside (if "
    "you want the inplace to be tracked).")


def check_writable(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> None:
    """Raise, with torch's own error, where torch would refuse the in-place write over ``input``.

    Autograd checks a custom Function's in-place output only after its forward ran, when
    the input and running statistics would already be overwritten; these are its checks
    (torch's check_inplace), made first."""
    compiling = torch.compiler.is_compiling()  # dynamo cannot trace the overlap and view probes: autograd's own check
    if not compiling and torch._debug_has_internal_overlap(input) == 1:  # MemOverlap::Yes: an expanded tensor
        raise RuntimeError(_OVERLAP_MESSAGE)
    records = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias))
    if not records:
        return
    if not compiling and input._is_view():
        creation = torch._C._autograd._get_creation_meta(input)
        if creation == torch._C._autograd.CreationMeta.NO_GRAD_MODE:
            raise RuntimeError(_NO_GRAD_VIEW_MESSAGE)
        if creation != torch._C._autograd.CreationMeta.DEFAULT:
            raise RuntimeError(f"fastbn: inplace=True cannot write over this view of a tensor ({creation.name}: "
                               "autograd forbids modifying it in place); clone it or use inplace=False")
        if input.requires_grad and input._base.is_leaf:
            raise RuntimeError("a view of a leaf Variable that requires grad is being used in an in-place operation.")
    elif input.requires_grad and input.is_leaf:
        raise RuntimeError("a leaf Variable that requires grad is being used in an in-place operation.")


def check_inplace_call(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> None:
    """Everything an in-place call checks beyond batch norm's arguments: check_writable, check_recoverable."""
    check_writable(input, weight, bias)
    check_recoverable(input, weight, bias)


def check_recoverable(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> None:
    """Raise ValueError when backward will be needed and a channel's weight is 0
    (its input cannot be recovered from the output). Reads the weight (a device sync on CUDA)."""
    if interop.onnx_exporting():  # the exported graph computes out of place (interop.batch_norm_torch_ops)
        return
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias))
    if needs_grad and weight is not None and bool((weight == 0).any()):
        channels = torch.nonzero(weight == 0).flatten().tolist()
        raise ValueError(f"fastbn: inplace=True cannot recover the input of channels whose weight is 0 "
                         f"(channels {channels[:8]}{'...' if len(channels) > 8 else ''}) for backward; "
                         "use inplace=False")


def batch_norm_act_inplace(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                           weight: Optional[Tensor], bias: Optional[Tensor], training: bool, momentum: float,
                           eps: float, activation: int, activation_param: float) -> Tensor:
    """In-place activated BN after the arguments (check_invertible, check_inplace_call too)
    have been checked; returns ``input``, overwritten."""
    return InPlaceBatchNormAct.apply(input, weight, bias, running_mean, running_var, training, momentum, eps,
                                     activation, activation_param)
