"""Where a fastbn-mnist process runs: its device, and its place in a data-parallel run
launched by torchrun (the process group, and steps rank 0 does for all processes)."""
from __future__ import annotations

import os
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist

from .errors import PROG, UsageError


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


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available to torch "
                         f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu")
    return torch.device(name)


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
