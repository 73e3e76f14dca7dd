"""Host-side plans for the v2 CUDA apply kernel: V packed in output coordinates, per-output-tile diagonal lists.

The apply primitive (``csrc/cuda/diag_kernels.cuh``) on token-major activations, ``dst [N, B]`` from
``src [N, A]``, ``L = max(A, B)`` source columns on the circle (columns ``>= A`` are zero in the tall form):

- tall (``B >= A``): ``dst[n, r] = sum_k V[k, c] src[n, c]``, ``c = (r - p_k) mod B``, only where ``c < A``
- wide (``B <= A``): ``dst[n, r] = sum_k V[k, r] src[n, (r + p_k) mod A]``

For an output tile ``[r0, r0 + BR)`` the ``BR`` source columns that diagonal ``k`` reads are one contiguous run
of the *extended* source row ``ext[j] = src[(j mod L)]`` (zero where ``j mod L >= A``), starting at
``s_k = (r0 - p_k) mod L`` (tall) or ``(r0 + p_k) mod A`` (wide). The plan lists, per output tile, the diagonals
that reach it (tall form: only those whose ``A``-long run overlaps the tile), sorted by ``s_k`` and grouped into
chunks whose runs fit one staged window of at most ``wmax`` extended columns. The kernel stages a chunk's window
once (the wrap is resolved while staging, so the inner loop has no wrap or validity test) and every entry of the
chunk reads its ``BR`` columns at ``shift = s_k - w0`` with the pre-packed values ``vpack[e, :BR]`` (zero where
the diagonal has no element in that output), one FMA per value and token.

Everything here runs on CPU tensors: :func:`emulate_apply` executes a plan in PyTorch so the tests can check it
against the reference index map for odd shapes without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ApplyPlan", "emulate_apply", "pack_values", "plan_apply"]


@dataclass(frozen=True)
class ApplyPlan:
    """One apply primitive's plan (all index tensors int32 except ``vindex``).

    Attributes:
        A: source columns. B: output columns. L: ``max(A, B)``. tall: the tall form (``B >= A``).
        tile: outputs per tile (``BR``). wmax: the window limit the chunks respect. max_window: the widest chunk.
        tile_chunks: ``[T + 1]`` chunk range of each output tile (``T = ceil(B / BR)``).
        chunks: ``[C, 4]`` per chunk ``(entry_begin, entry_end, w0, W)``: entries and the staged extended window
            ``[w0, w0 + W)``.
        shifts: ``[E]`` per entry, where its ``BR`` columns start inside its chunk's window.
        vindex: ``[E, BR]`` int64 index into ``values.reshape(-1)`` of each packed value, ``-1`` for a zero.
        diag: ``[E]`` the diagonal (row of ``values``) of each entry.
    """

    A: int
    B: int
    L: int
    tall: bool
    tile: int
    wmax: int
    max_window: int
    tile_chunks: torch.Tensor
    chunks: torch.Tensor
    shifts: torch.Tensor
    vindex: torch.Tensor
    diag: torch.Tensor

    def to(self, device: torch.device | str) -> ApplyPlan:
        """The same plan with its tensors on ``device``."""
        moved = {k: getattr(self, k).to(device) for k in ("tile_chunks", "chunks", "shifts", "vindex", "diag")}
        return ApplyPlan(self.A, self.B, self.L, self.tall, self.tile, self.wmax, self.max_window, **moved)


def plan_apply(offsets: torch.Tensor, A: int, B: int, tall: bool, tile: int, wmax: int) -> ApplyPlan:
    """Plan one apply primitive (``dst [N, B]`` from ``src [N, A]``) for diagonals at ``offsets``.

    Args:
        offsets: ``[K]`` int64, strictly ascending, in ``[0, max(A, B))`` (any device; planned on the CPU).
        A: source columns. B: output columns.
        tall: the tall form (needs ``B >= A``) or the wide one (``B <= A``). Square layers use both: the forward
            is tall (``out >= in``), ``grad_x`` (the transposed pattern) wide.
        tile: outputs per tile (``BR``, the kernel's tile width).
        wmax: most extended columns one staged window may hold; at least ``tile``.

    Returns:
        The plan, on the CPU.
    """
    if wmax < tile:
        raise ValueError(f"plan_apply: wmax ({wmax}) must be at least the tile width ({tile})")
    if (tall and B < A) or (not tall and B > A):
        raise ValueError(f"plan_apply: the {'tall' if tall else 'wide'} form needs B {'>=' if tall else '<='} A")
    off = offsets.detach().to("cpu", torch.int64)
    L = max(A, B)
    D = min(A, B)
    k_count = off.numel()
    tiles = (B + tile - 1) // tile
    r0 = torch.arange(tiles, dtype=torch.int64) * tile  # [T]
    j = torch.arange(tile, dtype=torch.int64)  # [BR]
    if tall:
        start = (r0[:, None] - off[None, :]) % L  # [T, K]
        col = (start[:, :, None] + j) % L  # [T, K, BR] source column of each output
        valid = (col < A) & ((r0[:, None, None] + j) < B)
        vidx = torch.arange(k_count)[None, :, None] * D + col  # values[k, c]
    else:
        start = (r0[:, None] + off[None, :]) % A
        valid = ((r0[:, None, None] + j) < B).expand(tiles, k_count, tile)
        vidx = (torch.arange(k_count)[None, :, None] * D + (r0[:, None, None] + j)).expand(tiles, k_count, tile)
    reach = valid.any(dim=2)  # [T, K]: the diagonal has at least one element in the tile
    tile_chunks, chunks, shifts, entry_rows = [0], [], [], []
    max_window = 0
    whole_row = L + tile - 1 <= wmax  # every run fits one window [0, L + BR - 1): stage the row once per tile
    for t in range(tiles):
        ks = reach[t].nonzero().flatten()
        s = start[t, ks]
        order = torch.argsort(s, stable=True)
        ks, s = ks[order].tolist(), s[order].tolist()
        i = 0
        while i < len(ks):
            if whole_row:
                w0, end = 0, len(ks)
            else:
                w0, end = s[i], i + 1
                while end < len(ks) and s[end] - w0 + tile <= wmax:
                    end += 1
            width = (s[end - 1] - w0 + tile) if not whole_row else L + tile - 1
            begin = len(shifts)
            shifts.extend(v - w0 for v in s[i:end])
            entry_rows.extend((t, k) for k in ks[i:end])
            chunks.append((begin, len(shifts), w0, width))
            max_window = max(max_window, width)
            i = end
        tile_chunks.append(len(chunks))
    rows = torch.tensor(entry_rows, dtype=torch.int64).reshape(-1, 2)
    vindex = torch.where(valid[rows[:, 0], rows[:, 1]], vidx[rows[:, 0], rows[:, 1]], -1)
    return ApplyPlan(
        A=A,
        B=B,
        L=L,
        tall=tall,
        tile=tile,
        wmax=wmax,
        max_window=max(max_window, tile),  # no entries at all (K = 0): still a valid (unused) buffer width
        tile_chunks=torch.tensor(tile_chunks, dtype=torch.int32),
        chunks=torch.tensor(chunks, dtype=torch.int32).reshape(-1, 4),
        shifts=torch.tensor(shifts, dtype=torch.int32),
        vindex=vindex.reshape(-1, tile),
        diag=rows[:, 1].to(torch.int32),
    )


def pack_values(values: torch.Tensor, plan: ApplyPlan) -> torch.Tensor:  # [K, D] -> [E, BR]
    """``vpack[e, j]``: the value entry ``e`` multiplies output ``r0 + j`` by (0 where it has none); one gather."""
    flat = values.reshape(-1)
    index = plan.vindex.to(values.device)
    packed = flat.index_select(0, index.clamp_min(0).reshape(-1)).view(index.shape)
    return packed.masked_fill(index < 0, 0)


def emulate_apply(src: torch.Tensor, vpack: torch.Tensor, plan: ApplyPlan) -> torch.Tensor:  # [N, A] -> [N, B]
    """Run a plan the way the v2 kernel does (stage each chunk's window with the wrap, then shifted FMAs)."""
    n = src.shape[0]
    ext_cols = torch.arange(plan.L + 2 * plan.tile + plan.wmax) % plan.L
    ext = torch.zeros(n, plan.L, dtype=src.dtype, device=src.device)
    ext[:, : plan.A] = src
    ext = ext[:, ext_cols]  # the extended row: ext[:, j] = src[:, j mod L], zero at columns >= A
    tiles = plan.tile_chunks.numel() - 1
    dst = torch.zeros(n, tiles * plan.tile, dtype=src.dtype, device=src.device)
    for t in range(tiles):
        acc = torch.zeros(n, plan.tile, dtype=src.dtype, device=src.device)
        for c in range(int(plan.tile_chunks[t]), int(plan.tile_chunks[t + 1])):
            begin, end, w0, width = plan.chunks[c].tolist()
            window = ext[:, w0 : w0 + width]  # what the kernel stages
            for e in range(begin, end):
                shift = int(plan.shifts[e])
                assert shift >= 0 and shift + plan.tile <= width, "entry reads outside its chunk's window"
                acc += vpack[e] * window[:, shift : shift + plan.tile]
        dst[:, t * plan.tile : (t + 1) * plan.tile] = acc
    return dst[:, : plan.B]
