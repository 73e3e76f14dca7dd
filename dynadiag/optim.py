"""Keep an optimizer consistent when a sparse method swaps parameters (freeze, regrow into new tensors)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["remove_parameter_", "replace_parameter_", "replace_parameter_rows_"]


def replace_parameter_(
    optimizer: torch.optim.Optimizer,
    old: torch.Tensor,
    new: nn.Parameter,
    rows: torch.Tensor | None = None,
) -> bool:
    """Make ``optimizer`` update ``new`` instead of ``old``, carrying over its per-parameter state.

    Args:
        optimizer: any ``torch.optim`` optimizer.
        old: the parameter being retired.
        new: its replacement.
        rows: when ``new`` keeps only some rows of ``old`` (``new == old[rows]``), the indices of those rows;
            state tensors shaped like ``old`` are sliced the same way, scalar state (``step``) is kept.

    Returns:
        Whether ``old`` was found in the optimizer.
    """
    for group in optimizer.param_groups:
        for i, param in enumerate(group["params"]):
            if param is old:
                group["params"][i] = new
                state = optimizer.state.pop(old, None)
                if state is not None:
                    optimizer.state[new] = {key: _take_rows(value, old, rows) for key, value in state.items()}
                return True
    return False


def _take_rows(value: object, old: torch.Tensor, rows: torch.Tensor | None) -> object:
    if not torch.is_tensor(value) or value.shape != old.shape:
        return value
    return value if rows is None else value[rows.to(value.device)].clone()


def replace_parameter_rows_(
    optimizer: torch.optim.Optimizer,
    old: torch.Tensor,
    new: nn.Parameter,
    src: torch.Tensor,
    dst: torch.Tensor,
) -> bool:
    """Make ``optimizer`` update ``new`` instead of ``old`` when rows move, appear and disappear.

    Row ``src[i]`` of ``old`` is row ``dst[i]`` of ``new``; every other row of ``new`` is new. State tensors shaped
    like ``old`` (e.g. Adam's moments) follow the rows, with zeros for the new rows; scalar state (``step``) is kept.

    Args:
        optimizer: any ``torch.optim`` optimizer.
        old: the parameter being retired, ``[R_old, ...]``.
        new: its replacement, ``[R_new, ...]`` (same trailing shape).
        src: rows of ``old`` that carry over, ``[n]`` int64.
        dst: their rows in ``new``, ``[n]`` int64.

    Returns:
        Whether ``old`` was found in the optimizer.
    """
    if not replace_parameter_(optimizer, old, new):
        return False
    state = optimizer.state.get(new)
    for key, value in list((state or {}).items()):
        if torch.is_tensor(value) and value.shape == old.shape and value.dim() > 0:
            moved = value.new_zeros(new.shape)
            moved[dst.to(value.device)] = value[src.to(value.device)]
            state[key] = moved
    return True


def remove_parameter_(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> bool:
    """Stop ``optimizer`` from updating ``param`` and drop its state. Returns whether it was found."""
    for group in optimizer.param_groups:
        for i, candidate in enumerate(group["params"]):
            if candidate is param:
                del group["params"][i]
                optimizer.state.pop(param, None)
                return True
    return False
