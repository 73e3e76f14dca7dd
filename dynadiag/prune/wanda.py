"""Wanda (Sun et al., 2023, "A Simple and Effective Pruning Approach for Large Language Models").

Score ``S[i, j] = |W[i, j]| * ||X[:, j]||_2`` (the weight times the L2 norm of its input feature over the calibration
tokens); each output row keeps its highest-scoring weights, so every row ends with the same sparsity.
"""

from __future__ import annotations

import torch

from dynadiag.prune.calibration import InputStats

__all__ = ["per_row_mask", "row_pruned", "wanda_mask", "wanda_scores"]


def wanda_scores(weight: torch.Tensor, stats: InputStats) -> torch.Tensor:  # [out, in]
    """``|W| * ||X_j||_2`` broadcast over rows (float64 for exact ties across equal inputs)."""
    if stats.sum_sq.numel() != weight.shape[1]:
        raise ValueError(f"stats cover {stats.sum_sq.numel()} input features, weight has {weight.shape[1]}")
    return weight.detach().abs().to(torch.float64) * stats.norm.to(weight.device)[None, :]


def row_pruned(in_features: int, sparsity: float) -> int:
    """Weights pruned in each row: ``round(sparsity * in_features)``, at most ``in - 1``.

    The reference code truncates (``int``); rounding keeps small layers closest to the target sparsity.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return min(in_features - 1, round(sparsity * in_features))


def per_row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:  # [out, in] bool
    """Keep mask removing the ``row_pruned`` lowest scores of every row (stable: ties go to the lower index)."""
    pruned = row_pruned(scores.shape[1], sparsity)
    order = torch.sort(scores, dim=1, stable=True).indices  # [out, in]
    mask = torch.ones_like(scores, dtype=torch.bool)
    mask.scatter_(1, order[:, :pruned], False)
    return mask


def wanda_mask(weight: torch.Tensor, stats: InputStats, sparsity: float) -> torch.Tensor:  # [out, in] bool
    """Wanda's per-output-row keep mask (``True`` = kept)."""
    return per_row_mask(wanda_scores(weight, stats), sparsity)
