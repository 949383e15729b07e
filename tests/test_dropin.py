"""Drop-in fidelity (issue 12): forward-mode AD, torch.func transforms, and torch's
answer (its result or its exception type) for the odd calls torch's own tests make."""
import itertools
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

import fastbn

F64 = torch.float64


def random_operands(shape=(5, 3, 4), dtype=F64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    channels = shape[1]

    def rand(*size, low=0.0):
        return (torch.rand(*size, generator=generator, dtype=F64) + low).to(dtype)

    x = (torch.randn(shape, generator=generator, dtype=F64) * 1.5 + 2).to(dtype)
    return dict(x=x, weight=rand(channels, low=0.5), bias=rand(channels, low=-0.5), running_mean=rand(channels),
                running_var=rand(channels, low=0.5), residual=torch.randn(shape, generator=generator, dtype=F64))


def torch_bn_act(x, running_mean, running_var, weight, bias, training, activation=None, residual=None):
    """torch's batch norm, then the residual and the activation: the reference."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training)
    if residual is not None:
        y = y + residual
    return {None: lambda t: t, "relu": F.relu, "elu": F.elu, "silu": F.silu,
            "leaky_relu": lambda t: F.leaky_relu(t, 0.01)}[activation](y)


def fastbn_bn_act(x, running_mean, running_var, weight, bias, training, activation=None, residual=None):
    if residual is not None:
        return fastbn.functional.batch_norm_add_act(x, residual, running_mean, running_var, weight, bias, training,
                                                    activation=activation)
    return fastbn.functional.batch_norm_act(x, running_mean, running_var, weight, bias, training,
                                            activation=activation)


# ------------------------------------------------------------------ forward-mode AD


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation,with_residual", [(None, False), ("relu", False), ("elu", True), ("silu", True),
                                                      ("leaky_relu", False)])
def test_dual_tangents_match_torch(training, activation, with_residual):
    ops = random_operands()
    tangents = random_operands(seed=1)
    residual = ops["residual"] if with_residual else None
    results = {}
    for name, fn in (("torch", torch_bn_act), ("fastbn", fastbn_bn_act)):
        with fwAD.dual_level():
            dual = {k: fwAD.make_dual(ops[k], tangents[k]) for k in ("x", "weight", "bias", "residual")}
            y = fn(dual["x"], ops["running_mean"].clone(), ops["running_var"].clone(), dual["weight"], dual["bias"],
                   training, activation, dual["residual"] if with_residual else None)
            primal, tangent = fwAD.unpack_dual(y)
            assert tangent is not None, f"{name}: the output has no tangent"
            results[name] = primal, tangent
    torch.testing.assert_close(results["fastbn"][0], results["torch"][0])
    torch.testing.assert_close(results["fastbn"][1], results["torch"][1])


@pytest.mark.parametrize("training", [True, False])
def test_module_forward_ad_and_half_dtype(training):
    """A module with float32 parameters on a bfloat16 input: the tangent has the input's dtype."""
    x = random_operands((6, 4, 3, 3))["x"].to(torch.bfloat16)
    tangent = torch.randn_like(x)
    results = []
    for cls in (nn.BatchNorm2d, fastbn.BatchNorm2d):
        module = cls(4).train(training)
        with fwAD.dual_level():
            out_tangent = fwAD.unpack_dual(module(fwAD.make_dual(x, tangent))).tangent
        results.append((out_tangent, module.running_mean.clone()))
    assert results[1][0].dtype == torch.bfloat16
    torch.testing.assert_close(results[1][0].float(), results[0][0].float(), atol=0.05, rtol=0.02)
    torch.testing.assert_close(results[1][1], results[0][1])


def test_running_stat_tangents_rejected_as_torch():
    ops = random_operands()
    for fn in (F.batch_norm, fastbn.functional.batch_norm):
        with fwAD.dual_level():
            x = fwAD.make_dual(ops["x"], torch.ones_like(ops["x"]))
            running_mean = fwAD.make_dual(ops["running_mean"], torch.ones(3, dtype=F64))
            with pytest.raises(RuntimeError, match="not differentiable wrt running_mean and running_var"):
                fn(x, running_mean, ops["running_var"], training=False)
            # training: the running statistics do not reach the output; their tangent is ignored
            fn(x, running_mean.clone(), ops["running_var"].clone(), training=True)


@pytest.mark.parametrize("training", [True, False])
def test_running_stats_requiring_grad_rejected_as_torch(training):
    ops = random_operands()
    for name in ("running_mean", "running_var"):
        for fn in (F.batch_norm, fastbn.functional.batch_norm):
            running = {k: ops[k].clone() for k in ("running_mean", "running_var")}
            running[name].requires_grad_()
            with pytest.raises(RuntimeError, match=f"not differentiable with respect to argument '{name}'"):
                fn(ops["x"], running["running_mean"], running["running_var"], training=training)
            assert torch.equal(running["running_mean"].detach(), ops["running_mean"])
            with torch.no_grad():  # torch checks it only where autograd records
                fn(ops["x"], running["running_mean"], running["running_var"], training=training)


# ------------------------------------------------------------------ torch.func


def _transforms(fn):
    """torch.func transforms of `fn(x, weight)` (a scalar-valued variant for grad/hessian)."""
    def loss(x, weight):
        return fn(x, weight).pow(3).sum()

    ones = random_operands(seed=2)
    return {
        "jacfwd": lambda x, w: torch.func.jacfwd(fn, argnums=(0, 1))(x, w),
        "jacrev": lambda x, w: torch.func.jacrev(fn, argnums=(0, 1))(x, w),
        "grad": lambda x, w: torch.func.grad(loss, argnums=(0, 1))(x, w),
        "hessian": lambda x, w: torch.func.hessian(loss)(x, w),
        "jvp": lambda x, w: torch.func.jvp(fn, (x, w), (ones["x"], ones["weight"])),
        "vjp": lambda x, w: torch.func.vjp(fn, x, w)[1](ones["x"]),
        "forward_over_reverse": lambda x, w: torch.func.jvp(torch.func.grad(loss), (x, w), (ones["x"], ones["weight"])),
        "vmap": lambda x, w: torch.func.vmap(fn, in_dims=(0, None))(torch.stack([x, x * 2 - 1]), w),
        "vmap_grad": lambda x, w: torch.func.vmap(torch.func.grad(loss), in_dims=(0, None))(torch.stack([x, -x]), w),
    }


@pytest.mark.parametrize("transform", list(_transforms(None)))
@pytest.mark.parametrize("training", [True, False])
def test_torch_func_transforms_match_torch(transform, training):
    ops = random_operands()
    results = {}
    for name, bn in (("torch", torch_bn_act), ("fastbn", fastbn_bn_act)):
        # no running statistics in training: vmap could not update them per sample
        running = (None, None) if training else (ops["running_mean"], ops["running_var"])

        def fn(x, weight, bn=bn, running=running):
            return bn(x, *running, weight, ops["bias"], training, "elu")

        results[name] = _transforms(fn)[transform](ops["x"], ops["weight"])
    torch.testing.assert_close(results["fastbn"], results["torch"])


def test_functional_call_grad_of_module():
    ops = random_operands((6, 3, 5, 5))
    grads = []
    for cls in (nn.BatchNorm2d, fastbn.BatchNorm2d):
        module = cls(3).double()
        params = {k: v.detach() for k, v in module.named_parameters()}
        buffers = {k: v.clone() for k, v in module.named_buffers()}

        def loss(params, buffers, x):  # the buffers an input: torch's BN updates them in place
            return torch.func.functional_call(module, (params, buffers), (x,)).pow(2).mul(ops["x"]).sum()

        grads.append((torch.func.grad(loss)(params, buffers, ops["x"]), buffers["running_mean"]))
        assert buffers["num_batches_tracked"].item() == 1 and module.num_batches_tracked.item() == 0
    torch.testing.assert_close(grads[1], grads[0])


def test_inplace_abn_refuses_transforms_without_writing():
    x = random_operands((4, 3, 2, 2))["x"]
    module = fastbn.BatchNorm2d(3, activation="leaky_relu", inplace=True).double()
    before = x.clone()
    with pytest.raises(NotImplementedError, match="inplace=False"):
        with fwAD.dual_level():
            module(fwAD.make_dual(x, torch.ones_like(x)))
    with pytest.raises(NotImplementedError, match="inplace=False"):
        torch.func.jacfwd(module)(x)
    assert torch.equal(x, before) and module.num_batches_tracked.item() == 0
    assert torch.equal(module.running_mean, torch.zeros(3, dtype=F64))


# ------------------------------------------------------------------ torch's answer to odd calls

def _z(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


def _o(*shape, dtype=torch.float32):
    return torch.ones(shape, dtype=dtype)


def _x(*shape, dtype=torch.float32):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(3)) + 1).to(dtype)


