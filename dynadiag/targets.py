"""Which layers of a model a sparse method touches: the one place that decides layer targets.

Every method (DynaDiag's :func:`~dynadiag.sparsify_`, the masked DST baselines, DiagHeur, post-training pruning)
asks :func:`plan_targets` / :func:`select_layers` for its targets, so "the same targets" is true by construction.
A target is an ``nn.Linear`` (or an ``nn.Conv2d``, where a method allows convolutions).

**Default targets, by structure.** Without ``include`` patterns, a layer is a target when it sits inside a
*block*: an element of a run of same-class composite modules held in an ``nn.Sequential`` / ``nn.ModuleList``
(``blocks.3``, ``layers.1.blocks.0``, ``stages.2.blocks.1``, ``layer3.4``, ``blocks.2.0``), whatever the family
calls it and however deeply stages nest. That covers the attention and MLP layers of transformers, Mixer-style
token/channel MLPs, the pointwise convolutions of ConvNeXt/EfficientNet-style blocks and the convolutions of a
ResNet block (its projection shortcut included, as before). Left dense, each with its reason in the report:

- the stem / patch embedding (anything under ``stem*`` / ``patch_embed*``, or the first weight layer when it is
  outside the blocks) and the classifier head (``get_classifier()``, else the last ``nn.Linear`` when it is outside
  the blocks), as in the paper;
- stage-level layers: a layer of a stage that is not inside one of the stage's blocks (Swin's patch merging,
  ConvNeXt's and PVT's downsampling between stages);
- anything else outside the blocks (necks, pre-logits, position-bias tables);
- layers with fewer than :data:`MIN_FEATURES` input or output features (CaiT's talking-heads mixing, the
  coordinate input of Swin-V2's position-bias MLP, tiny squeeze-excite bottlenecks);
- convolutions a diagonal layer cannot stand for: grouped / depthwise (``groups > 1``), patchify convolutions
  whose kernel equals their stride (downsampling), non-zero padding modes;
- subclasses of ``nn.Linear`` / ``nn.Conv2d`` with their own ``forward`` (e.g. timm's ``Conv2dSame``): the
  diagonal layer would not reproduce what that forward adds.

With ``include`` patterns the patterns decide (see :func:`select_layers`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

__all__ = [
    "LAYER_TYPES",
    "TargetPlan",
    "block_names",
    "default_reasons",
    "first_and_head",
    "matches",
    "plan_targets",
    "replace_module_",
    "select_layers",
]

#: layer types a method can make sparse
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)

#: attribute names of the modules that embed the input (always dense by default)
STEM_NAMES: tuple[str, ...] = ("stem*", "patch_embed*", "conv_stem", "pos_embed*", "cls_token*")

#: layers with fewer input or output features stay dense by default (talking-heads mixing, position-bias MLP inputs)
MIN_FEATURES = 8

_OPTIONS = ("dense", "sparse", None)


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether module name ``name`` matches any of the glob ``patterns`` (``fnmatch``, case-sensitive)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def first_and_head(model: nn.Module) -> tuple[str | None, str | None]:
    """Names of the model's first weight layer (stem / patch embedding) and its classifier head.

    The head is ``model.get_classifier()`` for timm models, else the last ``nn.Linear``.
    """
    named = [(n, m) for n, m in model.named_modules() if n and isinstance(m, LAYER_TYPES)]
    first = named[0][0] if named else None
    head = None
    get_classifier = getattr(model, "get_classifier", None)  # timm models name their head
    if callable(get_classifier):
        classifier = get_classifier()  # a tuple for distilled models (head, head_dist): the first one counts
        classifier = classifier[0] if isinstance(classifier, tuple | list) else classifier
        head = next((n for n, m in named if m is classifier), None)
    if head is None:
        head = next((n for n, m in reversed(named) if isinstance(m, nn.Linear)), None)
    return first, head


def _kinds(types: Sequence[type[nn.Module]]) -> str:
    return "/".join(f"nn.{t.__name__}" for t in types)


def _has_layer(module: nn.Module) -> bool:
    return any(isinstance(m, LAYER_TYPES) for m in module.modules())


def _composite(module: nn.Module) -> bool:
    return not isinstance(module, LAYER_TYPES) and _has_layer(module)


def block_names(model: nn.Module) -> set[str]:
    """Names of the model's *blocks*: every child of an ``nn.Sequential`` / ``nn.ModuleList`` whose children are all
    composite modules holding linear or convolution layers, and of any other module whose children all share one
    such class that is not itself a container (timm's RegNet stages hold ``b1``, ``b2``, ... as attributes)."""
    blocks: set[str] = set()
    for name, module in model.named_modules():
        children = list(module.named_children())
        if not children or not all(_composite(c) for _, c in children):
            continue
        if not isinstance(module, nn.Sequential | nn.ModuleList):
            kinds = {type(c) for _, c in children}
            # a stage holding `downsample` and `blocks` (two Sequentials) is not a run of blocks
            if len(kinds) > 1 or issubclass(kinds.pop(), nn.Sequential | nn.ModuleList | nn.ModuleDict):
                continue
        blocks.update(f"{name}.{child}" if name else child for child, _ in children)
    return blocks


def _fans(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


def _own_forward(module: nn.Module) -> str | None:
    """Name of the class whose ``forward`` (or ``_conv_forward``) replaces the stock ``nn.Linear``/``nn.Conv2d`` one."""
    base = nn.Linear if isinstance(module, nn.Linear) else nn.Conv2d
    for attr in ("forward", "_conv_forward"):
        if getattr(type(module), attr, None) is not getattr(base, attr, None):
            return type(module).__name__
    return None


def _conv_problem(module: nn.Conv2d) -> str | None:
    if module.groups != 1:
        return "grouped/depthwise convolution (groups > 1)"
    stride = tuple(module.stride)
    if max(stride) > 1 and tuple(module.kernel_size) == stride:
        return "patchify/downsampling convolution (kernel = stride)"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}"
    return None


def default_reasons(model: nn.Module) -> dict[str, str | None]:
    """For every ``nn.Linear`` / ``nn.Conv2d`` of ``model``: ``None`` if it is a default target, else why it stays
    dense (see the module docstring)."""
    first, head = first_and_head(model)
    classifier = model.get_classifier() if callable(getattr(model, "get_classifier", None)) else None
    classifier = classifier if isinstance(classifier, tuple | list) else (classifier,)  # distilled: two heads
    heads = {n for n, m in model.named_modules() if n and any(m is c for c in classifier if c is not None)}
    blocks = block_names(model)
    stages = {b for b in blocks if any(o.startswith(b + ".") for o in blocks)}
    reasons: dict[str, str | None] = {}
    for name, module in model.named_modules():
        if not name or not isinstance(module, LAYER_TYPES):
            continue
        parts = name.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts))]
        inside = [p for p in prefixes if p in blocks]
        if any(name == h or name.startswith(f"{h}.") for h in heads):  # the model's own classifier(s)
            reason = "classifier head"
        elif any(matches(part, STEM_NAMES) for part in parts):
            reason = "stem / patch embedding"
        elif not inside:  # the first/last layer count as stem/head only outside the blocks (a model of blocks alone)
            reason = {first: "stem / patch embedding", head: "classifier head"}.get(name, "outside the repeated blocks")
        elif inside[-1] in stages:
            reason = "stage-level layer (downsampling / transition between blocks)"
        elif _own_forward(module):
            reason = f"{_own_forward(module)} has its own forward"
        elif min(_fans(module)) < MIN_FEATURES:
            reason = f"too small (fewer than {MIN_FEATURES} input or output features)"
        elif isinstance(module, nn.Conv2d):
            reason = _conv_problem(module)
        else:
            reason = None
        reasons[name] = reason
    return reasons


