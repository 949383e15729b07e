"""In-place activated batch norm (inplace=True) against torch's batch norm followed by the activation."""
import math
import re

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck
from torch.library import opcheck

import fastbn
from conftest import DEVICES, assert_within_budget, max_error, random_input
from test_activation import saved_bytes, torch_activation

INVERTIBLE = [(None, None), ("leaky_relu", None), ("leaky_relu", 0.2), ("elu", None), ("elu", 0.5)]


def _torch_activation(activation, param):
    return nn.Identity() if activation is None else torch_activation(activation, param)


def grads_from_stored_output(y, grad, weight, bias, var, eps, training, activation, param):
    """(grad_input, grad_weight, grad_bias) in float64 from the stored output y alone:
    all that in-place ABN can know. In float16/bfloat16, y's rounding limits it."""
    dims = [0] + list(range(2, y.dim()))
    shape = [1, y.shape[1]] + [1] * (y.dim() - 2)
    # where elu's output rounded to -alpha, z is unknown: the kernels' bound, exp(z) = 2^-(digits + 1)
    elu_floor = math.log(torch.finfo(y.dtype).eps / 4)
    y, dy = y.double(), grad.double()
    if activation == "leaky_relu":
        slope = 0.01 if param is None else param
        pre, slope_at = torch.where(y > 0, y, y / slope), torch.where(y > 0, 1.0, slope)
    elif activation == "elu":
        alpha = 1.0 if param is None else param
        # a stored y can round below -alpha when alpha is not exact in the dtype
        pre = torch.where(y > 0, y, torch.log1p((y / alpha).clamp(min=-1.0)).clamp(min=elu_floor))
        slope_at = torch.where(y > 0, 1.0, (y + alpha).clamp(min=0.0))
    else:
        pre, slope_at = y, torch.ones_like(y)
    g = dy * slope_at
    w, b = weight.double().view(shape), bias.double().view(shape)
    invstd = torch.rsqrt(var.double().view(shape) + eps)
    xhat = (pre - b) / w
    if training:
        grad_input = w * invstd * (g - g.mean(dims, keepdim=True) - xhat * (g * xhat).mean(dims, keepdim=True))
    else:
        grad_input = w * invstd * g
    return grad_input, (g * xhat).sum(dims), g.sum(dims)


def assert_within_budget_plus(actual, torch_result, reference, allowance, what):
    """assert_within_budget, with `allowance` more error allowed (0 in float32/float64)."""
    if allowance == 0:
        return assert_within_budget(actual, torch_result, reference, what)
    err, err_torch = max_error(actual, reference), max_error(torch_result, reference)
    ulp = torch.finfo(actual.dtype).eps * max(1.0, reference.double().abs().max().item())
    assert err <= 2 * err_torch + 2 * allowance + ulp, (
        f"{what}: error {err:.3g} > 2 x torch error {err_torch:.3g} + 2 x stored-output error {allowance:.3g}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("shape,channels_last", [((4, 6, 7, 5), False), ((4, 37, 5, 3), True), ((40, 9), False)],
                         ids=str)
