"""Benchmark fastbn's batch norm against torch's, side by side.

Run from the repository root with ``python -m bench`` (or the ``fastbn-bench``
console script). Every row of the result times torch and fastbn on the same
input, alternating between them in a few rounds so that both see the same machine
state (frequency, cache, other load), and reports the medians.

Bandwidth is counted from the *minimum* bytes an implementation must move (the
activation-sized tensors, not the per-channel vectors) and compared with a copy
bandwidth measured at start-up, so "% copy" says how close a kernel gets to
streaming memory once per tensor it must touch. Shapes whose tensors fit in the
last-level cache can exceed 100%.

Nothing here asserts on timings; the numbers are for people to read.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.utils.benchmark as torch_benchmark

# --------------------------------------------------------------------------------------
# What is measured
# --------------------------------------------------------------------------------------

DEFAULT_SHAPES: List[Tuple[int, int, int, int]] = [
    (250, 32, 26, 26),  # MNIST-sized CNN, batch 250: first BN (28x28 after a 3x3 conv)
    (250, 64, 11, 11),  # ... and a second, after pooling and another conv
    (32, 64, 56, 56),  # ResNet-50 stage 1
    (32, 256, 14, 14),  # ResNet-50 stage 3
    (8, 64, 112, 112),  # ResNet stem at a small batch: few channels, long planes
]
# --quick keeps one MNIST-like shape and one with many channels and short planes.
QUICK_SHAPES = [(250, 32, 26, 26), (32, 256, 14, 14)]

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_DTYPES = {"cpu": ["float32", "bfloat16"], "cuda": ["float32", "bfloat16", "float16"]}

# Both implementations are checked against torch in float64 on the same values, not
# against each other: torch's own float32 kernels are not exact either (its channels_last
# CPU backward has been seen 2e-3 off). The error of a result is
# max|result - float64| / max(1, max|float64|) over y, dx, dweight, dbias; these bounds
# are a few units in the last place of each dtype. A fastbn row beyond them is flagged,
# since the timing of a wrong answer means nothing.
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@dataclass(frozen=True)
class Case:
    """One way of calling batch norm. Adding a case is one entry in CASES."""

    name: str
    description: str
    training: bool  # module.train() (batch statistics, running stats updated) or .eval()
    backward: bool  # also run y.backward(grad_out), parameters' and input's grads
    activation: Optional[str] = None  # fused activation (fastbn) vs BN then the op (torch)
    residual: bool = False  # act(bn(x) + residual): fastbn's module(x, residual) vs torch's ops

    def min_bytes(self, numel: int, element_size: int) -> int:
        # Forward reads x and writes y. Backward must at least read x and dy and write dx
        # (the statistics can be recomputed or come from the forward's saved vectors;
        # per-channel vectors are ignored as they are tiny next to the activations).
        # A residual adds a read forward, and a read and a write (its gradient) backward.
        tensor_passes = 2 + (3 if self.backward else 0)
        if self.residual:
            tensor_passes += 1 + (2 if self.backward else 0)
        return tensor_passes * numel * element_size


CASES: List[Case] = [
    Case("train_fwd", "training forward (batch stats, running stats updated)", True, False),
    Case("train_fwd_bwd", "training forward + backward (dx, dweight, dbias)", True, True),
    Case("eval_fwd", "inference forward under no_grad (running stats)", False, False),
    Case("bn_relu_fwd_bwd", "BN+ReLU training forward + backward; torch: BN then torch.relu",
         True, True, activation="relu"),
    Case("bn_add_relu_fwd_bwd", "relu(BN(x) + residual) training forward + backward (ResNet block end); "
         "torch: BN, add, torch.relu", True, True, activation="relu", residual=True),
]
CASES_BY_NAME = {case.name: case for case in CASES}


class NotAvailable(Exception):
    """The implementation does not support this case (reported as n/a, not as an error)."""


# --------------------------------------------------------------------------------------
# The two implementations
# --------------------------------------------------------------------------------------

class _TorchBNThenActivation(torch.nn.Module):
    """torch's unfused reference for the BN+activation cases: BN, then the op."""

    ACTIVATIONS = {"relu": torch.relu}

    def __init__(self, num_features: int, activation: str):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(num_features)
        self.activation = self.ACTIVATIONS[activation]

    def forward(self, x, residual=None):
        y = self.bn(x)
        return self.activation(y if residual is None else y + residual)


def make_torch_module(num_features: int, activation: Optional[str]) -> torch.nn.Module:
    if activation is None:
        return torch.nn.BatchNorm2d(num_features)
    return _TorchBNThenActivation(num_features, activation)


