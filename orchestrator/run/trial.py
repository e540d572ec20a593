"""One Tune trial (the *driver*): a Ray Train job, then merge + eval as its own Ray task.

    trainable = tune.with_parameters(run_trial, ctx=TrialContext(...))

The trial's identity is its Tune trial id: the training output is ``<sweep>/trials/<trial_id>``, the
Ray Train run is ``<sweep>/train/<trial_id>`` (re-running with the same name resumes it from its
last checkpoint) and the MLflow child run is found again by the id. ``status.json`` in the trial
folder says ``finished`` or ``failed``; a finished trial that Tune runs again (a sweep killed before
Tune saved its state) reports its stored metrics instead of training again. ``events.jsonl`` records
every start of training (``train started``), so a resume can be audited (both files:
``orchestrator.results.trial_status``).

With a URI ``storage`` (``ctx.storage_uri``: s3://, gs://, file://...) the trial folder is on the local
disk of the node this trial runs on: once ``status.json`` is written the folder (without ``merged/``) is
uploaded to ``<storage_uri>/trials/<trial_id>`` (``orchestrator.run.storage_sync``; a failed upload is only
a warning), and the finished-before check also reads the stored ``status.json`` (the trial may have
finished on another node) when the local one is missing or not ``finished``.

A failure (training, merge or evaluation) is written to ``status.json`` and to the MLflow child run
(status FAILED, the error as a tag) and re-raised, so Tune marks the trial ERROR and the sweep goes on.
The error and its traceback pass through ``tokentune.redact`` first; the re-raised ``TrialFailed``
carries only the redacted one-line message (Tune stores it), not the original exception.
"""

from __future__ import annotations

import json
import logging
import math
import time
import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from orchestrator.results.tracking_journal import TrialTracking, close_finished_run, close_open_run
from orchestrator.results.trial_status import (
    log_event,
    phase_durations,
    read_status,
    trial_dir,
    write_status,
)
from orchestrator.run.slots import train_slot
from orchestrator.spec.plan import over_memory_limit, skip_reason
from orchestrator.spec.sections import AfterTrial, Objective
from orchestrator.spec.sweep import SweepSpec
from tokentune.config import EvalConfig
from tokentune.errors import is_number
from tokentune.estimate import estimate_memory, measured_estimate_metrics
from tokentune.redact import redact_text

log = logging.getLogger(__name__)

FINAL_FLAG = "trial_final"  # set on the trial's last Tune report (the tracking callback skips it)
#: on the last report of a trial skipped for its memory estimate (``tune.max_memory_gb``): the value is
#: how many GB the estimate is over the budget (Optuna's constraint, ``space.FinalMetricOptunaSearch``)
SKIPPED_OVER_GB = "skipped_over_budget_gb"


class TrialFailed(RuntimeError):
    """A trial's training, merge or evaluation failed; the message says which and why."""


class TrialSkipped(Exception):
    """A trial estimated over ``tune.max_memory_gb``: never launched. ``metrics``: its estimate."""

    def __init__(self, reason: str, metrics: dict[str, float]) -> None:
        super().__init__(reason)
        self.reason, self.metrics = reason, metrics


@dataclass
class TrialContext:
    """What every trial of a sweep needs besides its searched values (picklable: the spec and strings)."""

    spec: SweepSpec  # the resolved, validated sweep spec (pickled to the trial as the object)
    sweep_dir: str  # local, absolute: trials/, mlflow.db, results.* (on each node, for a URI storage)
    train_storage: str  # Ray Train storage: <sweep>/train (local path or URI)
    tracking_uri: str
    experiment: str
    parent_run_id: str | None = None
    progress: bool = True
    storage_uri: str | None = None  # the sweep's URI storage (<uri>/<name>): trial folders sync there
    train_slots: str | None = None  # the slot actor's name (orchestrator.run.slots): None, no gate
    post_trial_pool: str | None = None  # the warm merge + eval pool's name (CPU post-trial work: post_pool)
    post_trial_gpus: float = 0.0  # GPUs per merge + eval (after_trial.gpus with auto decided)


# ---- Train -> Tune reports ---------------------------------------------------------------------------------
#: Keys Ray Tune reserves in a result: a Train report carrying ``done`` would end the Tune trial
#: before merge + evaluation run. Renamed ``train_<key>`` on the way to Tune.
TUNE_RESERVED = ("done", "training_iteration", "trial_id", "time_total_s", "timestamp", "config")
#: the wall-clock time a report left the trial (``time.time()``): the sweep's driver takes the time it
#: is processed minus this as its event-loop stall (bench/sweep_scale.py); never logged as a metric
REPORTED_AT = "reported_at"


