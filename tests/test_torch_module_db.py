"""fastbn's modules on the batch-norm entries of torch's own module test database.

torch.testing._internal.common_modules.module_db (shipped with torch) lists, per module,
the constructor arguments and inputs torch tests it with. Every sample of the batch-norm
entries runs here through torch's module and fastbn's, built with the same arguments and
the same (random) state, and fastbn must do what torch does: the same outputs, grads,
running statistics and num_batches_tracked; the same results under forward AD, gradcheck
and the torch.func transforms; the same errors. Then the generic checks torch's
test/test_modules.py runs per module (those that mean something on a CPU), and a few
state_dict cases of test/nn/test_load_state_dict.py, each against torch's module.

Nothing here is compared with a fixed expectation: torch on the same sample is the answer.
"""
import copy
import io
import pickle

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.func
from torch import nn
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db

import fastbn
from conftest import GRADIENT_CHECKS, assert_same_outcome, assert_within_budget, outcome

FASTBN_EQUIVALENT = {nn.BatchNorm1d: fastbn.BatchNorm1d, nn.BatchNorm2d: fastbn.BatchNorm2d,
                     nn.BatchNorm3d: fastbn.BatchNorm3d, nn.SyncBatchNorm: fastbn.SyncBatchNorm}

BN_MODULE_INFOS = [info for info in module_db if issubclass(info.module_cls, nn.modules.batchnorm._BatchNorm)]


def _info_param(info):
    name = info.name.removeprefix("nn.")
    if info.module_cls not in FASTBN_EQUIVALENT:
        # LazyBatchNorm* (not in torch's module_db at the time of writing): fastbn has no lazy modules.
        return pytest.param(info, id=name, marks=pytest.mark.skip(reason=f"fastbn has no equivalent of {name}"))
    return pytest.param(info, id=name)


def _samples(info, dtype, training, requires_grad=True):
    return info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=requires_grad, training=training)


def _sample_params(dtypes_of=lambda info: info.dtypes, keep=lambda info, index, desc: True):
    """(info, dtype, training, sample index) for every sample of every batch-norm entry, with
    readable ids (the sample's description is its constructor arguments' story)."""
    params = []
    for info in BN_MODULE_INFOS:
        for training in (True, False):
            descriptions = [s.desc for s in _samples(info, torch.float64, training)]
            for dtype in sorted(dtypes_of(info), key=str):
                for index, desc in enumerate(descriptions):
                    if not keep(info, index, desc):
                        continue
                    marks = _info_param(info).marks
                    ident = (f"{info.name.removeprefix('nn.')}-{str(dtype).removeprefix('torch.')}-"
                             f"{'train' if training else 'eval'}-{index}{'-' + desc if desc else ''}")
                    params.append(pytest.param(info, dtype, training, index, id=ident, marks=marks))
    return params


SAMPLES = _sample_params()
SAMPLES_FLOAT64 = _sample_params(lambda info: [torch.float64])


def _derivative_sample(info, index, desc):
    """The samples the derivative checks (gradcheck, torch.func) run on, to keep this module's
    time near a minute: those of BatchNorm2d but the ones that differ only in how the running
    statistics are updated (momentum, simple average: no derivative sees it), and the first of
    the other entries and BatchNorm1d's (N, C, L) one (fastbn's autograd code is the same for
    every rank; these cover each input layout)."""
    if info.module_cls is nn.BatchNorm2d:
        return "simple_average" not in desc and desc != "momentum"
    return index == 0 or desc == "3d_input"


DERIVATIVE_SAMPLES = _sample_params(lambda info: [torch.float64], _derivative_sample)


def randomize_state(module):
    """Weights, biases, running statistics and num_batches_tracked away from their initial
    values (weight 1, bias 0, mean 0, var 1 would hide a swapped or ignored argument)."""
    with torch.no_grad():
        if module.weight is not None:
            module.weight.copy_(1 + 0.5 * torch.randn_like(module.weight))
        if module.bias is not None:
            module.bias.copy_(0.5 * torch.randn_like(module.bias))
        if module.running_mean is not None:
            module.running_mean.copy_(torch.randn_like(module.running_mean))
            module.running_var.copy_(0.5 + torch.rand_like(module.running_var))
            module.num_batches_tracked.fill_(3)


def module_trio(info, sample, dtype, training):
    """torch's module and fastbn's in `dtype`, and torch's in float64 (the reference), all
    built from the sample's constructor arguments and holding one random state."""
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    torch_bn = info.module_cls(*args, **kwargs)
    randomize_state(torch_bn)
    fast_bn = FASTBN_EQUIVALENT[info.module_cls](*args, **kwargs)
    fast_bn.load_state_dict(torch_bn.state_dict())
    reference_bn = copy.deepcopy(torch_bn).double()
    torch_bn.to(dtype)
    fast_bn.to(dtype)
    for module in (torch_bn, fast_bn, reference_bn):
        module.train(training)
    return torch_bn, fast_bn, reference_bn


