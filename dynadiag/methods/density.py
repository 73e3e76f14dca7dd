"""Layer-wise density allocation for mask-based sparse methods: ``uniform`` and ``erk`` (Erdos-Renyi-Kernel).

Given the weight shapes of the layers a method sparsifies and an overall density ``d = 1 - sparsity``, return
one density per layer such that the layers together keep (up to rounding) ``d`` of their weights.

- ``uniform``: every layer keeps ``d`` (the paper's setting for DynaDiag, and the default here).
- ``erk`` (Evci et al. 2020, after Mocanu et al. 2018): layer ``l`` keeps ``eps * (sum of its dims / product of its
  dims) ** power``, so small and thin layers stay denser; ``eps`` is solved so the total matches ``d``. A layer
  whose ERK density would exceed 1 is made dense and ``eps`` is solved again for the rest (RigL's procedure).

Which layers take part (the first layer, the classifier head) is decided by the caller; see
:class:`dynadiag.methods.masks.MaskedMethod`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

__all__ = ["DISTRIBUTIONS", "layer_densities", "num_kept"]

DISTRIBUTIONS = ("uniform", "erk")


def num_kept(numel: int, density: float) -> int:
    """Weights a layer of ``numel`` elements keeps at ``density``: ``round(density * numel)``, at least 1."""
    return min(numel, max(1, round(density * numel)))


def layer_densities(
    shapes: Mapping[str, Sequence[int]],
    density: float,
    distribution: str = "uniform",
    dense: Collection[str] = (),
    erk_power_scale: float = 1.0,
) -> dict[str, float]:
    """Per-layer densities for an overall ``density``.

    Args:
        shapes: layer name -> weight shape (``[out, in]`` for a linear layer, ``[out, in, kh, kw]`` for a conv).
        density: overall fraction of weights kept over all layers, in ``(0, 1]``.
        distribution: ``"uniform"`` or ``"erk"``.
        dense: layers forced dense (density 1); their weights count toward the budget (ERK only).
        erk_power_scale: exponent on the ERK score (1.0 is ERK; 0.0 degenerates to uniform).

    Returns:
        Layer name -> density in ``(0, 1]``.

    Raises:
        ValueError: unknown distribution, density out of range, or a budget the dense layers already exceed.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown density distribution '{distribution}'; choose one of {list(DISTRIBUTIONS)}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    unknown = set(dense) - set(shapes)
    if unknown:
        raise ValueError(f"dense layers {sorted(unknown)} are not among the sparsified layers")
    if distribution == "uniform":
        return {name: (1.0 if name in dense else density) for name in shapes}

    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: (sum(shape) / numel[name]) ** erk_power_scale for name, shape in shapes.items()}
    forced = set(dense)
    while True:
        # Solve eps * sum_l raw_l * n_l = budget - sum_{dense} n_l over the layers that are still sparse.
        budget = density * sum(numel.values()) - sum(numel[name] for name in forced)
        free = [name for name in shapes if name not in forced]
        if not free:
            break
        divisor = sum(raw[name] * numel[name] for name in free)
        if budget <= 0:
            raise ValueError(f"density {density} is too low: the dense layers {sorted(forced)} alone exceed it")
        eps = budget / divisor
        top = max(raw[name] for name in free)
        if eps * top <= 1.0:
            break
        # The thinnest layers would need density > 1: make them dense and re-solve for the rest.
        forced |= {name for name in free if raw[name] == top}
    return {name: (1.0 if name in forced else eps * raw[name]) for name in shapes}
