"""Paired timing of fastbn-mnist's training epoch: torch's batch norm against fastbn's.

    python -m bench.mnist_epochs --rounds 5 --wait-idle 30

Loads the data once as ``fastbn-mnist`` does (same --data-dir, --dataset, --train-limit,
the CLI's validation split), builds the CLI's model with torch's and with fastbn's
batch norm from the same seed (so the same initial weights), and times one training
epoch of each per round (the CLI's ``train_epoch``: batch 250, Adam, lr 1e-3, the CLI's
defaults), alternating the variants and flipping their order every round (torch, fastbn;
fastbn, torch; ...). The result is the per-round ratio fastbn time / torch time and its
median (below 1: fastbn's epoch is faster).

Every timed epoch is the CLI's first epoch: the model is reset to the shared initial
weights, Adam starts afresh and the data comes in the order of ``epoch_generator(seed, 0)``.
So every round repeats exactly the same computation, the round-to-round spread is the
machine's alone, and the two variants train the same batches from the same weights.
(Continuing the training instead would make each round a different epoch; the work per
epoch is the same, but nothing would show that the rounds are comparable.) A few
untimed batches per variant before the first round take the one-time costs (oneDNN
primitives, first-touch pages) out of round 1.

As in ``python -m bench``, glibc is told to keep freed memory (``--fresh-pages``: its
default), ``--wait-idle`` waits for a quiet machine before each epoch and retimes a round
that other processes disturbed, and every round says how busy the other processes kept
the CPUs. Nothing here asserts on timings.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from bench.timing import (BUSY_THRESHOLD, OtherCpuLoad, describe_cpu, git_revision, keep_freed_memory,
                          wait_until_idle)
from fastbn import mnist
from fastbn.mnist import data as mnist_data

BASELINE = "torch"
DEFAULT_ROUNDS = 5
DEFAULT_WARMUP_BATCHES = 5
RETRIES_WHEN_BUSY = 2  # with --wait-idle, as python -m bench retimes a disturbed row


def cli_settings(options: argparse.Namespace) -> argparse.Namespace:
    """fastbn-mnist's own defaults (batch size, lr, validation split ...) with this run's
    data options, so that prepare_data and the epochs are exactly the CLI's."""
    settings = mnist.build_parser().parse_args([])
    for name in ("dataset", "data_dir", "download", "train_limit", "seed", "memory_format"):
        setattr(settings, name, getattr(options, name))
    return settings


def round_order(variants: Sequence[str], round_index: int) -> List[str]:
    """The variants in the given order in even rounds, reversed in odd ones."""
    return list(variants) if round_index % 2 == 0 else list(reversed(variants))


def time_epoch(model, initial_state: dict, data: mnist.Data, settings, wait_idle: float) -> dict:
    """One training epoch from the initial state, as the CLI's first epoch."""
    if wait_idle > 0:
        wait_until_idle(wait_idle)
    model.load_state_dict(initial_state)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)  # as mnist.fit makes it
    meter = OtherCpuLoad.start()
    start = time.perf_counter()
    loss, accuracy = mnist.train_epoch(model, optimizer, data.train_x, data.train_y, settings.batch_size,
                                       mnist.epoch_generator(settings.seed, 0))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "other_cpu_load": meter.fraction(), "train_loss": loss, "train_acc": accuracy}


def time_round(models: Dict[str, torch.nn.Module], initial_states: Dict[str, dict], order: Sequence[str],
               data: mnist.Data, settings, wait_idle: float) -> dict:
    epochs = {bn: time_epoch(models[bn], initial_states[bn], data, settings, wait_idle) for bn in order}
    loads = [e["other_cpu_load"] for e in epochs.values() if e["other_cpu_load"] is not None]
    return {
        "order": list(order),
        "epochs": {bn: epochs[bn] for bn in models},  # in the variants' order, whatever the timing order
        "ratios": {f"{bn}/{BASELINE}": epochs[bn]["seconds"] / epochs[BASELINE]["seconds"]
                   for bn in models if bn != BASELINE},
        "max_other_cpu_load": max(loads) if loads else None,
        "busy": bool(loads) and max(loads) > BUSY_THRESHOLD,
    }


