"""The merge + eval pool: warm post-trial workers that serve a sweep's CPU merges and evaluations.

    name, handle = start_pool(sweep_id, spec.after_trial, cluster, in_flight=4)     # the sweep's driver
    out = run_on_pool(name, final_dir, trial_dir, cfg.eval, resources={"num_cpus": 1}, timeout_s=1800)

The pool is one asyncio actor (0 CPUs, owned by the sweep's driver) holding ``size`` warm
:class:`PostTrialWorker` processes (torch, peft and lm-eval imported once, as the sweep starts), pinned to
the cluster's nodes in proportion to what each node can run at once (:func:`plan_workers`). ``size`` is
``after_trial.workers``, or by default (:func:`pool_size`) the trials that can be in flight, capped by how
many calls of ``after_trial.cpus`` the cluster holds at once.

A call (:func:`run_on_pool`, in the trial driver) first reserves its resources (``after_trial.cpus``,
``memory``) in a placement group, as a task of that size would be scheduled, then asks the pool for an idle
worker on the node holding that reservation (:class:`WorkerTable`: first come, first served). A worker
runs one call at a time, so calls wait in the pool, never in a worker's queue. ``timeout_s`` is counted
from when the worker starts the call: time queued (for the reservation or a worker) is never counted. A
call that runs past it fails alone: its worker is killed and Ray starts a fresh one in its place; no
other call (running or queued) is touched.

The trial's ``events.jsonl`` gets ``post-trial queued`` (``queue``: calls waiting ahead of it, ``busy`` of
``workers``) and, from the worker as it starts the call, ``post-trial dispatched`` (``waited_s`` in the
pool, ``worker``): ``phase/post_queued_s`` on the trial's results
and MLflow run (``orchestrator.results.trial_status``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from orchestrator.results.trial_status import log_event
from orchestrator.run.post_trial import (
    STARTED,
    as_eval_config,
    failed_result,
    failure_text,
    merge_and_evaluate,
    started_then,
)
from orchestrator.spec.sections import AfterTrial
from tokentune.config import EvalConfig


# ---- decisions (plain Python) ------------------------------------------------------------------------
def pool_size(after: AfterTrial, cluster: Mapping[str, float], in_flight: int) -> int:
    """Warm workers: ``after_trial.workers``, else the trials in flight capped by the calls of
    ``after_trial.cpus`` the cluster's CPUs hold at once (at least 1)."""
    if after.workers is not None:
        return int(after.workers)
    size = max(1, int(in_flight))
    if after.cpus > 0:
        size = min(size, int(float(cluster.get("CPU", 0)) // after.cpus))
    return max(1, size)


def plan_workers(size: int, capacity: Mapping[str, int]) -> dict[str, int]:
    """``size`` workers over nodes (``{node_id: calls it holds at once}``): one per node in turn while a
    node has room, then in turn over all nodes. Nodes in the order given."""
    nodes = list(capacity)
    if not nodes:
        return {"": size}  # no node known: Ray places them
    plan = dict.fromkeys(nodes, 0)
    for room in (True, False):
        while sum(plan.values()) < size:
            open_nodes = [n for n in nodes if not room or plan[n] < capacity[n]]
            if not open_nodes:
                break
            for n in open_nodes[: size - sum(plan.values())]:
                plan[n] += 1
    return {n: k for n, k in plan.items() if k}


def node_capacity(nodes: Sequence[Mapping[str, Any]], cpus: float) -> dict[str, int]:
    """``{node_id: calls of cpus it holds}`` of the alive nodes in ``ray.nodes()`` (cpus 0: 1 each)."""
    out = {}
    for node in nodes:
        if node.get("Alive", node.get("alive")):
            node_cpus = float((node.get("Resources") or {}).get("CPU", 0))
            out[node["NodeID"]] = int(node_cpus // cpus) if cpus > 0 else 1
    return out


class WorkerTable:
    """Which warm worker serves which call: worker ``i`` lives on ``nodes[i]``; a call asks with the node
    of its reservation and gets an idle worker there (any idle one when no worker lives there). Waiting
    calls are served first come, first served: a call is not passed over by a later one that wants the
    same worker."""

    def __init__(self, nodes: Sequence[str]) -> None:
        self.nodes = list(nodes)
        self.busy: set[int] = set()
        self.waiting: dict[str, str | None] = {}  # key -> node, in arrival order

    def try_acquire(self, key: str, node: str | None) -> int | None:
        """A worker index for ``key``, or None (then ``key`` waits, keeping its place)."""
        self.waiting.setdefault(key, node)
        free = [i for i in range(len(self.nodes)) if i not in self.busy]
        for k, n in self.waiting.items():
            pick = self._pick(free, n)
            if k == key:
                if pick is not None:
                    del self.waiting[key]
                    self.busy.add(pick)
                return pick
            if pick is not None:
                free.remove(pick)  # an earlier waiter gets it first
        raise AssertionError("unreachable: key is waiting")

    def _pick(self, free: list[int], node: str | None) -> int | None:
        if node in self.nodes:
            return next((i for i in free if self.nodes[i] == node), None)
        return free[0] if free else None

    def release(self, index: int) -> None:
        self.busy.discard(index)

    def leave(self, key: str) -> None:
        self.waiting.pop(key, None)

    def state(self) -> dict[str, int]:
        return {"workers": len(self.nodes), "busy": len(self.busy), "queue": len(self.waiting)}


# ---- the actors --------------------------------------------------------------------------------------
class PostTrialWorker:
    """``work`` (:func:`merge_and_evaluate`) in a process that stays up for the sweep: its imports are
    made once, in the background as the sweep starts. It reserves nothing (0 CPUs): each call reserves
    ``after_trial.cpus`` first (:func:`run_on_pool`)."""

    def __init__(self, work: Callable[..., Any] | None = None) -> None:
        import threading

        self.work = work or merge_and_evaluate
        threading.Thread(target=_warm_imports, name="post-trial-imports", daemon=True).start()

    def run(self, dispatched: Mapping[str, Any], *args: Any, **kw: Any) -> Iterator[Any]:
        """``work(*args, **kw)`` as :func:`started_then`'s stream (``num_returns="streaming"``)."""
        yield from started_then(self.work, *args, dispatched=dispatched, **kw)


def _warm_imports() -> None:
    try:
        import lm_eval.evaluator  # noqa: F401
        import peft  # noqa: F401

        import tokentune.evaluate  # noqa: F401
        import tokentune.merge  # noqa: F401
    except Exception:  # noqa: BLE001 - only a head start: the call imports (and reports) what failed
        pass


class PostTrialPool:
    """The sweep's workers and the :class:`WorkerTable` in front of them (an asyncio Ray actor)."""

    def __init__(self, per_node: Mapping[str, int], work: Callable[..., Any] | None = None) -> None:
        self.work = work
        nodes = [node for node, count in per_node.items() for _ in range(count)]
        self.workers = [self._spawn(node) for node in nodes]
        self.table = WorkerTable(nodes)
        self.changed = asyncio.Condition()

    def _spawn(self, node: str) -> Any:
        """A fresh worker on ``node`` (soft: elsewhere if that node is gone); calls made to it before its
        process is up wait for it."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        where = NodeAffinitySchedulingStrategy(node, soft=True) if node else "DEFAULT"
        cls = ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)(PostTrialWorker)
        return cls.options(scheduling_strategy=where).remote(self.work)

    def _replace(self, index: int) -> None:
        """Kill worker ``index`` (a call ran past its timeout, or it died) and start a fresh one in its
        place; the call it served fails, no other."""
        import ray

        ray.kill(self.workers[index], no_restart=True)
        self.workers[index] = self._spawn(self.table.nodes[index])

    def state(self) -> dict[str, int]:
        return self.table.state()

    async def run(self, key: str, node: str | None, timeout_s: float | None, *args: Any, **kw: Any):
        """Items: ``{"event": "started", "waited_s", "worker"}``, then
        ``{"event": "done", "result": ...}``, ``{"event": "timed out"}`` or ``{"event": "failed", "error"}``."""
        t0 = time.monotonic()
        log_event(Path(args[1]), "post-trial queued", **self.table.state())  # args: merge_and_evaluate's
        index = await self._lease(key, node)
        waited = {"waited_s": round(time.monotonic() - t0, 3), "worker": index}
        try:
            stream = self.workers[index].run.options(num_returns="streaming").remote(waited, *args, **kw)
            assert await (await stream.__anext__()) == STARTED
            yield {"event": "started", **waited}
            try:
                result = await asyncio.wait_for(self._last(stream), timeout_s)
            except asyncio.TimeoutError:
                self._replace(index)
                yield {"event": "timed out"}
                return
        except Exception as err:  # the worker died (killed, out of memory) or could not start the call
            self._replace(index)
            yield {"event": "failed", "error": failure_text(err)}
            return
        finally:
            async with self.changed:
                self.table.release(index)
                self.changed.notify_all()
        yield {"event": "done", "result": result}

    @staticmethod
    async def _last(stream: Any) -> Any:
        return await (await stream.__anext__())

    async def _lease(self, key: str, node: str | None) -> int:
        async with self.changed:
            try:
                while (index := self.table.try_acquire(key, node)) is None:
                    await self.changed.wait()
            except BaseException:  # the call was cancelled while it waited: it leaves the queue
                self.table.leave(key)
                raise
            return index


def pool_name(sweep_id: str) -> str:
    return f"tokentune-post-trial-pool-{sweep_id}"


def start_pool(
    sweep_id: str,
    after: AfterTrial,
    cluster: Mapping[str, float],
    in_flight: int,
    work: Callable[..., Any] | None = None,
) -> tuple[str, Any]:
    """The sweep's :class:`PostTrialPool` (owned by this process, ready when this returns): name, handle.
    ``work`` replaces :func:`merge_and_evaluate` (a stand-in in tests)."""
    import ray

    from orchestrator.run.ray_cluster import on_this_node

    size = pool_size(after, cluster, in_flight)
    per_node = plan_workers(size, node_capacity(ray.nodes(), after.cpus))
    name = pool_name(sweep_id)
    cls = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)(PostTrialPool)
    handle = cls.options(name=name, get_if_exists=True, scheduling_strategy=on_this_node()).remote(
        per_node, work
    )
    ray.get(handle.state.remote())
    return name, handle


# ---- a call (in the trial driver) --------------------------------------------------------------------
def run_on_pool(
    name: str,
    final_dir: str | Path,
    trial_dir: str | Path,
    eval_cfg: EvalConfig | Mapping[str, Any] | None = None,
    *,
    resources: Mapping[str, Any] | None = None,
    timeout_s: float | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """:func:`merge_and_evaluate` on a warm worker of pool ``name`` (``kw``: its ``evaluate``,
    ``keep_merged``, ``dtype``, ``device``), ``resources`` (``num_cpus``, ``memory``) reserved for it; the
    same result, with ``error`` set when it failed, ran past ``timeout_s`` or its worker died."""
    import ray

    tdir = Path(trial_dir).resolve()
    args = (str(Path(final_dir).resolve()), str(tdir), as_eval_config(eval_cfg))
    item: dict[str, Any] = {}
    try:
        with reserved(resources) as node:
            stream = ray.get_actor(name).run.options(num_returns="streaming")
            for ref in stream.remote(tdir.name + f"@{time.time_ns()}", node, timeout_s, *args, **kw):
                item = ray.get(ref)
                if item["event"] == "done":
                    return item["result"]
                if item["event"] != "started":
                    break
        msg = item.get("error") or f"merge+eval timed out after {timeout_s:g} s (after_trial.timeout_s)"
    except Exception as err:  # the pool is gone, the reservation failed
        msg = failure_text(err)
    return failed_result(final_dir, trial_dir, eval_cfg, kw.get("evaluate", True), msg)


@contextlib.contextmanager
def reserved(resources: Mapping[str, Any] | None) -> Iterator[str | None]:
    """Hold ``resources`` (``num_cpus``, ``memory``) in a placement group inside the block, yielding the
    node holding them (None when nothing is asked for): the call waits for them as a task of that size
    would, untimed."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    res = dict(resources or {})
    bundle = {"CPU": float(res.get("num_cpus", 1) or 0), "memory": res.get("memory")}
    bundle = {k: v for k, v in bundle.items() if v}
    if not bundle:
        yield None
        return
    pg = placement_group([bundle])
    try:
        ray.get(pg.ready())
        nodes = placement_group_table(pg).get("bundles_to_node_id") or {}
        yield nodes.get(0)
    finally:
        remove_placement_group(pg)
