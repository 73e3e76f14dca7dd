"""``triton`` backend: Triton kernels for frozen diagonal layers (forward, ``grad_x``, ``grad_values``).

Same two primitives as ``csrc/cuda/diag_kernels.cuh`` (token-major activations, ``P = max(A, B)``):

- apply, tall form (``B >= A``): ``dst[n, r] = sum_k V[k, c] src[n, c]`` with ``c = (r - p_k) mod B`` if ``c < A``
- apply, wide form (``B <= A``): ``dst[n, r] = sum_k V[k, r] src[n, (r + p_k) mod A]``
- sddmm: ``dV[k, t] = sum_n S[n, t] Q[n, (t + p_k) mod M]``

The forward is the tall form when ``out >= in``; ``grad_x`` is the other form on ``grad_y`` (the transposed
pattern). Each program owns a token x output tile and gathers the shifted source tile per diagonal straight from
global memory (L1/L2 serve the reuse); ``grad_values`` programs own a few diagonals x positions and reduce over
all tokens. Accumulation is fp32 (fp64 for fp64 inputs). No ``tl.dot``, no block pointers, so the kernels also run
in Triton's CPU interpreter.

Availability: on CUDA tensors whenever ``triton`` imports; on CPU tensors only when the environment variable
``TRITON_INTERPRET=1`` was set before the first kernel launch in this process (Triton reads it when the kernels
are decorated, which happens lazily on first use). That is how CI tests this backend without a GPU.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from dynadiag.kernels import ops

try:
    import triton.language as tl
except ImportError:  # the backend reports itself unavailable; the kernels below are never decorated
    tl = None

__all__ = ["BACKEND", "TritonBackend", "diag_apply", "diag_sddmm", "triton_bwd_v", "triton_bwd_x", "triton_fwd"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _apply_kernel(
    src,
    V,
    off,
    dst,
    N,
    A,
    B,
    K,
    D,
    TALL: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_n = rn < N
    mask_r = rr < B
    row = rn.to(tl.int64) * A
    if FP64:
        acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for k in range(0, K):
        p = tl.load(off + k).to(tl.int32)
        if TALL:
            c = rr - p
            c = tl.where(c < 0, c + B, c)
            valid = mask_r & (c < A)
            vi = c
        else:
            c = rr + p
            c = tl.where(c >= A, c - A, c)
            valid = mask_r
            vi = rr
        v = tl.load(V + k * D + vi, mask=valid, other=0.0).to(acc.dtype)
        x = tl.load(src + row[:, None] + c[None, :], mask=mask_n[:, None] & valid[None, :], other=0.0)
        acc += x.to(acc.dtype) * v[None, :]
    out = dst + rn.to(tl.int64)[:, None] * B + rr[None, :]
    tl.store(out, acc.to(dst.dtype.element_ty), mask=mask_n[:, None] & mask_r[None, :])


def _sddmm_kernel(
    S, Q, off, out, N, D, M, K, FP64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr
):
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_t = t < D
    mask_k = ks < K
    p = tl.load(off + ks, mask=mask_k, other=0).to(tl.int32)
    c = t[None, :] + p[:, None]  # [BLOCK_K, BLOCK_T]
    c = tl.where(c >= M, c - M, c)
    mask_kt = mask_k[:, None] & mask_t[None, :]
    if FP64:
        acc = tl.zeros((BLOCK_K, BLOCK_T), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_K, BLOCK_T), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        mask_n = rn < N
        rn64 = rn.to(tl.int64)
        s = tl.load(S + rn64[:, None] * D + t[None, :], mask=mask_n[:, None] & mask_t[None, :], other=0.0)
        q = tl.load(
            Q + rn64[:, None, None] * M + c[None, :, :],
            mask=mask_n[:, None, None] & mask_kt[None, :, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_K, BLOCK_T]
        acc += tl.sum(s.to(acc.dtype)[:, None, :] * q.to(acc.dtype), axis=0)
    tl.store(out + ks.to(tl.int64)[:, None] * D + t[None, :], acc.to(out.dtype.element_ty), mask=mask_kt)


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """Decorate the kernels on first use, so ``TRITON_INTERPRET`` set by then takes effect."""
    import triton

    return triton.jit(_apply_kernel), triton.jit(_sddmm_kernel)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def diag_apply(
    src: torch.Tensor,  # [N, A]
    values: torch.Tensor,  # [K, D]
    offsets: torch.Tensor,  # [K] int64, sorted
    out_cols: int,
    tall: bool,
) -> torch.Tensor:  # [N, B]
    """One apply primitive (see the module docstring): ``tall`` needs ``B >= A``, wide ``B <= A``."""
    apply_kernel, _ = _kernels()
    n, a = src.shape
    dst = src.new_empty(n, out_cols)
    if n == 0:
        return dst
    block_n, block_r = 32, 64
    grid = (triton_cdiv(out_cols, block_r), triton_cdiv(n, block_n))
    apply_kernel[grid](
        src,
        values,
        offsets,
        dst,
        n,
        a,
        out_cols,
        values.shape[0],
        values.shape[1],
        TALL=tall,
        FP64=src.dtype == torch.float64,
        BLOCK_N=block_n,
        BLOCK_R=block_r,
    )
    return dst


def diag_sddmm(
    s: torch.Tensor,  # [N, D]
    q: torch.Tensor,  # [N, M]
    offsets: torch.Tensor,  # [K]
) -> torch.Tensor:  # [K, D]
    """``dV[k, t] = sum_n s[n, t] q[n, (t + p_k) mod M]`` in the inputs' dtype (fp32/fp64 accumulation)."""
    _, sddmm_kernel = _kernels()
    n, d = s.shape
    m = q.shape[1]
    k = offsets.shape[0]
    out = s.new_empty(k, d)
    if k == 0:
        return out
    block_n, block_k, block_t = 16, 8, 64
    grid = (triton_cdiv(d, block_t), triton_cdiv(k, block_k))
    sddmm_kernel[grid](
        s,
        q,
        offsets,
        out,
        n,
        d,
        m,
        k,
        FP64=s.dtype == torch.float64,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        BLOCK_T=block_t,
    )
    return out


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# The Triton kernels as torch custom ops (``torch.ops.dynadiag.triton_*``), like the C++ ones: opaque to
# torch.compile (a fake kernel gives the shapes), differentiable through ``register_autograd``, checkable with
# ``torch.library.opcheck``.
@torch.library.custom_op("dynadiag::triton_fwd", mutates_args=())
def triton_fwd(x: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, out_features: int) -> torch.Tensor:
    """``x [N, in] @ W^T -> [N, out]`` with ``W`` given by ``values [K, D]`` on ``offsets [K]``."""
    return diag_apply(x, values, offsets, out_features, tall=out_features >= x.shape[1])


