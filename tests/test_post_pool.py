"""The merge + eval pool (orchestrator.run.post_pool): its sizing and placement decisions, first come
first served over warm workers, ``after_trial.workers``, ``phase/post_queued_s``; and, on a real Ray,
calls that queue are never timed or killed by another call's timeout."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from orchestrator.run.post_pool import WorkerTable, node_capacity, plan_workers, pool_size
from orchestrator.spec.sections import AfterTrial
from tests.conftest import refused


# ---- decisions -------------------------------------------------------------------------------------------
def test_pool_size_follows_the_trials_in_flight_and_the_cluster():
    cluster = {"CPU": 8.0}
    assert pool_size(AfterTrial(), cluster, in_flight=4) == 4  # 4 calls of 1 CPU fit in 8
    assert pool_size(AfterTrial(cpus=4), cluster, in_flight=4) == 2  # only 2 calls of 4 CPUs at once
    assert pool_size(AfterTrial(cpus=0), cluster, in_flight=6) == 6  # nothing reserved: as many as trials
    assert pool_size(AfterTrial(cpus=16), cluster, in_flight=4) == 1  # never 0
    assert pool_size(AfterTrial(workers=3), cluster, in_flight=16) == 3  # as set


def test_plan_workers_spreads_over_nodes_by_what_each_holds():
    assert plan_workers(4, {"a": 3, "b": 1}) == {"a": 3, "b": 1}
    assert plan_workers(3, {"a": 2, "b": 2}) == {"a": 2, "b": 1}
    assert plan_workers(5, {"a": 1, "b": 1}) == {"a": 3, "b": 2}  # more than fit (after_trial.workers)
    assert plan_workers(2, {}) == {"": 2}
    nodes = [
        {"NodeID": "a", "Alive": True, "Resources": {"CPU": 8.0}},
        {"NodeID": "b", "Alive": True, "Resources": {"CPU": 3.0}},
        {"NodeID": "gone", "Alive": False, "Resources": {"CPU": 64.0}},
    ]
    assert node_capacity(nodes, 2) == {"a": 4, "b": 1}
    assert node_capacity(nodes, 0) == {"a": 1, "b": 1}


def test_worker_table_serves_first_come_on_the_reserved_node():
    table = WorkerTable(["a", "a", "b"])
    assert table.try_acquire("t1", "a") == 0
    assert table.try_acquire("t2", "a") == 1
    assert table.try_acquire("t3", "a") is None  # both of a's workers busy: it waits (b's is not a's)
    assert table.try_acquire("t4", "b") == 2  # a later call for another node is not held up
    assert table.try_acquire("t5", "a") is None
    assert table.state() == {"workers": 3, "busy": 3, "queue": 2}
    table.release(0)
    assert table.try_acquire("t5", "a") is None  # t3 came first
    assert table.try_acquire("t3", "a") == 0
    table.release(2)
    assert table.try_acquire("t6", None) == 2  # no node asked for (nothing reserved): any idle worker
    table.leave("t5")  # its caller gave up
    assert table.state() == {"workers": 3, "busy": 3, "queue": 0}


def test_after_trial_workers_is_checked():
    base = {"name": "w", "base": {"train": {"max_steps": 2}}}
    refused({**base, "after_trial": {"workers": 0}}, "after_trial.workers", "whole number >= 1")
    refused({**base, "after_trial": {"workers": 1.5}}, "after_trial.workers", "null")
    assert AfterTrial(workers=2).workers == 2 and AfterTrial().workers is None


def test_phase_post_queued_is_the_wait_before_the_worker_starts(tmp_path):
    from orchestrator.results.trial_status import EVENTS_FILE, phase_durations

    rows = [("trial started", 0.0), ("post-trial started", 10.0), ("post-trial queued", 10.5)]
    rows += [("post-trial dispatched", 14.0), ("merge_started", 14.2), ("post-trial finished", 20.0)]
    (tmp_path / EVENTS_FILE).write_text("".join(json.dumps({"event": e, "time": t}) + "\n" for e, t in rows))
    d = phase_durations(tmp_path)
    assert d["phase/post_queued_s"] == 4.0 and d["phase/post_start_s"] == pytest.approx(4.2)


# ---- on a real Ray ---------------------------------------------------------------------------------------
FAST_S, SLOW_S, TIMEOUT_S = 3.0, 120.0, 8.0


def slow_stand_in(final_dir: str, trial_dir: str, eval_cfg, **kw) -> dict:
    """Stands in for merge_and_evaluate in the pool's workers: sleeps (``slow`` in the name: SLOW_S)."""
    time.sleep(SLOW_S if "slow" in Path(final_dir).name else FAST_S)
    return {
        "metrics": {"merge_s": FAST_S},
        "results": {},
        "merged_dir": None,
        "eval_json": None,
        "error": None,
    }


