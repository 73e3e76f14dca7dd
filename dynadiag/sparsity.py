"""What is sparse in a model, and how much: mask buffers and the one way sparsity is counted.

Two kinds of sparse layer exist:

- **diagonal layers** (:class:`~dynadiag.DiagLinear`, :class:`~dynadiag.DiagConv2d`) hold ``k`` of ``P`` wrapped
  diagonals; they compute with ``k * D`` weights (per kernel tap) once frozen, all ``P * D`` before;
- **masked layers** (a dense ``nn.Linear`` / ``nn.Conv2d`` with a boolean ``weight_mask`` buffer, ``True`` =
  kept): the mask-based DST baselines and post-training pruning. The buffer is part of ``model.state_dict()``, so
  checkpoints carry the mask and ``load_state_dict`` restores it exactly.

:func:`layer_report` counts one layer of either kind; the reports, :func:`mask_sparsity` and
:func:`sparsity_stats` (the trainer's and ``eval.py``'s numbers) are all built from it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dynadiag.conv import DiagConv2d
from dynadiag.layers import DiagLinear

__all__ = [
    "MASK_BUFFER",
    "LayerReport",
    "MaskReport",
    "SparsifyReport",
    "apply_mask_",
    "frozen_param_count",
    "kernel_summary",
    "layer_kind",
    "layer_report",
    "mask_sparsity",
    "masked_layers",
    "sparsity_report",
    "sparsity_stats",
    "zero_fraction",
    "zero_masked_grads_",
    "zero_masked_weights_",
]

#: name of the boolean mask buffer (``True`` = kept) registered on every masked layer
MASK_BUFFER = "weight_mask"

Layers = Sequence[tuple[str, nn.Module]]


# ---------------------------------------------------------------------------------------------------- masks
def masked_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every layer of ``model`` that carries a ``weight_mask`` buffer, in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(getattr(m, MASK_BUFFER, None), torch.Tensor)]


@torch.no_grad()
def apply_mask_(layer: nn.Module, mask: torch.Tensor) -> None:
    """Store ``mask`` (shaped like ``layer.weight``, ``True`` = kept) as the layer's ``weight_mask`` buffer (a new
    buffer, or copied into the existing one) and zero the masked weights."""
    if mask.shape != layer.weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(layer.weight.shape)}")
    mask = mask.to(device=layer.weight.device, dtype=torch.bool)
    if isinstance(getattr(layer, MASK_BUFFER, None), torch.Tensor):
        getattr(layer, MASK_BUFFER).copy_(mask)
    else:
        layer.register_buffer(MASK_BUFFER, mask.clone())
    layer.weight.mul_(mask)


@torch.no_grad()
def zero_masked_grads_(layers: Layers) -> None:
    """Zero the gradients of masked weights (before the optimizer step, so its moments stay clean)."""
    for _, module in layers:
        if module.weight.grad is not None:
            module.weight.grad.mul_(getattr(module, MASK_BUFFER))


@torch.no_grad()
def zero_masked_weights_(layers: Layers) -> None:
    """Multiply the weights by their masks (after the optimizer step: decay or momentum may have moved them)."""
    for _, module in layers:
        module.weight.mul_(getattr(module, MASK_BUFFER))


# ---------------------------------------------------------------------------------------------------- counting
@dataclass
class LayerReport:
    """One sparse layer: ``nnz`` of its ``params_before`` dense weights are kept.

    ``num_diagonals`` (``P``) and ``k`` are 0 for masked layers; ``group`` is the diagonal group size
    (:mod:`dynadiag.groups`).
    """

    name: str
    kind: str
    in_features: int
    out_features: int
    num_diagonals: int
    k: int
    nnz: int
    params_before: int
    sparsity: float
    group: int = 1
    #: what computed the layer's last frozen forward (``DiagLinear.kernel``): a backend name or ``auto``'s per-op
    #: plan on CUDA (e.g. ``"fwd=cuda,dx=cuda,dv=dense"``); ``""`` if it has not run frozen yet.
    kernel: str = ""
    #: ``auto``'s measured dense time over its plan's time (``DiagLinear.kernel_ratio``); ``None``: not measured
    kernel_ratio: float | None = None

    @property
    def kernel_label(self) -> str:
        """``kernel`` with the measured ratio, e.g. ``"cpu 2.31x"``; ``"-"`` before the first frozen forward."""
        if not self.kernel:
            return "-"
        return self.kernel if self.kernel_ratio is None else f"{self.kernel} {self.kernel_ratio:.2f}x"


def layer_kind(module: nn.Module) -> str:
    """``"linear"`` or ``"conv<kh>x<kw>"``."""
    size = getattr(module, "kernel_size", None)
    return "linear" if size is None else f"conv{size[0]}x{size[1]}"


def layer_report(name: str, module: nn.Module) -> LayerReport:
    """Count one diagonal or masked layer (diagonal layers: their frozen ``k * D`` per tap, even before the freeze).

    Raises:
        TypeError: ``module`` is neither a diagonal layer nor masked.
    """
    if isinstance(module, DiagLinear | DiagConv2d):
        if isinstance(module, DiagLinear):
            fan_in, fan_out, taps = module.in_features, module.out_features, 1
        else:
            fan_in, fan_out = module.in_channels, module.out_channels
            taps = module.kernel_size[0] * module.kernel_size[1]
        return LayerReport(
            name, layer_kind(module), fan_in, fan_out, module.num_diagonals, module.k, module.nnz,
            fan_in * fan_out * taps, module.achieved_sparsity, module.group, getattr(module, "kernel", ""),
            getattr(module, "kernel_ratio", None),
        )  # fmt: skip
    mask = getattr(module, MASK_BUFFER, None)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"'{name}' ({type(module).__name__}) is neither a diagonal layer nor masked")
    weight, nnz = module.weight, int(mask.sum())
    sparsity = 1.0 - nnz / weight.numel()
    return LayerReport(name, layer_kind(module), weight.shape[1], weight.shape[0], 0, 0, nnz, weight.numel(), sparsity)


def frozen_param_count(model: nn.Module) -> int:
    """Parameters of ``model`` once every diagonal layer is frozen (``k * D`` values per layer, plus bias)."""
    total = 0
    for module in model.modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if isinstance(module, DiagLinear | DiagConv2d) and not module.is_frozen:
            own = module.nnz + (0 if module.bias is None else module.bias.numel())
        total += own
    return total


@dataclass
class SparsifyReport:
    """Per-layer summary of the sparse layers of a model; ``str(report)`` is a readable table."""

    layers: list[LayerReport]
    model_params_before: int
    model_params_after: int
    #: ``(name, reason)`` of every other linear/convolution layer, left dense (filled in by the methods)
    dense: list[tuple[str, str]] = field(default_factory=list)

    @property
    def dense_weights(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def nnz(self) -> int:
        return sum(layer.nnz for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """Achieved sparsity over the reported layers."""
        return 1.0 - self.nnz / max(1, self.dense_weights)

    def dense_lines(self, examples: int = 3) -> list[str]:
        """The layers left dense, one line per reason (count and a few names)."""
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.dense:
            by_reason.setdefault(reason, []).append(name)
        lines = [f"left dense: {len(self.dense)} layers"] if self.dense else []
        for reason, names in by_reason.items():
            more = ", ..." if len(names) > examples else ""
            lines.append(f"  {reason}: {len(names)} ({', '.join(names[:examples])}{more})")
        return lines

    def __str__(self) -> str:
        head = (
            f"{'layer':<28} {'kind':<10} {'in':>6} {'out':>6} {'P':>6} {'K':>6} {'nnz':>10} {'sparsity':>8} "
            f"{'kernel (vs dense)':<18}"
        )
        rows = [head, "-" * len(head)]
        for r in self.layers:
            rows.append(
                f"{r.name:<28} {r.kind:<10} {r.in_features:>6} {r.out_features:>6} {r.num_diagonals:>6} "
                f"{r.k:>6} {r.nnz:>10,} {r.sparsity:>8.4f} {r.kernel_label:<18}"
            )
        rows.append("-" * len(head))
        rows.append(
            f"{len(self.layers)} layers: {self.dense_weights:,} dense weights -> {self.nnz:,} non-zeros "
            f"(sparsity {self.sparsity:.4f}); model parameters {self.model_params_before:,} before, "
            f"{self.model_params_after:,} once frozen"
        )
        return "\n".join(rows + self.dense_lines())


@dataclass
class MaskReport(SparsifyReport):
    """:class:`SparsifyReport` for masked (dense-storage) layers; ``str()`` is a table."""

    method: str = "masked"

    def __str__(self) -> str:
        head = f"{'layer':<28} {'kind':<10} {'out':>6} {'in':>6} {'weights':>10} {'nnz':>10} {'sparsity':>8}"
        rows = [head, "-" * len(head)]
        for r in self.layers:
            rows.append(
                f"{r.name:<28} {r.kind:<10} {r.out_features:>6} {r.in_features:>6} {r.params_before:>10,} "
                f"{r.nnz:>10,} {r.sparsity:>8.4f}"
            )
        rows.append("-" * len(head))
        rows.append(
            f"{self.method}: {len(self.layers)} masked layers, {self.dense_weights:,} weights -> {self.nnz:,} "
            f"non-zeros (sparsity {self.sparsity:.4f}); stored dense, {self.model_params_after:,} model parameters"
        )
        return "\n".join(rows + self.dense_lines())


def sparsity_report(model: nn.Module) -> SparsifyReport:
    """Report on the diagonal layers a model holds now."""
    layers = [layer_report(n, m) for n, m in model.named_modules() if isinstance(m, DiagLinear | DiagConv2d)]
    total = sum(p.numel() for p in model.parameters())
    return SparsifyReport(layers, total, frozen_param_count(model))


def kernel_summary(model: nn.Module) -> str:
    """How many diagonal layers ran on each kernel choice, with ``auto``'s measured speed-up over dense where it
    measured, e.g. ``"cpu x20 (1.52-2.31x dense), dense x4 (1.00x dense)"``."""
    counts: dict[str, int] = {}
    ratios: dict[str, list[float]] = {}
    for module in model.modules():
        if isinstance(module, DiagLinear | DiagConv2d):
            name = getattr(module, "kernel", "") or "-"
            counts[name] = counts.get(name, 0) + 1
            if getattr(module, "kernel_ratio", None) is not None:
                ratios.setdefault(name, []).append(module.kernel_ratio)
    parts = []
    for name, n in sorted(counts.items()):
        found = ratios.get(name)
        if not found:
            parts.append(f"{name} x{n}")
        elif min(found) == max(found) or f"{min(found):.2f}" == f"{max(found):.2f}":
            parts.append(f"{name} x{n} ({min(found):.2f}x dense)")
        else:
            parts.append(f"{name} x{n} ({min(found):.2f}-{max(found):.2f}x dense)")
    return ", ".join(parts)


def mask_sparsity(layers: Iterable[tuple[str, nn.Module]]) -> float:
    """Fraction of masked-out weights over masked ``layers`` (e.g. :func:`masked_layers` of a model)."""
    reports = [layer_report(n, m) for n, m in layers]
    return 1.0 - sum(r.nnz for r in reports) / max(1, sum(r.params_before for r in reports))


@torch.no_grad()
def zero_fraction(layers: Iterable[tuple[str, nn.Module]]) -> float:
    """Fraction of exactly-zero weights over ``layers`` (measured on the weights, not read from masks)."""
    zeros = total = 0
    for _, module in layers:
        zeros += int((module.weight == 0).sum())
        total += module.weight.numel()
    return zeros / max(1, total)


def sparsity_stats(model: nn.Module) -> dict[str, Any]:
    """Non-zeros the model computes with, over its linear/convolution weights.

    Diagonal layers count ``k * D`` (per kernel tap) once frozen, and all of ``P * D`` during the soft phase
    (every diagonal is live then), or ``K' * D`` for a layer computing with ``K'`` candidates (``soft_nnz``).
    Other ``nn.Linear``/``nn.Conv2d`` layers count their exact non-zeros, so mask-based methods (zeros kept in a
    dense weight) are measured the same way.

    Returns:
        ``effective`` (1 - nnz / dense size over all linear/conv weights), ``target`` (the sparsity of the
        diagonal layers once frozen, or of the masked layers of a mask-based method), ``nnz``, ``dense``,
        ``params`` and ``layers``: ``{name: k}`` per diagonal layer.
    """
    nnz = dense = target_nnz = target_dense = 0
    layers: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, DiagLinear | DiagConv2d):
            report = layer_report(name, module)
            # soft layers compute with every diagonal, unless they run a candidate set (``soft_nnz``)
            nnz += report.nnz if module.is_frozen else getattr(module, "soft_nnz", report.params_before)
            dense += report.params_before
            layers[name] = int(module.k)
        elif isinstance(module, nn.Linear | nn.Conv2d):
            nnz += int(torch.count_nonzero(module.weight.detach()).item())
            dense += module.weight.numel()
            if isinstance(getattr(module, MASK_BUFFER, None), torch.Tensor):
                report = layer_report(name, module)
            else:
                continue
        else:
            continue
        target_nnz, target_dense = target_nnz + report.nnz, target_dense + report.params_before
    return {
        "effective": 1.0 - nnz / max(1, dense),
        "target": (1.0 - target_nnz / target_dense) if target_dense else 0.0,
        "nnz": nnz,
        "dense": dense,
        "params": sum(p.numel() for p in model.parameters()),
        "layers": layers,
    }
