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
import re

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.func
from torch import nn
# torch's test material imports expecttest, a test-only package that torch does not
# depend on: installed with fastbn's test extras (and by scripts/setup.sh); where it is
# missing (a GPU machine's stock image, say), these tests say so instead of stopping the
# whole session at collection.
pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest (pip install expecttest)")
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db  # noqa: E402

import fastbn
from conftest import GRADIENT_CHECKS, assert_same_outcome, assert_same_outcomes, assert_within_budget, outcome

FASTBN_EQUIVALENT = {nn.BatchNorm1d: fastbn.BatchNorm1d, nn.BatchNorm2d: fastbn.BatchNorm2d,
                     nn.BatchNorm3d: fastbn.BatchNorm3d, nn.SyncBatchNorm: fastbn.SyncBatchNorm}

BN_MODULE_INFOS = [info for info in module_db if issubclass(info.module_cls, nn.modules.batchnorm._BatchNorm)]


def _sync_batch_norm_info():
    """torch's module_db has no SyncBatchNorm entry. Without a process group torch's and
    fastbn's SyncBatchNorm run as plain batch norm on the CPU, so BatchNorm2d's entry (its
    samples and error inputs, which do not depend on the class) checks them as modules."""
    info = copy.copy(next(info for info in BN_MODULE_INFOS if info.module_cls is nn.BatchNorm2d))
    info.module_cls = nn.SyncBatchNorm  # (its name follows the class)
    return info


if not any(info.module_cls is nn.SyncBatchNorm for info in BN_MODULE_INFOS):
    BN_MODULE_INFOS.append(_sync_batch_norm_info())


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


def _derivative_sample(info, index, desc):
    """The samples the derivative checks (gradcheck, torch.func) run on, to keep this module's
    time near a minute: those of BatchNorm2d but the ones that differ only in how the running
    statistics are updated (momentum, simple average: no derivative sees it), and the first of
    the other entries and BatchNorm1d's (N, C, L) one (fastbn's autograd code is the same for
    every rank; these cover each input layout)."""
    if info.module_cls is nn.BatchNorm2d:
        return "simple_average" not in desc and desc != "momentum"
    if info.module_cls is nn.SyncBatchNorm:  # without a process group, fastbn's batch norm (as torch's)
        return False
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


@pytest.mark.parametrize("info, dtype, training, index", DERIVATIVE_SAMPLES)
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
    """torch.autograd.gradcheck/gradgradcheck of module(x, *params) with all of them
    differentiable (reverse mode: then each alone too); torch's own module must pass the
    same check (else fastbn must fail it the same way)."""
    x, torch_bn, fast_bn, _ = sample_and_modules(info, dtype, training, index)
    if check in ("double_backward", "forward_over_reverse") and not info.supports_gradgrad:
        pytest.skip(f"torch's {info.name} declares no double backward")
    run_check = GRADIENT_CHECKS[check]
    args = _differentiable_args(torch_bn, x)
    subsets = [args]
    if check == "backward":  # and each argument alone, as torch's module tests do
        subsets += [tuple(a if i == j else a.detach() for i, a in enumerate(args)) for j in range(len(args))]
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
    if name == "vmap":
        return func.vmap(forward, in_dims=(None, 0))(params, batch)
    if name == "vmap_grad":  # per-sample gradients
        return func.vmap(func.grad(loss), in_dims=(None, 0))(params, batch)
    if name == "jvp_of_grad":  # forward over reverse
        return func.jvp(lambda inp: func.grad(loss, argnums=1)(params, inp), (x.detach(),), (tangent,))
    raise ValueError(name)


# (jvp: test_forward_ad_dual_numbers_match_torch, the same forward AD without functorch.)
FUNC_TRANSFORMS = ["grad", "jacrev", "jacfwd", "vmap", "vmap_grad", "jvp_of_grad"]


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


