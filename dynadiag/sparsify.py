"""Swap the ``nn.Linear`` (and ``nn.Conv2d``) layers of a model for diagonal layers.

torchao-style API: a config dataclass, ``sparsify_(model, config, filter_fn=None)`` that edits the model in
place and returns a :class:`~dynadiag.sparsity.SparsifyReport`, and ``densify_`` as its inverse. Targets come from
:mod:`dynadiag.targets`: by default the layers inside a model's repeated blocks (any timm family), or glob patterns
on module names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from dynadiag.conv import DiagConv2d
from dynadiag.functional import validate_sparsity
from dynadiag.groups import input_permutation, validate_group
from dynadiag.layers import DiagLinear
from dynadiag.sparsity import SparsifyReport, frozen_param_count, layer_report
from dynadiag.targets import plan_targets, replace_module_

__all__ = ["DIAG_INITS", "DiagSparsifyConfig", "densify_", "diag_grad_flow_init_", "reset_alpha_", "sparsify_"]

#: ``DiagSparsifyConfig.init`` choices
DIAG_INITS = ("kaiming", "grad_flow", "copy")


@dataclass
class DiagSparsifyConfig:
    """What to make diagonal, and how sparse.

    Attributes:
        sparsity: target sparsity of every converted layer, in ``[0, 1)`` (uniform, as in the paper).
        include: glob patterns on module names; ``None``: the default targets by structure
            (:mod:`dynadiag.targets`). Each explicit pattern must match at least one ``nn.Linear`` (or, with
            ``convs``, ``nn.Conv2d``).
        exclude: glob patterns removed from the matches.
        backend: kernel backend for frozen layers.
        convs: also convert matching ``nn.Conv2d`` layers to :class:`DiagConv2d`.
        init: ``"kaiming"`` builds fresh linear layers (kaiming-uniform ``V``) as the paper does (training from
            scratch); ``"grad_flow"`` builds fresh layers with ``V ~ N(0, (2 / fan_in)^2)``, ``fan_in`` the inputs
            an output reads once the layer keeps its ``k`` diagonals (``k * D / out``): the rule the masked
            baselines use (sparsimony's ``grad_flow``, :func:`dynadiag.methods.masks.grad_flow_init_`);
            ``"copy"`` takes ``V`` from the dense layer's diagonals (starting from a trained model).
            Convolutions always copy.
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
        if self.init not in DIAG_INITS:
            raise ValueError(f"DiagSparsifyConfig: init must be one of {', '.join(DIAG_INITS)}, got {self.init!r}")


@torch.no_grad()
def diag_grad_flow_init_(layer: DiagLinear) -> None:
    """Draw ``V`` in place from ``N(0, (2 / fan_in)^2)``, ``fan_in = k * D / out`` (inputs per output once frozen).

    The masked baselines' ``grad_flow`` rule (:func:`dynadiag.methods.masks.grad_flow_init_`, sparsimony's; Evci et
    al. 2022 scale the init to the sparse fan-in) for a diagonal layer, whose kept inputs per output are known from
    its shape and ``k`` rather than read from a mask. At high sparsity the kaiming draw over the dense fan-in ``D``
    leaves the kept weights far too small (a layer at 98 % starts almost silent).

    Args:
        layer: a fresh :class:`DiagLinear` (``V`` is ``[P, D]``).
    """
    fan_in = max(1.0, layer.nnz / layer.out_features)
    layer.V.normal_(0.0, 2.0 / fan_in)


def _convert(name: str, module: nn.Linear | nn.Conv2d, config: DiagSparsifyConfig) -> DiagLinear | DiagConv2d:
    if isinstance(module, nn.Linear):
        perm = input_permutation(module.in_features, config.permute_seed, name) if config.permute else None
        if config.init == "copy":
            return DiagLinear.from_linear(
                module, config.sparsity, backend=config.backend, group=config.group, perm=perm
            )
        # kaiming: a fresh layer (kaiming-uniform V, alpha = 1/P, zero bias); the dense weights are never read
        layer = DiagLinear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            sparsity=config.sparsity,
            backend=config.backend,
            group=config.group,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
        if config.init == "grad_flow":
            diag_grad_flow_init_(layer)
        if perm is not None:
            layer.set_permutation_(perm)
        return layer
    if config.group > 1 or config.permute:
        raise ValueError(
            f"sparsify_: cannot convert '{name}': grouped/permuted diagonals are implemented for linear layers "
            "only (set convs=false or exclude the convolutions)"
        )
    if module.groups != 1:
        raise ValueError(f"sparsify_: cannot convert '{name}': grouped convolution (groups={module.groups})")
    return DiagConv2d.from_conv(module, config.sparsity)


def sparsify_(
    model: nn.Module,
    config: DiagSparsifyConfig,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> SparsifyReport:
    """Replace matching layers of ``model`` by diagonal layers, in place.

    The new layers start with ``alpha = 1/P`` as the method prescribes, so the soft top-K starts neutral, and
    ``V`` as chosen by ``config.init``.

    Args:
        model: any model; without ``config.include`` the layers inside its repeated blocks are converted
            (:mod:`dynadiag.targets`), with it the matching ones.
        config: sparsity and target patterns.
        filter_fn: optional extra predicate ``(module, name) -> bool``.

    Returns:
        The converted layers, and the other linear/convolution layers with the reason each stayed dense.

    Raises:
        ValueError: a pattern matches nothing, nothing can be converted (the message lists the choices), or an
            explicitly chosen convolution is grouped.
    """
    types = (nn.Linear, nn.Conv2d) if config.convs else (nn.Linear,)
    params_before = sum(p.numel() for p in model.parameters())
    try:
        # first_layer/head=None: explicit patterns alone decide; the default targets keep both dense anyway.
        plan = plan_targets(
            model, config.include, config.exclude, types=types, first_layer=None, head=None, filter_fn=filter_fn
        )
    except ValueError as exc:
        raise ValueError(f"sparsify_: {exc}") from None
    reports = []
    for name, module in plan.targets:
        layer = _convert(name, module, config)
        reset_alpha_(layer)  # from_linear/from_conv rank the copied diagonals by norm; training starts neutral
        layer.layer_name = name
        replace_module_(model, name, layer)
        reports.append(layer_report(name, layer))
    return SparsifyReport(reports, params_before, frozen_param_count(model), dense=plan.dense)


def reset_alpha_(layer: DiagLinear | DiagConv2d) -> None:
    """Reset ``alpha`` to the method's neutral ``1/P`` start (``1/G`` for grouped layers)."""
    layer.alpha.data.fill_(1.0 / layer.alpha.numel())


def densify_(model: nn.Module) -> int:
    """Replace every diagonal layer by its exact dense equivalent, in place. Returns how many were replaced."""
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, DiagLinear | DiagConv2d)]
    for name, module in targets:
        replace_module_(model, name, module.to_linear() if isinstance(module, DiagLinear) else module.to_conv())
    return len(targets)