# (input, running_mean, running_var, weight, bias, training, eps) calls torch's own tests and
# samples make, and their neighbours: torch's result or its exception type is the expectation.
ODD_CALLS = {
    "1-D empty, training (an op_db sample)": (_x(0), _z(0), _o(0), None, None, True, 1e-5),
    "1-D, eval": (_x(3), _z(3), _o(3), None, None, False, 1e-5),
    "1-D, training, no running stats": (_x(3), None, None, None, None, True, 1e-5),
    "1-D, one value": (_x(1), None, None, None, None, True, 1e-5),
    "0-D": (torch.tensor(1.0), None, None, None, None, True, 1e-5),
    "weight and bias (1, C)": (_x(4, 3), _z(3), _o(3), _o(1, 3) * 2, _z(1, 3) + 1, True, 1e-5),
    "weight (2, 3) for 6 channels": (_x(4, 6), None, None, _o(2, 3), None, True, 1e-5),
    "weight (2, 3) for 3 channels": (_x(4, 3), None, None, _o(2, 3), None, True, 1e-5),
    "empty float64 batch, float32 params": (_x(0, 3, dtype=F64), _z(3), _o(3), _o(3), _z(3), True, 1e-5),
    "empty float64 batch, float32 params, eval": (_x(0, 3, dtype=F64), _z(3), _o(3), _o(3), _z(3), False, 1e-5),
    "empty batch, wrong-size weight": (_x(0, 3), None, None, _o(5), None, True, 1e-5),
    "no channels, a weight": (_x(4, 0), None, None, _o(0), None, True, 1e-5),
    "one value, negative eps": (_x(1, 3), None, None, None, None, True, -1.0),
    "negative eps, float64 input, float32 params": (_x(4, 3, dtype=F64), _z(3), _o(3), _o(3), _z(3), True, -1.0),
    "wrong-size running_mean and weight": (_x(4, 3), _z(5), _o(5), _o(7), None, True, 1e-5),
    "running_mean only, training": (_x(4, 3), _z(3), None, None, None, True, 1e-5),
    "running_var only, eval": (_x(4, 3), None, _o(3), None, None, False, 1e-5),
    "no running stats, eval": (_x(4, 3), None, None, None, None, False, 1e-5),
    "running_mean only, wrong-size weight": (_x(4, 3), _z(3), None, _o(5), None, True, 1e-5),
    "running stats (1, C)": (_x(4, 3), _z(1, 3), _o(1, 3), None, None, True, 1e-5),
    "int64 input": (torch.ones(4, 3, dtype=torch.int64), _z(3), _o(3), None, None, True, 1e-5),
    "int64 input, eval": (torch.ones(4, 3, dtype=torch.int64), _z(3), _o(3), None, None, False, 1e-5),
    "bool input": (torch.ones(4, 3, dtype=torch.bool), _z(3), _o(3), None, None, True, 1e-5),
    "uint8 input, wrong-size weight": (torch.ones(4, 3, dtype=torch.uint8), None, None, _o(5), None, True, 1e-5),
    "complex input": (torch.ones(4, 3, dtype=torch.complex64), None, None, None, None, True, 1e-5),
    "int64 running stats": (_x(4, 3), _z(3, dtype=torch.int64), _o(3, dtype=torch.int64), None, None, True, 1e-5),
    "float64 weight, float32 input": (_x(4, 3), None, None, _o(3, dtype=F64), None, True, 1e-5),
    "float32 params, float64 input": (_x(4, 3, dtype=F64), None, None, _o(3), None, True, 1e-5),
    "training=None": (_x(4, 3), _z(3), _o(3), None, None, None, 1e-5),
    "training=1": (_x(4, 3), None, None, None, None, 1, 1e-5),
}

