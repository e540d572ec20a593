"""Training slots (orchestrator.run.slots): the lease rules without Ray, and the gate on a real Ray cluster."""

from __future__ import annotations

import time

import pytest

from orchestrator.run.slots import SlotTable


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_slots_are_bounded_and_served_first_come_first_served():
    t = SlotTable(2)
    assert t.try_acquire("a") and t.try_acquire("b")
    assert not t.try_acquire("c") and not t.try_acquire("d")  # c queues first, then d
    assert t.state() == {"slots": 2, "held": ["a", "b"], "waiting": ["c", "d"]}
    t.release("a")
    assert not t.try_acquire("d")  # c was first: d may not overtake it
    assert t.try_acquire("c") and not t.try_acquire("d")
    t.release("b")
    assert t.try_acquire("d")
    assert t.state()["held"] == ["c", "d"] and t.state()["waiting"] == []


def test_a_holder_asking_again_keeps_its_slot_and_unknown_releases_are_ignored():
    t = SlotTable(1)
    assert t.try_acquire("a")
    assert t.try_acquire("a")  # a trial restarted by Tune gets its own lease back
    assert not t.try_acquire("b")
    t.release("nobody")
    assert t.state()["held"] == ["a"]
    t.release("b")  # leaving the queue
    assert t.state()["waiting"] == []


def test_leases_and_waiters_expire_when_their_process_is_gone():
    clock = Clock()
    t = SlotTable(1, hold_ttl_s=60, wait_ttl_s=20, clock=clock)
    assert t.try_acquire("a")
    assert not t.try_acquire("b") and not t.try_acquire("c")
    clock.now = 30.0
    assert t.renew("a")  # a is alive
    assert not t.try_acquire("c")  # c polls, b does not
    clock.now = 45.0  # b last polled at 0: gone from the queue; c (30) stays
    assert t.state()["waiting"] == ["c"]
    clock.now = 91.0  # a last renewed at 30: its lease is reclaimed
    assert not t.renew("a")
    assert t.try_acquire("c")


def test_slot_table_refuses_no_slots():
    with pytest.raises(ValueError, match="slots must be >= 1"):
        SlotTable(0)


@pytest.mark.ray
def test_the_slot_actor_gates_concurrent_holders(ray_local, tmp_path):
    """Three Ray tasks ask one slot at once: their held intervals never overlap, all of them run.

    The tasks meet at a barrier (a file each in ``tmp_path``) before they ask, so on a loaded machine a
    slow task start cannot turn "at once" into "one after another"."""
    import ray

    from orchestrator.run.slots import start_slot_actor

    name, handle = start_slot_actor(1, "test-gate")
    barrier = str(tmp_path)

    @ray.remote(num_cpus=0)
    def hold(key: str) -> tuple[float, float, float]:
        from pathlib import Path

        from orchestrator.run.slots import train_slot

        Path(barrier, key).touch()
        deadline = time.time() + 120
        while len(list(Path(barrier).iterdir())) < 3 and time.time() < deadline:
            time.sleep(0.02)
        waited_flag = []
        with train_slot(name, key, on_wait=lambda: waited_flag.append(1), poll_s=0.05) as waited:
            start = time.time()
            time.sleep(2.0)  # long enough that the other two ask while this one holds it, even under load
            end = time.time()
        return start, end, waited if waited_flag else 0.0

    spans = sorted(ray.get([hold.remote(k) for k in ("a", "b", "c")]))
    for (_, end, _), (start, _, _) in zip(spans, spans[1:], strict=False):
        assert start >= end, spans  # never two inside at once
    assert sum(1 for s in spans if s[2] > 0) >= 2  # two of them waited for the slot
    assert ray.get(handle.state.remote()) == {"slots": 1, "held": [], "waiting": []}  # all released
