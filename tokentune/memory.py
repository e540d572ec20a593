"""Memory and throughput accounting of a training run: peak memory and tokens/s."""

from __future__ import annotations

import resource
import sys
import time

import torch


def peak_memory_bytes(device: torch.device | str | None = None) -> int:
    """CUDA peak allocated on a GPU; the process's peak resident set size on CPU."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def reset_peak(device: torch.device | str | None = None) -> None:
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


class Throughput:
    """Tokens per second between calls of ``tick``."""

    def __init__(self) -> None:
        self.tokens = 0
        self._t = time.perf_counter()

    def add(self, n: int) -> None:
        self.tokens += int(n)

    def tick(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self._t, 1e-9)
        self.tokens, self._t = 0, now
        return rate
