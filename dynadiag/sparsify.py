"""Swap the ``nn.Linear`` (and residual-block ``nn.Conv2d``) layers of a model for diagonal layers.

torchao-style API: a config dataclass, ``sparsify_(model, config, filter_fn=None)`` that edits the model in
place and returns a :class:`SparsifyReport`, and ``densify_`` as its inverse. Targets are chosen by glob
patterns on timm module names; the defaults cover ViT/DeiT, MLP-Mixer and ResNet.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

from dynadiag.conv import DiagConv2d
from dynadiag.functional import validate_sparsity
from dynadiag.groups import input_permutation, validate_group
from dynadiag.layers import DiagLinear

__all__ = ["DEFAULT_TARGETS", "DiagSparsifyConfig", "LayerReport", "SparsifyReport", "densify_", "sparsify_"]

#: timm module names made diagonal by default; ``head``/``fc``, ``patch_embed`` and the ResNet stem stay dense.
DEFAULT_TARGETS: tuple[str, ...] = (
    "blocks.*.attn.qkv",  # ViT / DeiT
    "blocks.*.attn.proj",
    "blocks.*.mlp.fc1",
    "blocks.*.mlp.fc2",
    "blocks.*.mlp_tokens.fc1",  # MLP-Mixer token mixing
    "blocks.*.mlp_tokens.fc2",
    "blocks.*.mlp_channels.fc1",  # MLP-Mixer channel mixing
    "blocks.*.mlp_channels.fc2",
    "layer*.*.conv*",  # ResNet residual blocks (1x1 and 3x3)
    "layer*.*.downsample.0",
)


@dataclass
class DiagSparsifyConfig:
    """What to make diagonal, and how sparse.

    Attributes:
        sparsity: target sparsity of every converted layer, in ``[0, 1)`` (uniform, as in the paper).
        include: glob patterns on module names; ``None`` uses :data:`DEFAULT_TARGETS`. Each explicit
            pattern must match at least one module.
        exclude: glob patterns removed from the matches.
        backend: kernel backend for frozen layers.
        convs: also convert matching ``nn.Conv2d`` layers to :class:`DiagConv2d`.
        init: ``"kaiming"`` re-initialises ``V`` as the paper does (training from scratch); ``"copy"`` takes
            ``V`` from the dense layer's diagonals (starting from a trained model).
        group: select groups of this many consecutive diagonal offsets (:mod:`dynadiag.groups`); 1 = single
            diagonals (the paper). Linear layers only.
        permute: give every converted linear layer a fixed random input permutation, drawn from ``permute_seed``
            and the layer's name.
        permute_seed: seed of those permutations.
    """

    sparsity: float
    include: Sequence[str] | None = None
    exclude: Sequence[str] = field(default_factory=tuple)
    backend: str = "auto"
    convs: bool = True
    init: str = "kaiming"
    group: int = 1
    permute: bool = False
    permute_seed: int = 0

    def __post_init__(self) -> None:
        self.sparsity = validate_sparsity(self.sparsity, where="DiagSparsifyConfig: ")
        self.group = validate_group(self.group, where="DiagSparsifyConfig: ")
        if self.init not in ("kaiming", "copy"):
            raise ValueError(f"DiagSparsifyConfig: init must be 'kaiming' or 'copy', got {self.init!r}")


@dataclass
class LayerReport:
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


@dataclass
class SparsifyReport:
    """Per-layer summary of a conversion; ``str(report)`` is a readable table."""

    layers: list[LayerReport]
    model_params_before: int
    model_params_after: int

    @property
    def dense_weights(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def nnz(self) -> int:
        return sum(layer.nnz for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """Achieved sparsity over the converted layers."""
        return 1.0 - self.nnz / max(1, self.dense_weights)

    def __str__(self) -> str:
        head = f"{'layer':<28} {'kind':<10} {'in':>6} {'out':>6} {'P':>6} {'K':>6} {'nnz':>10} {'sparsity':>8}"
        rows = [head, "-" * len(head)]
        for r in self.layers:
            rows.append(
                f"{r.name:<28} {r.kind:<10} {r.in_features:>6} {r.out_features:>6} {r.num_diagonals:>6} "
                f"{r.k:>6} {r.nnz:>10,} {r.sparsity:>8.4f}"
            )
        rows.append("-" * len(head))
        rows.append(
            f"{len(self.layers)} layers: {self.dense_weights:,} dense weights -> {self.nnz:,} non-zeros "
            f"(sparsity {self.sparsity:.4f}); model parameters {self.model_params_before:,} before, "
            f"{self.model_params_after:,} once frozen"
        )
        return "\n".join(rows)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _frozen_param_count(model: nn.Module) -> int:
    total = 0
    for module in model.modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if isinstance(module, DiagLinear | DiagConv2d) and not module.is_frozen:
            own = module.nnz + (0 if module.bias is None else module.bias.numel())
        total += own
    return total


def _convert(name: str, module: nn.Module, config: DiagSparsifyConfig) -> nn.Module:
    if isinstance(module, nn.Linear):
        perm = input_permutation(module.in_features, config.permute_seed, name) if config.permute else None
        return DiagLinear.from_linear(module, config.sparsity, backend=config.backend, group=config.group, perm=perm)
    if isinstance(module, nn.Conv2d) and config.convs:
        if config.group > 1 or config.permute:
            raise ValueError(
                f"sparsify_: cannot convert '{name}': grouped/permuted diagonals are implemented for linear layers "
                "only (set convs=false or exclude the convolutions)"
            )
        if module.groups != 1:
            raise ValueError(f"sparsify_: cannot convert '{name}': grouped convolution (groups={module.groups})")
        return DiagConv2d.from_conv(module, config.sparsity)
    raise ValueError(
        f"sparsify_: cannot convert '{name}' ({type(module).__name__}); only nn.Linear"
        f"{' and nn.Conv2d' if config.convs else ''} layers can become diagonal"
    )


def sparsify_(
    model: nn.Module,
    config: DiagSparsifyConfig,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> SparsifyReport:
    """Replace matching layers of ``model`` by diagonal layers, in place.

    The new layers start with ``alpha = 1/P`` as the method prescribes, so the soft top-K starts neutral, and
    ``V`` as chosen by ``config.init``.

    Args:
        model: a timm ViT/DeiT, MLP-Mixer or ResNet, or any module with matching names.
        config: sparsity and target patterns.
        filter_fn: optional extra predicate ``(module, name) -> bool``.

    Raises:
        ValueError: a pattern matches nothing, or a matched module cannot be converted.
    """
    patterns = tuple(config.include) if config.include is not None else DEFAULT_TARGETS
    params_before = sum(p.numel() for p in model.parameters())
    named = [(n, m) for n, m in model.named_modules() if n and not isinstance(m, DiagLinear | DiagConv2d)]
    targets = [
        (n, m)
        for n, m in named
        if _matches(n, patterns)
        and not _matches(n, config.exclude)
        and (config.include is not None or isinstance(m, nn.Linear | nn.Conv2d))
        and (filter_fn is None or filter_fn(m, n))
    ]
    if config.include is not None:
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in named):
                raise ValueError(f"sparsify_: pattern '{pattern}' matches no module of {type(model).__name__}")
    if not targets:
        raise ValueError(
            f"sparsify_: no layer of {type(model).__name__} matches {list(patterns)} (exclude={list(config.exclude)})"
        )
    reports = []
    for name, module in targets:
        layer = _convert(name, module, config)
        if config.init == "kaiming" and isinstance(layer, DiagLinear):
            layer.reset_parameters()
        reset_alpha_(layer)
        layer.layer_name = name
        _set_module(model, name, layer)
        reports.append(_layer_report(name, layer))
    return SparsifyReport(reports, params_before, _frozen_param_count(model))


def reset_alpha_(layer: DiagLinear | DiagConv2d) -> None:
    """Reset ``alpha`` to the method's neutral ``1/P`` start (``1/G`` for grouped layers)."""
    layer.alpha.data.fill_(1.0 / layer.alpha.numel())


