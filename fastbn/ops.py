"""fastbn's operators: load the compiled library and teach torch about it.

The schemas, kernels and the forward ops' autograd live in C++ (csrc/; the
autograd in csrc/autograd.cpp). Here each op gets a fake kernel (shapes only,
for torch.compile and meta tensors) through ``torch.library``, and the Python
autograd.Functions of fastbn/functions.py (forward-mode AD, torch.func) their
setup and backward.
"""
import contextlib
import enum
import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loading it registers torch.ops.fastbn.*)

WITH_CUDA = bool(_C.with_cuda)

# The CPU kernels are compiled for DEFAULT, AVX2, AVX512 and AVX512_BF16 (x86-64;
# DEFAULT only elsewhere). CPU_CAPABILITY names the one that runs: the best this CPU
# supports, or FASTBN_CPU_CAPABILITY=DEFAULT|AVX2|AVX512|AVX512_BF16 from the environment
# (importing fails, naming what the CPU supports, when it cannot be honoured).
# CPU_CAPABILITIES: every one this CPU and build can run, lowest first.
CPU_CAPABILITY = _C._get_cpu_capability()
CPU_CAPABILITIES = _C._cpu_capabilities()


@contextlib.contextmanager
def use_cpu_capability(name: str):
    """Run the CPU kernels of `name` (one of CPU_CAPABILITIES) inside the block, with
    CPU_CAPABILITY set to it; for tests comparing the ISAs in one process. Not for
    use while other threads run fastbn ops (the choice is process-wide)."""
    global CPU_CAPABILITY
    previous = CPU_CAPABILITY
    _C._set_cpu_capability(name)  # a ValueError, changing nothing, for an unsupported name
    CPU_CAPABILITY = _C._get_cpu_capability()
    try:
        yield
    finally:
        _C._set_cpu_capability(previous)
        CPU_CAPABILITY = previous


def cpu_streaming_bytes() -> int:
    """The size from which the CPU kernels write outputs (y, grad_input) with streaming
    stores: an eighth of the last-level cache, within 4-16 MiB (16 MiB where sysfs gives
    no cache size; csrc/cpu/output_streaming.h), unless use_cpu_streaming_bytes set another."""
    return _C._get_streaming_bytes()


@contextlib.contextmanager
def use_cpu_streaming_bytes(nbytes: int):
    """Stream CPU outputs from `nbytes` on inside the block: for tests that need both sides
    of another host's threshold, and for A/B benchmarks. Process-wide, like use_cpu_capability."""
    previous = _C._get_streaming_bytes()
    _C._set_streaming_bytes(nbytes)  # a ValueError, changing nothing, for a negative size
    try:
        yield
    finally:
        _C._set_streaming_bytes(previous)

# The CUDA kernels compile on every machine with a CUDA toolkit, but until the
# test suite has passed on a GPU, fastbn's modules and functional API send CUDA
# tensors to torch's own batch norm (correct, not faster) unless
# FASTBN_CUDA_KERNELS=1. The torch.ops.fastbn.* ops always run the kernels.
CUDA_KERNELS_VALIDATED = False


def use_cuda_kernels() -> bool:
    return WITH_CUDA and (CUDA_KERNELS_VALIDATED or os.environ.get("FASTBN_CUDA_KERNELS") == "1")


_CUDA_IMPLEMENTATIONS = {"auto": 0, "general": 1, "onchip": 2}


@contextlib.contextmanager
def cuda_implementation(name: str):
    """Force the CUDA kernels' implementation inside the block: "general" (any size,
    reduce then elementwise), "onchip" (a channel's values kept in one block's
    registers; an error where they do not fit) or "auto" (the chooser). For tests."""
    if name not in _CUDA_IMPLEMENTATIONS:
        raise ValueError(f"cuda implementation must be one of {sorted(_CUDA_IMPLEMENTATIONS)}, got {name!r}")
    previous = _C._get_cuda_impl()
    _C._set_cuda_impl(_CUDA_IMPLEMENTATIONS[name])
    try:
        yield
    finally:
        _C._set_cuda_impl(previous)


