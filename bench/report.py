"""The benchmark's output: the markdown table of rows, the median speedups per case, and
the PNG bar chart of the speedups."""
from __future__ import annotations

import os
import statistics
import sys
from typing import Optional, Sequence

from bench.cases import CASES, CHECK_TOLERANCE, DTYPES
from bench.row import Row
from bench.timing import BUSY_THRESHOLD


def format_or_dash(value: Optional[float], pattern: str) -> str:
    return "—" if value is None else pattern.format(value)


def check_cell(row: Row) -> str:
    """'ok', or what is wrong: a side off from float64 (fastbn in capitals), or the
    machine busy with other work while the row was timed."""
    tolerance = CHECK_TOLERANCE[DTYPES[row.dtype]]
    problems = []
    if row.fastbn_status == "mismatch":
        problems.append(f"FASTBN OFF {row.fastbn_error:.1e}")
    elif row.fastbn_error is not None and not row.fastbn_error <= tolerance:
        problems.append(f"fastbn off {row.fastbn_error:.1e} (at most 2x torch's)")
    if row.torch_error is not None and not row.torch_error <= tolerance:
        problems.append(f"torch off {row.torch_error:.1e}")
    if row.other_cpu_load is not None and row.other_cpu_load > BUSY_THRESHOLD:
        problems.append(f"busy {100 * row.other_cpu_load:.0f}%")
    if problems:
        return ", ".join(problems)
    return "ok" if row.fastbn_error is not None else "—"


def compiled_cell(row: Row) -> str:
    """torch.compile's time, with its note (off against float64) beside it; the note alone
    where it did not compile."""
    if row.compiled_s is None:
        return row.compiled_note[:60] or "—"
    time = f"{row.compiled_s * 1e6:.1f}"
    return f"{time} ({row.compiled_note})" if row.compiled_note else time


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
            fastbn_time = format_or_dash(row.fastbn_s and row.fastbn_s * 1e6, "{:.1f}")
        speedup = format_or_dash(row.speedup, "{:.2f}x")
        fastbn_gbps = row.gbps(row.fastbn_s)
        percent = None if fastbn_gbps is None else 100 * fastbn_gbps / copy_gbps
        lines.append("| " + " | ".join([
            row.case, ",".join(map(str, row.shape)), row.layout, row.dtype,
            format_or_dash(row.torch_s and row.torch_s * 1e6, "{:.1f}"), fastbn_time, speedup,
            format_or_dash(row.gbps(row.torch_s), "{:.1f}"), format_or_dash(fastbn_gbps, "{:.1f}"),
            format_or_dash(percent, "{:.0f}%"), check_cell(row),
        ] + ([compiled_cell(row), format_or_dash(row.speedup_vs_compiled, "{:.2f}x")] if compiled else [])) + " |")
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
