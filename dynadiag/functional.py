"""Functional pieces of DynaDiag: the wrapped-diagonal index map, K, soft top-K and placement.

Notation: a linear layer ``y = x W^T + b`` with ``W`` of shape ``[out, in]``. There are ``P = max(in, out)``
candidate diagonals, each of length ``D = min(in, out)``. Diagonals wrap modulo the larger dimension:

- ``out >= in``: element ``t`` of diagonal ``p`` sits at ``W[(t + p) % out, t]``
- ``out <  in``: element ``t`` of diagonal ``p`` sits at ``W[t, (t + p) % in]``

The ``P`` diagonals partition ``W`` exactly, so keeping ``K`` of them gives density ``K / P``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "diag_dims",
    "diag_index",
    "num_active_diagonals",
    "place_diagonals",
    "soft_topk_weights",
    "validate_sparsity",
]


def diag_dims(in_features: int, out_features: int) -> tuple[int, int]:
    """Return ``(P, D)``: the number of candidate diagonals and the length of each."""
    return max(in_features, out_features), min(in_features, out_features)


def validate_sparsity(sparsity: float, where: str = "") -> float:
    """Check that ``sparsity`` lies in ``[0, 1)`` and return it as a float."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"{where}sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not 0.0 <= value < 1.0 or math.isnan(value):
        raise ValueError(f"{where}sparsity must be in [0, 1), got {sparsity!r}")
    return value


def num_active_diagonals(in_features: int, out_features: int, sparsity: float) -> int:
    """K for a target sparsity: ``max(1, ceil(int((1 - S) * in * out) / D))``, capped at ``P``."""
    sparsity = validate_sparsity(sparsity)
    num_diag, length = diag_dims(in_features, out_features)
    k = math.ceil(int((1.0 - sparsity) * in_features * out_features) / length)
    return min(num_diag, max(1, k))


def diag_index(
    in_features: int,
    out_features: int,
    offsets: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every element of the chosen diagonals.

    Args:
        in_features: columns of ``W``.
        out_features: rows of ``W``.
        offsets: diagonal ids ``p`` (``[K]`` int64); all ``P`` diagonals when ``None``.
        device: where to build the index tensors when ``offsets`` is ``None``.

    Returns:
        ``(rows, cols)``, each ``[K, D]`` int64, so that element ``t`` of diagonal ``offsets[k]`` is
        ``W[rows[k, t], cols[k, t]]``.
    """
    num_diag, length = diag_dims(in_features, out_features)
    if offsets is None:
        offsets = torch.arange(num_diag, device=device)
    t = torch.arange(length, device=offsets.device)
    shifted = (t[None, :] + offsets[:, None]) % num_diag  # [K, D]
    fixed = t[None, :].expand_as(shifted)
    if out_features >= in_features:
        return shifted, fixed
    return fixed, shifted


def place_diagonals(
    values: torch.Tensor,  # [K, D]
    offsets: torch.Tensor | None,  # [K]
    in_features: int,
    out_features: int,
) -> torch.Tensor:  # [out, in]
    """Scatter diagonal values into the dense ``[out, in]`` matrix (differentiable in ``values``)."""
    rows, cols = diag_index(in_features, out_features, offsets, device=values.device)
    flat = rows * in_features + cols  # [K, D]
    weight = values.new_zeros(out_features * in_features)
    # index_put with accumulate keeps the op differentiable; diagonals never overlap so it is a plain scatter.
    weight = weight.index_put((flat.reshape(-1),), values.reshape(-1), accumulate=True)
    return weight.view(out_features, in_features)


def gather_diagonals(weight: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:  # [K, D]
    """Read diagonals out of a dense ``[out, in]`` matrix (inverse of :func:`place_diagonals`)."""
    out_features, in_features = weight.shape
    rows, cols = diag_index(in_features, out_features, offsets, device=weight.device)
    return weight[rows, cols]


def soft_topk_weights(alpha: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """DynaDiag's soft top-K: ``clamp(k * softmax(alpha / T), 0, 1)``.

    Args:
        alpha: importance logits, ``[P]``.
        k: number of diagonals to keep.
        temperature: ``T > 0``; high T spreads the weight evenly, low T concentrates it.

    Returns:
        Per-diagonal weights in ``[0, 1]``, ``[P]``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # Softmax in at least fp32: half-precision logits lose the small differences that rank diagonals.
    logits = alpha.float() if alpha.element_size() < 4 else alpha
    probs = torch.softmax(logits / temperature, dim=0)
    return (k * probs).clamp(0.0, 1.0).to(alpha.dtype)