class Activation(enum.IntEnum):
    """The activations fused after the normalization: the ops' ``activation`` argument.
    The values are those of ``enum class Activation`` in csrc/bn_math.h (tests/test_activation.py
    checks the two against each other)."""
    IDENTITY = 0
    RELU = 1
    LEAKY_RELU = 2  # activation_param: negative slope
    ELU = 3  # activation_param: alpha
    SILU = 4


# The names the Python API takes (None: no activation), and torch's default parameters
# (LeakyReLU slope 0.01, ELU alpha 1).
ACTIVATIONS = {None: Activation.IDENTITY, **{member.name.lower(): member for member in Activation}}
ACTIVATION_NAMES = {member: None if member == Activation.IDENTITY else member.name.lower() for member in Activation}
DEFAULT_ACTIVATION_PARAM = {Activation.IDENTITY: 0.0, Activation.RELU: 0.0, Activation.LEAKY_RELU: 0.01,
                            Activation.ELU: 1.0, Activation.SILU: 0.0}
PARAMETRIZED_ACTIVATIONS = (Activation.LEAKY_RELU, Activation.ELU)  # the ones activation_param applies to


def activation_code(activation) -> Activation:
    """The op argument for an activation name (None for none)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of None, 'relu', 'leaky_relu', 'elu', 'silu', got {activation!r}")
    return ACTIVATIONS[activation]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed and returned in (as the kernels do)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def output_memory_format(input: Tensor) -> torch.memory_format:
    """The memory format of the kernels' outputs; mirrors output_memory_format in csrc/bn_checks.cpp."""
    if input.dim() == 4 and not input.is_contiguous() and input.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if input.dim() == 5 and not input.is_contiguous() and input.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def reduce_dims(input: Tensor) -> list:
    """All dims but the channel dim (1)."""
    return [0] + list(range(2, input.dim()))


def channel_shape(input: Tensor) -> list:
    """Shape that broadcasts a per-channel vector against input: (1, C, 1, ...)."""
    return [1, input.shape[1]] + [1] * (input.dim() - 2)


# ---------------------------------------------------------------- fake kernels
# A call whose tensors are all meta (or fake) tensors runs these; so does one mixing
# meta with CPU tensors (the dispatcher picks the Meta kernel), which must then fail
# as torch's own ops do rather than return uninitialized tensors.


def _check_devices(op: str, reference: str, tensors: dict) -> None:
    """Raise unless every tensor in ``tensors`` (name -> tensor or None) is on the device of
    the one named ``reference``; the message names the op and the argument, as the kernels' do."""
    if tensors[reference] is None:
        raise RuntimeError(f"fastbn.{op}: {reference} is required, got None")
    device = tensors[reference].device
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != device:
            raise RuntimeError(f"fastbn.{op}: {name} is on {tensor.device} but {reference} is on {device}")


def _check_input_devices(op: str, input, **tensors) -> None:
    _check_devices(op, "input", {"input": input, **tensors})
    _check_rank(op, "input", input)


def _check_rank(op: str, name: str, input) -> None:
    """check_input's rank rule (csrc/bn_checks.cpp), before the shapes below index dim 1."""
    if input.dim() < 2:
        raise RuntimeError(f"fastbn.{op}: expected {name} of shape (N, C, *) with at least 2 dims, got {input.dim()}-D "
                           f"{name} of size {list(input.shape)}")


def _channel_stats_fake(input):
    channels, acc = input.shape[1], accumulate_dtype(input.dtype)
    return input.new_empty((channels,), dtype=acc), input.new_empty((channels,), dtype=acc)


@torch.library.register_fake("fastbn::batch_norm_train")
def _batch_norm_train_fake(input, weight, bias, eps, activation=0, activation_param=0.0, residual=None):
    _check_input_devices("batch_norm_train", input, weight=weight, bias=bias, residual=residual)
    output = torch.empty_like(input, memory_format=output_memory_format(input))
    return (output, *_channel_stats_fake(input))


