"""Tracking that never fails a trial: MLflow writes that could not be sent wait in the trial folder.

    tracking = TrialTracking(tracker, trial_folder, "t_0001")    # in the trial's process
    tracking.start(params); tracking.tags({...}); tracking.metrics({...}, step); tracking.end("FINISHED")
    resend_pending(tracker, sweep_dir)                            # the driver, on --resume

Each write is retried (``TRIAL_ATTEMPTS`` tries, backoff from ``TRIAL_BACKOFF_S``). When one still fails
the trial goes on *offline*: that write and every later one of the trial (so their order holds) are
appended to ``<trial>/tracking_pending.jsonl`` and an event ``tracking offline`` says why; the
trial's own outcome (``status.json``) does not depend on the store. The driver's tracking queue
(``tracking_queue``) records what it could not send beside it, in ``tracking_pending.driver.jsonl``
(one writer per file; a trial folder restored from a URI storage never overwrites the driver's). A resumed sweep replays every trial's
file before Tune runs (``resend_pending``): the child run is found (or made) by the trial id,
params, metrics (with their own steps and times), tags and artifacts are logged, the run ends with
the last recorded end; the file is removed once all of it went through.

Rows (one JSON object a line, redacted like everything written): ``{"op": "params", "params": {..}}``,
``{"op": "metrics", "metrics": {..}, "step": n, "ts": ms}``, ``{"op": "tags", "tags": {..}}``,
``{"op": "artifacts"}`` (the trial folder's ``TRIAL_ARTIFACTS``), ``{"op": "end", "status": ..,
"error": ..}``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from orchestrator.results.tracking_queue import Row, metrics_row, with_retries
from orchestrator.results.trial_status import STATUS_FILE, TRIALS_DIR, log_event, write_status
from tokentune.errors import is_number
from tokentune.files import append_jsonl, read_jsonl
from tokentune.redact import redact, redact_text

log = logging.getLogger(__name__)

PENDING_FILE = "tracking_pending.jsonl"  # the trial process's writes
DRIVER_PENDING_FILE = "tracking_pending.driver.jsonl"  # the driver's (a file each: one writer per file)
TRIAL_ARTIFACTS = (STATUS_FILE, "eval.json", "run_config.json", "result.json")
TRIAL_ATTEMPTS = 3  # a trial waits at most ~1 + 2 s (plus MLflow's own HTTP retries) before going offline
TRIAL_BACKOFF_S = 1.0
MISSING = "MISSING"  # ``TrialTracking.run_status`` of a run id this store does not hold


def record_pending(tdir: str | Path, rows: list[Row], name: str = PENDING_FILE) -> None:
    """Append ``rows`` to the trial folder's ``tracking_pending.jsonl`` (or ``name``)."""
    for row in rows:
        append_jsonl(Path(tdir) / name, redact(row))


# ---- writing rows to MLflow ---------------------------------------------------------------------------------
def log_points(tracker: Any, run_id: str, rows: list[Row]) -> int:
    """The metrics of ``rows`` in ``log_batch`` calls of up to 1000 points, each with its own step and
    time (so a late or replayed write lands where it belongs); returns how many points."""
    from mlflow.entities import Metric

    from orchestrator.results.tracking import METRICS_PER_BATCH, numeric_metrics

    points = [
        Metric(k, v, int(r.get("ts") or time.time() * 1000), int(r.get("step") or 0))
        for r in rows
        if r.get("op") == "metrics"
        for k, v in numeric_metrics(r.get("metrics") or {}).items()
    ]
    for i in range(0, len(points), METRICS_PER_BATCH):
        tracker.client.log_batch(run_id, metrics=points[i : i + METRICS_PER_BATCH])
    return len(points)


def log_trial_artifacts(tracker: Any, run_id: str, tdir: str | Path) -> None:
    """The trial folder's ``TRIAL_ARTIFACTS`` that exist, on its run."""
    for name in TRIAL_ARTIFACTS:
        if (Path(tdir) / name).is_file():
            tracker.log_artifact(run_id, Path(tdir) / name)


