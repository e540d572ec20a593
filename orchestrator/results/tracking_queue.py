"""Tracking off Tune's event loop: a bounded background queue of MLflow writes, batched and retried.

    queue = TrackingQueue(send, record)               # send(trial_id, rows), record(trial_id, rows)
    queue.put(Write("t_0001", metrics_row({"loss": 1.2}, step=3)))   # returns at once, never blocks
    left = queue.close(timeout_s=60)                  # flush: a bounded wait; the rest is recorded

The driver's Tune callback (``orchestrator.run.tuner.TrialTrackingCallback``) puts every intermediate
result here and returns to Tune at once. One daemon thread takes what has queued (up to ``max_batch``
writes), groups it by trial (in put order) and calls ``send`` once per trial with all of that trial's
rows: the sender makes one ``log_batch`` of every step and metric (``tracking_journal.apply_rows``).
A failed ``send`` is retried with exponential backoff (``backoff_s``, doubling up to ``max_backoff_s``,
``attempts`` tries in all); once one has failed them all, the store counts as down and each later send
is tried once until one goes through (so a sweep's end does not wait out a backoff per batch). Rows that still could not be sent, rows that find the queue full, and rows
still queued when ``close`` stops waiting go to ``record`` (the trial folder's
``tracking_pending.jsonl``): a ``--resume`` sends them again. Nothing here imports MLflow: the rows are
plain dicts (``tracking_journal``'s format).
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
Row = dict[str, Any]
#: how many writes may wait (a 500-trial sweep makes ~15,500 results; each is a few hundred bytes)
MAX_QUEUED = 20_000
MAX_BATCH = 1000  # writes taken at once (MLflow's log_batch takes up to 1000 metrics)


class Write(NamedTuple):
    """One tracking write of one trial: a journal row (``{"op": "metrics", ...}``)."""

    trial_id: str
    row: Row


def metrics_row(metrics: dict[str, float], step: int, ts_ms: int | None = None) -> Row:
    """A journal row of metrics at ``step``, stamped now (ms) unless ``ts_ms`` is given."""
    return {"op": "metrics", "metrics": metrics, "step": int(step), "ts": ts_ms or int(time.time() * 1000)}


def with_retries(
    fn: Callable[[], T],
    attempts: int,
    backoff_s: float,
    max_backoff_s: float = 30.0,
    wait: Callable[[float], Any] = time.sleep,
) -> T:
    """``fn()``, tried up to ``attempts`` times; waits ``backoff_s``, then twice that (at most
    ``max_backoff_s``) between tries; the last failure is raised."""
    delay = backoff_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception:
            if attempt >= attempts:
                raise
            wait(delay)
            delay = min(2 * delay, max_backoff_s)
    raise AssertionError("unreachable")  # attempts < 1


def by_trial(writes: list[Write]) -> dict[str, list[Row]]:
    """Rows grouped by trial, each trial's rows in put order (trials in order of first write)."""
    out: dict[str, list[Row]] = {}
    for w in writes:
        out.setdefault(w.trial_id, []).append(w.row)
    return out


class TrackingQueue:
    """See the module docstring. ``send`` and ``record`` are called from the queue's thread (and
    ``record`` also from ``put`` and ``close``); ``record`` must not raise."""

    def __init__(
        self,
        send: Callable[[str, list[Row]], Any],
        record: Callable[[str, list[Row]], Any],
        *,
        maxsize: int = MAX_QUEUED,
        max_batch: int = MAX_BATCH,
        attempts: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.send, self.record = send, record
        self.max_batch = max_batch
        self.retry = {"attempts": attempts, "backoff_s": backoff_s, "max_backoff_s": max_backoff_s}
        self.sent = self.recorded = self.calls = 0
        self.last_error: str | None = None
        self.down = False  # the last send failed every try: the next ones are tried once
        self._queue: queue.Queue[Write | None] = queue.Queue(maxsize)
        self._inflight: list[Write] = []  # taken from the queue, not sent yet
        self._lock = threading.Lock()
        self._gave_up = threading.Event()  # close() stopped waiting: the thread records nothing more
        self._thread = threading.Thread(target=self._run, name="tracking-queue", daemon=True)
        self._thread.start()

    def put(self, write: Write) -> bool:
        """Queue a write; never blocks. A full queue (or a closed one) records it instead: False."""
        if not self._gave_up.is_set():
            try:
                self._queue.put_nowait(write)
                return True
            except queue.Full:
                self.last_error = self.last_error or f"more than {self._queue.maxsize} writes waiting"
        self._record([write])
        return False

    def close(self, timeout_s: float) -> int:
        """Send what is queued, waiting at most ``timeout_s``; record what is left. Returns how many
        writes were not sent (recorded, since the queue started)."""
        deadline = time.monotonic() + timeout_s
        try:
            self._queue.put(None, timeout=max(0.0, timeout_s))  # the end mark, after every write
        except queue.Full:
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            with self._lock:
                self._gave_up.set()
                left = [*self._inflight, *self._drain()]
                self._inflight = []
            self.last_error = self.last_error or f"not sent within {timeout_s:g} s"
            self._record(left)
        return self.recorded

    # ---- the thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            first = self._queue.get()
            batch, done = ([], True) if first is None else ([first], False)
            while batch and len(batch) < self.max_batch:
                try:
                    w = self._queue.get_nowait()
                except queue.Empty:
                    break
                if w is None:
                    done = True
                    break
                batch.append(w)
            if batch:
                self._send(batch)
            if done:
                return

    def _send(self, batch: list[Write]) -> None:
        with self._lock:
            self._inflight = list(batch)
        for trial_id, rows in by_trial(batch).items():
            try:
                self.calls += 1
                retry = {**self.retry, "attempts": 1} if self.down else self.retry
                with_retries(functools.partial(self.send, trial_id, rows), wait=self._wait, **retry)
                self.sent += len(rows)
                self.down = False
            except Exception as err:  # noqa: BLE001 - the store is down: keep the rows for --resume
                self.last_error, self.down = f"{type(err).__name__}: {err}"[:500], True
                log.debug("tracking writes of trial %s not sent: %s", trial_id, err)
                if not self._gave_up.is_set():
                    self._record([Write(trial_id, r) for r in rows])
            with self._lock:
                self._inflight = [w for w in self._inflight if w.trial_id != trial_id]

    def _wait(self, seconds: float) -> None:
        if self._gave_up.wait(seconds):
            raise RuntimeError("the sweep ended before the store came back")

    def _drain(self) -> list[Write]:
        out = []
        while True:
            try:
                w = self._queue.get_nowait()
            except queue.Empty:
                return out
            if w is not None:
                out.append(w)

    def _record(self, writes: list[Write]) -> None:
        for trial_id, rows in by_trial(writes).items():
            try:
                self.record(trial_id, rows)
            except Exception as err:  # noqa: BLE001 - recording is the fallback; say so and go on
                log.warning("tracking writes of trial %s could not be recorded either: %s", trial_id, err)
        self.recorded += len(writes)