# The generic checks of torch's test/test_modules.py that mean something on a CPU, per
# batch-norm entry, dtype and mode, over all of the entry's samples, fastbn's module
# against torch's. (Not here: the CUDA-only ones, cpu/gpu parity and device transfer, and
# test_check_inplace, which covers modules whose torch constructor takes `inplace`.)
ENTRIES = [pytest.param(info, dtype, training, marks=_info_param(info).marks,
                        id=f"{info.name.removeprefix('nn.')}-{str(dtype).removeprefix('torch.')}-"
                           f"{'train' if training else 'eval'}")
           for info in BN_MODULE_INFOS for dtype in sorted(info.dtypes, key=str) for training in (True, False)]


def _constructors(info, dtype, training):
    for sample in _samples(info, dtype, training, requires_grad=False):
        yield sample, sample.constructor_input.args, dict(sample.constructor_input.kwargs)


def _tensor_metadata(module):
    return {name: (t.shape, t.dtype, t.device, t.requires_grad, t.stride())
            for name, t in list(module.named_parameters()) + list(module.named_buffers())}


@pytest.mark.parametrize("info, dtype, training", ENTRIES)
def test_factory_kwargs_and_casts_match_torch(info, dtype, training):
    """device=/dtype= in the constructor, then .float()/.double()/.half()/.bfloat16() with a
    forward after each: the same parameters and buffers (shape, dtype, device,
    requires_grad, strides) as torch's, and torch's output (within the error budget
    against torch's module in float64)."""
    for sample, args, kwargs in _constructors(info, dtype, training):
        torch_bn = info.module_cls(*args, **kwargs, device="cpu", dtype=dtype).train(training)
        fast_bn = FASTBN_EQUIVALENT[info.module_cls](*args, **kwargs, device="cpu", dtype=dtype).train(training)
        assert _tensor_metadata(fast_bn) == _tensor_metadata(torch_bn)
        x = sample.forward_input.args[0]
        for cast, cast_dtype in (("float", torch.float32), ("double", torch.float64), ("half", torch.float16),
                                 ("bfloat16", torch.bfloat16)):
            getattr(torch_bn, cast)()
            getattr(fast_bn, cast)()
            assert _tensor_metadata(fast_bn) == _tensor_metadata(torch_bn), f"after .{cast}()"
            reference_bn = copy.deepcopy(torch_bn).double()
            torch_out, fast_out = assert_same_outcome(lambda: torch_bn(x.to(cast_dtype)),
                                                      lambda: fast_bn(x.to(cast_dtype)), f".{cast}()")
            if torch_out is not None:
                assert_within_budget(fast_out, torch_out, reference_bn(x.double()), f"output after .{cast}()")


@pytest.mark.parametrize("info, dtype, training", ENTRIES)
def test_repr_matches_torch(info, dtype, training):
    for _, args, kwargs in _constructors(info, dtype, training):
        torch_bn, fast_bn = info.module_cls(*args, **kwargs), FASTBN_EQUIVALENT[info.module_cls](*args, **kwargs)
        assert repr(fast_bn) == repr(torch_bn), "repr (the class name aside, which the two share)"
        assert str(fast_bn) == str(torch_bn)


@pytest.mark.parametrize("info, dtype, training", ENTRIES)
def test_pickle_and_deepcopy_give_the_same_module(info, dtype, training):
    """torch.save/torch.load, pickle and deepcopy after a forward: a fastbn module of the same
    class with the same state, whose next forward gives what the original's gives."""
    for index, sample in enumerate(_samples(info, dtype, training, requires_grad=False)):
        x, _, fast_bn, _ = sample_and_modules(info, dtype, training, index)
        fast_bn(x)
        saved_state = copy.deepcopy(fast_bn.state_dict())
        buffer = io.BytesIO()
        torch.save(fast_bn, buffer)
        buffer.seek(0)
        copies = [torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(fast_bn)), copy.deepcopy(fast_bn)]
        for copied in copies:
            assert type(copied) is type(fast_bn) and copied.training == fast_bn.training
            torch.testing.assert_close(copied.state_dict(), saved_state)
        expected = fast_bn(x)
        for copied in copies:
            torch.testing.assert_close(copied(x), expected)
            torch.testing.assert_close(copied.state_dict(), fast_bn.state_dict())


