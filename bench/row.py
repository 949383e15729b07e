"""One row of the table: torch, fastbn (and with --compile torch.compile) checked against
float64 on the same input, then timed in alternation."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from bench.cases import (CHECK_TOLERANCE, DTYPES, LAYOUTS, Case, NotAvailable, Workload, fastbn_error_acceptable,
                         make_step, make_torch_module, make_workload, prepare_module, relative_error,
                         results_for_check)
from bench.timing import OtherCpuLoad, block_times, interquartile_range, wait_until_idle


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
        if not fastbn_error_acceptable(row.fastbn_error, row.torch_error, dtype):
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
    it does not compile. Where its result is off, row.compiled_note says by how much and it
    is timed all the same, as torch's own off rows are (with an activation, mostly values
    next to the ReLU's kink that rounding puts on the other side)."""
    try:
        module = prepare_module(make_torch_module(channels, case.activation), case, param_dtype, options.device)
        # Each row compiles afresh: dynamo counts recompilations per code object across
        # modules, and past its recompile_limit (8) it runs the rest eagerly, warning once
        # (seen from the ninth row of a run on; their "torch.compile" column was eager torch).
        torch._dynamo.reset()
        compiled = torch.compile(module)
        step, x = make_step(compiled, case, workload)
        error = relative_error(results_for_check(step, x, module, case.backward), reference)
    except Exception as failure:  # noqa: BLE001  (reported in the table; the other columns still count)
        row.compiled_note = f"{type(failure).__name__}: {failure}".strip().splitlines()[0][:200]
        return None
    if not error <= CHECK_TOLERANCE[workload.x.dtype]:
        row.compiled_note = f"torch.compile off {error:.1e}"
    return step
