"""``fastbn.functional.batch_norm``: torch.nn.functional.batch_norm on fastbn's kernels.

Every argument is checked before anything is computed or updated, so a rejected
call leaves the running statistics as they were.
"""
import math
from typing import Optional

import torch
from torch import Tensor

from . import inplace as _inplace
from . import _C, functions, interop, ops

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_channel_vector(input: Tensor, vec: Optional[Tensor], name: str, channels: int) -> None:
    """torch's size rule: one value per channel, counted by numel (a weight of shape (1, C) is fine)."""
    if vec is not None and vec.numel() != channels:
        raise RuntimeError(f"{name} should contain {channels} elements not {vec.numel()}")


def _check_vector_device(input: Tensor, vec: Optional[Tensor], name: str) -> None:
    if vec is not None and vec.device != input.device:
        raise RuntimeError(f"fastbn.batch_norm: {name} is on {vec.device} but input is on {input.device}")


def _check_parameter_dtypes(input: Tensor, vectors: dict) -> None:
    """torch's CPU rule: weight, bias, running_mean and running_var (those given) share one
    dtype, the input's or, for a float16/bfloat16 input, float32."""
    given = [(name, vec) for name, vec in vectors.items() if vec is not None]
    reduced = input.dtype in (torch.float16, torch.bfloat16)
    for name, vec in given:
        if vec.dtype != input.dtype and not (reduced and vec.dtype == torch.float32):
            expected = f"{input.dtype} or torch.float32" if reduced else f"{input.dtype}"
            raise RuntimeError(f"fastbn.batch_norm: {name} has dtype {vec.dtype} but input has dtype {input.dtype}; "
                               f"expected {expected}")
        first_name, first = given[0]
        if vec.dtype != first.dtype:
            raise RuntimeError(f"fastbn.batch_norm: {name} has dtype {vec.dtype} but {first_name} has dtype "
                               f"{first.dtype}; weight, bias, running_mean and running_var must share one dtype")


