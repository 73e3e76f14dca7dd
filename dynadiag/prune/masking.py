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

from collections.abc import Sequence

import torch
from torch import nn

from dynadiag.layers import DiagLinear
from dynadiag.methods.base import SparseMethod
from dynadiag.sparsify import DiagSparsifyConfig, sparsify_
from dynadiag.sparsity import (
    MASK_BUFFER,
    apply_mask_,
    mask_sparsity,
    masked_layers,
    zero_masked_grads_,
    zero_masked_weights_,
)
from dynadiag.targets import select_layers

__all__ = ["FixedDiagMethod", "FixedMaskMethod", "target_linears"]


def target_linears(model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> list[str]:
    """Names of the ``nn.Linear`` layers post-training pruning works on (:func:`~dynadiag.targets.select_layers`
    with ``include`` globs, default: the structural default targets), in model order.

    Raises:
        ValueError: nothing matches, or an explicit ``include`` pattern matches no ``nn.Linear``.
    """
    layers = select_layers(model, include, exclude, types=(nn.Linear,), first_layer=None, head=None)
    return [name for name, _ in layers]


class FixedMaskMethod(SparseMethod):
    """Train a pruned model with its unstructured masks kept fixed.

    Args:
        sparsity: the sparsity the masks were pruned to (recorded for reports; the masks themselves decide).
        include: module-name globs of the masked ``nn.Linear`` layers (``None``: the default targets).
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
                apply_mask_(layer, torch.ones_like(layer.weight, dtype=torch.bool))
        return f"fixed masks on {len(names)} layers (mask sparsity now {mask_sparsity(masked_layers(model)):.4f})"

    def on_after_backward(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        zero_masked_grads_(masked_layers(model))
        return {}

    @torch.no_grad()
    def on_after_optimizer_step(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, float]:
        # Weight decay and momentum can still move pruned weights: re-mask so the model stays exactly sparse.
        zero_masked_weights_(masked_layers(model))
        return {}


class FixedDiagMethod(SparseMethod):
    """Train the kept diagonals of frozen :class:`DiagLinear` layers (after dense-to-diagonal conversion).

    Args:
        config: the converted layers (``include``/``exclude``), their sparsity and kernel backend.
        score: which diagonal score chose the diagonals (recorded for reports).
    """

    name = "fixed_diag"

    def __init__(self, config: DiagSparsifyConfig, score: str = "energy") -> None:
        super().__init__()
        self.config, self.score = config, score
        self._checked = False

    def apply_(self, model: nn.Module) -> str:
        """Swap target layers for (soft) DiagLinear placeholders unless the model already has diagonal layers.

        Loading a converted checkpoint then adopts its frozen layout (``offsets``, ``V [K, D]``).
        """
        layers = [m for m in model.modules() if isinstance(m, DiagLinear)]
        if layers:
            return f"{len(layers)} diagonal layers kept as they are"
        return str(sparsify_(model, self.config))

    @property
    def sparsity(self) -> float:
        return self.config.sparsity

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
