"""The CPU kernels of every vector ISA this machine runs (fastbn.ops.CPU_CAPABILITIES),
compared in one process through fastbn.ops.use_cpu_capability, and the run-time
choice of the ISA.

The tensors here are past the streaming-store threshold, in every dtype, with
planes that start at every alignment and inputs that start one element into a
larger buffer. .ci/run also reruns the kernel test files (small shapes) under
FASTBN_CPU_CAPABILITY set to each capability below the machine's best.
"""
import bisect
import contextlib
import ctypes
import os
import platform
import re
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastbn
from conftest import (ALL_DTYPES, CUDA_EMULATED, EMULATED_TOLERANCE, X86_LINUX, assert_within_budget, load_setup_script,
                      random_input)

ISAS = fastbn.ops.CPU_CAPABILITIES
X86_ISAS_ABOVE_DEFAULT = ("AVX2", "AVX512", "AVX512_BF16")  # every capability an x86-64 build carries
OUT_OF_CACHE_BYTES = 16 << 20  # kOutOfCacheBytes in csrc/cpu/work_division.h
ROW_ORDER_BYTES = 4 << 20  # kRowOrderBytes in csrc/cpu/work_division.h
# this host's size from which outputs are written with streaming stores, either layout: an eighth
# of the L3 within 4-16 MiB (csrc/cpu/output_streaming.h)
STREAMING_BYTES = fastbn.ops.cpu_streaming_bytes()
GUARD = 7.0


