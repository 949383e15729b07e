"""fastbn.functional.batch_norm on the samples of torch's own op test database, and on bad inputs.

torch.testing._internal.common_methods_invocations.op_db (shipped with torch) holds the
inputs torch tests F.batch_norm with ("nn.functional.batch_norm": odd shapes, negative
momentum, large eps, 1-D empty input, no running statistics, ...). Each sample runs
through F.batch_norm and fastbn.functional.batch_norm on copies of the same tensors;
fastbn must do what torch does: the same outputs, in-place running-statistics updates and
grads (within the error budget against a float64 reference), the same results under
gradcheck and forward AD, and where torch raises, an exception of torch's type.

The op has no error_inputs_func in op_db, so the bad inputs are made here, one change to
a valid call each, and again compared with what torch does with them (never with a fixed
expectation); when fastbn refuses a call, nothing it could write has changed.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F
# torch's test material imports expecttest, a test-only package that torch does not
# depend on: installed with fastbn's test extras (and by scripts/setup.sh); where it is
# missing (a GPU machine's stock image, say), these tests say so instead of stopping the
# whole session at collection.
pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest (pip install expecttest)")
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402

import fastbn
from conftest import GRADIENT_CHECKS, assert_same_outcome, assert_same_outcomes, assert_within_budget, outcome

BATCH_NORM_OPINFO = next(op for op in op_db if op.name == "nn.functional.batch_norm" and op.variant_test_name == "")
OP_DTYPES = sorted(BATCH_NORM_OPINFO.supported_dtypes("cpu"), key=str)


def _samples(dtype):
    return list(BATCH_NORM_OPINFO.sample_inputs("cpu", dtype, requires_grad=True))


def _describe(sample):
    shape = "x".join(map(str, sample.input.shape)) or "scalar"
    stats = "stats" if sample.args[0] is not None else "nostats"
    affine = "affine" if sample.args[2] is not None else "noaffine"
    kwargs = "-".join(f"{k}={v}" for k, v in sample.kwargs.items())
    return "-".join(filter(None, (shape, stats, affine, kwargs)))


def _sample_params(dtypes):
    return [pytest.param(dtype, index, id=f"{str(dtype).removeprefix('torch.')}-{index}-{_describe(sample)}")
            for dtype in dtypes for index, sample in enumerate(_samples(dtype))]


def copy_arguments(sample, dtype=None):
    """A fresh copy of the sample's (input, running_mean, running_var, weight, bias), leaves
    that require grad as the sample's do; in `dtype` where given (the float64 reference)."""
    def fresh(t):
        if not isinstance(t, torch.Tensor):
            return t
        return t.detach().to(dtype or t.dtype).clone().requires_grad_(t.requires_grad)
    return [fresh(t) for t in (sample.input, *sample.args)]


def differentiable(arguments):
    return [t for t in arguments if isinstance(t, torch.Tensor) and t.requires_grad]


@pytest.mark.parametrize("dtype, index", _sample_params(OP_DTYPES))
def test_sample_matches_torch(dtype, index):
    """Output, running statistics updated in place, and grads of every differentiable argument."""
    sample = _samples(dtype)[index]
    torch_args, fast_args, reference_args = copy_arguments(sample), copy_arguments(sample), \
        copy_arguments(sample, torch.float64)
    torch_out, fast_out = assert_same_outcome(lambda: F.batch_norm(*torch_args, **sample.kwargs),
                                              lambda: fastbn.functional.batch_norm(*fast_args, **sample.kwargs))
    if torch_out is None:
        return
    reference_out = F.batch_norm(*reference_args, **sample.kwargs)
    assert_within_budget(fast_out, torch_out, reference_out, "output")
    for position, name in ((1, "running_mean"), (2, "running_var")):
        if torch_args[position] is not None:
            assert_within_budget(fast_args[position], torch_args[position], reference_args[position], name)
    grad_output = 0.5 + torch.randn(torch_out.shape, dtype=torch.float64)
    grads = [torch.autograd.grad(out, differentiable(args), grad_output.to(out.dtype), allow_unused=True)
             for out, args in ((fast_out, fast_args), (torch_out, torch_args), (reference_out, reference_args))]
    for position, (fast_grad, torch_grad, reference_grad) in enumerate(zip(*grads)):
        assert (fast_grad is None) == (torch_grad is None), f"grad of differentiable argument {position}"
        if torch_grad is not None:
            assert_within_budget(fast_grad, torch_grad, reference_grad, f"grad of differentiable argument {position}")


