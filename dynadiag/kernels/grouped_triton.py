"""``grouped_triton`` backend: frozen (grouped) diagonal layers as ``tl.dot`` tiles that hold kept weights.

A frozen layer's tile plan (:mod:`dynadiag.kernels.tile_plan`) is built once per offsets tensor, at the freeze
(:meth:`GroupedTritonBackend.prepare`) or on the first call, and kept on the device; a call packs the values into
the plan's tiles (one scatter on the device) and launches one kernel: no host index building, no ``.cpu()``, no
synchronisation. Per row block of ``R = 32`` outputs the plan lists column steps of ``BK = 32`` source columns that
hold kept weights (a greedy cover with steps at multiples of 8 columns, so activations load as 16-byte vectors: a
band of ``g = 32`` consecutive diagonals spans 63 columns, two steps, instead of a window padded to a power of two
for the longest run of the layer). A program per (row block, token block) sums ``tl.dot([tokens, BK] @ [BK, R])``
over its steps with fp32 accumulation; bf16/fp16 run on tensor cores, fp32 in TF32 when
``torch.get_float32_matmul_precision()`` allows it (``"high"``/``"medium"``), else in full fp32 (``"highest"``,
torch's default), like cuBLAS for dense layers.

Backward: ``grad_x`` is the same kernel on the transposed plan (``W^T``); ``grad_values`` is a block SDDMM on the
forward plan's steps, ``[BK, tokens] @ [tokens, R]`` per step (tokens split into slices on large GPUs, added in a
fixed order: deterministic), then one gather of the kept weights (``pos``).

Availability: CUDA tensors when ``triton`` imports; CPU tensors only under ``TRITON_INTERPRET=1`` (set before the
first launch), which is how CI checks it. In the interpreter ``tl.dot`` on bf16 is wrong, so tests use fp32 there.
No ``tl.make_block_ptr``. Explicit-only in the registry (priority -1): the measured ``auto`` may add it as a
candidate.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from dynadiag.kernels import ops
from dynadiag.kernels.dense import DiagOps
from dynadiag.kernels.tile_plan import TilePlan, cached_plan, layer_plans, pack_tiles
from dynadiag.kernels.triton import TritonBackend

try:
    import triton.language as tl
except ImportError:  # the backend reports itself unavailable; the kernels below are never decorated
    tl = None

__all__ = ["BACKEND", "DIAG_OPS", "GroupedTritonBackend", "grouped_apply", "grouped_grad_values", "plans"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROWS = 32  # output rows per tile (R)
BLOCK_K = 32  # source columns per step (BK)
# Steps start at multiples of 8 columns, so a row's 32 columns are four 16-byte vectors (bf16/fp16; fp32: eight).
# Free for grouped layers whose g is a multiple of 8: their bands start at multiples of g.
ALIGN = 8


def _apply_kernel(
    src, tiles, step_col, block_ptr, dst, N, A, B,
    BLOCK_N: tl.constexpr, R: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    pid_b = tl.program_id(0)  # row block fastest: programs of one token block share its rows of src in L2
    pid_n = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, R)
    rk = tl.arange(0, BK)
    mask_n = rn < N
    row = rn.to(tl.int64) * A
    acc = tl.zeros((BLOCK_N, R), dtype=tl.float32)
    s0 = tl.load(block_ptr + pid_b)
    s1 = tl.load(block_ptr + pid_b + 1)
    for s in range(s0, s1):
        cols = tl.multiple_of(tl.load(step_col + s), ALIGN) + rk  # aligned steps: 16-byte vector loads
        a = tl.load(src + row[:, None] + cols[None, :], mask=mask_n[:, None] & (cols < A)[None, :], other=0.0)
        b = tl.load(tiles + s * (BK * R) + rk[:, None] * R + rr[None, :])  # int32: < 2**31 elements (checked)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    out_cols = pid_b * R + rr
    out = dst + rn.to(tl.int64)[:, None] * B + out_cols[None, :]
    tl.store(out, acc.to(dst.dtype.element_ty), mask=mask_n[:, None] & (out_cols < B)[None, :])


def _grad_kernel(
    x, gy, step_col, step_block, scratch, N, A, B, S, per_slice,
    BLOCK_N: tl.constexpr, R: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    # scratch[slice, s] = x[tokens, step columns]^T @ gy[tokens, block rows]  ([BK, R], fp32), tokens of the slice.
    s = tl.program_id(0)
    sl = tl.program_id(1)
    rr = tl.arange(0, R)
    rk = tl.arange(0, BK)
    cols = tl.multiple_of(tl.load(step_col + s), ALIGN) + rk
    rows = tl.load(step_block + s) * R + rr
    n_begin = sl * per_slice
    n_end = tl.minimum(N, n_begin + per_slice)
    acc = tl.zeros((BK, R), dtype=tl.float32)
    for n0 in range(n_begin, n_end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        mask_n = rn < n_end
        rn64 = rn.to(tl.int64)
        xt = tl.load(x + rn64[None, :] * A + cols[:, None], mask=mask_n[None, :] & (cols < A)[:, None], other=0.0)
        g = tl.load(gy + rn64[:, None] * B + rows[None, :], mask=mask_n[:, None] & (rows < B)[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(xt, g, input_precision="ieee")
        else:
            acc += tl.dot(xt, g)
    base = (sl * S + s) * (BK * R)  # int32: the scratch holds < 2**31 elements (checked)
    tl.store(scratch + base + rk[:, None] * R + rr[None, :], acc)


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """Decorate the kernels on first use, so ``TRITON_INTERPRET`` set by then takes effect."""
    import triton

    return triton.jit(_apply_kernel), triton.jit(_grad_kernel)


def plans(offsets: torch.Tensor, in_features: int, out_features: int) -> tuple[TilePlan, TilePlan]:
    """The layer's (forward, ``grad_x``) tile plans on the offsets' device, built once per offsets tensor."""
    spec = ("grouped_triton", in_features, out_features, ROWS, BLOCK_K, ALIGN)
    build = lambda: layer_plans(offsets, in_features, out_features, R=ROWS, BK=BLOCK_K, align=ALIGN)  # noqa: E731
    return cached_plan(offsets, spec, build)


def _ieee(dtype: torch.dtype) -> bool:
    """Full-precision fp32 products unless torch's float32 matmul precision allows TF32."""
    return dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block_n(n: int) -> int:
    return 16 if n <= 16 else 32 if n <= 32 else 64


