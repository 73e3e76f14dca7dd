"""RigL (Evci et al. 2020): drop the smallest-magnitude weights, regrow where the dense gradient is largest.

Defaults follow the paper: an update every ``delta_t = 100`` steps, drop fraction ``alpha = 0.3`` decayed by cosine,
no updates after ``t_end = 75 %`` of training, grown weights start at zero and their optimizer state is reset.
The dense gradient is free here: masked weights are stored (as zeros), so autograd computes their gradient too;
it is read in ``on_after_backward`` before the masked entries are zeroed.
"""

from __future__ import annotations

import torch
from torch import nn

from dynadiag.distributed import all_reduce_mean
from dynadiag.methods.regrow import DropGrowMethod

__all__ = ["RigLMethod"]


class RigLMethod(DropGrowMethod):
    """Rigging the Lottery. Takes the :class:`~dynadiag.methods.regrow.DropGrowMethod` arguments."""

    name = "rigl"

    def grow_score(self, name: str, module: nn.Module, step: int) -> torch.Tensor:
        # DDP has already averaged the gradients; averaging again is a no-op that also covers unsynchronised ones.
        return all_reduce_mean(module.weight.grad.detach()).abs()
