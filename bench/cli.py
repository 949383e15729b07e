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

This file holds the command line and the run; bench/cases.py what is measured and
how it is checked, bench/row.py the checking and timing of one row, bench/timing.py
the timers and the machine, bench/report.py the tables and the plot.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from dataclasses import asdict
from typing import List

import torch

from bench.cases import CASES_BY_NAME, DEFAULT_DTYPES, DEFAULT_SHAPES, DTYPES, LAYOUTS, QUICK_SHAPES, \
    load_fastbn_module_factory
from bench.report import format_or_dash, markdown_table, plot_speedups, speedup_summary
from bench.row import Row, benchmark_row
from bench.timing import BUSY_THRESHOLD, describe_machine, git_revision, keep_freed_memory, \
    measure_copy_bandwidth, other_cpu_load_over


def _choices(all_choices):
    """argparse type for a repeatable, comma-separated option restricted to choices."""
    def parse(text):
        values = [value.strip() for value in text.split(",") if value.strip()]
        unknown = [value for value in values if value not in all_choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {list(all_choices)}")
        return values
    return parse


def parse_shape(text):
    """argparse type of --shape: N,C,H,W of positive integers."""
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
    parser.add_argument("--shape", type=parse_shape, action="append", default=[],
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
          f"other CPU load before: {format_or_dash(busy_before and 100 * busy_before, '{:.0f}%')}"
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
                    # The medians too: a run stopped early (a lent GPU's time limit) keeps them here.
                    print(f"[{len(rows)}/{total}] {case.name} {shape} {layout} {dtype_name}: "
                          f"speedup {format_or_dash(row.speedup, '{:.2f}x')} {row.fastbn_status}; "
                          f"torch {format_or_dash(row.torch_s and 1e6 * row.torch_s, '{:.1f}')} us, "
                          f"fastbn {format_or_dash(row.fastbn_s and 1e6 * row.fastbn_s, '{:.1f}')} us",
                          file=sys.stderr, flush=True)

    # Measured again at the end: a shared machine's bandwidth drifts, and a large change
    # means this run's numbers should be taken with care.
    copy_at_end = measure_copy_bandwidth(options.device, options.threads, 0.3 if options.quick else 1.0)
    busy_after = other_cpu_load_over(1.0)
    print(markdown_table(rows, copy["GBps"], fastbn_name))
    print()
    print(f"Copy bandwidth at the end: {copy_at_end['GBps']:.1f} GB/s (start: {copy['GBps']:.1f} GB/s; "
          "% copy uses the start). Other CPU load after: "
          f"{format_or_dash(busy_after and 100 * busy_after, '{:.0f}%')}.")
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