def grouped_apply(src: torch.Tensor, tiles: torch.Tensor, plan: TilePlan) -> torch.Tensor:  # [N, A] -> [N, B]
    """``dst = src @ Wmat^T`` from the plan's packed ``tiles [S, BK, R]`` (:func:`pack_tiles`)."""
    apply_kernel, _ = _kernels()
    n = src.shape[0]
    dst = src.new_empty(n, plan.B)
    if n == 0:
        return dst
    if plan.steps == 0:
        return dst.zero_()
    block_n = _block_n(n)
    grid = (plan.block_ptr.numel() - 1, -(-n // block_n))
    apply_kernel[grid](
        src, tiles, plan.step_col, plan.block_ptr, dst, n, plan.A, plan.B,
        BLOCK_N=block_n, R=plan.R, BK=plan.BK, IEEE=_ieee(src.dtype), ALIGN=ALIGN,
    )  # fmt: skip
    return dst


def _slices(steps: int, n: int, device: torch.device) -> int:
    """Token slices for grad_values: about two programs per SM when the steps alone are too few."""
    if device.type != "cuda" or steps == 0:
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(target // steps, n // 512))


def grouped_grad_values(x: torch.Tensor, grad_y: torch.Tensor, plan: TilePlan, shape: tuple[int, int]) -> torch.Tensor:
    """``grad_values [K, D]`` (``shape``) of the layer with forward plan ``plan``: ``x [N, in]``, ``grad_y [N, out]``.

    Returns:
        The gradient, in ``x``'s dtype.
    """
    _, grad_kernel = _kernels()
    n = x.shape[0]
    if n == 0 or plan.steps == 0:
        return x.new_zeros(shape)
    slices = _slices(plan.steps, n, x.device)
    block_n = _block_n(n)
    per_slice = _cdiv(_cdiv(n, slices), block_n) * block_n
    slices = _cdiv(n, per_slice)
    if slices * plan.steps * plan.BK * plan.R >= 2**31:
        raise ValueError("grouped_triton: the layer's tiles exceed 2**31 elements (int32 indexing in the kernels)")
    scratch = torch.empty(slices, plan.steps * plan.BK * plan.R, dtype=torch.float32, device=x.device)
    grad_kernel[(plan.steps, slices)](
        x, grad_y, plan.step_col, plan.step_block, scratch, n, plan.A, plan.B, plan.steps, per_slice,
        BLOCK_N=block_n, R=plan.R, BK=plan.BK, IEEE=_ieee(x.dtype), ALIGN=ALIGN,
    )  # fmt: skip
    summed = scratch[0] if slices == 1 else scratch.sum(0)  # fixed order: deterministic
    return summed.index_select(0, plan.pos).view(shape).to(x.dtype)


def _fwd(x: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, out_features: int) -> torch.Tensor:
    plan = plans(offsets, x.shape[1], out_features)[0]
    return grouped_apply(x.contiguous(), pack_tiles(values, plan, x.dtype), plan)


def _bwd_x(grad_y: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, in_features: int) -> torch.Tensor:
    plan = plans(offsets, in_features, grad_y.shape[1])[1]
    return grouped_apply(grad_y.contiguous(), pack_tiles(values, plan, grad_y.dtype), plan)


def _bwd_v(grad_y: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    in_features, out_features = x.shape[1], grad_y.shape[1]
    plan = plans(offsets, in_features, out_features)[0]
    shape = (offsets.numel(), min(in_features, out_features))
    return grouped_grad_values(x.contiguous(), grad_y.contiguous(), plan, shape)


#: The three ops with the signatures of ``torch.ops.dynadiag.diag_fwd`` / ``diag_bwd_x`` / ``diag_bwd_v`` (for
#: ``auto``'s per-op candidates).
DIAG_OPS = DiagOps(_fwd, _bwd_x, _bwd_v)


class _GroupedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, offsets, out_features):  # x [N, in], values [K, D]
        ctx.save_for_backward(x, values, offsets)
        return _fwd(x, values, offsets, out_features)

    @staticmethod
    def backward(ctx, grad_y):  # grad_y [N, out]
        x, values, offsets = ctx.saved_tensors
        grad_x = _bwd_x(grad_y, values, offsets, x.shape[1]) if ctx.needs_input_grad[0] else None
        grad_v = _bwd_v(grad_y, x, offsets).to(values.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_v, None, None


class GroupedTritonBackend(TritonBackend):
    """``tl.dot`` tiles holding kept weights, for grouped diagonal layers; compiled on CUDA, interpreted on CPU."""

    name = "grouped_triton"

    def prepare(self, offsets: torch.Tensor, in_features: int, out_features: int) -> None:
        """Build the layer's tile plans now (at the freeze), so no call pays the one host read of the offsets."""
        ops.check_offsets(offsets, max(in_features, out_features), self.name)
        plans(offsets, in_features, out_features)

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
