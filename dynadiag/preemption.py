"""Stop cleanly on SIGTERM / SIGUSR1: the trainer saves ``last.pt`` at the next step boundary and returns.

Slurm sends SIGTERM on ``scancel`` and on pre-emption (then SIGKILL after ``KillWait`` / ``GraceTime``), and a job
submitted with ``#SBATCH --signal=USR1@<seconds>`` gets SIGUSR1 that long before its time limit. The handlers only
record the signal; :meth:`StopSignals.requested` is polled once per optimizer step (an all-reduce under DDP, so every
rank stops after the same step even when the signal reaches the ranks at different times). The checkpoint is then an
ordinary step-boundary checkpoint, so ``resume=auto`` continues exactly as after ``trainer.ckpt_every_steps``.

Requeue: after SIGUSR1 in a plain ``sbatch`` job, rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` (the job restarts
in the same directory and resumes). Jobs launched by submitit (``hydra/launcher=slurm``) are left to submitit, which
requeues on its own signal (USR2, ``hydra.launcher.signal_delay_s`` before the limit) from the last checkpoint;
its USR2 handler is not touched. SIGTERM never requeues (``scancel`` means stop; Slurm requeues pre-empted jobs
itself when the partition says so).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from types import FrameType
from typing import Any

import torch

from dynadiag import distributed as dist_utils

__all__ = ["STOP_SIGNALS", "StopSignals", "requeue_slurm_job"]

#: signals that make the trainer checkpoint and stop
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """Context manager: while active, :data:`STOP_SIGNALS` are recorded instead of killing the process.

    Outside the main thread (where Python cannot install handlers) it records nothing. The previous handlers are
    restored on exit.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        #: the first stop signal received, or None
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def requested(self, device: torch.device | None = None) -> bool:
        """Whether any rank received a stop signal (every rank must call this at the same point of every step)."""
        return dist_utils.any_rank(self.received is not None, device)

    @property
    def name(self) -> str:
        """The received signal's name (``SIGTERM``), or ``"a signal on another rank"``."""
        return self.received.name if self.received is not None else "a signal on another rank"


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` this Slurm job from rank 0, unless submitit launched it or Slurm is absent.

    Returns:
        Whether the requeue was requested successfully.
    """
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    submitit = any(key.startswith("SUBMITIT_") for key in os.environ)
    if job is None or submitit or not dist_utils.is_main_process() or shutil.which("scontrol") is None:
        return False
    return subprocess.run(["scontrol", "requeue", job], check=False).returncode == 0