def _noncontiguous(t):
    """The same values in a tensor whose last dimension has stride 2."""
    spaced = torch.empty(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)[..., ::2]
    spaced.copy_(t.detach())
    return spaced.requires_grad_(t.requires_grad)


@pytest.mark.parametrize("info, dtype, training", ENTRIES)
def test_non_contiguous_input_and_grad_match_torch(info, dtype, training):
    """Every combination of contiguous and non-contiguous input and grad_output gives torch's
    output and grads on the same combination."""
    for index, sample in enumerate(_samples(info, dtype, training)):
        x, torch_bn, fast_bn, reference_bn = sample_and_modules(info, dtype, training, index)
        grad_output = (0.5 + torch.randn(x.shape, dtype=torch.float64)).to(dtype)
        for x_variant in (x, _noncontiguous(x)):
            for g_variant in (grad_output, _noncontiguous(grad_output)):
                results = []
                for module in (fast_bn, torch_bn, reference_bn):
                    leaf = x_variant.detach().to(module.running_mean.dtype if module.running_mean is not None else
                                                 (torch.float64 if module is reference_bn else dtype)).requires_grad_()
                    out = module(leaf)
                    params = list(module.parameters())
                    grads = torch.autograd.grad(out, [leaf] + params, g_variant.to(out.dtype))
                    results.append((out,) + grads)
                for what, (fast_value, torch_value, reference_value) in enumerate(zip(*results)):
                    assert_within_budget(fast_value, torch_value, reference_value,
                                         f"sample {index}, {'output' if what == 0 else f'grad {what - 1}'}")


def _memory_formats(x):
    if x.dim() == 4:
        return (torch.contiguous_format, torch.channels_last)
    if x.dim() == 5:
        return (torch.contiguous_format, torch.channels_last_3d)
    return (torch.contiguous_format,)


def _layout(t):
    """Which of the dense layouts a tensor is in (all that hold, as a tuple)."""
    formats = [torch.contiguous_format, torch.channels_last, torch.channels_last_3d]
    return tuple(f for f in formats if (t.dim() == 4 or f != torch.channels_last) and
                 (t.dim() == 5 or f != torch.channels_last_3d) and t.is_contiguous(memory_format=f))


@pytest.mark.parametrize("info, dtype, training", ENTRIES)
def test_memory_format_matches_torch(info, dtype, training):
    """channels_last inputs (and the module moved to each memory format, a no-op for 1-D
    parameters): output and grad_input in torch's layout, with torch's values."""
    for index, sample in enumerate(_samples(info, dtype, training)):
        x, torch_bn, fast_bn, reference_bn = sample_and_modules(info, dtype, training, index)
        grad_output = torch.rand(x.shape, dtype=torch.float64)
        for input_format in _memory_formats(x):
            for module_format in _memory_formats(x):
                results = []
                for module, module_dtype in ((fast_bn, dtype), (torch_bn, dtype), (reference_bn, torch.float64)):
                    module.to(memory_format=module_format)
                    leaf = x.detach().to(module_dtype).contiguous(memory_format=input_format).requires_grad_()
                    out = module(leaf)
                    (grad_input,) = torch.autograd.grad(out, leaf, grad_output.to(module_dtype).contiguous(
                        memory_format=input_format))
                    results.append((out, grad_input))
                (fast_out, fast_grad), (torch_out, torch_grad), (ref_out, ref_grad) = results
                what = f"sample {index}, input {input_format}, module {module_format}"
                assert _layout(fast_out) == _layout(torch_out), f"{what}: output layout"
                assert _layout(fast_grad) == _layout(torch_grad), f"{what}: grad_input layout"
                assert_within_budget(fast_out, torch_out, ref_out, f"{what}: output")
                assert_within_budget(fast_grad, torch_grad, ref_grad, f"{what}: grad_input")