@triton_fwd.register_fake
def _(x, values, offsets, out_features):
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("dynadiag::triton_bwd_x", mutates_args=())
def triton_bwd_x(grad_y: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, in_features: int) -> torch.Tensor:
    """``grad_y [N, out] @ W -> grad_x [N, in]``: the other apply form on the transposed pattern."""
    return diag_apply(grad_y, values, offsets, in_features, tall=grad_y.shape[1] < in_features)


@triton_bwd_x.register_fake
def _(grad_y, values, offsets, in_features):
    return grad_y.new_empty(grad_y.shape[0], in_features)


@torch.library.custom_op("dynadiag::triton_bwd_v", mutates_args=())
def triton_bwd_v(grad_y: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``grad_values [K, D]`` from ``grad_y [N, out]`` and ``x [N, in]``."""
    if grad_y.shape[1] >= x.shape[1]:  # tall: D = in
        return diag_sddmm(x, grad_y, offsets)
    return diag_sddmm(grad_y, x, offsets)


@triton_bwd_v.register_fake
def _(grad_y, x, offsets):
    return x.new_empty(offsets.shape[0], min(x.shape[1], grad_y.shape[1]))


def _setup_context(ctx, inputs, output) -> None:
    x, values, offsets, _ = inputs
    ctx.in_features = x.shape[1]
    ctx.save_for_backward(x, values, offsets)


def _backward(ctx, grad_y):
    x, values, offsets = ctx.saved_tensors
    grad_y = grad_y.contiguous()
    grad_x = grad_v = None
    if ctx.needs_input_grad[0]:
        grad_x = triton_bwd_x(grad_y, values, offsets, ctx.in_features)
    if ctx.needs_input_grad[1]:
        grad_v = triton_bwd_v(grad_y, x, offsets)
    return grad_x, grad_v, None, None


triton_fwd.register_autograd(_backward, setup_context=_setup_context)


class TritonBackend:
    """Triton kernels; compiled on CUDA, interpreted on CPU under ``TRITON_INTERPRET=1``."""

    name = "triton"

    def is_available(self, device: torch.device) -> tuple[bool, str]:
        device = torch.device(device)
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            return False, f"triton is not installed ({exc})"
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return False, "torch.cuda.is_available() is False"
            if _interpreting():
                return False, "TRITON_INTERPRET=1 is set: Triton would interpret instead of compiling for the GPU"
            return True, ""
        if device.type == "cpu":
            if _interpreting():
                return True, ""
            return False, "Triton runs on CPU tensors only in its interpreter (set TRITON_INTERPRET=1 before use)"
        return False, f"no Triton support for device type {device.type}"

    def diag_linear(
        self,
        x: torch.Tensor,  # [..., in]
        values: torch.Tensor,  # [K, D]
        offsets: torch.Tensor,  # [K] int64, sorted ascending
        bias: torch.Tensor | None,  # [out]
        in_features: int,
        out_features: int,
    ) -> torch.Tensor:  # [..., out]
        """``y = x W^T + b`` with ``W`` given by ``K`` wrapped diagonals; differentiable in x, values, bias."""
        return ops.diag_linear(
            "triton",
            None,
            _DTYPES,
            x,
            values,
            offsets.contiguous(),
            bias,
            in_features,
            out_features,
            triton_fwd,
        )


BACKEND = TritonBackend()