def _unwrapped(t: Tensor) -> Tensor:
    """The plain tensor inside torch.func's wrappers (grad, vmap levels), whose storage can be read."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def _may_share_memory(a: Tensor, b: Tensor) -> bool:
    """Whether two 1-D tensors have a byte of memory in common (update_running_stats's check).
    Under torch.compile (which cannot trace storages) only the same tensor twice."""
    if torch.compiler.is_compiling():
        return a is b
    a, b = _unwrapped(a), _unwrapped(b)
    # the same storage object (its address, not its data pointer: meta and fake tensors have none)
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage()._cdata != b.untyped_storage()._cdata:
        return False

    def byte_set(t):
        start, size = t.storage_offset() * t.element_size(), t.element_size()
        return {start + i * t.stride(0) * size + k for i in range(t.numel()) for k in range(size)}

    return not byte_set(a).isdisjoint(byte_set(b))


def _check_argument_types(input: Tensor, vectors: dict, training, momentum, eps) -> None:
    """What torch's argument parser refuses (TypeError): tensors that are neither a Tensor nor
    None, a `training` that is not a bool, a `momentum` or `eps` that is not a number."""
    for name, vec in vectors.items():
        if vec is not None and not isinstance(vec, Tensor):
            raise TypeError(f"fastbn.batch_norm: argument '{name}' must be a Tensor or None, not {type(vec).__name__}")
    if not isinstance(training, bool):
        raise TypeError(f"fastbn.batch_norm: argument 'training' must be bool, not {type(training).__name__}")
    for name, value in (("momentum", momentum), ("eps", eps)):  # torch's parser also takes a one-value tensor
        if not isinstance(value, (int, float)) and not (isinstance(value, Tensor) and value.numel() == 1):
            raise TypeError(f"fastbn.batch_norm: argument '{name}' must be float, not {type(value).__name__}")


_REDUCED_DTYPES = (torch.float16, torch.bfloat16)


def _passes_every_check(input, running_mean, running_var, weight, bias, training, eps, momentum) -> bool:
    """True for a call that check_batch_norm_args would pass, tested in one quick pass for the
    common call: plain eager mode, float eps and momentum, per-channel vectors of shape (C,)
    in one allowed dtype on input's device. False means "not sure": the full checks then run.
    (On a small layer the full checks cost as much as the kernel.)"""
    if not (type(training) is bool and type(eps) is float and type(momentum) is float and isinstance(input, Tensor)):
        return False
    shape = input.shape
    if len(shape) < 2 or ops.transforms_active() or torch.compiler.is_compiling():
        return False
    channels, count = shape[1], input.numel()
    if count == 0 or not (eps > 0.0 if training else eps >= 0.0) or (training and count == channels):
        return False
    dtype, device = input.dtype, input.device
    if dtype not in _FLOAT_DTYPES:
        return False
    if running_mean is None or running_var is None:
        if running_mean is not running_var or not training:
            return False
    elif running_mean.requires_grad or running_var.requires_grad or (
            training and running_mean.untyped_storage()._cdata == running_var.untyped_storage()._cdata):
        return False
    vector_dtype = None
    for vec in (running_mean, running_var, weight, bias):
        if vec is None:
            continue
        if not isinstance(vec, Tensor) or vec.dim() != 1 or vec.shape[0] != channels or vec.device != device:
            return False
        if vector_dtype is None:
            vector_dtype = vec.dtype
            if vector_dtype != dtype and not (vector_dtype == torch.float32 and dtype in _REDUCED_DTYPES):
                return False
        elif vec.dtype != vector_dtype:
            return False
    return True


def check_batch_norm_args(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                          weight: Optional[Tensor], bias: Optional[Tensor], training: bool, eps: float,
                          momentum: float = 0.1) -> None:
    """Raise what torch's F.batch_norm raises, in torch's order (the first problem torch reports is
    the one reported here), with its exception type and a message naming the problem.

    torch's order: F.batch_norm's Python checks (batch size, eps; `training` taken by its truth
    value), its argument parser (types), an empty input returned early (no more checks: then
    batch_norm_unchecked computes torch's result), per-channel sizes, then the kernel's checks."""
    if _passes_every_check(input, running_mean, running_var, weight, bias, training, eps, momentum):
        return
    if not isinstance(input, Tensor):
        raise TypeError(f"fastbn.batch_norm: input must be a Tensor, got {type(input).__name__}")
    if training:
        if input.dim() == 0:
            raise IndexError("fastbn.batch_norm: expected input of shape (N, C, *), got a 0-D tensor")
        values_per_channel = input.shape[0] * math.prod(input.shape[2:])  # torch's count, also for C = 0
        if values_per_channel == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
    # torch's comparisons: a NaN eps passes (batch_norm_unchecked gives torch's NaN result)
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    vectors = {"running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias}
    _check_argument_types(input, vectors, training, momentum, eps)
    if input.numel() == 0:
        return
    channels = input.shape[1] if input.dim() > 1 else 0  # torch counts 0 channels for a 0-D or 1-D input
    for name, vec in vectors.items():
        if vec is None and name.startswith("running") and not training:
            raise RuntimeError(f"{name} must be defined in evaluation mode")
        _check_channel_vector(input, vec, name, channels)
    if input.dim() < 2:
        raise IndexError(f"fastbn.batch_norm: expected input of shape (N, C, *) with at least 2 dims, got "
                         f"{input.dim()}-D input of size {tuple(input.shape)} (dim 1, the channel dim, is out of range)")
    if torch.is_grad_enabled():
        for name in ("running_mean", "running_var"):
            if vectors[name] is not None and vectors[name].requires_grad:
                raise RuntimeError(f"fastbn.batch_norm is not differentiable with respect to argument '{name}'. "
                                   "This input cannot have requires_grad True.")
    for name, vec in vectors.items():
        _check_vector_device(input, vec, name)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if input.dtype not in _FLOAT_DTYPES:
        raise NotImplementedError(f"fastbn.batch_norm: not implemented for {input.dtype} (float32, float64, "
                                  "float16 and bfloat16 are)")
    for name in ("running_mean", "running_var"):
        if vectors[name] is not None and vectors[name].dim() != 1:  # updated in place: no reshaping them
            raise RuntimeError(f"fastbn.batch_norm: {name} must be 1-D with one value per channel, got size "
                               f"{tuple(vectors[name].shape)}")
    _check_parameter_dtypes(input, dict(weight=weight, bias=bias, running_mean=running_mean, running_var=running_var))
    if training and running_mean is not None and _may_share_memory(running_mean, running_var):
        # torch would update the one buffer twice, in an order of its kernels' choosing
        raise ValueError("fastbn.batch_norm: running_mean and running_var share memory; pass separate buffers")


def check_residual(input: Tensor, residual: Optional[Tensor]) -> None:
    """The residual of batch_norm_add_act: a tensor of input's size, dtype and device."""
    if residual is None:
        return
    if not isinstance(residual, Tensor):
        raise TypeError(f"fastbn.batch_norm_add_act: residual must be a Tensor, got {type(residual).__name__}")
    if residual.shape != input.shape:
        raise RuntimeError(f"fastbn.batch_norm_add_act: residual has size {tuple(residual.shape)} but input has size "
                           f"{tuple(input.shape)}; they are added value by value")
    if residual.dtype != input.dtype:
        raise RuntimeError(f"fastbn.batch_norm_add_act: residual has dtype {residual.dtype} but input has dtype "
                           f"{input.dtype}")
    if residual.device != input.device:
        raise RuntimeError(f"fastbn.batch_norm_add_act: residual is on {residual.device} but input is on "
                           f"{input.device}")


def batch_norm_unchecked(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                         weight: Optional[Tensor], bias: Optional[Tensor], training: bool, momentum: float,
                         eps: float, activation: int = 0, activation_param: float = 0.0,
                         residual: Optional[Tensor] = None, inplace: bool = False) -> Tensor:
    """act(batch_norm(...) [+ residual]) after the arguments have been checked.

    inplace: in-place activated BN (fastbn.inplace), written over input; no residual.
    """
    if interop.onnx_exporting():  # standard ops, which the ONNX exporters translate
        return interop.batch_norm_torch_ops(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                            activation, activation_param, residual)
    eps, momentum = float(eps), float(momentum)  # (checked: numbers or one-value tensors)
    fastbn_kernels = not input.is_cuda or ops.use_cuda_kernels()
    if input.numel() == 0:
        # An empty batch (N = 0 or C = 0): torch's result, computed as torch does it (no
        # per-channel shapes or dtypes checked, running statistics kept, grads of zero for
        # weight and bias); with inplace=True written over the input all the same.
        output = input.clone()
        if weight is not None:
            output = output * weight[0]
        if bias is not None:
            output = output + bias[0]
        if residual is not None:
            output = output + residual
        output = ops.activation_forward(output, activation, activation_param)
        return input.copy_(output) if inplace else output
    # torch takes any weight and bias with one value per channel, e.g. of shape (1, C)
    weight = weight if weight is None or weight.dim() == 1 else weight.reshape(-1)
    bias = bias if bias is None or bias.dim() == 1 else bias.reshape(-1)
    if not fastbn_kernels or math.isnan(eps):
        # torch's own kernels while fastbn's CUDA kernels are not validated on a GPU, and for
        # a NaN eps, which the kernels refuse and torch takes (out of place even for inplace=True).
        return interop.batch_norm_torch_ops(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                            activation, activation_param, residual)
    if inplace:
        if ops.transforms_active():
            raise NotImplementedError("fastbn: in-place activated BN (inplace=True) has no forward-mode AD and does not "
                                      "run under torch.func transforms; use inplace=False")
        return _inplace.batch_norm_act_inplace(input, running_mean, running_var, weight, bias, training, momentum,
                                               eps, activation, activation_param)
    transforming = ops.transforms_active()
    if not transforming and not torch.compiler.is_compiling():
        # eager: the op (with its C++ autograd) and the running-statistics update in one C++ call (csrc/eager.cpp)
        if not training:
            return _C._eval_forward(input, weight, bias, running_mean, running_var, eps, activation, activation_param,
                                    residual)
        return _C._train_forward(input, weight, bias, running_mean, running_var, momentum, eps, activation,
                                 activation_param, residual)
    # compiled: the ops, which torch.compile traces; under forward AD / torch.func, the Functions with a jvp
    if transforming:
        train_op, eval_op = functions.BatchNormTrainFunction.apply, functions.BatchNormEvalFunction.apply
    else:
        train_op, eval_op = ops.batch_norm_train, ops.batch_norm_eval
    if not training:
        return eval_op(input, weight, bias, running_mean, running_var, eps, activation, activation_param, residual)
    output, mean, var = train_op(input, weight, bias, eps, activation, activation_param, residual)
    if running_mean is not None:
        count = input.numel() // input.shape[1]
        if transforming:
            _update_running_stats_in_torch_ops(running_mean, running_var, mean, var, momentum, count)
        else:
            ops.update_running_stats(running_mean, running_var, mean, var, momentum, count)
    return output


def _update_running_stats_in_torch_ops(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                                       momentum: float, count: int) -> None:
    """The update_running_stats kernel's formula in torch ops, for torch.func transforms: vmap
    over stacked buffers (model ensembles) updates each model's own. Both values are computed
    before either is written, so a refused in-place write (an unbatched buffer) changes nothing."""
    with torch.no_grad():
        acc = mean.dtype
        new_mean = running_mean.to(acc) * (1 - momentum) + mean.detach() * momentum
        new_var = running_var.to(acc) * (1 - momentum) + var.detach() * (momentum * count / (count - 1))
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Same signature and semantics as :func:`torch.nn.functional.batch_norm`.

    In training mode the batch statistics normalize the input and, where given,
    ``running_mean``/``running_var`` are updated in place with ``momentum``
    (the variance unbiased). In evaluation mode the running statistics normalize.
    """
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, eps, momentum)
    return batch_norm_unchecked(input, running_mean, running_var, weight, bias, training, momentum, eps)


def activation_arguments(activation: Optional[str], activation_param: Optional[float]):
    """(op code, parameter) for an activation name, with torch's default parameter."""
    code = ops.activation_code(activation)
    if activation_param is None:
        activation_param = ops.DEFAULT_ACTIVATION_PARAM[code]
    elif code not in ops.PARAMETRIZED_ACTIVATIONS:
        raise ValueError(f"activation_param applies to 'leaky_relu' and 'elu' only, not {activation!r}")
    elif not math.isfinite(activation_param):  # as the ops check (csrc/bn_checks.cpp, check_activation_param)
        raise ValueError(f"activation_param must be a finite number, got {activation_param}")
    return code, float(activation_param)


def batch_norm_act(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
                   momentum: float = 0.1, eps: float = 1e-5, activation: Optional[str] = "relu",
                   activation_param: Optional[float] = None, inplace: bool = False) -> Tensor:
    """``act(batch_norm(...))`` in one fused kernel per direction.

    activation: None, "relu", "leaky_relu" (activation_param: negative slope, default
    0.01), "elu" (activation_param: alpha, default 1.0) or "silu". Backward
    recomputes the normalized values from the input, so only the input is kept
    for backward (torch's batch_norm followed by relu keeps the relu output too).

    inplace=True: in-place activated BN (see fastbn.inplace): the output is
    written over ``input`` and backward keeps only it. Needs an invertible
    activation (None, "leaky_relu" or "elu" with a positive parameter).
    """
    code, param = activation_arguments(activation, activation_param)
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, eps, momentum)
    if inplace:
        _inplace.check_invertible(code, param)
        _inplace.check_inplace_call(input, weight, bias)
    return batch_norm_unchecked(input, running_mean, running_var, weight, bias, training, momentum, eps, code, param,
                                inplace=inplace)


def batch_norm_add_act(input: Tensor, residual: Tensor, running_mean: Optional[Tensor],
                       running_var: Optional[Tensor], weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                       training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                       activation: Optional[str] = "relu", activation_param: Optional[float] = None) -> Tensor:
    """``act(batch_norm(input, ...) + residual)``, the end of a ResNet block, fused.

    Forward reads input and residual once and writes the output once; backward
    computes the gradient reaching the sum (which is residual's gradient) in one
    pass and runs batch norm's backward on it. Only input and residual are kept
    for backward. Arguments as in batch_norm_act; residual has input's size,
    dtype and device.
    """
    code, param = activation_arguments(activation, activation_param)
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, eps, momentum)
    if residual is None:
        raise TypeError("fastbn.batch_norm_add_act: residual must be a Tensor, got None")
    check_residual(input, residual)
    return batch_norm_unchecked(input, running_mean, running_var, weight, bias, training, momentum, eps, code, param,
                                residual)
