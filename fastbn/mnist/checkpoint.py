"""Checkpoints (written after every epoch, read by --resume), the RNG states they hold,
the run settings they record, and the check of --out before any training."""
from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch

from . import data as mnist_data
from .distributed import SINGLE, World
from .errors import PROG, UsageError
from .report import _atomic_write_bytes

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 1

# Settings that must be the same for --resume to continue a run; --epochs may
# grow (that is the point), the device and progress display may change.
RESUME_KEYS = ("dataset", "bn", "seed", "batch_size", "lr", "val_split", "train_limit", "test_limit")


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
        # Recorded, not checked by --resume: the parameters and the function are the same
        # in either layout (a run may continue in the other one).
        "memory_format": args.memory_format,
        # Recorded, not checked by --resume: a run may continue with another
        # number of processes (the global batches stay the same).
        "processes": world.size,
        "sync_bn": bool(args.sync_bn and world.size > 1),
    }
