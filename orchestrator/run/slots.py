"""Training slots: at most ``tune.max_concurrent`` trials train at once, while more trials are in flight.

A trial holds a slot only while its Ray Train job runs. When its training ends it gives the slot back
and merges + evaluates its adapter, and a trial that was waiting starts training meanwhile: the
accelerators do not sit idle while a finished trial is merged and scored. Tune runs up to twice
``tune.max_concurrent`` trials (``in_flight``); the slots bound the training.

    table = SlotTable(slots=2)                 # pure Python, the rules (tested without Ray)
    name = start_slot_actor(2, sweep_id)       # the sweep's actor: a SlotTable behind a Ray actor
    with train_slot(name, trial_id, on_wait=...):
        run_train_job(...)

Slots are leases: the holder renews its lease every few seconds (a daemon thread), and a lease not
renewed for ``hold_ttl_s`` (the holder's process died: a lost node, an OOM kill) goes back to the
pool. A waiting trial polls; one that stops polling for ``wait_ttl_s`` leaves the queue. Waiters are
served first come, first served. The same key acquiring again (a trial restarted by Tune) gets its
own lease back. Nothing deadlocks on Ray resources: a waiting trial holds no CPU or GPU (its driver
reserves only ``tune.driver_cpus`` and its memory), and the merge + eval task asks Ray for its own (``after_trial.cpus/gpus``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

POLL_S = 0.25  # how often a waiting trial asks for a slot
HOLD_TTL_S = 60.0  # a lease not renewed for this long is reclaimed
WAIT_TTL_S = 10.0  # a waiter that has not polled for this long leaves the queue


class SlotTable:
    """``slots`` leases, handed out first come, first served; see the module docstring."""

    def __init__(
        self,
        slots: int,
        *,
        hold_ttl_s: float = HOLD_TTL_S,
        wait_ttl_s: float = WAIT_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.slots = slots
        self.hold_ttl_s = hold_ttl_s
        self.wait_ttl_s = wait_ttl_s
        self._clock = clock
        self._held: dict[str, float] = {}  # key -> last renewal
        self._waiting: dict[str, float] = {}  # key -> last poll, in arrival order

    def try_acquire(self, key: str) -> bool:
        """True when ``key`` holds a slot (now or already); else ``key`` waits in the queue."""
        now = self._expire()
        if key in self._held:
            self._held[key] = now
            return True
        self._waiting[key] = now  # keeps its place when already queued
        if len(self._held) < self.slots and next(iter(self._waiting)) == key:
            del self._waiting[key]
            self._held[key] = now
            return True
        return False

    def renew(self, key: str) -> bool:
        """Keep ``key``'s lease; False when it has none (it expired)."""
        now = self._expire()
        if key not in self._held:
            return False
        self._held[key] = now
        return True

    def release(self, key: str) -> None:
        """Give ``key``'s slot back (or leave the queue); unknown keys are ignored."""
        self._held.pop(key, None)
        self._waiting.pop(key, None)

    def state(self) -> dict[str, Any]:
        """``{"slots": n, "held": [...], "waiting": [...]}`` (after expiry)."""
        self._expire()
        return {"slots": self.slots, "held": list(self._held), "waiting": list(self._waiting)}

    def _expire(self) -> float:
        now = self._clock()
        for table, ttl in ((self._held, self.hold_ttl_s), (self._waiting, self.wait_ttl_s)):
            for key in [k for k, seen in table.items() if now - seen > ttl]:
                del table[key]
        return now


def slot_actor_name(sweep_id: str) -> str:
    return f"tokentune-train-slots-{sweep_id}"


def start_slot_actor(slots: int, sweep_id: str) -> tuple[str, Any]:
    """The sweep's slot actor (0 CPUs, owned by this process, on its node: the head); returns its name
    and handle."""
    import ray

    from orchestrator.run.ray_cluster import on_this_node

    name = slot_actor_name(sweep_id)
    actor_cls = ray.remote(num_cpus=0, max_restarts=-1)(SlotTable)
    handle = actor_cls.options(name=name, get_if_exists=True, scheduling_strategy=on_this_node()).remote(
        slots
    )
    ray.get(handle.state.remote())  # started (and ready) before the first trial asks
    return name, handle


@contextlib.contextmanager
def train_slot(
    name: str | None, key: str, *, on_wait: Callable[[], None] | None = None, poll_s: float = POLL_S
) -> Iterator[float]:
    """Hold a slot of actor ``name`` for ``key`` inside the block (yields the seconds waited); no-op
    when ``name`` is None. ``on_wait`` is called once if the slot is not free at the first ask."""
    if not name:
        yield 0.0
        return
    import ray

    actor = ray.get_actor(name)
    t0 = time.perf_counter()
    first = True
    while not ray.get(actor.try_acquire.remote(key)):
        if first and on_wait is not None:
            on_wait()
        first = False
        time.sleep(poll_s)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(HOLD_TTL_S / 6):
            with contextlib.suppress(Exception):  # a missed renewal only shortens the lease
                actor.renew.remote(key)

    thread = threading.Thread(target=renew, name=f"train-slot-{key}", daemon=True)
    thread.start()
    try:
        yield time.perf_counter() - t0
    finally:
        stop.set()
        with contextlib.suppress(Exception):  # the actor is gone only when the sweep is
            ray.get(actor.release.remote(key), timeout=30)
