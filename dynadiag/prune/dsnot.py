"""DSnoT: "Dynamic Sparse No Training" (Zhang et al., ICLR 2024), for one linear layer.

Starting from a pruned keep mask (magnitude or Wanda), DSnoT swaps one pruned weight back in and one kept weight
out per output row and cycle, without any gradient step, to shrink the row's *expected reconstruction error*

    eps_i = E[y_dense_i - y_sparse_i] = sum over pruned j of W[i, j] * E[x_j]

(``g[i, j] = W[i, j] * E[x_j]`` is the expected change of output ``i`` when weight ``(i, j)`` is removed). Per
cycle and row, following the paper and the official code (github.com/zyxxmu/DSnoT, ``prune_DSnoT``):

- **grow** the pruned weight with the largest ``sign(eps_i) * g[i, j] / Var(x_j)^var_power`` among those with
  ``sign(eps_i) * g[i, j] > 0`` (it moves ``eps_i`` toward zero, and a low input variance makes that reliable);
- **prune** the kept weight with the smallest Wanda score ``|W[i, j]| * ||X_j||_2`` among those with
  ``sign(eps_i) * g[i, j] < 0`` (removing it also moves ``eps_i`` toward zero, at the least Wanda cost);
- accept the swap only while ``|eps_i| > update_threshold``, the error keeps its initial sign (``same_sign``) and
  ``|eps_i|`` strictly decreases; a row whose swap is rejected stops for good (as in the official code);
- every weight moves at most once (the official code walks two sorted lists with pointers, which has the same
  effect), and at most ``max_cycles`` swaps happen per row.

One swap adds one weight and removes one, so the number of kept weights of every row, and the sparsity, is exact.
Difference from the official code: it walks *static* lists sorted once, so after a few swaps its candidate may no
longer move the error the right way; here candidates are re-chosen each cycle among the still-valid ones, and the
explicit ``|eps|`` decrease check makes the optimised error provably non-increasing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynadiag.prune.calibration import InputStats

__all__ = ["DSnoTResult", "dsnot_mask", "expected_error"]


@dataclass
class DSnoTResult:
    """Outcome for one layer.

    Attributes:
        mask: refined keep mask ``[out, in]`` (``True`` = kept).
        error_before: ``|eps|`` per row for the initial mask, ``[out]``.
        error_after: ``|eps|`` per row for the refined mask, ``[out]``.
        swaps: accepted swaps over all rows.
        cycles: cycles run (``<= max_cycles``).
    """

    mask: torch.Tensor
    error_before: torch.Tensor
    error_after: torch.Tensor
    swaps: int
    cycles: int


def expected_error(weight: torch.Tensor, mask: torch.Tensor, stats: InputStats) -> torch.Tensor:  # [out]
    """Signed expected reconstruction error per row: ``sum_{j pruned} W[i, j] * E[x_j]``."""
    g = weight.detach().to(torch.float64) * stats.mean.to(weight.device)[None, :]
    return (g * (~mask)).sum(1)


@torch.no_grad()
def dsnot_mask(
    weight: torch.Tensor,
    mask: torch.Tensor,
    stats: InputStats,
    *,
    max_cycles: int = 50,
    update_threshold: float = 0.0,
    var_power: float = 1.0,
    same_sign: bool = True,
) -> DSnoTResult:
    """Refine the keep ``mask`` of ``weight`` (``[out, in]``) with DSnoT; ``weight`` is not modified.

    Args:
        weight: dense weight ``[out, in]``.
        mask: initial keep mask ``[out, in]`` bool, e.g. from :func:`~dynadiag.prune.wanda.wanda_mask`.
        stats: the layer's calibration input statistics.
        max_cycles: at most this many swaps per row (the paper's T; official default 50).
        update_threshold: rows with ``|eps_i|`` at or below this stop (absolute, in the units of ``y``).
        var_power: exponent of the input variance in the growing score (official default 1).
        same_sign: reject swaps that flip the sign of ``eps_i`` (the paper's criterion).
    """
    if mask.shape != weight.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor shaped like the weight {tuple(weight.shape)}")
    device = weight.device
    w = weight.detach().to(torch.float64)
    g = w * stats.mean.to(device)[None, :]  # [out, in]
    grow_score = g / stats.var.to(device).clamp_min(1e-12).pow(var_power)[None, :]
    wanda = w.abs() * stats.norm.to(device)[None, :]
    mask = mask.clone()
    touched = torch.zeros_like(mask)
    eps = (g * (~mask)).sum(1)  # [out]
    error_before = eps.abs()
    initial_sign = torch.sign(eps)
    active = eps.abs() > update_threshold
    rows = torch.arange(w.shape[0], device=device)
    swaps = cycles = 0
    while cycles < max_cycles and bool(active.any()):
        cycles += 1
        s = torch.sign(eps)[:, None]  # [out, 1]
        grow_ok = ~mask & ~touched & (s * g > 0)
        prune_ok = mask & ~touched & (s * g < 0)
        grow_j = torch.where(grow_ok, s * grow_score, -torch.inf).argmax(1)  # [out]
        prune_j = torch.where(prune_ok, wanda, torch.inf).argmin(1)  # [out]
        eps_after = eps - g[rows, grow_j] + g[rows, prune_j]
        accept = active & grow_ok.any(1) & prune_ok.any(1) & (eps_after.abs() < eps.abs())
        if same_sign:
            accept &= torch.sign(eps_after) == initial_sign
        r = rows[accept]
        mask[r, grow_j[accept]] = True
        mask[r, prune_j[accept]] = False
        touched[r, grow_j[accept]] = True
        touched[r, prune_j[accept]] = True
        eps = torch.where(accept, eps_after, eps)
        swaps += int(accept.sum())
        active = accept & (eps.abs() > update_threshold)
    return DSnoTResult(mask, error_before, eps.abs(), swaps, cycles)
