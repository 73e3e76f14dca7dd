"""``grouped_cpu`` backend: band tiles of grouped diagonals on the CPU's matrix units (``csrc/grouped``).

Runs of consecutive kept offsets (a grouped layer's groups, merged when neighbouring) become dense band tiles that
run through oneDNN's brgemm micro-kernel (``at::native::cpublas::brgemm``): AMX on Intel CPUs that have it,
AVX512-BF16 (``vdpbf16ps``) on Zen 4, AVX-512 FMA for fp32; oneDNN chooses at run time. Forward, ``grad_x`` and
``grad_values`` are the kernels; ``grad_bias`` is autograd's sum. Any offset set is accepted (a ``g = 1`` layer
gives runs of length ~1 and is slow: use the ``cpu`` backend for it), so the backend is explicit-only
(not chosen by ``auto``). The ops live in their own ``dynadiag_grouped`` library, built on first use.
"""

from __future__ import annotations

import threading

import torch

from dynadiag.kernels import ops
from dynadiag.kernels._build import load_extension

__all__ = ["BACKEND", "GroupedCpuBackend", "clear_cache", "grouped_apply", "grouped_sddmm", "load_grouped_library"]

_DTYPES = (torch.float32, torch.bfloat16)
_LOCK = threading.Lock()
_LOADED = False
#: longest run of offsets in one band tile (longer runs are cut); wider tiles waste less (density L / (32 + L - 1)).
MAX_RUN = 64
#: tokens per GEMM call.
TOKEN_BLOCK = 256
#: keep the packed weight tiles of frozen layers that are not being trained (AMX path; see ``grouped_apply``).
#: ``scripts/bench_grouped.py`` turns it off to time the forward that training pays.
CACHE_FROZEN = True


def load_grouped_library() -> None:
    """Build (once, cached) and load ``csrc/grouped``. Raises ``ExtensionBuildError`` if the build fails."""
    global _LOADED
    with _LOCK:
        if not _LOADED:
            load_extension("dynadiag_grouped_cpu", sorted((ops.CSRC / "grouped").glob("*.cpp")))
            _LOADED = True


def grouped_apply(
    src: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    out_cols: int,
    tall: bool,
    perm: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    cache: bool = False,
) -> torch.Tensor:
    """``tall``: ``dst[n, r] = sum_k V[k, c] src[n, c]``, ``c = (r - p_k) mod B`` if ``c < A``; wide:
    ``dst[n, r] = sum_k V[k, r] src[n, (r + p_k) mod A]``. ``src [N, A]``, ``values [K, D]`` -> ``[N, B]``.

    ``perm`` (``[A]``) reads ``src[:, perm]`` instead of ``src`` (fused into the staging copy); ``bias`` (``[B]``)
    is added to the fp32 accumulators before rounding. ``cache`` (AMX path): keep the packed weight tiles for later
    calls with the same ``values``/``offsets`` tensors, valid while neither is freed nor written in place (their
    version counters); only for weights that are not being trained (``.data`` writes bypass the version counter)."""
    return torch.ops.dynadiag_grouped.apply(
        src, values, offsets, out_cols, tall, MAX_RUN, TOKEN_BLOCK, perm, bias, cache
    )


def clear_cache() -> int:
    """Drop every cached packed-weight plan of the AMX path; returns how many there were."""
    load_grouped_library()
    return int(torch.ops.dynadiag_grouped.cache_clear())


