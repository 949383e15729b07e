"""fastbn's modules against torch.nn.BatchNorm{1,2,3}d over a grid of configurations.

Each case runs three training steps and one eval step on fresh data with a
non-zero mean and compares outputs, input/weight/bias grads, running statistics
and num_batches_tracked with torch's module in the same dtype and with torch's
module in float64 (the reference), within the error budget of conftest.py.
"""
import copy

import pytest
import torch
from torch import nn

import fastbn
from conftest import ALL_DTYPES, DEVICES, assert_within_budget, random_input

REDUCED = (torch.float16, torch.bfloat16)

SHAPES = [
    ("BatchNorm2d", (4, 3, 5, 5), False),
    ("BatchNorm2d", (1, 8, 7, 9), False),      # N = 1 with H * W > 1
    ("BatchNorm2d", (6, 1, 13, 11), False),    # C = 1: the channel is split across threads
    ("BatchNorm2d", (3, 5, 7, 3), True),       # channels_last, odd sizes
    ("BatchNorm2d", (2, 512, 3, 5), False),    # large C, small spatial
    ("BatchNorm2d", (2, 512, 3, 5), True),
    ("BatchNorm2d", (5, 37, 9, 9), True),      # C not a multiple of the vector width
    ("BatchNorm2d", (9, 2, 70, 71), False),    # several statistics pieces per channel
    ("BatchNorm1d", (16, 10), False),
    ("BatchNorm1d", (300, 33), False),
    ("BatchNorm1d", (4, 6, 7), False),
    ("BatchNorm3d", (2, 4, 3, 5, 6), False),
    ("BatchNorm3d", (2, 4, 3, 5, 6), True),
]

# (affine, track_running_stats, momentum): every value of each, not the full product.
MODES = [(True, True, 0.1), (False, True, None), (True, False, 0.1), (False, False, 0.3), (True, True, None)]


def make_modules(cls_name, channels, affine, track, momentum, dtype, param_dtype, device):
    torch_bn = getattr(nn, cls_name)(channels, momentum=momentum, affine=affine, track_running_stats=track)
    with torch.no_grad():
        if affine:
            torch_bn.weight.normal_(1.0, 0.5)
            torch_bn.bias.normal_(0.0, 0.5)
        if track:
            torch_bn.running_mean.normal_(0.0, 1.0)
            torch_bn.running_var.uniform_(0.5, 2.0)
    torch_bn.to(device=device, dtype=param_dtype)
    fast_bn = getattr(fastbn, cls_name)(channels, momentum=momentum, affine=affine, track_running_stats=track)
    fast_bn.to(device=device, dtype=param_dtype).load_state_dict(torch_bn.state_dict())
    # The reference starts from the same (rounded) values the two modules hold.
    reference_bn = copy.deepcopy(torch_bn).to(dtype=torch.float64)
    return torch_bn, fast_bn, reference_bn


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"affine{int(m[0])}-track{int(m[1])}-mom{m[2]}")
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("cls_name,shape,channels_last", SHAPES, ids=lambda v: str(v))
def test_module_parity(cls_name, shape, channels_last, dtype, mode, device):
    affine, track, momentum = mode
    # Half inputs take float32 parameters (as under autocast) or their own dtype (model.half()).
    param_dtype = torch.float32 if dtype in REDUCED and affine else dtype
    torch_bn, fast_bn, reference_bn = make_modules(cls_name, shape[1], affine, track, momentum, dtype, param_dtype,
                                                   device)
    assert isinstance(fast_bn, getattr(nn, cls_name))
    for step in range(4):
        training = step < 3
        for module in (torch_bn, fast_bn, reference_bn):
            module.train(training)
        x = random_input(shape, dtype, device, channels_last)
        # Rounded to dtype first: the reference differentiates with the grad the others get.
        grad = torch.randn(shape, dtype=torch.float64, device=device).to(dtype).double()
        x_torch, x_fast, x_ref = (x.clone().requires_grad_(), x.clone().requires_grad_(),
                                  x.double().requires_grad_())
        y_torch, y_fast, y_ref = torch_bn(x_torch), fast_bn(x_fast), reference_bn(x_ref)
        what = f"step {step} ({'train' if training else 'eval'})"
        assert_within_budget(y_fast, y_torch, y_ref, f"{what} output")
        assert y_fast.stride() == y_torch.stride(), f"{what}: output strides {y_fast.stride()} vs {y_torch.stride()}"
        y_torch.backward(grad.to(dtype))
        y_fast.backward(grad.to(dtype))
        y_ref.backward(grad)
        assert_within_budget(x_fast.grad, x_torch.grad, x_ref.grad, f"{what} grad_input")
        if affine:
            for name in ("weight", "bias"):
                p_fast, p_torch, p_ref = (getattr(m, name) for m in (fast_bn, torch_bn, reference_bn))
                assert_within_budget(p_fast.grad, p_torch.grad, p_ref.grad, f"{what} grad_{name}")
                for p in (p_fast, p_torch, p_ref):
                    p.grad = None
        if track:
            for name in ("running_mean", "running_var"):
                assert_within_budget(getattr(fast_bn, name), getattr(torch_bn, name), getattr(reference_bn, name),
                                     f"{what} {name}")
            assert fast_bn.num_batches_tracked.item() == torch_bn.num_batches_tracked.item() == min(step + 1, 3)
        else:
            assert fast_bn.running_mean is None and fast_bn.num_batches_tracked is None
