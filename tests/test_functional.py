"""fastbn.functional.batch_norm against torch.nn.functional.batch_norm and a float64 reference."""
import inspect

import pytest
import torch
import torch.nn.functional as F

import fastbn
from conftest import DEVICES, assert_within_budget, emulated_tolerance_far_from_zero, random_input, reference_batch_norm


def test_signature_matches_torch():
    ours = inspect.signature(fastbn.functional.batch_norm).parameters
    theirs = inspect.signature(F.batch_norm).parameters
    assert list(ours) == list(theirs)
    assert [p.default for p in ours.values()] == [p.default for p in theirs.values()]


def run_both(x, weight, bias, running_mean, running_var, training, momentum=0.1, eps=1e-5):
    """(fastbn output, torch output, reference output, fastbn stats, torch stats, reference stats)."""
    stats_fast = [t.clone() if t is not None else None for t in (running_mean, running_var)]
    stats_torch = [t.clone() if t is not None else None for t in (running_mean, running_var)]
    y_fast = fastbn.functional.batch_norm(x, *stats_fast, weight, bias, training, momentum, eps)
    y_torch = F.batch_norm(x, *stats_torch, weight, bias, training, momentum, eps)
    y_ref, *stats_ref = reference_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return y_fast, y_torch, y_ref, stats_fast, stats_torch, stats_ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,channels_last", [((8, 5, 30, 30), False), ((8, 5, 30, 30), True), ((4096, 7), False),
                                                  ((3, 1, 200, 100), False), ((3, 8, 1, 1100), False),
                                                  ((3, 40, 1, 140), False)])
def test_far_from_zero_keeps_variance(shape, channels_last, dtype, device):
    """x = 1e4 + randn: E[x^2] - E[x]^2 would lose the variance entirely in float32.
    (3, 8, 1, 1100) and (3, 40, 1, 140): runs the CPU walks in groups of 1 and of 4-8
    channels (planar_channel_group)."""
    x = random_input(shape, dtype, device, channels_last, mean=1e4, std=1.0)
    channels = shape[1]
    running_mean = torch.zeros(channels, dtype=dtype, device=device)
    running_var = torch.ones(channels, dtype=dtype, device=device)
    y_fast, y_torch, y_ref, stats_fast, stats_torch, stats_ref = run_both(
        x, None, None, running_mean, running_var, True, momentum=1.0)
    emulated_tolerance = emulated_tolerance_far_from_zero(dtype, 1e4, 1.0)
    assert_within_budget(y_fast, y_torch, y_ref, "output", emulated_tolerance)
    # momentum 1 makes running_var the unbiased batch variance: about 1, to float precision.
    assert_within_budget(stats_fast[1], stats_torch[1], stats_ref[1], "running_var", emulated_tolerance)
    torch.testing.assert_close(stats_fast[1].double(), stats_ref[1], rtol=1e-4, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_outlier_first_value(channels_last, device):
    """The kernels first sum about the channel's first value: make it an outlier, so
    the single-pass sums lose their precision and the second pass must take over."""
    x = random_input((16, 3, 9, 9), torch.float32, device, channels_last)
    x[0, :, 0, 0] = 1e5
    y_fast, y_torch, y_ref, *_ = run_both(x, None, None, None, None, True)
    assert_within_budget(y_fast, y_torch, y_ref, "output")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", [0, 8, 15])
def test_outlier_first_value_of_a_later_part(sample, device):
    """The CPU splits a planar tensor into one part per thread (here two, at sample 8),
    each summing a channel about its own first value: put an outlier there."""
    x = random_input((16, 3, 32, 32), torch.float32, device)
    x[sample, :, 0, 0] = 1e5
    y_fast, y_torch, y_ref, *_ = run_both(x, None, None, None, None, True)
    assert_within_budget(y_fast, y_torch, y_ref, "output")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,channels_last,dtype", [
    ((8, 33, 127, 127), False, torch.float32),  # 17.0 MB, odd runs: streaming stores after an aligning head
    ((16, 64, 64, 64), True, torch.float32),    # 16.8 MB channels_last, 256-byte rows: streamed rows
    ((8, 33, 128, 125), True, torch.float32),   # channels_last, 132-byte rows: never streamed
    ((8, 32, 182, 182), False, torch.bfloat16),  # 17.0 MB of bfloat16
    ((8, 66, 127, 127), False, torch.bfloat16),  # 17.0 MB of bfloat16, odd runs: streamed
], ids=str)
def test_large_outputs_forward_and_backward(shape, channels_last, dtype, device):
    """Outputs from 16 MiB on (channels_last: rows of whole 64-byte lines) are written with
    streaming stores on CPU on every host (the threshold, csrc/cpu/output_streaming.h, is
    at most 16 MiB)."""
    assert torch.Size(shape).numel() * dtype.itemsize >= 16 << 20
    x = random_input(shape, dtype, device, channels_last)
    channels = shape[1]
    weight = 1 + 0.3 * torch.randn(channels, device=device)
    bias = 0.3 * torch.randn(channels, device=device)
    grad = torch.randn(shape, device=device, dtype=dtype)
    results = {}
    for name, fn, dt in (("fastbn", fastbn.functional.batch_norm, dtype), ("torch", F.batch_norm, dtype),
                         ("reference", F.batch_norm, torch.float64)):
        pdt = torch.float64 if dt == torch.float64 else torch.float32
        xx, w, b = x.to(dt).requires_grad_(), weight.to(pdt).requires_grad_(), bias.to(pdt).requires_grad_()
        y = fn(xx, None, None, w, b, True)
        gx, gw, gb = torch.autograd.grad(y, (xx, w, b), grad.to(dt))
        y_eval = fn(xx.detach(), torch.zeros(channels, device=device, dtype=pdt),
                    torch.ones(channels, device=device, dtype=pdt), w.detach(), b.detach(), False)
        results[name] = (y, gx, gw, gb, y_eval)
    for i, what in enumerate(("output", "grad_input", "grad_weight", "grad_bias", "eval output")):
        assert_within_budget(results["fastbn"][i], results["torch"][i], results["reference"][i], what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (0, 3), (4, 0, 5, 5), (0,)])
