"""Process-group helpers. Everything works without ``torch.distributed`` initialised (one process).

The trainer only ever asks these questions (am I rank 0? how many ranks? reduce this number), so adding
DistributedDataParallel later touches this module and the model wrapping, not the training loop.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = [
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "cleanup",
    "init_from_env",
    "is_dist",
    "is_main_process",
    "local_rank",
    "rank",
    "world_size",
]


def is_dist() -> bool:
    """True when a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    """Rank 0 alone logs, prints and writes checkpoints."""
    return rank() == 0


def init_from_env(device: torch.device) -> bool:
    """Initialise the default process group if launched by ``torchrun`` (``WORLD_SIZE`` > 1).

    Returns:
        Whether a process group is now active.
    """
    if is_dist():
        return True
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return True


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over ranks (returns it unchanged in a single process)."""
    if is_dist():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from ``src`` to every rank (e.g. a run directory chosen by rank 0)."""
    if not is_dist():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]
