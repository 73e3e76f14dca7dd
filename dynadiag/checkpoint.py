"""Checkpoints as plain dicts, written atomically, with every RNG state needed for an exact resume.

A checkpoint holds: ``format_version``, ``model``, ``optimizer``, ``lr_scheduler``, ``scaler``, ``method``
(the sparse method's own state), ``step``, ``epoch``, ``best_metric``, ``rng`` (rank 0's generators; under DDP also
``rng_ranks``, every rank's, since each rank draws its own augmentation and dropout) and ``config`` (the resolved
run config as a plain dict, so ``eval.py`` can rebuild the model). The file is first written next to the
target and then renamed over it, so a crash or a full disk never leaves a half-written ``last.pt``.
"""

from __future__ import annotations

import os
import random
import tempfile
from typing import Any

import numpy as np
import torch

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "capture_rng_state",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "seed_rng_",
]

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "model", "step", "config")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, truncated, or from an incompatible format."""


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (when present) CUDA generator states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def seed_rng_(seed: int) -> None:
    """Seed the Python, NumPy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only if the checkpoint has them and CUDA is up)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> str:
    """Write ``state`` to ``path`` atomically (temp file in the same directory, fsync, rename).

    If writing fails (disk full, killed), the previous file at ``path`` stays intact and the temp file is
    removed.

    Returns:
        The path written.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    state = {"format_version": FORMAT_VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Accepts a ``.pt`` file or a run directory (then ``checkpoints/last.pt`` inside it).

    Raises:
        CheckpointError: the file is missing, unreadable/truncated, or lacks the required keys.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        candidate = os.path.join(path, "checkpoints", "last.pt")
        path = candidate if os.path.isfile(candidate) else os.path.join(path, "last.pt")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # weights_only=False: the checkpoint holds RNG states (numpy arrays, tuples) written by us.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a dynadiag checkpoint (needs keys {list(REQUIRED_KEYS)})")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {state['format_version']}, newer than this code ({FORMAT_VERSION})"
        )
    return state
