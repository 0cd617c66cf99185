"""Wall-clock timing that is honest about asynchronous devices.

CUDA work is queued, not done, when Python returns; a stopwatch that does not synchronise
measures launch time. `Stopwatch` synchronises the device twice per timed region: in `start()`
(so earlier queued work is not counted) and in `stop()` (so the region's work is); `peek()`
never does.
"""
from __future__ import annotations

import time

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    def __init__(self, device: torch.device):
        self.device = device
        self.t0 = 0.0

    def start(self) -> "Stopwatch":
        synchronize(self.device)
        self.t0 = time.perf_counter()
        return self

    def peek(self) -> float:
        """Host time since start, without a sync (fine for progress displays)."""
        return time.perf_counter() - self.t0

    def stop(self) -> float:
        synchronize(self.device)
        return time.perf_counter() - self.t0


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    except Exception:
        return float("nan")


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