# float16/bfloat16 inputs with every mix of float16/bfloat16/float32 parameters and running stats
_PARAMETER_DTYPES = (None, torch.float16, torch.bfloat16, torch.float32)
for _input_dtype, _weight, _bias, _running, _training in itertools.product(
        (torch.float16, torch.bfloat16), _PARAMETER_DTYPES, _PARAMETER_DTYPES, _PARAMETER_DTYPES, (True, False)):
    if _running is None and not _training:
        continue
    ODD_CALLS[f"{_input_dtype} input, weight {_weight}, bias {_bias}, running stats {_running}, training {_training}"] = (
        _x(4, 3, dtype=_input_dtype), None if _running is None else _z(3, dtype=_running),
        None if _running is None else _o(3, dtype=_running), None if _weight is None else _o(3, dtype=_weight) * 1.5,
        None if _bias is None else _z(3, dtype=_bias) + 0.5, _training, 1e-5)


def _outcome(batch_norm, call):
    """(result, running stats after the call) or the exception type."""
    input, running_mean, running_var, weight, bias, training, eps = call
    running = [None if r is None else r.clone() for r in (running_mean, running_var)]
    try:
        return batch_norm(input.clone(), *running, weight, bias, training, 0.1, eps), running
    except Exception as error:  # noqa: BLE001  (the type is compared with torch's)
        return type(error)