@pytest.mark.parametrize("info, dtype, training", ENTRIES)
def test_forward_reads_the_training_flag_as_torch_does(info, dtype, training):
    """Without its `training` attribute, the module fails as torch's does (AttributeError
    naming 'training'): it reads the mode on every forward, as the ModuleInfo declares."""
    for sample, args, kwargs in _constructors(info, dtype, training):
        modules = [cls(*args, **kwargs).to(dtype) for cls in (info.module_cls, FASTBN_EQUIVALENT[info.module_cls])]
        errors = []
        for module in modules:
            module.train(training)
            delattr(module, "training")
            errors.append(outcome(lambda: module(sample.forward_input.args[0]))[1])
        torch_error, fast_error = errors
        assert isinstance(torch_error, AttributeError) and "'training'" in str(torch_error)
        assert isinstance(fast_error, AttributeError) and "'training'" in str(fast_error), fast_error


@pytest.mark.parametrize("info, dtype, training", ENTRIES)
def test_construction_under_meta_device_matches_cpu(info, dtype, training):
    """Built under `with torch.device('meta')`: meta parameters and buffers with the
    metadata of a CPU-built module (torch's test_device_ctx_init)."""
    for _, args, kwargs in _constructors(info, dtype, training):
        cpu_bn = FASTBN_EQUIVALENT[info.module_cls](*args, **kwargs)
        with torch.device("meta"):
            meta_bn = FASTBN_EQUIVALENT[info.module_cls](*args, **kwargs)
        cpu_meta, on_meta = _tensor_metadata(cpu_bn), _tensor_metadata(meta_bn)
        assert all(device.type == "meta" for (_, _, device, _, _) in on_meta.values())
        assert {n: m[:2] + m[3:] for n, m in on_meta.items()} == {n: m[:2] + m[3:] for n, m in cpu_meta.items()}


@pytest.mark.parametrize("info, dtype, training", ENTRIES)
def test_module_error_inputs_raise_torchs_error(info, dtype, training):
    """The ModuleInfo's error inputs, through torch's module and fastbn's: torch's outcome
    (in eval mode torch accepts eps=0 and words eps=-1 otherwise), the ModuleInfo's message
    pattern wherever torch's message matches it, and (fastbn's rule) nothing changed by a
    refused forward."""
    if info.module_error_inputs_func is None:
        pytest.skip(f"torch's {info.name} lists no error inputs")
    errors = info.module_error_inputs_func(info, device="cpu", dtype=dtype, requires_grad=False, training=training)
    for error in errors:
        sample = error.module_error_input
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        if error.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
            torch_outcome = outcome(lambda: info.module_cls(*args, **kwargs))
            fast_outcome = outcome(lambda: FASTBN_EQUIVALENT[info.module_cls](*args, **kwargs))
        else:
            torch_bn, fast_bn = (cls(*args, **kwargs).to(dtype).train(training)
                                 for cls in (info.module_cls, FASTBN_EQUIVALENT[info.module_cls]))
            before = copy.deepcopy(fast_bn.state_dict())
            torch_outcome = outcome(lambda: torch_bn(*sample.forward_input.args, **sample.forward_input.kwargs))
            fast_outcome = outcome(lambda: fast_bn(*sample.forward_input.args, **sample.forward_input.kwargs))
            if fast_outcome[1] is not None:
                torch.testing.assert_close(fast_bn.state_dict(), before, msg="a refused forward changed the state")
        what = f"{error.error_on.name} {args} {kwargs}"
        assert_same_outcomes(torch_outcome, fast_outcome, what)
        if torch_outcome[1] is not None and re.search(error.error_regex, str(torch_outcome[1])):
            assert re.search(error.error_regex, str(fast_outcome[1])), (
                f"{what}: fastbn's message {str(fast_outcome[1])!r} does not match {error.error_regex!r}, torch's does")


