"""Training and evaluation: the epochs' batches and shuffles, one epoch, evaluation, and
fit (every epoch of one variant, with its checkpoints and outputs)."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, List

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .checkpoint import CHECKPOINT, load_checkpoint, restore_checkpoint, save_checkpoint
from .data import Data
from .distributed import SINGLE, World, from_main_rank
from .report import plot_history, write_metrics

EVAL_BATCH = 250  # eval batch size: no effect on results (eval-mode BN); larger was slower on CPU


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