def sample_and_modules(info, dtype, training, index):
    sample = _samples(info, dtype, training)[index]
    return (sample.forward_input.args[0],) + module_trio(info, sample, dtype, training)


def assert_state_within_budget(fast_bn, torch_bn, reference_bn, what):
    """Running statistics (within the error budget) and num_batches_tracked (exactly)."""
    for name in ("running_mean", "running_var"):
        fast, ours, ref = (getattr(m, name) for m in (fast_bn, torch_bn, reference_bn))
        assert (fast is None) == (ours is None), f"{what}: {name}"
        if fast is not None:
            assert_within_budget(fast, ours, ref, f"{what}: {name}")
    assert (fast_bn.num_batches_tracked is None) == (torch_bn.num_batches_tracked is None)
    if torch_bn.num_batches_tracked is not None:
        assert fast_bn.num_batches_tracked.item() == torch_bn.num_batches_tracked.item(), f"{what}: num_batches_tracked"
        assert fast_bn.num_batches_tracked.dtype == torch_bn.num_batches_tracked.dtype


def run_step(module, x, dtype, grad_output):
    """One forward and backward on a fresh leaf copy of x: (output, grad_input, param grads)."""
    for p in module.parameters():
        p.grad = None
    leaf = x.detach().to(dtype).requires_grad_()
    output = module(leaf)
    output.backward(grad_output.to(dtype))
    return output, leaf.grad, {name: p.grad for name, p in module.named_parameters()}


@pytest.mark.parametrize("info, dtype, training, index", SAMPLES)
def test_forward_backward_and_state_match_torch(info, dtype, training, index):
    """Output, grad_input, grad_weight, grad_bias, running stats and num_batches_tracked over
    two steps (the second sees the first's running statistics and, with momentum=None, count)."""
    x, torch_bn, fast_bn, reference_bn = sample_and_modules(info, dtype, training, index)
    for step in range(2):
        grad_output = 0.5 + torch.randn(x.shape, dtype=torch.float64)
        results = [run_step(m, x, d, grad_output) for m, d in
                   ((fast_bn, dtype), (torch_bn, dtype), (reference_bn, torch.float64))]
        (fast_out, fast_gin, fast_gp), (torch_out, torch_gin, torch_gp), (ref_out, ref_gin, ref_gp) = results
        assert_within_budget(fast_out, torch_out, ref_out, f"step {step}: output")
        assert_within_budget(fast_gin, torch_gin, ref_gin, f"step {step}: grad_input")
        assert fast_gp.keys() == torch_gp.keys()
        for name in torch_gp:
            assert_within_budget(fast_gp[name], torch_gp[name], ref_gp[name], f"step {step}: grad_{name}")
        assert_state_within_budget(fast_bn, torch_bn, reference_bn, f"step {step}")


def with_tangents(module, x, tangent_input, tangent_params):
    """Output and its tangent of module(x) under torch.autograd.forward_ad, with dual input and
    dual parameters (through torch.func.functional_call)."""
    with fwAD.dual_level():
        params = {name: fwAD.make_dual(p.detach(), tangent_params[name]) for name, p in module.named_parameters()}
        dual_output = torch.func.functional_call(module, params, (fwAD.make_dual(x.detach(), tangent_input),))
        primal, tangent = fwAD.unpack_dual(dual_output)
    return primal, tangent


@pytest.mark.parametrize("info, dtype, training, index", SAMPLES_FLOAT64)
def test_forward_ad_dual_numbers_match_torch(info, dtype, training, index):
    x, torch_bn, fast_bn, _ = sample_and_modules(info, dtype, training, index)
    tangent_input = torch.randn_like(x)
    tangent_params = {name: torch.randn_like(p) for name, p in torch_bn.named_parameters()}
    torch_out, torch_tangent = with_tangents(torch_bn, x, tangent_input, tangent_params)
    fast_out, fast_tangent = with_tangents(fast_bn, x, tangent_input, tangent_params)
    torch.testing.assert_close(fast_out, torch_out)
    assert torch_tangent is not None
    assert fast_tangent is not None, "fastbn's output has no tangent (forward AD dropped it)"
    torch.testing.assert_close(fast_tangent, torch_tangent)
    assert_state_within_budget(fast_bn, torch_bn, torch_bn, "after forward AD")


def _differentiable_args(module, x):
    return (x.detach().requires_grad_(),) + tuple(p.detach().requires_grad_() for _, p in module.named_parameters())


