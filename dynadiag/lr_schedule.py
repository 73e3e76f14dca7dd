"""Learning-rate schedules as pure functions of the optimizer step (configured in epochs, converted once).

The trainer steps a :class:`torch.optim.lr_scheduler.LambdaLR` once per optimizer step, so the schedule's
whole state is the step count and a resumed run lands on the same learning rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["LRSchedule", "build_lr_scheduler"]

KINDS = ("cosine", "linear", "constant")


@dataclass
class LRSchedule:
    """Linear warm-up from ``warmup_start_factor * lr`` to ``lr``, then decay to ``min_lr_factor * lr``.

    Attributes:
        kind: ``cosine``, ``linear`` or ``constant`` (the decay after warm-up).
        warmup_epochs: length of the linear warm-up (fractional epochs allowed).
        min_lr_factor: final learning rate as a fraction of the peak.
        warmup_start_factor: first learning rate as a fraction of the peak.
    """

    kind: str = "cosine"
    warmup_epochs: float = 0.0
    min_lr_factor: float = 0.0
    warmup_start_factor: float = 0.01

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown lr schedule '{self.kind}'; choose one of {list(KINDS)}")
        if self.warmup_epochs < 0:
            raise ValueError(f"lr_schedule.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if not 0.0 <= self.min_lr_factor <= 1.0:
            raise ValueError(f"lr_schedule.min_lr_factor must be in [0, 1], got {self.min_lr_factor}")

    def factor(self, step: int, steps_per_epoch: int, total_steps: int) -> float:
        """Multiplier of the peak learning rate at ``step`` (0-based)."""
        warmup = round(self.warmup_epochs * steps_per_epoch)
        if step < warmup:
            frac = step / max(1, warmup)
            return self.warmup_start_factor + (1.0 - self.warmup_start_factor) * frac
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if self.kind == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_factor + (1.0 - self.min_lr_factor) * shape


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, schedule: LRSchedule, steps_per_epoch: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following ``schedule``; call ``.step()`` after every optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: schedule.factor(step, steps_per_epoch, total_steps)
    )