def params_of(rows: list[Row]) -> dict[str, Any] | None:
    """The params of ``rows`` (None if none): ``trial_run`` logs them when it finds or makes the run."""
    params = {k: v for r in rows if r.get("op") == "params" for k, v in (r.get("params") or {}).items()}
    return params or None


def apply_rows(tracker: Any, run_id: str, tdir: str | Path, rows: list[Row]) -> None:
    """Write ``rows`` (but params) to ``run_id``: metrics (in one batch), tags, artifacts, the last end."""
    tags = {k: v for r in rows if r.get("op") == "tags" for k, v in (r.get("tags") or {}).items()}
    log_points(tracker, run_id, rows)
    if tags:
        tracker.set_tags(run_id, tags)
    if any(r.get("op") == "artifacts" for r in rows):
        log_trial_artifacts(tracker, run_id, tdir)
    ends = [r for r in rows if r.get("op") == "end"]
    if ends:
        tracker.end_trial(run_id, ends[-1].get("status") or "FINISHED", ends[-1].get("error"))


class DriverSender:
    """The driver's ``send`` for the tracking queue: a trial's rows onto its child run (found, or made,
    by the trial id and never reopened: a late write must not mark a finished run running again)."""

    def __init__(self, tracker: Any, sweep_dir: str | Path) -> None:
        self.tracker, self.sweep_dir = tracker, Path(sweep_dir)
        self.runs: dict[str, str] = {}

    def __call__(self, trial_id: str, rows: list[Row]) -> None:
        if trial_id not in self.runs:
            self.runs[trial_id] = self.tracker.trial_run(trial_id, params_of(rows), reopen=False)
        apply_rows(self.tracker, self.runs[trial_id], self.sweep_dir / TRIALS_DIR / trial_id, rows)

    def record(self, trial_id: str, rows: list[Row]) -> None:
        record_pending(self.sweep_dir / TRIALS_DIR / trial_id, rows, DRIVER_PENDING_FILE)


# ---- in the trial's process ---------------------------------------------------------------------------------
class TrialTracking:
    """One trial's MLflow writes, never fatal (see the module docstring)."""

    def __init__(
        self,
        tracker: Any,
        tdir: str | Path,
        trial_id: str,
        *,
        attempts: int = TRIAL_ATTEMPTS,
        backoff_s: float = TRIAL_BACKOFF_S,
        wait: Callable[[float], Any] = time.sleep,
    ) -> None:
        self.tracker, self.tdir, self.trial_id = tracker, Path(tdir), str(trial_id)
        self.run_id: str | None = None
        self.offline = False
        self._retry = {"attempts": attempts, "backoff_s": backoff_s, "wait": wait}

    def _write(self, row: Row | None, fn: Callable[[], Any]) -> Any:
        if not self.offline:
            try:
                return with_retries(fn, **self._retry)
            except Exception as err:  # noqa: BLE001 - tracking never fails a trial that trained
                self.offline = True
                why = redact_text(f"{type(err).__name__}: {err}")[:500]
                log.warning(
                    "trial %s: MLflow write failed (%s); this trial's tracking goes to %s and is sent on "
                    "--resume",
                    self.trial_id,
                    why,
                    self.tdir / PENDING_FILE,
                )
                log_event(self.tdir, "tracking offline", error=why)
        if row is not None:
            record_pending(self.tdir, [row])
        return None

    @property
    def started(self) -> bool:
        """Whether the run was made (or, offline, its making recorded): later writes have a place to go."""
        return self.run_id is not None or self.offline

    def start(self, params: Mapping[str, Any]) -> str | None:
        """Get-or-create the trial's run with its params; its id, or None when offline."""
        row = {"op": "params", "params": dict(params)}
        self.run_id = self._write(row, lambda: self.tracker.trial_run(self.trial_id, params))
        return self.run_id

    def run_status(self, run_id: str) -> str | None:
        """Take ``run_id`` as this trial's run; its status, ``MISSING`` when this store has no such run (a
        ``--resume`` with a new ``tracking.uri``), None when the store cannot be reached (offline)."""
        self.run_id = run_id

        def status() -> str:
            try:
                return self.tracker.client.get_run(run_id).info.status
            except Exception as err:
                if getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                    return MISSING
                raise

        return self._write(None, status)

    def tags(self, tags: Mapping[str, Any]) -> None:
        self._write({"op": "tags", "tags": dict(tags)}, lambda: self.tracker.set_tags(self.run_id, tags))

    def metrics(self, metrics: Mapping[str, Any], step: int | None) -> None:
        row = metrics_row(dict(metrics), int(step or 0))
        self._write(row, lambda: log_points(self.tracker, self.run_id, [row]))

    def artifacts(self) -> None:
        self._write({"op": "artifacts"}, lambda: log_trial_artifacts(self.tracker, self.run_id, self.tdir))

    def end(self, status: str, error: str | None = None) -> None:
        row = {"op": "end", "status": status, "error": error}
        self._write(row, lambda: self.tracker.end_trial(self.run_id, status, error))


