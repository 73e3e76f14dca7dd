"""Learning-rate schedules as pure functions of the optimizer step (configured in epochs, converted once).

The trainer steps the scheduler once per optimizer step (after gradient accumulation, one step per update), so the
schedule's whole state is the step count and a resumed run lands on the same learning rate. Two kinds:

- :class:`LRSchedule`: warm-up then cosine/linear/constant, as a :class:`torch.optim.lr_scheduler.LambdaLR`;
- :class:`TimmLRSchedule`: any per-update schedule of timm's scheduler factory (``cosine``, ``tanh``, ``step``,
  ``multistep``, ``poly``, with timm's warm-up, cycles and noise options), stepped per update.

Both honour a parameter group's ``lr_scale`` (timm's layer-wise lr decay, ``optim.layer_decay``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["LRSchedule", "TimmLRSchedule", "build_lr_scheduler"]

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


#: timm schedules that are functions of the update count (``plateau`` needs a metric, not a step)
TIMM_KINDS = ("cosine", "tanh", "step", "multistep", "poly")


@dataclass
class TimmLRSchedule:
    """timm's scheduler factory (``timm.scheduler.create_scheduler_v2``), stepped once per optimizer step.

    Epoch-valued settings are converted to optimizer steps by timm (``step_on_epochs=False``), and the run's
    planned epochs are its ``num_epochs``.

    Attributes:
        sched: ``cosine``, ``tanh``, ``step``, ``multistep`` or ``poly``.
        warmup_epochs: linear warm-up from ``warmup_lr`` (timm counts it inside the decay unless
            ``kwargs={"warmup_prefix": True}``).
        warmup_lr: absolute learning rate at step 0 of the warm-up.
        min_lr: absolute floor of the decay.
        kwargs: other ``create_scheduler_v2`` arguments (``decay_epochs``, ``decay_milestones``, ``decay_rate``,
            ``cycle_limit``, ``cycle_mul``, ``cycle_decay``, ``k_decay``, ``noise``, ``warmup_prefix`` ...).
    """

    sched: str = "cosine"
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.sched not in TIMM_KINDS:
            raise ValueError(
                f"lr_schedule.sched must be one of {list(TIMM_KINDS)} (per-step schedules), got {self.sched!r}"
            )
        if self.warmup_epochs < 0:
            raise ValueError(f"lr_schedule.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        reserved = {"optimizer", "sched", "num_epochs", "step_on_epochs", "updates_per_epoch"} & set(self.kwargs)
        if reserved:
            raise ValueError(f"lr_schedule.kwargs cannot set {sorted(reserved)}: the trainer sets them")

    def build(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int, total_steps: int) -> _TimmPerStep:
        from timm.scheduler import create_scheduler_v2

        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=self.sched,
            num_epochs=max(1, round(total_steps / steps_per_epoch)),
            warmup_epochs=self.warmup_epochs,
            warmup_lr=self.warmup_lr,
            min_lr=self.min_lr,
            step_on_epochs=False,
            updates_per_epoch=steps_per_epoch,
            **self.kwargs,
        )
        return _TimmPerStep(scheduler)


class _TimmPerStep:
    """A timm scheduler behind the ``step()`` / ``state_dict()`` interface the trainer uses for ``LambdaLR``."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler, self.updates = scheduler, 0
        scheduler.step_update(0)

    def step(self) -> None:
        self.updates += 1
        self.scheduler.step_update(self.updates)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "timm": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["timm"])
        self.updates = int(state["updates"])
        self.scheduler.step_update(self.updates)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: LRSchedule | TimmLRSchedule,
    steps_per_epoch: int,
    total_steps: int,
) -> Any:
    """The per-step scheduler of ``schedule``; call ``.step()`` after every optimizer step.

    A parameter group's ``lr_scale`` (set by timm's ``create_optimizer_v2(..., layer_decay=...)``) multiplies its
    learning rate at every step, as timm's own schedulers do.
    """
    if isinstance(schedule, TimmLRSchedule):
        return schedule.build(optimizer, steps_per_epoch, total_steps)

    def group_lambda(scale: float):
        return lambda step: scale * schedule.factor(step, steps_per_epoch, total_steps)

    lambdas = [group_lambda(group.get("lr_scale", 1.0)) for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
