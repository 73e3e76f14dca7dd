"""The DynaDiag method: soft top-K diagonal selection with an annealed temperature, then a hard freeze."""

from __future__ import annotations

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
        # rows of V the freeze keeps: the kept offsets for full [P, D] storage; a layer that stores fewer rows
        # (CandidateDiagLinear: the candidates only) says which of its rows
        rows = layer.freeze_rows() if hasattr(layer, "freeze_rows") else None
        layer.freeze_(fold_soft_weights)
        if optimizer is not None:
            replace_parameter_(optimizer, old_v, layer.V, rows=layer.offsets if rows is None else rows)
            remove_parameter_(optimizer, old_alpha)
        count += 1
    return count


class DynaDiagMethod(SparseMethod):
    """Dynamic sparse training of diagonal layers (DynaDiag, ICML 2025).

    Args:
        config: which layers become diagonal, at what sparsity, with which init and kernel backend.
        schedule: the temperature annealing; its end is the freeze point, after which every layer keeps exactly
            its top-``k`` diagonals (default: :class:`~dynadiag.schedules.TemperatureSchedule`'s defaults).
        fold_soft_weights: at the freeze, scale each kept diagonal by its soft weight instead of jumping to weight
            1 (keeps the function continuous across the freeze; the paper's freeze is ``False``).
    """

    name = "dynadiag"

    def __init__(
        self,
        config: DiagSparsifyConfig,
        schedule: TemperatureSchedule | None = None,
        fold_soft_weights: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.schedule = schedule if schedule is not None else TemperatureSchedule()
        self.fold_soft_weights = bool(fold_soft_weights)
        self.freeze_step = 0

    @property
    def sparsity(self) -> float:
        return self.config.sparsity

    def bind(self, steps_per_epoch: int, total_steps: int) -> None:
        super().bind(steps_per_epoch, total_steps)
        self.freeze_step = self.schedule.bind(self.steps_per_epoch, self.total_steps)

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
