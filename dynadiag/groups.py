"""Grouped diagonals: candidate groups of ``g`` consecutive diagonal offsets, and fixed input permutations.

A grouped layer selects whole groups instead of single diagonals. With ``P`` candidate diagonals (see
:mod:`dynadiag.functional`) and group size ``g``:

- there are ``G = ceil(P / g)`` candidate groups; group ``j`` holds the offsets ``j*g, ..., min((j+1)*g, P) - 1``.
  When ``g`` does not divide ``P`` the **last group is short** (``P - (G-1)*g`` offsets). Groups never overlap and
  every offset is in exactly one group, so groups partition the diagonals and (through them) ``W``.
- ``K`` is the single-diagonal count for the target sparsity (:func:`dynadiag.functional.num_active_diagonals`);
  the layer keeps exactly ``Gk = min(G, ceil(K / g))`` groups. The kept diagonal count is ``Gk * g`` (capped at
  ``P``), minus ``g - size`` when the short last group is among the kept ones; the achieved sparsity is
  ``1 - kept / P`` (at or below the target: rounding up to whole groups never drops below ``K`` diagonals, except
  by the short group's deficit, which is below ``g``).
- a run of ``g`` consecutive offsets is a band of ``W``: for ``R`` consecutive outputs it touches ``R + g - 1``
  consecutive inputs (wrapping), i.e. a dense ``R x (R + g - 1)`` tile, which is what matrix units (AMX,
  tensor cores) and ``vdpbf16ps`` pairs need.

``g = 1`` is the ungrouped method (``G = P``, ``Gk = K``); every helper here is then the identity.

Permutations: features of a linear layer have no natural order, so a grouped layer may apply a fixed random
permutation to its inputs (``y = W_diag x[perm]``) so that bands do not always connect neighbouring features. The
permutation is drawn from a seed and the layer's name, so every layer gets its own and reruns get the same.

This module is the API other selection methods use: score diagonals, reduce the scores to groups
(:func:`group_scores`), select ``Gk`` groups, expand to diagonals (:func:`expand_group_weights`,
:func:`group_offsets`).
"""

from __future__ import annotations

import math
import zlib

import torch

from dynadiag.functional import diag_dims, num_active_diagonals

__all__ = [
    "diagonal_groups",
    "expand_group_weights",
    "group_offsets",
    "group_scores",
    "group_sizes",
    "input_permutation",
    "kept_diagonals",
    "num_active_groups",
    "num_groups",
    "offset_runs",
    "validate_group",
]


def validate_group(group: int, where: str = "") -> int:
    """Check that ``group`` is a positive integer and return it."""
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"{where}group must be a positive integer, got {group!r}")
    return group


def num_groups(num_diagonals: int, group: int) -> int:
    """``G = ceil(P / g)`` candidate groups (the last one short when ``g`` does not divide ``P``)."""
    return math.ceil(num_diagonals / validate_group(group))


def group_sizes(num_diagonals: int, group: int) -> torch.Tensor:  # [G] int64
    """Number of offsets in each group: ``g`` everywhere except a possibly short last group."""
    count = num_groups(num_diagonals, group)
    sizes = torch.full((count,), group, dtype=torch.long)
    sizes[-1] = num_diagonals - (count - 1) * group
    return sizes


def diagonal_groups(num_diagonals: int, group: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Group id of every diagonal, ``[P]`` int64: ``p // g``."""
    return torch.arange(num_diagonals, device=device) // validate_group(group)


def num_active_groups(in_features: int, out_features: int, sparsity: float, group: int) -> int:
    """``Gk = min(G, ceil(K / g))`` groups kept for a target sparsity (``K`` as for single diagonals)."""
    num_diag, _ = diag_dims(in_features, out_features)
    k = num_active_diagonals(in_features, out_features, sparsity)
    return min(num_groups(num_diag, group), math.ceil(k / validate_group(group)))


def kept_diagonals(num_diagonals: int, group: int, groups: torch.Tensor | int) -> int:
    """Diagonals kept by the group ids ``groups`` (``[Gk]``), or the upper bound ``min(P, Gk * g)`` for a count."""
    if isinstance(groups, int):
        return min(num_diagonals, groups * group)
    return int(group_sizes(num_diagonals, group).to(groups.device)[groups].sum())


def expand_group_weights(weights: torch.Tensor, num_diagonals: int, group: int) -> torch.Tensor:  # [G] -> [P]
    """Per-diagonal weights from per-group weights (each diagonal takes its group's weight); differentiable."""
    if group == 1:
        return weights
    return weights.repeat_interleave(group, dim=0)[:num_diagonals]


def group_scores(scores: torch.Tensor, group: int, reduce: str = "l2") -> torch.Tensor:  # [P, ...] -> [G, ...]
    """Reduce per-diagonal scores to per-group scores.

    Args:
        scores: ``[P, ...]`` per-diagonal scores (e.g. each diagonal's L2 norm).
        group: group size ``g``.
        reduce: ``"l2"`` (root of the sum of squares: the group's norm when ``scores`` are diagonal norms),
            ``"sum"`` or ``"mean"`` (a short last group is averaged over its own size).
    """
    if group == 1:
        return scores
    num_diag = scores.shape[0]
    index = diagonal_groups(num_diag, group, scores.device)
    count = num_groups(num_diag, group)
    values = scores.square() if reduce == "l2" else scores
    out = values.new_zeros(count, *scores.shape[1:]).index_add(0, index, values)
    if reduce == "l2":
        return out.sqrt()
    if reduce == "mean":
        sizes = group_sizes(num_diag, group).to(scores.device, scores.dtype)
        return out / sizes.reshape(-1, *([1] * (scores.dim() - 1)))
    if reduce == "sum":
        return out
    raise ValueError(f"group_scores: reduce must be 'l2', 'sum' or 'mean', got {reduce!r}")


def group_offsets(groups: torch.Tensor, num_diagonals: int, group: int) -> torch.Tensor:  # [Gk] -> [K]
    """Sorted diagonal offsets covered by the group ids ``groups`` (a short last group contributes its own size)."""
    groups = groups.to(torch.long).sort().values
    offsets = (groups[:, None] * group + torch.arange(group, device=groups.device)[None, :]).reshape(-1)
    return offsets[offsets < num_diagonals]


def offset_runs(offsets: torch.Tensor, max_len: int | None = None) -> list[tuple[int, int, int]]:
    """Split sorted offsets into maximal runs of consecutive values, each cut to at most ``max_len``.

    Returns:
        ``(first_index, first_offset, length)`` per run: ``offsets[first_index + i] == first_offset + i``.
        Works for any offset set (a ``g = 1`` layer gives mostly runs of length 1); grouped layers give runs of
        at least ``g`` (neighbouring kept groups merge).
    """
    values = offsets.tolist()
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[i - 1] + 1 or (max_len is not None and i - start >= max_len):
            runs.append((start, values[start], i - start))
            start = i
    return runs


def input_permutation(in_features: int, seed: int, name: str = "") -> torch.Tensor:  # [in] int64
    """A fixed random permutation of ``in_features`` inputs from ``seed`` and the layer name (stable across runs)."""
    generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return torch.randperm(in_features, generator=generator)
