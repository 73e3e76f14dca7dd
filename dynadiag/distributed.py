"""Process-group helpers. Everything works without ``torch.distributed`` initialised (one process).

The trainer only ever asks these questions (am I rank 0? how many ranks? reduce this number), so adding
DistributedDataParallel later touches this module and the model wrapping, not the training loop.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from dynadiag.extras import require

__all__ = [
    "all_gather_object",
    "all_reduce_mean",
    "all_reduce_sum",
    "any_rank",
    "barrier",
    "broadcast_object",
    "cleanup",
    "env_world_size",
    "export_slurm_env",
    "init_from_env",
    "is_dist",
    "is_main_process",
    "local_rank",
    "rank",
    "rank_seed",
    "ranks_agree",
    "setup",
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


def env_world_size() -> int:
    """The number of ranks the launcher started (``WORLD_SIZE`` from torchrun, ``SLURM_NTASKS`` under Slurm),
    readable before any process group exists, so configs can be validated up front."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return int(os.environ.get("SLURM_NTASKS", 1)) if _under_submitit() else 1


def _under_submitit() -> bool:
    # Tasks of a Slurm job submitted by submitit (hydra/launcher=slurm) carry SUBMITIT_* variables; a plain
    # `srun` or an interactive allocation does not, and is left to torchrun.
    return "SLURM_JOB_ID" in os.environ and any(k.startswith("SUBMITIT_") for k in os.environ)


def export_slurm_env() -> bool:
    """In a multi-task submitit job, set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT`` (first node, a port derived from the job id) from Slurm's variables, as torchrun would.

    Returns:
        Whether anything was exported (never when torchrun's variables are already there).
    """
    if "WORLD_SIZE" in os.environ or env_world_size() <= 1:
        return False
    helpers = require("submitit.helpers", "hydra-submitit-launcher", "a multi-task Slurm (submitit) job")
    helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)  # every task sees all its node's GPUs
    return True


def setup(device: torch.device) -> torch.device:
    """Join the process group the launcher set up (if any) and return this rank's device.

    On CUDA each rank takes the GPU of its local rank (``cuda:<LOCAL_RANK>``). Under submitit (one Slurm task per
    GPU) the torchrun-style variables are derived from Slurm's first.
    """
    export_slurm_env()
    if device.type == "cuda" and env_world_size() > 1:
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    init_from_env(device)
    return device


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


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over ranks (unchanged in one process), so every rank decides from the same scores."""
    if not is_dist():
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.div_(world_size())


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True if ``flag`` is true on any rank (every rank must call this, in the same order)."""
    if not is_dist():
        return bool(flag)
    return all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0


def ranks_agree(tensors: list[torch.Tensor]) -> bool:
    """Whether every rank holds bitwise the same ``tensors`` (e.g. the model's weights after training).

    Compares a fingerprint per tensor (plain and position-weighted float64 sums, so permuted values differ too)
    with a min and a max all-reduce, instead of gathering whole models.
    """
    if not is_dist():
        return True
    parts = [torch.zeros(1, dtype=torch.float64)]
    for t in tensors:
        flat = t.detach().reshape(-1).to(torch.float64).cpu()
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64)
        parts.append(torch.stack([flat.sum(), (flat * weights).sum()]))
    device = tensors[0].device if tensors else torch.device("cpu")
    low = torch.cat(parts).to(device)
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool(torch.equal(low, high))


def all_gather_object(obj: object) -> list[object]:
    """Every rank's ``obj`` (picklable, e.g. its RNG states), in rank order; ``[obj]`` in one process."""
    if not is_dist():
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s own random streams (augmentation, dropout, data-loading workers).

    Rank 0 keeps ``seed`` itself, so a single process draws exactly what it always drew; other ranks get a hash of
    ``(seed, rank)`` (``hash`` of a tuple of ints does not depend on ``PYTHONHASHSEED``).
    """
    return int(seed) if rank == 0 else hash((int(seed), int(rank))) & (2**63 - 1)


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from ``src`` to every rank (e.g. a run directory chosen by rank 0)."""
    if not is_dist():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]
