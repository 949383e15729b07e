"""Shared test helpers: devices, float64 references, error budgets."""
import functools
import importlib.util
import os
import platform
import sys

# On a GPU the tests exercise fastbn's CUDA kernels, not the torch fallback that
# unvalidated builds use (see fastbn.ops.CUDA_KERNELS_VALIDATED).
os.environ["FASTBN_CUDA_KERNELS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.autograd  # noqa: E402

import fastbn  # noqa: E402

HAS_CUDA = torch.cuda.is_available() and fastbn.ops.WITH_CUDA

# A session with the CUDA kernels emulated on the CPU (scripts/test-cuda-emulated.sh):
# FASTBN_CUDA_EMULATED names the library tests/cuemu/build.py makes from
# csrc/cuda/batch_norm_cuda.cu. Loaded, it takes fastbn's CPU tensors over from the
# CPU kernels, so every CPU test runs the CUDA kernel code, and test_cuda.py runs
# on CPU tensors.
CUDA_EMULATED = bool(os.environ.get("FASTBN_CUDA_EMULATED"))
if CUDA_EMULATED:
    torch.ops.load_library(os.environ["FASTBN_CUDA_EMULATED"])
    _launches = torch.ops.fastbn_cuemu.launches()
    torch.ops.fastbn.batch_norm_train(torch.randn(2, 3, 4), None, None, 1e-5)
    if torch.ops.fastbn_cuemu.launches() == _launches:
        raise RuntimeError(f"{os.environ['FASTBN_CUDA_EMULATED']} is loaded but fastbn's CPU ops do not run it")
    # gradcheck and gradgradcheck in fast mode (random projections of the Jacobian,
    # which a wrong gradient fails too): the full Jacobian costs two emulated calls per
    # input value, minutes per test. Patched before the test modules import them.
    torch.autograd.gradcheck = functools.partial(torch.autograd.gradcheck, fast_mode=True)
    torch.autograd.gradgradcheck = functools.partial(torch.autograd.gradgradcheck, fast_mode=True)

# Where test_cuda.py runs fastbn's CUDA kernels: the CPU under emulation, else a GPU.
CUDA_KERNEL_DEVICE = "cpu" if CUDA_EMULATED else "cuda"


# Where setup.py builds the per-ISA CPU kernels and the tests can read /proc/cpuinfo and set MXCSR.
X86_LINUX = sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")


def load_setup_script():
    """setup.py as a module (its setup() call runs only as __main__), for its build helpers."""
    spec = importlib.util.spec_from_file_location(
        "fastbn_setup_script", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_collection_modifyitems(config, items):
    if not CUDA_EMULATED:
        return
    # MNIST training runs batch norm on batches of 0.3-5 million values per call, each a
    # few seconds of emulated kernel time: tens of minutes per test. Its layer shapes
    # (planar 26x26 and 11x11 maps, (N, C) activations) are covered by the other tests.
    skip_mnist = pytest.mark.skip(reason="under emulation MNIST training takes tens of minutes of emulated kernel "
                                         "time per test (millions of values per batch-norm call)")
    for item in items:
        if item.path.name == "test_mnist.py":
            item.add_marker(skip_mnist)


def pytest_report_header(config):
    if CUDA_EMULATED:
        return f"fastbn: CUDA kernels emulated on the CPU ({os.environ['FASTBN_CUDA_EMULATED']})"
    return None

# Every device test runs on CPU, and on CUDA when a GPU is present; on a machine
# without one the CUDA variants are skipped and say why.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(
        not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build of fastbn (none here)")),
]

ALL_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def random_input(shape, dtype=torch.float32, device="cpu", channels_last=False, mean=3.0, std=2.0):
    """Fresh data with a non-zero mean (never zeros), optionally channels_last."""
    x = (mean + std * torch.randn(shape, dtype=torch.float64)).to(dtype=dtype, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    return x


def reference_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps):
    """Batch norm in float64 with plain torch ops: (output, new running_mean, new running_var).

    Differentiable in x, weight and bias. momentum is the update factor (None is not allowed here).
    """
    x = x.double()
    dims = [0] + list(range(2, x.dim()))
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    if training:
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        count = x.numel() // x.shape[1]
        new_mean = new_var = None
        if running_mean is not None:
            new_mean = (1 - momentum) * running_mean.double() + momentum * mean.detach()
        if running_var is not None:
            new_var = (1 - momentum) * running_var.double() + momentum * var.detach() * count / (count - 1)
    else:
        mean, var = running_mean.double(), running_var.double()
        new_mean, new_var = running_mean, running_var
    out = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    if weight is not None:
        out = out * weight.double().view(shape)
    if bias is not None:
        out = out + bias.double().view(shape)
    return out, new_mean, new_var


def max_error(actual, reference):
    return (actual.double() - reference.double()).abs().max().item() if actual.numel() else 0.0


# Under emulation: the largest error against the float64 reference, relative to
# the reference's largest value (at least 1), per dtype. Torch on the CPU is no
# yardstick for GPU arithmetic, so the budget below is not used there. Half
# types: two units in the last place (a result rounded once from float32 is
# within a half); float32: accumulation over up to ~1e6 values; float64: another
# order of summation.
EMULATED_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5,
                      torch.float16: 2 * torch.finfo(torch.float16).eps,
                      torch.bfloat16: 2 * torch.finfo(torch.bfloat16).eps}


