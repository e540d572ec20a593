"""Memory and throughput accounting: peak memory, bytes saved for backward, tokens/s."""

from __future__ import annotations

import contextlib
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


class SavedTensorCounter:
    """Counts bytes autograd saves for backward, deduplicated by storage.

    >>> with SavedTensorCounter() as c:
    ...     loss = model(**batch).loss
    >>> c.bytes
    """

    def __init__(self) -> None:
        self.bytes = 0
        self._seen: set[int] = set()
        self._ctx = None

    def _pack(self, t: torch.Tensor):
        try:
            st = t.untyped_storage()
            key = st.data_ptr()
            if key not in self._seen:
                self._seen.add(key)
                self.bytes += st.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. tensors without storage
            pass
        return t

    def __enter__(self) -> SavedTensorCounter:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


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


@contextlib.contextmanager
def timed(out: dict, key: str):
    t = time.perf_counter()
    try:
        yield
    finally:
        out[key] = out.get(key, 0.0) + time.perf_counter() - t
