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
        if x.device.type != "cpu":
            raise ValueError(f"cpu backend got a tensor on {x.device}")
        if x.dtype not in _DTYPES:
            raise TypeError(f"cpu backend supports {_DTYPES}, got {x.dtype}")
        if x.shape[-1] != in_features:
            raise ValueError(f"expected {in_features} input features, got {tuple(x.shape)}")
        if not ops.is_loaded():  # a plain flag check, so torch.compile traces straight through
            ops.load_library()
        lead = x.shape[:-1]
        x2 = x.reshape(-1, in_features).contiguous()  # [N, in]
        # values may be fp32 master weights under bf16 activations: the cast is differentiable.
        y = torch.ops.dynadiag.diag_fwd(x2, values.to(x.dtype).contiguous(), offsets, out_features)  # [N, out]
        if bias is not None:
            y = y + bias.to(x.dtype)
        return y.reshape(*lead, out_features)


BACKEND = CpuBackend()