def _as_function(batch_norm, sample, arguments):
    """batch_norm(...) as a function of the sample's differentiable arguments (for gradcheck)."""
    positions = [i for i, t in enumerate(arguments) if isinstance(t, torch.Tensor) and t.requires_grad]

    def call(*values):
        args = list(arguments)
        for position, value in zip(positions, values):
            args[position] = value
        return batch_norm(*args, **sample.kwargs)
    return call


@pytest.mark.parametrize("check", list(GRADIENT_CHECKS))
@pytest.mark.parametrize("dtype, index", _sample_params([torch.float64]))
def test_gradcheck_matches_torch(dtype, index, check):
    """gradcheck/gradgradcheck (reverse, batched, forward AD, double backward, forward over
    reverse) of batch_norm in its differentiable arguments: where torch's F.batch_norm passes,
    fastbn's must; where torch's check raises, fastbn's must raise the same type."""
    sample = _samples(dtype)[index]
    torch_args, fast_args = copy_arguments(sample), copy_arguments(sample)
    assert_same_outcome(lambda: GRADIENT_CHECKS[check](_as_function(F.batch_norm, sample, torch_args),
                                                       differentiable(torch_args)),
                        lambda: GRADIENT_CHECKS[check](_as_function(fastbn.functional.batch_norm, sample, fast_args),
                                                       differentiable(fast_args)), check)


# Bad (and odd) inputs: one change to a valid call (C = 3 channels, running statistics and
# affine parameters), as keyword arguments of F.batch_norm. Each builds fresh tensors.
C = 3


def _valid(dtype=torch.float32, shape=(4, C, 5)):
    return dict(input=2 + torch.randn(shape, dtype=dtype).requires_grad_(),
                running_mean=torch.randn(shape[1] if len(shape) > 1 else 0, dtype=dtype),
                running_var=0.5 + torch.rand(shape[1] if len(shape) > 1 else 0, dtype=dtype),
                weight=torch.randn(shape[1] if len(shape) > 1 else 0, dtype=dtype).requires_grad_(),
                bias=torch.randn(shape[1] if len(shape) > 1 else 0, dtype=dtype).requires_grad_())


def _with(**changes):
    def build(training, more_changes=None):
        call = _valid()
        for change in (changes, more_changes or {}):
            call.update({k: (v() if callable(v) else v) for k, v in change.items()})
        call.setdefault("training", training)
        return call
    build.changes = changes  # for combining two cases (test_two_bad_changes_raise_torchs_error)
    return build


def _shaped(shape, dtype=torch.float32, **changes):
    def build(training):
        call = _valid(dtype, shape)
        call.update({k: (v() if callable(v) else v) for k, v in changes.items()})
        call["training"] = training
        return call
    return build


def _meta(**names):
    return {name: (lambda n=name, d=dims: torch.randn(d, device="meta")) for name, dims in names.items()}