def load_fastbn_module_factory(stand_in: bool) -> Tuple[Callable[..., torch.nn.Module], str]:
    """Return (factory(num_features, activation) -> module, a description for the header).

    ``stand_in`` benchmarks torch against itself; it exists only to develop and check
    this script on a checkout whose extension is not built yet.
    """
    if stand_in:
        def make_stand_in(num_features: int, activation: Optional[str]) -> torch.nn.Module:
            if activation is not None:
                raise NotAvailable("the stand-in has no fused activation")
            return torch.nn.BatchNorm2d(num_features)
        return make_stand_in, "STAND-IN (torch.nn.BatchNorm2d, not fastbn)"

    try:
        import fastbn
    except Exception as error:  # ImportError, or the extension failing to load
        raise SystemExit(
            f"cannot import fastbn ({type(error).__name__}: {error}).\n"
            "Build the extension first: pip install --no-build-isolation -e . "
            "(or python setup.py build_ext --inplace).\n"
            "--stand-in runs the script with torch on both sides, to develop it."
        ) from error

    def make_fastbn(num_features: int, activation: Optional[str]) -> torch.nn.Module:
        if activation is None:
            return fastbn.BatchNorm2d(num_features)
        try:
            return fastbn.BatchNorm2d(num_features, activation=activation)
        except TypeError as error:  # this fastbn's constructor has no activation= yet
            raise NotAvailable(f"fastbn.BatchNorm2d(activation={activation!r}): {error}") from error
        except (ValueError, NotImplementedError) as error:  # known keyword, unknown value
            raise NotAvailable(str(error)) from error

    description = f"fastbn {getattr(fastbn, '__version__', '?')} ({os.path.dirname(fastbn.__file__)})"
    # The vector ISA the CPU kernels run with (chosen at import; FASTBN_CPU_CAPABILITY lowers it).
    capability = getattr(getattr(fastbn, "ops", None), "CPU_CAPABILITY", None)
    if capability is not None:
        description += f", CPU kernels: {capability}"
    return make_fastbn, description


# --------------------------------------------------------------------------------------
# Building one timed step
# --------------------------------------------------------------------------------------

@dataclass
class Workload:
    """The input and output gradient of one row, shared by both implementations."""

    x: torch.Tensor
    grad_out: torch.Tensor
    residual: torch.Tensor

    def double(self) -> "Workload":
        return Workload(self.x.double(), self.grad_out.double(), self.residual.double())


def make_workload(shape, dtype, memory_format, device) -> Workload:
    generator = torch.Generator().manual_seed(0)
    # Offset and scale the input so the normalization actually has work to undo.
    x = torch.randn(shape, generator=generator) * 2.0 + 0.5
    grad_out = torch.randn(shape, generator=generator)
    residual = torch.randn(shape, generator=generator) - 0.3
    convert = dict(device=device, dtype=dtype, memory_format=memory_format)
    return Workload(x.to(**convert), grad_out.to(**convert), residual.to(**convert))


def prepare_module(module: torch.nn.Module, case: Case, param_dtype, device) -> torch.nn.Module:
    """Move the module and give its BN non-trivial, seeded parameters and running stats.

    Both implementations get the same values, so their outputs can be compared, and
    none of them is the identity (weight 1, bias 0, mean 0, var 1 could hide bugs).
    """
    module = module.to(device=device, dtype=param_dtype)
    generator = torch.Generator().manual_seed(1)
    for bn in module.modules():
        if not isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            continue
        channels = bn.num_features

        def seeded(offset, scale):
            values = offset + scale * torch.rand(channels, generator=generator)
            return values.to(device=device, dtype=param_dtype)
        with torch.no_grad():
            bn.weight.copy_(seeded(0.5, 1.0))
            bn.bias.copy_(seeded(-0.5, 1.0))
            bn.running_mean.copy_(seeded(0.0, 1.0))
            bn.running_var.copy_(seeded(3.0, 2.0))
    module.train(case.training)
    return module


def make_step(module: torch.nn.Module, case: Case, workload: Workload) -> Tuple[Callable[[], torch.Tensor], torch.Tensor]:
    """Return (step, x): step() runs the case once and returns its output; x is its input.

    Returning the output costs nothing and lets the correctness check call the very
    function that is timed.
    """
    parameters = list(module.parameters())
    if case.backward:
        # A leaf of its own per implementation, so the two never share .grad.
        x = workload.x.detach().clone().requires_grad_(True)
        residual = workload.residual.detach().clone().requires_grad_(True) if case.residual else None
        inputs = (x,) if residual is None else (x, residual)
        grad_out = workload.grad_out

        def step():
            # set_to_none, as optimizer.zero_grad() does by default: the backward then
            # writes fresh gradients instead of accumulating (an extra read+write).
            for leaf in (*inputs, *parameters):
                leaf.grad = None
            y = module(*inputs)
            y.backward(grad_out)
            return y
        step.residual = residual  # for the correctness check
        return step, x

    x = workload.x
    if case.training:
        def step():
            # As in training: the parameters require grad, so autograd records the
            # graph, and whatever the op saves for backward is part of the cost.
            return module(x)
    else:
        def step():
            with torch.no_grad():
                return module(x)
    return step, x


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------