# From torch's test_nn.py and test/nn/test_load_state_dict.py: the batch-norm cases that
# are about the module's Python behaviour (fastbn's modules inherit torch's, but forward is
# theirs), each compared with torch's module.
@pytest.mark.parametrize("info, dtype, training", ENTRIES)
def test_buffers_kept_when_tracking_is_turned_off_after_construction(info, dtype, training):
    """track_running_stats=False set on a module that has running statistics: torch normalizes
    with the batch's statistics in training and leaves the buffers alone, and with the
    buffers in eval; fastbn must do the same."""
    x, torch_bn, fast_bn, reference_bn = sample_and_modules(info, dtype, training, 0)
    for module in (torch_bn, fast_bn, reference_bn):
        module.track_running_stats = False
    outputs = [m(x.detach().to(d)) for m, d in ((fast_bn, dtype), (torch_bn, dtype), (reference_bn, torch.float64))]
    assert_within_budget(*outputs, "output")
    assert_state_within_budget(fast_bn, torch_bn, reference_bn, "buffers")


@pytest.mark.parametrize("info", [_info_param(info) for info in BN_MODULE_INFOS])
def test_load_state_dict_versions_and_assign_match_torch(info):
    """A version-1 state_dict (before num_batches_tracked), a strict load with a key missing,
    and load_state_dict(assign=True) into a module built on the meta device: torch's outcome."""
    sample = _samples(info, torch.float32, True, requires_grad=False)[0]
    torch_bn, fast_bn, _ = module_trio(info, sample, torch.float32, True)
    old_state = torch_bn.state_dict()
    del old_state["num_batches_tracked"]
    old_state._metadata[""]["version"] = 1
    for module in (torch_bn, fast_bn):
        module.load_state_dict(old_state)
    assert fast_bn.num_batches_tracked.item() == torch_bn.num_batches_tracked.item()
    assert fast_bn.state_dict().keys() == torch_bn.state_dict().keys()
    assert fast_bn.state_dict()._metadata[""]["version"] == torch_bn.state_dict()._metadata[""]["version"]

    missing = {k: v for k, v in torch_bn.state_dict().items() if k != "running_var"}
    assert_same_outcome(lambda: torch_bn.load_state_dict(missing), lambda: fast_bn.load_state_dict(missing),
                        "strict load without running_var")

    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    with torch.device("meta"):
        torch_meta, fast_meta = info.module_cls(*args, **kwargs), FASTBN_EQUIVALENT[info.module_cls](*args, **kwargs)
    torch_meta.load_state_dict(torch_bn.state_dict(), assign=True)
    fast_meta.load_state_dict(torch_bn.state_dict(), assign=True)
    x = sample.forward_input.args[0]
    torch.testing.assert_close(fast_meta(x), torch_meta(x))
    torch.testing.assert_close(fast_meta.state_dict(), torch_meta.state_dict())


def _other_float(dtype):
    return torch.float32 if dtype == torch.float64 else torch.float64


# Odd and bad calls of a module (as test_nn.py's batch-norm tests make them), each a change
# to the sample's input or to how the module is called: torch's module decides the outcome.
MODULE_CALLS = {
    "input_without_batch_dim": lambda m, x, dtype: m(x[0]),
    "input_with_extra_dim": lambda m, x, dtype: m(x.unsqueeze(-1)),
    "one_more_channel": lambda m, x, dtype: m(torch.cat([x, x[:, :1]], 1)),
    "batch_of_one": lambda m, x, dtype: m(x[:1]),
    "input_in_other_float_dtype": lambda m, x, dtype: m(x.to(_other_float(dtype))),
    "empty_batch_in_other_float_dtype": lambda m, x, dtype: m(x[:0].to(_other_float(dtype))),
    "input_float16": lambda m, x, dtype: m(x.half()),
    "input_int64": lambda m, x, dtype: m(x.long()),
    "input_on_meta": lambda m, x, dtype: m(x.to("meta")),
    "frozen_parameters": lambda m, x, dtype: _backward(m.requires_grad_(False), x),
    "input_not_requiring_grad": lambda m, x, dtype: _backward(m, x.detach()),
    "under_no_grad": lambda m, x, dtype: _in_context(torch.no_grad, m, x),
    "under_inference_mode": lambda m, x, dtype: _in_context(torch.inference_mode, m, x),
    "twice_then_backward_of_both": lambda m, x, dtype: _backward_of_two(m, x),
    "under_autocast_bfloat16": lambda m, x, dtype: _in_context(lambda: torch.autocast("cpu", torch.bfloat16), m, x),
    "functional_call_with_other_buffers": lambda m, x, dtype: _with_other_buffers(m, x),
    "input_changed_before_backward": lambda m, x, dtype: _change_before_backward(m, x, lambda leaf: leaf.add_(1)),
    "weight_changed_before_backward": lambda m, x, dtype: _change_before_backward(
        m, x, lambda leaf: m.weight.add_(1) if m.weight is not None else None),
}


