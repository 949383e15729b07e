"""Tests of bench/overhead.py (per-call cost of small layers, torch against fastbn): what it
times and the structure of its results, never the timings themselves."""
import json

import pytest
import torch

import fastbn
from bench import overhead


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()  # the tool sets torch's process-wide thread count
    yield
    torch.set_num_threads(threads)


def test_statements_run_the_same_layer_on_both_sides():
    """Each timed statement, run once per side, does the same computation: fastbn's module
    and torch's give the same output, gradients and running statistics on the same input."""
    for class_name, shape in overhead.SHAPES:
        envs = {side: overhead.make_env(library, class_name, shape, 0)
                for side, library in (("torch", torch.nn), ("fastbn", fastbn))}
        assert torch.equal(envs["torch"]["x"], envs["fastbn"]["x"]) and envs["torch"]["x"].mean() > 1  # non-zero mean
        for statement in overhead.STATEMENTS.values():
            for env in envs.values():
                exec(statement, env)
        t, f = envs["torch"], envs["fastbn"]
        torch.testing.assert_close(f["x"].grad, t["x"].grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(f["bn"].weight.grad, t["bn"].weight.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(f["bn"].running_var, t["bn"].running_var)
        assert int(f["bn"].num_batches_tracked) == int(t["bn"].num_batches_tracked) == 2  # fwd+bwd and fwd


def test_results_pair_every_case_and_take_the_forward_apart(tmp_path, capsys):
    out = tmp_path / "overhead.json"
    assert overhead.main(["--rounds", "2", "--min-run-time", "0.01", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["module"], r["case"]) for r in rows] == [(m, c) for m, _ in overhead.SHAPES for c in overhead.STATEMENTS]
    for row in rows:
        assert row["torch_us"] > 0 and row["fastbn_us"] > 0 and len(row["ratios"]) == 2
        assert min(row["ratios"]) <= row["ratio"] <= max(row["ratios"])
    assert len(result["forward_parts"]) >= 5 and all(p["us"] > 0 for p in result["forward_parts"])
    printed = capsys.readouterr().out
    assert "| BatchNorm2d | (2, 4, 3, 3) | fwd+bwd |" in printed and "part by part" in printed