def emulated_tolerance_far_from_zero(dtype, mean, std):
    """EMULATED_TOLERANCE for data of mean `mean` and spread `std`. The CUDA kernels
    accumulate float32 and half input in float32 (as torch's CUDA kernels do), so a
    channel mean is only known to about float32's eps * |mean|: an error of
    eps * |mean| / std in the normalized output (1.2e-3 of it for 1e4 + randn)."""
    accumulate_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    return max(EMULATED_TOLERANCE[dtype], accumulate_eps * abs(mean) / std)


def assert_within_budget(actual, torch_result, reference, what="", emulated_tolerance=None):
    """fastbn's error against the float64 reference is at most 2x torch's own error
    in the same dtype, plus one unit in the last place of the largest value (where
    torch happens to be exact, rounding alone must not fail the test). Under
    emulation: at most emulated_tolerance (default EMULATED_TOLERANCE of the dtype)
    of the reference's largest value."""
    assert actual.shape == torch_result.shape == reference.shape, what
    assert actual.dtype == torch_result.dtype, f"{what}: dtype {actual.dtype} vs torch's {torch_result.dtype}"
    if actual.numel() == 0:
        return
    err_fastbn = max_error(actual, reference)
    scale = max(1.0, reference.double().abs().max().item())
    if CUDA_EMULATED:
        relative = emulated_tolerance or EMULATED_TOLERANCE[actual.dtype]
        assert err_fastbn <= relative * scale, (
            f"{what}: fastbn (emulated CUDA kernels) error {err_fastbn:.3g} > {relative * scale:.3g}, "
            f"{relative:.3g} of the reference's scale {scale:.3g}")
        return
    err_torch = max_error(torch_result, reference)
    if actual.dtype == torch.float64:
        # In float64 torch's own result is the reference (its error is 0): allow a
        # relative 1e-12 for another, equally valid order of summation.
        ulp = 1e-12 * scale
    else:
        ulp = torch.finfo(actual.dtype).eps * scale
    assert err_fastbn <= 2 * err_torch + ulp, (
        f"{what}: fastbn error {err_fastbn:.3g} > 2 x torch error {err_torch:.3g} + ulp {ulp:.3g}")


def assert_bn_state_within_budget(fast, torch_bn, reference_bn, step):
    """After a backward through three copies of one batch norm (fastbn's, torch's, float64
    torch's): weight and bias grads within budget (then cleared), and the running statistics."""
    for name in ("weight", "bias"):
        p_fast, p_torch, p_ref = (getattr(m, name) for m in (fast, torch_bn, reference_bn))
        assert_within_budget(p_fast.grad, p_torch.grad, p_ref.grad, f"step {step} grad_{name}")
        for p in (p_fast, p_torch, p_ref):
            p.grad = None
    for name in ("running_mean", "running_var"):
        assert_within_budget(getattr(fast, name), getattr(torch_bn, name), getattr(reference_bn, name), name)


def randomize_batch_norms(model):
    """Non-trivial weights, biases and running statistics for every batch norm in `model`
    (torch's or fastbn's), seeded; returns the model."""
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    return model


def outcome(call):
    """(result, None) when call() returns, (None, exception) when it raises: for comparing
    what fastbn does with what torch does on the same input, errors included."""
    try:
        return call(), None
    except Exception as error:  # noqa: BLE001 (any exception type is compared with torch's)
        return None, error


def assert_same_outcome(torch_call, fastbn_call, what=""):
    """Run both; where torch raises, fastbn must raise an exception of torch's type
    (messages may differ); where torch returns, fastbn must return. Returns both results
    (None, None where both raised)."""
    return assert_same_outcomes(outcome(torch_call), outcome(fastbn_call), what)


def assert_same_outcomes(torch_outcome, fastbn_outcome, what=""):
    """assert_same_outcome on two outcome() pairs."""
    (torch_result, torch_error), (fastbn_result, fastbn_error) = torch_outcome, fastbn_outcome
    if torch_error is not None:
        assert fastbn_error is not None, f"{what}: torch raises {type(torch_error).__name__}({torch_error}), fastbn returns"
        assert type(fastbn_error) is type(torch_error), (
            f"{what}: torch raises {type(torch_error).__name__}({str(torch_error)[:300]}), "
            f"fastbn raises {type(fastbn_error).__name__}({str(fastbn_error)[:300]})")
        return None, None
    if fastbn_error is not None:
        raise AssertionError(f"{what}: torch returns, fastbn raises {type(fastbn_error).__name__}: "
                             f"{str(fastbn_error)[:500]}") from fastbn_error
    return torch_result, fastbn_result


# The gradient checks torch's own op and module tests run, by name: reverse mode (with
# the batched check, vmap over backward, as torch's test helpers turn on), forward mode,
# double backward and forward over reverse. In fast mode (random projections of the
# Jacobian, which a wrong derivative fails too): the full Jacobians of double backward
# take about 20 s per sample of torch's module tests on this 2-core machine.
GRADIENT_CHECKS = {
    "backward": lambda f, args: torch.autograd.gradcheck(f, args, fast_mode=True, check_batched_grad=True),
    "forward_ad": lambda f, args: torch.autograd.gradcheck(f, args, fast_mode=True, check_forward_ad=True,
                                                           check_backward_ad=False, check_undefined_grad=False),
    "double_backward": lambda f, args: torch.autograd.gradgradcheck(f, args, fast_mode=True),
    "forward_over_reverse": lambda f, args: torch.autograd.gradgradcheck(f, args, fast_mode=True,
                                                                         check_fwd_over_rev=True),
}
