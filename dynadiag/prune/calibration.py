"""Calibration: per-input-feature activation statistics of chosen layers, collected with forward hooks.

Pruning criteria that look at the data (Wanda, DSnoT, activation-weighted diagonal energy) only need, for every
input feature ``j`` of a linear layer, the token count and the running sums ``sum_n x[n, j]`` and
``sum_n x[n, j]^2``. These are accumulated on the fly from the layer's input, so memory is ``O(in_features)`` per
layer however many calibration tokens pass through, and no activation is ever stored.

Layer by layer (the Wanda/DSnoT protocol): the target layers are grouped by block (``blocks.3``, ``layer2.1``); a
group is calibrated on inputs produced by the *already pruned* earlier groups, pruned, and only then is the next
group calibrated. Each calibration pass stops the forward as soon as every layer of the group has seen its input,
so later blocks are not computed. Hooks are removed in a ``finally`` block, also when the forward fails.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["InputStats", "calibration_batches", "collect_input_stats", "group_by_block", "prune_layerwise_"]


@dataclass
class InputStats:
    """Running first and second moments of a layer's input features (accumulated in float64).

    Attributes:
        count: number of tokens seen (rows of the flattened ``[N, in]`` input).
        sum: ``sum_n x[n, j]``, ``[in]``.
        sum_sq: ``sum_n x[n, j]^2``, ``[in]``.
    """

    count: int
    sum: torch.Tensor  # [in] float64
    sum_sq: torch.Tensor  # [in] float64

    @classmethod
    def zeros(cls, features: int, device: torch.device | str | None = None) -> InputStats:
        z = torch.zeros(features, dtype=torch.float64, device=device)
        return cls(0, z, z.clone())

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``x`` (``[..., in]``)."""
        x2d = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)  # [N, in]
        self.count += x2d.shape[0]
        self.sum += x2d.sum(0)
        self.sum_sq += x2d.square().sum(0)

    @property
    def mean(self) -> torch.Tensor:  # [in]
        return self.sum / max(1, self.count)

    @property
    def var(self) -> torch.Tensor:  # [in], population variance
        return (self.sum_sq / max(1, self.count) - self.mean.square()).clamp_min(0.0)

    @property
    def norm(self) -> torch.Tensor:  # [in]
        """``||X[:, j]||_2`` over all calibration tokens: Wanda's activation norm."""
        return self.sum_sq.sqrt()

    @property
    def mean_sq(self) -> torch.Tensor:  # [in]
        """``E[x_j^2]``."""
        return self.sum_sq / max(1, self.count)


class _GroupDoneError(Exception):
    """Raised from a hook once every layer of the group has seen this batch's input: skips the rest."""


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["input"]


@torch.no_grad()
def collect_input_stats(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Iterable[torch.Tensor],
    *,
    stop_early: bool = True,
) -> dict[str, InputStats]:
    """Run ``model`` on ``batches`` and accumulate the input statistics of ``layers``.

    Args:
        model: the network (put in eval mode by the caller).
        layers: name -> module whose *input* is recorded (``nn.Linear`` or anything taking ``[..., in]``).
        batches: model inputs, e.g. ``[B, C, H, W]`` images already on the model's device.
        stop_early: abort each forward once all ``layers`` have fired (their outputs are not needed).

    Returns:
        name -> :class:`InputStats`, each sized by the layer's input features.
    """
    stats: dict[str, InputStats] = {}
    fired: set[str] = set()

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = _layer_input(args, kwargs)
            if name not in stats:
                stats[name] = InputStats.zeros(x.shape[-1], device=x.device)
            stats[name].update(x)
            fired.add(name)
            if stop_early and len(fired) == len(layers):
                raise _GroupDoneError

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n), with_kwargs=True) for n, m in layers.items()]
    try:
        for batch in batches:
            fired.clear()
            with contextlib.suppress(_GroupDoneError):
                model(batch)
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in layers if n not in stats]
    if missing:
        raise RuntimeError(f"calibration: layers {missing} never ran in the model's forward pass")
    return stats


_BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def group_by_block(names: Sequence[str]) -> list[list[str]]:
    """Group module names by their block (the prefix up to the first numeric component), keeping order.

    ``blocks.0.attn.qkv`` and ``blocks.0.mlp.fc2`` share the group ``blocks.0``; ``layer2.1.conv1`` goes to
    ``layer2.1``; a name without a numeric component is its own group.
    """
    groups: dict[str, list[str]] = {}
    for name in names:
        match = _BLOCK.match(name)
        groups.setdefault(match.group(1) if match else name, []).append(name)
    return list(groups.values())


def calibration_batches(loader: Iterable, num_batches: int, device: torch.device | str) -> list[torch.Tensor]:
    """The inputs of the first ``num_batches`` batches of ``loader`` (``(x, y)`` pairs or bare tensors)."""
    if num_batches < 1:
        raise ValueError(f"calibration needs at least one batch, got num_batches={num_batches}")
    out = []
    for batch in loader:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        out.append(x.to(device))
        if len(out) == num_batches:
            break
    if not out:
        raise ValueError("calibration: the data loader yielded no batch")
    return out


@torch.no_grad()
def prune_layerwise_(
    model: nn.Module,
    names: Sequence[str],
    batches: Sequence[torch.Tensor],
    prune_group: Callable[[dict[str, nn.Module], dict[str, InputStats]], None],
    *,
    sequential: bool = True,
) -> None:
    """Calibrate and prune ``names`` block by block.

    Args:
        model: network to prune in place; switched to eval mode for calibration and restored afterwards.
        names: target module names, in model order.
        batches: calibration inputs (reused for every group).
        prune_group: called with ``{name: module}`` and ``{name: InputStats}`` of one group; edits the model
            (zeroes weights, swaps modules). Later groups see the edited model.
        sequential: calibrate each group after the earlier ones are pruned (Wanda/DSnoT); ``False`` takes every
            layer's statistics from the dense model in one pass.
    """
    was_training = model.training
    model.eval()
    try:
        groups = group_by_block(names) if sequential else [list(names)]
        for group in groups:
            modules = {n: model.get_submodule(n) for n in group}
            stats = collect_input_stats(model, modules, batches)
            prune_group(modules, stats)
    finally:
        model.train(was_training)
