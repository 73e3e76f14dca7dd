"""Pure-PyTorch reference backend: the ground truth for every other backend.

It materialises the dense ``[out, in]`` weight from the kept diagonals and runs one ``F.linear``. This is
obviously correct (autograd does the backward) and dense-cost, which is what a reference should be.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dynadiag.functional import place_diagonals
from dynadiag.kernels.ops import check_offsets


class ReferenceBackend:
    """Dense materialisation + ``F.linear``; works on every device and dtype."""

    name = "reference"

    def is_available(self, device: torch.device) -> tuple[bool, str]:
        return True, ""

    def diag_linear(
        self,
        x: torch.Tensor,  # [N, in]
        values: torch.Tensor,  # [K, D]
        offsets: torch.Tensor,  # [K]
        bias: torch.Tensor | None,  # [out]
        in_features: int,
        out_features: int,
    ) -> torch.Tensor:  # [N, out]
        check_offsets(offsets, max(in_features, out_features), "reference")
        weight = place_diagonals(values, offsets, in_features, out_features).to(x.dtype)
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


BACKEND = ReferenceBackend()