def grouped_sddmm(s: torch.Tensor, q: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:  # [K, D]
    """``dV[k, t] = sum_n s[n, t] q[n, (t + p_k) mod M]`` for ``s [N, D]``, ``q [N, M]`` (fp32 accumulation)."""
    return torch.ops.dynadiag_grouped.sddmm(s, q, offsets, MAX_RUN)


class _GroupedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, offsets, bias, perm, out_features, cache):  # x [N, in], values [K, D]
        ctx.save_for_backward(x, values, offsets, perm)
        return grouped_apply(x, values, offsets, out_features, out_features >= x.shape[1], perm, bias, cache)

    @staticmethod
    def backward(ctx, grad_y):  # grad_y [N, out]
        x, values, offsets, perm = ctx.saved_tensors
        in_features, out_features = x.shape[1], grad_y.shape[1]
        tall = out_features >= in_features
        grad_y = grad_y.contiguous()
        grad_x = grad_v = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grouped_apply(grad_y, values, offsets, in_features, tall=not tall)  # w.r.t. x[:, perm]
            if perm is not None:
                grad_x = grad_x[:, torch.argsort(perm)]
        if ctx.needs_input_grad[1]:
            xp = x if perm is None else x[:, perm].contiguous()
            grad_v = grouped_sddmm(xp, grad_y, offsets) if tall else grouped_sddmm(grad_y, xp, offsets)
        if ctx.needs_input_grad[3]:
            grad_b = grad_y.float().sum(0).to(grad_y.dtype)
        return grad_x, grad_v, None, grad_b, None, None, None


class GroupedCpuBackend:
    """oneDNN brgemm band tiles for grouped diagonal layers on CPU tensors (bf16, fp32)."""

    name = "grouped_cpu"
    #: DiagLinear passes its input permutation (``perm=``) instead of gathering the activations itself.
    fuses_permutation = True
    #: DiagLinear passes ``V`` in its stored dtype (fp32 under bf16 autocast) instead of a per-call cast, so frozen
    #: fp32 weights hit the packed-tile cache; ``ops.diag_linear`` casts (differentiably) where it is needed.
    casts_values = True

    def is_available(self, device: torch.device) -> tuple[bool, str]:
        device = torch.device(device)
        if device.type != "cpu":
            return False, f"the grouped_cpu backend runs on CPU tensors only (got {device})"
        try:
            load_grouped_library()
        except Exception as exc:
            return False, str(exc)
        if not torch.ops.dynadiag_grouped.supported(_dtype_code(torch.bfloat16)):
            return False, "oneDNN's brgemm micro-kernel is not available on this CPU (needs AVX512-BF16 or AMX)"
        return True, ""

    def diag_linear(
        self,
        x: torch.Tensor,  # [..., in]
        values: torch.Tensor,  # [K, D]
        offsets: torch.Tensor,  # [K] int64, sorted ascending
        bias: torch.Tensor | None,  # [out]
        in_features: int,
        out_features: int,
        perm: torch.Tensor | None = None,  # [in] int64
    ) -> torch.Tensor:  # [..., out]
        """``y = x[..., perm] W^T + b`` (``x W^T + b`` without ``perm``) for a frozen (grouped) diagonal layer;
        differentiable in x, values, bias. The permutation and the bias are fused into the kernel's staging and
        output store."""
        if not _LOADED:
            load_grouped_library()

        master = values  # fp32 master weights under bf16 autocast (DiagLinear passes V uncast: casts_values)

        def fwd(x2, values, offsets, out_features):  # bias and permutation inside the op
            b = None if bias is None else bias.to(x2.dtype)
            # Frozen weights that are not being trained (inference, eval under no_grad) keep their packed tiles.
            cache = CACHE_FROZEN and not (torch.is_grad_enabled() and master.requires_grad)
            if cache and master.dtype == torch.float32 and x2.dtype == torch.bfloat16:
                # Key the cache on the stored fp32 weights (a per-call bf16 copy would never hit); the op rounds
                # them into its tiles exactly as .to(bfloat16) does.
                values = master
            return _GroupedFn.apply(x2, values, offsets, b, perm, out_features, cache)

        return ops.diag_linear(
            "grouped_cpu",
            "cpu",
            _DTYPES,
            x,
            values,
            offsets,
            None,
            in_features,
            out_features,
            fwd,
            fwd_checks_offsets=True,
        )  # the grouped C++ ops check the offsets


def _dtype_code(dtype: torch.dtype) -> int:
    # c10::ScalarType codes (stable): Float = 6, BFloat16 = 15.
    return {torch.float32: 6, torch.bfloat16: 15}[dtype]


BACKEND = GroupedCpuBackend()
