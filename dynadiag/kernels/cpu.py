"""``cpu`` backend: the C++ kernels in ``csrc/cpu`` behind ``torch.ops.dynadiag``.

fp32 and bf16 (fp32 accumulation) run one of several vectorized kernel variants, chosen at run time from the
CPU's features (:func:`isa`): ``avx512``, ``avx2`` (256-bit AVX2 + FMA) or ``portable`` (compiler vectors, any
architecture). ``DYNADIAG_CPU_ISA=scalar|portable|avx2|avx512|amx`` forces one; a variant the CPU cannot run makes
the backend unavailable with one line that says so. fp64 and fp16 run scalar loops, so ``gradcheck`` and
``opcheck`` work through the real op. The extension is JIT-built on first use (seconds), once for every CPU (each
variant's file carries its own target ISA, no ``-march=native``), and cached in ``~/.cache/dynadiag``; if the build
fails, :meth:`CpuBackend.is_available` returns the compiler's message and ``auto`` falls back to ``reference``.
"""

from __future__ import annotations

import threading

import torch

from dynadiag.kernels import ops
from dynadiag.kernels._build import ExtensionBuildError, load_extension

__all__ = ["BACKEND", "CpuBackend", "cpu_library_error", "is_loaded", "isa", "load_cpu_library", "supported_isas"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float64, torch.float16)
_LOCK = threading.Lock()
_ERROR: str | None = None
_TRIED = False
# Baseline flags only: the variant sources set their own target ISA, so one build serves every CPU. Link order puts
# the baseline objects first, so where two files instantiate the same inline library code the linker keeps a
# baseline copy.
_SOURCES = ("diag_cpu.cpp", "diag_portable.cpp", "diag_avx2.cpp", "diag_avx512.cpp")
_CFLAGS = ("-O3", "-fopenmp")


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
            load_extension("dynadiag_cpu", [ops.CSRC / "cpu" / f for f in _SOURCES], extra_cflags=_CFLAGS)
        except Exception as exc:
            _ERROR = str(exc)
            raise


def isa() -> str:
    """The kernel variant fp32/bf16 calls run now: ``"avx512"``, ``"avx2"``, ``"portable"`` or ``"scalar"``.

    ``DYNADIAG_CPU_ISA`` when set (``"amx"`` runs the ``avx512`` kernels), else the best variant the CPU runs, capped
    by ``ATEN_CPU_CAPABILITY`` when that is set. Read per call, like the kernels do, so it can be part of a cache key.

    Raises:
        ValueError: ``DYNADIAG_CPU_ISA`` names an unknown variant or one this CPU cannot run.
        dynadiag.kernels._build.ExtensionBuildError: the CPU library failed to build.
    """
    if not is_loaded():
        load_cpu_library()
    return str(torch.ops.dynadiag_cpu.isa())


def supported_isas() -> list[str]:
    """Every variant ``DYNADIAG_CPU_ISA`` may name on this CPU, fastest first (e.g. ``["avx512", "avx2", ...]``)."""
    if not is_loaded():
        load_cpu_library()
    return list(torch.ops.dynadiag_cpu.supported_isas())


def is_loaded() -> bool:
    """Whether the schemas and the CPU kernels are loaded in this process."""
    return _TRIED and _ERROR is None


def cpu_library_error() -> str | None:
    """The CPU build's error message, or ``None`` (after a successful or not yet attempted load)."""
    return _ERROR


class CpuBackend:
    """Vectorized OpenMP C++ kernels (one variant per instruction set) for frozen diagonal layers on CPU tensors."""

    name = "cpu"

    def is_available(self, device: torch.device) -> tuple[bool, str]:
        device = torch.device(device)
        if device.type != "cpu":
            return False, f"the cpu backend runs on CPU tensors only (got {device})"
        try:
            load_cpu_library()
            isa()  # a forced DYNADIAG_CPU_ISA this CPU cannot run: unavailable, with the reason
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
