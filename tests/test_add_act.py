"""Fused batch norm + residual add + activation against torch's act(bn(x) + z)."""
import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.library import opcheck

import fastbn
from conftest import DEVICES, assert_bn_state_within_budget, assert_within_budget, random_input

from test_activation import ACTIVATIONS, torch_activation

ACTIVATIONS_AND_NONE = [(None, None)] + ACTIVATIONS


def _modules(shape, dtype, device):
    """(torch BN, fastbn BN, float64 torch BN) sharing random weights."""
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)]
    param_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    torch_bn = cls(shape[1]).to(device, param_dtype)
    with torch.no_grad():
        torch_bn.weight.normal_(1.0, 0.5)
        torch_bn.bias.normal_(0.0, 0.5)
    fast_cls = {nn.BatchNorm1d: fastbn.BatchNorm1d, nn.BatchNorm2d: fastbn.BatchNorm2d,
                nn.BatchNorm3d: fastbn.BatchNorm3d}[cls]
    return torch_bn, fast_cls, cls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("shape,channels_last", [((4, 6, 7, 5), False), ((4, 37, 5, 3), True), ((40, 9), False),
                                                 ((3, 5, 2, 3, 4), False)], ids=str)
@pytest.mark.parametrize("activation,param", ACTIVATIONS_AND_NONE, ids=str)
def test_add_act_matches_torch(activation, param, shape, channels_last, dtype, device):
    torch_bn, fast_cls, cls = _modules(shape, dtype, device)
    param_dtype = torch_bn.weight.dtype
    fused = fast_cls(shape[1], activation=activation, activation_param=param).to(device, param_dtype)
    fused.load_state_dict(torch_bn.state_dict())
    reference_bn = cls(shape[1]).to(device, torch.float64)
    reference_bn.load_state_dict(torch_bn.state_dict())
    act = nn.Identity() if activation is None else torch_activation(activation, param)
    for step, training in enumerate((True, True, False)):
        for m in (torch_bn, fused, reference_bn):
            m.train(training)
        x = random_input(shape, dtype, device, channels_last, mean=0.5, std=2.0)
        z = random_input(shape, dtype, device, False, mean=-0.3, std=1.0)  # the residual in the other layout
        grad = torch.randn(shape, device=device, dtype=torch.float64).to(dtype)
        xs = [x.clone().requires_grad_() for _ in range(2)] + [x.double().requires_grad_()]
        zs = [z.clone().requires_grad_() for _ in range(2)] + [z.double().requires_grad_()]
        y_torch = act(torch_bn(xs[0]) + zs[0])
        y_fast = fused(xs[1], zs[1])
        y_ref = act(reference_bn(xs[2]) + zs[2])
        assert_within_budget(y_fast, y_torch, y_ref, f"step {step} output")
        y_torch.backward(grad)
        y_fast.backward(grad)
        y_ref.backward(grad.double())
        assert_within_budget(xs[1].grad, xs[0].grad, xs[2].grad, f"step {step} grad_input")
        assert_within_budget(zs[1].grad, zs[0].grad, zs[2].grad, f"step {step} grad_residual")
        assert_bn_state_within_budget(fused, torch_bn, reference_bn, step)
        assert fused.num_batches_tracked.item() == torch_bn.num_batches_tracked.item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation,param", ACTIVATIONS_AND_NONE, ids=str)
def test_gradcheck_add_act(activation, param, training, device):
    x = random_input((3, 4, 3, 5), torch.float64, device, mean=0.2, std=1.0).requires_grad_()
    z = random_input((3, 4, 3, 5), torch.float64, device, mean=-0.1, std=1.0).requires_grad_()
    weight = (1 + 0.3 * torch.randn(4, dtype=torch.float64, device=device)).requires_grad_()
    bias = (0.3 * torch.randn(4, dtype=torch.float64, device=device)).requires_grad_()
    running_mean = torch.randn(4, dtype=torch.float64, device=device)
    running_var = torch.rand(4, dtype=torch.float64, device=device) + 0.5

    def fn(x, z, weight, bias):
        return fastbn.batch_norm_add_act(x, z, running_mean.clone(), running_var.clone(), weight, bias, training,
                                         0.1, 1e-5, activation, param)

    assert gradcheck(fn, (x, z, weight, bias))
    assert gradgradcheck(fn, (x, z, weight, bias))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("activation", [0, 1, 3, 4])
