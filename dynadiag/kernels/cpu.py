"""``cpu`` backend: the C++ kernels in ``csrc/cpu`` behind ``torch.ops.dynadiag``.

fp32 and bf16 run AVX-512 kernels (fp32 accumulation); fp64 and fp16 run a portable scalar path, so
``gradcheck`` and ``opcheck`` work through the real op. The extension is JIT-built on first use (seconds) and
cached in ``~/.cache/dynadiag``; if the build fails, :meth:`CpuBackend.is_available` returns the compiler's
message and ``auto`` falls back to ``reference``.
"""

from __future__ import annotations

import threading

import torch

from dynadiag.kernels import ops
from dynadiag.kernels._build import ExtensionBuildError, load_extension

__all__ = ["BACKEND", "CpuBackend", "cpu_library_error", "is_loaded", "load_cpu_library"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float64, torch.float16)
_LOCK = threading.Lock()
_ERROR: str | None = None
_TRIED = False


def load_cpu_library() -> None:
    """Load the op schemas, then build (once, cached on disk) and load the CPU kernels.

    A failed build is remembered, so later calls raise at once instead of re-running the compiler.

    Raises:
        dynadiag.kernels._build.ExtensionBuildError: the build or load failed (the message has the compiler's output).
    """
    global _ERROR, _TRIED
    ops.load_schema()
    with _LOCK:
        if _TRIED and _ERROR is not None:
            raise ExtensionBuildError(_ERROR)
        if _TRIED:
            return
        _TRIED = True
        try:
            load_extension("dynadiag_cpu", sorted((ops.CSRC / "cpu").glob("*.cpp")))
        except Exception as exc:
            _ERROR = str(exc)
            raise


def is_loaded() -> bool:
    """Whether the schemas and the CPU kernels are loaded in this process."""
    return _TRIED and _ERROR is None


def cpu_library_error() -> str | None:
    """The CPU build's error message, or ``None`` (after a successful or not yet attempted load)."""
    return _ERROR


class CpuBackend:
    """AVX-512/OpenMP C++ kernels for frozen diagonal layers on CPU tensors."""

    name = "cpu"

    def is_available(self, device: torch.device) -> tuple[bool, str]:
        device = torch.device(device)
        if device.type != "cpu":
            return False, f"the cpu backend runs on CPU tensors only (got {device})"
        try:
            load_cpu_library()
        except Exception as exc:
            return False, str(exc)
        return True, ""

    def diag_linear(
        self,
        x: torch.Tensor,  # [..., in]
        values: torch.Tensor,  # [K, D]
        offsets: torch.Tensor,  # [K] int64
        bias: torch.Tensor | None,  # [out]
        in_features: int,
        out_features: int,
    ) -> torch.Tensor:  # [..., out]
        """``y = x W^T + b`` with ``W`` given by ``K`` wrapped diagonals; differentiable in x, values, bias."""
        if not is_loaded():  # a plain flag check, so torch.compile traces straight through
            load_cpu_library()
        return ops.diag_linear("cpu", "cpu", _DTYPES, x, values, offsets, bias, in_features, out_features)


BACKEND = CpuBackend()
