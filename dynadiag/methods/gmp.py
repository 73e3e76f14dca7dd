"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune"): dense to sparse on a cubic schedule.

Training starts dense. Every ``update_every`` optimizer steps between ``start_epoch`` and ``end_epoch`` each
masked layer prunes its smallest-magnitude active weights down to the scheduled sparsity

    s_t = s_f * (1 - (1 - (t - t_0) / (t_1 - t_0)) ** 3),

where ``s_f`` is the layer's final sparsity (uniform or ERK, see :mod:`dynadiag.methods.density`). Pruning is
monotone (a pruned weight never returns) and reaches ``s_f`` exactly at ``t_1``; the mask is fixed afterwards, so
the rest of training fine-tunes the sparse network. The cost is dense throughout (masking), as for every
mask-based baseline.
"""

from __future__ import annotations

import torch
from torch import nn

from dynadiag.distributed import all_reduce_mean
from dynadiag.methods.density import num_kept
from dynadiag.methods.masks import MaskedMethod, MaskSparsifyConfig, reset_optimizer_state_

__all__ = ["GMPMethod", "cubic_sparsity"]


def cubic_sparsity(done: int, start: int, end: int, final: float) -> float:
    """Zhu & Gupta's cubic schedule from 0 at ``start`` to ``final`` at ``end`` (steps done)."""
    if done <= start:
        return 0.0
    frac = min(1.0, (done - start) / max(1, end - start))
    return final * (1.0 - (1.0 - frac) ** 3)


class GMPMethod(MaskedMethod):
    """Gradual magnitude pruning from dense.

    Args:
        config: which layers are masked, the final overall sparsity, and the layer-wise density.
        start_epoch: epoch at which pruning starts (the model is dense until then).
        end_epoch: epoch at which the final sparsity is reached; ``None``: 75 % of the run.
        update_every: optimizer steps between pruning updates (Zhu & Gupta's ``delta t``).
        seed: seeds the (unused, all-ones) initial masks, as for every masked method.
    """

    name = "gmp"

    def __init__(
        self,
        config: MaskSparsifyConfig,
        start_epoch: float = 0.0,
        end_epoch: float | None = None,
        update_every: int = 100,
        seed: int = 0,
    ) -> None:
        super().__init__(config, seed=seed)
        if int(update_every) < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        self.start_epoch = float(start_epoch)
        self.end_epoch = None if end_epoch is None else float(end_epoch)
        self.update_every = int(update_every)
        self.start_step, self.end_step = 0, 1

    def bind(self, steps_per_epoch: int, total_steps: int) -> None:
        super().bind(steps_per_epoch, total_steps)
        self.start_step = self.epochs_to_steps(self.start_epoch)
        self.end_step = int(0.75 * self.total_steps) if self.end_epoch is None else self.epochs_to_steps(self.end_epoch)
        if not 0 <= self.start_step < self.end_step <= self.total_steps:
            raise ValueError(
                f"gmp needs 0 <= start_epoch < end_epoch <= the run's length; got start step {self.start_step}, "
                f"end step {self.end_step} of {self.total_steps}"
            )

    def initial_mask(self, module: nn.Module, density: float, generator: torch.Generator) -> torch.Tensor:
        return torch.ones_like(module.weight, dtype=torch.bool)

    def last_update(self, step: int) -> int:
        """Steps done at the latest pruning update up to (and including) step ``step``; 0 before the first."""
        done = step + 1
        if done >= self.end_step:
            return self.end_step
        if done <= self.start_step:
            return 0
        return self.start_step + (done - self.start_step) // self.update_every * self.update_every

    def target_sparsity(self, name: str, step: int | None = None) -> float:
        """Sparsity layer ``name`` has after the optimizer step ``step`` (the final target when ``None``).

        The cubic schedule evaluated at the latest update, so it is piecewise constant between updates.
        """
        final = 1.0 - self.densities[name]
        if step is None:
            return final
        return cubic_sparsity(self.last_update(step), self.start_step, self.end_step, final)

    def is_update_step(self, step: int) -> bool:
        done = step + 1
        if done <= self.start_step or done > self.end_step:
            return False
        return (done - self.start_step) % self.update_every == 0 or done == self.end_step

    @torch.no_grad()
    def update(self, step: int, optimizer: torch.optim.Optimizer | None) -> dict[str, float]:
        if not self.is_update_step(step):
            return {}
        pruned = 0
        for name, module in self.layers:
            mask = module.weight_mask
            keep = num_kept(mask.numel(), 1.0 - self.target_sparsity(name, step))
            active = int(mask.sum())
            if keep >= active:
                continue
            score = torch.where(mask, all_reduce_mean(module.weight.detach().abs()).float(), -1.0).flatten()
            new = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
            new[torch.topk(score, keep, sorted=False).indices] = True
            new = new.view_as(mask)
            reset_optimizer_state_(optimizer, module.weight, mask & ~new)
            mask.copy_(new)
            pruned += active - keep
        return {
            f"{self.name}/target_sparsity": cubic_sparsity(
                self.last_update(step), self.start_step, self.end_step, self.sparsity
            ),
            f"{self.name}/num_pruned": float(pruned),
        }
