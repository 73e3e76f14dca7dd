"""``dense`` backend, and the per-op mix of dense GEMMs and diagonal kernels that ``auto`` runs.

Dense path of a frozen layer (``W`` is ``[out, in]``, ``K`` kept diagonals of length ``D``), priced like
``nn.Linear``:

- forward ``y = x W^T + b``: scatter the ``K`` diagonals into a zero ``W`` once, one ``F.linear`` with the bias
  (one fused GEMM, as ``nn.Linear``; cuBLAS on CUDA, oneDNN/MKL on CPU). When the diagonals are not being trained
  (inference, evaluation under ``no_grad``, frozen values) the scattered ``W`` is cached for later calls, so such a
  call costs exactly what ``nn.Linear`` costs;
- ``grad_x = grad_y W``: one GEMM with the ``W`` the forward built (no second scatter);
- ``grad_V``: the full ``grad_W = grad_y^T x`` (one GEMM), then gather its ``K`` diagonals; ``grad_b``: a sum.

:func:`diag_linear_mixed` runs each of the three ops (forward, ``grad_x``, ``grad_V``) on the path a :class:`Plan`
names: ``"dense"`` or a diagonal-kernel backend (``"cpu"``, ``"cuda"``, ``"grouped_cpu"``, or ``"diag"`` for the
single ``DiagOps`` given), so ``auto`` can take, say, the diagonal forward and ``grad_x`` with the dense ``grad_V``.
The dense backend itself runs everywhere (it is the all-dense plan) and is tested against ``reference``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dynadiag.functional import diag_index
from dynadiag.kernels import ops

__all__ = [
    "BACKEND",
    "DenseBackend",
    "DiagOps",
    "Plan",
    "cached_weight",
    "clear_weight_cache",
    "diag_linear_mixed",
    "gather_weight",
    "scatter_weight",
]


class Plan(NamedTuple):
    """Which path runs each op: ``"dense"`` (GEMM) or a diagonal-kernel name (``"diag"``, ``"cpu"``, ...)."""

    fwd: str = "dense"
    dx: str = "dense"
    dv: str = "dense"

    def __str__(self) -> str:
        if self.fwd == self.dx == self.dv:
            return self.fwd
        return f"fwd={self.fwd},dx={self.dx},dv={self.dv}"

    @classmethod
    def parse(cls, text: str) -> Plan:
        """Inverse of ``str(plan)``: ``"cpu"`` or ``"fwd=cpu,dx=cpu,dv=dense"``."""
        if "=" not in text:
            return cls(text, text, text)
        parts = dict(item.split("=", 1) for item in text.split(","))
        return cls(parts["fwd"], parts["dx"], parts["dv"])


class DiagOps(NamedTuple):
    """The diagonal-kernel ops (signatures of ``torch.ops.dynadiag.diag_fwd`` / ``_bwd_x`` / ``_bwd_v``).

    ``fwd_bias`` (``diag_fwd_bias``: the bias added while writing ``y``) is optional; without it the bias is a
    separate add.
    """

    fwd: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
    bwd_x: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
    bwd_v: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    fwd_bias: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor], torch.Tensor] | None = None


# (id(offsets)) -> (weak reference, version, data pointer, in, out, flat index [K * D]); frozen offsets never change.
_INDEX: dict[int, tuple] = {}
# id(values) -> (weak reference, version, data pointer, offsets id/version, dtype, W [out, in]); see cached_weight.
_WEIGHTS: dict[int, tuple] = {}
# id(offsets) -> [weak reference, state, flat W buffer [out * in], generation]; see _reused_weight.
_BUFFERS: dict[int, list] = {}


def _flat_index(offsets: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:  # [K * D]
    """Flat positions in ``W`` of the kept diagonals' elements, memoised per offsets tensor (and its version)."""
    if torch.compiler.is_compiling():  # traced: the index becomes part of the graph
        rows, cols = diag_index(in_features, out_features, offsets)
        return (rows * in_features + cols).reshape(-1)
    key = id(offsets)
    state = (offsets._version, offsets.data_ptr(), in_features, out_features)
    hit = _INDEX.get(key)
    if hit is not None and hit[0]() is offsets and hit[1:5] == state:
        return hit[5]
    rows, cols = diag_index(in_features, out_features, offsets)
    flat = (rows * in_features + cols).reshape(-1)
    _INDEX[key] = (weakref.ref(offsets, lambda _, k=key: _INDEX.pop(k, None)), *state, flat)
    return flat


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