def measure(data: mnist.Data, settings, variants: Sequence[str], rounds: int, wait_idle: float = 0.0,
            warmup_batches: int = DEFAULT_WARMUP_BATCHES, log: Callable[[str], None] = print) -> dict:
    """Time `rounds` rounds; returns the rounds and the median ratios (all rounds, and quiet ones)."""
    if BASELINE not in variants:
        raise ValueError(f"the variants must include {BASELINE!r}, the baseline of the ratios")
    models = {bn: mnist.make_model(bn, settings.seed, settings.memory_format) for bn in variants}
    initial_states = {bn: {k: v.clone() for k, v in model.state_dict().items()} for bn, model in models.items()}
    warmup = data._replace(train_x=data.train_x[: warmup_batches * settings.batch_size],
                           train_y=data.train_y[: warmup_batches * settings.batch_size])
    for bn in variants if warmup_batches > 0 else ():
        time_epoch(models[bn], initial_states[bn], warmup, settings, 0.0)

    results = []
    for index in range(rounds):
        order = round_order(variants, index)
        result = time_round(models, initial_states, order, data, settings, wait_idle)
        attempts = 1
        while wait_idle > 0 and result["busy"] and attempts <= RETRIES_WHEN_BUSY:
            retry = time_round(models, initial_states, order, data, settings, wait_idle)
            attempts += 1
            if retry["max_other_cpu_load"] < result["max_other_cpu_load"]:
                result = retry
        results.append({"round": index + 1, "attempts": attempts, **result})
        log(format_round(results[-1]))

    def median_ratios(selected):
        return {name: statistics.median(r["ratios"][name] for r in selected) if selected else None
                for name in results[0]["ratios"]} if results else {}

    return {"rounds": results, "median_ratios": median_ratios(results),
            "median_ratios_quiet_rounds": median_ratios([r for r in results if not r["busy"]]),
            "quiet_rounds": sum(not r["busy"] for r in results)}


def format_round(result: dict) -> str:
    times = ", ".join(f"{bn} {result['epochs'][bn]['seconds']:.2f} s" for bn in result["order"])
    ratios = ", ".join(f"{name} {value:.3f}" for name, value in result["ratios"].items())
    load = result["max_other_cpu_load"]
    retried = f" ({result['attempts']} attempts)" if result["attempts"] > 1 else ""
    return (f"round {result['round']}: {times}; {ratios}; other CPU load "
            f"{'?' if load is None else f'{100 * load:.0f}%'}{' BUSY' if result['busy'] else ''}{retried}")


def markdown_table(record: dict) -> str:
    variants, names = record["variants"], list(record["median_ratios"])
    def row(cells):
        return "| " + " | ".join(cells) + " |"

    lines = [row(["round", "order", *(f"{bn} s" for bn in variants), *names, "other CPU load"]),
             "|---:|---|" + "---:|" * (len(variants) + len(names)) + "---|"]
    for r in record["rounds"]:
        load = r["max_other_cpu_load"]
        lines.append(row([str(r["round"]), ", ".join(r["order"]),
                          *(f"{r['epochs'][bn]['seconds']:.2f}" for bn in variants),
                          *(f"{r['ratios'][name]:.3f}" for name in names),
                          ("?" if load is None else f"{100 * load:.0f}%") + (" busy" if r["busy"] else "")]))
    lines.append(row(["median", "", *([""] * len(variants)),
                      *(f"{record['median_ratios'][name]:.3f}" for name in names), ""]))
    return "\n".join(lines)