@torch.library.register_fake("fastbn::batch_norm_eval")
def _batch_norm_eval_fake(input, weight, bias, running_mean, running_var, eps, activation=0, activation_param=0.0,
                          residual=None):
    _check_input_devices("batch_norm_eval", input, weight=weight, bias=bias, running_mean=running_mean,
                         running_var=running_var, residual=residual)
    return torch.empty_like(input, memory_format=output_memory_format(input))


@torch.library.register_fake("fastbn::batch_norm_train_")
def _batch_norm_train_inplace_fake(input, weight, bias, eps, activation=0, activation_param=0.0):
    _check_input_devices("batch_norm_train_", input, weight=weight, bias=bias)
    return _channel_stats_fake(input)


@torch.library.register_fake("fastbn::batch_norm_eval_")
def _batch_norm_eval_inplace_fake(input, weight, bias, running_mean, running_var, eps, activation=0,
                                  activation_param=0.0):
    _check_input_devices("batch_norm_eval_", input, weight=weight, bias=bias, running_mean=running_mean,
                         running_var=running_var)
    return None


@torch.library.register_fake("fastbn::batch_norm_add_act_backward")
def _batch_norm_add_act_backward_fake(grad_output, input, residual, weight, bias, mean, var, eps, train, activation,
                                      activation_param):
    _check_input_devices("batch_norm_add_act_backward", input, grad_output=grad_output, residual=residual,
                         weight=weight, bias=bias, mean=mean, var=var)
    layout = output_memory_format(input)
    return (torch.empty_like(input, memory_format=layout), torch.empty_like(input, memory_format=layout),
            *_channel_stats_fake(input))


@torch.library.register_fake("fastbn::batch_norm_invert_output")
def _batch_norm_invert_output_fake(grad_output, output, weight, bias, var, eps, activation, activation_param):
    _check_devices("batch_norm_invert_output", "output",
                   dict(output=output, grad_output=grad_output, weight=weight, bias=bias, var=var))
    _check_rank("batch_norm_invert_output", "output", output)
    acc, layout = accumulate_dtype(output.dtype), output_memory_format(output)
    return (torch.empty_like(output, dtype=acc, memory_format=layout),
            torch.empty_like(output, dtype=acc, memory_format=layout))


@torch.library.register_fake("fastbn::batch_norm_backward")
def _batch_norm_backward_fake(grad_output, input, weight, bias, mean, var, eps, train, activation=0,
                              activation_param=0.0, output_mask=(True, True, True)):
    _check_input_devices("batch_norm_backward", input, grad_output=grad_output, weight=weight, bias=bias, mean=mean,
                         var=var)
    channels = input.shape[1]
    acc = accumulate_dtype(input.dtype)
    # an output the mask leaves out comes back empty (the schema's comment in csrc/ops.cpp)
    grad_input = (torch.empty_like(input, memory_format=output_memory_format(input)) if output_mask[0]
                  else input.new_empty((0,)))
    grad_weight, grad_bias = (input.new_empty((channels if wanted else 0,), dtype=acc) for wanted in output_mask[1:])
    return grad_input, grad_weight, grad_bias


@torch.library.register_fake("fastbn::batch_norm_stats")
def _batch_norm_stats_fake(input):
    _check_input_devices("batch_norm_stats", input)
    return _channel_stats_fake(input)


@torch.library.register_fake("fastbn::batch_norm_backward_reduce")
def _batch_norm_backward_reduce_fake(grad_output, input, weight, bias, mean, var, eps, activation=0,
                                     activation_param=0.0):
    _check_input_devices("batch_norm_backward_reduce", input, grad_output=grad_output, weight=weight, bias=bias,
                         mean=mean, var=var)
    channels, acc = input.shape[1], accumulate_dtype(input.dtype)
    return input.new_empty((channels,), dtype=acc), input.new_empty((channels,), dtype=acc)


@torch.library.register_fake("fastbn::batch_norm_backward_elemt")
def _batch_norm_backward_elemt_fake(grad_output, input, weight, bias, mean, var, sum_dy, sum_dy_xmu, eps, count,
                                    activation=0, activation_param=0.0):
    _check_input_devices("batch_norm_backward_elemt", input, grad_output=grad_output, weight=weight, bias=bias,
                         mean=mean, var=var, sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu)
    return torch.empty_like(input, memory_format=output_memory_format(input))


