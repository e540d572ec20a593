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
from pathlib import Path
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from orchestrator.results.trial_status import (
    STATUS_FILE,
    log_event,
    phase_durations,
    read_status,
    trial_dir,
    write_status,
)
from orchestrator.run.slots import train_slot
from orchestrator.spec.plan import over_memory_limit
from orchestrator.spec.sections import AfterTrial
from orchestrator.spec.sweep import SweepSpec
from tokentune.config import EvalConfig
from tokentune.errors import is_number
from tokentune.estimate import MemoryEstimate, estimate_measured, estimate_memory
from tokentune.redact import redact_text

log = logging.getLogger(__name__)

FINAL_FLAG = "trial_final"  # set on the trial's last Tune report (the tracking callback skips it)


class TrialFailed(RuntimeError):
    """A trial's training, merge or evaluation failed; the message says which and why."""


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
    post_trial_worker: str | None = None  # the warm merge + eval actor's name (CPU post-trial work)


# ---- Train -> Tune reports ---------------------------------------------------------------------------------
#: Keys Ray Tune reserves in a result: a Train report carrying ``done`` would end the Tune trial
#: before merge + evaluation run. Renamed ``train_<key>`` on the way to Tune.
TUNE_RESERVED = ("done", "training_iteration", "trial_id", "time_total_s", "timestamp", "config")


class TrialReportCallback(TuneReportCallback):
    """Forwards every report of the trial's Train job to Tune, with Tune's reserved keys renamed (the
    Train job reports ``done``). Made inside the trial: its base needs a Tune session."""

    def after_report(self, run_context, metrics, checkpoint):
        metrics = [{(f"train_{k}" if k in TUNE_RESERVED else k): v for k, v in m.items()} for m in metrics]
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

    tracker = _tracker(ctx, spec)
    log_event(tdir, "trial started", trial_id=trial_id)
    done = _finished_before(ctx, tdir, trial_id)
    if done is not None:
        log_event(tdir, "skipped (finished before)")
        close_open_run(tracker, tdir, done)
        ray.tune.report({**done["metrics"], FINAL_FLAG: 1})
        return

    run_id = None
    t0 = time.perf_counter()
    try:
        cfg = spec.trial_config(searched)
        cfg.train.output_dir = str(tdir)
        run_id = tracker.trial_run(trial_id, _params(cfg.to_dict(), searched))
        tracker.set_tags(run_id, {"tokentune.trial_dir": str(tdir), "tokentune.status": "running"})
        metrics = _train_and_evaluate(spec, cfg, trial_id, tdir, ctx)
        metrics["trial_wall_s"] = time.perf_counter() - t0
        metrics.update(phase_summary(tdir))  # informative: never fails a trial that trained
    except BaseException as err:
        if _stop_requested():  # Tune stops this trial (ASHA, time limit, sweep shutdown): not a failure
            log_event(tdir, "stopped by Tune")
            if run_id is not None:
                tracker.set_tags(run_id, {"tokentune.status": "stopped"})
                tracker.end_trial(run_id, "KILLED", "stopped by Ray Tune (early stopping or time limit)")
            raise
        msg = _record_failure(err, ctx, tracker, run_id, tdir, trial_id, searched)
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        raise TrialFailed(msg) from None  # the original may quote a secret; Tune stores what is raised

    write_status(
        tdir, "finished", trial_id=trial_id, metrics=metrics, searched=_jsonable(searched), run_id=run_id
    )
    _upload(ctx, tdir, trial_id)
    _close_finished_run(tracker, run_id, tdir, metrics, cfg.train.max_steps)
    log_event(tdir, "logged")
    ray.tune.report({**metrics, FINAL_FLAG: 1})


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
    tracker,
    run_id: str | None,
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
    _upload(ctx, tdir, trial_id)
    if run_id is not None:
        _artifacts(tracker, run_id, tdir)
        tracker.set_tags(run_id, {"tokentune.status": "failed"})
        tracker.end_trial(run_id, "FAILED", msg)
    return msg


def _upload(ctx: TrialContext, tdir: Path, trial_id: str) -> None:
    """With a URI storage, copy the trial folder there (not ``merged/``); never raises."""
    if ctx.storage_uri:
        from orchestrator.run.storage_sync import upload_trial

        upload_trial(tdir, ctx.storage_uri, trial_id)


