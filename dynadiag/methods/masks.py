"""Mask-based sparse training: the base of the static, SET, RigL, SRigL and GMP baselines.

Each sparsified ``nn.Linear`` / ``nn.Conv2d`` gets a boolean buffer ``weight_mask`` shaped like its weight, so the
mask is part of ``model.state_dict()``: checkpoints carry it and ``load_state_dict`` restores it exactly. The
weight is stored dense and multiplied by the mask, so these methods run at dense cost (that is what the
throughput column of a results table should show for them).

Masked weights stay exactly zero through training because

1. ``on_after_backward`` zeroes the gradients of masked weights (after a method has read the dense gradient it
   needs, before clipping and the optimizer step), so momentum never accumulates for them;
2. a method that changes a mask resets the optimizer state of every changed weight (:func:`reset_optimizer_state_`);
3. ``on_after_optimizer_step`` multiplies the weights by the mask again, so no optimizer (coupled L2 decay, a
   stale update) can leave a masked weight non-zero.

Under DDP every decision is taken from all-reduced scores (and random choices come from a generator seeded by
``(seed, step)``), so all ranks apply the same update without communicating masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dynadiag.functional import validate_sparsity
from dynadiag.methods.base import SparseMethod
from dynadiag.methods.density import layer_densities, num_kept
from dynadiag.sparsity import (
    MASK_BUFFER,
    MaskReport,
    apply_mask_,
    layer_report,
    mask_sparsity,
    zero_fraction,
    zero_masked_grads_,
    zero_masked_weights_,
)
from dynadiag.targets import select_layers

__all__ = ["INITS", "MaskSparsifyConfig", "MaskedMethod", "grad_flow_init_", "reset_optimizer_state_", "sparse_init_"]

#: initialisations of the kept weights (:attr:`MaskSparsifyConfig.init`)
INITS = ("dense", "sparse", "grad_flow")


@torch.no_grad()
def sparse_init_(weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Scale each output neuron's kept weights by ``sqrt(fan_in / kept fan_in)`` in place.

    A neuron that keeps ``k`` of its ``n`` inputs then has the pre-activation variance of its dense init (for
    independent inputs), instead of ``k / n`` of it; at 98 % sparsity that is a factor ~7 in the weights' scale.

    Args:
        weight: ``[out, ...]`` (a linear ``[out, in]`` or a conv ``[out, in, kh, kw]`` weight).
        mask: boolean, shaped like ``weight`` (``True`` = kept).
    """
    rows = mask.reshape(mask.shape[0], -1)  # [out, fan_in]
    kept = rows.sum(dim=1).clamp_min(1).to(weight.dtype)  # [out]
    scale = (rows.shape[1] / kept).sqrt()  # [out]
    weight.mul_(scale.view(-1, *([1] * (weight.dim() - 1))))


@torch.no_grad()
def grad_flow_init_(weight: torch.Tensor, mask: torch.Tensor, generator: torch.Generator) -> None:
    """sparsimony's ``grad_flow`` init in place: kept weights of a neuron with kept fan-in ``k`` ~ ``N(0, (2 / k)^2)``.

    Args:
        weight: ``[out, ...]``.
        mask: boolean, shaped like ``weight`` (``True`` = kept); masked weights become zero.
        generator: CPU generator the draw comes from.
    """
    rows = mask.reshape(mask.shape[0], -1)  # [out, fan_in]
    std = 2.0 / rows.sum(dim=1).clamp_min(1).to(weight.dtype)  # [out]
    draw = torch.randn(rows.shape, generator=generator, dtype=weight.dtype) * std.cpu()[:, None]
    weight.copy_((draw.to(weight.device) * rows).view_as(weight))


#: optimizer state keys that carry a direction (momentum); the rest (Adam's second moments) only scale a step
MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