@torch.library.register_fake("fastbn::update_running_stats")
def _update_running_stats_fake(running_mean, running_var, mean, var, factor, count):
    _check_devices("update_running_stats", "mean",
                   dict(mean=mean, running_mean=running_mean, running_var=running_var, var=var))
    return None


# A call whose tensor arguments are all None reaches no backend: without this kernel the
# dispatcher raises NotImplementedError ("There were no tensor arguments to this function").
_fallback_library = torch.library.Library("fastbn", "IMPL")


def _no_backend_kernel(op: str):
    arguments = getattr(torch.ops.fastbn, op).default._schema.arguments

    def kernel(*args):
        for argument, value in zip(arguments, args):
            if value is None and str(argument.type) == "Tensor":
                raise RuntimeError(f"fastbn.{op}: {argument.name} is required, got None")
        devices = sorted({str(value.device) for value in args if isinstance(value, Tensor)})
        raise RuntimeError(f"fastbn.{op}: this build of fastbn has no kernel for tensors on {', '.join(devices)}")

    return kernel


for _op in ("batch_norm_train", "batch_norm_eval", "batch_norm_train_", "batch_norm_eval_", "batch_norm_backward",
            "batch_norm_add_act_backward", "batch_norm_invert_output", "batch_norm_stats",
            "batch_norm_backward_reduce", "batch_norm_backward_elemt", "update_running_stats"):
    _fallback_library.impl(_op, _no_backend_kernel(_op), "CompositeExplicitAutograd")


# ---------------------------------------------------------------- autograd


def activation_forward(z: Tensor, activation: int, param: float) -> Tensor:
    """The fused activations in torch ops (references, the empty-batch path, TorchScript: which
    compares an int with an enum member's .value only)."""
    if activation == Activation.RELU.value:
        return torch.relu(z)
    if activation == Activation.LEAKY_RELU.value:
        return torch.nn.functional.leaky_relu(z, param)
    if activation == Activation.ELU.value:
        return torch.nn.functional.elu(z, param)
    if activation == Activation.SILU.value:
        return torch.nn.functional.silu(z)
    return z


def activation_grad(z: Tensor, activation: int, param: float) -> Tensor:
    """d act / dz in differentiable torch ops; matches activation_grad in bn_math.h."""
    # at a NaN z as torch: relu and elu pass the gradient (z <= 0 is false), leaky_relu scales it
    if activation == Activation.RELU:
        return (~(z <= 0)).to(z.dtype)
    if activation == Activation.LEAKY_RELU:
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, param))
    if activation == Activation.ELU:
        return torch.where(z <= 0, param * torch.exp(z), torch.ones_like(z))
    if activation == Activation.SILU:
        sigmoid = torch.sigmoid(z)
        return sigmoid * (1 + z * (1 - sigmoid))
    return torch.ones_like(z)


def composite_backward(grad_output: Tensor, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                       mean: Optional[Tensor], var: Optional[Tensor], eps: float, train: bool, activation: int = 0,
                       activation_param: float = 0.0, residual: Optional[Tensor] = None):
    """The backward of act(bn(input) [+ residual]) written with differentiable torch
    ops, used when a graph of the backward itself is wanted (double backward,
    gradgradcheck, torch.func): (grad_input, grad_weight, grad_bias, grad_residual),
    the last the gradient a residual would get (a residual of None gets none: callers
    drop it). Also the op fastbn::batch_norm_backward_composite, which the C++
    autograd (csrc/autograd.cpp) calls for double backward.

    In training mode the statistics are recomputed from ``input`` so that their
    dependence on it is part of the graph; in eval mode ``mean``/``var`` are constants.
    """
    acc = accumulate_dtype(input.dtype)
    dims, shape = reduce_dims(input), channel_shape(input)
    x, dy = input.to(acc), grad_output.to(acc)
    if train:
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
    invstd = torch.rsqrt(var.to(acc) + eps)
    xhat = (x - mean.to(acc).view(shape)) * invstd.view(shape)
    if activation:
        z = xhat if weight is None else xhat * weight.to(acc).view(shape)
        if bias is not None:
            z = z + bias.to(acc).view(shape)
        if residual is not None:
            z = z + residual.to(acc)
        dy = dy * activation_grad(z, activation, activation_param)
    # the gradient reaching the sum bn(x) + residual (also returned without one: the op's schema has no None)
    grad_residual = dy.to(input.dtype)
    grad_bias = dy.sum(dims)
    grad_weight = (dy * xhat).sum(dims)
    scale = invstd if weight is None else weight.to(acc) * invstd
    if train:
        count = x.numel() // x.shape[1]
        grad_input = scale.view(shape) * (dy - (grad_bias / count).view(shape) - xhat * (grad_weight / count).view(shape))
    else:
        grad_input = dy * scale.view(shape)
    return grad_input.to(input.dtype), grad_weight, grad_bias, grad_residual


