"""Training steps of small blocks whose next op reads the batch norm's output: torch against fastbn.

    python -m bench.blocks                                   # the default shapes, 5 paired rounds
    python -m bench.blocks --shape 32,256,14,14 --dtype bfloat16 --channels-last --json out.json

``python -m bench`` times a BatchNorm2d step alone: nobody reads y and every step reuses
the same x. In a network the next layer reads y at once and the previous one's backward
reads dx, so whether an output stays in cache (normal stores) or bypasses it (streaming
stores) decides the time differently (csrc/cpu/output_streaming.h; ``--streaming-bytes``). Each
block runs forward and backward (into x, the parameters and the residual) on a ring of
four inputs, as a network hands each layer a new one every step:

- ``bn_relu``: ``torch.relu(bn(x))``;
- ``bn_add_relu``: ``torch.relu(bn(x) + residual)``;
- ``bn_relu_conv``: ``conv(torch.relu(bn(x)))``, a 1x1 convolution C -> C without bias;
- ``conv_bn_relu``: ``torch.relu(bn(conv(x)))``.

torch's and fastbn's blocks have the same weights and alternate round by round; a round
is the median of ``--steps`` timed steps after 3 untimed ones. The table gives the
medians over the rounds and the median of the per-round ratios torch / fastbn (above 1:
fastbn faster). Before timing, each block's output and input gradient are checked against
a float64 copy of torch's block (``check``). glibc keeps freed memory, as in ``python -m bench``
(``--fresh-pages``: its default).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

import fastbn
from bench.cases import fastbn_error_acceptable, relative_error
from bench.cli import parse_shape
from bench.timing import describe_cpu, git_revision, keep_freed_memory

BLOCKS = ("bn_relu", "bn_add_relu", "bn_relu_conv", "conv_bn_relu")
DEFAULT_SHAPES = [(16, 512, 7, 7), (32, 256, 14, 14), (250, 64, 11, 11), (32, 128, 28, 28), (32, 64, 56, 56)]
RING = 4


def block_forward(block: str, bn: nn.Module, conv: nn.Module) -> Callable:
    """The block's forward as a function of (x, residual)."""
    forwards = {
        "bn_relu": lambda x, r: torch.relu(bn(x)),
        "bn_add_relu": lambda x, r: torch.relu(bn(x) + r),
        "bn_relu_conv": lambda x, r: conv(torch.relu(bn(x))),
        "conv_bn_relu": lambda x, r: torch.relu(bn(conv(x))),
    }
    return forwards[block]


def make_modules(library, channels: int, dtype: torch.dtype, memory_format, seed: int) -> Tuple[nn.Module, nn.Module]:
    """(library's BatchNorm2d, a 1x1 convolution C -> C), in dtype; the same weights for every library."""
    torch.manual_seed(seed)
    bn = library.BatchNorm2d(channels).to(dtype)
    with torch.no_grad():  # parameters away from 1 and 0
        bn.weight.copy_(1 + 0.3 * torch.randn(channels))
        bn.bias.copy_(0.3 * torch.randn(channels))
    conv = nn.Conv2d(channels, channels, 1, bias=False).to(dtype).to(memory_format=memory_format)
    return bn, conv


def make_inputs(shape, dtype, memory_format, seed: int) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """RING (x, residual, grad of the block's output) triples; x with a non-zero mean."""
    generator = torch.Generator().manual_seed(seed)

    def random(mean, std):
        values = torch.randn(shape, generator=generator) * std + mean
        return values.to(dtype).contiguous(memory_format=memory_format)

    return [(random(3.0, 2.0).requires_grad_(), random(0.0, 1.0).requires_grad_(), random(0.1, 1.0))
            for _ in range(RING)]


def step(forward: Callable, inputs) -> Tuple[torch.Tensor, torch.Tensor]:
    x, residual, grad = inputs
    x.grad = residual.grad = None
    y = forward(x, residual)
    y.backward(grad)
    return y, x.grad


def check(forwards: Dict[str, Callable], reference: Callable, inputs, dtype: torch.dtype) -> str:
    """fastbn's block and torch's against a float64 copy of torch's on the same values:
    output and grad of x, as ``python -m bench`` checks its rows (relative_error,
    fastbn_error_acceptable: within its tolerance or at most 2x torch's error)."""
    x, residual, grad = inputs
    exact = step(reference, (x.detach().double().requires_grad_(), residual.detach().double(), grad.double()))
    errors = {side: relative_error([t.double() for t in step(forward, inputs)], exact)
              for side, forward in forwards.items()}
    if fastbn_error_acceptable(errors["fastbn"], errors["torch"], dtype):
        return "ok"
    return f"off {errors['fastbn']:.2g} (torch {errors['torch']:.2g})"


