"""One-shot pruning of a trained dense model: magnitude, Wanda, DSnoT, or dense-to-diagonal conversion.

``prune_model_(model, PruneConfig(method="wanda", sparsity=0.9), batches)`` edits the model in place:
unstructured methods zero the pruned weights of every target ``nn.Linear`` and store the keep mask as its
``weight_mask`` buffer (see :mod:`dynadiag.prune.masking`); ``diag`` replaces each target by a frozen
:class:`~dynadiag.DiagLinear`. Data-aware methods calibrate block by block on ``batches``
(:func:`~dynadiag.prune.calibration.prune_layerwise_`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from dynadiag.prune.calibration import InputStats, prune_layerwise_
from dynadiag.prune.diag import DIAG_SCORES, linear_to_diag
from dynadiag.prune.dsnot import dsnot_mask
from dynadiag.prune.magnitude import layer_mask, magnitude_mask
from dynadiag.prune.masking import target_linears
from dynadiag.prune.wanda import per_row_mask, wanda_mask, wanda_scores
from dynadiag.sparsity import apply_mask_, layer_report
from dynadiag.targets import replace_module_

__all__ = ["PRUNE_METHODS", "LayerPruneReport", "PruneConfig", "PruneReport", "prune_model_"]

PRUNE_METHODS = ("magnitude", "wanda", "dsnot", "diag")


@dataclass
class PruneConfig:
    """What to prune and how.

    Attributes:
        method: ``magnitude`` | ``wanda`` | ``dsnot`` | ``diag``.
        sparsity: target sparsity of every target layer, in ``[0, 1)``.
        include: module-name globs of the target ``nn.Linear`` layers (``None``: the DynaDiag defaults, i.e.
            every block's qkv/proj/fc1/fc2 of a ViT, the token/channel MLPs of a Mixer; head and stem stay dense).
        exclude: globs removed from the matches.
        sequential: calibrate each block on the outputs of the already pruned earlier blocks (Wanda/DSnoT);
            ``False`` calibrates every layer on the dense model in one pass.
        wanda_group: Wanda's comparison group: ``row`` (per output row, the paper's choice) or ``layer`` (one
            threshold per layer, like ``magnitude``).
        dsnot_init: DSnoT's initial mask, ``wanda`` or ``magnitude`` (per row, as in the official code).
        dsnot_max_cycles: DSnoT's maximum swaps per row (T).
        dsnot_update_threshold: DSnoT stops a row once its ``|expected error|`` is at or below this.
        dsnot_var_power: exponent of the input variance in DSnoT's growing criterion.
        dsnot_same_sign: DSnoT rejects swaps that flip the sign of the expected error.
        diag_score: diagonal importance for ``diag``: ``energy`` | ``wanda`` | ``magnitude``.
        backend: kernel backend of the diagonal layers.
    """

    method: str
    sparsity: float
    include: Sequence[str] | None = None
    exclude: Sequence[str] = field(default_factory=tuple)
    sequential: bool = True
    wanda_group: str = "row"
    dsnot_init: str = "wanda"
    dsnot_max_cycles: int = 50
    dsnot_update_threshold: float = 0.0
    dsnot_var_power: float = 1.0
    dsnot_same_sign: bool = True
    diag_score: str = "energy"
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in PRUNE_METHODS:
            raise ValueError(f"unknown pruning method '{self.method}'; choose one of {list(PRUNE_METHODS)}")
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.wanda_group not in ("row", "layer"):
            raise ValueError(f"wanda_group must be 'row' or 'layer', got {self.wanda_group!r}")
        if self.dsnot_init not in ("wanda", "magnitude"):
            raise ValueError(f"dsnot_init must be 'wanda' or 'magnitude', got {self.dsnot_init!r}")
        if self.diag_score not in DIAG_SCORES:
            raise ValueError(f"diag_score must be one of {list(DIAG_SCORES)}, got {self.diag_score!r}")
        self.sparsity = float(self.sparsity)
        self.exclude = tuple(self.exclude)

    @property
    def needs_data(self) -> bool:
        return self.method != "magnitude" and not (self.method == "diag" and self.diag_score == "magnitude")


@dataclass
class LayerPruneReport:
    name: str
    in_features: int
    out_features: int
    nnz: int
    sparsity: float
    error_before: float | None = None  # DSnoT: sum over rows of |expected error|, initial mask
    error_after: float | None = None  # DSnoT: same, refined mask
    swaps: int | None = None


@dataclass
class PruneReport:
    method: str
    layers: list[LayerPruneReport]

    @property
    def sparsity(self) -> float:
        """Achieved sparsity over the target layers."""
        total = sum(r.in_features * r.out_features for r in self.layers)
        return 1.0 - sum(r.nnz for r in self.layers) / max(1, total)

    def __str__(self) -> str:
        head = f"{'layer':<28} {'in':>6} {'out':>6} {'nnz':>10} {'sparsity':>8}"
        dsnot = any(r.swaps is not None for r in self.layers)
        if dsnot:
            head += f" {'|eps| before':>13} {'|eps| after':>12} {'swaps':>7}"
        rows = [head, "-" * len(head)]
        for r in self.layers:
            row = f"{r.name:<28} {r.in_features:>6} {r.out_features:>6} {r.nnz:>10,} {r.sparsity:>8.4f}"
            if dsnot:
                row += f" {r.error_before:>13.4g} {r.error_after:>12.4g} {r.swaps:>7}"
            rows.append(row)
        rows.append("-" * len(head))
        rows.append(f"{self.method}: {len(self.layers)} layers, sparsity {self.sparsity:.4f}")
        return "\n".join(rows)


def prune_model_(model: nn.Module, config: PruneConfig, batches: Sequence[torch.Tensor] | None = None) -> PruneReport:
    """Prune ``model`` in place.

    Args:
        model: a trained dense model.
        config: method, sparsity, targets.
        batches: calibration inputs on the model's device (e.g. from
            :func:`~dynadiag.prune.calibration.calibration_batches`); not needed for ``magnitude``.

    Returns:
        A per-layer report; ``str(report)`` is a readable table.
    """
    names = target_linears(model, config.include, config.exclude)
    reports: dict[str, LayerPruneReport] = {}

    def prune_one(name: str, layer: nn.Module, stats: InputStats | None) -> None:
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"prune: '{name}' is a {type(layer).__name__}, expected nn.Linear")
        out_f, in_f = layer.weight.shape
        report = LayerPruneReport(name, in_f, out_f, 0, 0.0)
        if config.method == "diag":
            diag = linear_to_diag(layer, config.sparsity, stats, score=config.diag_score, backend=config.backend)
            diag.layer_name = name
            replace_module_(model, name, diag)
            counted = layer_report(name, diag)
        else:
            if config.method == "magnitude":
                mask = magnitude_mask(layer.weight, config.sparsity)
            elif config.method == "wanda" and config.wanda_group == "layer":
                mask = layer_mask(wanda_scores(layer.weight, stats), config.sparsity)
            elif config.method == "wanda":
                mask = wanda_mask(layer.weight, stats, config.sparsity)
            else:
                if config.dsnot_init == "wanda":
                    mask = wanda_mask(layer.weight, stats, config.sparsity)
                else:  # per-row magnitude, as the official DSnoT code does for every initial method
                    mask = per_row_mask(layer.weight.detach().abs(), config.sparsity)
                result = dsnot_mask(
                    layer.weight,
                    mask,
                    stats,
                    max_cycles=config.dsnot_max_cycles,
                    update_threshold=config.dsnot_update_threshold,
                    var_power=config.dsnot_var_power,
                    same_sign=config.dsnot_same_sign,
                )
                mask = result.mask
                report.error_before = float(result.error_before.sum())
                report.error_after = float(result.error_after.sum())
                report.swaps = result.swaps
            apply_mask_(layer, mask)
            counted = layer_report(name, layer)
        report.nnz, report.sparsity = counted.nnz, counted.sparsity
        reports[name] = report

    if config.needs_data:
        if not batches:
            raise ValueError(f"pruning method '{config.method}' needs calibration batches")

        def prune_group(modules: dict[str, nn.Module], stats: dict[str, InputStats]) -> None:
            for name, module in modules.items():
                prune_one(name, module, stats[name])

        prune_layerwise_(model, names, batches, prune_group, sequential=config.sequential)
    else:
        for name in names:
            prune_one(name, model.get_submodule(name), None)
    return PruneReport(config.method, [reports[n] for n in names])