@pytest.mark.parametrize("with_weight", [True, False])
def test_empty_batch(shape, with_weight, device):
    """An empty input gets torch's result (torch returns early for it, checking no per-channel
    shapes), or torch's exception (a weight with no channel to index); running stats are kept."""
    channels = shape[1] if len(shape) > 1 else 0
    x = torch.randn(shape, device=device, dtype=torch.float64)  # float32 parameters: torch takes the mix
    weight = torch.randn(channels, device=device) if with_weight else None
    outcomes = {}
    for name, batch_norm in (("torch", F.batch_norm), ("fastbn", fastbn.functional.batch_norm)):
        xi = x.clone().requires_grad_()
        wi = None if weight is None else weight.clone().requires_grad_()
        running = torch.randn(channels, device=device), torch.rand(channels, device=device)
        saved = [r.clone() for r in running]
        try:
            y = batch_norm(xi, *running, wi, None, True)
        except Exception as error:  # noqa: BLE001  (compared with torch's below)
            outcomes[name] = type(error)
            continue
        y.sum().backward()
        assert all(torch.equal(r, s) for r, s in zip(running, saved))
        outcomes[name] = (y.shape, y.dtype, xi.grad.shape, None if wi is None else wi.grad)
    assert type(outcomes["fastbn"]) is type(outcomes["torch"])
    if isinstance(outcomes["torch"], type):
        assert outcomes["fastbn"] is outcomes["torch"]
    else:
        assert outcomes["fastbn"][:3] == outcomes["torch"][:3]
        if with_weight:
            assert torch.equal(outcomes["fastbn"][3], outcomes["torch"][3])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_with_float_params(dtype, device):
    x = random_input((6, 4, 7, 7), dtype, device)
    weight, bias = torch.randn(4, device=device), torch.randn(4, device=device)
    running_mean, running_var = torch.zeros(4, device=device), torch.ones(4, device=device)
    for training in (True, False):
        y_fast, y_torch, y_ref, stats_fast, stats_torch, stats_ref = run_both(
            x, weight, bias, running_mean, running_var, training)
        assert y_fast.dtype == dtype
        assert_within_budget(y_fast, y_torch, y_ref, f"output training={training}")
        for ours, theirs, ref in zip(stats_fast, stats_torch, stats_ref):
            assert ours.dtype == torch.float32
            assert_within_budget(ours, theirs, ref, "running stats")


