"""Timing shared by the benchmark scripts (imported as a sibling module: scripts run as
``python benchmarks/<name>.py``, which puts this folder on ``sys.path``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object], steps: int, device: torch.device) -> float:
    """Median wall time in seconds of ``steps`` calls of ``fn`` after 3 warm-up calls, synchronising
    CUDA around each call so that queued kernels are counted."""
    times = []
    for i in range(steps + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t)
    return statistics.median(times)
