"""Build, run and restore the Ray Tune experiment of a sweep; collect its trials.

    tuner = build_tuner(spec, ctx, cluster_resources, progress=True)       # a fresh sweep
    tuner = restore_tuner(spec, ctx)                                         # --resume
    grid = tuner.fit()
    trials = collect_trials(grid, spec, sweep_dir)

The trainable is ``orchestrator.run.trial.run_trial`` (a plain driver function that starts a Ray Train
job). It reserves what it and its Train controller use (``tune.driver_memory_gb``, measured, and
``tune.driver_cpus`` CPUs, 0 by default: ``space.driver_resources``), so Ray spreads drivers across
nodes: the Train workers reserve their CPUs/GPUs through the Train
``ScalingConfig`` in their own placement group, and the number of trials in flight is bounded from
the cluster's resources (``space.max_concurrent_trials``), so a trial never starts only to wait for
workers. The limit lives in the search algorithm (Tune ignores ``TuneConfig.max_concurrent_trials``
for a search-generator instance).

``TuneConfig`` gets no metric/mode: the objective goes to Optuna and ASHA its own metric (Tune
refuses both at once), and the best trial is picked from the collected results
(``orchestrator.results.best``).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from ray.tune import Callback

from orchestrator.results.trial_status import read_status, trial_dir
from orchestrator.results.types import TrialResult
from orchestrator.run.trial import FINAL_FLAG, REPORTED_AT, TrialContext, run_trial
from orchestrator.spec.sweep import SweepSpec
from tokentune.redact import redact_text

log = logging.getLogger(__name__)

TUNE_NAME = "tune"


# ---- trainable and tuner -----------------------------------------------------------------------------------
def make_trainable(spec: SweepSpec, ctx: TrialContext) -> Any:
    from ray import tune

    from orchestrator.run.space import driver_resources

    return tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), driver_resources(spec))


def start_sweep_actors(spec: SweepSpec, ctx: TrialContext, cluster: dict[str, float], sweep_id: str) -> list:
    """The sweep's helper actors, their names in ``ctx``; returns their handles (keep them while the
    sweep runs: this process owns them). With a merge or an evaluation after each trial:

    - on CPU (``after_trial.gpus`` 0, or ``auto`` with trials on CPUs) with a local (or shared) storage
      folder, the pool of warm merge + eval workers (``post_pool``: ``after_trial.workers``, or sized to
      the trials in flight and the cluster's CPUs); with a URI storage a trial's adapter is on the disk
      of its node, so each trial's merge + eval stays a Ray task of its own;
    - with ``after_trial.overlap`` (``auto``: when trials train on GPUs), the training slots
      (``orchestrator.run.slots``): ``max_concurrent`` trials train while as many more merge and evaluate.
    """
    from orchestrator.run.post_pool import start_pool
    from orchestrator.run.slots import start_slot_actor
    from orchestrator.run.space import max_concurrent_trials, post_trial_gpus, trial_demand

    a = spec.after_trial
    if not a.merges:
        return []
    handles = []
    ctx.post_trial_gpus = post_trial_gpus(spec, cluster)
    concurrent = max_concurrent_trials(spec, cluster)
    if trial_demand(spec, cluster)["GPU"] > 0 if a.overlap == "auto" else a.overlap:
        ctx.train_slots, handle = start_slot_actor(concurrent, sweep_id)
        handles.append(handle)
    if not ctx.post_trial_gpus and not ctx.storage_uri:
        flight = 2 * concurrent if ctx.train_slots else concurrent  # as build_tuner
        ctx.post_trial_pool, handle = start_pool(sweep_id, a, cluster, flight)
        handles.append(handle)
    return handles


def build_tuner(
    spec: SweepSpec,
    ctx: TrialContext,
    cluster: dict[str, float],
    *,
    progress: bool = True,
    verbose: bool = False,
) -> Any:
    from ray import tune

    from orchestrator.run.space import make_scheduler, make_search_alg, max_concurrent_trials, to_tune_space

    concurrent = max_concurrent_trials(spec, cluster)
    flight = 2 * concurrent if ctx.train_slots else concurrent  # + as many merging/evaluating
    optuna = spec.tune.algorithm == "optuna"
    tune_config = tune.TuneConfig(
        search_alg=make_search_alg(spec, max_concurrent=flight),  # the limit lives in the search alg
        scheduler=make_scheduler(spec),
        num_samples=spec.tune.num_samples,
        time_budget_s=spec.tune.time_limit_s,
        reuse_actors=True,  # a trial driver's process (its imports: mlflow, ray.train) serves the next trial
    )
    log.info("sweep %s: %d trial(s), at most %d training at a time", spec.name, spec.num_trials(), concurrent)
    return tune.Tuner(
        make_trainable(spec, ctx),
        param_space={} if optuna else to_tune_space(spec),
        tune_config=tune_config,
        run_config=run_config(spec, ctx, progress, verbose),
    )


def run_config(spec: SweepSpec, ctx: TrialContext, progress: bool, verbose: bool = False) -> Any:
    """Tune's run config: our MLflow callback, and with ``progress`` the progress lines
    (``orchestrator.results.console``); Tune's own status tables only with ``verbose``."""
    from ray import tune

    from orchestrator.results.console import SweepProgress

    shown = [m for m, _ in spec.goals] if spec.multi_objective else spec.objective.metric
    progress_cb = [SweepProgress(spec.num_trials(), ctx.sweep_dir, shown)] if progress else []

    return tune.RunConfig(
        name=TUNE_NAME,
        storage_path=storage_root(ctx),
        failure_config=tune.FailureConfig(max_failures=spec.tune.max_failures),
        callbacks=[
            TrialTrackingCallback(
                ctx.tracking_uri,
                ctx.experiment,
                spec.name,
                ctx.parent_run_id,
                ctx.sweep_dir,
                storage_uri=ctx.storage_uri,
            ),
            *progress_cb,
        ],
        verbose=1 if progress and verbose else 0,
    )


def storage_root(ctx: TrialContext) -> str:
    """Where the Tune experiment lives: the sweep folder (local) or ``<uri>/<sweep>`` (cloud; the trial
    folders are synced there too, see ``orchestrator.run.storage_sync``)."""
    return ctx.train_storage.rsplit("/", 1)[0]


def tune_path(ctx: TrialContext) -> str:
    return f"{storage_root(ctx)}/{TUNE_NAME}"


def can_restore(ctx: TrialContext) -> bool:
    from ray import tune

    return bool(tune.Tuner.can_restore(tune_path(ctx)))


def restore_tuner(spec: SweepSpec, ctx: TrialContext) -> Any:
    """Finished trials stay finished; unfinished and errored ones run again (Train resumes by name)."""
    from ray import tune

    return tune.Tuner.restore(
        tune_path(ctx),
        trainable=make_trainable(spec, ctx),
        resume_unfinished=True,
        resume_errored=True,
        restart_errored=False,
    )


# ---- live tracking of trial results ------------------------------------------------------------------------
FLUSH_TIMEOUT_S = 60.0  # at the sweep's end, how long the tracking queue may take to send what waits


class TrialTrackingCallback(Callback):
    """Logs every intermediate Tune result (loss curves, tokens/s, memory) to the trial's MLflow run,
    and closes runs of trials that ended without a ``status.json`` (stopped early by ASHA or by the
    time limit: KILLED; crashed driver: FAILED). With a URI storage a trial that ran on another node
    has its ``status.json`` there, not in the local sweep folder.

    Nothing here waits on MLflow: each write goes to a bounded background queue
    (``orchestrator.results.tracking_queue``: batched across steps, retried with backoff), so a slow
    store never stalls Tune's event loop and with it every trial's reports. At the sweep's end the
    queue is flushed (at most ``FLUSH_TIMEOUT_S``); what could not be sent is recorded in the trial
    folders, one warning says so, and ``--resume`` sends it (``tracking_journal.resend_pending``)."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        sweep: str,
        parent_run_id: str | None,
        sweep_dir: str,
        storage_uri: str | None = None,
    ):
        self.args = (tracking_uri, experiment, sweep, parent_run_id)
        self.sweep_dir = sweep_dir
        self.storage_uri = storage_uri
        self._queue: Any = None
        self._seen: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:  # Tune stores its callbacks: the queue's thread stays here
        return {**self.__dict__, "_queue": None, "_seen": set()}

    @property
    def queue(self) -> Any:
        if self._queue is None:
            from orchestrator.results.tracking import SweepTracker
            from orchestrator.results.tracking_journal import DriverSender
            from orchestrator.results.tracking_queue import TrackingQueue

            uri, exp, sweep, parent = self.args
            sender = DriverSender(SweepTracker(uri, exp, sweep, parent_run_id=parent), self.sweep_dir)
            self._queue = TrackingQueue(sender, sender.record)
        return self._queue

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get(FINAL_FLAG):
            return  # the trial logs its final metrics itself
        from orchestrator.results.tracking_queue import Write, metrics_row

        metrics = {k: v for k, v in result.items() if _loggable(k, v)}
        step = int(result.get("step") or result.get("training_iteration") or 0)
        self._seen.add(trial.trial_id)
        self.queue.put(Write(trial.trial_id, metrics_row(metrics, step)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close_if_unfinished(
            trial, "KILLED", "stopped before it finished (early stopping or time limit)"
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close_if_unfinished(trial, "FAILED", "the trial's driver process failed")

    def on_experiment_end(self, trials, **info):
        if self._queue is None:
            return
        queue, self._queue = self._queue, None
        left = queue.close(FLUSH_TIMEOUT_S)
        if left:
            log.warning(
                "MLflow: %d of %d tracking write(s) not sent (%s); recorded in the trial folders "
                "(tracking_pending.jsonl): --resume sends them",
                left,
                left + queue.sent,
                redact_text(queue.last_error or "unknown error"),
            )

    def _close_if_unfinished(self, trial, status: str, why: str) -> None:
        if trial.trial_id not in self._seen:
            return  # no run of ours: the trial never reported
        if read_status(trial_dir(self.sweep_dir, trial.trial_id)) is not None:
            return  # the trial recorded its own end
        if self.storage_uri:
            from orchestrator.run.storage_sync import fetch_status

            if fetch_status(self.storage_uri, trial.trial_id) is not None:
                return  # ... on another node
        from orchestrator.results.tracking_queue import Write

        state = "stopped" if status == "KILLED" else "failed"
        self.queue.put(Write(trial.trial_id, {"op": "tags", "tags": {"tokentune.status": state}}))
        self.queue.put(Write(trial.trial_id, {"op": "end", "status": status, "error": why}))


_SKIP = {"training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "pid", "done", "step"}
_SKIP |= {REPORTED_AT}  # when the trial sent the report (bench/sweep_scale.py's event-loop stall)


def _loggable(key: str, value: Any) -> bool:
    if key in _SKIP or key.startswith(
        ("config/", "config.", "node_ip", "hostname", "date", "trial_id", "experiment")
    ):
        return False
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---- results ------------------------------------------------------------------------------------------------
def collect_trials(grid: Any, spec: SweepSpec, sweep_dir: str | Path) -> list[TrialResult]:
    """One ``TrialResult`` per Tune trial: status/metrics from ``status.json`` when the trial wrote
    one (``finished``, ``failed``, or ``skipped``: estimated over ``tune.max_memory_gb``, never launched,
    its error the reason and its metrics the estimate), else from Tune's last result
    (``stopped``/``failed``/``pending``); errors redacted."""
    out = []
    for t in _tune_trials(grid):
        tdir = trial_dir(sweep_dir, t.trial_id)
        searched = decode_searched(spec, t.config)
        st = read_status(tdir)
        last = {k: v for k, v in (t.last_result or {}).items() if _loggable(k, v) or k == "step"}
        if st is not None and st.get("status") == "finished":
            out.append(
                TrialResult(t.trial_id, searched, st.get("metrics") or last, "finished", None, str(tdir))
            )
        elif st is not None and st.get("status") == "skipped":
            reason = str(st.get("error") or "skipped")
            out.append(
                TrialResult(t.trial_id, searched, st.get("metrics") or {}, "skipped", reason, str(tdir))
            )
        elif st is not None and st.get("status") == "failed":
            error = redact_text(str(st.get("error") or "")) or None
            out.append(TrialResult(t.trial_id, searched, last, "failed", error, str(tdir)))
        elif t.status == "ERROR":
            out.append(
                TrialResult(t.trial_id, searched, last, "failed", redact_text(_tune_error(t)), str(tdir))
            )
        elif t.status == "TERMINATED":
            out.append(
                TrialResult(t.trial_id, searched, last, "stopped", "stopped before it finished", str(tdir))
            )
        else:
            out.append(TrialResult(t.trial_id, searched, last, "pending", None, str(tdir)))
    return out


def _tune_trials(grid: Any) -> list[Any]:
    analysis = getattr(grid, "_experiment_analysis", None)
    if analysis is None:
        from ray.tune import ExperimentAnalysis

        analysis = ExperimentAnalysis(grid.experiment_path)
    return sorted(analysis.trials, key=lambda t: t.trial_id)


def _tune_error(trial: Any) -> str:
    msg = getattr(trial, "error_msg", None)
    if msg:
        return str(msg)[:2000]
    path = getattr(trial, "error_file", None)
    try:
        if path and os.path.exists(path):
            return Path(path).read_text()[-2000:]
    except OSError:
        pass
    return "the trial failed (see the Tune trial's error.txt)"


def decode_searched(spec: SweepSpec, config: dict[str, Any]) -> dict[str, Any]:
    """A Tune trial's ``config`` -> its searched values (decoded: lists stay lists). A key of a method's
    section whose method the trial does not use (``tokentune.ratio`` of a ``[lora]`` trial) is None."""
    from orchestrator.spec.parts import SETUP_KEY, lookup_dotted, value_label
    from tokentune.config import RunConfig
    from tokentune.methods import REGISTRY

    out = {}
    for key, dim in spec.search.items():
        found, value = lookup_dotted(config or {}, key)
        out[key] = dim.coerce(value) if found else (dim.values[0] if dim.verb == "fixed" else None)
    setup = out.get(SETUP_KEY) or {}
    methods = out.get("methods") or setup.get("methods") or spec.base.get("methods") or RunConfig().methods
    if SETUP_KEY in out:  # a setup is shown by its name (its keys are in sweep.yaml)
        out[SETUP_KEY] = value_label(setup)
    for key in out:
        section = key.split(".", 1)[0]
        if section in REGISTRY and section not in methods:
            out[key] = None
    return out


def set_tune_env(verbose: bool = False) -> None:
    """Trials report training metrics first and ``eval/score`` last: relax Tune's per-result check.
    Unless ``verbose``, Tune prints nothing of its own (no experiment box, no status tables; the
    sweep prints its progress lines) and Tune's and MLflow's INFO logs stay out of the console."""
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    if not verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's legacy reporter: silent at verbose 0
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
        for name in ("ray.tune", "ray.train", "mlflow"):
            logging.getLogger(name).setLevel(logging.WARNING)
