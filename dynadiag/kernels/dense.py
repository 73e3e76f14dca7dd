"""``dense`` backend, and the per-op mix of dense GEMMs and diagonal kernels that ``auto`` uses on CUDA.

Dense path of a frozen layer (``W`` is ``[out, in]``, ``K`` kept diagonals of length ``D``):

- forward ``y = x W^T``: scatter the ``K`` diagonals into a zero ``W``, one GEMM (``F.linear``: cuBLAS on CUDA,
  in whatever precision torch's matmul settings allow: strict fp32, TF32, bf16, fp16);
- ``grad_x = grad_y W``: one GEMM with the same scattered ``W``;
- ``grad_V``: the full ``grad_W = grad_y^T x`` (one GEMM), then gather its ``K`` diagonals.

With tensor cores this beats any diagonal kernel with free offsets (docs/benchmarks/gpu/); in strict fp32 the
diagonal kernels can win. :func:`diag_linear_mixed` runs each of the three ops (forward, ``grad_x``,
``grad_V``) on the path a plan names, so ``auto`` can take, say, the diagonal forward and ``grad_x`` with the
dense ``grad_V``. The dense backend itself runs everywhere (it is the all-dense plan) and is tested against
``reference`` on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dynadiag.functional import diag_index
from dynadiag.kernels import ops

__all__ = ["BACKEND", "DenseBackend", "DiagOps", "Plan", "diag_linear_mixed", "gather_weight", "scatter_weight"]


class Plan(NamedTuple):
    """Which path runs each op: ``"diag"`` (the diagonal kernels) or ``"dense"`` (GEMM)."""

    fwd: str = "dense"
    dx: str = "dense"
    dv: str = "dense"

    def __str__(self) -> str:
        if self.fwd == self.dx == self.dv:
            return self.fwd
        return f"fwd={self.fwd},dx={self.dx},dv={self.dv}"


class DiagOps(NamedTuple):
    """The three diagonal-kernel ops (signatures of ``torch.ops.dynadiag.diag_fwd`` / ``_bwd_x`` / ``_bwd_v``)."""

    fwd: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
    bwd_x: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
    bwd_v: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _flat_index(offsets: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:  # [K * D]
    rows, cols = diag_index(in_features, out_features, offsets)
    return (rows * in_features + cols).reshape(-1)


def scatter_weight(
    values: torch.Tensor,  # [K, D]
    offsets: torch.Tensor,  # [K]
    in_features: int,
    out_features: int,
) -> torch.Tensor:  # [out, in]
    """The dense ``W`` holding the ``K`` diagonals (zeros elsewhere); not differentiable (used inside backward)."""
    weight = values.new_zeros(out_features * in_features)
    weight.index_copy_(0, _flat_index(offsets, in_features, out_features), values.reshape(-1))
    return weight.view(out_features, in_features)


def gather_weight(weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:  # [out, in] -> [K, D]
    """The ``K`` diagonals of a dense ``[out, in]`` matrix (e.g. ``grad_W``), as ``[K, D]``."""
    out_features, in_features = weight.shape
    flat = _flat_index(offsets, in_features, out_features)
    return weight.reshape(-1).index_select(0, flat).view(offsets.numel(), -1)


class _MixedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, offsets, out_features, plan, diag_ops):  # x [N, in], values [K, D]
        in_features = x.shape[1]
        ctx.in_features, ctx.plan, ctx.diag_ops = in_features, plan, diag_ops
        ctx.save_for_backward(x, values, offsets)
        if plan.fwd == "diag":
            return diag_ops.fwd(x, values, offsets, out_features)
        return F.linear(x, scatter_weight(values, offsets, in_features, out_features))

    @staticmethod
    def backward(ctx, grad_y):  # grad_y [N, out]
        x, values, offsets = ctx.saved_tensors
        plan, diag_ops, in_features = ctx.plan, ctx.diag_ops, ctx.in_features
        grad_y = grad_y.contiguous()
        grad_x = grad_v = None
        if ctx.needs_input_grad[0]:
            if plan.dx == "diag":
                grad_x = diag_ops.bwd_x(grad_y, values, offsets, in_features)
            else:
                grad_x = grad_y @ scatter_weight(values, offsets, in_features, grad_y.shape[1])
        if ctx.needs_input_grad[1]:
            if plan.dv == "diag":
                grad_v = diag_ops.bwd_v(grad_y, x, offsets)
            else:
                grad_v = gather_weight(grad_y.t() @ x, offsets)  # full grad_W [out, in], then its diagonals
        return grad_x, grad_v, None, None, None, None


def diag_linear_mixed(
    x: torch.Tensor,  # [N, in]
    values: torch.Tensor,  # [K, D]
    offsets: torch.Tensor,  # [K] int64, strictly ascending
    out_features: int,
    plan: Plan,
    diag_ops: DiagOps | None = None,
) -> torch.Tensor:  # [N, out]
    """``x W^T`` with each op on the path ``plan`` names; ``diag_ops`` is required when any op is ``"diag"``."""
    if diag_ops is None and "diag" in plan:
        raise ValueError(f"plan {plan} uses the diagonal kernels but no diag_ops were given")
    return _MixedFn.apply(x, values, offsets, out_features, plan, diag_ops)


class DenseBackend:
    """Scatter the diagonals into ``W`` and run dense GEMMs (cuBLAS on CUDA); every device and dtype."""

    name = "dense"

    def is_available(self, device: torch.device) -> tuple[bool, str]:
        return True, ""

    def diag_linear(
        self,
        x: torch.Tensor,  # [..., in]
        values: torch.Tensor,  # [K, D]
        offsets: torch.Tensor,  # [K] int64, strictly ascending
        bias: torch.Tensor | None,  # [out]
        in_features: int,
        out_features: int,
    ) -> torch.Tensor:  # [..., out]
        """``y = x W^T + b`` through dense GEMMs; differentiable in x, values and bias."""
        dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

        def fwd(x2, v, off, out_f):
            return diag_linear_mixed(x2, v, off, out_f, Plan())

        return ops.diag_linear("dense", None, dtypes, x, values, offsets, bias, in_features, out_features, fwd)


BACKEND = DenseBackend()