def _as_function(module):
    """module(x) as a function of (x, *parameters), for gradcheck."""
    names = [name for name, _ in module.named_parameters()]

    def call(x, *params):
        return torch.func.functional_call(module, dict(zip(names, params)), (x,))
    return call


@pytest.mark.parametrize("check", list(GRADIENT_CHECKS))
@pytest.mark.parametrize("info, dtype, training, index", DERIVATIVE_SAMPLES)
def test_gradcheck_matches_torch(info, dtype, training, index, check):
    """torch.autograd.gradcheck/gradgradcheck of module(x, *params) for every sample, first with
    all of them differentiable, then each alone (as torch's module tests do); torch's own
    module must pass the same check (else fastbn must fail it the same way)."""
    x, torch_bn, fast_bn, _ = sample_and_modules(info, dtype, training, index)
    if check in ("double_backward", "forward_over_reverse") and not info.supports_gradgrad:
        pytest.skip(f"torch's {info.name} declares no double backward")
    run_check = GRADIENT_CHECKS[check]
    args = _differentiable_args(torch_bn, x)
    subsets = [args] + [tuple(a if i == j else a.detach() for i, a in enumerate(args)) for j in range(len(args))]
    for which, subset in enumerate(subsets):
        assert_same_outcome(lambda: run_check(_as_function(torch_bn), subset),
                            lambda: run_check(_as_function(fast_bn), subset),
                            f"{check} with {'all arguments' if which == 0 else f'argument {which - 1} alone'}")


def _func_transform(name, module, x):
    """One torch.func transform of module (as a function of its parameters and input)."""
    params = {n: p.detach() for n, p in module.named_parameters()}
    # fixed random directions (seeded per test), the same for torch's module and fastbn's
    generator = torch.Generator().manual_seed(1)
    weights = torch.randn(x.shape, dtype=x.dtype, generator=generator)
    tangent = torch.randn(x.shape, dtype=x.dtype, generator=generator)
    tangent_params = {n: torch.randn(p.shape, dtype=p.dtype, generator=generator) for n, p in params.items()}
    batch = torch.stack([x.detach(), 2 * x.detach() + 1])

    def forward(p, inp):
        return torch.func.functional_call(module, p, (inp,))

    def loss(p, inp):
        return (forward(p, inp) * weights).sum()

    func = torch.func
    if name == "grad":
        return func.grad(loss, argnums=(0, 1))(params, x.detach())
    if name == "jacrev":
        return func.jacrev(forward, argnums=(0, 1))(params, x.detach())
    if name == "jacfwd":
        return func.jacfwd(forward, argnums=(0, 1))(params, x.detach())
    if name == "jvp":
        return func.jvp(forward, (params, x.detach()), (tangent_params, tangent))
    if name == "vmap":
        return func.vmap(forward, in_dims=(None, 0))(params, batch)
    if name == "vmap_grad":  # per-sample gradients
        return func.vmap(func.grad(loss), in_dims=(None, 0))(params, batch)
    if name == "jvp_of_grad":  # forward over reverse
        return func.jvp(lambda inp: func.grad(loss, argnums=1)(params, inp), (x.detach(),), (tangent,))
    raise ValueError(name)


FUNC_TRANSFORMS = ["grad", "jacrev", "jacfwd", "jvp", "vmap", "vmap_grad", "jvp_of_grad"]


# In eval mode a module without running statistics normalizes with the batch's, as in
# training: that case is the training one.
TRANSFORM_SAMPLES = [pytest.param(*p.values, running_stats, id=f"{p.id}-stats_{running_stats}", marks=p.marks)
                     for p in DERIVATIVE_SAMPLES for running_stats in (("kept", "removed") if p.values[2] else ("kept",))]


@pytest.mark.parametrize("transform", FUNC_TRANSFORMS)
@pytest.mark.parametrize("info, dtype, training, index, running_stats", TRANSFORM_SAMPLES)
def test_func_transforms_match_torch(info, dtype, training, index, transform, running_stats):
    """torch.func on the module as sampled, and with its running statistics removed by
    torch.func.replace_all_batch_norm_modules_ (torch's documented way to use batch norm
    in training under vmap/grad): torch's result, or torch's exception type."""
    x, torch_bn, fast_bn, _ = sample_and_modules(info, dtype, training, index)
    if running_stats == "removed":
        for module in (torch_bn, fast_bn):
            torch.func.replace_all_batch_norm_modules_(module)
    torch_result, fast_result = assert_same_outcome(lambda: _func_transform(transform, torch_bn, x),
                                                    lambda: _func_transform(transform, fast_bn, x), transform)
    if torch_result is not None:  # both returned (where torch raises, its state is no yardstick)
        torch.testing.assert_close(fast_result, torch_result)
        assert_state_within_budget(fast_bn, torch_bn, torch_bn, f"after {transform}")
