"""StepTimer: wall-clock and CPU-time images per second over the timed steps."""

from __future__ import annotations

import time

import torch

from dynadiag.throughput import StepTimer


def _busy(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_cpu_time_leaves_out_waiting_and_excluded_work():
    timer = StepTimer(torch.device("cpu"), warmup=1)
    for _ in range(3):  # the first step is warm-up
        timer.start()
        _busy(0.02)  # computing: wall and CPU time
        time.sleep(0.05)  # waiting (a loaded machine's preemption looks like this): wall time only
        t0, c0 = time.perf_counter(), time.process_time()
        _busy(0.03)  # a mid-step measurement the timers must not count
        timer.exclude(time.perf_counter() - t0, time.process_time() - c0)
        timer.stop(8)
    assert timer.images == 16
    assert 0.04 <= timer.cpu_seconds < 0.06  # two steps of ~20 ms of computing, without the excluded 30 ms
    assert timer.seconds >= 0.14  # the waiting counts on the wall clock
    assert timer.images_per_cpu_second > 2 * timer.images_per_second
    timer.reset()
    assert timer.images_per_cpu_second == 0.0 and timer.cpu_seconds == 0.0
