"""Per-call cost of small batch-norm layers, where fixed costs dominate: torch against fastbn.

    python -m bench.overhead                 # 1 thread, 5 paired rounds
    python -m bench.overhead --threads 2 --rounds 9 --json out.json

Each row times one statement for torch's module and for fastbn's on the same input,
alternating torch and fastbn every round (``torch.utils.benchmark.Timer``'s
``blocked_autorange``, median of the blocks), and reports the medians over the rounds and
the median of the per-round ratios torch / fastbn (above 1: fastbn faster). The rows:

- ``fwd+bwd``: ``bn(x).backward(dy)`` (module forward in training mode, running
  statistics updated, backward of a dense random dy into x, weight and bias), the
  issue's yardstick (``.sum().backward()`` would hand both a stride-0 dy, which torch's
  BatchNorm1d backward on (250, 256) takes 3x longer over, not a layer's usual gradient);
- ``fwd``: the training forward alone (its graph built and dropped);
- ``eval``: the eval forward under ``torch.no_grad()``.

Then, for the first shape, fastbn's forward taken apart (each part timed alone), to show
where the time goes: the argument checks, the training op with its autograd, the
running-statistics update, and torch's whole ``F.batch_norm`` for comparison.
As in ``python -m bench``, nothing here asserts on timings.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Dict, List

import torch
from torch.utils.benchmark import Timer

import fastbn
from fastbn import functional, ops
from bench.timing import describe_cpu, git_revision

# (module class name, input shape): the small BatchNorm2d and the MNIST model's BatchNorm1d
SHAPES = [("BatchNorm2d", (2, 4, 3, 3)), ("BatchNorm1d", (250, 256))]
STATEMENTS = {
    "fwd+bwd": "bn(x).backward(dy)",
    "fwd": "bn(x)",
    "eval": "with torch.no_grad(): bn_eval(x)",
}


def median_time_us(statement: str, env: Dict, threads: int, min_run_time: float) -> float:
    timer = Timer(statement, globals=env, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e6


def make_env(library, class_name: str, shape, seed: int) -> Dict:
    torch.manual_seed(seed)
    x = (torch.randn(shape) * 2 + 3).requires_grad_(True)  # non-zero mean
    bn = getattr(library, class_name)(shape[1])
    bn_eval = getattr(library, class_name)(shape[1]).eval()
    return {"torch": torch, "bn": bn, "bn_eval": bn_eval, "x": x, "dy": torch.randn(shape)}


def paired_rows(options) -> List[Dict]:
    rows = []
    for class_name, shape in SHAPES:
        envs = {"torch": make_env(torch.nn, class_name, shape, 0), "fastbn": make_env(fastbn, class_name, shape, 0)}
        for label, statement in STATEMENTS.items():
            times = {"torch": [], "fastbn": []}
            for round_index in range(options.rounds):
                order = ("torch", "fastbn") if round_index % 2 == 0 else ("fastbn", "torch")
                for side in order:
                    times[side].append(median_time_us(statement, envs[side], options.threads, options.min_run_time))
            ratios = [t / f for t, f in zip(times["torch"], times["fastbn"])]
            rows.append({"module": class_name, "shape": list(shape), "case": label,
                         "torch_us": statistics.median(times["torch"]), "fastbn_us": statistics.median(times["fastbn"]),
                         "ratio": statistics.median(ratios), "ratios": ratios})
    return rows


def forward_parts(options) -> List[Dict]:
    """fastbn's training forward on the first shape, part by part (each timed alone)."""
    class_name, shape = SHAPES[0]
    env = make_env(fastbn, class_name, shape, 0)
    bn, x = env["bn"], env["x"]
    mean, var = x.detach().mean((0, 2, 3)), x.detach().var((0, 2, 3))
    count = x.numel() // x.shape[1]
    env.update(functional=functional, ops=ops, F=torch.nn.functional, w=bn.weight, b=bn.bias, rm=bn.running_mean,
               rv=bn.running_var, nbt=bn.num_batches_tracked, mean=mean, var=var, count=count)
    parts = {
        "module forward (all of it)": "bn(x)",
        "read weight, bias, running stats, num_batches_tracked as attributes (nn.Module.__getattr__)":
            "bn.weight; bn.bias; bn.running_mean; bn.running_var; bn.num_batches_tracked",
        "the same from the module's dicts (what fastbn's forward does)":
            "p = bn._parameters; b = bn._buffers; p['weight']; p['bias']; b['running_mean']; b['running_var']; "
            "b['num_batches_tracked']",
        "functional.check_batch_norm_args": "functional.check_batch_norm_args(x, rm, rv, w, b, True, 1e-5)",
        "functional.batch_norm_unchecked (op + update + routing)":
            "functional.batch_norm_unchecked(x, rm, rv, w, b, True, 0.1, 1e-5)",
        "torch.ops.fastbn.batch_norm_train with autograd": "ops.batch_norm_train(x, w, b, 1e-5)",
        "ops.update_running_stats": "ops.update_running_stats(rm, rv, mean, var, 0.1, count)",
        "num_batches_tracked.add_(1)": "nbt.add_(1)",
        "torch: F.batch_norm (checks, op, update, autograd)": "F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)",
    }
    return [{"part": name, "us": median_time_us(statement, env, options.threads, options.min_run_time)}
            for name, statement in parts.items()]


def parse_arguments(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both sides (default 1)")
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds (default 5)")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds per timing (default 0.5)")
    parser.add_argument("--json", help="also write the results here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    options = parse_arguments(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(options.threads)
    print(f"# per-call cost, {options.threads} thread(s), {options.rounds} paired rounds; git {git_revision()}; "
          f"torch {torch.__version__}; {describe_cpu()}")
    rows = paired_rows(options)
    print("\n| module | input | case | torch µs | fastbn µs | torch / fastbn |\n|---|---|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['module']} | {tuple(row['shape'])} | {row['case']} | {row['torch_us']:.1f} | "
              f"{row['fastbn_us']:.1f} | {row['ratio']:.2f}x |")
    parts = forward_parts(options)
    print(f"\nfastbn's training forward on {SHAPES[0][1]}, part by part:\n\n| part | µs |\n|---|---:|")
    for part in parts:
        print(f"| {part['part']} | {part['us']:.1f} |")
    if options.json:
        with open(options.json, "w") as handle:
            json.dump({"threads": options.threads, "rounds": options.rounds, "git": git_revision(), "rows": rows,
                       "forward_parts": parts}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