@pytest.mark.parametrize("activation,param", INVERTIBLE, ids=str)
def test_inplace_matches_bn_then_activation(activation, param, shape, channels_last, dtype, device):
    cls = fastbn.BatchNorm1d if len(shape) == 2 else fastbn.BatchNorm2d
    torch_cls = nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d
    channels = shape[1]
    param_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    torch_bn = torch_cls(channels).to(device, param_dtype)
    with torch.no_grad():
        # weights of both signs, away from 0 (where the input cannot be recovered)
        torch_bn.weight.copy_((0.5 + torch.rand(channels)) * torch.where(torch.rand(channels) < 0.3, -1.0, 1.0))
        torch_bn.bias.normal_(0.0, 0.5)
    inplace = cls(channels, activation=activation, activation_param=param, inplace=True).to(device, param_dtype)
    inplace.load_state_dict(torch_bn.state_dict())
    reference_bn = torch_cls(channels).to(device, torch.float64)
    reference_bn.load_state_dict(torch_bn.state_dict())
    act = _torch_activation(activation, param)
    for step, training in enumerate((True, True, False)):
        for m in (torch_bn, inplace, reference_bn):
            m.train(training)
        x = random_input(shape, dtype, device, channels_last, mean=0.5, std=2.0)
        grad = torch.randn(shape, device=device, dtype=torch.float64).to(dtype)
        leaves = [x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()]
        y_torch = act(torch_bn(leaves[0]))
        work = leaves[1] * 1  # a non-leaf the module may overwrite (as a conv output would be)
        y_inplace = inplace(work)
        y_ref = act(reference_bn(leaves[2]))
        assert y_inplace is work and y_inplace.data_ptr() == work.data_ptr()  # written over its input
        assert_within_budget(y_inplace, y_torch, y_ref, f"step {step} output")
        # float16/bfloat16: the stored output's rounding is information in-place ABN cannot
        # have; it is allowed for, measured by the exact backward from that output.
        reduced = dtype in (torch.float16, torch.bfloat16)
        dims = [0] + list(range(2, len(shape)))
        var = x.double().var(dims, unbiased=False) if training else reference_bn.running_var
        from_output = grads_from_stored_output(y_inplace.detach(), grad, reference_bn.weight.detach(),
                                               reference_bn.bias.detach(), var, inplace.eps, training, activation,
                                               param)
        y_torch.backward(grad)
        y_inplace.backward(grad)
        y_ref.backward(grad.double())
        expected = (leaves[2].grad, reference_bn.weight.grad, reference_bn.bias.grad)
        allowance = [max_error(a, b) if reduced else 0.0 for a, b in zip(from_output, expected)]
        assert_within_budget_plus(leaves[1].grad, leaves[0].grad, leaves[2].grad, allowance[0],
                                  f"step {step} grad_input")
        for i, name in enumerate(("weight", "bias"), start=1):
            p_fast, p_torch, p_ref = (getattr(m, name) for m in (inplace, torch_bn, reference_bn))
            assert_within_budget_plus(p_fast.grad, p_torch.grad, p_ref.grad, allowance[i], f"step {step} grad_{name}")
            for p in (p_fast, p_torch, p_ref):
                p.grad = None
        for name in ("running_mean", "running_var"):
            assert_within_budget(getattr(inplace, name), getattr(torch_bn, name), getattr(reference_bn, name), name)
        assert inplace.num_batches_tracked.item() == torch_bn.num_batches_tracked.item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation,param", INVERTIBLE, ids=str)
def test_gradcheck_inplace(activation, param, training, device):
    x = random_input((3, 4, 3, 5), torch.float64, device, mean=0.2, std=1.0).requires_grad_()
    weight = torch.tensor([1.2, -0.7, 0.9, 1.5], dtype=torch.float64, device=device).requires_grad_()
    bias = (0.3 * torch.randn(4, dtype=torch.float64, device=device)).requires_grad_()
    running_mean = torch.randn(4, dtype=torch.float64, device=device)
    running_var = torch.rand(4, dtype=torch.float64, device=device) + 0.5

    def fn(x, weight, bias):
        return fastbn.functional.batch_norm_act(x.clone(), running_mean.clone(), running_var.clone(), weight, bias,
                                                training, 0.1, 1e-5, activation, param, inplace=True)

    assert gradcheck(fn, (x, weight, bias))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_inplace_ops(channels_last, device):
    shape = (3, 5, 4, 6)
    weight = 1 + 0.2 * torch.rand(5, device=device)
    bias = 0.2 * torch.randn(5, device=device)
    rm, rv = torch.randn(5, device=device), torch.rand(5, device=device) + 0.5
    x = random_input(shape, torch.float32, device, channels_last)
    opcheck(torch.ops.fastbn.batch_norm_train_.default, (x.clone(), weight, bias, 1e-5, 2, 0.1))
    opcheck(torch.ops.fastbn.batch_norm_eval_.default, (x.clone(), weight, bias, rm, rv, 1e-5, 3, 1.0))
    y = torch.nn.functional.elu(random_input(shape, torch.float32, device, channels_last, mean=0.0))  # a valid output
    dy = torch.randn(shape, device=device)
    opcheck(torch.ops.fastbn.batch_norm_invert_output.default, (dy, y, weight, bias, rv, 1e-5, 3, 1.0))


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_op_writes_over_non_dense_input(device):
    """A non-contiguous input is still overwritten with the output."""
    base = random_input((4, 6, 5, 8), torch.float32, device)
    x = base[:, :, :, ::2]  # strided view
    untouched = base[:, :, :, 1::2].clone()
    expected, expected_mean, expected_var = torch.ops.fastbn.batch_norm_train(x, None, None, 1e-5, 2, 0.1)
    mean, var = torch.ops.fastbn.batch_norm_train_(x, None, None, 1e-5, 2, 0.1)
    torch.testing.assert_close(base[:, :, :, ::2], expected, rtol=0, atol=0)
    torch.testing.assert_close(base[:, :, :, 1::2], untouched, rtol=0, atol=0)
    torch.testing.assert_close((mean, var), (expected_mean, expected_var), rtol=0, atol=0)


