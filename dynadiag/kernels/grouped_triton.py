"""``grouped_triton`` backend: grouped diagonals as ``tl.dot`` band tiles (tensor cores: bf16, TF32).

Same primitives and tiling as ``csrc/grouped`` (see :mod:`dynadiag.kernels.grouped_cpu`): the sorted offsets are
split into runs of consecutive values; for an output block of ``R`` rows a run of ``L`` offsets reads one window of
``R + L - 1`` consecutive (wrapping) source columns, so its contribution is a dense ``[tokens x W] @ [W x R]``
product with a band-shaped ``B``. Here the band tiles, the tile list per row block and the padded source (wrap and
the tall form's zero columns made explicit) are built with PyTorch ops on the device, once per call, and a Triton
program per (token block, row block) sums ``tl.dot`` over its tiles. ``grad_values`` reduces over tokens: one program
per (position block, run) computes ``S_block^T @ Q_window`` with ``tl.dot`` and PyTorch keeps the band.

Availability: CUDA tensors when ``triton`` imports; CPU tensors only under ``TRITON_INTERPRET=1`` (set before the
first launch), which is how CI checks it. In the interpreter ``tl.dot`` on bf16 is wrong, so tests use fp32 there.
No ``tl.make_block_ptr``. Explicit-only in the registry (priority -1): ``auto`` does not pick it.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from dynadiag.groups import offset_runs
from dynadiag.kernels import ops
from dynadiag.kernels.triton import TritonBackend

try:
    import triton.language as tl
except ImportError:  # the backend reports itself unavailable; the kernels below are never decorated
    tl = None

__all__ = ["BACKEND", "GroupedTritonBackend", "band_tiles", "grouped_apply", "grouped_sddmm"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROWS = 32  # output rows per band tile
BLOCK_K = 32  # window columns per tl.dot step
MAX_RUN = 64  # longest run in one tile


def _apply_kernel(
    staged, tiles, starts, ptr, dst, N, B, width, KW: tl.constexpr, BLOCK_N: tl.constexpr, R: tl.constexpr
):
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, R)
    rk = tl.arange(0, 32)
    mask_n = rn < N
    row = rn.to(tl.int64) * width
    acc = tl.zeros((BLOCK_N, R), dtype=tl.float32)
    t0 = tl.load(ptr + pid_r)
    t1 = tl.load(ptr + pid_r + 1)
    for t in range(t0, t1):
        start = tl.load(starts + t)
        base = t * (KW * R)  # int32 is enough: tiles hold < 2**31 elements
        for kk in range(0, KW, 32):
            a = tl.load(staged + row[:, None] + (start + kk + rk)[None, :], mask=mask_n[:, None], other=0.0)
            b = tl.load(tiles + base + (kk + rk)[:, None] * R + rr[None, :])
            acc += tl.dot(a, b)
    cols = pid_r * R + rr
    out = dst + rn.to(tl.int64)[:, None] * B + cols[None, :]
    tl.store(out, acc.to(dst.dtype.element_ty), mask=mask_n[:, None] & (cols < B)[None, :])


def _sddmm_kernel(st, q, scratch, starts, N, ldq, KW: tl.constexpr, BLOCK_N: tl.constexpr, R: tl.constexpr):
    # One program per (position block, run): scratch[task] = S[:, block]^T @ Q[:, window]  ([R, KW], fp32).
    task = tl.program_id(0)
    t_0 = tl.load(starts + 2 * task)
    q_0 = tl.load(starts + 2 * task + 1)
    rr = tl.arange(0, R)
    rw = tl.arange(0, KW)
    acc = tl.zeros((R, KW), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        mask_n = rn < N
        rn64 = rn.to(tl.int64)
        s = tl.load(st + (t_0 + rr).to(tl.int64)[:, None] * N + rn64[None, :], mask=mask_n[None, :], other=0.0)
        qq = tl.load(q + rn64[:, None] * ldq + (q_0 + rw)[None, :], mask=mask_n[:, None], other=0.0)
        acc += tl.dot(s, qq)
    out = scratch + task.to(tl.int64) * R * KW + rr[:, None] * KW + rw[None, :]
    tl.store(out, acc)


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """Decorate the kernels on first use, so ``TRITON_INTERPRET`` set by then takes effect."""
    import triton

    return triton.jit(_apply_kernel), triton.jit(_sddmm_kernel)


def _runs(offsets: torch.Tensor) -> torch.Tensor:  # [nruns, 3] int64 (first index, first offset, length) on CPU
    runs = offset_runs(offsets.cpu(), MAX_RUN)
    return torch.tensor(runs, dtype=torch.long).reshape(-1, 3)


def _window(max_len: int) -> int:
    """Window width of a tile: ``R + L - 1`` rounded up to a power of two (``tl.arange``), at least ``BLOCK_K``."""
    return max(BLOCK_K, 1 << (ROWS + max_len - 2).bit_length())


def band_tiles(
    values: torch.Tensor,  # [K, D]
    offsets: torch.Tensor,  # [K] sorted
    in_cols: int,
    out_cols: int,
    tall: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """Band tiles of the apply primitive (``tall``: ``B >= A``; wide: ``B <= A``; ``A = in_cols``, ``B = out_cols``).

    Returns:
        ``tiles [T, KW, R]`` (``tiles[t, w, rho]`` multiplies window column ``w`` into output row ``rho`` of its
        block), ``starts [T]`` (the window's first column in the padded source), ``ptr [nblocks + 1]`` (tiles of row
        block ``b`` are ``ptr[b]:ptr[b+1]``), ``padl`` (left padding of the source) and ``KW`` (window width,
        a multiple of 32).
    """
    A, B = in_cols, out_cols
    device = values.device
    runs = _runs(offsets)
    nblocks = -(-B // ROWS)
    max_len = int(runs[:, 2].max()) if len(runs) else 1
    kw = _window(max_len)
    padl = kw if tall else 0
    block = torch.arange(nblocks)[:, None].expand(nblocks, len(runs))  # [nb, nr]
    first, p0, length = (runs[:, i][None, :].expand_as(block) for i in range(3))
    if tall:
        s = (block * ROWS - p0 - (length - 1)) % B
        keep = (s < A) | (s + ROWS + length - 1 > B)
        rep = torch.where(s < A, s, s - B)
    else:
        rep = (block * ROWS + p0) % A
        keep = torch.ones_like(block, dtype=torch.bool)
    block, first, p0, length, rep = (t[keep] for t in (block, first, p0, length, rep))  # [T], block-major order
    w = torch.arange(kw)[None, :, None]
    rho = torch.arange(ROWS)[None, None, :]
    r = block[:, None, None] * ROWS + rho  # [T, 1, R]
    if tall:
        idx = rho + length[:, None, None] - 1 - w
        col = (rep[:, None, None] + w) % B
        valid = (idx >= 0) & (idx < length[:, None, None]) & (r < B) & (col < A)
    else:
        idx = w - rho
        col = r.expand(-1, kw, -1)
        valid = (idx >= 0) & (idx < length[:, None, None]) & (r < B)
    row = (first[:, None, None] + idx).clamp(0, max(values.shape[0] - 1, 0))
    col = col.clamp(0, values.shape[1] - 1)
    valid = valid.to(device)
    tiles = values[row.to(device), col.to(device)] * valid  # [T, KW, R]
    counts = torch.bincount(block, minlength=nblocks)
    ptr = torch.zeros(nblocks + 1, dtype=torch.long)
    ptr[1:] = counts.cumsum(0)
    return tiles.contiguous(), (rep + padl).to(device), ptr.to(device), padl, kw


def _staged(src: torch.Tensor, period: int, padl: int, kw: int) -> torch.Tensor:  # [N, padl + A + kw + 32]
    """``staged[n, padl + c] = src[n, c mod period]`` where that column is ``< A``, else 0 (wrap + zero columns)."""
    a = src.shape[1]
    cols = (torch.arange(-padl, a + kw + BLOCK_K, device=src.device)) % period
    ext = torch.cat([src, src.new_zeros(src.shape[0], 1)], dim=1)
    return ext.index_select(1, torch.where(cols < a, cols, a)).contiguous()


def grouped_apply(src: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, out_cols: int, tall: bool):
    """``tall``: ``dst[n, r] = sum_k V[k, c] src[n, c]``, ``c = (r - p_k) mod B`` if ``c < A``; wide:
    ``dst[n, r] = sum_k V[k, r] src[n, (r + p_k) mod A]``. ``src [N, A]``, ``values [K, D]`` -> ``[N, B]``."""
    apply_kernel, _ = _kernels()
    n, a = src.shape
    dst = src.new_empty(n, out_cols)
    if n == 0:
        return dst
    if offsets.numel() == 0:
        return dst.zero_()
    tiles, starts, ptr, padl, kw = band_tiles(values, offsets, a, out_cols, tall)
    staged = _staged(src, out_cols if tall else a, padl, kw)
    block_n = 32
    grid = (ptr.numel() - 1, -(-n // block_n))
    apply_kernel[grid](
        staged, tiles.to(src.dtype), starts, ptr, dst, n, out_cols, staged.shape[1], KW=kw, BLOCK_N=block_n, R=ROWS
    )
    return dst


def grouped_sddmm(s: torch.Tensor, q: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:  # [K, D]
    """``dV[k, t] = sum_n s[n, t] q[n, (t + p_k) mod M]`` for ``s [N, D]``, ``q [N, M]`` (fp32 accumulation)."""
    _, sddmm_kernel = _kernels()
    n, d = s.shape
    m = q.shape[1]
    k = offsets.numel()
    if k == 0 or n == 0:
        return s.new_zeros(k, d)
    runs = _runs(offsets)
    nblocks = -(-d // ROWS)
    kw = _window(int(runs[:, 2].max()))
    dpad = nblocks * ROWS
    st = torch.zeros(dpad, n, dtype=s.dtype, device=s.device)  # S^T, rows padded to whole blocks
    st[:d] = s.t()
    qcols = torch.arange(m + kw + dpad, device=q.device) % m  # periodic Q, wide enough for every window
    qp = q.index_select(1, qcols).contiguous()
    block = torch.arange(nblocks)[:, None].expand(nblocks, len(runs)).reshape(-1)
    run = torch.arange(len(runs))[None, :].expand(nblocks, len(runs)).reshape(-1)
    t_0 = block * ROWS
    q_0 = (t_0 + runs[run, 1]) % m
    starts = torch.stack([t_0, q_0], dim=1).reshape(-1).to(s.device)
    scratch = torch.empty(block.numel(), ROWS, kw, dtype=torch.float32, device=s.device)
    sddmm_kernel[(block.numel(),)](st, qp, scratch, starts, n, qp.shape[1], KW=kw, BLOCK_N=32, R=ROWS)
    # Keep the band: dV[first + i, t_0 + rho] = scratch[task, rho, rho + i].
    out = s.new_zeros(k, dpad, dtype=torch.float32)
    for j, (first, _, length) in enumerate(runs.tolist()):
        tasks = torch.arange(nblocks) * len(runs) + j
        i = torch.arange(length)
        rho = torch.arange(ROWS)
        band = scratch[tasks.to(s.device)][:, rho[None, :], (rho[None, :] + i[:, None])]  # [nblocks, L, R]
        out[first : first + length] = band.permute(1, 0, 2).reshape(length, dpad)
    return out[:, :d].to(s.dtype)


class _GroupedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, offsets, out_features):  # x [N, in], values [K, D]
        ctx.save_for_backward(x, values, offsets)
        return grouped_apply(x, values, offsets, out_features, tall=out_features >= x.shape[1])

    @staticmethod
    def backward(ctx, grad_y):  # grad_y [N, out]
        x, values, offsets = ctx.saved_tensors
        in_features, out_features = x.shape[1], grad_y.shape[1]
        tall = out_features >= in_features
        grad_y = grad_y.contiguous()
        grad_x = grad_v = None
        if ctx.needs_input_grad[0]:
            grad_x = grouped_apply(grad_y, values, offsets, in_features, tall=not tall)
        if ctx.needs_input_grad[1]:
            grad_v = grouped_sddmm(x, grad_y, offsets) if tall else grouped_sddmm(grad_y, x, offsets)
        return grad_x, grad_v, None, None


class GroupedTritonBackend(TritonBackend):
    """``tl.dot`` band tiles for grouped diagonal layers; compiled on CUDA, interpreted on CPU."""

    name = "grouped_triton"

    def diag_linear(
        self,
        x: torch.Tensor,  # [..., in]
        values: torch.Tensor,  # [K, D]
        offsets: torch.Tensor,  # [K] int64, sorted ascending
        bias: torch.Tensor | None,  # [out]
        in_features: int,
        out_features: int,
    ) -> torch.Tensor:  # [..., out]
        """``y = x W^T + b`` for a frozen (grouped) diagonal layer; differentiable in x, values, bias."""
        return ops.diag_linear(
            "grouped_triton", None, _DTYPES, x, values, offsets, bias, in_features, out_features, _GroupedFn.apply
        )


BACKEND = GroupedTritonBackend()