def block_times(step: Callable, num_threads: int, min_run_time: float, label: str) -> List[float]:
    """Per-call times (seconds) of the blocks of one blocked_autorange.

    torch.utils.benchmark synchronizes CUDA around each block, sets the thread count,
    and picks how many calls a block holds; a median over blocks resists outliers.
    """
    timer = torch_benchmark.Timer(
        stmt="step()", globals={"step": step}, num_threads=num_threads, label=label)
    return list(timer.blocked_autorange(min_run_time=min_run_time).times)


def measure_copy_bandwidth(device: str, num_threads: int, min_run_time: float,
                           megabytes: int = 256) -> Dict[str, float]:
    """GB/s of dst.copy_(src) on a buffer far larger than any cache (read + write counted)."""
    numel = megabytes * 2**20 // 4
    source = torch.rand(numel, device=device)
    destination = torch.empty_like(source)
    destination.copy_(source)  # first touch: page faults are not bandwidth
    times = block_times(lambda: destination.copy_(source), num_threads, min_run_time, "copy")
    seconds = statistics.median(times)
    bytes_moved = 2 * numel * 4
    return {"buffer_MiB": megabytes, "median_s": seconds, "GBps": bytes_moved / seconds / 1e9}


@dataclass
class Row:
    case: str
    shape: Tuple[int, int, int, int]
    layout: str
    dtype: str
    min_bytes: int
    torch_s: Optional[float] = None
    fastbn_s: Optional[float] = None
    fastbn_status: str = "ok"  # ok | n/a | error | mismatch
    note: str = ""
    # Relative errors against float64 (see CHECK_TOLERANCE).
    torch_error: Optional[float] = None
    fastbn_error: Optional[float] = None
    # Interquartile range of the per-block times, to spot rows the machine disturbed.
    torch_iqr_s: Optional[float] = None
    fastbn_iqr_s: Optional[float] = None
    # Fraction of the CPUs other processes used while this row was timed.
    other_cpu_load: Optional[float] = None
    # --compile: torch.compile of torch's module (what a user might pick instead of fastbn).
    compiled_s: Optional[float] = None
    compiled_note: str = ""

    @property
    def speedup_vs_compiled(self) -> Optional[float]:
        if self.compiled_s is None or self.fastbn_s is None:
            return None
        return self.compiled_s / self.fastbn_s

    @property
    def speedup(self) -> Optional[float]:
        if self.torch_s is None or self.fastbn_s is None:
            return None
        return self.torch_s / self.fastbn_s

    def gbps(self, seconds: Optional[float]) -> Optional[float]:
        return None if seconds is None else self.min_bytes / seconds / 1e9


def results_for_check(step: Callable, x: torch.Tensor, module: torch.nn.Module,
                      backward: bool) -> List[torch.Tensor]:
    """Run the case once; return y and, with backward, dx and the parameters' grads."""
    results = [step()]
    if backward:
        results.append(x.grad)
        if getattr(step, "residual", None) is not None:
            results.append(step.residual.grad)
        results += [parameter.grad for parameter in module.parameters()]
    return [result.detach().double() for result in results]