torch.library.impl("fastbn::batch_norm_backward_composite", "CompositeImplicitAutograd")(composite_backward)


def _backward(ctx, grad_output, input, residual, weight, bias, mean, var, train):
    """(grad_input, grad_weight, grad_bias, grad_residual) of act(bn(input) [+ residual]);
    grad_residual is None without a residual. mean/var: the saved statistics."""
    act = (ctx.activation, ctx.activation_param)
    if _wants_graph(grad_output, input, weight, bias, residual):
        # Differentiable torch ops (double backward); training recomputes the statistics.
        mean, var = (None, None) if train else (mean, var)
        grad_input, grad_weight, grad_bias, grad_residual = composite_backward(
            grad_output, input, weight, bias, mean, var, ctx.eps, train, *act, residual)
        return grad_input, grad_weight, grad_bias, None if residual is None else grad_residual
    if residual is None:
        return (*torch.ops.fastbn.batch_norm_backward(grad_output, input, weight, bias, mean, var, ctx.eps, train, *act),
                None)
    if not ctx.activation:  # the sum's gradient is grad_output itself
        return (*torch.ops.fastbn.batch_norm_backward(grad_output, input, weight, bias, mean, var, ctx.eps, train),
                grad_output)
    grad_input, grad_residual, grad_weight, grad_bias = torch.ops.fastbn.batch_norm_add_act_backward(
        grad_output, input, residual, weight, bias, mean, var, ctx.eps, train, *act)
    return grad_input, grad_weight, grad_bias, grad_residual


def _wants_graph(*tensors) -> bool:
    """True when the backward itself must be differentiable: autograd records it
    (create_graph=True), or it runs under forward AD or a torch.func transform."""
    return transforms_active() or torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def transforms_active() -> bool:
    """True while a forward-AD level is open or a torch.func transform runs (eager only);
    the Python API then calls the ops through the autograd.Functions with a jvp (fastbn/functions.py)."""
    if torch.compiler.is_compiling():
        return False
    return torch.autograd.forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()


def _needs_grad(ctx, index: int) -> bool:
    """Whether the op's argument `index` needs a gradient (arguments left to their default have no entry)."""
    return index < len(ctx.needs_input_grad) and ctx.needs_input_grad[index]


def _grads_for_params(ctx, grad_input, grad_weight, grad_bias):
    """Cast the accumulation-dtype parameter grads to the parameters' dtypes; None where not needed."""
    needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    grad_weight = grad_weight.to(ctx.weight_dtype) if needs_weight else None
    grad_bias = grad_bias.to(ctx.bias_dtype) if needs_bias else None
    return (grad_input if needs_input else None), grad_weight, grad_bias