@dataclass
class TargetPlan:
    """The layers a method makes sparse, and every other linear/convolution layer with the reason it stays dense."""

    targets: list[tuple[str, nn.Module]]
    dense: list[tuple[str, str]] = field(default_factory=list)

    def dense_summary(self, examples: int = 3) -> list[str]:
        """One line per reason: ``reason: count (e.g. a, b, c)``."""
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.dense:
            by_reason.setdefault(reason, []).append(name)
        lines = []
        for reason, names in by_reason.items():
            more = ", ..." if len(names) > examples else ""
            lines.append(f"{reason}: {len(names)} (e.g. {', '.join(names[:examples])}{more})")
        return lines


def plan_targets(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    *,
    types: Sequence[type[nn.Module]] = LAYER_TYPES,
    first_layer: str | None = "dense",
    head: str | None = "dense",
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> TargetPlan:
    """Decide the targets of a method: see :func:`select_layers` (same arguments); also says why the rest stay dense.

    Raises:
        ValueError: an option has a wrong value, an explicit pattern matches no layer, or nothing is selected (the
            message lists why each layer was left dense and the names ``include`` patterns can choose from).
    """
    for option, value in (("first_layer", first_layer), ("head", head)):
        if value not in _OPTIONS:
            raise ValueError(f"{option} must be 'dense' or 'sparse', got {value!r}")
    types = tuple(types)
    layers = [(n, m) for n, m in model.named_modules() if n and isinstance(m, LAYER_TYPES)]
    if include is not None:
        for pattern in include:
            if not any(fnmatch.fnmatchcase(n, pattern) for n, m in layers if isinstance(m, types)):
                other = next((m for n, m in model.named_modules() if n and fnmatch.fnmatchcase(n, pattern)), None)
                hint = f" (only a {type(other).__name__}, which cannot be made sparse)" if other is not None else ""
                raise ValueError(
                    f"pattern '{pattern}' matches no {_kinds(types)} layer of {type(model).__name__}{hint}"
                )
        reasons = {n: None if matches(n, include) else "not matched by include" for n, _ in layers}
    else:
        reasons = default_reasons(model)
    first, last = first_and_head(model)
    for name, option, role in ((first, first_layer, "first layer"), (last, head, "classifier head")):
        if name is not None and option == "sparse":
            reasons[name] = None
        elif name is not None and option == "dense" and reasons.get(name) is None:
            reasons[name] = f"{role} (kept dense)"
    for name, module in layers:
        if reasons[name] is not None:
            continue
        if not isinstance(module, types):
            reasons[name] = f"{type(module).__name__} layers are not targets of this method"
        elif matches(name, exclude):
            reasons[name] = "excluded"
        elif filter_fn is not None and not filter_fn(module, name):
            reasons[name] = "filter_fn"
    plan = TargetPlan(
        [(n, m) for n, m in layers if reasons[n] is None], [(n, r) for n, r in reasons.items() if r is not None]
    )
    if not plan.targets:
        choices = [n for n, m in layers if isinstance(m, types) and not (isinstance(m, nn.Conv2d) and m.groups != 1)]
        shown = ", ".join(choices[:12]) + (", ..." if len(choices) > 12 else "")
        rule = "the default targets (layers inside repeated blocks)" if include is None else list(include)
        raise ValueError(
            f"no layer of {type(model).__name__} can be made sparse by {rule} ({_kinds(types)} layers only, "
            f"exclude={list(exclude)}). Left dense: {'; '.join(plan.dense_summary()) or 'nothing to convert'}. "
            f"Choose layers with include=[glob patterns] over: {shown or 'none (the model has no such layer)'}"
        )
    return plan


def select_layers(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    *,
    types: Sequence[type[nn.Module]] = LAYER_TYPES,
    first_layer: str | None = "dense",
    head: str | None = "dense",
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs a method makes sparse, in model order.

    Args:
        model: the model.
        include: module-name globs; ``None``: the default targets, chosen by structure (module docstring). Each
            explicit pattern must match at least one layer of ``types``.
        exclude: globs removed from the targets.
        types: the layer types that can be targets (e.g. ``(nn.Linear,)`` for a method without a conv variant).
        first_layer: ``"dense"`` keeps the model's first weight layer (patch embedding / stem) out of the targets
            even if a pattern matches it; ``"sparse"`` adds it; ``None`` leaves it to the patterns (or defaults).
        head: the same for the classifier head (see :func:`first_and_head`).
        filter_fn: optional extra predicate ``(module, name) -> bool``.

    Raises:
        ValueError: see :func:`plan_targets`.
    """
    return plan_targets(
        model, include, exclude, types=types, first_layer=first_layer, head=head, filter_fn=filter_fn
    ).targets


def replace_module_(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model``, in place."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