def close_open_run(tracker, tdir: Path, done: dict[str, Any]) -> bool:
    """status.json is a trial's commit point; a crash right after writing it can leave the trial's MLflow
    run RUNNING. On resume, close such a run as FINISHED with its metrics; True if one was closed. A run
    the tracking store does not hold (resumed with a new ``tracking.uri``) is made there, closed likewise."""
    run_id = done.get("run_id")
    if not run_id:
        return False
    status = _run_status(tracker, run_id)
    if status is None:  # not in this store (--resume with a new tracking.uri): the trial is recorded there
        searched = {str(k).replace(".", "/"): v for k, v in (done.get("searched") or {}).items()}
        run_id = tracker.trial_run(done.get("trial_id") or tdir.name, {"search": searched})
        info = {k: v for k, v in done.items() if k not in ("status", "time", "run_id")}
        write_status(tdir, "finished", **info, run_id=run_id)  # the next resume finds it there
    elif status == "FINISHED":
        return False
    _close_finished_run(tracker, run_id, tdir, done["metrics"], done["metrics"].get("step"))
    return True


def _run_status(tracker, run_id: str) -> str | None:
    """The MLflow run's status, or None when this tracking store has no such run."""
    try:
        return tracker.client.get_run(run_id).info.status
    except Exception as err:
        if getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _close_finished_run(tracker, run_id: str, tdir: Path, metrics: dict[str, Any], step: Any) -> None:
    tracker.log_metrics(run_id, metrics, step=int(step) if is_number(step) else None)
    _artifacts(tracker, run_id, tdir)
    tracker.set_tags(run_id, {"tokentune.status": "finished"})
    tracker.end_trial(run_id, "FINISHED")


def _train_and_evaluate(spec: SweepSpec, cfg, trial_id: str, tdir: Path, ctx: TrialContext) -> dict[str, Any]:
    from orchestrator.run.train_driver import run_train_job

    limit = spec.tune.max_memory_gb
    est = estimate_memory(cfg) if limit else None
    if over_memory_limit(est, limit):
        raise TrialFailed(
            f"refused before launch: estimated {est.short()} per worker > tune.max_memory_gb={limit}"
        )

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
    metrics.update(estimate_vs_measured(estimate_measured(cfg, metrics), metrics))
    metrics.update(after_training(spec.after_trial, res.final_dir, tdir, cfg.eval, ctx.post_trial_worker))
    return metrics


def after_training(
    after: AfterTrial, final_dir: str, tdir: Path, eval_cfg: EvalConfig, worker: str | None = None
) -> dict[str, Any]:
    """``after_trial.action`` for a trained trial: ``none`` does nothing, ``merge`` merges its adapter into
    the base, ``merge+eval`` also runs lm-eval on it (a Ray task, or the sweep's warm ``worker``); returns
    the metrics it adds. A failed merge or evaluation fails the trial (``TrialFailed``)."""
    if not after.merges:
        return {}
    from orchestrator.run.post_trial import run_post_trial

    log_event(tdir, "post-trial started")
    post = run_post_trial(
        final_dir,
        tdir,
        eval_cfg,
        evaluate=after.evaluates,
        keep_merged=True,  # pruned per after_trial.keep_merged when the sweep ends
        resources={"num_cpus": after.cpus, "num_gpus": after.gpus},
        timeout_s=after.timeout_s,  # on timeout the task is cancelled and this trial fails
        worker=worker,
    )
    log_event(tdir, "post-trial finished")
    if post.get("error"):
        raise TrialFailed(post["error"])
    return {k: v for k, v in (post.get("metrics") or {}).items() if is_number(v)}


def _train_metrics(m: dict[str, Any]) -> dict[str, Any]:
    keep = ("step", "loss", "val_loss", "tokens_per_s", "wall_s", "epoch")
    out = {k: float(m[k]) for k in keep if is_number(m.get(k))}
    out.update({k: float(v) for k, v in m.items() if "/" in k and is_number(v)})  # memory/*, <method>/*
    return out


def estimate_vs_measured(est: MemoryEstimate | None, metrics: dict[str, Any]) -> dict[str, float]:
    """``memory/estimate_*`` of the trial's config and ``memory/estimate_ratio`` (estimate / measured)."""
    if est is None:
        return {}
    out = est.metrics()
    measured = metrics.get("memory/train_gb")
    if is_number(measured) and measured > 0:
        out["memory/estimate_ratio"] = est.breakdown_gb / measured  # train_gb: the breakdown, no buffers
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


def _artifacts(tracker, run_id: str, tdir: Path) -> None:
    for name in (STATUS_FILE, "eval.json", "run_config.json", "result.json"):
        p = tdir / name
        if p.is_file():
            try:
                tracker.log_artifact(run_id, p)
            except Exception:  # noqa: BLE001 - artifacts are a convenience; the run's status matters
                pass


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