def _reused_weight(
    values: torch.Tensor, offsets: torch.Tensor, in_features: int, out_features: int
) -> tuple[torch.Tensor, list]:  # ([out, in], cache entry)
    """``scatter_weight`` into a buffer kept per offsets tensor: only the ``K * D`` pattern entries are rewritten.

    A fresh ``[out, in]`` zero matrix every training step costs page faults and a memset (measured 1-5 ms for ViT-B
    qkv at 197 tokens, against ~25 ms for the whole training step); ``nn.Linear`` keeps its weight. The entry's
    generation counter tells a backward whether a later forward has rewritten the buffer since (then it scatters
    again from its saved values).
    """
    key = id(offsets)
    state = (offsets._version, offsets.data_ptr(), in_features, out_features, values.dtype, values.device)
    entry = _BUFFERS.get(key)
    if entry is None or entry[0]() is not offsets or entry[1] != state:
        entry = [weakref.ref(offsets, lambda _, k=key: _BUFFERS.pop(k, None)), state, None, 0]
        entry[2] = values.new_zeros(out_features * in_features)
        _BUFFERS[key] = entry
    entry[2].index_copy_(0, _flat_index(offsets, in_features, out_features), values.detach().reshape(-1))
    entry[3] += 1
    return entry[2].view(out_features, in_features), entry


def cached_weight(
    master: torch.Tensor,  # [K, D] the stored values (any dtype)
    offsets: torch.Tensor,  # [K]
    in_features: int,
    out_features: int,
    dtype: torch.dtype,
) -> torch.Tensor:  # [out, in]
    """``scatter_weight(master.to(dtype), ...)``, kept for later calls while ``master`` and ``offsets`` are alive and
    unchanged (same storage and version counter).

    Only for values that are not being trained: in-place updates (optimizer steps) bump the version counter and
    invalidate the entry, but writes through ``.data`` bypass it. One ``[out, in]`` matrix per cached layer: the
    memory ``nn.Linear`` holds.
    """
    key = id(master)
    state = (master._version, master.data_ptr(), id(offsets), offsets._version, dtype)
    hit = _WEIGHTS.get(key)
    if hit is not None and hit[0]() is master and hit[1:6] == state:
        return hit[6]
    weight = scatter_weight(master.detach().to(dtype), offsets, in_features, out_features)
    _WEIGHTS[key] = (weakref.ref(master, lambda _, k=key: _WEIGHTS.pop(k, None)), *state, weight)
    return weight


def clear_weight_cache() -> int:
    """Drop every cached dense weight (inference cache and training buffers); returns how many there were."""
    count = len(_WEIGHTS) + len(_BUFFERS)
    _WEIGHTS.clear()
    _BUFFERS.clear()
    return count


def _ops_for(name: str, diag_ops: DiagOps | Mapping[str, DiagOps] | None) -> DiagOps:
    if isinstance(diag_ops, DiagOps):
        return diag_ops
    if diag_ops is None or name not in diag_ops:
        raise ValueError(f"plan names the diagonal kernel '{name}' but no ops were given for it")
    return diag_ops[name]


