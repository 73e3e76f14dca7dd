"""The ``torch.ops.dynadiag`` custom ops: loading, fake (meta) implementations and autograd.

Schemas live in ``csrc/schema.cpp`` (its own tiny library, so device extensions such as ``csrc/cuda`` can load
after it even when another device's build fails); each device's kernels are built and loaded by its backend module
(``kernels/cpu.py``, ``kernels/cuda.py``, ``kernels/triton.py``). Everything here is
device-agnostic: the fake functions only compute shapes, and the autograd formula calls the other two ops,
which dispatch to whichever device implementation is registered.

Ops (``W`` is ``[out, in]``, ``P = max(in, out)``, ``D = min(in, out)``, ``K`` kept diagonals):

- ``diag_fwd(x [N, in], values [K, D], offsets [K], out_features) -> y [N, out]`` (``x W^T``, no bias)
- ``diag_fwd_bias(x, values, offsets, out_features, bias [out]) -> y [N, out]`` (``x W^T + bias`` in one pass;
  CPU only, used by :func:`diag_linear` for CPU tensors)
- ``diag_bwd_x(grad_y [N, out], values [K, D], offsets [K], in_features) -> grad_x [N, in]`` (``grad_y W``)
- ``diag_bwd_v(grad_y [N, out], x [N, in], offsets [K]) -> grad_values [K, D]``
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import torch

from dynadiag.kernels._build import load_extension, source_dir

__all__ = [
    "CSRC",
    "check_offsets",
    "diag_linear",
    "load_schema",
]

#: the C++/CUDA sources: package data in a wheel, the repository's ``csrc/`` in a checkout
CSRC = source_dir()
_LOCK = threading.Lock()
_REGISTERED = False
# id(offsets) -> (weak reference, version, data pointer, P) of offsets tensors already checked.
_CHECKED: dict[int, tuple[weakref.ref, int, int, int]] = {}


def check_offsets(offsets: torch.Tensor, num_diagonals: int, where: str) -> None:
    """Raise ``ValueError`` unless ``offsets`` (``[K]``) is strictly ascending and in ``[0, num_diagonals)``.

    The same check and message as the C++ ops (``csrc/dd_check.h``), for the backends written in Python. Every
    kernel walks the offsets in order, so an unsorted list would silently drop diagonals. A tensor is checked once
    per version (a frozen layer's offsets never change): on an accelerator the check needs the values on the host
    (a synchronisation), and on CPU its half-dozen small ops would cost more than a small layer's kernel. Skipped
    while ``torch.compile`` traces: data-dependent checks cannot be traced.
    """
    if torch.compiler.is_compiling():
        return
    key = None
    if not offsets.is_inference():
        key = id(offsets)
        seen = _CHECKED.get(key)
        state = (offsets._version, offsets.data_ptr(), num_diagonals)
        if seen is not None and seen[0]() is offsets and seen[1:] == state:
            return
    if offsets.dim() != 1 or offsets.dtype != torch.long:
        raise ValueError(f"{where}: offsets must be a 1-D int64 tensor, got {offsets.dtype} {tuple(offsets.shape)}")
    host = offsets.detach().cpu()
    bad_range = (host < 0) | (host >= num_diagonals)
    bad_order = torch.zeros_like(bad_range)
    bad_order[1:] = host[1:] <= host[:-1]
    if bool((bad_range | bad_order).any()):
        k = int((bad_range | bad_order).nonzero()[0])
        got = f"offsets[{k}] = {int(host[k])}" if bad_range[k] else f"offsets[{k - 1}] = {int(host[k - 1])} then "
        got += "" if bad_range[k] else f"offsets[{k}] = {int(host[k])}"
        raise ValueError(f"{where}: offsets must be strictly ascending and in [0, {num_diagonals}), got {got}")
    if key is not None:
        if len(_CHECKED) > 4096:
            for stale in [i for i, entry in _CHECKED.items() if entry[0]() is None]:
                del _CHECKED[stale]
        _CHECKED[key] = (weakref.ref(offsets), *state)


def load_schema() -> None:
    """Define the ``dynadiag`` op schemas (build/load ``csrc/schema.cpp``) and their Python registrations."""
    global _REGISTERED
    with _LOCK:
        if _REGISTERED:
            return
        load_extension("dynadiag_schema", [CSRC / "schema.cpp"], extra_cflags=("-O2",), extra_ldflags=())
        _register_python_side()
        _REGISTERED = True


def _register_python_side() -> None:
    """Fake implementations (for torch.compile / meta tensors) and the autograd formula of ``diag_fwd``."""

    @torch.library.register_fake("dynadiag::diag_fwd")
    def _(x, values, offsets, out_features):
        torch._check(x.dim() == 2 and values.dim() == 2, lambda: "diag_fwd: x must be [N, in], values [K, D]")
        torch._check(values.shape[1] == min(x.shape[1], out_features), lambda: "diag_fwd: values must be [K, D]")
        torch._check(values.shape[0] == offsets.shape[0], lambda: "diag_fwd: one offset per diagonal")
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake("dynadiag::diag_fwd_bias")
    def _(x, values, offsets, out_features, bias):
        torch._check(x.dim() == 2 and values.dim() == 2, lambda: "diag_fwd_bias: x must be [N, in], values [K, D]")
        torch._check(values.shape[1] == min(x.shape[1], out_features), lambda: "diag_fwd_bias: values [K, D]")
        torch._check(values.shape[0] == offsets.shape[0], lambda: "diag_fwd_bias: one offset per diagonal")
        torch._check(bias.dim() == 1 and bias.shape[0] == out_features, lambda: "diag_fwd_bias: bias [out]")
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake("dynadiag::diag_bwd_x")
    def _(grad_y, values, offsets, in_features):
        torch._check(grad_y.dim() == 2 and values.dim() == 2, lambda: "diag_bwd_x: grad_y must be [N, out]")
        torch._check(values.shape[1] == min(grad_y.shape[1], in_features), lambda: "diag_bwd_x: values [K, D]")
        return grad_y.new_empty(grad_y.shape[0], in_features)

    @torch.library.register_fake("dynadiag::diag_bwd_v")
    def _(grad_y, x, offsets):
        torch._check(grad_y.dim() == 2 and x.dim() == 2, lambda: "diag_bwd_v: grad_y [N, out] and x [N, in]")
        torch._check(grad_y.shape[0] == x.shape[0], lambda: "diag_bwd_v: grad_y and x need the same N")
        return x.new_empty(offsets.shape[0], min(x.shape[1], grad_y.shape[1]))

    def setup_context(ctx, inputs, output):
        x, values, offsets = inputs[:3]
        ctx.in_features = x.shape[1]
        saved_x = x if ctx.needs_input_grad[1] else None  # x is only needed for grad_values
        saved_v = values if ctx.needs_input_grad[0] else None
        ctx.save_for_backward(saved_x, saved_v, offsets)

    def backward(ctx, grad_y):
        x, values, offsets = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_x = grad_v = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.dynadiag.diag_bwd_x(grad_y, values, offsets, ctx.in_features)
        if ctx.needs_input_grad[1]:
            grad_v = torch.ops.dynadiag.diag_bwd_v(grad_y, x, offsets)
        return grad_x, grad_v, None, None

    def backward_bias(ctx, grad_y):
        grad_x, grad_v, _, _ = backward(ctx, grad_y)
        grad_b = grad_y.sum(0) if ctx.needs_input_grad[4] else None
        return grad_x, grad_v, None, None, grad_b

    torch.library.register_autograd("dynadiag::diag_fwd", backward, setup_context=setup_context)
    torch.library.register_autograd("dynadiag::diag_fwd_bias", backward_bias, setup_context=setup_context)


def diag_linear(
    backend: str,
    device_type: str | None,
    dtypes: tuple[torch.dtype, ...],
    x: torch.Tensor,  # [..., in]
    values: torch.Tensor,  # [K, D]
    offsets: torch.Tensor,  # [K] int64, sorted ascending
    bias: torch.Tensor | None,  # [out]
    in_features: int,
    out_features: int,
    fwd: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None,
    fwd_checks_offsets: bool = False,
) -> torch.Tensor:  # [..., out]
    """Check inputs, flatten to ``[N, in]``, run ``fwd`` (default ``torch.ops.dynadiag.diag_fwd``), add the bias.

    Shared by every compiled backend. ``device_type=None`` accepts any device. With the default ``fwd`` the op
    library must already be loaded for ``x``'s device; the caller does that with a cheap check. A custom ``fwd``
    gets the offsets checked here unless ``fwd_checks_offsets`` (its C++ op checks them, as the default ops do).
    """
    if device_type is not None and x.device.type != device_type:
        raise ValueError(f"{backend} backend got a tensor on {x.device}")
    if x.dtype not in dtypes:
        raise TypeError(f"{backend} backend supports {dtypes}, got {x.dtype}")
    if x.shape[-1] != in_features:
        raise ValueError(f"expected {in_features} input features, got {tuple(x.shape)}")
    if fwd is not None and not fwd_checks_offsets:
        check_offsets(offsets, max(in_features, out_features), backend)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features).contiguous()  # [N, in]
    # values may be fp32 master weights under bf16 activations: the cast is differentiable.
    values = values.to(x.dtype).contiguous()
    if fwd is None and bias is not None and x.device.type == "cpu":
        # The CPU kernels add the bias while writing y: no second pass over (and allocation of) the output.
        y = torch.ops.dynadiag.diag_fwd_bias(x2, values, offsets, out_features, bias.to(x.dtype))
        return y.reshape(*lead, out_features)
    fwd = torch.ops.dynadiag.diag_fwd if fwd is None else fwd
    y = fwd(x2, values, offsets, out_features)  # [N, out]
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*lead, out_features)
