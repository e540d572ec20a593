"""MLflow tracking for sweeps: one parent run per sweep, one child run per trial.

Everything goes through ``MlflowClient`` (never the fluent ``mlflow.start_run``): the driver and the
Tune trial processes write to the same store, and nesting is the ``mlflow.parentRunId`` tag.

    tracker = SweepTracker(default_tracking_uri(sweep_dir), "tokentune", "quickstart", sweep_id=uuid)
    parent = tracker.start_parent(spec_dict)          # get-or-create by sweep id: a resumed sweep reuses it
    run_id = tracker.trial_run("t_0001", config)        # get-or-create by trial id; config as params
    tracker.log_metrics(run_id, {"loss": 1.2}, step=10)
    tracker.end_trial(run_id, "FINISHED")
    tracker.log_summary(rows, sweep_dir, goals)          # results.csv/.json, pareto.png, best trial on the parent
    tracker.end_parent("FINISHED")

The tracker pickles as its strings, so a Tune trial (another process) rebuilds it and logs into its own
run. Runs are found again by tags, so a restarted sweep or trial never duplicates a run: the parent by
``tokentune.sweep_id`` (the sweep's UUID from ``sweep.yaml``, so two sweeps of one name never share a
parent; by name only when no id is given), a child by ``tokentune.trial_id`` under its parent. Params, tags and errors pass through ``tokentune.redact``
first: no tokens, keys or passwords reach the tracking store.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from orchestrator.results import report
from orchestrator.results.best import Goal, best_trial
from orchestrator.results.mlflow_ui import DESCRIPTION_TAG, KIND_TAGS
from tokentune.files import refuse_link
from tokentune.redact import redact, redact_rows, redact_text, redacted_file

log = logging.getLogger(__name__)

TAG_SWEEP = "tokentune.sweep"
TAG_SWEEP_ID = "tokentune.sweep_id"  # the sweep's UUID: what finds its parent run again
TAG_ROLE = "tokentune.role"  # "sweep" (parent) | "trial" (child)
TAG_TRIAL = "tokentune.trial_id"
TAG_ERROR = "tokentune.error"
TAG_PARENT = "mlflow.parentRunId"
STATUSES = ("FINISHED", "FAILED", "KILLED")

MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value
MAX_TAG_VALUE = 8000  # ... on a tag value
MAX_KEY = 250  # ... on a param/metric/tag key
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000


# --------------------------------------------------------------------------------- tracking URI
def default_tracking_uri(sweep_dir: str | Path, explicit: str | None = None) -> str:
    """The tracking URI of a sweep, always absolute.

    Resolution order: ``explicit`` (the sweep spec / CLI option) > ``MLFLOW_TRACKING_URI`` > a SQLite
    file ``<sweep_dir>/mlflow.db``. Relative SQLite paths and plain paths resolve against the current
    directory here, at the driver: Ray trials change their working directory.
    """
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri.strip():
        return sqlite_uri(refuse_link(Path(sweep_dir).expanduser().resolve() / "mlflow.db"))
    return absolute_uri(uri.strip())


def sqlite_uri(path: str | Path) -> str:
    """``/abs/dir/mlflow.db`` -> ``sqlite:////abs/dir/mlflow.db`` (SQLAlchemy: 3 slashes + absolute path)."""
    return "sqlite:///" + str(Path(path).expanduser().resolve())


def absolute_uri(uri: str) -> str:
    """Make a local tracking URI absolute; server, database and named (``databricks``) URIs pass unchanged."""
    if uri in ("databricks", "databricks-uc", "uc"):
        return uri
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        if path in ("", ":memory:"):
            return uri
        return sqlite_uri(path)
    if uri.startswith("file:"):
        path = urllib.parse.urlparse(uri).path
        return Path(path).expanduser().resolve().as_uri()
    if "://" not in uri and ":" not in uri.split("/")[0]:  # a plain path
        p = Path(uri).expanduser().resolve()
        return sqlite_uri(p) if p.suffix == ".db" else p.as_uri()
    return uri


