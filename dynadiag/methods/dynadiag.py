"""The DynaDiag method: soft top-K diagonal selection with an annealed temperature, then a hard freeze."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dynadiag.conv import DiagConv2d
from dynadiag.layers import DiagLinear
from dynadiag.methods.base import SparseMethod
from dynadiag.optim import remove_parameter_, replace_parameter_
from dynadiag.schedules import TemperatureSchedule
from dynadiag.sparsify import DiagSparsifyConfig, sparsify_
from dynadiag.sparsity import SparsifyReport

__all__ = ["DynaDiagMethod", "diagonal_layers", "freeze_all_"]


def diagonal_layers(model: nn.Module) -> list[DiagLinear | DiagConv2d]:
    return [m for m in model.modules() if isinstance(m, DiagLinear | DiagConv2d)]


def freeze_all_(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None, fold_soft_weights: bool = False
) -> int:
    """Freeze every diagonal layer of ``model``; keep ``optimizer`` in step. Returns how many were frozen.

    Each layer's ``V`` shrinks to its ``k`` kept rows: the optimizer's state (e.g. Adam moments) for those rows
    is carried over, and ``alpha`` leaves the optimizer. ``fold_soft_weights``: see ``DiagLinear.freeze_``.
    """
    count = 0
    for layer in diagonal_layers(model):
        if layer.is_frozen:
            continue
        old_v, old_alpha = layer.V, layer.alpha
        layer.freeze_(fold_soft_weights)
        if optimizer is not None:
            replace_parameter_(optimizer, old_v, layer.V, rows=layer.offsets)
            remove_parameter_(optimizer, old_alpha)
        count += 1
    return count


class DynaDiagMethod(SparseMethod):
    """Dynamic sparse training of diagonal layers (DynaDiag, ICML 2025).

    Args:
        sparsity: target sparsity of every converted layer.
        t_max: starting temperature (explore).
        t_min: temperature reached at the freeze point (exploit).
        temperature_schedule: one of :data:`dynadiag.schedules.SCHEDULES`.
        freeze_epoch: epoch after which every layer keeps exactly its top-``k`` diagonals.
        per_epoch: update the temperature once per epoch (the reference recipe) instead of every step.
        include: module-name globs to convert (``None``: the layers inside the blocks, :mod:`dynadiag.targets`).
        exclude: module-name globs to leave dense.
        backend: kernel backend for frozen layers.
        init: ``"kaiming"`` (from scratch) or ``"copy"`` (from the dense weights).
        convs: convert matching ``nn.Conv2d`` layers too.
        fold_soft_weights: at the freeze, scale each kept diagonal by its soft weight instead of jumping to weight
            1 (keeps the function continuous across the freeze; the paper's freeze is ``False``).
        group: select groups of this many consecutive diagonal offsets (:mod:`dynadiag.groups`); 1 = the paper.
        permute: fixed random input permutation per layer (seeded by ``permute_seed`` and the layer name).
        permute_seed: seed of the permutations.
    """

    name = "dynadiag"

    def __init__(
        self,
        sparsity: float,
        t_max: float = 5.0,
        t_min: float = 0.05,
        temperature_schedule: str = "cosine",
        freeze_epoch: float = 30,
        per_epoch: bool = True,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        backend: str = "auto",
        init: str = "kaiming",
        convs: bool = True,
        fold_soft_weights: bool = False,
        group: int = 1,
        permute: bool = False,
        permute_seed: int = 0,
        **schedule_kwargs: Any,
    ) -> None:
        super().__init__()
        self.fold_soft_weights = bool(fold_soft_weights)
        self.config = DiagSparsifyConfig(
            sparsity=sparsity,
            include=include,
            exclude=tuple(exclude),
            backend=backend,
            convs=convs,
            init=init,
            group=group,
            permute=permute,
            permute_seed=permute_seed,
        )
        if float(freeze_epoch) < 0:
            raise ValueError(f"freeze_epoch must be >= 0, got {freeze_epoch}")
        self.freeze_epoch = float(freeze_epoch)
        self.schedule = TemperatureSchedule(
            kind=temperature_schedule, t_max=t_max, t_min=t_min, per_epoch=per_epoch, **schedule_kwargs
        )
        self.freeze_step = 0

    def bind(self, steps_per_epoch: int, total_steps: int) -> None:
        super().bind(steps_per_epoch, total_steps)
        self.freeze_step = self.epochs_to_steps(self.freeze_epoch)
        if self.freeze_step > self.total_steps:
            epochs = self.total_steps / self.steps_per_epoch
            raise ValueError(
                f"freeze_epoch={self.freeze_epoch:g} is beyond the run ({epochs:g} epochs): "
                "lower sparsifier.freeze_epoch or train longer"
            )
        self.schedule.end_step = max(1, self.freeze_step)
        self.schedule.steps_per_epoch = self.steps_per_epoch

    def apply_(self, model: nn.Module) -> SparsifyReport:
        return sparsify_(model, self.config)

    def on_step_start(self, step: int, model: nn.Module) -> dict[str, float]:
        layers = diagonal_layers(model)
        if not layers or all(layer.is_frozen for layer in layers):
            return {}
        temperature = self.schedule(step)
        for layer in layers:
            layer.temperature = temperature
        return {"temperature": temperature}

    def will_freeze(self, step: int, model: nn.Module) -> bool:
        return step + 1 >= self.freeze_step and any(not layer.is_frozen for layer in diagonal_layers(model))

    def on_after_optimizer_step(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, float]:
        # ``step`` is the 0-based index of the step just taken, so ``step + 1`` steps are done.
        if step + 1 >= self.freeze_step and freeze_all_(model, optimizer, self.fold_soft_weights):
            self.topology_changed = True
            return {"frozen": 1.0}
        return {}
