"""What the benchmark measures and how a row is checked: the shapes, layouts, dtypes and
cases, torch's reference modules and fastbn's (or the stand-in's), the seeded workload
of a row, the step that is timed, and the comparison of its results with float64.

fastbn is imported only when its module factory is asked for (load_fastbn_module_factory),
so that ``--stand-in`` runs on a checkout whose extension is not built.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

# --------------------------------------------------------------------------------------
# What is measured
# --------------------------------------------------------------------------------------

DEFAULT_SHAPES: List[Tuple[int, int, int, int]] = [
    (250, 32, 26, 26),  # MNIST-sized CNN, batch 250: first BN (28x28 after a 3x3 conv)
    (250, 64, 11, 11),  # ... and a second, after pooling and another conv
    (32, 64, 56, 56),  # ResNet-50 stage 1
    (32, 256, 14, 14),  # ResNet-50 stage 3
    (8, 64, 112, 112),  # ResNet stem at a small batch: few channels, long planes
]
# --quick keeps one MNIST-like shape and one with many channels and short planes.
QUICK_SHAPES = [(250, 32, 26, 26), (32, 256, 14, 14)]

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_DTYPES = {"cpu": ["float32", "bfloat16"], "cuda": ["float32", "bfloat16", "float16"]}

# Both implementations are checked against torch in float64 on the same values, not
# against each other: torch's own float32 kernels are not exact either (its channels_last
# CPU backward has been seen 2e-3 off). The error of a result is
# max|result - float64| / max(1, max|float64|) over y, dx, dweight, dbias; these bounds
# are a few units in the last place of each dtype. A fastbn row beyond them is flagged,
# since the timing of a wrong answer means nothing.
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def fastbn_error_acceptable(fastbn_error: float, torch_error: Optional[float], dtype: torch.dtype) -> bool:
    """Within CHECK_TOLERANCE, or at most twice torch's own error in the same dtype (the
    tests' budget). The second matters at an activation's kink: where a pre-activation
    rounds to the other side of ReLU's 0 than in float64, that value's gradient differs
    by a whole dy, in torch's result and in fastbn's alike (seen on one value of 6.4
    million in bn_add_relu_fwd_bwd (32,64,56,56) float32). NaN is never acceptable."""
    if fastbn_error <= CHECK_TOLERANCE[dtype]:
        return True
    return torch_error is not None and fastbn_error <= 2 * torch_error


@dataclass(frozen=True)
class Case:
    """One way of calling batch norm. Adding a case is one entry in CASES."""

    name: str
    description: str
    training: bool  # module.train() (batch statistics, running stats updated) or .eval()
    backward: bool  # also run y.backward(grad_out), parameters' and input's grads
    activation: Optional[str] = None  # fused activation (fastbn) vs BN then the op (torch)
    residual: bool = False  # act(bn(x) + residual): fastbn's module(x, residual) vs torch's ops
    # with backward: "input" (x needs no grad: a first layer) or "params" (the BN's
    # parameters are frozen: fine-tuning); the backward then computes only the grads wanted
    frozen: Optional[str] = None

    def min_bytes(self, numel: int, element_size: int) -> int:
        # Forward reads x and writes y. Backward must at least read x and dy and write dx
        # (the statistics can be recomputed or come from the forward's saved vectors;
        # per-channel vectors are ignored as they are tiny next to the activations).
        # A residual adds a read forward, and a read and a write (its gradient) backward.
        # Without dx the backward reads x and dy; without the parameters' grads (and the
        # batch statistics: evaluation) it reads dy and writes dx.
        tensor_passes = 2 + ((2 if self.frozen else 3) if self.backward else 0)
        if self.residual:
            tensor_passes += 1 + (2 if self.backward else 0)
        return tensor_passes * numel * element_size


CASES: List[Case] = [
    Case("train_fwd", "training forward (batch stats, running stats updated)", True, False),
    Case("train_fwd_bwd", "training forward + backward (dx, dweight, dbias)", True, True),
    Case("eval_fwd", "inference forward under no_grad (running stats)", False, False),
    Case("bn_relu_fwd_bwd", "BN+ReLU training forward + backward; torch: BN then torch.relu",
         True, True, activation="relu"),
    Case("bn_add_relu_fwd_bwd", "relu(BN(x) + residual) training forward + backward (ResNet block end); "
         "torch: BN, add, torch.relu", True, True, activation="relu", residual=True),
    Case("train_const_input_fwd_bwd", "training forward + backward of an input that needs no grad (a first "
         "layer): dweight, dbias only", True, True, frozen="input"),
    Case("eval_frozen_fwd_bwd", "frozen BN (fine-tuning): evaluation forward + backward, parameters frozen: "
         "dx only", False, True, frozen="params"),
]
CASES_BY_NAME = {case.name: case for case in CASES}


class NotAvailable(Exception):
    """The implementation does not support this case (reported as n/a, not as an error)."""


# --------------------------------------------------------------------------------------
# The two implementations
# --------------------------------------------------------------------------------------

class _TorchBNThenActivation(torch.nn.Module):
    """torch's unfused reference for the BN+activation cases: BN, then the op."""

    ACTIVATIONS = {"relu": torch.relu}

    def __init__(self, num_features: int, activation: str):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(num_features)
        self.activation = self.ACTIVATIONS[activation]

    def forward(self, x, residual=None):
        y = self.bn(x)
        return self.activation(y if residual is None else y + residual)


