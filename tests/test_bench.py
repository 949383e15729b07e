"""Tests of the benchmark (`python -m bench`, bench/cli.py): one tiny shape through every
case, against fastbn and against the stand-in on a process without fastbn. They assert the
structure of the results (a row per case, layout and dtype; fastbn's check against float64),
never the timings."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import fastbn

from bench import cases, cli
from bench.report import check_cell
from bench.row import Row

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One tiny shape and the shortest timing: the rows' checks and the output's structure are
# what is tested, so a run takes seconds (most of it the copy bandwidth and CPU load probes).
TINY_RUN = ["--device", "cpu", "--quick", "--only-shapes", "--shape", "2,4,3,3",
            "--min-run-time", "0.01", "--rounds", "1"]
COLUMNS = ["case", "shape (N,C,H,W)", "layout", "dtype", "torch µs", "{name} µs", "speedup",
           "torch GB/s", "{name} GB/s", "{name} % copy", "check"]


def table_rows(markdown, name):
    """The cells of the rows of the results table in `markdown`, after checking its header."""
    lines = markdown.splitlines()
    header = "| " + " | ".join(COLUMNS).format(name=name) + " |"
    start = lines.index(header) + 2  # past the header and the |---| line
    rows = []
    for line in lines[start:]:
        if not line.startswith("| "):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def assert_check_passed(check):
    """The check column: 'ok', or notes that do not concern fastbn's side (torch's own error
    against float64, other processes busy on a shared machine), never fastbn off."""
    assert re.fullmatch(r"ok|(torch off \S+|busy \d+%)(, busy \d+%)?", check), check


def test_fastbn_off_only_where_torch_is_off_as_much_is_not_a_mismatch():
    """At an activation's kink both float32 results can miss float64 by a whole dy on one
    value: fastbn passes there when its error is at most twice torch's (the tests' budget),
    and the check column still says that it is off; anything more, or NaN, is a mismatch."""
    acceptable = cases.fastbn_error_acceptable
    assert acceptable(5e-4, None, torch.float32) and acceptable(5e-4, 1e-7, torch.float32)
    assert acceptable(0.32, 0.32, torch.float32) and acceptable(0.6, 0.32, torch.float32)
    assert not acceptable(0.7, 0.32, torch.float32)
    assert not acceptable(0.32, None, torch.float32) and not acceptable(0.32, 1e-7, torch.float32)
    assert not acceptable(math.nan, 0.32, torch.float32) and not acceptable(math.nan, math.nan, torch.float32)
    row = Row("bn_add_relu_fwd_bwd", (32, 64, 56, 56), "nchw", "float32", 1, torch_error=0.32, fastbn_error=0.32)
    assert check_cell(row) == "fastbn off 3.2e-01 (at most 2x torch's), torch off 3.2e-01"
    row.fastbn_status = "mismatch"
    assert check_cell(row).startswith("FASTBN OFF 3.2e-01")


def test_every_case_layout_and_dtype_is_a_checked_row(tmp_path, capsys):
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    assert cli.main(TINY_RUN + ["--fresh-pages", "--json", str(out), "--plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# fastbn benchmark, cpu: ")
    expected = [(case.name, "2,4,3,3", layout, dtype) for case in cases.CASES
                for layout in cases.LAYOUTS for dtype in cases.DEFAULT_DTYPES["cpu"]]
    rows = table_rows(printed, "fastbn")
    assert [tuple(row[:4]) for row in rows] == expected
    for row in rows:
        assert float(row[4]) > 0 and float(row[5]) > 0 and row[6].endswith("x")  # timed on both sides
        assert_check_passed(row[10])
    for case in cases.CASES:  # the summary: a median speedup per case and dtype
        assert re.search(rf"^\| {case.name} \| \d+\.\d\dx \(n=2\) \| \d+\.\d\dx \(n=2\) \|$", printed, re.M)

    record = json.loads(out.read_text())
    assert record["stand_in"] is False and record["argv"][:2] == ["--device", "cpu"]
    assert [(r["case"], tuple(r["shape"]), r["layout"], r["dtype"]) for r in record["rows"]] == \
        [(case, (2, 4, 3, 3), layout, dtype) for case, _, layout, dtype in expected]
    for r in record["rows"]:
        assert r["fastbn_status"] == "ok", r
        assert r["fastbn_error"] <= cases.CHECK_TOLERANCE[cases.DTYPES[r["dtype"]]]
        assert r["speedup"] == pytest.approx(r["torch_s"] / r["fastbn_s"])
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_stand_in_runs_without_fastbn():
    """`python -m bench --stand-in` on a process where `import fastbn` fails (as on a
    checkout whose extension is not built): bench's modules load, torch runs on both
    sides, and the fused cases are n/a."""
    script = ("import runpy, sys\n"
              "sys.modules['fastbn'] = None  # import fastbn raises ImportError\n"
              "sys.argv = ['bench'] + sys.argv[1:]\n"
              "runpy.run_module('bench', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", script, *TINY_RUN, "--stand-in", "--dtype", "float32",
                             "--case", "train_fwd,bn_relu_fwd_bwd", "--no-json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "STAND-IN (torch.nn.BatchNorm2d, not fastbn)" in result.stdout
    rows = table_rows(result.stdout, "stand-in")
    assert [(row[0], row[2]) for row in rows] == [(case, layout) for case in ("train_fwd", "bn_relu_fwd_bwd")
                                                  for layout in cases.LAYOUTS]
    for row in rows:
        fused = cases.CASES_BY_NAME[row[0]].activation is not None
        assert (row[5] == "n/a") == fused, row
        if fused:  # no stand-in result to check: a dash, or only notes about torch or the machine
            assert re.fullmatch(r"—|(torch off \S+|busy \d+%)(, busy \d+%)?", row[10]), row
        else:
            assert_check_passed(row[10])
    assert "- n/a: the stand-in has no fused activation" in result.stdout


def test_without_fastbn_the_benchmark_says_how_to_build_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastbn", None)  # import fastbn raises ImportError
    with pytest.raises(SystemExit, match="Build the extension first"):
        cases.load_fastbn_module_factory(stand_in=False)


def test_import_fastbn_does_not_import_the_benchmark():
    script = "import sys, fastbn; print(sorted(m for m in sys.modules if m.split('.')[0] == 'bench'))"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_compiled_cell_says_when_torch_compile_did_not_compile_or_was_off():
    from bench.report import compiled_cell
    from bench.row import Row
    row = Row("train_fwd_bwd", (2, 4, 3, 3), "nchw", "float32", 0)
    assert compiled_cell(row) == "—"
    row.compiled_note = "BackendCompilerFailed: no compiler"
    assert compiled_cell(row) == "BackendCompilerFailed: no compiler"
    row.compiled_s = 1.5e-3
    row.compiled_note = "torch.compile off 2.2e-01"  # timed all the same, and said
    assert compiled_cell(row) == "1500.0 (torch.compile off 2.2e-01)"
    row.compiled_note = ""
    assert compiled_cell(row) == "1500.0"


def test_blocks_rows_are_checked_against_float64(tmp_path, capsys):
    """`python -m bench.blocks` on a tiny shape: a row per block, dtype and layout, each
    one's check against a float64 copy of torch's block passed."""
    from bench import blocks
    out = tmp_path / "blocks.json"
    threshold = fastbn.ops.cpu_streaming_bytes()
    # NCHW with every output streamed (--streaming-bytes 0), channels_last with this host's threshold
    for layout, streaming in (([], ["--streaming-bytes", "0"]), (["--channels-last"], [])):
        # --fresh-pages: keep_freed_memory would change glibc's settings for the rest of the test process
        argv = ["--shape", "2,8,5,5", "--rounds", "1", "--steps", "1", "--fresh-pages", "--json", str(out)]
        assert blocks.main(argv + layout + streaming) == 0
        assert fastbn.ops.cpu_streaming_bytes() == threshold
        assert json.loads(out.read_text())["streaming_bytes"] == (0 if streaming else threshold)
        rows = json.loads(out.read_text())["rows"]
        assert [(row["block"], row["dtype"]) for row in rows] == [
            (block, dtype) for dtype in ("float32", "bfloat16") for block in blocks.BLOCKS]
        assert {row["layout"] for row in rows} == {"channels_last" if layout else "NCHW"}
        assert all(row["check"] == "ok" and row["torch_us"] > 0 and row["fastbn_us"] > 0 for row in rows)
    assert "| 2,8,5,5 | bfloat16 | channels_last | conv_bn_relu | ok |" in capsys.readouterr().out


def test_blocks_check_catches_a_wrong_block():
    """The check is not vacuous: a fastbn block whose output is shifted fails it."""
    from bench import blocks
    bn, conv = blocks.make_modules(torch.nn, 8, torch.float32, torch.contiguous_format, seed=0)
    exact = blocks.block_forward("bn_relu", *(m.double() for m in blocks.make_modules(
        torch.nn, 8, torch.float32, torch.contiguous_format, seed=0)))
    right = blocks.block_forward("bn_relu", bn, conv)
    inputs = blocks.make_inputs((2, 8, 5, 5), torch.float32, torch.contiguous_format, seed=1)[0]
    assert blocks.check({"torch": right, "fastbn": right}, exact, inputs, torch.float32) == "ok"
    wrong = blocks.check({"torch": right, "fastbn": lambda x, r: right(x, r) * 1.01}, exact, inputs, torch.float32)
    assert wrong.startswith("off ")
