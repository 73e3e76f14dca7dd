"""``DiagConv2d``: the DynaDiag diagonal pattern applied to every kernel tap of a convolution.

A ``[C_out, C_in, kh, kw]`` convolution is ``kh * kw`` channel-mixing matrices ``[C_out, C_in]``, one per
kernel tap. ``DiagConv2d`` gives each tap its own diagonal values but one shared choice of diagonals (one
``alpha`` per diagonal), so the kept pattern is identical across taps, as in the paper's CNN appendix.
Compute materialises the (masked) kernel and calls ``F.conv2d``: there is no fast sparse conv kernel yet.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dynadiag import functional as DF
from dynadiag.layers import DiagonalSparseMixin, all_diagonals_weight

__all__ = ["DiagConv2d"]


class DiagConv2d(DiagonalSparseMixin, nn.Module):
    """Diagonally sparse ``nn.Conv2d`` (``groups=1``), same life cycle as :class:`~dynadiag.DiagLinear`.

    Parameters: ``V`` ``[P, D, kh*kw]`` (``[k, D, kh*kw]`` once frozen), ``alpha`` ``[P]``, optional bias.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] | str = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        bias: bool = True,
        *,
        sparsity: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = tuple(kernel_size), stride, padding, dilation
        self.sparsity = DF.validate_sparsity(sparsity, where=f"DiagConv2d({in_channels}->{out_channels}): ")
        self.num_diagonals, self.diag_length = DF.diag_dims(in_channels, out_channels)
        self.k = DF.num_active_diagonals(in_channels, out_channels, self.sparsity)
        self.temperature = 1.0
        self.layer_name = ""
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.V = nn.Parameter(torch.empty(self.num_diagonals, self.diag_length, taps, **factory))
        self.alpha = nn.Parameter(torch.full((self.num_diagonals,), 1.0 / self.num_diagonals, **factory))
        self.bias = nn.Parameter(torch.zeros(out_channels, **factory)) if bias else None
        self.register_buffer("offsets", None)
        # fan-in of a diagonal conv: D channels x taps, as nn.Conv2d's init would see it.
        bound = 1.0 / math.sqrt(self.diag_length * taps)
        nn.init.uniform_(self.V, -bound, bound)

    @property
    def nnz(self) -> int:
        return self.k * self.diag_length * self.V.shape[-1]

    def dense_weight(self) -> torch.Tensor:  # [C_out, C_in, kh, kw]
        taps = self.V.shape[-1]
        values = self.V * self.soft_weights()[:, None, None]  # [P|k, D, taps]
        mats = []
        for tap in range(taps):
            if self.is_frozen:
                mats.append(DF.place_diagonals(values[..., tap], self.offsets, self.in_channels, self.out_channels))
            else:
                mats.append(all_diagonals_weight(values[..., tap], self.in_channels, self.out_channels))
        return torch.stack(mats, dim=-1).view(self.out_channels, self.in_channels, *self.kernel_size)

    @property
    def weight(self) -> torch.Tensor:  # [C_out, C_in, kh, kw]
        """The dense kernel the layer computes with, like ``nn.Conv2d.weight``: materialised on every access,
        differentiable (gradients reach ``V``/``alpha``), not a parameter, read-only (see ``DiagLinear.weight``)."""
        return self.dense_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C_in, H, W] -> [B, C_out, H', W']
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"DiagConv2d '{self.layer_name}': expected input [B, {self.in_channels}, H, W], got {list(x.shape)}"
            )
        return F.conv2d(x, self.dense_weight(), self.bias, self.stride, self.padding, self.dilation)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, sparsity: float, *, freeze: bool = False) -> DiagConv2d:
        """Build from a dense ``nn.Conv2d`` (``groups=1``), ranking diagonals by their norm over all taps."""
        if conv.groups != 1:
            raise ValueError(f"DiagConv2d supports groups=1 only, got groups={conv.groups}")
        weight = conv.weight.detach()  # [C_out, C_in, kh, kw]
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            bias=conv.bias is not None,
            sparsity=sparsity,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            taps = weight.flatten(2)  # [C_out, C_in, taps]
            values = torch.stack([DF.gather_diagonals(taps[..., i]) for i in range(taps.shape[-1])], dim=-1)
            layer.V.copy_(values)
            layer.alpha.copy_(values.flatten(1).norm(dim=1))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias.detach())
        return layer.freeze_() if freeze else layer

    @torch.no_grad()
    def to_conv(self) -> nn.Conv2d:
        """The exact dense equivalent."""
        weight = self.dense_weight()
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            bias=self.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        conv.weight.copy_(weight)
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"k={self.k}/{self.num_diagonals}, frozen={self.is_frozen}"
        )
