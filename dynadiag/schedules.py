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
    """Temperature ``T(step)`` annealed from ``t_max`` to ``t_min`` over ``[0, end_step]``, ending at the freeze.

    The config group ``schedule/`` instantiates this class; :meth:`bind` lays it over a run. The end of the
    annealing is DynaDiag's freeze point (``freeze_epoch``, else ``freeze_fraction`` of the planned epochs).

    Attributes:
        kind: one of :data:`SCHEDULES`.
        t_max: starting (exploring) temperature.
        t_min: final (exploiting) temperature, reached at ``end_step`` and held afterwards.
        per_epoch: evaluate at the start of each epoch only (piecewise constant within an epoch).
        freeze_fraction: the freeze (and ``t_min``) after this fraction of the planned epochs ...
        freeze_epoch: ... or after this epoch, when set (may be fractional; 0 freezes after the first step).
        warmup_epochs: ``warmup_cosine``: epochs held at ``t_max`` before the cosine decay.
        step_epochs: ``step``: epochs between decays by ``gamma``.
        gamma: ``step``: multiplicative decay per period.
        cycles: ``cyclic``: number of cosine cycles between ``t_max`` and ``t_min`` before ``end_step``.
        end_step: step at which ``t_min`` is reached (set by :meth:`bind`, or directly).
        steps_per_epoch: used by ``per_epoch`` and to express ``warmup``/``step_size``/``cycles`` in epochs.
    """

    kind: str = "cosine"
    t_max: float = 5.0
    t_min: float = 0.05
    per_epoch: bool = False
    freeze_fraction: float = 0.2
    freeze_epoch: float | None = None
    warmup_epochs: float = 0.0
    step_epochs: float = 1.0
    gamma: float = 0.5
    cycles: int = 2
    end_step: int = 1
    steps_per_epoch: int = 1

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown temperature schedule '{self.kind}'; choose one of {list(SCHEDULES)}")
        if not 0 < self.t_min <= self.t_max:
            raise ValueError(f"temperatures need 0 < t_min <= t_max, got t_min={self.t_min}, t_max={self.t_max}")
        if self.freeze_fraction < 0:
            raise ValueError(f"schedule.freeze_fraction must be >= 0, got {self.freeze_fraction}")
        if self.freeze_epoch is not None and float(self.freeze_epoch) < 0:
            raise ValueError(f"schedule.freeze_epoch must be >= 0, got {self.freeze_epoch}")

    def bind(self, steps_per_epoch: int, total_steps: int) -> int:
        """Lay the schedule over a run of ``total_steps`` planned steps; returns the freeze step.

        Raises:
            ValueError: the freeze point lies beyond the run.
        """
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        epochs = total_steps / self.steps_per_epoch
        freeze_epoch = epochs * self.freeze_fraction if self.freeze_epoch is None else float(self.freeze_epoch)
        freeze_step = round(freeze_epoch * self.steps_per_epoch)
        if freeze_step > total_steps:
            raise ValueError(
                f"freeze_epoch={freeze_epoch:g} is beyond the run ({epochs:g} epochs): "
                "lower schedule.freeze_epoch (or schedule.freeze_fraction) or train longer"
            )
        self.end_step = max(1, freeze_step)
        return freeze_step

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