def parse_arguments(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.mnist_epochs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=mnist._int_at_least(1), default=DEFAULT_ROUNDS,
                        help=f"rounds, each one epoch per variant (default {DEFAULT_ROUNDS})")
    parser.add_argument("--no-bn", action="store_true",
                        help="also time the model without batch norm (fastbn-mnist --bn none)")
    parser.add_argument("--dataset", choices=sorted(mnist_data.DATASETS), default="mnist")
    parser.add_argument("--data-dir", default="./data", help="as fastbn-mnist's (default: ./data)")
    parser.add_argument("--no-download", dest="download", action="store_false",
                        help="never try to download the data set")
    parser.add_argument("--train-limit", type=mnist._int_at_least(1), default=None, metavar="N",
                        help="use only the first N training images (before the validation split)")
    parser.add_argument("--seed", type=mnist._int_at_least(0), default=0,
                        help="initial weights and data order, as fastbn-mnist's --seed (default 0)")
    parser.add_argument("--memory-format", choices=sorted(mnist.MEMORY_FORMATS), default=mnist.DEFAULT_MEMORY_FORMAT,
                        help=f"the model's layout, as fastbn-mnist's (default {mnist.DEFAULT_MEMORY_FORMAT})")
    parser.add_argument("--threads", type=mnist._int_at_least(1), default=torch.get_num_threads(),
                        help=f"torch CPU threads (default: torch's, here {torch.get_num_threads()})")
    parser.add_argument("--warmup-batches", type=mnist._int_at_least(0), default=DEFAULT_WARMUP_BATCHES,
                        help=f"untimed training steps per variant before round 1 (default {DEFAULT_WARMUP_BATCHES})")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each epoch wait up to SECONDS for other processes to leave the CPUs idle, "
                             f"and retime a round they still disturbed, up to {RETRIES_WHEN_BUSY} times "
                             "(default 0: neither)")
    parser.add_argument("--fresh-pages", action="store_true",
                        help="leave glibc's default of returning large freed blocks to the OS "
                             "(as fastbn-mnist runs; see bench.timing.keep_freed_memory)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    options = parse_arguments(argv)
    torch.set_num_threads(options.threads)
    allocator = "allocator: system default" if options.fresh_pages else keep_freed_memory()
    settings = cli_settings(options)
    variants = ["torch", "fastbn"] + (["none"] if options.no_bn else [])
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731  (stdout: the table)
    try:
        for bn in variants:
            mnist.batchnorm_classes(bn)  # fastbn unbuilt: one line, before loading the data
        data = mnist.prepare_data(settings, torch.device("cpu"), log)
    except (mnist.UsageError, mnist_data.DataUnavailable) as error:
        print(f"mnist_epochs: error: {error}", file=sys.stderr)
        return 2
    started = datetime.datetime.now().astimezone()
    header = (f"# fastbn-mnist training epoch, torch vs fastbn batch norm: {describe_cpu()}\n"
              f"torch {torch.__version__}, threads {torch.get_num_threads()}; {allocator}; git {git_revision()}; "
              f"{started:%Y-%m-%d %H:%M %Z}\n"
              f"{options.dataset}: {len(data.train_x)} training images from {data.source}, batch "
              f"{settings.batch_size}, Adam lr {settings.lr:g}, seed {settings.seed}, {settings.memory_format}; "
              f"{options.rounds} rounds, "
              f"each epoch from the same initial state and data order"
              + (f"; --wait-idle {options.wait_idle:g}s" if options.wait_idle > 0 else ""))
    log(header)
    result = measure(data, settings, variants, options.rounds, options.wait_idle, options.warmup_batches, log)
    record = {"started": started.isoformat(timespec="seconds"), "argv": list(sys.argv[1:] if argv is None else argv),
              "cpu": describe_cpu(), "torch": torch.__version__, "git": git_revision(),
              "threads": torch.get_num_threads(), "allocator": allocator, "dataset": options.dataset,
              "data_source": data.source, "train_images": len(data.train_x), "batch_size": settings.batch_size,
              "lr": settings.lr, "seed": settings.seed, "memory_format": settings.memory_format,
              "variants": variants, **result}
    print(header)
    print()
    print(markdown_table(record))
    print()
    quiet = record["quiet_rounds"]
    for name, value in record["median_ratios"].items():
        print(f"median {name}: {value:.3f} over {options.rounds} rounds"
              + ("" if quiet == options.rounds else
                 f"; over the {quiet} rounds without other CPU load: "
                 + ("-" if record["median_ratios_quiet_rounds"][name] is None
                    else f"{record['median_ratios_quiet_rounds'][name]:.3f}")))
    if options.json:
        with open(options.json, "w") as out:
            json.dump(record, out, indent=1)
        log(f"wrote {options.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
