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

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dynadiag.distributed import is_dist, world_size
from dynadiag.methods.base import SparseMethod
from dynadiag.methods.density import layer_densities, num_kept
from dynadiag.sparsify import DEFAULT_TARGETS, LayerReport, SparsifyReport

__all__ = [
    "MASK_BUFFER",
    "MaskReport",
    "MaskedMethod",
    "all_reduce_mean",
    "first_and_head",
    "masked_layers",
    "reset_optimizer_state_",
    "select_layers",
]

#: name of the boolean mask buffer registered on every masked layer
MASK_BUFFER = "weight_mask"
_LAYER_TYPES = (nn.Linear, nn.Conv2d)


def masked_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every layer of ``model`` that carries a ``weight_mask``."""
    return [(n, m) for n, m in model.named_modules() if getattr(m, MASK_BUFFER, None) is not None]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def first_and_head(model: nn.Module) -> tuple[str | None, str | None]:
    """Names of the model's first weight layer (stem / patch embedding) and its classifier head."""
    named = [(n, m) for n, m in model.named_modules() if n and isinstance(m, _LAYER_TYPES)]
    first = named[0][0] if named else None
    head = None
    get_classifier = getattr(model, "get_classifier", None)  # timm models name their head
    if callable(get_classifier):
        classifier = get_classifier()
        head = next((n for n, m in named if m is classifier), None)
    if head is None:
        head = next((n for n, m in reversed(named) if isinstance(m, nn.Linear)), None)
    return first, head