def make_torch_module(num_features: int, activation: Optional[str]) -> torch.nn.Module:
    if activation is None:
        return torch.nn.BatchNorm2d(num_features)
    return _TorchBNThenActivation(num_features, activation)


def load_fastbn_module_factory(stand_in: bool) -> Tuple[Callable[..., torch.nn.Module], str]:
    """Return (factory(num_features, activation) -> module, a description for the header).

    ``stand_in`` benchmarks torch against itself; it exists only to develop and check
    this script on a checkout whose extension is not built yet.
    """
    if stand_in:
        def make_stand_in(num_features: int, activation: Optional[str]) -> torch.nn.Module:
            if activation is not None:
                raise NotAvailable("the stand-in has no fused activation")
            return torch.nn.BatchNorm2d(num_features)
        return make_stand_in, "STAND-IN (torch.nn.BatchNorm2d, not fastbn)"

    try:
        import fastbn
    except Exception as error:  # ImportError, or the extension failing to load
        raise SystemExit(
            f"cannot import fastbn ({type(error).__name__}: {error}).\n"
            "Build the extension first: pip install --no-build-isolation -e . "
            "(or python setup.py build_ext --inplace).\n"
            "--stand-in runs the script with torch on both sides, to develop it."
        ) from error

    def make_fastbn(num_features: int, activation: Optional[str]) -> torch.nn.Module:
        if activation is None:
            return fastbn.BatchNorm2d(num_features)
        try:
            return fastbn.BatchNorm2d(num_features, activation=activation)
        except TypeError as error:  # this fastbn's constructor has no activation= yet
            raise NotAvailable(f"fastbn.BatchNorm2d(activation={activation!r}): {error}") from error
        except (ValueError, NotImplementedError) as error:  # known keyword, unknown value
            raise NotAvailable(str(error)) from error

    description = f"fastbn {getattr(fastbn, '__version__', '?')} ({os.path.dirname(fastbn.__file__)})"
    # The vector ISA the CPU kernels run with (chosen at import; FASTBN_CPU_CAPABILITY lowers it).
    capability = getattr(getattr(fastbn, "ops", None), "CPU_CAPABILITY", None)
    if capability is not None:
        description += f", CPU kernels: {capability}"
    return make_fastbn, description


# --------------------------------------------------------------------------------------
# Building one timed step
# --------------------------------------------------------------------------------------

