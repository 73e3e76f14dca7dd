"""Exporting diagonal models: ONNX (standard ops only) and ``torch.export`` (the loading side's needs).

ONNX has no diagonal-sparse operator, so :func:`export_onnx` runs every :class:`~dynadiag.DiagLinear` through the
pure-PyTorch ``reference`` backend while exporting: the graph scatters the kept diagonals ``V`` (``[K, D]``) into
the dense ``[out, in]`` weight (``ScatterND``) and runs one ``Gemm``. The file stores the ``K * D`` values and their
int64 positions (about half a dense file at 90 % sparsity); ONNX Runtime folds the scatter once at session start and
then computes a dense GEMM: an ONNX runtime gets the accuracy of the sparse model, not the speed of the sparse
kernels.

``torch.export`` of a frozen model keeps the ``torch.ops.dynadiag`` kernels in the graph; the program then loads and
runs only where those ops are registered (:func:`load_ops`). Export under :func:`standard_ops` instead for a program
of plain ATen ops that loads anywhere (dense speed, as above).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynadiag.kernels import get_backend
from dynadiag.layers import DiagLinear

__all__ = ["export_onnx", "load_ops", "standard_ops"]


@contextlib.contextmanager
def standard_ops(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every diagonal layer of ``model`` computes with standard PyTorch ops (``reference``).

    Restores each layer's backend on exit. :class:`~dynadiag.DiagConv2d` always computes with ``F.conv2d``.
    """
    layers = [m for m in model.modules() if isinstance(m, DiagLinear)]
    backends = [layer.backend for layer in layers]
    try:
        for layer in layers:
            layer.backend = "reference"
        yield model
    finally:
        for layer, backend in zip(layers, backends, strict=True):
            layer.backend = backend


def export_onnx(
    model: nn.Module,
    args: tuple[Any, ...],
    path: str | os.PathLike,
    *,
    dynamic_batch: bool = True,
    **kwargs: Any,
) -> Path:
    """Export ``model`` to an ONNX file made of standard operators (needs the ``onnx`` and ``onnxscript`` packages).

    Args:
        model: a model with diagonal layers (frozen or soft); put it in ``eval()`` mode first for inference.
        args: example inputs, e.g. ``(torch.randn(1, 3, 224, 224),)``.
        path: the ``.onnx`` file to write.
        dynamic_batch: make dimension 0 of every tensor input dynamic.
        **kwargs: passed on to ``torch.onnx.export`` (e.g. ``opset_version``).

    Returns:
        The file written.
    """
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it; fail here with the install line)
    except ImportError:
        raise ImportError("export_onnx needs onnx and onnxscript: pip install 'dynadiag[onnx]'") from None
    if dynamic_batch and "dynamic_shapes" not in kwargs:
        batch = torch.export.Dim("batch")
        kwargs["dynamic_shapes"] = tuple({0: batch} if isinstance(a, torch.Tensor) else None for a in args)
    path = Path(path)
    with standard_ops(model):
        torch.onnx.export(model, args, str(path), dynamo=True, verbose=False, **kwargs)
    return path


def load_ops(device: torch.device | str = "cpu") -> None:
    """Register the ``torch.ops.dynadiag`` kernels for ``device`` (build or load the C++/CUDA extension).

    Call it before ``torch.export.load`` (or before running a loaded program) of a frozen model exported with the
    compiled kernels: such a program calls ``torch.ops.dynadiag.diag_fwd_bias`` (CPU) or ``diag_fwd`` (CUDA).

    Raises:
        BackendUnavailableError: the kernels cannot be built or loaded for ``device`` (the message says why).
    """
    device = torch.device(device)
    get_backend("cuda" if device.type == "cuda" else "cpu", device)
