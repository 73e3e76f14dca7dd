"""An exponential moving average of the weights that follows a sparse model's topology.

The average itself is timm's :class:`~timm.utils.ModelEmaV3` (a copy of the model whose floating-point state is
lerped towards the model's after each update, integer buffers such as ``offsets`` copied). Sparse methods replace
parameters while training: a candidate update gives ``V`` other rows (``[K', D]``, row ``i`` = diagonal
``candidate_offsets()[i]``), the freeze keeps ``K`` rows and turns ``alpha`` into a buffer. A plain EMA copy then no
longer matches the model. :meth:`SparseEMA.resync_` rebuilds the copy from the model's new structure and carries
the averages over: every diagonal present before and after keeps its averaged row (matched by diagonal offset, not
by row number), every other tensor of unchanged name and shape keeps its average, and new diagonals start from the
model's current values. The trainer calls it whenever the method reports a topology change.

Sparse DynaDiag's stable layout (``stable_params``) changes the diagonal a row holds in place (the ``slots`` buffer),
without a topology change: :meth:`SparseEMA.update` restarts such rows from the model's values before averaging, so
the result is the same as resyncing.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from dynadiag.conv import DiagConv2d
from dynadiag.layers import DiagLinear

__all__ = ["SparseEMA", "diagonal_rows"]

#: per-layer settings the method's schedules change on the live model (not state): copied before evaluating the EMA
RUNTIME_ATTRS = ("temperature", "hardness", "normalize")


def diagonal_rows(layer: DiagLinear | DiagConv2d) -> torch.Tensor:  # [rows of V] int64
    """The diagonal offset stored in each row of ``layer.V`` (``-1``: a free row of the stable layout)."""
    rows = layer.V.shape[0]
    if layer.is_frozen:
        return layer.offsets
    if getattr(layer, "slots", None) is not None:
        return layer.slots
    candidate_offsets = getattr(layer, "candidate_offsets", None)
    if candidate_offsets is not None and candidate_offsets().numel() == rows:
        return candidate_offsets()
    return torch.arange(rows, device=layer.V.device)  # all P diagonals, in order


def _diag_layers(model: nn.Module) -> dict[str, DiagLinear | DiagConv2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, DiagLinear | DiagConv2d)}


class SparseEMA:
    """EMA of ``model``'s weights (timm's ``ModelEmaV3``) that survives topology changes.

    Args:
        model: the (unwrapped) model being trained.
        decay: EMA decay per optimizer step, in ``(0, 1)``.
        warmup: timm's decay warm-up (``1 - (1 + step) ** -0.75`` until it reaches ``decay``): early steps average
            over a shorter horizon.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False) -> None:
        from timm.utils import ModelEmaV3

        if not 0.0 < decay < 1.0:
            raise ValueError(f"trainer.ema_decay must be in (0, 1) (0 turns the EMA off), got {decay}")
        self.ema = ModelEmaV3(model, decay=decay, use_warmup=warmup, warmup_power=0.75)
        self.ema.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        """The averaged model (in eval mode)."""
        return self.ema.module

    def update(self, model: nn.Module, step: int) -> None:
        """Average in the weights after optimizer step number ``step`` (1-based: the first update copies)."""
        self._restart_moved_rows_(model)
        self.ema.update(model, step=step)

    @torch.no_grad()
    def _restart_moved_rows_(self, model: nn.Module) -> None:
        """Rows of a stable-layout ``V`` that hold another diagonal than in the copy start from the model's values."""
        copies = _diag_layers(self.module)
        for name, layer in _diag_layers(model).items():
            twin = copies.get(name)
            slots, twin_slots = getattr(layer, "slots", None), getattr(twin, "slots", None)
            if slots is None or twin_slots is None or twin_slots.shape != slots.shape:
                continue
            moved = twin_slots != slots  # [R]
            twin.V[moved] = layer.V.detach()[moved].to(twin.V.dtype)

    @torch.no_grad()
    def resync_(self, model: nn.Module) -> None:
        """Take ``model``'s current structure, keeping the averages of everything that still exists."""
        old = self.module
        old_state = old.state_dict()
        old_rows = {name: diagonal_rows(layer) for name, layer in _diag_layers(old).items()}
        new = copy.deepcopy(model).eval().requires_grad_(False)
        new_rows = {name: diagonal_rows(layer) for name, layer in _diag_layers(new).items()}
        for key, value in new.state_dict().items():
            prefix, _, leaf = key.rpartition(".")
            previous = old_state.get(key)
            if previous is None or not value.is_floating_point():
                continue  # new tensors and integer/bool structure (offsets, candidates) come from the model
            if leaf == "V" and prefix in new_rows and prefix in old_rows:
                _carry_rows_(value, previous, new_rows[prefix], old_rows[prefix])
            elif previous.shape == value.shape:
                value.copy_(previous)
        self.ema.module = new

    def sync_runtime_(self, model: nn.Module) -> None:
        """Copy the schedules' per-layer settings (temperature, hardness) so a soft-phase EMA evaluates alike."""
        layers = _diag_layers(model)
        for name, layer in _diag_layers(self.module).items():
            source = layers.get(name)
            for attr in RUNTIME_ATTRS:
                if source is not None and hasattr(source, attr):
                    setattr(layer, attr, getattr(source, attr))
            if hasattr(layer, "_cache"):
                layer._cache = None  # candidate ids are cached from the ``candidates`` buffer, which the EMA copies

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state)


def _carry_rows_(new: torch.Tensor, old: torch.Tensor, new_rows: torch.Tensor, old_rows: torch.Tensor) -> None:
    """``new[i] = old[j]`` wherever ``new_rows[i] == old_rows[j]`` (the same diagonal); other rows stay as they are."""
    if old.shape[1:] != new.shape[1:]:
        return
    if new_rows.numel() == 0 or old_rows.numel() == 0:
        return
    size = 1 + max(int(new_rows.max()), int(old_rows.max()))
    where = torch.full((size + 1,), -1, dtype=torch.long, device=old.device)  # [size]: -1 (a free row) -> the extra
    held = torch.nonzero(old_rows >= 0).flatten().to(old.device)
    where[old_rows.to(old.device)[held]] = held
    where[size] = -1
    source = where[new_rows.to(old.device)]  # [rows of new]: row of old holding that diagonal, or -1
    kept = (source >= 0) & (new_rows.to(old.device) >= 0)
    new[kept.to(new.device)] = old[source[kept]].to(new.device)