@torch.no_grad()
def reset_optimizer_state_(
    optimizer: torch.optim.Optimizer | None, param: torch.Tensor, where: torch.Tensor, momentum_only: bool = False
) -> None:
    """Zero ``optimizer``'s per-element state (momentum, Adam moments) of ``param`` at the positions ``where``.

    Scalar state such as Adam's ``step`` is shared by the whole tensor and left alone. With ``momentum_only`` the
    second moments (``exp_avg_sq``, ``max_exp_avg_sq``) are kept: with zero momentum and a zero gradient a masked
    weight still does not move, and a weight regrown later keeps a step size in line with its history instead of
    Adam's bias-corrected first steps from zero moments (several times ``lr`` for tens of steps).
    """
    if optimizer is None:
        return
    state = optimizer.state.get(param)
    if not state:
        return
    for key, value in state.items():
        if momentum_only and key not in MOMENTUM_KEYS:
            continue
        if torch.is_tensor(value) and value.shape == param.shape:
            value.masked_fill_(where.to(value.device), 0)


@dataclass
class MaskSparsifyConfig:
    """What the mask-based methods sparsify, and how sparse (the ``config`` node of ``sparsifier/<masked>``).

    Attributes:
        sparsity: overall target sparsity of the masked layers, in ``[0, 1)``.
        distribution: layer-wise density, ``"uniform"`` or ``"erk"`` (:mod:`dynadiag.methods.density`).
        include: module-name globs to sparsify (``None``: the same defaults as DynaDiag).
        exclude: module-name globs to leave dense.
        first_layer: ``"dense"`` (default, as DynaDiag) or ``"sparse"``: the patch embedding / stem.
        head: ``"dense"`` (default, as DynaDiag) or ``"sparse"``: the classifier.
        convs: sparsify matching ``nn.Conv2d`` layers (ResNet blocks) too.
        erk_power_scale: ERK exponent.
        init: ``"dense"`` (default): the kept weights keep the model's own initialisation; ``"sparse"``: each
            output neuron's kept weights are scaled by ``sqrt(fan_in / kept fan_in)``, so its pre-activation
            variance at initialisation matches the dense layer's (the sparse-aware init of Liu et al. 2019 and
            Evci et al. 2022, "Gradient flow in sparse neural networks"); ``"grad_flow"``: sparsimony's and the
            SRigL authors' ``grad_flow`` init, kept weights drawn from ``N(0, std = 2 / kept fan_in)`` (a standard
            deviation where the paper's rule has a variance, so far larger weights than either other choice).
    """

    sparsity: float
    distribution: str = "uniform"
    include: Sequence[str] | None = None
    exclude: Sequence[str] = ()
    first_layer: str = "dense"
    head: str = "dense"
    convs: bool = True
    erk_power_scale: float = 1.0
    init: str = "dense"

    def __post_init__(self) -> None:
        self.sparsity = validate_sparsity(self.sparsity, where="MaskSparsifyConfig: ")
        if self.init not in INITS:
            raise ValueError(f"MaskSparsifyConfig: unknown init '{self.init}'; choose one of {list(INITS)}")
        self.include = None if self.include is None else tuple(self.include)
        self.exclude = tuple(self.exclude)
        self.erk_power_scale = float(self.erk_power_scale)


