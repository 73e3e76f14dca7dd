"""``cuda`` backend: the CUDA-core kernels in ``csrc/cuda`` behind ``torch.ops.dynadiag``.

The kernels (``csrc/cuda/diag_kernels.cu``) run fp32, bf16, fp16 (fp32 accumulation) and fp64 (fp64
accumulation, for ``gradcheck``). The extension is JIT-built with ninja on first use (15 s on a 16-core H200
machine, 1-2 min on 2 cores) for the current GPU's architecture and cached in ``~/.cache/dynadiag``. Set
``DYNADIAG_CUDA_ARCH`` (e.g. ``"8.0;9.0"``) to build for other architectures.

Two kernel versions: v1 (``diag_kernels.cu``, the default, measured on an H200) and v2 (``diag_kernels_v2.cu``:
pre-packed values and per-tile diagonal lists from a host plan, wrap-padded windows, double-buffered
``cp.async`` staging, a batch-1 path, a deterministic ``grad_V``), selected with ``DYNADIAG_CUDA_KERNELS=v2``.
v2 is UNVALIDATED ON HARDWARE (compiled and planned on CPU only) until a GPU run compares the two. v1's ``grad_V``
adds token slices with ``atomicAdd`` (run-to-run order varies) unless ``torch.use_deterministic_algorithms(True)``
is set, which switches it to per-slice partial sums added in a fixed order; v2's ``grad_V`` is always deterministic
(see ``docs/gpu.md``).

Offsets must be strictly ascending and lie in ``[0, max(in, out))``; the op raises ``ValueError`` otherwise. The
check reads the offsets on the host once per offsets tensor and version (a frozen layer's buffer never changes), so
steady-state calls and CUDA-graph replays do not synchronise.
"""

from __future__ import annotations

import os
import threading

import torch

from dynadiag.kernels import cuda_v2, ops
from dynadiag.kernels._build import load_extension
from dynadiag.kernels.dense import DiagOps, Plan, diag_linear_mixed

__all__ = ["BACKEND", "CudaBackend", "cuda_arch_flags", "diag_ops", "load_cuda_library"]

_SOURCES = (
    ops.CSRC / "cuda" / "diag_ops_cuda.cpp",
    ops.CSRC / "cuda" / "diag_kernels.cu",
    ops.CSRC / "cuda" / "diag_kernels_v2.cu",
)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_LOCK = threading.Lock()
_ERROR: str | None = None
_LOADED = False


def cuda_arch_flags() -> list[str]:
    """nvcc ``-gencode`` flags: ``$DYNADIAG_CUDA_ARCH``, else the current GPU, else sm_80 + sm_90."""
    spec = os.environ.get("DYNADIAG_CUDA_ARCH")
    if spec:
        archs = [a.strip().replace(".", "") for a in spec.replace(",", ";").split(";") if a.strip()]
    elif torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        archs = [f"{major}{minor}"]
    else:
        archs = ["80", "90"]
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def load_cuda_library() -> None:
    """Load the op schemas, then build (once, cached) and load the CUDA kernels.

    Raises:
        dynadiag.kernels._build.ExtensionBuildError: the build or load failed (the message has nvcc's output).
    """
    global _ERROR, _LOADED
    ops.load_schema()
    with _LOCK:
        if _LOADED:
            return
        if _ERROR is not None:
            from dynadiag.kernels._build import ExtensionBuildError

            raise ExtensionBuildError(_ERROR)
        try:
            load_extension(
                "dynadiag_cuda",
                _SOURCES,
                extra_cflags=("-O3",),
                extra_cuda_cflags=("-O3", "-std=c++17", "-lineinfo", *cuda_arch_flags()),
                extra_ldflags=(),
                cuda=True,
            )
        except Exception as exc:
            _ERROR = str(exc)
            raise
        _LOADED = True


def diag_ops() -> DiagOps:
    """The three ops of the selected kernel version: v1 (default) or v2 (``DYNADIAG_CUDA_KERNELS=v2``,
    unvalidated on hardware; :mod:`dynadiag.kernels.cuda_v2`)."""
    if cuda_v2.kernel_version() == "v2":
        return cuda_v2.DIAG_OPS
    dd = torch.ops.dynadiag
    return DiagOps(dd.diag_fwd, dd.diag_bwd_x, dd.diag_bwd_v)


class CudaBackend:
    """Shared-memory-tiled CUDA-core kernels for frozen diagonal layers on CUDA tensors."""

    name = "cuda"

    def is_available(self, device: torch.device) -> tuple[bool, str]:
        device = torch.device(device)
        if device.type != "cuda":
            return False, f"the cuda backend runs on CUDA tensors only (got {device})"
        if not torch.cuda.is_available():
            return False, "torch.cuda.is_available() is False (no GPU or no CUDA build of torch)"
        try:
            load_cuda_library()
        except Exception as exc:
            return False, str(exc)
        return True, ""

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
        load_cuda_library()
        if cuda_v2.kernel_version() == "v2":

            def fwd(x2, v, off, out_f):
                return diag_linear_mixed(x2, v, off, out_f, Plan("diag", "diag", "diag"), cuda_v2.DIAG_OPS)

            return ops.diag_linear("cuda", "cuda", _DTYPES, x, values, offsets, bias, in_features, out_features, fwd)
        return ops.diag_linear("cuda", "cuda", _DTYPES, x, values, offsets, bias, in_features, out_features)


BACKEND = CudaBackend()
