"""``cpu`` backend: the C++ kernels in ``csrc/cpu`` behind ``torch.ops.dynadiag``.

fp32 and bf16 run AVX-512 kernels (fp32 accumulation); fp64 and fp16 run a portable scalar path, so
``gradcheck`` and ``opcheck`` work through the real op. The extension is JIT-built on first use (seconds) and
cached in ``~/.cache/dynadiag``; if the build fails, :meth:`CpuBackend.is_available` returns the compiler's
message and ``auto`` falls back to ``reference``.
"""

from __future__ import annotations

import torch

from dynadiag.kernels import ops

_DTYPES = (torch.float32, torch.bfloat16, torch.float64, torch.float16)


class CpuBackend:
    """AVX-512/OpenMP C++ kernels for frozen diagonal layers on CPU tensors."""

    name = "cpu"

    def is_available(self, device: torch.device) -> tuple[bool, str]:
        device = torch.device(device)
        if device.type != "cpu":
            return False, f"the cpu backend runs on CPU tensors only (got {device})"
        try:
            ops.load_library()
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
        if not ops.is_loaded():  # a plain flag check, so torch.compile traces straight through
            ops.load_library()
        return ops.diag_linear("cpu", "cpu", _DTYPES, x, values, offsets, bias, in_features, out_features)


BACKEND = CpuBackend()