def default_artifact_location(tracking_uri: str, experiment_name: str) -> str | None:
    """Artifacts of a SQLite store live beside the database (never in the current directory)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///") :])
        safe = re.sub(r"[^\w.\-]+", "_", experiment_name) or "default"
        return (db.parent / "mlartifacts" / safe).as_uri()
    return None  # a tracking server decides


# ------------------------------------------------------------------------------- params, metrics
def param_value(value: Any) -> str:
    """A param value as MLflow stores it: a string, JSON for lists/dicts/None, at most 6000 chars."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, (bool, int, float)):
        text = str(value)
    else:
        try:
            text = json.dumps(value, default=str)
        except (TypeError, ValueError):
            text = str(value)
    return text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."


def clean_key(key: str) -> str:
    """Replace characters MLflow rejects in keys (it allows letters, digits, ``_ - . space / :``)."""
    return re.sub(r"[^\w\-. /:]", "_", str(key))[:MAX_KEY]


def to_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Nested or flat config -> redacted, flattened, stringified MLflow params."""
    return {clean_key(k): param_value(v) for k, v in report.flatten(redact(params)).items()}


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Keep the numeric entries (bools and non-numbers skipped); keys cleaned for MLflow."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or value is None:
            continue
        try:
            number = float(value)  # ints, floats, numpy and 0-d torch scalars
        except (TypeError, ValueError):
            continue
        out[clean_key(key)] = number
    return out


# ---------------------------------------------------------------------------------- the sweep
class SweepTracker:
    """Parent/child MLflow runs of one sweep, found again by tags when a sweep resumes."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        sweep_name: str,
        parent_run_id: str | None = None,
        sweep_id: str | None = None,
    ) -> None:
        self.tracking_uri = absolute_uri(tracking_uri)
        self.experiment_name = experiment_name
        self.sweep_name = sweep_name
        self.parent_run_id = parent_run_id
        self.sweep_id = sweep_id
        self._client_obj: Any = None
        self._experiment_id: str | None = None

    # pickling: strings only; client and experiment id are looked up again
    def __getstate__(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in ("tracking_uri", "experiment_name", "sweep_name", "parent_run_id", "sweep_id")
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    @property
    def client(self) -> Any:
        """The ``MlflowClient``, made on first use (mlflow is imported only then)."""
        if self._client_obj is None:
            from mlflow import MlflowClient

            self._client_obj = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client_obj

    @property
    def experiment_id(self) -> str:
        """Get-or-create the experiment (another process may create it at the same moment)."""
        if self._experiment_id is None:
            from mlflow.exceptions import MlflowException

            exp = self.client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                try:
                    self._experiment_id = self.client.create_experiment(
                        self.experiment_name,
                        artifact_location=default_artifact_location(self.tracking_uri, self.experiment_name),
                        tags=KIND_TAGS,  # the UI opens on the runs table, not the GenAI overview
                    )
                except MlflowException:  # lost the race; it exists now
                    exp = self.client.get_experiment_by_name(self.experiment_name)
                    if exp is None:
                        raise
            if exp is not None:
                if exp.lifecycle_stage == "deleted":
                    self.client.restore_experiment(exp.experiment_id)
                for key, value in KIND_TAGS.items():  # an experiment made before, or by someone else
                    if not exp.tags.get(key):
                        self.client.set_experiment_tag(exp.experiment_id, key, value)
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    def _matches(self, filter_string: str) -> list[Any]:
        """Active runs matching the filter, oldest first (ties broken by run id: every process agrees)."""
        runs = self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=50)
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    def _find(self, filter_string: str) -> Any:
        runs = self._matches(filter_string)
        return runs[0] if runs else None

    def _get_or_create(
        self, filter_string: str, tags: dict[str, str], run_name: str, reopen: bool = True
    ) -> Any:
        """The oldest run matching the filter, else a new one with ``tags``.

        Two processes may both find nothing and create a run (e.g. the driver's live callback and the
        trial itself): after creating, the loser deletes its own run and uses the oldest one.
        """
        run = self._find(filter_string)
        if run is not None:
            if reopen:
                self._reopen(run)
            return run
        created = self.client.create_run(self.experiment_id, tags=tags, run_name=run_name)
        oldest = self._find(filter_string)
        if oldest is not None and oldest.info.run_id != created.info.run_id:
            log.info("run %s duplicated %s (created concurrently); deleting it", created.info.run_id, oldest)
            self.client.delete_run(created.info.run_id)
            self._reopen(oldest)
            return oldest
        return created

    def _reopen(self, run: Any) -> None:
        if run.info.status != "RUNNING":
            self.client.update_run(run.info.run_id, status="RUNNING")

    def start_parent(self, spec: Mapping[str, Any] | None = None) -> str:
        """Get-or-create the sweep's parent run (by ``sweep_id`` when given, else by name); log the spec
        as ``sweep.yaml`` and flat params."""
        import yaml

        sweep = _quote(self.sweep_name)
        by_name = f"tags.`{TAG_SWEEP}` = '{sweep}' and tags.`{TAG_ROLE}` = 'sweep'"
        tags = {TAG_SWEEP: self.sweep_name, TAG_ROLE: "sweep"}
        if self.sweep_id is None:
            run = self._get_or_create(by_name, tags, self.sweep_name)
        else:
            by_id = f"tags.`{TAG_SWEEP_ID}` = '{_quote(self.sweep_id)}' and tags.`{TAG_ROLE}` = 'sweep'"
            run = self._get_or_create(by_id, {**tags, TAG_SWEEP_ID: self.sweep_id}, self.sweep_name)
        self.parent_run_id = run.info.run_id
        if spec:
            safe = redact(dict(spec))
            self.client.log_text(self.parent_run_id, yaml.safe_dump(safe, sort_keys=False), "sweep.yaml")
            self._log_params(self.parent_run_id, safe)
        return self.parent_run_id

    def trial_run(
        self,
        trial_id: str,
        params: Mapping[str, Any] | None = None,
        run_name: str | None = None,
        reopen: bool = True,
    ) -> str:
        """Get-or-create ``trial_id``'s child run (config as params); found ended, reopened if ``reopen``."""
        if self.parent_run_id is None:
            self.start_parent()
        tid = _quote(str(trial_id))
        run = self._get_or_create(
            f"tags.`{TAG_TRIAL}` = '{tid}' and tags.`{TAG_PARENT}` = '{self.parent_run_id}'",
            {
                TAG_PARENT: self.parent_run_id,
                TAG_SWEEP: self.sweep_name,
                TAG_ROLE: "trial",
                TAG_TRIAL: str(trial_id),
            },
            run_name or str(trial_id),
            reopen,
        )
        if params:
            self._log_params(run.info.run_id, params)
        return run.info.run_id

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int | None = None) -> int:
        """Log the numeric entries of ``metrics`` at ``step``; returns how many were logged."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(k, v, now, int(step or 0)) for k, v in numeric_metrics(metrics).items()]
        for i in range(0, len(rows), METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=rows[i : i + METRICS_PER_BATCH])
        return len(rows)

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> list[str]:
        """Log params a run does not have yet; same values are skipped, changed ones become tags.

        MLflow refuses to change a logged param; on resume the old value stays and the new one is kept
        as the tag ``tokentune.changed.<key>``. Returns the changed keys.
        """
        from mlflow.entities import Param

        wanted = to_params(params)
        existing = self.client.get_run(run_id).data.params
        new = [Param(k, v) for k, v in wanted.items() if k not in existing]
        changed = sorted(k for k, v in wanted.items() if k in existing and existing[k] != v)
        for i in range(0, len(new), PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=new[i : i + PARAMS_PER_BATCH])
        if changed:
            log.warning("run %s: params changed since first logged, kept as tags: %s", run_id, changed)
            self.set_tags(run_id, {f"tokentune.changed.{k}": wanted[k] for k in changed})
        return changed

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Set tags (redacted; ``None`` values skipped)."""
        from mlflow.entities import RunTag

        rows = [
            RunTag(clean_key(k), str(v)[:MAX_TAG_VALUE])
            for k, v in redact(dict(tags)).items()
            if v is not None
        ]
        for i in range(0, len(rows), PARAMS_PER_BATCH):
            self.client.log_batch(run_id, tags=rows[i : i + PARAMS_PER_BATCH])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file, or a folder's contents, under ``artifact_path``; text files are logged redacted."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"cannot log artifact {str(path)!r}: no such file or folder")
        files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
        with tempfile.TemporaryDirectory(prefix="tokentune-artifact-") as scratch:
            for f in files:
                rel = "." if f == path else f.parent.relative_to(path).as_posix()
                where = "/".join(x for x in (artifact_path, rel) if x and x != ".") or None
                self.client.log_artifact(run_id, str(redacted_file(f, Path(scratch))), where)

    def end_trial(self, run_id: str, status: str = "FINISHED", error: str | None = None) -> None:
        """Terminate a run; ``error`` (redacted) becomes the tag ``tokentune.error`` and ``error.txt``."""
        if status not in STATUSES:
            raise ValueError(f"run status {status!r} is invalid: expected one of {', '.join(STATUSES)}")
        if error:
            text = redact_text(str(error))
            self.client.set_tag(run_id, TAG_ERROR, text[:MAX_TAG_VALUE])
            self.client.log_text(run_id, text, "error.txt")
        self.client.set_terminated(run_id, status=status)

    def end_parent(self, status: str = "FINISHED", error: str | None = None) -> None:
        if self.parent_run_id is not None:
            self.end_trial(self.parent_run_id, status, error)

    def log_summary(
        self,
        rows: list[dict[str, Any]],
        out_dir: str | Path,
        goals: Sequence[Goal] = ((report.SCORE_KEY, "max"),),
        memory_key: str | None = None,
        memory_budget_gb: float | None = None,
        description: str | None = None,
    ) -> dict[str, Path]:
        """Write results.csv, results.json and pareto.png to ``out_dir`` and log them on the parent.

        Also logs the table as an MLflow table artifact (``results_table.json``, shown in the UI's
        artifact view), the Pareto front (``eval/score`` vs measured memory ``memory_key``, default
        ``report.memory_axis``) as a tag, the best trial by ``goals`` (the sweep's objective, picked by
        ``best.best_trial`` as everywhere else) as the tag ``tokentune.best_trial`` with its goal
        metrics, score and memory as parent metrics ``best/<metric>``, and with ``memory_budget_gb`` the
        best trial within it (``tokentune.best_within_budget``).
        """
        from orchestrator.results.plot import write_summary_files

        rows = redact_rows(rows)  # the one pass: the files, the table, the tags all come from these
        memory_key = memory_key or report.memory_axis(rows)
        paths = write_summary_files(rows, Path(out_dir), goals, memory_key)
        if self.parent_run_id is None:
            return paths
        for path in paths.values():
            self.log_artifact(self.parent_run_id, path)  # text files redacted again on the way out
        if rows:
            table = report.column_table(rows)
            try:
                self.client.log_table(self.parent_run_id, table, "results_table.json")
            except Exception as err:  # pandas missing or an odd column type: fall back to plain JSON
                log.warning("log_table failed (%s); logging the table as JSON", err)
                self.client.log_dict(self.parent_run_id, table, "results_table.json")
        front = (  # a list objective: the front of every objective, as the results mark it
            report.front_of(rows, goals)
            if len(goals) > 1
            else report.pareto_front(rows, report.SCORE_KEY, memory_key)
        )
        best = best_trial(rows, goals)
        tags: dict[str, Any] = {"tokentune.pareto_front": ",".join(str(r.get("trial_id")) for r in front)}
        if best is not None:
            tags["tokentune.best_trial"] = best.get("trial_id")
            keys = dict.fromkeys([*(m for m, _ in goals), report.SCORE_KEY, memory_key, "val_loss"])
            self.log_metrics(self.parent_run_id, {f"best/{k}": best.get(k) for k in keys}, None)
        if memory_budget_gb is not None:
            fit = report.best_within(rows, memory_budget_gb, goals, memory_key)
            tags["tokentune.best_within_budget"] = fit.get("trial_id") if fit else "none"
        if description:  # the parent run's description in the UI (markdown)
            tags[DESCRIPTION_TAG] = description
        self.set_tags(self.parent_run_id, tags)
        return paths

    def child_run_ids(self) -> list[str]:
        """The trial runs under the parent, oldest first."""
        runs = self._matches(f"tags.`{TAG_PARENT}` = '{self.parent_run_id}'") if self.parent_run_id else []
        return [r.info.run_id for r in sorted(runs, key=lambda r: r.info.start_time or 0)]


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")