def test_opcheck_residual_ops(activation, channels_last, device):
    shape = (3, 5, 4, 6)
    x = random_input(shape, torch.float32, device, channels_last).requires_grad_()
    z = random_input(shape, torch.float32, device, channels_last, mean=-1.0).requires_grad_()
    weight = (1 + 0.2 * torch.randn(5, device=device)).requires_grad_()
    bias = (0.2 * torch.randn(5, device=device)).requires_grad_()
    rm, rv = torch.randn(5, device=device), torch.rand(5, device=device) + 0.5
    opcheck(torch.ops.fastbn.batch_norm_train.default, (x, weight, bias, 1e-5, activation, 0.5, z))
    opcheck(torch.ops.fastbn.batch_norm_eval.default, (x, weight, bias, rm, rv, 1e-5, activation, 0.5, z))
    dy = torch.randn(shape, device=device)
    opcheck(torch.ops.fastbn.batch_norm_add_act_backward.default,
            (dy, x.detach(), z.detach(), weight.detach(), bias.detach(), rm, rv, 1e-5, True, activation, 0.5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_add_act_backward_op_matches_formula(channels_last, device):
    """The op's grad_residual is dy * act'(bn(x) + z) (ELU) and its grad_input is batch
    norm's backward of that, in float64."""
    shape = (5, 7, 3, 3)
    x = random_input(shape, torch.float64, device, channels_last)
    z = random_input(shape, torch.float64, device, mean=-1.0)
    dy = torch.randn(shape, dtype=torch.float64, device=device)
    w = 1 + 0.3 * torch.randn(7, dtype=torch.float64, device=device)
    b = torch.randn(7, dtype=torch.float64, device=device)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    grad_input, grad_residual, grad_weight, grad_bias = torch.ops.fastbn.batch_norm_add_act_backward(
        dy, x, z, w, b, mean, var, 1e-5, True, 3, 0.7)
    view = (1, -1, 1, 1)
    xhat = (x - mean.view(view)) / torch.sqrt(var.view(view) + 1e-5)
    pre = xhat * w.view(view) + b.view(view) + z
    g = dy * torch.where(pre > 0, torch.ones_like(pre), 0.7 * torch.exp(pre))
    torch.testing.assert_close(grad_residual, g, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_bias, g.sum((0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_weight, (g * xhat).sum((0, 2, 3)), rtol=1e-12, atol=1e-12)
    expected_dx = (w / torch.sqrt(var + 1e-5)).view(view) * (
        g - g.mean((0, 2, 3), keepdim=True) - xhat * (g * xhat).mean((0, 2, 3), keepdim=True))
    torch.testing.assert_close(grad_input, expected_dx, rtol=1e-10, atol=1e-12)


def test_compile_fullgraph_residual_module():
    bn = fastbn.BatchNorm2d(6, activation="relu")
    x = random_input((4, 6, 5, 5)).requires_grad_()
    z = random_input((4, 6, 5, 5), mean=-1.0).requires_grad_()
    compiled = torch.compile(lambda a, b: bn(a, b), fullgraph=True, backend="aot_eager")
    reference_bn = fastbn.BatchNorm2d(6, activation="relu")
    y = compiled(x, z)
    y_ref = reference_bn(x, z)
    torch.testing.assert_close(y, y_ref)
    (gx, gz) = torch.autograd.grad(y.square().sum(), (x, z))
    (gx_ref, gz_ref) = torch.autograd.grad(y_ref.square().sum(), (x, z))
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gz, gz_ref)


def test_resnet_basic_block_pattern():
    """A ResNet basic block's tail, bn2(conv2(out)) + identity then relu, in one module call."""
    torch_bn = nn.BatchNorm2d(8)
    fast_bn = fastbn.BatchNorm2d(8, activation="relu")
    fast_bn.load_state_dict(torch_bn.state_dict())
    conv = nn.Conv2d(8, 8, 3, padding=1)
    identity = random_input((2, 8, 6, 6))
    out = conv(identity)
    torch.testing.assert_close(fast_bn(out, identity), torch.relu(torch_bn(out) + identity))


# ---------------------------------------------------------------- bad inputs


def test_residual_errors():
    bn = fastbn.BatchNorm2d(4, activation="relu")
    x = random_input((2, 4, 3, 3))
    with pytest.raises(RuntimeError, match="residual has size"):
        bn(x, random_input((2, 4, 3, 2)))
    with pytest.raises(RuntimeError, match="residual has dtype"):
        bn(x, random_input((2, 4, 3, 3), torch.float64))
    with pytest.raises(TypeError, match="residual must be a Tensor"):
        bn(x, 1.0)
    with pytest.raises(TypeError, match="residual must be a Tensor"):
        fastbn.batch_norm_add_act(x, None, None, None, training=True)
    # nothing was updated by the rejected calls
    assert bn.num_batches_tracked.item() == 0
    assert torch.equal(bn.running_mean, torch.zeros(4))
    with pytest.raises(RuntimeError, match="residual has size"):
        torch.ops.fastbn.batch_norm_train(x, None, None, 1e-5, 1, 0.0, random_input((2, 4, 9)))
