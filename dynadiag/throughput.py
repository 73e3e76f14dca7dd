"""Throughput measurement: images per second for training steps and for inference.

Both numbers exclude data loading (the clock only runs around compute, with the device synchronised at
both ends) and exclude warm-up (the first steps pay for allocator growth, kernel selection and lazy
backend builds). The training timer also keeps the process's CPU time over the same steps: on a CPU device, images
per CPU-second is the machine-load-robust number (a busy machine stretches the wall clock of a 1-thread run, much
less its CPU time); with several threads it counts every thread's time.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext

import torch
from torch import nn

__all__ = ["StepTimer", "measure_inference_throughput", "synchronize"]


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` so wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu":  # pragma: no cover - no XPU in CI
        torch.xpu.synchronize(device)


class StepTimer:
    """Accumulates compute time and images over training steps, skipping the first ``warmup`` steps.

    Usage::

        timer.start()                 # after the batch is on the device
        ... forward, backward, step ...
        timer.stop(batch_size)        # synchronises, then stops the clock

    The timer restarts its warm-up count after :meth:`reset` (e.g. after the topology changed and the
    compute path switched from dense to sparse kernels).
    """

    def __init__(self, device: torch.device, warmup: int = 5) -> None:
        self.device, self.warmup = device, int(warmup)
        self.reset()

    def reset(self) -> None:
        self.seconds, self.cpu_seconds, self.images, self._seen, self._t0, self._c0 = 0.0, 0.0, 0, 0, None, 0.0

    def start(self) -> None:
        synchronize(self.device)
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def stop(self, batch_size: int) -> None:
        if self._t0 is None:
            return
        synchronize(self.device)
        elapsed, cpu = time.perf_counter() - self._t0, time.process_time() - self._c0
        self._t0 = None
        self._seen += 1
        if self._seen > self.warmup:
            self.seconds += elapsed
            self.cpu_seconds += cpu
            self.images += int(batch_size)

    def exclude(self, seconds: float, cpu_seconds: float = 0.0) -> None:
        """Leave ``seconds`` (wall) and ``cpu_seconds`` (process CPU time) of the running step out of the timing (e.g.
        a measurement taken mid-step)."""
        if self._t0 is not None:
            self._t0 += float(seconds)
            self._c0 += float(cpu_seconds)

    def state_dict(self) -> dict[str, float]:
        """The accumulated timing, for checkpoints: a resumed run reports its whole-run rate, not the resumed part's."""
        return {"seconds": self.seconds, "cpu_seconds": self.cpu_seconds, "images": self.images, "seen": self._seen}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.seconds, self.cpu_seconds = float(state.get("seconds", 0.0)), float(state.get("cpu_seconds", 0.0))
        self.images, self._seen = int(state.get("images", 0)), int(state.get("seen", 0))

    @property
    def images_per_second(self) -> float:
        """Images/s over the timed (post-warm-up) steps; 0.0 if none were timed yet."""
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def images_per_cpu_second(self) -> float:
        """Images per second of process CPU time over the timed steps; 0.0 if none were timed yet."""
        return self.images / self.cpu_seconds if self.cpu_seconds > 0 else 0.0


@torch.no_grad()
def measure_inference_throughput(
    model: nn.Module,
    images: torch.Tensor,  # [B, C, H, W], already on the model's device
    warmup: int = 3,
    iters: int = 10,
    min_seconds: float = 0.0,
    autocast: ContextManager | None = None,
) -> float:
    """Forward-only images/s of ``model`` in eval mode on a fixed batch.

    Args:
        model: the model (put in eval mode for the measurement, restored afterwards).
        images: one batch on the target device; reusing it keeps data loading out of the timing.
        warmup: untimed forward passes first.
        iters: timed forward passes (at least).
        min_seconds: keep timing until this much time has passed (steadier numbers on noisy machines).
        autocast: the same autocast context training uses, so the measured path is the deployed one.

    Returns:
        Images per second.
    """
    was_training = model.training
    model.eval()
    device = images.device
    ctx = autocast if autocast is not None else nullcontext()
    try:
        for _ in range(max(0, warmup)):
            with ctx:
                model(images)
        synchronize(device)
        count, t0 = 0, time.perf_counter()
        while count < max(1, iters) or time.perf_counter() - t0 < min_seconds:
            with ctx:
                model(images)
            count += 1
        synchronize(device)
        elapsed = time.perf_counter() - t0
    finally:
        model.train(was_training)
    return count * images.shape[0] / elapsed