# ---- on --resume ------------------------------------------------------------------------------------------
def resend_pending(tracker: Any, sweep_dir: str | Path) -> tuple[int, int]:
    """Replay every trial's recorded writes, the driver's then the trial's (module docstring); returns
    (trials sent, trials still pending). A trial whose replay fails keeps its files (one warning each)."""
    sent = left = 0
    for tdir in sorted({p.parent for p in Path(sweep_dir, TRIALS_DIR).glob("*/tracking_pending*.jsonl")}):
        files = [tdir / DRIVER_PENDING_FILE, tdir / PENDING_FILE]
        rows = [row for f in files for row in read_jsonl(f)]
        try:
            run_id = tracker.trial_run(tdir.name, params_of(rows), reopen=False)
            apply_rows(tracker, run_id, tdir, rows)
        except Exception as err:  # noqa: BLE001 - still unreachable: keep the files for the next resume
            log.warning("trial %s: its recorded tracking could not be sent yet: %s", tdir.name, err)
            left += 1
            continue
        for f in files:
            f.unlink(missing_ok=True)
        log_event(tdir, "tracking re-sent", writes=len(rows))
        sent += 1
    if sent or left:
        log.warning("resume: recorded MLflow writes sent for %d trial(s), %d still waiting", sent, left)
    return sent, left


def end_parent(tracker: Any, status: str) -> None:
    """End the sweep's parent run; a store that cannot be reached is a warning (``--resume`` ends it)."""
    try:
        tracker.end_parent(status)
    except Exception as err:  # noqa: BLE001 - tracking never fails a sweep
        log.warning("MLflow: the sweep's parent run could not be ended (%s)", redact_text(str(err)))


def close_open_run(tracker, tdir: Path, done: dict[str, Any]) -> bool:
    """status.json is a trial's commit point; a crash right after writing it can leave the trial's MLflow
    run RUNNING. On resume, close such a run as FINISHED with its metrics; True if one was closed (or, the
    store being down, recorded to be closed on the next resume). A run the tracking store does not hold
    (resumed with a new ``tracking.uri``) is made there, closed likewise."""
    run_id = done.get("run_id")
    if not run_id:
        return False
    tracking = TrialTracking(tracker, tdir, done.get("trial_id") or tdir.name)
    status = tracking.run_status(run_id)
    if status == MISSING:  # not in this store (--resume with a new tracking.uri): the trial is recorded there
        searched = {str(k).replace(".", "/"): v for k, v in (done.get("searched") or {}).items()}
        if tracking.start({"search": searched}) is not None:
            info = {k: v for k, v in done.items() if k not in ("status", "time", "run_id")}
            write_status(tdir, "finished", **info, run_id=tracking.run_id)  # the next resume finds it there
    elif status == "FINISHED":
        return False
    close_finished_run(tracking, done["metrics"], done["metrics"].get("step"))
    return True


def close_finished_run(tracking: TrialTracking, metrics: dict[str, Any], step: Any) -> None:
    """End a trial's run as FINISHED with its final metrics and artifacts."""
    tracking.metrics(metrics, int(step) if is_number(step) else None)
    tracking.artifacts()
    tracking.tags({"tokentune.status": "finished"})
    tracking.end("FINISHED")