def relative_error(results: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    errors = [((result - expected).abs().max() / expected.abs().max().clamp(min=1.0)).item()
              for result, expected in zip(results, reference)]
    return max(errors)


def benchmark_row(case: Case, shape, layout: str, dtype_name: str, options,
                  make_fastbn: Callable) -> Row:
    dtype = DTYPES[dtype_name]
    param_dtype = torch.float32 if options.param_dtype == "float32" else dtype
    numel = math.prod(shape)
    row = Row(case.name, tuple(shape), layout, dtype_name,
              case.min_bytes(numel, torch.empty((), dtype=dtype).element_size()))
    workload = make_workload(shape, dtype, LAYOUTS[layout], options.device)
    channels = shape[1]

    # The reference: torch's module in float64 on the same values (same seeds, same input).
    reference_module = prepare_module(make_torch_module(channels, case.activation), case,
                                      torch.float64, options.device)
    reference_workload = workload.double()
    reference_step, reference_x = make_step(reference_module, case, reference_workload)
    reference = results_for_check(reference_step, reference_x, reference_module, case.backward)

    torch_module = prepare_module(make_torch_module(channels, case.activation), case,
                                  param_dtype, options.device)
    torch_step, torch_x = make_step(torch_module, case, workload)
    try:
        # Also the warm-up: allocator, lazy initialization, first-touch page faults.
        row.torch_error = relative_error(
            results_for_check(torch_step, torch_x, torch_module, case.backward), reference)
    except Exception as error:  # e.g. a dtype torch has no kernel for on this device
        row.fastbn_status, row.note = "n/a", f"torch fails: {type(error).__name__}: {error}"[:200]
        return row

    compiled_step = compiled_step_for(case, channels, workload, param_dtype, reference, row, options) \
        if options.compile else None

    fastbn_step = None
    try:
        fastbn_module = prepare_module(make_fastbn(channels, case.activation), case,
                                       param_dtype, options.device)
        fastbn_step, fastbn_x = make_step(fastbn_module, case, workload)
        # Correctness first: a fast wrong answer is not a result. This also warms up.
        row.fastbn_error = relative_error(
            results_for_check(fastbn_step, fastbn_x, fastbn_module, case.backward), reference)
        if not row.fastbn_error <= CHECK_TOLERANCE[dtype]:  # "not <=" also catches NaN
            row.fastbn_status = "mismatch"
            row.note = f"fastbn's error against float64 is {row.fastbn_error:.2g}"
    except NotAvailable as reason:
        row.fastbn_status, row.note, fastbn_step = "n/a", str(reason), None
    except Exception as error:  # report and go on: one unsupported combination is no reason to stop
        row.fastbn_status, row.note, fastbn_step = "error", f"{type(error).__name__}: {error}", None
    if row.note:
        row.note = row.note.strip().splitlines()[0][:200]

    # Interleave: torch, fastbn, torch, fastbn, ... each a short blocked_autorange, so a
    # drift in machine state (clock, thermal, a neighbour) lands on both sides alike.
    if options.wait_idle > 0:
        wait_until_idle(options.wait_idle)
    load_meter = OtherCpuLoad.start()
    per_round = options.min_run_time / options.rounds
    label = f"{case.name} {shape} {layout} {dtype_name}"
    torch_times: List[float] = []
    fastbn_times: List[float] = []
    compiled_times: List[float] = []
    for _ in range(options.rounds):
        torch_times += block_times(torch_step, options.threads, per_round, label)
        if fastbn_step is not None:
            fastbn_times += block_times(fastbn_step, options.threads, per_round, label)
        if compiled_step is not None:
            compiled_times += block_times(compiled_step, options.threads, per_round, label)
    row.torch_s, row.torch_iqr_s = statistics.median(torch_times), interquartile_range(torch_times)
    if fastbn_times:
        row.fastbn_s, row.fastbn_iqr_s = statistics.median(fastbn_times), interquartile_range(fastbn_times)
    if compiled_times:
        row.compiled_s = statistics.median(compiled_times)
    row.other_cpu_load = load_meter.fraction()
    return row


def compiled_step_for(case: Case, channels: int, workload: Workload, param_dtype, reference, row: Row,
                      options) -> Optional[Callable]:
    """The case's step on torch.compile(torch's module), checked against float64 like the
    others (the check also compiles it); None, with the reason in row.compiled_note, where
    it does not compile or is off."""
    try:
        module = prepare_module(make_torch_module(channels, case.activation), case, param_dtype, options.device)
        compiled = torch.compile(module)
        step, x = make_step(compiled, case, workload)
        error = relative_error(results_for_check(step, x, module, case.backward), reference)
    except Exception as failure:  # noqa: BLE001  (reported in the table; the other columns still count)
        row.compiled_note = f"{type(failure).__name__}: {failure}".strip().splitlines()[0][:200]
        return None
    if not error <= CHECK_TOLERANCE[workload.x.dtype]:
        row.compiled_note = f"torch.compile's error against float64 is {error:.2g}"
    return step


def interquartile_range(values: Sequence[float]) -> Optional[float]:
    if len(values) < 2:
        return None
    quartiles = statistics.quantiles(values, n=4)
    return quartiles[2] - quartiles[0]


# --------------------------------------------------------------------------------------
# Describing the machine
# --------------------------------------------------------------------------------------

def describe_cpu() -> str:
    model = platform.processor() or platform.machine()
    flags = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name") and model in (platform.processor(), platform.machine()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line
    except OSError:
        pass
    isa = next((name for name, flag in (("AVX-512", " avx512f"), ("AVX2", " avx2")) if flag in flags), "")
    last_level_cache = ""
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as size:
            text = size.read().strip()  # e.g. "32768K"
        if text.endswith("K") and text[:-1].isdigit() and int(text[:-1]) % 1024 == 0:
            text = f"{int(text[:-1]) // 1024} MiB"
        last_level_cache = f", L3 {text}"
    except OSError:
        pass
    details = ", ".join(part for part in (f"{os.cpu_count()} logical CPUs", isa) if part)
    return f"{model} ({details}{last_level_cache})"


def describe_machine(device: str) -> Dict[str, str]:
    machine = {"cpu": describe_cpu(), "torch": torch.__version__, "python": platform.python_version()}
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        machine["gpu"] = f"{properties.name} ({properties.total_memory / 2**30:.0f} GiB, sm_{properties.major}{properties.minor})"
        machine["cuda"] = str(torch.version.cuda)
        machine["cudnn"] = str(torch.backends.cudnn.version())
    return machine


class OtherCpuLoad:
    """How busy the CPUs were with work *other than this process* since creation.

    On a shared machine, other work steals cores from the timed threads and stalls
    their barriers (an OpenMP region waits a whole time slice for a descheduled
    thread), which can slow one implementation far more than the other. Rows timed
    under such load are marked, and --wait-idle waits for a quiet moment.
    """

    def __init__(self):
        self._start = self._sample()

    @staticmethod
    def _sample():
        with open("/proc/stat") as stat:  # first line: all CPUs, in clock ticks
            fields = [int(value) for value in stat.readline().split()[1:9]]
        busy_ticks = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
        return busy_ticks / os.sysconf("SC_CLK_TCK"), time.process_time(), time.perf_counter()

    def fraction(self) -> Optional[float]:
        """Fraction of all CPUs' time since creation that others used (0 = idle)."""
        if self._start is None:
            return None
        (busy_before, own_before, wall_before), (busy_after, own_after, wall_after) = self._start, self._sample()
        elapsed = (wall_after - wall_before) * (os.cpu_count() or 1)
        others = (busy_after - busy_before) - (own_after - own_before)
        return None if elapsed <= 0 else min(1.0, max(0.0, others / elapsed))

    @classmethod
    def start(cls) -> "OtherCpuLoad":
        try:
            return cls()
        except (OSError, ValueError, IndexError):  # not Linux: no /proc/stat
            meter = cls.__new__(cls)
            meter._start = None
            return meter


def other_cpu_load_over(seconds: float) -> Optional[float]:
    meter = OtherCpuLoad.start()
    time.sleep(seconds)
    return meter.fraction()


def wait_until_idle(max_seconds: float, threshold: float = 0.1) -> Optional[float]:
    """Wait (at most max_seconds) for half a second in which others use < threshold."""
    deadline = time.perf_counter() + max_seconds
    while True:
        load = other_cpu_load_over(0.5)
        if load is None or load < threshold or time.perf_counter() >= deadline:
            return load


def git_revision() -> str:
    """The checkout's commit (with -dirty), so logged numbers can be tied to code."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        result = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=here,
                                capture_output=True, text=True, timeout=10)
        return result.stdout.strip() or "no commit"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------

def _format(value: Optional[float], pattern: str) -> str:
    return "—" if value is None else pattern.format(value)


# Other processes using more than this fraction of the CPUs make a row's timing suspect.
BUSY_THRESHOLD = 0.1


def check_cell(row: Row) -> str:
    """'ok', or what is wrong: a side off from float64 (fastbn in capitals), or the
    machine busy with other work while the row was timed."""
    tolerance = CHECK_TOLERANCE[DTYPES[row.dtype]]
    problems = []
    if row.fastbn_status == "mismatch":
        problems.append(f"FASTBN OFF {row.fastbn_error:.1e}")
    if row.torch_error is not None and not row.torch_error <= tolerance:
        problems.append(f"torch off {row.torch_error:.1e}")
    if row.other_cpu_load is not None and row.other_cpu_load > BUSY_THRESHOLD:
        problems.append(f"busy {100 * row.other_cpu_load:.0f}%")
    if problems:
        return ", ".join(problems)
    return "ok" if row.fastbn_error is not None else "—"


def markdown_table(rows: Sequence[Row], copy_gbps: float, fastbn_name: str) -> str:
    compiled = any(row.compiled_s is not None or row.compiled_note for row in rows)
    extra = " torch.compile µs | vs torch.compile |" if compiled else ""
    header = ("| case | shape (N,C,H,W) | layout | dtype | torch µs | "
              f"{fastbn_name} µs | speedup | torch GB/s | {fastbn_name} GB/s | {fastbn_name} % copy | check |{extra}")
    lines = [header, "|" + "---|" * 4 + "---:|" * 6 + "---|" + "---:|" * (2 if compiled else 0)]
    for row in rows:
        if row.torch_s is None:
            fastbn_time = "—"
        elif row.fastbn_status in ("n/a", "error"):
            fastbn_time = row.fastbn_status
        else:
            fastbn_time = _format(row.fastbn_s and row.fastbn_s * 1e6, "{:.1f}")
        speedup = _format(row.speedup, "{:.2f}x")
        fastbn_gbps = row.gbps(row.fastbn_s)
        percent = None if fastbn_gbps is None else 100 * fastbn_gbps / copy_gbps
        lines.append("| " + " | ".join([
            row.case, ",".join(map(str, row.shape)), row.layout, row.dtype,
            _format(row.torch_s and row.torch_s * 1e6, "{:.1f}"), fastbn_time, speedup,
            _format(row.gbps(row.torch_s), "{:.1f}"), _format(fastbn_gbps, "{:.1f}"),
            _format(percent, "{:.0f}%"), check_cell(row),
        ] + ([_format(row.compiled_s and row.compiled_s * 1e6, "{:.1f}") if not row.compiled_note
              else row.compiled_note[:60], _format(row.speedup_vs_compiled, "{:.2f}x")] if compiled else [])) + " |")
    return "\n".join(lines)


def speedup_summary(rows: Sequence[Row], dtypes: Sequence[str]) -> str:
    """Median speedup per case over shapes and layouts, one column per dtype (and per dtype
    against torch.compile, when it was timed)."""
    columns = [(f"median speedup {d}", d, "speedup") for d in dtypes]
    if any(row.speedup_vs_compiled is not None for row in rows):
        columns += [(f"vs torch.compile {d}", d, "speedup_vs_compiled") for d in dtypes]
    lines = ["| case | " + " | ".join(title for title, _, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
    case_names = [case.name for case in CASES if any(row.case == case.name for row in rows)]
    for case_name in case_names:
        cells = []
        for _, dtype, attribute in columns:
            speedups = [getattr(row, attribute) for row in rows
                        if row.case == case_name and row.dtype == dtype and getattr(row, attribute) is not None]
            cells.append(f"{statistics.median(speedups):.2f}x (n={len(speedups)})" if speedups else "n/a")
        lines.append(f"| {case_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_speedups(rows: Sequence[Row], path: str, title: str) -> None:
    """One panel per case: a bar per shape, grouped by layout and dtype; 1.0 = parity."""
    try:
        import matplotlib
    except ImportError:  # a bare GPU machine may lack it; the JSON holds the same numbers
        print(f"matplotlib is not installed, no plot written to {path}", file=sys.stderr)
        return
    matplotlib.use("Agg")  # no display on benchmark machines
    import matplotlib.pyplot as plt

    case_names = [case.name for case in CASES if any(row.case == case.name for row in rows)]
    shapes = list(dict.fromkeys(row.shape for row in rows))
    series = list(dict.fromkeys((row.layout, row.dtype) for row in rows))
    figure, axes = plt.subplots(len(case_names), 1, squeeze=False,
                                figsize=(max(8, 1.6 * len(shapes) * max(1, len(series)) / 2), 3.2 * len(case_names)))
    bar_width = 0.8 / max(1, len(series))
    for axis, case_name in zip(axes[:, 0], case_names):
        for series_index, (layout, dtype) in enumerate(series):
            heights = []
            for shape in shapes:
                match = [r for r in rows if r.case == case_name and r.shape == shape
                         and r.layout == layout and r.dtype == dtype]
                heights.append(match[0].speedup if match and match[0].speedup else 0.0)
            positions = [i + (series_index - (len(series) - 1) / 2) * bar_width for i in range(len(shapes))]
            axis.bar(positions, heights, bar_width, label=f"{layout} {dtype}")
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xticks(range(len(shapes)))
        axis.set_xticklabels(["x".join(map(str, shape)) for shape in shapes], fontsize=8)
        axis.set_ylabel("speedup vs torch")
        axis.set_title(case_name, fontsize=10)
        axis.legend(fontsize=7, ncol=len(series))
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"wrote {path}", file=sys.stderr)


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------

def _choices(all_choices):
    """argparse type for a repeatable, comma-separated option restricted to choices."""
    def parse(text):
        values = [value.strip() for value in text.split(",") if value.strip()]
        unknown = [value for value in values if value not in all_choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {list(all_choices)}")
        return values
    return parse


def _shape(text):
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) <= 0:
        raise argparse.ArgumentTypeError(f"expected N,C,H,W with positive integers, got {text!r}")
    return shape


def parse_arguments(argv):
    parser = argparse.ArgumentParser(
        prog="fastbn-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default: cpu")
    parser.add_argument("--case", type=_choices(CASES_BY_NAME), action="append",
                        help=f"cases to run (repeatable or comma-separated); default all of {list(CASES_BY_NAME)}")
    parser.add_argument("--dtype", type=_choices(DTYPES), action="append",
                        help="dtypes (repeatable or comma-separated); default float32,bfloat16 "
                             "(+float16 on cuda)")
    parser.add_argument("--layout", type=_choices(LAYOUTS), action="append",
                        help="memory layouts (repeatable or comma-separated); default both")
    parser.add_argument("--shape", type=_shape, action="append", default=[],
                        help="add a shape N,C,H,W (repeatable)")
    parser.add_argument("--only-shapes", action="store_true",
                        help="run only the --shape shapes, not the default list")
    parser.add_argument("--param-dtype", choices=["float32", "input"], default="float32",
                        help="dtype of weight/bias/running stats: float32 (as in mixed precision "
                             "training) or the input's dtype (as after module.to(dtype)); default float32")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: two shapes, short timing (under a minute)")
    parser.add_argument("--min-run-time", type=float, default=None,
                        help="seconds of timing per implementation and row (default 1.0, --quick 0.1)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="alternations torch/fastbn per row (default 3, --quick 2)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="intra-op threads for both implementations (default: torch's, "
                             f"here {torch.get_num_threads()})")
    parser.add_argument("--json", default=None,
                        help="where to write results (default bench/results/bench-<device>.json)")
    parser.add_argument("--no-json", action="store_true", help="do not write the JSON file")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile of torch's module (BN, BN + activation) as a third column")
    parser.add_argument("--plot", default=None, help="write a PNG bar chart of the speedups here")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="for shared machines: before each row, wait up to SECONDS for other "
                             "processes to leave the CPUs idle, and time a row they still "
                             "disturbed again, up to twice (default 0: neither)")
    parser.add_argument("--stand-in", action="store_true",
                        help="time torch against itself instead of fastbn (only to develop this script)")
    parser.add_argument("--fresh-pages", action="store_true",
                        help="CPU: leave glibc's default of returning large freed blocks to the OS (each "
                             "call's output then may or may not page-fault; see keep_freed_memory)")
    options = parser.parse_args(argv)

    flatten = lambda lists: [value for values in lists for value in values] if lists else None
    options.cases = [CASES_BY_NAME[name] for name in dict.fromkeys(flatten(options.case) or CASES_BY_NAME)]
    options.dtypes = list(dict.fromkeys(flatten(options.dtype) or DEFAULT_DTYPES[options.device]))
    options.layouts = list(dict.fromkeys(flatten(options.layout) or LAYOUTS))
    base_shapes = [] if options.only_shapes else (QUICK_SHAPES if options.quick else DEFAULT_SHAPES)
    options.shapes = list(dict.fromkeys(base_shapes + options.shape))
    if not options.shapes:
        parser.error("no shapes: --only-shapes needs at least one --shape")
    if options.min_run_time is None:
        options.min_run_time = 0.1 if options.quick else 1.0
    if options.rounds is None:
        options.rounds = 2 if options.quick else 3
    if options.json is None:
        options.json = os.path.join("bench", "results", f"bench-{options.device}.json")
    if options.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    if options.device == "cuda":
        # Time fastbn's own kernels, not the torch fallback that builds whose CUDA
        # kernels are not yet validated use (fastbn.ops.CUDA_KERNELS_VALIDATED).
        os.environ.setdefault("FASTBN_CUDA_KERNELS", "1")
    if options.device == "cpu" and "float16" in options.dtypes:
        print("note: float16 batch norm on CPU is not a tuned path in torch", file=sys.stderr)
    return options


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> str:
    """Make glibc keep freed memory for reuse instead of returning it to the OS.

    Every call allocates a fresh output (tens of MB here). Whether glibc serves it
    from memory it kept or from new pages (a page fault per 4 KiB on first write,
    which cost up to 3 ms per call on this machine) depends on the heap's history,
    so either side of a row could be charged for it at random. Keeping freed memory
    (tensors below 32 MiB, glibc's largest heap threshold) gives both sides the
    steady state that a caching allocator gives on GPUs. Returns a description."""
    if not sys.platform.startswith("linux"):
        return "allocator: system default"
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):
        ok = False
    return "allocator: glibc, freed memory kept (mallopt)" if ok else "allocator: system default (mallopt failed)"


def main(argv=None) -> int:
    options = parse_arguments(argv)
    torch.set_num_threads(options.threads)
    allocator = keep_freed_memory() if options.device == "cpu" and not options.fresh_pages else \
        "allocator: system default"
    make_fastbn, fastbn_description = load_fastbn_module_factory(options.stand_in)
    fastbn_name = "stand-in" if options.stand_in else "fastbn"

    machine = describe_machine(options.device)
    busy_before = other_cpu_load_over(1.0)
    if busy_before is not None and busy_before > BUSY_THRESHOLD:
        print(f"warning: {100 * busy_before:.0f}% of the CPUs are busy with other work; "
              "timings will be noisy", file=sys.stderr)
    copy = measure_copy_bandwidth(options.device, options.threads, 0.3 if options.quick else 1.0)
    where = machine.get("gpu", machine["cpu"])
    started = datetime.datetime.now().astimezone()
    print(f"# fastbn benchmark, {options.device}: {where}")
    print(f"torch {machine['torch']}"
          + (f", CUDA {machine['cuda']}, cuDNN {machine['cudnn']}" if options.device == "cuda" else "")
          + f", threads {options.threads}, copy bandwidth {copy['GBps']:.1f} GB/s "
            f"(median dst.copy_(src), {copy['buffer_MiB']} MiB, read+write counted); {allocator}")
    print(f"{fastbn_description}; git {git_revision()}; {started:%Y-%m-%d %H:%M %Z}; "
          f"params {options.param_dtype}; min_run_time {options.min_run_time}s x {options.rounds} rounds "
          "per side; times are medians; "
          f"other CPU load before: {_format(busy_before and 100 * busy_before, '{:.0f}%')}"
          + (f"; --wait-idle {options.wait_idle:g}s" if options.wait_idle > 0 else ""))
    print(flush=True)

    rows: List[Row] = []
    total = len(options.cases) * len(options.shapes) * len(options.layouts) * len(options.dtypes)
    for case in options.cases:
        for shape in options.shapes:
            for layout in options.layouts:
                for dtype_name in options.dtypes:
                    row = benchmark_row(case, shape, layout, dtype_name, options, make_fastbn)
                    # With --wait-idle, a row that other work disturbed anyway is timed
                    # again (twice at most), keeping the attempt with the least load.
                    for _ in range(2 if options.wait_idle > 0 else 0):
                        if not (row.other_cpu_load or 0.0) > BUSY_THRESHOLD:
                            break
                        retry = benchmark_row(case, shape, layout, dtype_name, options, make_fastbn)
                        if (retry.other_cpu_load or 0.0) < row.other_cpu_load:
                            row = retry
                    rows.append(row)
                    # Progress on stderr keeps stdout a clean markdown document.
                    print(f"[{len(rows)}/{total}] {case.name} {shape} {layout} {dtype_name}: "
                          f"speedup {_format(row.speedup, '{:.2f}x')} {row.fastbn_status}",
                          file=sys.stderr, flush=True)

    # Measured again at the end: a shared machine's bandwidth drifts, and a large change
    # means this run's numbers should be taken with care.
    copy_at_end = measure_copy_bandwidth(options.device, options.threads, 0.3 if options.quick else 1.0)
    busy_after = other_cpu_load_over(1.0)
    print(markdown_table(rows, copy["GBps"], fastbn_name))
    print()
    print(f"Copy bandwidth at the end: {copy_at_end['GBps']:.1f} GB/s (start: {copy['GBps']:.1f} GB/s; "
          "% copy uses the start). Other CPU load after: "
          f"{_format(busy_after and 100 * busy_after, '{:.0f}%')}.")
    print()
    print("Median speedup (torch time / fastbn time) over shapes and layouts:")
    print()
    print(speedup_summary(rows, [d for d in DTYPES if d in options.dtypes]))
    notes = [f"- {row.case} {row.shape} {row.layout} {row.dtype}: {row.fastbn_status}: {row.note}"
             for row in rows if row.note]
    if notes:
        print()
        print("Notes:")
        # n/a rows repeat the same reason for every shape; say each reason once.
        for note in dict.fromkeys(n.split(": ", 1)[1] for n in notes):
            print(f"- {note}")

    if not options.no_json:
        directory = os.path.dirname(options.json)
        if directory:
            os.makedirs(directory, exist_ok=True)
        record = {
            "started": started.isoformat(timespec="seconds"),
            "device": options.device, "machine": machine, "threads": options.threads,
            "fastbn": fastbn_description, "stand_in": options.stand_in, "git": git_revision(),
            "copy_bandwidth": copy, "copy_bandwidth_at_end": copy_at_end, "allocator": allocator,
            "other_cpu_load_before": busy_before, "other_cpu_load_after": busy_after,
            "param_dtype": options.param_dtype,
            "min_run_time_s": options.min_run_time, "rounds": options.rounds,
            "argv": sys.argv[1:] if argv is None else list(argv),
            "rows": [dict(asdict(row), speedup=row.speedup, speedup_vs_compiled=row.speedup_vs_compiled,
                          torch_GBps=row.gbps(row.torch_s), fastbn_GBps=row.gbps(row.fastbn_s))
                     for row in rows],
        }
        with open(options.json, "w") as out:
            json.dump(record, out, indent=1)
        print(f"\nwrote {options.json}", file=sys.stderr)
    if options.plot:
        plot_speedups(rows, options.plot,
                      f"{fastbn_name} vs torch, {options.device}: {where}, {options.threads} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