def select_layers(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    *,
    convs: bool = True,
    first_layer: str = "dense",
    head: str = "dense",
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> list[tuple[str, nn.Module]]:
    """The layers a masked method sparsifies, with the same target rules as :func:`dynadiag.sparsify_`.

    Args:
        model: the model.
        include: module-name globs (``None``: :data:`dynadiag.sparsify.DEFAULT_TARGETS`, ViT/Mixer/ResNet blocks).
            Each explicit pattern must match at least one ``nn.Linear`` (or ``nn.Conv2d``) layer.
        exclude: globs removed from the matches.
        convs: sparsify matching ``nn.Conv2d`` layers too.
        first_layer: ``"dense"`` keeps the model's first weight layer (patch embedding / stem) out of the
            sparsified set even if a pattern matches it; ``"sparse"`` adds it.
        head: the same for the classifier head (``model.get_classifier()``, else the last ``nn.Linear``).
        filter_fn: optional extra predicate ``(module, name) -> bool``.
    """
    for option, value in (("first_layer", first_layer), ("head", head)):
        if value not in ("dense", "sparse"):
            raise ValueError(f"{option} must be 'dense' or 'sparse', got {value!r}")
    types = _LAYER_TYPES if convs else (nn.Linear,)
    patterns = tuple(include) if include is not None else DEFAULT_TARGETS
    named = [(n, m) for n, m in model.named_modules() if n and isinstance(m, types)]
    if include is not None:
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in named):
                kinds = "nn.Linear/nn.Conv2d" if convs else "nn.Linear"
                raise ValueError(f"pattern '{pattern}' matches no {kinds} layer of {type(model).__name__}")
    first, last = first_and_head(model)
    chosen = {n for n, _ in named if _matches(n, patterns) and not _matches(n, exclude)}
    for name, option in ((first, first_layer), (last, head)):
        if name is not None and option == "sparse":
            chosen.add(name)
        elif name is not None:
            chosen.discard(name)
    targets = [(n, m) for n, m in named if n in chosen and (filter_fn is None or filter_fn(m, n))]
    if not targets:
        raise ValueError(
            f"no layer of {type(model).__name__} matches {list(patterns)} (exclude={list(exclude)}; the first "
            f"layer '{first}' is {first_layer} and the head '{last}' is {head} by the first_layer/head options)"
        )
    return targets


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over ranks (unchanged in one process), so every rank decides from the same scores."""
    if not is_dist():
        return tensor
    tensor = tensor.clone()
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor.div_(world_size())


@torch.no_grad()
def reset_optimizer_state_(optimizer: torch.optim.Optimizer | None, param: torch.Tensor, where: torch.Tensor) -> None:
    """Zero ``optimizer``'s per-element state (momentum, Adam moments) of ``param`` at the positions ``where``.

    Scalar state such as Adam's ``step`` is shared by the whole tensor and left alone.
    """
    if optimizer is None:
        return
    state = optimizer.state.get(param)
    if not state:
        return
    for value in state.values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value.masked_fill_(where.to(value.device), 0)


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        return f"conv{module.kernel_size[0]}x{module.kernel_size[1]}"
    return "linear"


@dataclass
class MaskReport(SparsifyReport):
    """:class:`~dynadiag.sparsify.SparsifyReport` for masked (dense-storage) layers; ``str()`` is a table."""

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
        return "\n".join(rows)


class MaskedMethod(SparseMethod):
    """Base of the mask-based methods. On its own it is a fixed random mask (see :class:`StaticMethod`).

    Args:
        sparsity: overall target sparsity of the masked layers, in ``[0, 1)``.
        distribution: layer-wise density, ``"uniform"`` or ``"erk"`` (:mod:`dynadiag.methods.density`).
        include: module-name globs to sparsify (``None``: the same defaults as DynaDiag).
        exclude: module-name globs to leave dense.
        first_layer: ``"dense"`` (default, as DynaDiag) or ``"sparse"``: the patch embedding / stem.
        head: ``"dense"`` (default, as DynaDiag) or ``"sparse"``: the classifier.
        convs: sparsify matching ``nn.Conv2d`` layers (ResNet blocks) too.
        erk_power_scale: ERK exponent.
        seed: seeds the initial masks and random regrowth (the same on every rank).
    """

    name = "masked"

    def __init__(
        self,
        sparsity: float,
        distribution: str = "uniform",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        first_layer: str = "dense",
        head: str = "dense",
        convs: bool = True,
        erk_power_scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        self.sparsity = float(sparsity)
        self.distribution = distribution
        self.include = None if include is None else tuple(include)
        self.exclude = tuple(exclude)
        self.first_layer, self.head = first_layer, head
        self.convs = convs
        self.erk_power_scale = float(erk_power_scale)
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
        self.layers = select_layers(
            model, self.include, self.exclude, convs=self.convs, first_layer=self.first_layer, head=self.head
        )
        shapes = {name: tuple(module.weight.shape) for name, module in self.layers}
        self.densities = layer_densities(
            shapes, 1.0 - self.sparsity, self.distribution, erk_power_scale=self.erk_power_scale
        )
        generator = self.generator()
        for name, module in self.layers:
            if getattr(module, MASK_BUFFER, None) is not None:
                raise ValueError(f"layer '{name}' already has a {MASK_BUFFER}; apply_ a masked method only once")
            module.register_buffer(MASK_BUFFER, self.initial_mask(module, self.densities[name], generator))
            module.weight.mul_(module.weight_mask)
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
        for _, module in self.layers:
            if module.weight.grad is not None:
                module.weight.grad.mul_(module.weight_mask)
        return {}

    @torch.no_grad()
    def on_after_optimizer_step(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, float]:
        metrics = self.update(step, optimizer)
        for _, module in self.layers:
            module.weight.mul_(module.weight_mask)
        if metrics or step == 0:
            # "mask" is what the method keeps; "effective" counts exact zeros (grown weights start at zero).
            metrics["sparsity/mask"] = self.mask_sparsity()
            metrics["sparsity/effective"] = self.effective_sparsity()
        return metrics

    # ----------------------------------------------------------------------------------------------- reporting
    def mask_sparsity(self) -> float:
        """Fraction of masked-out weights over the masked layers."""
        kept = sum(int(module.weight_mask.sum()) for _, module in self.layers)
        return 1.0 - kept / max(1, sum(module.weight.numel() for _, module in self.layers))

    @torch.no_grad()
    def effective_sparsity(self) -> float:
        """Fraction of exactly-zero weights over the masked layers (measured, not read from the masks)."""
        zeros = sum(int((module.weight == 0).sum()) for _, module in self.layers)
        return zeros / max(1, sum(module.weight.numel() for _, module in self.layers))

    def report(self, model: nn.Module) -> MaskReport:
        """Per-layer table of the masks as they are now."""
        layers = []
        for name, module in self.layers:
            weight, mask = module.weight, module.weight_mask
            nnz = int(mask.sum())
            layers.append(
                LayerReport(
                    name=name,
                    kind=_kind(module),
                    in_features=weight.shape[1],
                    out_features=weight.shape[0],
                    num_diagonals=0,
                    k=0,
                    nnz=nnz,
                    params_before=weight.numel(),
                    sparsity=1.0 - nnz / weight.numel(),
                )
            )
        total = sum(p.numel() for p in model.parameters())
        return MaskReport(layers, total, total, method=self.name)
