"""Evaluation: top-1/top-5 accuracy and loss over a loader, and the model's sparsity statistics.

Counts are summed across ranks (:func:`dynadiag.distributed.all_reduce_sum`), so the numbers are the same
whichever process prints them.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from dynadiag import distributed as dist_utils
from dynadiag.conv import DiagConv2d
from dynadiag.layers import DiagLinear
from dynadiag.throughput import synchronize

__all__ = ["evaluate", "sparsity_stats"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    autocast: ContextManager | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Cross-entropy loss, top-1 and top-5 accuracy (in percent) of ``model`` on ``loader``.

    Returns:
        ``{"loss", "top1", "top5", "count", "images_per_s"}``; ``images_per_s`` times the forward passes alone
        (synchronised, data loading excluded, the first batch excluded as warm-up when there are several).
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, top5, count
    timings: list[tuple[float, int]] = []  # (seconds, images) per batch
    try:
        for i, (images, labels) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            images = images.to(device, non_blocking=True)  # [B, C, H, W]
            labels = labels.to(device, non_blocking=True)  # [B]
            synchronize(device)
            t0 = time.perf_counter()
            with autocast if autocast is not None else nullcontext():
                logits = model(images)  # [B, num_classes]
            synchronize(device)
            timings.append((time.perf_counter() - t0, images.shape[0]))
            logits = logits.float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices  # [B, k]
            hit = top == labels[:, None]
            totals[0] += F.cross_entropy(logits, labels, reduction="sum").double()
            totals[1] += hit[:, :1].sum()
            totals[2] += hit.sum()
            totals[3] += labels.numel()
    finally:
        model.train(was_training)
    totals = dist_utils.all_reduce_sum(totals)
    count = max(1.0, totals[3].item())
    timed = timings[1:] if len(timings) > 1 else timings
    seconds = sum(t for t, _ in timed)
    return {
        "images_per_s": sum(n for _, n in timed) / seconds if seconds > 0 else 0.0,
        "loss": totals[0].item() / count,
        "top1": 100.0 * totals[1].item() / count,
        "top5": 100.0 * totals[2].item() / count,
        "count": int(totals[3].item()),
    }


def sparsity_stats(model: nn.Module) -> dict[str, Any]:
    """Non-zeros the model computes with, over its linear/convolution weights.

    Diagonal layers count ``k * D`` (per kernel tap) once frozen, and all of ``P * D`` during the soft phase
    (every diagonal is live then). Other ``nn.Linear``/``nn.Conv2d`` layers count their exact non-zeros, so
    mask-based methods (zeros kept in a dense weight) are measured the same way.

    Returns:
        ``effective`` (1 - nnz / dense size over all linear/conv weights), ``target`` (the sparsity of the
        diagonal layers once frozen, or of the masked layers of a mask-based method), ``nnz``, ``dense``,
        ``params`` and ``layers``: ``{name: k}`` per diagonal layer.
    """
    nnz = dense = diag_nnz = diag_dense = 0
    layers: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, DiagLinear | DiagConv2d):
            if isinstance(module, DiagLinear):
                size, taps = module.in_features * module.out_features, 1
            else:
                taps = module.kernel_size[0] * module.kernel_size[1]
                size = module.in_channels * module.out_channels * taps
            kept = module.nnz if module.is_frozen else size
            nnz, dense = nnz + kept, dense + size
            diag_nnz, diag_dense = diag_nnz + module.nnz, diag_dense + size
            layers[name] = int(module.k)
        elif isinstance(module, nn.Linear | nn.Conv2d):
            nnz += int(torch.count_nonzero(module.weight.detach()).item())
            dense += module.weight.numel()
            mask = getattr(module, "weight_mask", None)  # mask-based methods: their targets are the masked layers
            if mask is not None:
                diag_nnz, diag_dense = diag_nnz + int(mask.sum().item()), diag_dense + mask.numel()
    return {
        "effective": 1.0 - nnz / max(1, dense),
        "target": (1.0 - diag_nnz / diag_dense) if diag_dense else 0.0,
        "nnz": nnz,
        "dense": dense,
        "params": sum(p.numel() for p in model.parameters()),
        "layers": layers,
    }
