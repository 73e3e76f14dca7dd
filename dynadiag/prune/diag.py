"""Dense-to-diagonal conversion: keep, in each linear layer, the K wrapped diagonals that carry the most energy.

A weight's Wanda score is ``|W[i, j]| * ||X_j||``; its square ``W[i, j]^2 * E[x_j^2]`` is the mean squared output
it contributes when inputs are uncorrelated. The *activation-weighted energy* of diagonal ``p`` sums that over the
diagonal's entries; the layer keeps the ``K`` diagonals with the largest energy (same ``K`` as DynaDiag for the
target sparsity) through :meth:`DiagLinear.from_linear` with ``freeze=True``, so the result runs on the diagonal
kernels directly. ``score="magnitude"`` drops the activations (plain ``sum W^2`` per diagonal) and ``"wanda"``
sums the unsquared Wanda scores.
"""

from __future__ import annotations

import torch
from torch import nn

from dynadiag import functional as DF
from dynadiag.layers import DiagLinear
from dynadiag.prune.calibration import InputStats

__all__ = ["DIAG_SCORES", "diag_scores", "linear_to_diag"]

DIAG_SCORES = ("energy", "wanda", "magnitude")


def diag_scores(weight: torch.Tensor, stats: InputStats | None, score: str = "energy") -> torch.Tensor:  # [P]
    """Importance of each of the ``P`` wrapped diagonals of ``weight`` (``[out, in]``).

    Args:
        weight: dense weight.
        stats: calibration statistics of the layer input (unused for ``"magnitude"``).
        score: ``"energy"`` (``sum W^2 E[x^2]``), ``"wanda"`` (``sum |W| ||x||``) or ``"magnitude"`` (``sum W^2``).
    """
    if score not in DIAG_SCORES:
        raise ValueError(f"unknown diagonal score '{score}'; choose one of {list(DIAG_SCORES)}")
    w = weight.detach().to(torch.float64)
    if score == "magnitude":
        per_entry = w.square()
    else:
        if stats is None:
            raise ValueError(f"diagonal score '{score}' needs calibration statistics")
        if score == "energy":
            per_entry = w.square() * stats.mean_sq.to(w.device)[None, :]
        else:
            per_entry = w.abs() * stats.norm.to(w.device)[None, :]
    return DF.gather_diagonals(per_entry).sum(1)  # [P, D] -> [P]


@torch.no_grad()
def linear_to_diag(
    linear: nn.Linear,
    sparsity: float,
    stats: InputStats | None,
    *,
    score: str = "energy",
    backend: str = "auto",
) -> DiagLinear:
    """A frozen :class:`DiagLinear` holding ``linear``'s ``K`` highest-scoring diagonals (values copied)."""
    scores = diag_scores(linear.weight, stats, score).to(linear.weight.dtype)
    return DiagLinear.from_linear(linear, sparsity, backend=backend, scores=scores, freeze=True)