BAD_INPUTS = {
    "input_0d": _with(input=lambda: torch.tensor(2.0, requires_grad=True)),
    "input_1d_empty": _shaped((0,)),
    "input_1d": _shaped((5,)),
    "input_2d_one_value_per_channel": _shaped((1, C)),
    "input_3d_one_value_per_channel": _shaped((1, C, 1)),
    "empty_batch": _shaped((0, C, 5)),
    "empty_batch_float64_input_float32_stats": _with(input=lambda: torch.randn(0, C, 5, dtype=torch.float64)),
    "zero_channels": _shaped((4, 0, 5)),
    "input_int64": _with(input=lambda: torch.randint(0, 5, (4, C, 5))),
    "input_bool": _with(input=lambda: torch.rand(4, C, 5) > 0.5),
    "input_complex64": _with(input=lambda: torch.randn(4, C, 5, dtype=torch.complex64)),
    "input_float8": _with(input=lambda: torch.randn(4, C, 5).to(torch.float8_e4m3fn)),
    "input_float64_params_float32": _with(input=lambda: torch.randn(4, C, 5, dtype=torch.float64)),
    "input_float16_params_float32": _with(input=lambda: torch.randn(4, C, 5, dtype=torch.float16)),
    "input_bfloat16_params_float32": _with(input=lambda: torch.randn(4, C, 5, dtype=torch.bfloat16)),
    "input_float16_params_float64": _shaped((4, C, 5), torch.float64,
                                            input=lambda: torch.randn(4, C, 5, dtype=torch.float16)),
    "weight_float16_input_float32": _with(weight=lambda: torch.randn(C, dtype=torch.float16)),
    "weight_float64_input_float32": _with(weight=lambda: torch.randn(C, dtype=torch.float64)),
    "running_mean_float64_input_float32": _with(running_mean=lambda: torch.randn(C, dtype=torch.float64)),
    "running_stats_int64": _with(running_mean=lambda: torch.zeros(C, dtype=torch.int64),
                                 running_var=lambda: torch.ones(C, dtype=torch.int64)),
    "weight_1xC": _with(weight=lambda: torch.randn(1, C)),
    "weight_Cx1": _with(weight=lambda: torch.randn(C, 1)),
    "weight_too_long": _with(weight=lambda: torch.randn(C + 1)),
    "bias_too_short": _with(bias=lambda: torch.randn(C - 1)),
    "running_mean_too_long": _with(running_mean=lambda: torch.randn(C + 1)),
    "running_var_1xC": _with(running_var=lambda: torch.rand(1, C)),
    "weight_0d_one_channel": _shaped((4, 1, 5), weight=lambda: torch.tensor(2.0)),
    "weight_strided": _with(weight=lambda: torch.randn(2 * C)[::2]),
    "running_stats_expanded": _with(running_mean=lambda: torch.zeros(1).expand(C),
                                         running_var=lambda: torch.ones(1).expand(C)),
    "weight_list": _with(weight=[1.0] * C),
    "running_var_none_only": _with(running_var=None),
    "running_mean_none_only": _with(running_mean=None),
    "running_stats_none": _with(running_mean=None, running_var=None),
    "running_mean_requires_grad": _with(running_mean=lambda: torch.randn(C).requires_grad_()),
    "running_var_requires_grad": _with(running_var=lambda: (0.5 + torch.rand(C)).requires_grad_()),
    "training_none": _with(training=None),
    "training_int": _with(training=1),
    "momentum_none": _with(momentum=None),
    "momentum_nan": _with(momentum=float("nan")),
    "eps_zero": _with(eps=0.0),
    "eps_negative": _with(eps=-1e-5),
    "eps_nan": _with(eps=float("nan")),
    "eps_inf": _with(eps=float("inf")),
    "eps_tensor": _with(eps=lambda: torch.tensor(1e-5)),
    "running_var_negative": _with(running_var=lambda: -torch.rand(C)),
    "input_nan": _with(input=lambda: torch.full((4, C, 5), float("nan"))),
    "input_expanded": _with(input=lambda: torch.randn(1, C, 1).expand(4, C, 5)),
    "input_transposed": _with(input=lambda: torch.randn(5, C, 4).transpose(0, 2)),
    "input_channels_last": _shaped((4, C, 5, 6), input=lambda: torch.randn(4, C, 5, 6).to(
        memory_format=torch.channels_last)),
    "all_on_meta": _with(**_meta(input=(4, C, 5), running_mean=(C,), running_var=(C,), weight=(C,), bias=(C,))),
    "weight_on_meta": _with(**_meta(weight=(C,))),
    "input_on_meta": _with(**_meta(input=(4, C, 5))),
}


