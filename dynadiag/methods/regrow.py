"""The prune/regrow loop shared by SET, RigL and SRigL: when to update, how much to drop, and the drop/grow step.

Schedule (Evci et al. 2020): an update after every ``delta_t`` optimizer steps while fewer than
``t_end * total_steps`` steps are done; the fraction of each layer's active weights dropped (and regrown) is
``drop_fraction`` decayed over ``[0, t_end * total_steps]`` (cosine by default:
``drop_fraction / 2 * (1 + cos(pi * t / t_end))``). Like the other schedules it is a pure function of the step.
``num_updates`` instead of ``delta_t`` spreads that many updates evenly over ``[0, t_end)`` whatever the run length,
so a short run gets as many topology updates as a long one (RigL's ``delta_t = 100`` was sized for ImageNet runs of
~32k steps: ~240 updates; a 440-step run would get 3).

An update, per layer: drop the ``n`` active weights with the smallest magnitude, then grow ``n`` inactive ones
(which may include weights just dropped) chosen by a method-specific score: random for SET, dense-gradient
magnitude for RigL. Newly activated weights start at zero and lose their optimizer state; a weight dropped and
regrown in the same update keeps its value and state (google-research/rigl's default, ``reinit_when_same=False``:
it was never inactive).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dynadiag.distributed import all_reduce_mean
from dynadiag.methods.masks import MaskedMethod, MaskSparsifyConfig, reset_optimizer_state_

__all__ = ["DECAYS", "DropGrowMethod", "RegrowSchedule", "drop_and_grow"]

DECAYS = ("cosine", "linear", "constant")
RESET_STATES = ("all", "momentum")


@dataclass
class RegrowSchedule:
    """When to prune/regrow and how much (the config group ``regrow/`` instantiates it).

    Attributes:
        delta_t: optimizer steps between updates (ignored when ``num_updates`` is set).
        drop_fraction: fraction of a layer's active weights replaced at the first update (RigL's alpha).
        t_end: fraction of the run after which the topology stays fixed.
        decay: how ``drop_fraction`` decays to 0 at ``t_end``: ``cosine``, ``linear`` or ``constant``.
        total_steps: length of the run in optimizer steps (set by the method's ``bind``).
        num_updates: if set, the number of updates before ``t_end`` whatever the run length, evenly spread: the k-th
            follows step ``ceil(k * t_end * total_steps / (num_updates + 1))`` (one per step if the run is shorter).
    """

    delta_t: int = 100
    drop_fraction: float = 0.3
    t_end: float = 0.75
    decay: str = "cosine"
    total_steps: int = 1
    num_updates: int | None = None

    def __post_init__(self) -> None:
        if self.decay not in DECAYS:
            raise ValueError(f"unknown drop-fraction decay '{self.decay}'; choose one of {list(DECAYS)}")
        if int(self.delta_t) < 1:
            raise ValueError(f"delta_t must be >= 1, got {self.delta_t}")
        if not 0.0 <= self.drop_fraction <= 1.0:
            raise ValueError(f"drop_fraction must be in [0, 1], got {self.drop_fraction}")
        if not 0.0 <= self.t_end <= 1.0:
            raise ValueError(f"t_end is a fraction of the run in [0, 1], got {self.t_end}")
        if self.num_updates is not None and int(self.num_updates) < 1:
            raise ValueError(f"num_updates must be >= 1 (or null to use delta_t), got {self.num_updates}")
        self.delta_t = int(self.delta_t)
        self.num_updates = None if self.num_updates is None else int(self.num_updates)

    @property
    def end_step(self) -> int:
        return int(self.t_end * self.total_steps)

    def is_update_step(self, step: int) -> bool:
        """Whether the mask changes after the optimizer step with 0-based index ``step``."""
        done, end = step + 1, self.end_step
        if done >= end:
            return False
        if self.num_updates is None:
            return done % self.delta_t == 0
        # the k-th update follows step ceil(k * end / (num_updates + 1)), k = 1..num_updates: evenly spread
        n = self.num_updates + 1
        return (done * n) // end > ((done - 1) * n) // end

    def fraction(self, step: int) -> float:
        """Drop fraction for an update after step ``step`` (0 once ``t_end`` is reached)."""
        done, end = step + 1, self.end_step
        if done >= end:
            return 0.0
        if self.decay == "constant":
            return self.drop_fraction
        if self.decay == "linear":
            return self.drop_fraction * (1.0 - done / end)
        return 0.5 * self.drop_fraction * (1.0 + math.cos(math.pi * done / end))


@torch.no_grad()
def drop_and_grow(
    mask: torch.Tensor, drop_score: torch.Tensor, grow_score: torch.Tensor, n_drop: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One prune/regrow step on a flat mask; the number of active entries is unchanged.

    Args:
        mask: current boolean mask, ``[N]``.
        drop_score: keep the active entries with the largest scores (e.g. ``|w|``), ``[N]``.
        grow_score: activate the non-kept entries with the largest scores (e.g. ``|grad|``), ``[N]``.
        n_drop: entries to drop (and grow).

    Returns:
        ``(new_mask, grown)``, boolean ``[N]``: the new mask and the grown entries (which may include entries
        just dropped; ``grown & ~mask`` are the new connections).
    """
    n_active = int(mask.sum())
    n_drop = max(0, min(int(n_drop), n_active))
    lowest = torch.finfo(torch.float32).min
    kept_score = torch.where(mask, drop_score.float().nan_to_num(0.0), lowest)
    keep = torch.topk(kept_score, n_active - n_drop, sorted=False).indices
    new_mask = torch.zeros_like(mask)
    new_mask[keep] = True
    # Kept entries must not be grown again; just-dropped ones may be (as in RigL).
    highest = torch.finfo(torch.float32).max
    candidates = torch.where(new_mask, lowest, grow_score.float().nan_to_num(0.0, posinf=highest))
    grown = torch.zeros_like(mask)
    grown[torch.topk(candidates, n_drop, sorted=False).indices] = True
    return new_mask | grown, grown


class DropGrowMethod(MaskedMethod):
    """A masked method that prunes by magnitude and regrows by :meth:`grow_score` on a :class:`RegrowSchedule`.

    Args:
        config: which layers are masked, how sparse, and the layer-wise density.
        schedule: when to update and how much to drop (default: RigL's, :class:`RegrowSchedule`'s defaults).
        seed: seeds the initial masks and random regrowth (the same on every rank).
        reset_state: optimizer state of changed weights to zero: ``"all"`` (RigL's ``reset_momentum``: every slot)
            or ``"momentum"`` (momentum / Adam's first moment only; the second moment is kept).
    """

    name = "drop_grow"

    def __init__(
        self,
        config: MaskSparsifyConfig,
        schedule: RegrowSchedule | None = None,
        seed: int = 0,
        reset_state: str = "all",
    ) -> None:
        super().__init__(config, seed=seed)
        if reset_state not in RESET_STATES:
            raise ValueError(f"unknown reset_state '{reset_state}'; choose one of {list(RESET_STATES)}")
        self.reset_state = reset_state
        self.schedule = schedule if schedule is not None else RegrowSchedule()
        #: per-layer grow scores captured from the dense gradients at an update step
        self._grow_scores: dict[str, torch.Tensor] = {}

    def bind(self, steps_per_epoch: int, total_steps: int) -> None:
        super().bind(steps_per_epoch, total_steps)
        self.schedule.total_steps = self.total_steps

    def grow_score(self, name: str, module: torch.nn.Module, step: int) -> torch.Tensor:
        """Score (shaped like the weight) of each inactive weight for regrowth; read in :meth:`capture`."""
        raise NotImplementedError

    def capture(self, step: int) -> None:
        if not self.schedule.is_update_step(step):
            return
        self._grow_scores = {
            name: self.grow_score(name, module, step) for name, module in self.layers if module.weight.grad is not None
        }

    def update_layer(
        self, name: str, module: torch.nn.Module, grow_score: torch.Tensor, fraction: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(new_mask, grown)`` for one layer, both shaped like the weight."""
        mask = module.weight_mask
        drop_score = all_reduce_mean(module.weight.detach().abs())
        n_drop = int(fraction * int(mask.sum()))
        new, grown = drop_and_grow(mask.flatten(), drop_score.flatten(), grow_score.flatten(), n_drop)
        return new.view_as(mask), grown.view_as(mask)

    @torch.no_grad()
    def update(self, step: int, optimizer: torch.optim.Optimizer | None) -> dict[str, float]:
        scores, self._grow_scores = self._grow_scores, {}
        if not self.schedule.is_update_step(step) or not scores:
            return {}
        fraction = self.schedule.fraction(step)
        regrown = changed = 0
        for name, module in self.layers:
            if name not in scores:
                continue
            old = module.weight_mask
            new, grown = self.update_layer(name, module, scores[name], fraction)
            # New connections start at zero and, like dropped ones, lose their optimizer state; one dropped and
            # regrown in the same update was never off, so it keeps both (RigL's reinit_when_same=False).
            born, died = new & ~old, old & ~new
            module.weight.masked_fill_(born | ~new, 0.0)
            reset_optimizer_state_(optimizer, module.weight, born | died, self.reset_state == "momentum")
            regrown += int(grown.sum())
            changed += int(born.sum())
            old.copy_(new)
        return {
            f"{self.name}/drop_fraction": fraction,
            f"{self.name}/num_regrown": float(regrown),
            f"{self.name}/num_new": float(changed),
        }
