"""SRigL (Lasby et al., ICLR 2024, "Dynamic Sparse Training with Structured Sparsity"): RigL with a constant fan-in.

Every active output neuron (row of ``W``, or output channel of a conv) keeps exactly ``k`` incoming weights, a
fine-grained structure that condenses to a dense ``[out, k]`` matrix plus indices. One update per layer:

1. **Saliency.** Run the unconstrained RigL step: the ``n_keep`` largest-magnitude active weights plus the
   ``n_drop`` largest dense-gradient inactive ones are *salient*.
2. **Neuron ablation.** A neuron with fewer than ``max(1, gamma_sal * k0)`` salient weights is ablated (all its
   weights masked), where ``k0`` is the layer's fan-in without ablation; at least ``ceil(nnz / fan_in)``
   neurons stay active so the budget fits. The classifier head is never ablated (its neurons are classes).
3. **Constant fan-in.** With ``n`` active neurons the fan-in is ``k = nnz_target // n``. Each active neuron keeps
   its largest-magnitude weights among the RigL keep set (at most ``k``) and grows the largest-gradient
   inactive ones until it has exactly ``k``. Grown weights start at zero, changed weights lose optimizer state.

Ablated neurons can come back at a later update if their gradients make them salient again. The number of
non-zeros is ``k * n``, at most ``n - 1`` below the layer's budget.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dynadiag.distributed import all_reduce_mean
from dynadiag.methods.density import num_kept
from dynadiag.methods.masks import MaskSparsifyConfig
from dynadiag.methods.regrow import DropGrowMethod, RegrowSchedule, drop_and_grow
from dynadiag.targets import first_and_head

__all__ = ["SRigLMethod", "constant_fan_in_update"]


@torch.no_grad()
def constant_fan_in_update(
    mask: torch.Tensor,
    weight_score: torch.Tensor,
    grad_score: torch.Tensor,
    n_drop: int,
    n_target: int,
    gamma_sal: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SRigL step on a ``[out, fan_in]`` mask.

    Args:
        mask: current boolean mask, ``[out, fan_in]``.
        weight_score: ``|w|``, ``[out, fan_in]``.
        grad_score: ``|dense grad|``, ``[out, fan_in]``.
        n_drop: weights the unconstrained RigL step would replace.
        n_target: the layer's non-zero budget.
        gamma_sal: ablate neurons with fewer than ``gamma_sal * k0`` salient weights; ``None`` disables ablation.

    Returns:
        ``(new_mask, grown)``, boolean ``[out, fan_in]``.
    """
    out, fan_in = mask.shape
    lowest = torch.finfo(torch.float32).min
    # 1. saliency: RigL's unconstrained keep + grow sets.
    salient, _ = drop_and_grow(mask.flatten(), weight_score.flatten(), grad_score.flatten(), n_drop)
    salient = salient.view(out, fan_in)
    # 2. ablation: neurons with too few salient weights switch off, but enough stay on to hold the budget.
    active = torch.ones(out, dtype=torch.bool, device=mask.device)
    if gamma_sal is not None:
        counts = salient.sum(dim=1)  # [out]
        k0 = min(fan_in, max(1, n_target // out))
        active = counts >= max(1, int(gamma_sal * k0))
        min_active = min(out, math.ceil(n_target / fan_in))
        if int(active.sum()) < min_active:
            order = torch.sort(counts, descending=True, stable=True).indices
            active = torch.zeros_like(active)
            active[order[:min_active]] = True
    n_active = int(active.sum())
    k = min(fan_in, max(1, n_target // n_active))
    # 3a. keep: each active neuron keeps its largest RigL-kept weights, at most k.
    kept = mask & salient & active[:, None]
    kept_score = torch.where(kept, weight_score.float(), lowest)
    top_values, top_index = kept_score.topk(k, dim=1)  # [out, k]
    new_kept = torch.zeros_like(mask).scatter_(1, top_index, top_values > lowest)
    # 3b. grow: fill every active neuron up to exactly k by gradient magnitude.
    need = torch.where(active, k - new_kept.sum(dim=1), 0)  # [out]
    grow_score = torch.where(new_kept, lowest, grad_score.float().nan_to_num(0.0))
    order = grow_score.argsort(dim=1, descending=True, stable=True)  # [out, fan_in]
    take = torch.arange(fan_in, device=mask.device)[None, :] < need[:, None]  # [out, fan_in]
    grown = torch.zeros_like(mask).scatter_(1, order, take)
    return new_kept | grown, grown


class SRigLMethod(DropGrowMethod):
    """Structured RigL: constant fan-in with dynamic neuron ablation.

    Args:
        config: which layers are masked, how sparse, and the layer-wise density.
        schedule: when to update and how much to drop (default: RigL's).
        gamma_sal: minimum fraction of a neuron's fan-in that must be salient for it to stay active
            (the paper's gamma_sal, 0.3); ``None`` or ``0`` disables ablation.
        seed: seeds the initial masks (the same on every rank).
        reset_state: optimizer state of changed weights to zero, ``"all"`` or ``"momentum"`` (see
            :class:`~dynadiag.methods.regrow.DropGrowMethod`).
    """

    name = "srigl"

    def __init__(
        self,
        config: MaskSparsifyConfig,
        schedule: RegrowSchedule | None = None,
        gamma_sal: float | None = 0.3,
        seed: int = 0,
        reset_state: str = "all",
    ) -> None:
        super().__init__(config, schedule, seed=seed, reset_state=reset_state)
        if gamma_sal is not None and not 0.0 <= float(gamma_sal) <= 1.0:
            raise ValueError(f"gamma_sal must be in [0, 1], got {gamma_sal}")
        self.gamma_sal = float(gamma_sal) if gamma_sal else None
        self._head: str | None = None

    def apply_(self, model: nn.Module):  # -> MaskReport
        self._head = first_and_head(model)[1]
        return super().apply_(model)

    def initial_mask(self, module: nn.Module, density: float, generator: torch.Generator) -> torch.Tensor:
        """A random mask with the same fan-in ``num_kept // out`` in every output neuron."""
        weight = module.weight
        out, fan_in = weight.shape[0], weight[0].numel()
        k = min(fan_in, max(1, num_kept(weight.numel(), density) // out))
        index = torch.rand(out, fan_in, generator=generator).topk(k, dim=1).indices
        mask = torch.zeros(out, fan_in, dtype=torch.bool).scatter_(1, index, True)
        return mask.view_as(weight).to(weight.device)

    def grow_score(self, name: str, module: nn.Module, step: int) -> torch.Tensor:
        return all_reduce_mean(module.weight.grad.detach()).abs()

    def update_layer(
        self, name: str, module: nn.Module, grow_score: torch.Tensor, fraction: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mask = module.weight_mask
        out = mask.shape[0]
        weight_score = all_reduce_mean(module.weight.detach().abs())
        n_drop = int(fraction * int(mask.sum()))
        n_target = num_kept(mask.numel(), self.densities[name])
        gamma = None if name == self._head else self.gamma_sal
        new, grown = constant_fan_in_update(
            mask.view(out, -1), weight_score.view(out, -1), grow_score.view(out, -1), n_drop, n_target, gamma
        )
        return new.view_as(mask), grown.view_as(mask)

    def update(self, step: int, optimizer: torch.optim.Optimizer | None) -> dict[str, float]:
        metrics = super().update(step, optimizer)
        if metrics:
            ablated = sum(int((~m.weight_mask.view(m.weight.shape[0], -1).any(dim=1)).sum()) for _, m in self.layers)
            metrics[f"{self.name}/ablated_neurons"] = float(ablated)
        return metrics
