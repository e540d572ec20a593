"""Ray cluster plumbing: connect (or start) Ray, the environment its workers get, and a sweeper of
placement groups orphaned by a lost node.

    resources = init_ray()                 # local Ray, or RAY_ADDRESS / address
    with orphaned_placement_groups_swept():
        trainer.fit()                      # groups whose creating actor died are removed meanwhile

Nothing here knows about training; ``orchestrator.run.train_driver`` uses it for every Ray Train job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.run.train_worker import FAULT_ENV
from tokentune.redact import is_secret_key

log = logging.getLogger(__name__)

#: MLflow's HTTP client in trial processes, unless set in the driver's environment: a tracking server that
#: is down costs a trial seconds per write, not minutes (MLflow's defaults: 7 retries, backoff factor 2,
#: 120 s per request: ~4 min). The trial's own tracking retries and then records the write for --resume
#: (``orchestrator.results.tracking_journal``).
MLFLOW_HTTP_QUICK = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}
#: Environment variables the driver hands to every Ray worker (offline hub, DeepSpeed's accelerator
#: and compiled-op cache, the import path of a checkout that is not pip-installed, test-only fault
#: injection, MLflow's telemetry off: :data:`TELEMETRY_OFF`, its HTTP retries: :data:`MLFLOW_HTTP_QUICK`).
PROPAGATED_ENV = (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_HOME",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS",
    "TOKENIZERS_PARALLELISM",
    "DS_ACCELERATOR",
    "TORCH_EXTENSIONS_DIR",
    "PYTHONPATH",
    FAULT_ENV,
    "MLFLOW_DISABLE_TELEMETRY",
    *MLFLOW_HTTP_QUICK,
)
#: set in the driver (when unset) before Ray starts, so every process of the sweep has it
TELEMETRY_OFF = {"MLFLOW_DISABLE_TELEMETRY": "true"}
#: How often Ray Train's controller polls its workers. A worker's ``ray.train.report`` waits until the
#: controller has taken its previous report (a queue of one), so at Ray's default (2 s) every report
#: after the first stalls training up to 2 s: a 40-step run of the tiny default reporting every 4
#: steps trained in 17.0 s instead of 2.4 s (bench/sweep_overhead.py). Set the variable to override.
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
TRAIN_POLL_S = "0.2"
STARTUP_ENV = "RAY_worker_maximum_startup_concurrency"  # worker processes a local raylet starts at once
LOCAL_STARTUP_CONCURRENCY = 8  # measured: the quickstart-sized sweep 74.6 s -> 61.3 s on 2 cores
ORPHAN_SWEEP_S = 10.0  # how often the sweeper looks for orphaned placement groups
#: Ray's own lists of driver environment variables it copies into the runtime_env of the actors it starts
#: (Tune: every trial actor; Train: the controller and workers), as (module, attribute)
RAY_COPIED_ENV = (
    ("ray.tune.execution.class_cache", "ENV_VARS_TO_PROPAGATE"),
    ("ray.train.v2._internal.constants", "ENV_VARS_TO_PROPAGATE"),
)


def project_root() -> str:
    """The folder holding ``tokentune/`` (a checkout, or site-packages when installed)."""
    import tokentune

    return str(Path(tokentune.__file__).resolve().parent.parent)


def worker_env() -> dict[str, str]:
    """Environment for Ray workers: :data:`PROPAGATED_ENV` of this process, the project importable, MLflow's
    HTTP retries short (:data:`MLFLOW_HTTP_QUICK`, where this process does not set them)."""
    env = {k: os.environ[k] for k in PROPAGATED_ENV if os.environ.get(k)}
    env[TRAIN_POLL_ENV] = os.environ.get(TRAIN_POLL_ENV) or TRAIN_POLL_S
    for key, value in MLFLOW_HTTP_QUICK.items():
        env.setdefault(key, value)
    path = [project_root(), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
    return env


def keep_credentials_out_of_runtime_envs() -> list[str]:
    """Stop Ray copying credentials from this process's environment into actors' ``runtime_env``; returns
    the names it no longer copies.

    Ray Tune puts ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN`` and
    ``AWS_SECURITY_TOKEN`` of the driver's environment into every trial actor's ``runtime_env``, and Ray
    writes each ``runtime_env`` in plain text to ``runtime_env_agent.log`` in its session folder. Workers
    do not need that copy: those of a Ray started here inherit this process's environment (the raylet
    is its child), and on a cluster every node reads its own (environment, instance role, credentials
    file). Every name in :data:`RAY_COPIED_ENV`'s lists that ``tokentune.redact.is_secret_key`` calls a
    secret is dropped; the lists are Ray's private module state, so a Ray that moved them changes nothing
    here (the canary sweep in tests/test_secrets.py then fails).
    """
    import importlib

    dropped: list[str] = []
    for module_name, attr in RAY_COPIED_ENV:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        names = getattr(module, attr, None)
        if not isinstance(names, (set, frozenset, list, tuple)):
            continue
        secret = [n for n in names if is_secret_key(n)]
        if secret:
            setattr(module, attr, type(names)(n for n in names if n not in secret))
            dropped += secret
    return sorted(dropped)


def set_train_poll_interval() -> str:
    """Set :data:`TRAIN_POLL_ENV` in this process's environment when unset (Ray Train hands a controller
    started from this process its value); returns the value."""
    return os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_S)


def on_this_node() -> Any:
    """Ray scheduling strategy that keeps an actor on this process's node, never elsewhere. The sweep's
    helper actors (training slots) use it: the sweep's driver runs on the head (``ray job submit``), and
    a 0-CPU actor would otherwise go wherever Ray's spread policy puts it, beside the trials' work."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    *,
    include_dashboard: bool | None = None,
    runtime_env: dict[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """Connect to a cluster (``address`` or ``RAY_ADDRESS``) or start a local one; returns its resources.

    A local cluster keeps its dashboard on 127.0.0.1 and Ray's token authentication on (a client of
    an existing cluster needs ``RAY_AUTH_MODE=token`` and the cluster's token); usage stats are off.
    Workers get :func:`worker_env`, never a credential (:func:`keep_credentials_out_of_runtime_envs`).
    When Ray is already initialised (e.g. inside a Tune trial) this only returns the resources.
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
    keep_credentials_out_of_runtime_envs()
    if ray.is_initialized():
        return dict(ray.cluster_resources())
    set_train_poll_interval()  # for the Train controllers this process starts; workers get it below
    env = dict(runtime_env or {})
    env["env_vars"] = {**worker_env(), **env.get("env_vars", {})}
    env = without_job_conflicts(env)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, runtime_env=env, **kwargs)
    else:
        kwargs.setdefault("dashboard_host", "127.0.0.1")
        # a trial starts ~3 processes at once (its driver, the Train controller, the workers): Ray's
        # default (one per CPU) queues those starts on a small machine and warns after 4x that many
        os.environ.setdefault(STARTUP_ENV, str(max(LOCAL_STARTUP_CONCURRENCY, os.cpu_count() or 1)))
        start_local(
            lambda: ray.init(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                include_dashboard=include_dashboard,
                runtime_env=env,
                **kwargs,
            )
        )
    return dict(ray.cluster_resources())


#: Ray gives a local node 30 s (fixed in Ray 2.60) to register its raylet; on a loaded machine that start
#: fails now and then ("The current node timed out during startup"). Then a local start is tried again.
LOCAL_START_ATTEMPTS = 3
START_TIMEOUT_TEXT = "timed out during startup"


def start_local(init: Callable[[], Any], attempts: int = LOCAL_START_ATTEMPTS) -> None:
    """Run ``init`` (a local ``ray.init``); when Ray's node start times out, stop the processes that
    attempt left (the GCS, raylet, dashboard it started are this process's children) and try again, up
    to ``attempts`` times, one warning each. Any other error is raised at once."""
    import psutil
    import ray

    for attempt in range(1, attempts + 1):
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            init()
            return
        except Exception as e:  # Ray raises a bare Exception for this
            if START_TIMEOUT_TEXT not in str(e) or attempt == attempts:
                raise
            left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
            for p in left:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            psutil.wait_procs(left, timeout=10)
            ray.shutdown()
            log.warning(
                "local Ray start timed out (a loaded machine?): stopped its %d processes, trying again (%d of %d)",
                len(left), attempt + 1, attempts,
            )  # fmt: skip


def nodes_on_other_machines(
    nodes: list[dict[str, Any]] | None = None, hostname: str | None = None
) -> list[str]:
    """Addresses of the connected cluster's alive nodes that run on another machine than this process.

    A machine is told by its hostname (``NodeManagerHostname``; with ``docker --net=host`` a container
    has its host's): several nodes started on one machine (the local multi-node tests) share this
    machine's disk, nodes of a real cluster (VMs, pods) do not. ``nodes`` defaults to ``ray.nodes()``.
    """
    if nodes is None:
        import ray

        nodes = ray.nodes()
    here = hostname or socket.gethostname()
    return sorted(
        {
            str(n.get("NodeManagerAddress") or n.get("NodeManagerHostname") or "?")
            for n in nodes
            if n.get("Alive") and n.get("NodeManagerHostname") != here
        }
    )


def without_job_conflicts(runtime_env: dict[str, Any]) -> dict[str, Any]:
    """Drop the fields and env vars a submitting job already set in its ``runtime_env``.

    Inside ``ray job submit`` Ray merges the job's runtime_env with ``ray.init``'s and refuses any
    overlap (a ValueError). The job's values are the user's explicit choice, so they win.
    """
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return runtime_env
    try:
        job_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return runtime_env
    job_vars = job_env.get("env_vars") or {}
    out = {k: v for k, v in runtime_env.items() if k == "env_vars" or k not in job_env}
    env_vars = {k: v for k, v in (runtime_env.get("env_vars") or {}).items() if k not in job_vars}
    if env_vars:
        out["env_vars"] = env_vars
    else:
        out.pop("env_vars", None)
    return out


# ---- placement groups orphaned by a lost node ----------------------------------------------------------
@dataclass(frozen=True)
class PlacementGroupRecord:
    """What the sweeper needs to know of one placement group (ids in hex)."""

    id: str
    job_id: str  # the job that created it
    removed: bool
    detached: bool
    creator_job_dead: bool
    creator_actor: str | None  # the actor that created it; None when a driver or a task did
    creator_actor_dead: bool


def placement_group_records() -> list[PlacementGroupRecord]:
    """Every placement group of the cluster, with its creator and whether that creator is dead."""
    # Private: no public Ray API says which actor created a placement group (placement_group_table()
    # and ray.util.state omit the creator), so this reads the GCS table directly.
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    table = gcs_pb2.PlacementGroupTableData
    out = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        d = table.FromString(raw)
        nil_actor = set(d.creator_actor_id) <= {0xFF}  # made by a driver or a task
        out.append(
            PlacementGroupRecord(
                id=d.placement_group_id.hex(),
                job_id=d.creator_job_id.hex(),
                removed=d.state == table.REMOVED,
                detached=d.is_detached,
                creator_job_dead=d.creator_job_dead,
                creator_actor=None if nil_actor else d.creator_actor_id.hex(),
                creator_actor_dead=d.creator_actor_dead,
            )
        )
    return out


def orphaned(records: list[PlacementGroupRecord], job_id: str | None) -> list[str]:
    """Ids of the live, non-detached groups of ``job_id`` (None: any job) whose creating actor is dead."""
    return [
        r.id
        for r in records
        if not (r.removed or r.detached or r.creator_job_dead)
        and r.creator_actor is not None
        and r.creator_actor_dead
        and (job_id is None or r.job_id == job_id)
    ]


def remove_orphaned_placement_groups(job_id: str | None = "current") -> list[str]:
    """Remove this job's placement groups whose creating actor is dead; returns their ids.

    A Ray Train controller creates its workers' placement group. When the node running it dies (with
    the Tune trial driver), Ray keeps the group for as long as the *job* lives and re-places its
    bundles on the surviving nodes, where it holds their CPUs/GPUs forever: the retried trial's new
    group then waits for resources that never free (a hang, seen when a node of a 2-node sweep was
    killed). A group whose creator actor is dead can never be used or released by it, so removing it
    is safe. Groups made by a driver or task (no creator actor) and detached ones are never touched.
    ``job_id="current"``: the calling job's groups only; None: every job's.
    """
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    if job_id == "current":
        job_id = ray.get_runtime_context().get_job_id()
    removed = orphaned(placement_group_records(), job_id)
    for pg in removed:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg))))
    return removed


@contextlib.contextmanager
def orphaned_placement_groups_swept(every_s: float = ORPHAN_SWEEP_S) -> Iterator[None]:
    """Run :func:`remove_orphaned_placement_groups` every ``every_s`` seconds in a daemon thread
    while the block runs (best effort: a failed sweep is logged, a warning the first time, never
    raised)."""
    stop = threading.Event()

    def sweep() -> None:
        failed = False
        while True:
            try:
                for pg in remove_orphaned_placement_groups():
                    log.warning("removed placement group %s: the actor that created it is dead", pg)
            except Exception as e:  # noqa: BLE001 - best effort; never disturbs the run
                (log.debug if failed else log.warning)("placement-group sweep failed: %s", e)
                failed = True
            if stop.wait(every_s):
                return

    threading.Thread(target=sweep, name="pg-orphan-sweeper", daemon=True).start()
    try:
        yield
    finally:
        stop.set()