def round_time_us(forward: Callable, ring, steps: int) -> float:
    for index in range(3):
        step(forward, ring[index % RING])
    times = []
    for index in range(steps):
        start = time.perf_counter()
        step(forward, ring[index % RING])
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def measure(shape, dtype, channels_last: bool, block: str, options) -> Dict:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    modules = {side: make_modules(library, shape[1], dtype, memory_format, seed=0)
               for side, library in (("torch", torch.nn), ("fastbn", fastbn))}
    exact = block_forward(block, *(copy.deepcopy(module).double() for module in modules["torch"]))
    forwards = {side: block_forward(block, *pair) for side, pair in modules.items()}
    ring = make_inputs(shape, dtype, memory_format, seed=1)
    checked = check(forwards, exact, ring[0], dtype)
    times = {"torch": [], "fastbn": []}
    for round_index in range(options.rounds):
        order = ("torch", "fastbn") if round_index % 2 == 0 else ("fastbn", "torch")
        for side in order:
            times[side].append(round_time_us(forwards[side], ring, options.steps))
    ratios = [t / f for t, f in zip(times["torch"], times["fastbn"])]
    return {"shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
            "layout": "channels_last" if channels_last else "NCHW", "block": block, "check": checked,
            "torch_us": statistics.median(times["torch"]), "fastbn_us": statistics.median(times["fastbn"]),
            "ratio": statistics.median(ratios), "ratios": ratios}


def parse_arguments(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.blocks", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=parse_shape, action="append", help="N,C,H,W (repeatable)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], action="append",
                        help="repeatable (default float32 and bfloat16)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last tensors (default NCHW)")
    parser.add_argument("--block", choices=BLOCKS, action="append", help="repeatable (default all)")
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds (default 5)")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per round (default 15)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help=f"torch threads (default torch's, {torch.get_num_threads()} here)")
    parser.add_argument("--fresh-pages", action="store_true",
                        help="leave glibc's default of returning large freed blocks to the OS (see "
                             "bench.timing.keep_freed_memory)")
    parser.add_argument("--streaming-bytes", type=int,
                        help="write fastbn's CPU outputs with streaming stores from this size on (default this "
                             f"host's threshold, {fastbn.ops.cpu_streaming_bytes()} bytes: an eighth of the L3 within "
                             "4-16 MiB); for A/B runs")
    parser.add_argument("--json", help="also write the rows here")
    options = parser.parse_args(argv)
    if options.rounds < 1 or options.steps < 1:
        parser.error("--rounds and --steps must be at least 1")
    if options.streaming_bytes is not None and options.streaming_bytes < 0:
        parser.error("--streaming-bytes must be at least 0")
    return options


def main(argv=None) -> int:
    options = parse_arguments(sys.argv[1:] if argv is None else argv)
    streaming_bytes = fastbn.ops.cpu_streaming_bytes() if options.streaming_bytes is None else options.streaming_bytes
    with fastbn.ops.use_cpu_streaming_bytes(streaming_bytes):
        return run(options)


def run(options) -> int:
    torch.set_num_threads(options.threads)
    allocator = "allocator: system default" if options.fresh_pages else keep_freed_memory()
    shapes = options.shape or DEFAULT_SHAPES
    dtypes = [getattr(torch, name) for name in (options.dtype or ["float32", "bfloat16"])]
    print(f"# blocks, training fwd+bwd, {options.threads} thread(s), {options.rounds} paired rounds of "
          f"{options.steps} steps; git {git_revision()}; torch {torch.__version__}; {describe_cpu()}; {allocator}; "
          f"fastbn streams CPU outputs from {fastbn.ops.cpu_streaming_bytes()} bytes")
    print("\n| shape | dtype | layout | block | check | torch µs | fastbn µs | torch / fastbn |\n"
          "|---|---|---|---|---|---:|---:|---:|")
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            for block in options.block or BLOCKS:
                row = measure(shape, dtype, options.channels_last, block, options)
                rows.append(row)
                print(f"| {','.join(map(str, row['shape']))} | {row['dtype']} | {row['layout']} | {block} | "
                      f"{row['check']} | {row['torch_us']:.0f} | {row['fastbn_us']:.0f} | {row['ratio']:.2f}x |",
                      flush=True)
    if rows:
        print(f"\nmedian torch / fastbn over {len(rows)} rows: {statistics.median(r['ratio'] for r in rows):.2f}x")
    if options.json:
        with open(options.json, "w") as handle:
            json.dump({"threads": options.threads, "rounds": options.rounds, "steps": options.steps,
                       "streaming_bytes": fastbn.ops.cpu_streaming_bytes(), "git": git_revision(), "rows": rows},
                      handle, indent=1)
    return 0 if all(row["check"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