@pytest.mark.parametrize("case", list(ODD_CALLS))
def test_odd_calls_get_torchs_answer(case):
    expected = _outcome(F.batch_norm, ODD_CALLS[case])
    got = _outcome(fastbn.functional.batch_norm, ODD_CALLS[case])
    if isinstance(expected, type):
        assert got is expected, f"torch raises {expected.__name__}, fastbn gave {got}"
        return
    assert not isinstance(got, type), f"torch returns a result, fastbn raised {got.__name__}"
    (output, running), (expected_output, expected_running) = got, expected
    assert output.dtype == expected_output.dtype and output.shape == expected_output.shape
    tolerance = dict(atol=2e-2, rtol=2e-2) if output.dtype in (torch.float16, torch.bfloat16) else {}
    torch.testing.assert_close(output, expected_output, **tolerance)
    for ours, theirs in zip(running, expected_running):
        if theirs is not None:
            torch.testing.assert_close(ours, theirs, **tolerance)


def test_weight_of_shape_1_c_gets_grads_of_its_shape():
    """torch takes a (1, C) weight forward but its backward fails on it (a gradient of shape
    (C,)); fastbn's gives torch's gradient of the 1-D weight, in the weight's shape."""
    ops = random_operands((4, 3))
    weight_2d = ops["weight"].view(1, 3).clone().requires_grad_()
    weight_1d = ops["weight"].clone().requires_grad_()
    fastbn.functional.batch_norm(ops["x"], None, None, weight_2d, None, True).pow(2).sum().backward()
    F.batch_norm(ops["x"], None, None, weight_1d, None, True).pow(2).sum().backward()
    assert weight_2d.grad.shape == (1, 3)
    torch.testing.assert_close(weight_2d.grad.view(3), weight_1d.grad)


def test_module_checks_eps_before_dtype_as_torch():
    """torch's test_errors: a negative eps on a float64 input to a float32 module is a ValueError."""
    x = _x(4, 10, dtype=F64)
    for cls in (nn.BatchNorm1d, fastbn.BatchNorm1d):
        module = cls(10, eps=-1.0)
        with pytest.raises(ValueError, match="eps must be positive"):
            module(x)
        assert module.running_mean.abs().sum() == 0


def test_empty_float64_batch_on_float32_module():
    x = _x(0, 3, 4, 4, dtype=F64)
    outputs = [cls(3)(x) for cls in (nn.BatchNorm2d, fastbn.BatchNorm2d)]
    assert outputs[1].shape == outputs[0].shape and outputs[1].dtype == outputs[0].dtype == F64


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (4, 3, 4, 4)])
def test_inplace_module_writes_in_place_even_when_empty(shape):
    """torch's test_check_inplace: the output is the input, its version counter bumped."""
    module = fastbn.BatchNorm2d(3, activation="leaky_relu", inplace=True)
    x = _x(*shape)
    version = x._version
    y = module(x)
    assert y.data_ptr() == x.data_ptr() and x._version > version
    assert module.num_batches_tracked.item() == 1