class _MixedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, offsets, bias, out_features, plan, diag_ops, weight):  # x [N, in], values [K, D]
        in_features = x.shape[1]
        ctx.in_features, ctx.plan, ctx.diag_ops = in_features, plan, diag_ops
        need_w = plan.fwd == "dense" or (ctx.needs_input_grad[0] and plan.dx == "dense")
        ctx.entry = None  # a reused buffer (not saved: a later forward rewrites it in place)
        if need_w and weight is None and torch.compiler.is_compiling():
            weight = scatter_weight(values, offsets, in_features, out_features)
        elif need_w and weight is None:
            weight, ctx.entry = _reused_weight(values, offsets, in_features, out_features)
            ctx.generation = ctx.entry[3]
        keep_x = x if ctx.needs_input_grad[1] else None
        keep_w = weight if (ctx.needs_input_grad[0] and plan.dx == "dense" and ctx.entry is None) else None
        ctx.save_for_backward(keep_x, values, offsets, keep_w)
        if plan.fwd == "dense":
            return F.linear(x, weight, bias)  # one GEMM with the bias fused, as nn.Linear
        kernel = _ops_for(plan.fwd, diag_ops)
        if bias is not None and kernel.fwd_bias is not None:
            return kernel.fwd_bias(x, values, offsets, out_features, bias)
        y = kernel.fwd(x, values, offsets, out_features)
        return y if bias is None else y.add_(bias)

    @staticmethod
    def backward(ctx, grad_y):  # grad_y [N, out]
        x, values, offsets, weight = ctx.saved_tensors
        plan, diag_ops, in_features = ctx.plan, ctx.diag_ops, ctx.in_features
        grad_y = grad_y.contiguous()
        grad_x = grad_v = grad_b = None
        if ctx.needs_input_grad[0]:
            if plan.dx == "dense":
                if ctx.entry is not None:  # the buffer, unless a later forward rewrote it (then scatter again)
                    fresh = ctx.entry[3] == ctx.generation and ctx.entry[2] is not None
                    view = ctx.entry[2].view(grad_y.shape[1], in_features) if fresh else None
                    weight = view if fresh else scatter_weight(values, offsets, in_features, grad_y.shape[1])
                grad_x = grad_y @ weight
            else:
                grad_x = _ops_for(plan.dx, diag_ops).bwd_x(grad_y, values, offsets, in_features)
        if ctx.needs_input_grad[1]:
            if plan.dv == "dense":
                grad_v = gather_weight(grad_y.t() @ x, offsets)  # full grad_W [out, in], then its diagonals
            else:
                grad_v = _ops_for(plan.dv, diag_ops).bwd_v(grad_y, x, offsets)
        if ctx.needs_input_grad[3]:
            grad_b = grad_y.sum(0)
        return grad_x, grad_v, None, grad_b, None, None, None, None


def diag_linear_mixed(
    x: torch.Tensor,  # [N, in]
    values: torch.Tensor,  # [K, D]
    offsets: torch.Tensor,  # [K] int64, strictly ascending
    out_features: int,
    plan: Plan,
    diag_ops: DiagOps | Mapping[str, DiagOps] | None = None,
    bias: torch.Tensor | None = None,  # [out]
    weight: torch.Tensor | None = None,  # [out, in]
) -> torch.Tensor:  # [N, out]
    """``x W^T + b`` with each op on the path ``plan`` names.

    Args:
        x, values, offsets, out_features: the layer's input and diagonals.
        plan: per op ``"dense"`` or a diagonal-kernel name.
        diag_ops: the diagonal kernels: one :class:`DiagOps` for every non-dense entry, or a mapping from the names
            the plan uses; required when any op is not dense.
        bias: added in the forward (fused into the GEMM or the kernel where possible); differentiable.
        weight: the scattered ``W`` when the caller has it (:func:`cached_weight`); built here otherwise.
    """
    if diag_ops is None and any(p != "dense" for p in plan):
        raise ValueError(f"plan {plan} uses the diagonal kernels but no diag_ops were given")
    return _MixedFn.apply(x, values, offsets, bias, out_features, plan, diag_ops, weight)


def frozen_weight(
    master: torch.Tensor, offsets: torch.Tensor, in_features: int, out_features: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """The cached ``W`` when ``master`` (the stored values) is not being trained in this call, else ``None``."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and master.requires_grad):
        return None
    return cached_weight(master, offsets, in_features, out_features, dtype)


class DenseBackend:
    """Scatter the diagonals into ``W`` and run dense GEMMs (cuBLAS on CUDA); every device and dtype."""

    name = "dense"
    #: DiagLinear passes ``V`` as stored (fp32 under bf16 autocast): the cast happens here, and the cached ``W`` of
    #: untrained values is keyed on the stored tensor.
    casts_values = True

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
        master = values

        def fwd(x2, v, off, out_f):
            weight = frozen_weight(master, off, in_features, out_f, x2.dtype)
            b = None if bias is None else bias.to(x2.dtype)
            if weight is not None:  # values not trained: nn.Linear's own call (autograd gives grad_x and grad_b)
                return F.linear(x2, weight, b)
            return diag_linear_mixed(x2, v, off, out_f, Plan(), bias=b)

        return ops.diag_linear("dense", None, dtypes, x, values, offsets, None, in_features, out_features, fwd)


BACKEND = DenseBackend()
