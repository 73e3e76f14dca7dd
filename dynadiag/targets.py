"""Which layers of a model a sparse method touches: the one place that decides layer targets.

Every method (DynaDiag's :func:`~dynadiag.sparsify_`, the masked DST baselines, DiagHeur, post-training pruning)
asks :func:`select_layers` for its targets, so "the same targets" is true by construction. A target is an
``nn.Linear`` (or ``nn.Conv2d``, when a method allows convolutions) chosen by glob patterns on module names;
:func:`first_and_head` names the stem / patch embedding and the classifier, which methods keep dense by default.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

from torch import nn

__all__ = [
    "DEFAULT_TARGETS",
    "LAYER_TYPES",
    "first_and_head",
    "matches",
    "replace_module_",
    "select_layers",
]

#: timm module names made sparse by default; ``head``/``fc``, ``patch_embed`` and the ResNet stem stay dense.
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

#: layer types a method can make sparse
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)

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
        classifier = get_classifier()
        head = next((n for n, m in named if m is classifier), None)
    if head is None:
        head = next((n for n, m in reversed(named) if isinstance(m, nn.Linear)), None)
    return first, head


def _kinds(types: Sequence[type[nn.Module]]) -> str:
    return "/".join(f"nn.{t.__name__}" for t in types)


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
        include: module-name globs (``None``: :data:`DEFAULT_TARGETS`). Each explicit pattern must match at least
            one layer of ``types``.
        exclude: globs removed from the matches.
        types: the layer types that can be targets (e.g. ``(nn.Linear,)`` for a method without a conv variant).
        first_layer: ``"dense"`` keeps the model's first weight layer (patch embedding / stem) out of the targets
            even if a pattern matches it; ``"sparse"`` adds it; ``None`` leaves it to the patterns.
        head: the same for the classifier head (see :func:`first_and_head`).
        filter_fn: optional extra predicate ``(module, name) -> bool``.

    Raises:
        ValueError: an option has a wrong value, an explicit pattern matches no layer, or nothing is selected.
    """
    for option, value in (("first_layer", first_layer), ("head", head)):
        if value not in _OPTIONS:
            raise ValueError(f"{option} must be 'dense' or 'sparse', got {value!r}")
    types = tuple(types)
    patterns = tuple(include) if include is not None else DEFAULT_TARGETS
    named = [(n, m) for n, m in model.named_modules() if n and isinstance(m, types)]
    if include is not None:
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in named):
                other = next((m for n, m in model.named_modules() if n and fnmatch.fnmatchcase(n, pattern)), None)
                hint = f" (only a {type(other).__name__}, which cannot be made sparse)" if other is not None else ""
                raise ValueError(
                    f"pattern '{pattern}' matches no {_kinds(types)} layer of {type(model).__name__}{hint}"
                )
    chosen = {n for n, _ in named if matches(n, patterns) and not matches(n, exclude)}
    first, last = first_and_head(model) if (first_layer or head) else (None, None)
    for name, option in ((first, first_layer), (last, head)):
        if name is None or option is None:
            continue
        if option == "sparse" and any(n == name for n, _ in named):
            chosen.add(name)
        elif option == "dense":
            chosen.discard(name)
    targets = [(n, m) for n, m in named if n in chosen and (filter_fn is None or filter_fn(m, n))]
    if not targets:
        rules = f"{_kinds(types)} layers only, exclude={list(exclude)}"
        if first_layer or head:
            rules += f"; the first layer '{first}' is {first_layer} and the head '{last}' is {head}"
        raise ValueError(f"no layer of {type(model).__name__} matches {list(patterns)} ({rules})")
    return targets


def replace_module_(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model``, in place."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
