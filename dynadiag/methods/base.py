"""The interface between the trainer and a sparse-training method (DynaDiag, RigL, SET, ...).

The trainer owns the step counter and calls these hooks in a fixed order every optimizer step::

    metrics |= method.on_step_start(step, model)                   # e.g. set the temperature
    loss.backward()
    metrics |= method.on_after_backward(step, model, optimizer)    # dense grads visible (RigL grows here)
    clip; optimizer.step(); lr_scheduler.step()
    metrics |= method.on_after_optimizer_step(step, model, optimizer)  # re-mask, freeze, prune/regrow

A method is built with plain values (Hydra config -> ``instantiate``), ``apply_``-ed to the model once before
the optimizer is created (at model build), then ``bind``-ed to the run length by the trainer: ``apply_`` must
not depend on the run length. Schedules are configured in epochs and converted to steps once, in ``bind``. All
topology state lives in module buffers/parameters or in ``state_dict()``, so a checkpoint restores it exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class SparseMethod:
    """Base class: the dense method (does nothing). Subclasses override the hooks they need."""

    name: str = "dense"
    #: the method's own target sparsity of the layers it sparsifies (0 for dense training)
    sparsity: float = 0.0

    def __init__(self) -> None:
        self.steps_per_epoch = 1
        self.total_steps = 1
        #: set to True by a hook that replaced parameters (freeze, regrow into new tensors); the trainer then
        #: rebuilds whatever wraps the model (DDP, torch.compile) and resets the flag.
        self.topology_changed = False

    def bind(self, steps_per_epoch: int, total_steps: int) -> None:
        """Tell the method how long the run is, so epoch-based schedules become step-based."""
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.total_steps = max(1, int(total_steps))

    def epochs_to_steps(self, epochs: float) -> int:
        """Convert an epoch count (may be fractional) to optimizer steps."""
        return round(float(epochs) * self.steps_per_epoch)

    def apply_(self, model: nn.Module) -> Any:
        """Make ``model`` sparse in place (swap layers, create masks). Returns a printable report or None."""
        return None

    def on_step_start(self, step: int, model: nn.Module) -> dict[str, float]:
        return {}

    def on_after_backward(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        return {}

    def on_after_optimizer_step(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, float]:
        return {}

    def will_freeze(self, step: int, model: nn.Module) -> bool:
        """Whether the step with 0-based index ``step`` ends with the hard freeze of the selection.

        The trainer asks before the step runs, so it can measure the accuracy just before and just after the
        freeze (the "freeze drop"). Methods without a freeze keep the default ``False``.
        """
        return False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