def past_streaming_threshold(dtype, channels, spatial):
    """The smallest batch whose tensors of (channels, *spatial) per sample reach OUT_OF_CACHE_BYTES
    (past every streaming threshold too)."""
    per_sample = channels * spatial[0] * spatial[1] * dtype.itemsize
    return (OUT_OF_CACHE_BYTES // per_sample + 1, channels) + spatial


def shape_for(dtype, channels_last):
    if channels_last:  # 64 channels: rows of whole 64-byte lines, so the output is streamed by rows
        return past_streaming_threshold(dtype, 64, (65, 65))
    if dtype in (torch.float16, torch.bfloat16):
        return (16, 64, 111, 111)  # issue 14's shape: planes of 12321 values start at every alignment
    # odd planes of 8281 values; many channels keep float64's sums over each channel short
    # (over 160k values their rounding alone exceeds conftest's float64 allowance of 1e-12)
    return past_streaming_threshold(dtype, 128, (91, 91))


def unaligned_copy(x):
    """x's values in a view starting one element into a buffer (an address aligned to
    no vector), with one GUARD value before and after it: (view, buffer)."""
    buffer = torch.full((x.numel() + 2,), GUARD, dtype=x.dtype)
    view = buffer[1:-1].as_strided(x.shape, x.stride())
    view.copy_(x)
    return view, buffer


def assert_guards_intact(buffer, what):
    assert buffer[0].item() == GUARD and buffer[-1].item() == GUARD, f"{what}: wrote outside the tensor"


def random_state(channels):
    """A BatchNorm2d state dict with random parameters and running statistics (float32)."""
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.normal_(1.0, 0.5)
        bn.bias.normal_(0.0, 0.5)
        bn.running_mean.normal_(0.0, 1.0)
        bn.running_var.uniform_(0.5, 2.0)
    return bn.state_dict()


def make_bn(module_class, state, dtype, **kwargs):
    bn = module_class(state["weight"].numel(), **kwargs)
    bn.load_state_dict(state)
    return bn.to(dtype)


def training_step(bn, x, grad):
    """(output, grad_input, grad_weight, grad_bias, running_mean, running_var) of one training step."""
    x = x.detach().requires_grad_()
    y = bn(x)
    y.backward(grad)
    return y.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var


STEP_OUTPUTS = ("output", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var")


@pytest.mark.parametrize("channels_last", [False, True], ids=["planar", "channels_last"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_isa_past_the_streaming_threshold(dtype, channels_last):
    """Training forward and backward (the input starting one element into its buffer),
    the in-place forward over such a view, and SyncBatchNorm's phase ops, under each ISA,
    against torch in the same dtype and a float64 reference."""
    shape = shape_for(dtype, channels_last)
    assert torch.Size(shape).numel() * dtype.itemsize >= max(OUT_OF_CACHE_BYTES, STREAMING_BYTES)
    channels = shape[1]
    x = random_input(shape, dtype, channels_last=channels_last)
    # mean 0.1: grad_bias (a sum over up to 200k values) stays within float16's range
    # (65504), so the comparison with float64 means something in every dtype
    grad = random_input(shape, dtype, channels_last=channels_last, mean=0.1, std=1.0)
    state = random_state(channels)
    expected = training_step(make_bn(nn.BatchNorm2d, state, dtype), x, grad)
    reference = training_step(make_bn(nn.BatchNorm2d, state, torch.float64), x.double(), grad.double())
    count = x.numel() // channels

    for isa in ISAS:
        with fastbn.ops.use_cpu_capability(isa):
            x_view, x_buffer = unaligned_copy(x)
            fast = training_step(make_bn(fastbn.BatchNorm2d, state, dtype), x_view, grad)
            for actual, torch_result, ref, what in zip(fast, expected, reference, STEP_OUTPUTS):
                assert_within_budget(actual, torch_result, ref, f"{isa}: {what}")
            assert_guards_intact(x_buffer, f"{isa}: forward")

            inplace_bn = make_bn(fastbn.BatchNorm2d, state, dtype, inplace=True)
            y_view, y_buffer = unaligned_copy(x)
            with torch.no_grad():
                inplace_bn(y_view)
            assert_within_budget(y_view, expected[0], reference[0], f"{isa}: in-place output")
            assert_within_budget(inplace_bn.running_var, expected[5], reference[5], f"{isa}: in-place running_var")
            assert_guards_intact(y_buffer, f"{isa}: in-place forward")

            # SyncBatchNorm's phases: local statistics, backward sums, grad_input
            weight = state["weight"].to(fastbn.ops.accumulate_dtype(dtype))
            bias = state["bias"].to(weight.dtype)
            mean, var = torch.ops.fastbn.batch_norm_stats(x_view)
            assert_within_budget(var, torch.var(x.to(var.dtype), (0, 2, 3), correction=0),
                                 torch.var(x.double(), (0, 2, 3), correction=0), f"{isa}: batch_norm_stats var")
            sum_dy, sum_dy_xmu = torch.ops.fastbn.batch_norm_backward_reduce(grad, x_view, weight, bias, mean, var,
                                                                             1e-5)
            grad_input = torch.ops.fastbn.batch_norm_backward_elemt(grad, x_view, weight, bias, mean, var, sum_dy,
                                                                    sum_dy_xmu, 1e-5, count)
            assert_within_budget(grad_input, expected[1], reference[1], f"{isa}: batch_norm_backward_elemt")
            assert_guards_intact(x_buffer, f"{isa}: phase ops")


@pytest.mark.parametrize("streaming_from", [OUT_OF_CACHE_BYTES, ROW_ORDER_BYTES], ids=["large_l3", "small_l3"])
@pytest.mark.parametrize("channels", [48, 80, 136])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_isa_channels_last_between_row_order_and_streaming(dtype, channels, streaming_from):
    """channels_last tensors whose elementwise passes walk rows in memory order
    (kRowOrderBytes <= size < kOutOfCacheBytes), under each ISA. Their reductions walk
    whole rows where a row is 2-4 channel blocks (row_walk_group_rows: 48 and 80 channels
    with AVX-512 are 2 and 3 blocks of 32, the last one partial; the statistics of every
    dtype, the backward sums of half and bfloat16 rows of 2 or 3 blocks), else each piece
    in groups of rows block by block (groups of kInCacheReductionGroupBytes, the last one
    of a piece partial: 136 channels, 5 blocks with AVX-512; 80 and 136 channels with
    AVX2 and DEFAULT, 5 and 9 blocks of 16, where 48 channels are 3 blocks, walked whole).
    With the streaming threshold of a host with a large L3 (16 MiB, from 128 MiB of L3
    on), every output is stored normally; with that of a small L3 (4 MiB, 32 MiB or
    less), the rows of whole 64-byte lines (float32 and float64) are streamed."""
    per_sample = channels * 33 * 35 * dtype.itemsize
    shape = (ROW_ORDER_BYTES // per_sample + 1, channels, 33, 35)
    size = torch.Size(shape).numel() * dtype.itemsize
    assert ROW_ORDER_BYTES <= size < OUT_OF_CACHE_BYTES
    x, grad, _, state, expected, reference = channels_last_case(shape, dtype)
    with fastbn.ops.use_cpu_streaming_bytes(streaming_from):
        for isa in ISAS:
            with fastbn.ops.use_cpu_capability(isa):
                assert_channels_last_step_within_budget(state, dtype, x, grad, expected, reference, isa)


@pytest.mark.parametrize("channels", [32, 48, 64, 96, 128])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_isa_channels_last_rows_of_whole_channel_blocks(dtype, channels):
    """channels_last rows of 2-4 whole channel blocks, whose elementwise passes hold every
    block's coefficients in registers down a tile (walk_register_tile): 32, 48 and 64
    channels are 2, 3 and 4 blocks of 16 (float32 and the half types with AVX2 and DEFAULT,
    float64 with AVX-512), 64, 96 and 128 channels 2, 3 and 4 blocks of 32 (float32 and the
    half types with AVX-512); the others are 1 block or past 4. In cache, with 57 rows per
    sample (tiles end inside samples): the training step, eval, and leaky_relu over a
    residual, under each ISA, against torch in the same dtype and a float64 reference."""
    shape = (5, channels, 3, 19)
    x, grad, residual, state, expected, reference = channels_last_case(shape, dtype)
    with torch.no_grad():
        expected_eval = make_bn(nn.BatchNorm2d, state, dtype).eval()(x)
        reference_eval = make_bn(nn.BatchNorm2d, state, torch.float64).eval()(x.double())

    leaky = nn.LeakyReLU(0.2)
    # parameters in the accumulation dtype (float32 for the half types: see test_every_isa_short_planar_runs)
    param_dtype = fastbn.ops.accumulate_dtype(dtype)
    activated_torch = activated_step(make_bn(nn.BatchNorm2d, state, param_dtype), x, residual, grad, leaky)
    activated_reference = activated_step(make_bn(nn.BatchNorm2d, state, torch.float64), x.double(),
                                         residual.double(), grad, leaky)
    kink_far = away_from_kink(activated_reference[0], 0.2)
    for isa in ISAS:
        with fastbn.ops.use_cpu_capability(isa):
            assert_channels_last_step_within_budget(state, dtype, x, grad, expected, reference, isa)
            with torch.no_grad():
                fast_eval = make_bn(fastbn.BatchNorm2d, state, dtype).eval()(x)
            assert_within_budget(fast_eval, expected_eval, reference_eval, f"{isa}: eval output")
            fused = make_bn(fastbn.BatchNorm2d, state, param_dtype, activation="leaky_relu", activation_param=0.2)
            assert_activated_within_budget(activated_step(fused, x, residual, grad), activated_torch,
                                           activated_reference, kink_far, isa)


@pytest.mark.parametrize("dtype,channels", [(torch.float32, 40), (torch.float32, 72), (torch.float32, 80),
                                            (torch.bfloat16, 72), (torch.float32, 200), (torch.bfloat16, 136),
                                            (torch.float16, 136)],
                         ids=str)
def test_every_isa_channels_last_rows_past_the_streaming_threshold(dtype, channels):
    """channels_last tensors too large for the cache, whose reductions walk rows in
    memory order (rows_sum_and_squares, rows_backward_sums): rows of 2-4 channel blocks
    whole, wider ones in groups of rows panel by panel (for_each_row_panel, panels of up
    to 4 blocks). With AVX-512 (blocks of 32) 40, 72 and 80 channels are 2, 3 and 3
    blocks (the last one partial), 200 channels 7 (panels of 4 and 3 blocks, the last
    one partial), 136 channels (bfloat16, float16) 5 (panels of 4 and 1, partial); with
    AVX2 (blocks of 16) 72 and 80 channels are panels of 4 and 1 blocks, 200 channels of
    4, 4, 4 and 1, 136 of 4, 4 and 1. A training step and a fused activation with a
    residual, under each ISA, against torch in the same dtype and a float64 reference.
    Rows of 80 float32 channels (320 bytes, whole lines) are written with streaming
    stores, their partial last block with plain ones; the others' rows are not whole
    lines. The activation's gradients are compared away from its kink (away_from_kink)."""
    per_sample = channels * 32 * 32 * dtype.itemsize
    shape = (OUT_OF_CACHE_BYTES // per_sample + 1, channels, 32, 32)
    x, grad, residual, state, expected, reference = channels_last_case(shape, dtype)

    # float32 parameters: see test_every_isa_short_planar_runs
    leaky = nn.LeakyReLU(0.2)
    activated_torch = activated_step(make_bn(nn.BatchNorm2d, state, torch.float32), x, residual, grad, leaky)
    activated_reference = activated_step(make_bn(nn.BatchNorm2d, state, torch.float64), x.double(),
                                         residual.double(), grad, leaky)
    kink_far = away_from_kink(activated_reference[0], 0.2)
    kink_tolerance = kink_sum_tolerances(x, grad, ~kink_far, 0.2, activated_reference[3:])
    for isa in ISAS:
        with fastbn.ops.use_cpu_capability(isa):
            fast = training_step(make_bn(fastbn.BatchNorm2d, state, dtype), x, grad)
            for actual, torch_result, ref, what in zip(fast, expected, reference, STEP_OUTPUTS):
                assert_within_budget(actual, torch_result, ref, f"{isa}: {what}")
            fused = make_bn(fastbn.BatchNorm2d, state, torch.float32, activation="leaky_relu", activation_param=0.2)
            assert_activated_within_budget(activated_step(fused, x, residual, grad), activated_torch,
                                           activated_reference, kink_far, isa, kink_tolerance)


def channels_last_case(shape, dtype):
    """Random channels_last x, grad and residual of `shape`, a random state, and the
    training step of torch's BatchNorm2d in `dtype` and in float64 on them:
    (x, grad, residual, state, expected, reference)."""
    x = random_input(shape, dtype, channels_last=True)
    grad = random_input(shape, dtype, channels_last=True, mean=0.1, std=1.0)
    residual = random_input(shape, dtype, channels_last=True, mean=-0.3, std=1.0)
    state = random_state(shape[1])
    expected = training_step(make_bn(nn.BatchNorm2d, state, dtype), x, grad)
    reference = training_step(make_bn(nn.BatchNorm2d, state, torch.float64), x.double(), grad.double())
    return x, grad, residual, state, expected, reference


def assert_channels_last_step_within_budget(state, dtype, x, grad, expected, reference, isa):
    """fastbn's training step (channels_last output) against channels_last_case's."""
    fast = training_step(make_bn(fastbn.BatchNorm2d, state, dtype), x, grad)
    assert fast[0].is_contiguous(memory_format=torch.channels_last)
    for actual, torch_result, ref, what in zip(fast, expected, reference, STEP_OUTPUTS):
        assert_within_budget(actual, torch_result, ref, f"{isa}: {what}")


def activated_step(bn, x, residual, grad, act=None):
    """(output, grad_input, grad_residual, grad_weight, grad_bias) of act(bn(x) + residual),
    or of fastbn's fused bn(x, residual) when act is None."""
    x, residual = x.detach().requires_grad_(), residual.detach().requires_grad_()
    y = act(bn(x) + residual) if act is not None else bn(x, residual)
    y.backward(grad.to(x.dtype))
    return y.detach(), x.grad, residual.grad, bn.weight.grad, bn.bias.grad


ACTIVATED_OUTPUTS = ("activated output", "activated grad_input", "grad_residual", "activated grad_weight",
                     "activated grad_bias")


def assert_activated_within_budget(activated, activated_torch, activated_reference, kink_far, isa,
                                   kink_tolerance=None):
    """activated_step's results against torch's and float64's, the gradients of the input
    and residual away from the kink (away_from_kink); kink_tolerance: emulated tolerances of
    the parameters' gradients (kink_sum_tolerances)."""
    for actual, torch_result, ref, what in zip(activated, activated_torch, activated_reference, ACTIVATED_OUTPUTS):
        if what in ("activated grad_input", "grad_residual"):
            actual, torch_result, ref = (t[kink_far] for t in (actual, torch_result, ref))
        assert_within_budget(actual, torch_result, ref, f"{isa}: {what}",
                             emulated_tolerance=(kink_tolerance or {}).get(what))


def away_from_kink(activated_reference_output, negative_slope, band=1e-6):
    """Where the float64 pre-activation bn(x) + residual of a leaky_relu lies more than
    `band` from its kink at 0. Within it, a rounding of bn(x) may put a value on the
    other side, where either slope is right: in the millions of values of the tests past
    the cache a few land there (under the emulated CUDA kernels one float16 grad_input
    value was 0.55 off the reference, against a fixed tolerance of 0.0095). Near the kink
    |bn(x)| = |residual|, under 6 here, where float32's roundings of bn(x) come to well
    under 1e-6. At most 1e-4 of the values may be excluded, so that the comparison still
    covers both sides."""
    y = activated_reference_output
    pre = torch.where(y > 0, y, y / negative_slope)
    far = pre.abs() > band
    assert (~far).sum().item() <= 1e-4 * far.numel(), "too many values at the kink: band too wide"
    return far


def kink_sum_tolerances(x, grad, near_kink, negative_slope, reference_grads):
    """Under the emulated CUDA kernels, the tolerances of the activated grad_weight and
    grad_bias (relative to the reference's largest value, as EMULATED_TOLERANCE): float32's,
    plus the most that the values near the kink (away_from_kink) can move the sums by
    taking the other slope, (1 - slope) * |dy| (* |x_hat| for grad_weight) summed over
    them. (One such value moved a float16 grad_weight by 0.15, seven times float32's
    tolerance of its scale.)"""
    dims = (0, 2, 3)
    x64 = x.double()
    x_hat = (x64 - x64.mean(dims, keepdim=True)) / x64.var(dims, unbiased=False, keepdim=True).add(1e-5).sqrt()
    either_slope = (1 - negative_slope) * grad.double().abs() * near_kink
    shifts = {"activated grad_weight": (either_slope * x_hat.abs()).sum(dims).max().item(),
              "activated grad_bias": either_slope.sum(dims).max().item()}
    tolerances = {}
    for (what, shift), reference in zip(shifts.items(), reference_grads):
        scale = max(1.0, reference.abs().max().item())
        tolerances[what] = EMULATED_TOLERANCE[torch.float32] + shift / scale
    return tolerances


# Planar runs short enough that the reductions take a vector's width of runs at once
# (planar_grouped_moments, planar_grouped_backward_sums): up to 16 blocks per run, each run
# one float group but float32's backward sums past 4 blocks (float_backward_runs; a block
# is 32 values with AVX-512, 16 with AVX2 and DEFAULT); shapes at and past each limit, runs
# of channels that wrap around C (C not a multiple of the lanes, C below them), and parts
# of 3 threads starting inside runs.
SHORT_PLANAR_RUNS = [(16, 40, 7, 7), (7, 3, 11, 11), (5, 24, 8, 8), (5, 24, 5, 13), (5, 24, 8, 16), (5, 24, 3, 43),
                     (3, 20, 16, 16), (3, 20, 257, 1), (3, 20, 16, 32), (3, 20, 27, 19), (64, 17, 1, 1)]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHORT_PLANAR_RUNS, ids=str)
def test_every_isa_short_planar_runs(shape, dtype):
    """Training step, SyncBatchNorm's phase ops and a fused activation with a residual on
    short planar runs, under each ISA and 3 threads, against torch in the same dtype and a
    float64 reference."""
    check_every_isa_planar_step(shape, dtype)


CHANNEL_GROUP_CHUNK = 4096  # kChannelGroupChunk in csrc/cpu/work_division.h
CHANNEL_GROUP_MIN_RUN = 512  # kChannelGroupMinRun


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("run_bytes,channels", [(CHANNEL_GROUP_CHUNK, 10), (CHANNEL_GROUP_MIN_RUN, 45)],
                         ids=["one_channel_groups", "eight_channel_groups"])
def test_every_isa_planar_channel_groups(dtype, run_bytes, channels):
    """The planar training passes that walk a group of channels at a time
    (planar_channel_group: runs of at least 512 bytes, groups of chunks of 4 KiB, the
    group's inputs within half the L2): runs just past 4 KiB (a channel per group, 10
    groups) and just past 512 bytes (8 channels per group, 45 channels: 5 whole groups
    and one of 5), odd lengths so that runs start at every alignment, 3 threads; as
    test_every_isa_short_planar_runs checks them. (1e4 + randn on this walk:
    test_functional.py.)"""
    values = run_bytes // dtype.itemsize + 3 + (run_bytes // dtype.itemsize) % 2  # odd
    check_every_isa_planar_step((3, channels, 1, values), dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("walk", ["parts", "channel_groups"])
def test_every_isa_planar_runs_streamed_across_runs(dtype, walk):
    """The planar elementwise passes walk a thread's part, or one sample's chunk of a
    channel group, as one span across its runs (flat_forward, flat_backward), streamed
    (past kStreamingBytes) in blocks placed by the output's alignment, a block that crosses a run's
    end taking each lane's channel's coefficients (bfloat16's lanes hold even and odd
    values with AVX2 and AVX-512). Odd planes so that runs start at every alignment, 3
    threads so that parts start inside runs; "channel_groups": runs of 512-1560 bytes
    (13x15, 17x17 for 2-byte dtypes) in a batch of 16, the groups' inputs within half
    the L2 (planar_channel_group); "parts": 121-value runs (under 512 bytes: no groups).
    The residual of the fused activation is far above the kink (mean 20): in millions
    of values a few land within rounding of it, where torch and fastbn may take different sides
    (with mean -0.3, one float32 grad_input value under DEFAULT was 0.27 off torch's,
    with the run-by-run walk too). The lanes' coefficients near the kink are checked on
    the small shapes above, which walk the same way unstreamed."""
    if walk == "parts":
        per_sample = 64 * 11 * 11 * dtype.itemsize
        shape = (STREAMING_BYTES // per_sample + 1, 64, 11, 11)
    else:
        plane = (17, 17) if dtype.itemsize == 2 else (13, 15)
        assert plane[0] * plane[1] * dtype.itemsize >= CHANNEL_GROUP_MIN_RUN
        shape = (16, STREAMING_BYTES // (16 * plane[0] * plane[1] * dtype.itemsize) + 1) + plane
    assert torch.Size(shape).numel() * dtype.itemsize >= STREAMING_BYTES
    check_every_isa_planar_step(shape, dtype, residual_mean=20.0)


def check_every_isa_planar_step(shape, dtype, residual_mean=-0.3):
    x = random_input(shape, dtype, mean=3.0, std=2.0)
    grad = random_input(shape, dtype, mean=0.1, std=1.0)
    residual = random_input(shape, dtype, mean=residual_mean, std=1.0)
    channels, count = shape[1], x.numel() // shape[1]
    state = random_state(channels)
    # the parameters' and sums' dtype: float32 for half/bfloat16 (mixed precision, so that the
    # float64 reference has the same weights: near the activation's kink a rounded weight
    # moves outputs across it), else the input's
    param_dtype = fastbn.ops.accumulate_dtype(dtype)
    expected = training_step(make_bn(nn.BatchNorm2d, state, dtype), x, grad)
    reference = training_step(make_bn(nn.BatchNorm2d, state, torch.float64), x.double(), grad.double())

    leaky = nn.LeakyReLU(0.2)
    activated_torch = activated_step(make_bn(nn.BatchNorm2d, state, param_dtype), x, residual, grad, leaky)
    activated_reference = activated_step(make_bn(nn.BatchNorm2d, state, torch.float64), x.double(),
                                         residual.double(), grad.double(), leaky)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        for isa in ISAS:
            with fastbn.ops.use_cpu_capability(isa):
                fast = training_step(make_bn(fastbn.BatchNorm2d, state, dtype), x, grad)
                for actual, torch_result, ref, what in zip(fast, expected, reference, STEP_OUTPUTS):
                    assert_within_budget(actual, torch_result, ref, f"{isa}: {what}")
                weight = state["weight"].to(param_dtype)
                bias = state["bias"].to(param_dtype)
                mean, var = torch.ops.fastbn.batch_norm_stats(x)
                assert_within_budget(var, torch.var(x.to(param_dtype), (0, 2, 3), correction=0),
                                     torch.var(x.double(), (0, 2, 3), correction=0), f"{isa}: batch_norm_stats var")
                sum_dy, sum_dy_xmu = torch.ops.fastbn.batch_norm_backward_reduce(grad, x, weight, bias, mean, var,
                                                                                 1e-5)
                centered = x.double() - mean.double().view(1, -1, 1, 1)
                assert_within_budget(sum_dy, grad.to(param_dtype).sum((0, 2, 3)), grad.double().sum((0, 2, 3)),
                                     f"{isa}: sum_dy")
                assert_within_budget(sum_dy_xmu, (grad.to(param_dtype) * centered.to(param_dtype)).sum((0, 2, 3)),
                                     (grad.double() * centered).sum((0, 2, 3)), f"{isa}: sum_dy_xmu")
                grad_input = torch.ops.fastbn.batch_norm_backward_elemt(grad, x, weight, bias, mean, var, sum_dy,
                                                                        sum_dy_xmu, 1e-5, count)
                assert_within_budget(grad_input, expected[1], reference[1], f"{isa}: batch_norm_backward_elemt")
                fused = make_bn(fastbn.BatchNorm2d, state, param_dtype, activation="leaky_relu", activation_param=0.2)
                activated = activated_step(fused, x, residual, grad)
                for actual, torch_result, ref, what in zip(activated, activated_torch, activated_reference,
                                                           ACTIVATED_OUTPUTS):
                    assert_within_budget(actual, torch_result, ref, f"{isa}: {what}")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_every_isa_short_planar_runs_keep_non_finite_values_to_their_channel(dtype):
    """An infinity and a NaN in runs that are reduced together with other channels' runs
    (16 or 8 runs at once): only their own channels' statistics and sums become non-finite,
    as in torch."""
    x = random_input((4, 20, 7, 7), dtype, mean=3.0, std=2.0)
    x[1, 3, 2, 2] = float("inf")
    x[2, 7, 0, 0] = float("nan")
    grad = random_input(x.shape, dtype, mean=0.1, std=1.0)
    finite = torch.ones(20, dtype=torch.bool)
    finite[[3, 7]] = False
    weight, bias = torch.rand(20) + 0.5, torch.randn(20)
    for isa in ISAS:
        with fastbn.ops.use_cpu_capability(isa):
            mean, var = torch.ops.fastbn.batch_norm_stats(x)
            sum_dy, sum_dy_xmu = torch.ops.fastbn.batch_norm_backward_reduce(grad, x, weight, bias, mean, var, 1e-5)
        assert torch.isfinite(mean[finite]).all() and torch.isfinite(var[finite]).all(), isa
        assert torch.isfinite(sum_dy).all() and torch.isfinite(sum_dy_xmu[finite]).all(), isa
        assert mean[3].item() == float("inf") and mean[7].isnan() and var[7].isnan(), isa
        assert sum_dy_xmu[3].isnan() or sum_dy_xmu[3].isinf(), isa  # g * (inf - inf) or g * (x - inf)
        assert sum_dy_xmu[7].isnan(), isa
        expected_mean = x.double()[:, finite].mean((0, 2, 3))
        expected_var = x.double()[:, finite].var((0, 2, 3), correction=0)
        torch.testing.assert_close(mean[finite].double(), expected_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(var[finite].double(), expected_var, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("planar", [True, False], ids=["planar", "channels_last"])
def test_every_isa_rounds_bfloat16_outputs_to_nearest_even(planar):
    """bfloat16 outputs are the float result rounded to nearest even, NaN and infinities
    kept, in whole blocks and in tails (planar runs load whole bfloat16 blocks as their even
    and odd values and store them back that way), under each ISA: the eval forward with
    mean 0, variance 1 - eps and bias 0 is x * weight, rounded once."""
    shape = (3, 4, 7, 9)  # runs of 63 values: whole blocks and a tail in every vector width
    x = (torch.randn(shape) * 100).to(torch.bfloat16)
    flat = x.view(-1)
    flat[[0, 40, 70, 200]] = torch.tensor([float("nan"), float("inf"), float("-inf"), 3e38], dtype=torch.bfloat16)
    flat[[5, 90]] = torch.tensor([1e-39, -1e-39], dtype=torch.bfloat16)  # subnormals
    if not planar:
        x = x.contiguous(memory_format=torch.channels_last)
    # weights whose products with bfloat16 values need rounding, ties included (1 + 2^-8)
    weight = torch.tensor([1 + 2 ** -8, 1.5 + 2 ** -9, 0.75, -3 - 2 ** -7])
    running_mean, running_var, eps = torch.zeros(4), torch.full((4,), 1 - 2 ** -10), 2 ** -10
    expected = (x.float() * weight.view(1, -1, 1, 1)).to(torch.bfloat16)
    for isa in ISAS:
        with fastbn.ops.use_cpu_capability(isa):
            y = torch.ops.fastbn.batch_norm_eval(x, weight, torch.zeros(4), running_mean, running_var, eps)
        assert torch.equal(y.isnan(), expected.isnan()), isa
        finite = ~expected.isnan()
        assert torch.equal(y[finite].view(torch.int16), expected[finite].view(torch.int16)), isa


@contextlib.contextmanager
def denormals_are_zero():
    """MXCSR.DAZ set (FTZ left off) on this thread, through glibc's fenv_t (x86-64: MXCSR at
    byte 28), and torch at 1 thread so that the kernels run here. torch.set_flush_denormal sets
    both bits, and with FTZ arithmetic makes no subnormal result."""
    libm = ctypes.CDLL("libm.so.6")
    env = ctypes.create_string_buffer(32)
    assert libm.fegetenv(env) == 0
    saved = env.raw
    struct.pack_into("<I", env, 28, struct.unpack_from("<I", saved, 28)[0] | 0x40)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    assert libm.fesetenv(env) == 0
    try:
        yield
    finally:
        libm.fesetenv(ctypes.create_string_buffer(saved, 32))
        torch.set_num_threads(threads)


@pytest.mark.skipif(not X86_LINUX, reason="sets MXCSR through glibc (x86-64 Linux)")
@pytest.mark.skipif(CUDA_EMULATED, reason="the ops run the emulated CUDA kernels here, not the CPU ISAs: the CPU's "
                    "MXCSR is no part of a GPU's arithmetic")
@pytest.mark.parametrize("planar", [True, False], ids=["planar", "channels_last"])
def test_every_vector_isa_keeps_subnormal_bfloat16_products_with_denormals_are_zero(planar):
    """Under MXCSR.DAZ (FTZ off) a product of normal values can still be subnormal, and every
    vector ISA writes it rounded as c10 rounds it. AVX512_BF16's rounding instruction would write
    zero, so the blocks holding one take the integer rounding; the test for them must read the
    bits (vfpclassps sees no subnormal under DAZ). DEFAULT is left out: its own float arithmetic
    reads the subnormal product as zero under DAZ (its float32 outputs are zero too)."""
    shape = (3, 4, 7, 9)
    x = ((torch.rand(shape) + 0.5) * 1e-20).to(torch.bfloat16)  # normal values
    if not planar:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.tensor([1e-19, 3e-19, 7e-20, -2e-19])
    running_mean, running_var, eps = torch.zeros(4), torch.full((4,), 1 - 2 ** -10), 2 ** -10
    expected = (x.float() * weight.view(1, -1, 1, 1)).to(torch.bfloat16)  # computed before DAZ is set
    assert (expected.float().abs() < torch.finfo(torch.float32).tiny).all() and (expected != 0).all()
    outputs = {}
    with denormals_are_zero():
        for isa in ISAS[1:]:
            with fastbn.ops.use_cpu_capability(isa):
                outputs[isa] = torch.ops.fastbn.batch_norm_eval(x, weight, torch.zeros(4), running_mean, running_var,
                                                                eps)
    for isa, y in outputs.items():  # compared with DAZ off again (under it, a subnormal compares as zero)
        assert torch.equal(y.view(torch.int16), expected.view(torch.int16)), isa


def test_capabilities_follow_the_cpu_flags():
    """DEFAULT everywhere; AVX2 with avx2, fma and f16c; AVX512 with avx512 f, bw, vl and dq as well;
    AVX512_BF16 with avx512_bf16 as well, where the compiler builds it."""
    assert ISAS[0] == "DEFAULT"
    if not X86_LINUX:
        assert ISAS == ("DEFAULT",) or platform.machine().lower() in ("x86_64", "amd64")
        return
    with open("/proc/cpuinfo") as f:
        flags = set(f.read().split())
    expected = ["DEFAULT"]
    if {"avx2", "fma", "f16c"} <= flags:
        expected.append("AVX2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            expected.append("AVX512")
            # and where the compiler builds it (setup.py's probe)
            if "avx512_bf16" in flags and "AVX512_BF16" in dict(load_setup_script().cpu_capabilities()):
                expected.append("AVX512_BF16")
    assert list(ISAS) == expected


def test_best_capability_runs_unless_the_environment_names_one():
    forced = os.environ.get("FASTBN_CPU_CAPABILITY", "").upper()
    assert fastbn.ops.CPU_CAPABILITY == (forced or ISAS[-1]) == fastbn.ops._C._get_cpu_capability()


def test_use_cpu_capability_switches_and_restores():
    before = fastbn.ops.CPU_CAPABILITY
    for isa in ISAS:
        with fastbn.ops.use_cpu_capability(isa.lower()):
            assert fastbn.ops.CPU_CAPABILITY == isa == fastbn.ops._C._get_cpu_capability()
        assert fastbn.ops.CPU_CAPABILITY == before == fastbn.ops._C._get_cpu_capability()
    with pytest.raises(KeyError), fastbn.ops.use_cpu_capability(ISAS[0]):
        raise KeyError("inside the block")
    assert fastbn.ops.CPU_CAPABILITY == before == fastbn.ops._C._get_cpu_capability()
    for name in ["AVX9", ""] + [c for c in X86_ISAS_ABOVE_DEFAULT if c not in ISAS]:
        with pytest.raises(ValueError, match="cpu capability"), fastbn.ops.use_cpu_capability(name):
            pass
        assert fastbn.ops.CPU_CAPABILITY == before == fastbn.ops._C._get_cpu_capability()


def last_level_cache_from_sysfs():
    """Bytes of cpu0's highest-level data or unified cache as sysfs lists it, else 0."""
    best = (0, 0)
    root = "/sys/devices/system/cpu/cpu0/cache"
    for entry in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        try:
            with open(f"{root}/{entry}/type") as f:
                kind = f.read().strip()
            with open(f"{root}/{entry}/level") as f:
                level = int(f.read())
            with open(f"{root}/{entry}/size") as f:
                text = f.read().strip()
        except (OSError, ValueError):
            continue
        match = re.fullmatch(r"(\d+)([KMG]?)", text)
        if kind != "Instruction" and match and level > best[0]:
            best = (level, int(match[1]) << {"": 0, "K": 10, "M": 20, "G": 30}[match[2]])
    return best[1]


def test_streaming_threshold_follows_the_last_level_cache():
    """An eighth of the L3 (lscpu's size, from sysfs), within 4-16 MiB; 16 MiB where no size is known."""
    cache = last_level_cache_from_sysfs()
    assert fastbn.ops._C._last_level_cache_bytes() == cache
    expected = min(max(cache // 8, 4 << 20), 16 << 20) if cache else 16 << 20
    assert STREAMING_BYTES == expected == fastbn.ops.cpu_streaming_bytes()


def test_use_cpu_streaming_bytes_switches_and_restores():
    before = fastbn.ops.cpu_streaming_bytes()
    with fastbn.ops.use_cpu_streaming_bytes(1 << 30):
        assert fastbn.ops.cpu_streaming_bytes() == 1 << 30
    assert fastbn.ops.cpu_streaming_bytes() == before
    with pytest.raises(ValueError, match="streaming threshold"), fastbn.ops.use_cpu_streaming_bytes(-1):
        pass
    assert fastbn.ops.cpu_streaming_bytes() == before


def import_with(capability):
    """Imports fastbn in a fresh interpreter with FASTBN_CPU_CAPABILITY=capability and runs one op."""
    code = ("import torch, fastbn; torch.ops.fastbn.batch_norm_stats(torch.randn(4, 3, 5, 5)); "
            "print(fastbn.ops.CPU_CAPABILITY)")
    env = dict(os.environ, FASTBN_CPU_CAPABILITY=capability)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_environment_chooses_at_run_time():
    result = import_with("default")  # any case; DEFAULT runs on every CPU
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["DEFAULT"]


def test_environment_naming_no_supported_capability_fails_the_import():
    for name in ["AVX9"] + [c for c in X86_ISAS_ABOVE_DEFAULT if c not in ISAS]:
        result = import_with(name)
        assert result.returncode != 0, f"{name}: imported"
        assert "ImportError: fastbn: FASTBN_CPU_CAPABILITY" in result.stderr and name in result.stderr, result.stderr


def vector_code_reachable_outside_isa_code(library):
    """Functions of `library` with VEX/EVEX (AVX, AVX-512) instructions that code outside
    the AVX2/AVX512/AVX512_BF16 namespaces can reach through direct calls, jumps and address loads.

    setup.py links the per-ISA objects lowest ISA first so that an inline function of a
    shared header resolves to a copy compiled for its caller's ISA or a lower one; with
    the opposite order c10's message helpers of AT_DISPATCH, called from the DEFAULT
    kernels, resolve to their AVX-512 copy (seen when this check was written)."""
    disassembly = subprocess.run(["objdump", "-d", "--no-show-raw-insn", library], capture_output=True, text=True,
                                 check=True).stdout
    function_start = re.compile(r"^([0-9a-f]+) <(.+)>:$")
    reference = re.compile(r"\b([0-9a-f]+) <([^>+]+?)(@plt)?(?:\+0x[0-9a-f]+)?>")
    isa_named = re.compile(r"4AVX2|6AVX512|11AVX512_BF16")  # the mangled fastbn::cpu::AVX2 / at::vec::AVX512 ...
    names, vector_code, references, current = {}, set(), [], None
    for line in disassembly.splitlines():
        match = function_start.match(line)
        if match:
            current = int(match.group(1), 16)
            names[current] = match.group(2)
        elif current is not None and "\t" in line:
            instruction = line.split("\t", 1)[1].strip()
            if instruction.startswith("v"):  # every VEX/EVEX mnemonic starts with v
                vector_code.add(current)
            references += [(current, int(address, 16), name, plt) for address, name, plt in reference.findall(instruction)]
    starts = sorted(names)
    by_name = {}
    for address, name in names.items():
        by_name.setdefault(name, []).append(address)
    referrers = {address: set() for address in names}
    for caller, address, name, plt in references:
        # a call through the PLT: the definition of that name in the library; else the function holding address
        targets = by_name.get(name, []) if plt else [starts[bisect.bisect_right(starts, address) - 1]]
        for target in targets:
            if target != caller:
                referrers[target].add(caller)
    # reached only from ISA code: the greatest set closed under "every referrer is in it"
    isa_only = {f for f in names if isa_named.search(names[f]) or referrers[f]}
    changed = True
    while changed:
        changed = False
        for f in list(isa_only):
            if not isa_named.search(names[f]) and not referrers[f] <= isa_only:
                isa_only.discard(f)
                changed = True
    return sorted(names[f] for f in vector_code - isa_only)


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils, which building fastbn needs)")
def test_no_vector_code_reachable_outside_isa_code():
    """DEFAULT code (the operators, the checks, the DEFAULT kernels) runs no AVX/AVX-512
    instruction: the build runs on any x86-64 CPU."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        assert ISAS == ("DEFAULT",)
        return
    assert vector_code_reachable_outside_isa_code(fastbn.ops._C.__file__) == []