@pytest.mark.ray
@pytest.mark.slow
def test_queued_calls_are_never_timed_or_killed_by_another_calls_timeout(tmp_path, ray_local):
    """8 concurrent merge + eval calls on a pool of 2 warm workers, on a real Ray with real actors. The
    merge function is a slow stand-in (a sleep: the point here is the queue, not the merge): one call
    runs past after_trial.timeout_s, the 7 fast ones (3 s each) queue behind it for longer than
    timeout_s in all. Only the slow one times out, after running timeout_s itself; its worker is
    replaced by a fresh process that serves the calls after it; every fast call finishes and records
    its queue wait as phase/post_queued_s."""
    from orchestrator.results.trial_status import phase_durations
    from orchestrator.run.post_pool import start_pool
    from orchestrator.run.trial import PostTrialPlan, TrialFailed, after_training

    after = AfterTrial(action="merge", cpus=0.5, workers=2, timeout_s=TIMEOUT_S)
    name, _handle = start_pool("test-queue", after, ray_local.cluster_resources(), 8, work=slow_stand_in)
    outcome: dict[str, object] = {}
    took: dict[str, float] = {}

    def call(trial: str) -> None:
        t0 = time.monotonic()
        try:
            outcome[trial] = after_training(
                after, str(tmp_path / trial), tmp_path / trial, None, PostTrialPlan(name)
            )
        except TrialFailed as err:
            outcome[trial] = str(err)
        took[trial] = time.monotonic() - t0

    names = ["slow", *(f"fast{i}" for i in range(7))]
    threads = [threading.Thread(target=call, args=(t,)) for t in names]
    for t in threads:
        t.start()
        time.sleep(0.3)  # the slow one asks first
    for t in threads:
        t.join(timeout=300)
    assert outcome["slow"] == f"merge+eval timed out after {TIMEOUT_S:g} s (after_trial.timeout_s)"
    fast = names[1:]
    assert all(outcome[t] == {"merge_s": FAST_S} for t in fast), outcome  # none timed out from waiting
    assert max(took[t] for t in fast) > TIMEOUT_S  # their waits would have exceeded timeout_s
    queued = [phase_durations(tmp_path / t)["phase/post_queued_s"] for t in fast]
    assert max(queued) > FAST_S, queued  # some waited behind another call, and said so
    events = {t: _events(tmp_path / t) for t in names}
    assert max(e["post-trial queued"]["queue"] for e in events.values()) >= 1  # the queue length
    slow = events["slow"]["post-trial dispatched"]
    assert events["slow"]["post-trial finished"]["time"] - slow["time"] >= TIMEOUT_S  # its own running time
    after_kill = [
        e["post-trial dispatched"]
        for e in events.values()
        if e["post-trial dispatched"]["worker"] == slow["worker"]
    ]
    assert any(d["pid"] != slow["pid"] for d in after_kill)  # a fresh process took the killed one's place


def _events(tdir: Path) -> dict[str, dict]:
    """The last row of each event in ``tdir/events.jsonl``."""
    return {r["event"]: r for r in map(json.loads, (tdir / "events.jsonl").read_text().splitlines())}
