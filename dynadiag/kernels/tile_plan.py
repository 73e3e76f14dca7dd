"""Tile plans of a frozen diagonal layer for tensor-core kernels: only the tiles that hold kept weights.

An apply primitive ``dst [N, B] = src [N, A] @ Wmat^T`` (the forward on ``W [out, in]``, ``grad_x`` on ``W^T``) is
cut into row blocks of ``R`` outputs. In each row block the source columns that hold kept weights are covered by
column *steps* of ``BK`` consecutive columns; a kernel computes one ``[tokens, BK] @ [BK, R]`` product per step and
nothing else. Two coverings:

- ``aligned=False`` (the grouped Triton kernel): greedy, each step starts at the first column not yet covered. This
  is the fewest steps for the row block (an interval cover of points), with no padding of windows to powers of two:
  a band of ``g`` consecutive diagonals over 32 rows spans ``31 + g`` columns, i.e. 2 steps of 32 at ``g = 32``
  (half the weights of a ``[64, 32]`` window are kept), and neighbouring runs whose windows overlap share steps.
- ``aligned=True`` (BSR): steps start at multiples of ``BK``, the blocks of torch's block-sparse (BSR) format.

Every kept weight lies in exactly one step, so ``pos`` (the weight's place in the packed tiles) is one index for
both directions: packing ``tiles.view(-1)[pos] = V.view(-1)`` and gathering a gradient ``dV = G.view(-1)[pos]``.
Plans are built once per offsets tensor (at the freeze; one host read of the offsets), kept on the device, and
reused by every later call: no per-call host work or synchronisation.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import torch

__all__ = ["TilePlan", "cached_plan", "layer_plans", "pack_tiles", "plan_tiles"]


@dataclass(frozen=True)
class TilePlan:
    """Column steps of one apply primitive ``dst [N, B] = src [N, A] @ Wmat^T``.

    Attributes:
        A: source columns. B: output rows of ``Wmat`` (columns of ``dst``). R: rows per block. BK: columns per step.
        layout: ``"kr"`` (tiles ``[S, BK, R]``, the ``B`` operand of ``tl.dot``) or ``"rk"`` (``[S, R, BK]``, BSR).
        block_ptr: ``[nblocks + 1]`` int32, the steps of row block ``b`` are ``block_ptr[b]:block_ptr[b + 1]``.
        step_col: ``[S]`` int32, the first source column of each step.
        step_block: ``[S]`` int32, the row block of each step.
        pos: ``[K * D]`` int64, where ``V.view(-1)[i]`` sits in ``tiles.view(-1)``.
    """

    A: int
    B: int
    R: int
    BK: int
    layout: str
    block_ptr: torch.Tensor
    step_col: torch.Tensor
    step_block: torch.Tensor
    pos: torch.Tensor

    @property
    def steps(self) -> int:
        return self.step_col.numel()

    def to(self, device: torch.device | str) -> TilePlan:
        """The same plan with its tensors on ``device``."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("block_ptr", "step_col", "step_block", "pos"):
            kw[name] = kw[name].to(device)
        return TilePlan(**kw)