class TrialReportCallback(TuneReportCallback):
    """Forwards every report of the trial's Train job to Tune, with Tune's reserved keys renamed (the
    Train job reports ``done``). Made inside the trial: its base needs a Tune session."""

    def after_report(self, run_context, metrics, checkpoint):
        now = time.time()
        metrics = [
            {**{(f"train_{k}" if k in TUNE_RESERVED else k): v for k, v in m.items()}, REPORTED_AT: now}
            for m in metrics
        ]
        super().after_report(run_context, metrics, checkpoint)


# ---- the trial ------------------------------------------------------------------------------------------
def run_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """The Tune trainable: train (Ray Train), merge + evaluate (a Ray task), record, report. ``config``
    is Tune's name for the trial's searched values (as Tune sampled them)."""
    import ray.tune

    searched = config
    trial_id = ray.tune.get_context().get_trial_id()
    spec = ctx.spec
    tdir = trial_dir(ctx.sweep_dir, trial_id)
    tdir.mkdir(parents=True, exist_ok=True)

    log_event(tdir, "trial started", trial_id=trial_id, node=_node_ip())
    cpu0 = time.process_time()
    done = _finished_before(ctx, tdir, trial_id)
    if done is not None:
        log_event(tdir, "skipped (finished before)")
        close_open_run(_tracker(ctx, spec), tdir, done)
        ray.tune.report({**done["metrics"], FINAL_FLAG: 1})
        return

    tracking = TrialTracking(_tracker(ctx, spec), tdir, trial_id)  # never fails the trial (retried/recorded)
    t0 = time.perf_counter()
    try:
        cfg = spec.trial_config(searched)
        cfg.train.output_dir = str(tdir)
        tracking.start(_params(cfg.to_dict(), searched))
        tracking.tags({"tokentune.trial_dir": str(tdir), "tokentune.status": "running"})
        metrics = _train_and_evaluate(spec, cfg, trial_id, tdir, ctx)
        metrics["trial_wall_s"] = time.perf_counter() - t0
        metrics.update(phase_summary(tdir))  # informative: never fails a trial that trained
    except TrialSkipped as skip:  # over the memory budget: a result of the sweep, not a failure
        _record_skip(skip, ctx, tracking, tdir, trial_id, searched)
        ray.tune.report({**skip.metrics, FINAL_FLAG: 1})
        return
    except BaseException as err:
        if _stop_requested():  # Tune stops this trial (ASHA, time limit, sweep shutdown): not a failure
            log_event(tdir, "stopped by Tune")
            if tracking.started:
                tracking.tags({"tokentune.status": "stopped"})
                tracking.end("KILLED", "stopped by Ray Tune (early stopping or time limit)")
            raise
        msg = _record_failure(err, ctx, tracking, tdir, trial_id, searched)
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        raise TrialFailed(msg) from None  # the original may quote a secret; Tune stores what is raised

    write_status(
        tdir,
        "finished",
        trial_id=trial_id,
        metrics=metrics,
        searched=_jsonable(searched),
        run_id=tracking.run_id,
    )
    _upload(ctx, tdir, trial_id)
    close_finished_run(tracking, metrics, cfg.train.max_steps)
    if tracking.offline:  # its recorded writes go with the folder (a resume on the driver sends them)
        _upload(ctx, tdir, trial_id)
    log_event(tdir, "logged", **driver_usage(cpu0))
    ray.tune.report({**metrics, FINAL_FLAG: 1})


def driver_usage(cpu0: float) -> dict[str, float]:
    """What this trial's driver process used: CPU seconds since ``cpu0`` (``time.process_time()`` at the
    trial's start; the process serves trial after trial) and its RSS now, in MB."""
    import psutil

    return {
        "driver_cpu_s": round(time.process_time() - cpu0, 4),
        "driver_rss_mb": round(psutil.Process().memory_info().rss / 1024**2, 1),
    }


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def phase_summary(tdir: Path) -> dict[str, float]:
    """``phase_durations`` of the trial's events, or {} with a warning when they cannot be read: the
    phase log informs, no trial's result depends on it."""
    try:
        return phase_durations(tdir)
    except Exception as err:  # noqa: BLE001 - a corrupt or unreadable log costs the phase figures only
        log.warning("trial %s: phase times left out (%s)", tdir.name, redact_text(_error_text(err)))
        return {}


