"""SET (Mocanu et al. 2018): drop the smallest-magnitude weights, regrow the same number at random positions."""

from __future__ import annotations

import torch
from torch import nn

from dynadiag.methods.regrow import DropGrowMethod

__all__ = ["SETMethod"]


class SETMethod(DropGrowMethod):
    """Sparse Evolutionary Training on the shared prune/regrow schedule (:class:`~.regrow.RegrowSchedule`).

    Random regrowth draws from a generator seeded by ``(seed, step, layer)``, so every DDP rank makes the same choice
    and a resumed run repeats it. Takes the :class:`~dynadiag.methods.regrow.DropGrowMethod` arguments.
    """

    name = "set"

    def grow_score(self, name: str, module: nn.Module, step: int) -> torch.Tensor:
        generator = self.generator(step, [n for n, _ in self.layers].index(name))
        weight = module.weight
        return torch.rand(weight.shape, generator=generator).to(weight.device)