@dataclass
class Workload:
    """The input and output gradient of one row, shared by both implementations."""

    x: torch.Tensor
    grad_out: torch.Tensor
    residual: torch.Tensor

    def double(self) -> "Workload":
        return Workload(self.x.double(), self.grad_out.double(), self.residual.double())


def make_workload(shape, dtype, memory_format, device) -> Workload:
    generator = torch.Generator().manual_seed(0)
    # Offset and scale the input so the normalization actually has work to undo.
    x = torch.randn(shape, generator=generator) * 2.0 + 0.5
    grad_out = torch.randn(shape, generator=generator)
    residual = torch.randn(shape, generator=generator) - 0.3
    convert = dict(device=device, dtype=dtype, memory_format=memory_format)
    return Workload(x.to(**convert), grad_out.to(**convert), residual.to(**convert))


def prepare_module(module: torch.nn.Module, case: Case, param_dtype, device) -> torch.nn.Module:
    """Move the module and give its BN non-trivial, seeded parameters and running stats.

    Both implementations get the same values, so their outputs can be compared, and
    none of them is the identity (weight 1, bias 0, mean 0, var 1 could hide bugs).
    """
    module = module.to(device=device, dtype=param_dtype)
    generator = torch.Generator().manual_seed(1)
    for bn in module.modules():
        if not isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            continue
        channels = bn.num_features

        def seeded(offset, scale):
            values = offset + scale * torch.rand(channels, generator=generator)
            return values.to(device=device, dtype=param_dtype)
        with torch.no_grad():
            bn.weight.copy_(seeded(0.5, 1.0))
            bn.bias.copy_(seeded(-0.5, 1.0))
            bn.running_mean.copy_(seeded(0.0, 1.0))
            bn.running_var.copy_(seeded(3.0, 2.0))
    module.train(case.training)
    module.requires_grad_(case.frozen != "params")
    return module


def make_step(module: torch.nn.Module, case: Case, workload: Workload) -> Tuple[Callable[[], torch.Tensor], torch.Tensor]:
    """Return (step, x): step() runs the case once and returns its output; x is its input.

    Returning the output costs nothing and lets the correctness check call the very
    function that is timed.
    """
    parameters = list(module.parameters())
    if case.backward:
        # A leaf of its own per implementation, so the two never share .grad.
        x = workload.x.detach().clone().requires_grad_(case.frozen != "input")
        residual = workload.residual.detach().clone().requires_grad_(True) if case.residual else None
        inputs = (x,) if residual is None else (x, residual)
        grad_out = workload.grad_out

        def step():
            # set_to_none, as optimizer.zero_grad() does by default: the backward then
            # writes fresh gradients instead of accumulating (an extra read+write).
            for leaf in (*inputs, *parameters):
                leaf.grad = None
            y = module(*inputs)
            y.backward(grad_out)
            return y
        step.residual = residual  # for the correctness check
        return step, x

    x = workload.x
    if case.training:
        def step():
            # As in training: the parameters require grad, so autograd records the
            # graph, and whatever the op saves for backward is part of the cost.
            return module(x)
    else:
        def step():
            with torch.no_grad():
                return module(x)
    return step, x


# --------------------------------------------------------------------------------------
# Checking results against float64
# --------------------------------------------------------------------------------------

def results_for_check(step: Callable, x: torch.Tensor, module: torch.nn.Module,
                      backward: bool) -> List[torch.Tensor]:
    """Run the case once; return y and, with backward, dx and the parameters' grads (those
    that require one)."""
    results = [step()]
    if backward:
        if x.requires_grad:
            results.append(x.grad)
        if getattr(step, "residual", None) is not None:
            results.append(step.residual.grad)
        results += [parameter.grad for parameter in module.parameters() if parameter.requires_grad]
    return [result.detach().double() for result in results]


def relative_error(results: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    errors = [((result - expected).abs().max() / expected.abs().max().clamp(min=1.0)).item()
              for result, expected in zip(results, reference)]
    return max(errors)