def _train_setup_context(ctx, inputs, output):
    input, weight, bias, eps, activation, activation_param, residual = inputs
    _, mean, var = output
    # Unused outputs (the statistics, almost always) then get None, not zero tensors.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input, weight, bias, mean, var, residual)
    ctx.eps, ctx.activation, ctx.activation_param = eps, activation, activation_param
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _train_backward(ctx, grad_output, grad_mean, grad_var):
    input, weight, bias, mean, var, residual = ctx.saved_tensors
    if grad_output is None:
        grad_output = torch.zeros_like(input)
    grad_input, grad_weight, grad_bias, grad_residual = _backward(ctx, grad_output, input, residual, weight, bias,
                                                                  mean, var, True)
    # The batch statistics are outputs too; if anything used them, add their
    # gradients: d mean / dx = 1/n, d var / dx = 2 (x - mean) / n.
    if grad_mean is not None or grad_var is not None:
        shape, count = channel_shape(input), input.numel() // input.shape[1]
        extra = torch.zeros((), dtype=mean.dtype, device=input.device)
        if grad_mean is not None:
            extra = extra + grad_mean.view(shape) / count
        if grad_var is not None:
            extra = extra + grad_var.view(shape) * 2 * (input.to(mean.dtype) - mean.view(shape)) / count
        grad_input = (grad_input.to(mean.dtype) + extra).to(input.dtype)
    grad_residual = grad_residual if _needs_grad(ctx, 6) else None
    return (*_grads_for_params(ctx, grad_input, grad_weight, grad_bias), None, None, None, grad_residual)


def _eval_setup_context(ctx, inputs, output):
    input, weight, bias, running_mean, running_var, eps, activation, activation_param, residual = inputs
    ctx.save_for_backward(input, weight, bias, running_mean, running_var, residual)
    ctx.eps, ctx.activation, ctx.activation_param = eps, activation, activation_param
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _eval_backward(ctx, grad_output):
    if grad_output is None:  # (with materialize_grads off: the output was not used)
        return (None,) * 9
    input, weight, bias, running_mean, running_var, residual = ctx.saved_tensors
    *grads, grad_residual = _backward(ctx, grad_output, input, residual, weight, bias, running_mean, running_var, False)
    grad_residual = grad_residual if _needs_grad(ctx, 8) else None
    return (*_grads_for_params(ctx, *grads), None, None, None, None, None, grad_residual)



# ---------------------------------------------------------------- thin Python entry points


def batch_norm_train(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                     activation: int = 0, activation_param: float = 0.0, residual: Optional[Tensor] = None):
    """(output, batch mean, batch biased variance); differentiable in input, weight, bias (and residual)."""
    return torch.ops.fastbn.batch_norm_train.default(input, weight, bias, eps, activation, activation_param, residual)


def batch_norm_eval(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor,
                    running_var: Tensor, eps: float, activation: int = 0, activation_param: float = 0.0,
                    residual: Optional[Tensor] = None) -> Tensor:
    return torch.ops.fastbn.batch_norm_eval.default(input, weight, bias, running_mean, running_var, eps, activation,
                                                    activation_param, residual)


def batch_norm_stats_raw(input: Tensor):
    """Per-channel (mean, biased variance) of input in the accumulation dtype; NaN for an empty input."""
    return torch.ops.fastbn.batch_norm_stats.default(input)


def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, factor: float,
                         count: int) -> None:
    """In place: running = (1 - factor) * running + factor * batch (variance unbiased)."""
    if torch.compiler.is_compiling():  # (dynamo cannot trace the guard below)
        with torch.no_grad():
            torch.ops.fastbn.update_running_stats.default(running_mean, running_var, mean.detach(), var.detach(),
                                                          float(factor), int(count))
        return
    with torch._C._AutoDispatchBelowAutograd():  # past autograd: cheaper than no_grad and detach
        torch.ops.fastbn.update_running_stats.default(running_mean, running_var, mean, var, float(factor), int(count))


__all__: Sequence[str] = [
    "WITH_CUDA", "CPU_CAPABILITY", "CPU_CAPABILITIES", "use_cpu_capability", "cpu_streaming_bytes",
    "use_cpu_streaming_bytes", "CUDA_KERNELS_VALIDATED",
    "use_cuda_kernels", "cuda_implementation",
    "Activation", "ACTIVATIONS", "activation_code", "activation_forward", "activation_grad", "accumulate_dtype", "output_memory_format", "composite_backward",
    "batch_norm_train", "batch_norm_eval", "update_running_stats",
]