def _layer_report(name: str, layer: DiagLinear | DiagConv2d) -> LayerReport:
    if isinstance(layer, DiagLinear):
        kind, fan_in, fan_out, taps = "linear", layer.in_features, layer.out_features, 1
    else:
        kind, fan_in, fan_out = "conv", layer.in_channels, layer.out_channels
        taps = layer.kernel_size[0] * layer.kernel_size[1]
        kind = f"conv{layer.kernel_size[0]}x{layer.kernel_size[1]}"
    return LayerReport(
        name=name,
        kind=kind,
        in_features=fan_in,
        out_features=fan_out,
        num_diagonals=layer.num_diagonals,
        k=layer.k,
        nnz=layer.nnz,
        params_before=fan_in * fan_out * taps,
        sparsity=layer.achieved_sparsity,
        group=layer.group,
    )


def sparsity_report(model: nn.Module) -> SparsifyReport:
    """Report on the diagonal layers a model holds now."""
    layers = [_layer_report(n, m) for n, m in model.named_modules() if isinstance(m, DiagLinear | DiagConv2d)]
    total = sum(p.numel() for p in model.parameters())
    return SparsifyReport(layers, total, _frozen_param_count(model))


def densify_(model: nn.Module) -> int:
    """Replace every diagonal layer by its exact dense equivalent, in place. Returns how many were replaced."""
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, DiagLinear | DiagConv2d)]
    for name, module in targets:
        _set_module(model, name, module.to_linear() if isinstance(module, DiagLinear) else module.to_conv())
    return len(targets)