def _finished_before(ctx: TrialContext, tdir: Path, trial_id: str) -> dict[str, Any] | None:
    """The trial's ``status.json`` if it finished before (with metrics), here or, with a URI storage,
    on another node; else None."""
    done = read_status(tdir)
    if ctx.storage_uri and (done is None or done.get("status") != "finished"):
        from orchestrator.run.storage_sync import fetch_status, stored_wins

        stored = fetch_status(ctx.storage_uri, trial_id)  # it may have finished on another node
        if stored is not None and stored_wins(done, stored):
            done = stored
    return done if done and done.get("status") == "finished" and done.get("metrics") else None


def _record_failure(
    err: BaseException,
    ctx: TrialContext,
    tracking: TrialTracking,
    tdir: Path,
    trial_id: str,
    searched: dict[str, Any],
) -> str:
    """Write the failure (redacted) to events.jsonl, status.json (uploaded) and the MLflow run (ended
    FAILED); returns the one-line message."""
    msg = redact_text(_error_text(err))
    log_event(tdir, "failed", error=msg)
    detail = redact_text("".join(traceback.format_exception(type(err), err, err.__traceback__)))[-20000:]
    write_status(tdir, "failed", trial_id=trial_id, error=msg, traceback=detail, searched=_jsonable(searched))
    if tracking.started:  # else it failed before its run was made
        tracking.artifacts()
        tracking.tags({"tokentune.status": "failed"})
        tracking.end("FAILED", msg)
    _upload(ctx, tdir, trial_id)  # with what tracking recorded, if the store is down
    return msg


def _record_skip(
    skip: TrialSkipped,
    ctx: TrialContext,
    tracking: TrialTracking,
    tdir: Path,
    trial_id: str,
    searched: dict[str, Any],
) -> None:
    """A trial over the memory budget: ``skipped`` in events.jsonl, status.json and its MLflow run."""
    log_event(tdir, "skipped", reason=skip.reason)
    write_status(
        tdir,
        "skipped",
        trial_id=trial_id,
        error=skip.reason,
        metrics=skip.metrics,
        searched=_jsonable(searched),
    )
    if tracking.started:
        tracking.metrics(skip.metrics, None)
        tracking.tags({"tokentune.status": "skipped"})
        tracking.end("KILLED", skip.reason)
    _upload(ctx, tdir, trial_id)


def _upload(ctx: TrialContext, tdir: Path, trial_id: str) -> None:
    """With a URI storage, copy the trial folder there (not ``merged/``); never raises."""
    if ctx.storage_uri:
        from orchestrator.run.storage_sync import upload_trial

        upload_trial(tdir, ctx.storage_uri, trial_id)


def _train_and_evaluate(spec: SweepSpec, cfg, trial_id: str, tdir: Path, ctx: TrialContext) -> dict[str, Any]:
    from orchestrator.run.train_driver import run_train_job

    limit = spec.tune.max_memory_gb
    est = estimate_memory(cfg) if limit else None
    if over_memory_limit(est, limit):
        metrics = {**est.metrics(), SKIPPED_OVER_GB: est.fit_gb - limit}
        raise TrialSkipped(skip_reason(est, limit), metrics)

    log_event(tdir, "train queued")
    with train_slot(ctx.train_slots, trial_id, on_wait=lambda: log_event(tdir, "waiting for a train slot")):
        log_event(tdir, "train started", trial_id=trial_id)
        res = run_train_job(
            cfg,
            name=trial_id,
            storage_path=ctx.train_storage,
            resume=True,
            callbacks=[TrialReportCallback()],
            progress=ctx.progress,
            sweep_orphans=False,  # the sweep's driver sweeps for the whole sweep (api._run)
        )
    if res.error is not None:
        raise TrialFailed(f"training failed: {_error_text(res.error)}")
    if not res.final_dir:
        raise TrialFailed("training finished without a final adapter/model folder")
    log_event(tdir, "train finished", final_dir=res.final_dir)
    for name in ("loss", "val_loss"):
        value = res.metrics.get(name)
        if isinstance(value, float) and not math.isfinite(value):
            raise TrialFailed(f"training diverged: {name} = {value}")
    metrics = _train_metrics(res.metrics)
    metrics.update(measured_estimate_metrics(cfg, metrics))
    post = PostTrialPlan(ctx.post_trial_pool, ctx.post_trial_gpus, cfg.model.dtype, spec.objective)
    metrics.update(after_training(spec.after_trial, res.final_dir, tdir, cfg.eval, post))
    return metrics


