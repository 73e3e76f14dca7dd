"""Temperature schedules for DynaDiag's soft top-K, as pure functions of the optimizer step.

The trainer owns the step counter, so a resumed run needs only the step to restore the temperature.
Schedules are configured in epochs by the caller and converted to steps once (``steps_per_epoch``).
``per_epoch=True`` holds the value constant within an epoch, as the authors' reference code does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SCHEDULES", "TemperatureSchedule"]

SCHEDULES = ("constant", "linear", "cosine", "exponential", "step", "warmup_cosine", "cyclic")


@dataclass
class TemperatureSchedule:
    """Temperature ``T(step)`` annealed from ``t_max`` to ``t_min`` over ``[0, end_step]``.

    Attributes:
        kind: one of :data:`SCHEDULES`.
        t_max: starting (exploring) temperature.
        t_min: final (exploiting) temperature, reached at ``end_step`` and held afterwards.
        end_step: step at which ``t_min`` is reached (typically the freeze step).
        steps_per_epoch: used by ``per_epoch`` and to express ``warmup``/``step_size``/``cycles`` in epochs.
        per_epoch: evaluate at the start of each epoch only (piecewise constant within an epoch).
        warmup_epochs: ``warmup_cosine``: epochs held at ``t_max`` before the cosine decay.
        step_epochs: ``step``: epochs between decays by ``gamma``.
        gamma: ``step``: multiplicative decay per period.
        cycles: ``cyclic``: number of cosine cycles between ``t_max`` and ``t_min`` before ``end_step``.
    """

    kind: str = "cosine"
    t_max: float = 5.0
    t_min: float = 0.05
    end_step: int = 1
    steps_per_epoch: int = 1
    per_epoch: bool = False
    warmup_epochs: float = 0.0
    step_epochs: float = 1.0
    gamma: float = 0.5
    cycles: int = 2

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown temperature schedule '{self.kind}'; choose one of {list(SCHEDULES)}")
        if not 0 < self.t_min <= self.t_max:
            raise ValueError(f"temperatures need 0 < t_min <= t_max, got t_min={self.t_min}, t_max={self.t_max}")

    def __call__(self, step: int) -> float:
        if self.per_epoch:
            step = (step // self.steps_per_epoch) * self.steps_per_epoch
        end = max(1, self.end_step)
        frac = min(max(step / end, 0.0), 1.0)
        hi, lo = self.t_max, self.t_min
        if self.kind == "constant":
            return hi
        if self.kind == "linear":
            return hi + (lo - hi) * frac
        if self.kind == "cosine":
            return lo + 0.5 * (hi - lo) * (1.0 + math.cos(math.pi * frac))
        if self.kind == "exponential":
            return hi * (lo / hi) ** frac
        if self.kind == "step":
            period = max(1, round(self.step_epochs * self.steps_per_epoch))
            return max(lo, hi * self.gamma ** (min(step, end) // period))
        if self.kind == "warmup_cosine":
            warm = min(end, round(self.warmup_epochs * self.steps_per_epoch))
            if step < warm:
                return hi
            frac = min(1.0, (step - warm) / max(1, end - warm))
            return lo + 0.5 * (hi - lo) * (1.0 + math.cos(math.pi * frac))
        # cyclic: cosine cycles whose amplitude decays linearly, ending exactly at t_min.
        if frac >= 1.0:
            return lo
        phase = (frac * self.cycles) % 1.0
        peak = hi + (lo - hi) * math.floor(frac * self.cycles) / self.cycles
        return lo + 0.5 * (peak - lo) * (1.0 + math.cos(math.pi * phase))