def plan_tiles(
    rows: torch.Tensor,  # [K, D] output row of each value
    cols: torch.Tensor,  # [K, D] source column of each value
    A: int,
    B: int,
    R: int = 32,
    BK: int = 32,
    aligned: bool = False,
    layout: str = "kr",
    align: int = 1,
) -> TilePlan:
    """Plan the steps of ``Wmat [B, A]`` whose kept weights sit at ``(rows, cols)`` (see the module docstring).

    ``align``: greedy steps start at a multiple of it (``align = 8`` lets a kernel load 8 consecutive 16-bit or
    4-byte elements as one 16-byte vector); ``aligned=True`` means ``align = BK`` (BSR blocks).
    """
    if aligned:
        align = BK
    r = rows.detach().reshape(-1).cpu().numpy().astype(np.int64)
    c = cols.detach().reshape(-1).cpu().numpy().astype(np.int64)
    nblocks = -(-B // R)
    blk = r // R
    starts_per_block: list[np.ndarray] = []
    keys = np.unique(blk * A + c)  # sorted by (block, column): the occupied columns of each row block
    bounds = np.searchsorted(keys, np.arange(nblocks + 1) * A)
    for b in range(nblocks):
        occupied = keys[bounds[b] : bounds[b + 1]] - b * A
        if align == BK:
            starts = np.unique(occupied // BK) * BK
        else:
            starts, i = [], 0
            while i < len(occupied):  # greedy interval cover: a step from the first uncovered column (aligned down)
                start = occupied[i] - occupied[i] % align
                starts.append(start)
                i = int(np.searchsorted(occupied, start + BK))
            starts = np.asarray(starts, dtype=np.int64)
        starts_per_block.append(starts)
    counts = np.array([len(s) for s in starts_per_block], dtype=np.int64)
    step_col = np.concatenate(starts_per_block) if counts.sum() else np.zeros(0, dtype=np.int64)
    step_block = np.repeat(np.arange(nblocks), counts)
    step = np.searchsorted(step_block * A + step_col, blk * A + c, side="right") - 1  # the step covering each value
    w, rho = c - step_col[step], r % R
    if layout == "kr":
        pos = (step * BK + w) * R + rho
    elif layout == "rk":
        pos = (step * R + rho) * BK + w
    else:
        raise ValueError(f"plan_tiles: layout must be 'kr' or 'rk', got {layout!r}")
    block_ptr = np.zeros(nblocks + 1, dtype=np.int64)
    block_ptr[1:] = np.cumsum(counts)
    return TilePlan(
        A=A,
        B=B,
        R=R,
        BK=BK,
        layout=layout,
        block_ptr=torch.from_numpy(block_ptr).to(torch.int32),
        step_col=torch.from_numpy(step_col).to(torch.int32),
        step_block=torch.from_numpy(step_block).to(torch.int32),
        pos=torch.from_numpy(pos),
    )


def layer_plans(
    offsets: torch.Tensor, in_features: int, out_features: int, **kw
) -> tuple[TilePlan, TilePlan]:  # (forward on W, grad_x on W^T), on the offsets' device
    """The forward plan (``Wmat = W [out, in]``) and the ``grad_x`` plan (``Wmat = W^T``) of a frozen layer."""
    from dynadiag.functional import diag_index

    rows, cols = diag_index(in_features, out_features, offsets.detach().cpu())
    fwd = plan_tiles(rows, cols, in_features, out_features, **kw)
    bwd = plan_tiles(cols, rows, out_features, in_features, **kw)
    return fwd.to(offsets.device), bwd.to(offsets.device)


def pack_tiles(values: torch.Tensor, plan: TilePlan, dtype: torch.dtype) -> torch.Tensor:  # [K, D] -> [S, ., .]
    """The plan's tiles with ``values`` at their places, zeros elsewhere (one scatter on the device)."""
    shape = (plan.steps, plan.BK, plan.R) if plan.layout == "kr" else (plan.steps, plan.R, plan.BK)
    tiles = torch.zeros(plan.steps * plan.BK * plan.R, dtype=dtype, device=values.device)
    tiles.index_copy_(0, plan.pos, values.reshape(-1).to(dtype))
    return tiles.view(shape)


# id(offsets) -> (weak reference, version, data pointer, {spec: plans})
_CACHE: dict[int, tuple[weakref.ref, int, int, dict]] = {}


def cached_plan(offsets: torch.Tensor, spec: tuple, build: Callable[[], object]) -> object:
    """``build()`` once per offsets tensor, version and ``spec``: a frozen layer's offsets never change, so every
    call after the first (or after the freeze's ``prepare``) is a dictionary lookup."""
    key = id(offsets)
    state = (offsets._version, offsets.data_ptr())
    entry = _CACHE.get(key)
    if entry is None or entry[0]() is not offsets or entry[1:3] != state:
        if len(_CACHE) > 1024:
            for stale in [k for k, e in _CACHE.items() if e[0]() is None]:
                del _CACHE[stale]
        entry = (weakref.ref(offsets), *state, {})
        _CACHE[key] = entry
    plans = entry[3]
    if spec not in plans:
        plans[spec] = build()
    return plans[spec]