@dataclass(frozen=True)
class PostTrialPlan:
    """How a sweep runs merge + eval: its pool of warm CPU workers (None: a task each), GPUs per task
    (``auto`` decided),
    the trials' ``model.dtype`` (the merge loads the base in it) and the objective (``keep_merged: best``)."""

    pool: str | None = None
    gpus: float = 0.0
    dtype: str = "float32"
    objective: Objective | None = None


def after_training(
    after: AfterTrial, final_dir: str, tdir: Path, eval_cfg: EvalConfig, plan: PostTrialPlan | None = None
) -> dict[str, Any]:
    """``after_trial.action`` for a trained trial: ``none`` does nothing, ``merge`` merges its adapter into
    the base, ``merge+eval`` also runs lm-eval on it (a Ray task, or a warm worker of the sweep's pool); returns
    the metrics it adds. A failed merge or evaluation fails the trial (``TrialFailed``). With
    ``keep_merged: best`` and an evaluated objective, merged checkpoints beaten so far are deleted."""
    if not after.merges:
        return {}
    from orchestrator.run.keep_merged import prune_beaten
    from orchestrator.run.post_pool import run_on_pool
    from orchestrator.run.post_trial import run_post_trial

    plan = plan or PostTrialPlan()
    log_event(tdir, "post-trial started")
    on_pool = plan.pool is not None and not plan.gpus  # GPU calls: a task each (max_calls=1 frees the GPU)
    post = (partial(run_on_pool, plan.pool) if on_pool else run_post_trial)(
        final_dir,
        tdir,
        eval_cfg,
        evaluate=after.evaluates,
        keep_merged=True,  # pruned below while the sweep runs, and per after_trial.keep_merged at its end
        resources={"num_cpus": after.cpus, "num_gpus": plan.gpus},
        dtype=plan.dtype,
        timeout_s=after.timeout_s,  # counted from its start (never its wait); then that call fails alone
    )
    log_event(tdir, "post-trial finished")
    if post.get("error"):
        raise TrialFailed(post["error"])
    goal = plan.objective
    if (
        after.keep_merged == "best"
        and after.evaluates
        and goal is not None
        and goal.metric.startswith("eval/")
    ):
        for merged in prune_beaten(Path(tdir).parent, goal.metric, goal.mode):
            log_event(merged.parent, "merged deleted", reason="beaten", after=Path(tdir).name)
    return {k: v for k, v in (post.get("metrics") or {}).items() if is_number(v)}


def _train_metrics(m: dict[str, Any]) -> dict[str, Any]:
    keep = ("step", "loss", "val_loss", "tokens_per_s", "wall_s", "epoch")
    out = {k: float(m[k]) for k in keep if is_number(m.get(k))}
    out.update({k: float(v) for k, v in m.items() if "/" in k and is_number(v)})  # memory/*, <method>/*
    return out


# ---- tracking helpers --------------------------------------------------------------------------------------
def _tracker(ctx: TrialContext, spec: SweepSpec):
    from orchestrator.results.tracking import SweepTracker

    return SweepTracker(ctx.tracking_uri, ctx.experiment, spec.name, parent_run_id=ctx.parent_run_id)


def _params(full_config: dict[str, Any], searched: dict[str, Any]) -> dict[str, Any]:
    """MLflow params of a trial: its whole config, and the searched values under ``search/``."""
    params = dict(full_config)
    params["search"] = {str(k).replace(".", "/"): v for k, v in searched.items()}
    return params


def _stop_requested() -> bool:
    """True once Tune asked this trial to stop (its Train run then dies with the trial's resources)."""
    # Private: Ray has no public API that tells a function trainable Tune asked it to stop.
    try:
        from ray.train._internal.session import get_session

        session = get_session()
        return bool(session is not None and session.stop_event.is_set())
    except Exception:  # noqa: BLE001 - an internal API; without it a stop reads as a failure
        return False


def _error_text(err: BaseException) -> str:
    """One line: the error's type and first line, and the root cause (the last line of a remote
    traceback, e.g. ``DataError: data file 'x' does not exist``)."""
    text = str(err) if isinstance(err, TrialFailed) else f"{type(err).__name__}: {err}"
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    summary = lines[0] if len(lines) == 1 or lines[-1] in lines[0] else f"{lines[0]} ... {lines[-1]}"
    return summary[:1000]


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