def test_vmap_over_stacked_models_updates_each_models_running_stats():
    """torch.func model ensembling (stack_module_state + vmap) with BN in training mode."""
    x = random_operands((2, 4, 3, 5))["x"].float()
    results = []
    for cls in (nn.BatchNorm1d, fastbn.BatchNorm1d):
        models = [cls(3) for _ in range(2)]
        params, buffers = torch.func.stack_module_state(models)
        base = cls(3).to("meta")

        def forward(params, buffers, x, base=base):
            return torch.func.functional_call(base, (params, buffers), (x,))

        results.append((torch.func.vmap(forward)(params, buffers, x), buffers))
    torch.testing.assert_close(results[1], results[0])


def test_vmap_with_unbatched_running_stats_refused_without_writing():
    ops = random_operands()
    batched = torch.stack([ops["x"], ops["x"] + 1])
    running = ops["running_mean"].clone(), ops["running_var"].clone()
    for fn in (F.batch_norm, fastbn.functional.batch_norm):
        with pytest.raises(RuntimeError):
            torch.func.vmap(lambda x, fn=fn: fn(x, *running, training=True))(batched)
        assert torch.equal(running[0], ops["running_mean"]) and torch.equal(running[1], ops["running_var"])


@pytest.mark.parametrize("training", [True, False])
def test_nan_eps_gives_torchs_nan(training):
    """torch takes eps=nan (its checks compare, and NaN compares false) and returns NaN."""
    ops = random_operands()
    results = []
    for fn in (F.batch_norm, fastbn.functional.batch_norm):
        running = ops["running_mean"].clone(), ops["running_var"].clone()
        results.append((fn(ops["x"], *running, training=training, eps=float("nan")), running))
    assert results[1][0].isnan().all()
    torch.testing.assert_close(results[1], results[0], equal_nan=True)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual_batched", [True, False])
def test_vmap_runs_a_batching_rule(training, residual_batched):
    """vmap folds the vmapped dim into the channels (no per-sample fallback, which warns)."""
    ops = random_operands()
    xs = torch.stack([ops["x"], ops["x"] * 2 - 1, -ops["x"]])
    residual = torch.stack([ops["residual"], -ops["residual"], ops["residual"]]) if residual_batched \
        else ops["residual"]
    running = (None, None) if training else (ops["running_mean"], ops["running_var"])
    results = []
    for bn in (torch_bn_act, fastbn_bn_act):
        def fn(x, r, bn=bn):
            return bn(x, *running, ops["weight"], ops["bias"], training, "elu", r)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            results.append(torch.func.vmap(fn, in_dims=(0, 0 if residual_batched else None))(xs, residual))
    torch.testing.assert_close(results[1], results[0])


class _Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight


def test_parametrized_parameters_and_buffers_read_as_torch_reads_them():
    """The module reads its tensors from its dicts where they are registered, and as attributes
    where they are not: a parametrized weight (torch.nn.utils.parametrize) gives torch's result."""
    from torch.nn.utils import parametrize

    x = (torch.randn(4, 3, 5, 5, dtype=torch.float64) * 2 + 3).requires_grad_(True)
    results = {}
    for name, cls in (("torch", nn.BatchNorm2d), ("fastbn", fastbn.BatchNorm2d)):
        torch.manual_seed(0)
        bn = cls(3).double()
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
        parametrize.register_parametrization(bn, "weight", _Doubled())
        assert "weight" not in bn._parameters  # (read through the parametrization's property)
        y = bn(x)
        (grad_x, grad_w) = torch.autograd.grad((y * y).sum(), (x, bn.parametrizations.weight.original))
        results[name] = (y, grad_x, grad_w, bn.running_mean.clone(), bn.running_var.clone())
    for fast, ref in zip(results["fastbn"], results["torch"]):
        torch.testing.assert_close(fast, ref)