def test_inplace_keeps_one_activation_for_backward():
    """Conv -> BN -> LeakyReLU -> Conv: torch's modules keep 4 activation-sized
    tensors for backward, fastbn's fused BN 3, in-place ABN 2 (the conv input and
    the BN output, which overwrote the first conv's output)."""
    torch.manual_seed(0)
    x = random_input((8, 16, 24, 24))
    activation_bytes = x.numel() * x.element_size()

    def model(bn, act):
        return nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), bn, act, nn.Conv2d(16, 16, 3, padding=1))

    pair = model(nn.BatchNorm2d(16), nn.LeakyReLU(0.01))
    fused = model(fastbn.BatchNorm2d(16, activation="leaky_relu"), nn.Identity())
    inplace = model(fastbn.BatchNorm2d(16, activation="leaky_relu", inplace=True), nn.Identity())
    for m in (fused, inplace):
        m.load_state_dict(pair.state_dict())
    params = sum(p.numel() * p.element_size() for p in pair.parameters())
    x_grad = x.clone().requires_grad_()
    saved = {name: saved_bytes(m, x_grad) for name, m in (("pair", pair), ("fused", fused), ("inplace", inplace))}
    activations = {name: round((value - params) / activation_bytes, 2) for name, value in saved.items()}
    assert activations["pair"] >= 4.0
    assert 3.0 <= activations["fused"] < 3.1
    assert 2.0 <= activations["inplace"] < 2.1
    # and the three give the same outputs and gradients
    outputs = []
    for m in (pair, fused, inplace):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.square().mean().backward()
        outputs.append((y.detach(), xi.grad))
    for y, g in outputs[1:]:
        torch.testing.assert_close(y, outputs[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g, outputs[0][1], rtol=1e-4, atol=1e-6)


def test_inplace_module_in_no_grad_and_eval():
    bn = fastbn.BatchNorm2d(5, activation="elu", inplace=True)
    reference = nn.Sequential(nn.BatchNorm2d(5), nn.ELU())
    reference[0].load_state_dict(bn.state_dict())
    x = random_input((4, 5, 3, 3))
    with torch.no_grad():
        expected = reference(x)
        y = bn(x)  # x itself is overwritten (no autograd involved)
    assert y is x
    torch.testing.assert_close(y, expected)
    bn.eval()
    reference.eval()
    x = random_input((4, 5, 3, 3))
    torch.testing.assert_close(bn(x.clone()), reference(x))


# ---------------------------------------------------------------- limits and bad inputs


@pytest.mark.parametrize("activation,param", [("relu", None), ("silu", None), ("leaky_relu", -0.1),
                                              ("leaky_relu", 0.0), ("elu", -1.0), ("leaky_relu", 1e-40)])
def test_inplace_rejects_non_invertible_activation(activation, param):
    with pytest.raises(ValueError, match="inplace=True needs an invertible activation"):
        fastbn.BatchNorm2d(4, activation=activation, activation_param=param, inplace=True)
    with pytest.raises(ValueError, match="inplace=True needs an invertible activation"):
        fastbn.functional.batch_norm_act(random_input((2, 4, 3, 3)), None, None, training=True,
                                         activation=activation, activation_param=param, inplace=True)
    code = fastbn.ops.ACTIVATIONS[activation]
    with pytest.raises(RuntimeError, match="needs an invertible activation"):
        torch.ops.fastbn.batch_norm_train_(random_input((2, 4, 3, 3)), None, None, 1e-5, code,
                                           0.0 if param is None else param)


def test_inplace_rejects_zero_weight_when_grads_are_needed():
    bn = fastbn.BatchNorm2d(4, activation="leaky_relu", inplace=True)
    with torch.no_grad():
        bn.weight[2] = 0.0
    x = random_input((2, 4, 3, 3))
    before = x.clone()
    with pytest.raises(ValueError, match=r"weight is 0 \(channels \[2\]\)"):
        bn(x * 1)
    assert bn.num_batches_tracked.item() == 0 and torch.equal(x, before)
    with torch.no_grad():  # no backward: nothing to recover, so allowed
        bn(x)


def test_inplace_rejects_residual_and_sync():
    bn = fastbn.BatchNorm2d(4, activation="leaky_relu", inplace=True)
    x = random_input((2, 4, 3, 3))
    with pytest.raises(ValueError, match="residual cannot be added with inplace=True"):
        bn(x, x.clone())
    with pytest.raises(ValueError, match="does not support inplace=True"):
        fastbn.SyncBatchNorm(4, activation="leaky_relu", inplace=True)


def _leaf(x):
    return x


def _view_of_leaf(x):
    return x[1:]


def _no_grad_view_of_leaf(x):
    with torch.no_grad():
        return x[:, 1:]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("make_target", [_leaf, _view_of_leaf, _no_grad_view_of_leaf], ids=lambda f: f.__name__[1:])
def test_inplace_refuses_leaf_before_writing(make_target, training):
    """Writing over a leaf that requires grad (or a view of one) is refused with autograd's
    own error, before the kernel runs: input, running statistics and num_batches_tracked kept."""
    leaf = random_input((3, 4, 3, 3)).requires_grad_()
    target = make_target(leaf)
    with pytest.raises(RuntimeError) as theirs:
        target.mul_(1.0)  # torch's verdict and message for an in-place write on this tensor
    channels = target.shape[1]
    bn = fastbn.BatchNorm2d(channels, activation="leaky_relu", inplace=True).train(training)
    calls = [lambda: bn(target),
             lambda: fastbn.functional.batch_norm_act(target, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                                      training, activation="leaky_relu", inplace=True)]
    before_x, before_state = leaf.detach().clone(), {k: v.clone() for k, v in bn.state_dict().items()}
    for call in calls:
        with pytest.raises(RuntimeError, match=re.escape(str(theirs.value))):
            call()
        assert torch.equal(leaf.detach(), before_x), "the input was overwritten before the refusal"
        for key, value in bn.state_dict().items():
            assert torch.equal(value, before_state[key]), f"{key} changed by a refused call"


def test_inplace_refuses_expanded_input_before_writing():
    """An expanded input cannot hold a value per element: torch's in-place error, nothing moved."""
    bn = fastbn.BatchNorm2d(4, activation="leaky_relu", inplace=True)
    x = random_input((1, 4, 1, 1)).expand(2, 4, 3, 3)
    with pytest.raises(RuntimeError) as theirs:
        x.mul_(1.0)
    before_x, before_state = x.clone(), {k: v.clone() for k, v in bn.state_dict().items()}
    for call in (lambda: bn(x), lambda: torch.ops.fastbn.batch_norm_train_(x, None, None, 1e-5, 2, 0.01),
                 lambda: torch.ops.fastbn.batch_norm_eval_(x, None, None, torch.zeros(4), torch.ones(4), 1e-5, 0, 0.)):
        with pytest.raises(RuntimeError, match=re.escape(str(theirs.value))):
            call()
        assert torch.equal(x, before_x)
        for key, value in bn.state_dict().items():
            assert torch.equal(value, before_state[key]), f"{key} changed by a refused call"


def test_inplace_on_leaf_and_modified_output_follow_torch():
    bn = fastbn.BatchNorm2d(4, activation="leaky_relu", inplace=True)
    leaf = random_input((2, 4, 3, 3)).requires_grad_()
    y = bn(leaf * 1)
    y.mul_(2)  # changes what backward would recover from: torch's version check refuses
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("dtype,alpha", [(torch.float32, 1.0), (torch.bfloat16, 1.0), (torch.bfloat16, 0.1),
                                         (torch.float16, 0.3)], ids=str)
def test_inplace_elu_saturation_stays_finite(dtype, alpha):
    """ELU outputs that round to -alpha lose z (and with an alpha the dtype cannot hold,
    round below -alpha): grads stay finite and equal the exact backward from the stored
    output (which uses the same bound for the lost z)."""
    bn = fastbn.BatchNorm2d(3, activation="elu", activation_param=alpha, inplace=True)
    with torch.no_grad():
        bn.weight.fill_(30.0)  # z reaches about -60: far into the saturated tail
    for training in (True, False):
        bn.train(training)
        x = random_input((4, 3, 5, 5), dtype)
        var = x.double().var((0, 2, 3), unbiased=False) if training else bn.running_var.clone()
        leaf = x.clone().requires_grad_()
        y = bn(leaf * 1)
        assert (y.double() <= -alpha).any(), "the test needs saturated outputs"
        grad = torch.randn(y.shape, dtype=torch.float64).to(dtype)
        expected = grads_from_stored_output(y.detach(), grad, bn.weight.detach(), bn.bias.detach(), var, bn.eps,
                                            training, "elu", alpha)
        y.backward(grad)
        got = (leaf.grad, bn.weight.grad, bn.bias.grad)
        for name, g, e in zip(("grad_input", "grad_weight", "grad_bias"), got, expected):
            assert torch.isfinite(g.double()).all(), name
            tol = 2 * torch.finfo(dtype).eps * max(1.0, e.abs().max().item())
            torch.testing.assert_close(g.double(), e, rtol=1e-3, atol=tol, msg=f"{name} training={training}")
        bn.zero_grad()


def test_inplace_op_on_misaligned_large_input():
    """A 16.8 MB input at an address that is not a multiple of 4 (a view of raw bytes):
    the kernels write over it with plain stores, the same values as out of place."""
    count = 2 * 3 * 700001
    x = torch.frombuffer(bytearray(4 * count + 1), dtype=torch.float32, offset=1, count=count).view(2, 3, 700001)
    x.copy_(random_input((2, 3, 700001)))
    assert x.data_ptr() % 4 != 0
    expected, _, _ = torch.ops.fastbn.batch_norm_train(x.clone(), None, None, 1e-5, 2, 0.1)
    torch.ops.fastbn.batch_norm_train_(x, None, None, 1e-5, 2, 0.1)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