class MaskedMethod(SparseMethod):
    """Base of the mask-based methods. On its own it is a fixed random mask (see :class:`StaticMethod`).

    Args:
        config: which layers are masked, how sparse, and the layer-wise density.
        seed: seeds the initial masks and random regrowth (the same on every rank).
    """

    name = "masked"

    def __init__(self, config: MaskSparsifyConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        # flat copies of the config, read by apply_ and the updates
        self.sparsity, self.distribution = config.sparsity, config.distribution
        self.include, self.exclude = config.include, config.exclude
        self.first_layer, self.head, self.convs = config.first_layer, config.head, config.convs
        self.erk_power_scale = config.erk_power_scale
        self.init = config.init
        self.seed = int(seed)
        #: ``(name, module)`` of the masked layers, in model order; set by :meth:`apply_`
        self.layers: list[tuple[str, nn.Module]] = []
        #: target density per layer name
        self.densities: dict[str, float] = {}

    # ----------------------------------------------------------------------------------------------- set-up
    def generator(self, *keys: int) -> torch.Generator:
        """A CPU generator seeded by ``(seed, *keys)`` (e.g. the step): identical on every rank and after a resume."""
        # hash() of a tuple of ints does not depend on PYTHONHASHSEED, so this is stable across processes.
        return torch.Generator().manual_seed(hash((self.seed, *keys)) & (2**63 - 1))

    def initial_mask(self, module: nn.Module, density: float, generator: torch.Generator) -> torch.Tensor:
        """Boolean mask shaped like ``module.weight`` that keeps ``num_kept(numel, density)`` random weights."""
        weight = module.weight
        keep = torch.randperm(weight.numel(), generator=generator)[: num_kept(weight.numel(), density)]
        mask = torch.zeros(weight.numel(), dtype=torch.bool)
        mask[keep] = True
        return mask.view_as(weight).to(weight.device)

    def target_sparsity(self, name: str, step: int | None = None) -> float:
        """Sparsity layer ``name`` should have (after ``step`` when the target changes during training)."""
        return 1.0 - self.densities[name]

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> MaskReport:
        """Register a ``weight_mask`` buffer on every target layer and zero the masked weights."""
        types = (nn.Linear, nn.Conv2d) if self.convs else (nn.Linear,)
        self.layers = select_layers(
            model, self.include, self.exclude, types=types, first_layer=self.first_layer, head=self.head
        )
        shapes = {name: tuple(module.weight.shape) for name, module in self.layers}
        self.densities = layer_densities(
            shapes, 1.0 - self.sparsity, self.distribution, erk_power_scale=self.erk_power_scale
        )
        generator = self.generator()
        for name, module in self.layers:
            if getattr(module, MASK_BUFFER, None) is not None:
                raise ValueError(f"layer '{name}' already has a {MASK_BUFFER}; apply_ a masked method only once")
            apply_mask_(module, self.initial_mask(module, self.densities[name], generator))
            if self.init == "sparse":
                sparse_init_(module.weight, module.weight_mask)
            elif self.init == "grad_flow":
                grad_flow_init_(module.weight, module.weight_mask, generator)
        return self.report(model)

    # ----------------------------------------------------------------------------------------------- hooks
    def capture(self, step: int) -> None:
        """Read what the next update needs from the dense gradients (they are masked right after)."""

    def update(self, step: int, optimizer: torch.optim.Optimizer | None) -> dict[str, float]:
        """Change the masks after the optimizer step of ``step``; return metrics. Static by default."""
        return {}

    @torch.no_grad()
    def on_after_backward(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        self.capture(step)
        zero_masked_grads_(self.layers)
        return {}

    @torch.no_grad()
    def on_after_optimizer_step(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, float]:
        metrics = self.update(step, optimizer)
        zero_masked_weights_(self.layers)
        if metrics or step == 0:
            # "mask" is what the method keeps; "effective" counts exact zeros (grown weights start at zero).
            metrics["sparsity/mask"] = self.mask_sparsity()
            metrics["sparsity/effective"] = self.effective_sparsity()
        return metrics

    # ----------------------------------------------------------------------------------------------- reporting
    def mask_sparsity(self) -> float:
        """Fraction of masked-out weights over the masked layers."""
        return mask_sparsity(self.layers)

    def effective_sparsity(self) -> float:
        """Fraction of exactly-zero weights over the masked layers (measured, not read from the masks)."""
        return zero_fraction(self.layers)

    def report(self, model: nn.Module) -> MaskReport:
        """Per-layer table of the masks as they are now."""
        total = sum(p.numel() for p in model.parameters())
        return MaskReport([layer_report(n, m) for n, m in self.layers], total, total, method=self.name)