def _snapshot(call):
    return {k: v.detach().clone() for k, v in call.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_matches_torch(case, training):
    """torch's outcome: its result (and running statistics), or an exception of its type; a
    call fastbn refuses leaves every tensor it got as it was."""
    torch.manual_seed(1)
    torch_call = BAD_INPUTS[case](training)
    torch.manual_seed(1)
    fast_call = BAD_INPUTS[case](training)
    before = _snapshot(fast_call)
    # On one thread: where a running statistic is expanded from one value, torch's kernel
    # updates it once per channel, in an order that depends on its threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch_outcome = outcome(lambda: F.batch_norm(**torch_call))
    finally:
        torch.set_num_threads(threads)
    fast_outcome = outcome(lambda: fastbn.functional.batch_norm(**fast_call))
    fast_error = fast_outcome[1]
    if fast_error is not None:
        for name, value in before.items():
            assert torch.equal(fast_call[name], value) or (value.isnan() == fast_call[name].isnan()).all(), (
                f"fastbn refused the call ({fast_error}) but changed {name}")
    torch_result, fast_result = assert_same_outcomes(torch_outcome, fast_outcome, case)
    if torch_result is None:
        return
    assert (fast_result.shape, fast_result.dtype, fast_result.device) == \
        (torch_result.shape, torch_result.dtype, torch_result.device)
    if torch_result.device.type == "meta":
        return
    torch.testing.assert_close(fast_result, torch_result, equal_nan=True)
    for name in ("running_mean", "running_var"):
        if isinstance(torch_call[name], torch.Tensor):
            torch.testing.assert_close(fast_call[name], torch_call[name], equal_nan=True, msg=name)



# Pairs where torch's exception comes from no check but from the first op of a decomposition
# that fails: a weight on the meta device sends torch's CPU call down a composite path, where a
# bool or float8 input meets an op without a kernel for it (NotImplementedError). fastbn reports
# the device mismatch (RuntimeError), as torch itself does for int64 or complex inputs there.
# A difference the README lists.
TORCH_DECOMPOSITION_FAILURES = {frozenset(pair) for pair in (("input_bool", "weight_on_meta"),
                                                             ("input_float8", "weight_on_meta"))}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_two_bad_changes_raise_torchs_error(training):
    """Every pair of the changes above that torch refuses one at a time, as fastbn does (to
    different arguments of the same valid call), made together: the exception type of
    torch's first failing check must be fastbn's (the order of the checks). One test for
    all pairs, which lists each pair that differs."""
    combinable = [case for case, build in BAD_INPUTS.items() if hasattr(build, "changes")]
    # those torch refuses alone and fastbn refuses alike (others fail test_bad_input_matches_torch)
    refused = []
    for case in combinable:
        torch_error = outcome(lambda: F.batch_norm(**BAD_INPUTS[case](training)))[1]
        if torch_error is not None and type(outcome(lambda: fastbn.functional.batch_norm(
                **BAD_INPUTS[case](training)))[1]) is type(torch_error):
            refused.append(case)
    differences = []
    for first, second in itertools.combinations(refused, 2):
        if BAD_INPUTS[first].changes.keys() & BAD_INPUTS[second].changes.keys():
            continue  # two changes to one argument
        if frozenset((first, second)) in TORCH_DECOMPOSITION_FAILURES:
            continue
        calls = [BAD_INPUTS[first](training, BAD_INPUTS[second].changes) for _ in range(2)]
        torch_error = outcome(lambda: F.batch_norm(**calls[0]))[1]
        fast_error = outcome(lambda: fastbn.functional.batch_norm(**calls[1]))[1]
        if type(torch_error) is not type(fast_error):
            differences.append(f"{first} + {second}: torch {type(torch_error).__name__}({str(torch_error)[:120]}), "
                               f"fastbn {type(fast_error).__name__}({str(fast_error)[:120]})")
    assert not differences, f"{len(differences)} pairs differ:\n" + "\n".join(differences)