def _backward(module, x):
    """Output and grads of every leaf that requires grad (input and parameters)."""
    leaves = [t for t in (x, *module.parameters()) if t.requires_grad]
    output = module(x)
    grads = torch.autograd.grad(output, leaves, torch.ones_like(output)) if output.requires_grad else ()
    return (output, *grads)


def _in_context(context, module, x):
    with context():
        return module(x).clone()


def _with_other_buffers(module, x):
    """torch.func.functional_call with running statistics of the caller's: those are the
    ones read and updated."""
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    output = torch.func.functional_call(module, buffers, (x,))
    return (output, *buffers.values())


def _change_before_backward(module, x, change):
    """A tensor backward needs, changed in place (bumping its version) between forward and
    backward (autograd refuses that where it saved the tensor)."""
    leaf = x.detach().clone().requires_grad_()
    output = module(leaf)
    with torch.no_grad():
        change(leaf)
    output.sum().backward()
    return output, leaf.grad


def _backward_of_two(module, x):
    leaf = x.detach().requires_grad_()
    first, second = module(leaf), module(2 * leaf + 1)
    (first * second).sum().backward()
    return first, second, leaf.grad, *[p.grad for p in module.parameters()]


@pytest.mark.parametrize("call", list(MODULE_CALLS))
@pytest.mark.parametrize("info, dtype, training", ENTRIES)
def test_module_call_matches_torch(info, dtype, training, call):
    """torch's outcome (its results and state after the call, within torch's default
    tolerances) or torch's exception type; a call fastbn refuses changes none of the
    module's state."""
    x, torch_bn, fast_bn, _ = sample_and_modules(info, dtype, training, 0)
    before = copy.deepcopy(fast_bn.state_dict())
    torch_outcome = outcome(lambda: MODULE_CALLS[call](torch_bn, x, dtype))
    fast_outcome = outcome(lambda: MODULE_CALLS[call](fast_bn, x, dtype))
    if fast_outcome[1] is not None and not call.endswith("_before_backward"):  # (those fail after a forward)
        torch.testing.assert_close(fast_bn.state_dict(), before, msg="a refused call changed the module's state")
    torch_result, fast_result = assert_same_outcomes(torch_outcome, fast_outcome, call)
    if torch_result is None:
        return
    torch_result = torch_result if isinstance(torch_result, tuple) else (torch_result,)
    fast_result = fast_result if isinstance(fast_result, tuple) else (fast_result,)
    assert len(fast_result) == len(torch_result)
    for position, (fast_value, torch_value) in enumerate(zip(fast_result, torch_result)):
        assert (fast_value.shape, fast_value.dtype, fast_value.device) == \
            (torch_value.shape, torch_value.dtype, torch_value.device), f"result {position}"
        if torch_value.device.type != "meta":
            # (precision is test_forward_backward_and_state_match_torch's: here torch's tolerances)
            torch.testing.assert_close(fast_value, torch_value, msg=f"result {position}")
    torch.testing.assert_close(fast_bn.state_dict(), torch_bn.state_dict(), msg="state after the call")
