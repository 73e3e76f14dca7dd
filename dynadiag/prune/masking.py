"""Fixed sparsity during fine-tuning: weight masks as module buffers, and frozen diagonal layers.

A pruned ``nn.Linear`` keeps its dense weight (zeros at pruned positions) plus a ``weight_mask`` buffer
(``[out, in]`` bool, ``True`` = kept), so the mask is saved in and restored from the checkpoint's ``model`` state.
:class:`FixedMaskMethod` re-applies the masks after every optimizer step (and zeroes the pruned gradients before it,
so the optimizer's moments stay clean); :class:`FixedDiagMethod` trains the kept diagonals of frozen
:class:`DiagLinear` layers. Both are :class:`~dynadiag.methods.base.SparseMethod`\\ s, so the normal trainer
fine-tunes with them, and their ``apply_`` builds the matching empty structure on a freshly created model so that
``eval.py`` can load a pruned checkpoint strictly.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import nn

from dynadiag.layers import DiagLinear
from dynadiag.methods.base import SparseMethod
from dynadiag.sparsify import DEFAULT_TARGETS, DiagSparsifyConfig, sparsify_

__all__ = [
    "MASK_BUFFER",
    "FixedDiagMethod",
    "FixedMaskMethod",
    "apply_mask_",
    "mask_sparsity",
    "masked_layers",
    "target_linears",
]

MASK_BUFFER = "weight_mask"


def target_linears(model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> list[str]:
    """Names of the ``nn.Linear`` layers matching ``include`` globs (default :data:`DEFAULT_TARGETS`), in order.

    Raises:
        ValueError: nothing matches, or an explicit ``include`` pattern matches no ``nn.Linear``.
    """
    patterns = tuple(include) if include is not None else DEFAULT_TARGETS
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if include is not None:
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in linears):
                raise ValueError(f"pattern '{pattern}' matches no nn.Linear of {type(model).__name__}")
    names = [
        n
        for n in linears
        if any(fnmatch.fnmatchcase(n, p) for p in patterns) and not any(fnmatch.fnmatchcase(n, p) for p in exclude)
    ]
    if not names:
        raise ValueError(f"no nn.Linear of {type(model).__name__} matches {list(patterns)} (exclude={list(exclude)})")
    return names


@torch.no_grad()
def apply_mask_(layer: nn.Linear, mask: torch.Tensor) -> None:
    """Store ``mask`` (``[out, in]`` bool, ``True`` = kept) as the layer's ``weight_mask`` buffer and zero the rest."""
    if mask.shape != layer.weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(layer.weight.shape)}")
    mask = mask.to(device=layer.weight.device, dtype=torch.bool)
    if hasattr(layer, MASK_BUFFER):
        getattr(layer, MASK_BUFFER).copy_(mask)
    else:
        layer.register_buffer(MASK_BUFFER, mask.clone())
    layer.weight.mul_(mask)


def masked_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module that holds a ``weight_mask`` buffer."""
    return [(n, m) for n, m in model.named_modules() if isinstance(getattr(m, MASK_BUFFER, None), torch.Tensor)]


def mask_sparsity(model: nn.Module) -> float:
    """Fraction of pruned weights over all masked layers."""
    total = kept = 0
    for _, module in masked_layers(model):
        mask = getattr(module, MASK_BUFFER)
        total += mask.numel()
        kept += int(mask.sum())
    return 1.0 - kept / max(1, total)


class FixedMaskMethod(SparseMethod):
    """Train a pruned model with its unstructured masks kept fixed.

    Args:
        sparsity: the sparsity the masks were pruned to (recorded for reports; the masks themselves decide).
        include: module-name globs of the masked ``nn.Linear`` layers (``None``: :data:`DEFAULT_TARGETS`).
        exclude: globs removed from the matches.
        pruner: which pruning method made the masks (recorded for reports).
    """

    name = "fixed_mask"

    def __init__(
        self, sparsity: float, include: Sequence[str] | None = None, exclude: Sequence[str] = (), pruner: str = ""
    ) -> None:
        super().__init__()
        self.sparsity, self.include, self.exclude, self.pruner = float(sparsity), include, tuple(exclude), pruner

    def apply_(self, model: nn.Module) -> str:
        """Give every target layer without a mask an all-kept mask (a checkpoint load then fills it in)."""
        names = target_linears(model, self.include, self.exclude)
        for name in names:
            layer = model.get_submodule(name)
            if not hasattr(layer, MASK_BUFFER):
                layer.register_buffer(MASK_BUFFER, torch.ones_like(layer.weight, dtype=torch.bool))
        return f"fixed masks on {len(names)} layers (mask sparsity now {mask_sparsity(model):.4f})"

    def on_after_backward(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        for _, module in masked_layers(model):
            if module.weight.grad is not None:
                module.weight.grad.mul_(getattr(module, MASK_BUFFER))
        return {}

    @torch.no_grad()
    def on_after_optimizer_step(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, float]:
        # Weight decay and momentum can still move pruned weights: re-mask so the model stays exactly sparse.
        for _, module in masked_layers(model):
            module.weight.mul_(getattr(module, MASK_BUFFER))
        return {}


class FixedDiagMethod(SparseMethod):
    """Train the kept diagonals of frozen :class:`DiagLinear` layers (after dense-to-diagonal conversion).

    Args:
        sparsity: target sparsity of the converted layers.
        include: module-name globs of the converted layers (``None``: :data:`DEFAULT_TARGETS`).
        exclude: globs removed from the matches.
        backend: kernel backend of the diagonal layers.
        score: which diagonal score chose the diagonals (recorded for reports).
    """

    name = "fixed_diag"

    def __init__(
        self,
        sparsity: float,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        backend: str = "auto",
        score: str = "energy",
    ) -> None:
        super().__init__()
        self.sparsity, self.include, self.exclude = float(sparsity), include, tuple(exclude)
        self.backend, self.score = backend, score
        self._checked = False

    def apply_(self, model: nn.Module) -> str:
        """Swap target layers for (soft) DiagLinear placeholders unless the model already has diagonal layers.

        Loading a converted checkpoint then adopts its frozen layout (``offsets``, ``V [K, D]``).
        """
        layers = [m for m in model.modules() if isinstance(m, DiagLinear)]
        if layers:
            return f"{len(layers)} diagonal layers kept as they are"
        config = DiagSparsifyConfig(
            sparsity=self.sparsity, include=self.include, exclude=self.exclude, backend=self.backend, convs=False
        )
        return str(sparsify_(model, config))

    def on_step_start(self, step: int, model: nn.Module) -> dict[str, float]:
        if not self._checked:
            soft = [m.layer_name or "?" for m in model.modules() if isinstance(m, DiagLinear) and not m.is_frozen]
            if soft:
                raise RuntimeError(
                    f"FixedDiagMethod fine-tunes frozen diagonal layers, but {len(soft)} layers are not frozen "
                    f"(e.g. {soft[0]}): start from a checkpoint written by prune.py method=diag"
                )
            self._checked = True
        return {}
