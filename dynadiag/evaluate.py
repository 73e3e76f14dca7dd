"""Evaluation: top-1/top-5 accuracy and loss over a loader (sparsity is counted in :mod:`dynadiag.sparsity`).

Counts are summed across ranks (:func:`dynadiag.distributed.all_reduce_sum`), so the numbers are the same
whichever process prints them.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from dynadiag import distributed as dist_utils
from dynadiag.throughput import synchronize

__all__ = ["evaluate"]


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
