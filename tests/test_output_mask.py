"""batch_norm_backward's output_mask, and the autograd that passes it: a gradient nobody
needs (a constant input, frozen parameters) is not computed, as torch's batch-norm
backward skips it, and the gradients that are computed do not change."""
import itertools

import pytest
import torch

import fastbn
from conftest import DEVICES, random_input

MASKS = list(itertools.product([True, False], repeat=3))
# planar (4,6,5,5): memory-order passes; (8,16,16,16) float32: the planar channel-group
# backward (sums and dx of a group of channels together: 4 groups of 4 channels, which
# that walk takes with at most 2 threads, see planar_channel_group); channels_last: the
# row passes
CASES = [((4, 6, 5, 5), False, torch.float32), ((8, 16, 16, 16), False, torch.float32),
         ((4, 40, 3, 5), True, torch.float32), ((4, 6, 5, 5), True, torch.bfloat16)]


@pytest.fixture(autouse=True)
def two_threads():
    """2 threads, whatever the machine's core count: the walks CASES names stay the ones run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def backward_operands(shape, channels_last, dtype, device):
    x = random_input(shape, dtype, device, channels_last)
    dy = random_input(shape, dtype, device, channels_last, mean=0.5, std=1.0)
    channels = shape[1]
    weight = 1 + 0.5 * torch.randn(channels, device=device)
    bias = torch.randn(channels, device=device)
    mean = x.float().mean((0, 2, 3))
    var = x.float().var((0, 2, 3), unbiased=False)
    return dy, x, weight, bias, mean, var


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shape,channels_last,dtype", CASES, ids=str)
def test_masked_outputs_are_empty_and_the_others_unchanged(shape, channels_last, dtype, train, device):
    operands = backward_operands(shape, channels_last, dtype, device)
    full = torch.ops.fastbn.batch_norm_backward(*operands, 1e-5, train)
    for mask in MASKS:
        outputs = torch.ops.fastbn.batch_norm_backward(*operands, 1e-5, train, 0, 0.0, list(mask))
        for name, wanted, out, reference in zip(("grad_input", "grad_weight", "grad_bias"), mask, outputs, full):
            assert out.dtype == reference.dtype and out.device == reference.device, (mask, name)
            if wanted:
                assert torch.equal(out, reference), (mask, name)
                assert out.stride() == reference.stride(), (mask, name)
            else:
                assert out.numel() == 0, (mask, name)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_with_output_masks(device):
    operands = backward_operands((4, 6, 5, 5), True, torch.float32, device)
    for train, mask in [(True, [False, True, True]), (False, [True, False, False]), (True, [True, False, True]),
                        (False, [False, False, False])]:
        torch.library.opcheck(torch.ops.fastbn.batch_norm_backward.default, (*operands, 1e-5, train, 0, 0.0, mask))


def step_grads(model, bn, x, dy, input_grad, param_grad):
    """(x.grad, weight.grad, bias.grad) of one forward+backward of model, whose batch norm
    is bn, with the input and bn's parameters frozen or not as asked."""
    bn.zero_grad(set_to_none=True)
    bn.requires_grad_(param_grad)
    x = x.detach().clone().requires_grad_(input_grad)
    model(x).backward(dy)
    return x.grad, bn.weight.grad, bn.bias.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("frozen", ["input", "params"])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("shape,channels_last,dtype", CASES, ids=str)
def test_frozen_parts_get_no_grad_and_the_rest_as_before(shape, channels_last, dtype, frozen, training, activation,
                                                         device):
    """BN on a constant input (a first layer) or with frozen parameters (fine-tuning): the
    grads that are wanted are bit for bit those of the module with nothing frozen, and
    near torch's (nn.BatchNorm2d, then the activation). (With the activation, bfloat16's
    dx is not compared with torch's: where torch's rounded output falls on the other
    side of ReLU's 0, that value's gradient differs by a whole dy; the unfrozen module's
    results are held to torch's in tests/test_activation.py.)"""
    channels = shape[1]
    x = random_input(shape, dtype, device, channels_last)
    dy = random_input(shape, dtype, device, channels_last, mean=0.5, std=1.0)
    fast = fastbn.BatchNorm2d(channels, activation=activation).to(device=device, dtype=dtype)
    torch_bn = torch.nn.BatchNorm2d(channels).to(device=device, dtype=dtype)
    with torch.no_grad():
        for name, value in (("weight", 1 + 0.5 * torch.randn(channels)), ("bias", torch.randn(channels)),
                            ("running_mean", torch.randn(channels)), ("running_var", torch.rand(channels) + 0.5)):
            getattr(fast, name).copy_(value)
            getattr(torch_bn, name).copy_(value)
    fast.train(training)
    torch_bn.train(training)
    torch_model = torch.nn.Sequential(torch_bn, torch.nn.ReLU()) if activation else torch_bn
    state = {k: v.clone() for k, v in fast.state_dict().items()}
    unfrozen = step_grads(fast, fast, x, dy, True, True)
    fast.load_state_dict(state)  # the running statistics of before that step
    wanted = (frozen != "input", frozen != "params", frozen != "params")
    grads = step_grads(fast, fast, x, dy, *wanted[:2])
    torch_grads = step_grads(torch_model, torch_bn, x, dy, *wanted[:2])
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    for name, want, grad, all_grad, reference in zip(("x", "weight", "bias"), wanted, grads, unfrozen, torch_grads):
        if not want:
            assert grad is None, name
            continue
        assert torch.equal(grad, all_grad), name
        if not (activation and dtype == torch.bfloat16 and name == "x"):
            torch.testing.assert_close(grad, reference, **tolerance, msg=name)
    torch.testing.assert_close(fast.running_mean, torch_bn.running_mean)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
def test_autograd_grad_of_one_parameter(training, device):
    """torch.autograd.grad for the weight alone: the graph task wants no grad of x even
    though x requires one; the weight's grad is the one a full backward gives."""
    x = random_input((4, 6, 5, 5), torch.float32, device).requires_grad_()
    dy = random_input((4, 6, 5, 5), torch.float32, device, mean=0.5, std=1.0)
    bn = fastbn.BatchNorm2d(6).to(device).train(training)
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2.0)
    (grad_weight,) = torch.autograd.grad(bn(x), [bn.weight], dy)
    bn.zero_grad(set_to_none=True)
    bn(x).backward(dy)
    assert torch.equal(grad_weight, bn.weight.grad)
    assert bn.bias.grad is not None and x.grad is not None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("given", ["weight", "bias", "both"])
def test_autograd_function_maps_edges_of_absent_parameters(given, device):
    """The op called from Python builds the autograd Function, whose edges skip an absent
    weight or bias: the gradient asked for is still the right one."""
    x = random_input((4, 6, 5, 5), torch.float32, device)
    dy = random_input((4, 6, 5, 5), torch.float32, device, mean=0.5, std=1.0)
    weight = (1 + 0.5 * torch.randn(6, device=device)) if given != "bias" else None
    bias = torch.randn(6, device=device) if given != "weight" else None
    params = [p.requires_grad_() for p in (weight, bias) if p is not None]
    y, _, _ = torch.ops.fastbn.batch_norm_train(x, weight, bias, 1e-5)
    grads = torch.autograd.grad(y, params, dy)
    _, full_weight, full_bias = torch.ops.fastbn.batch_norm_backward(
        dy, x, weight, bias, x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False), 1e-5, True)
    expected = [g for p, g in ((weight, full_weight), (bias, full_bias)) if p is not None]
    for grad, reference in zip(grads, expected):
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-6)
