"""Layer-wise unstructured magnitude pruning: keep the largest ``|w|`` of each layer."""

from __future__ import annotations

import torch

__all__ = ["layer_mask", "magnitude_mask", "num_pruned"]


def num_pruned(numel: int, sparsity: float) -> int:
    """Weights a target ``sparsity`` removes from ``numel``: ``round(sparsity * numel)``, at most ``numel - 1``."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return min(numel - 1, round(sparsity * numel))


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:  # [out, in] bool
    """Keep mask (``True`` = kept) that removes the ``round(sparsity * numel)`` lowest ``scores`` of the layer.

    Exactly that many entries are pruned, ties broken by position (stable sort), so the achieved sparsity is exact.
    """
    flat = scores.detach().flatten()
    pruned = num_pruned(flat.numel(), sparsity)
    mask = torch.ones_like(flat, dtype=torch.bool)
    order = torch.sort(flat, stable=True).indices
    mask[order[:pruned]] = False
    return mask.view_as(scores)


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:  # [out, in] bool
    """Layer-wise magnitude pruning: remove the ``round(sparsity * numel)`` smallest ``|w|`` of the layer."""
    return layer_mask(weight.detach().abs(), sparsity)