@pytest.mark.parametrize("device", DEVICES)
def test_training_without_running_stats(device):
    x = random_input((5, 3, 4, 4), torch.float32, device)
    y_fast, y_torch, y_ref, *_ = run_both(x, None, None, None, None, True)
    assert_within_budget(y_fast, y_torch, y_ref, "no running stats")
    # one running statistic without the other is rejected, as by torch
    for fn in (fastbn.functional.batch_norm, F.batch_norm):
        with pytest.raises(ValueError, match="both be None or neither"):
            fn(x, torch.zeros(3, device=device), None, None, None, True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
def test_non_contiguous_input_and_grad(training, device):
    base = random_input((6, 10, 9, 8), torch.float32, device)
    x = base[:, ::2, 1:, :].transpose(2, 3)  # strided, neither contiguous nor channels_last
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(5, device=device), torch.randn(5, device=device)
    running_mean, running_var = torch.randn(5, device=device), torch.rand(5, device=device) + 0.5
    results = []
    for fn in (fastbn.functional.batch_norm, F.batch_norm):
        xi = x.detach().clone().requires_grad_()
        y = fn(xi, running_mean.clone(), running_var.clone(), weight, bias, training, 0.1, 1e-5)
        y.sum().backward()  # an expanded (stride 0) grad_output
        results.append((y, xi.grad))
    xr = x.detach().double().requires_grad_()
    y_ref, *_ = reference_batch_norm(xr, running_mean, running_var, weight, bias, training, 0.1, 1e-5)
    y_ref.sum().backward()
    assert_within_budget(results[0][0], results[1][0], y_ref, "output")
    assert_within_budget(results[0][1], results[1][1], xr.grad, "grad_input")


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_output_and_grad_stay_channels_last(device):
    x = random_input((4, 16, 6, 6), torch.float32, device, channels_last=True).requires_grad_()
    y = fastbn.BatchNorm2d(16).to(device)(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.backward(torch.randn_like(y))
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_that_jumps_far_from_its_first_values(channels_last, device):
    """Sample 0 near 0, sample 1 near 1e4 with unit spread: the later pieces sum about a
    shift far from their own mean, which takes the kernels' second pass over the piece."""
    x = random_input((2, 2, 64, 64), torch.float64, device, channels_last, mean=0.0, std=1.0)
    x[1] += 1e4
    x = x.float()
    y_fast, y_torch, y_ref, *_ = run_both(x, None, None, None, None, True)
    assert_within_budget(y_fast, y_torch, y_ref, "output")
    _, var = torch.ops.fastbn.batch_norm_stats(x)
    torch.testing.assert_close(var.double(), x.double().var((0, 2, 3), unbiased=False), rtol=1e-6, atol=0)


def data_whose_first_values_are_far_from_the_mean(pattern, shape, dtype, channels_last):
    """Inputs on which the kernels' first shift (first value, or mean of the first block
    of a sample's plane) lies several standard deviations from the channel's mean."""
    x = random_input(shape, torch.float64, "cpu", mean=0.0, std=1.0)
    if pattern == "outlier":
        x[0, :, 0, 0] = 1e3
    elif pattern == "sample_offsets":  # the spread between samples dominates the variance
        x = 0.05 * x + 4.0 * torch.randn(shape[0], shape[1], 1, 1, dtype=torch.float64)
    elif pattern == "jump":
        x[shape[0] // 2:] += 300.0
    elif pattern == "first_block_far":  # all near 100 but the first 32 values of each plane of sample 0
        x[0, :, 0, :32] = 0.3 + 0.1 * x[0, :, 0, :32]
        x[0, :, 0, 32:] = 100.0 + 2.0 * x[0, :, 0, 32:]
        x[0, :, 1:] = 100.0 + 2.0 * x[0, :, 1:]
        x[1:] = 100.0 + 2.0 * x[1:]
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["planar", "channels_last"])
@pytest.mark.parametrize("pattern", ["outlier", "sample_offsets", "jump", "first_block_far"])
@pytest.mark.parametrize("shape", [(16, 3, 9, 9), (8, 2, 70, 70), (4, 8, 2, 1050)], ids=str)
def test_float_group_statistics_far_from_the_first_values(shape, pattern, channels_last, dtype, device):
    """float32, bfloat16 and half sum their statistics in float groups about a shift
    (on the CPU), which needs that shift within about a standard deviation of the
    mean: where it is not, the second pass must restore the variance to float
    precision, and the gradients' float group sums stay within budget. (4, 8, 2, 1050):
    planar runs of 4200 bytes (float16/bfloat16; 8400 float32), which the CPU training
    forward walks a channel at a time (planar_channel_group), the statistics op in
    memory order."""
    x = data_whose_first_values_are_far_from_the_mean(pattern, shape, dtype, channels_last).to(device)
    ref = x.double()
    for what, (mean, var) in (("batch_norm_stats", torch.ops.fastbn.batch_norm_stats(x)),
                              ("batch_norm_train", torch.ops.fastbn.batch_norm_train(x, None, None, 1e-5)[1:])):
        def named(message, what=what):
            return f"{what}: {message}"
        torch.testing.assert_close(var.double(), ref.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=0, msg=named)
        torch.testing.assert_close(mean.double(), ref.mean((0, 2, 3)), rtol=0,
                                   atol=1e-6 * ref.abs().amax((0, 2, 3)).max().item(), msg=named)
    weight = (1.0 + 0.5 * torch.randn(shape[1], dtype=torch.float64)).to(dtype=dtype, device=device)
    bias = torch.randn(shape[1], dtype=torch.float64).to(dtype=dtype, device=device)
    # mean 0.1: grad_bias, a sum over up to 39200 values, stays within float16's range
    grad = random_input(shape, dtype, device, channels_last, mean=0.1, std=1.0)
    results = []
    for fn, inputs in ((fastbn.functional.batch_norm, (x, weight, bias)),
                       (F.batch_norm, (x, weight, bias)),
                       (F.batch_norm, (x.double(), weight.double(), bias.double()))):
        inputs = [t.detach().clone().requires_grad_() for t in inputs]
        y = fn(inputs[0], None, None, inputs[1], inputs[2], True)
        y.backward(grad.to(y.dtype))
        results.append([y.detach()] + [t.grad for t in inputs])
    # grad_weight on data far from zero: the CUDA kernels take the saved mean's rounding back
    # (sum_dy_xmu_about_batch_mean), so the emulated run holds it to the plain tolerance too
    for what, ours, theirs, reference in zip(("output", "grad_input", "grad_weight", "grad_bias"), *results):
        assert_within_budget(ours, theirs, reference, what)
