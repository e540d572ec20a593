"""MLflow tracking for sweeps: one parent run per sweep, one child run per trial.

Everything goes through ``MlflowClient`` (never the fluent ``mlflow.start_run``): the driver and the
Tune trial processes write to the same store, and nesting is the ``mlflow.parentRunId`` tag.

    tracker = SweepTracker(default_tracking_uri(sweep_dir), "tokentune", "quickstart")
    parent = tracker.start_parent(spec_dict)          # get-or-create: a resumed sweep reuses it
    run_id = tracker.trial_run("t_0001", flat_config)   # get-or-create by trial id
    log = TrialLogger(tracker.tracking_uri, run_id)      # picklable; use it inside the trial
    log.log_metrics({"loss": 1.2}, step=10)
    log.end("FINISHED")
    tracker.log_summary(rows, sweep_dir)                 # results.csv/.json, pareto.png on the parent
    tracker.end_parent("FINISHED")

Runs are found again by tags (``tokentune.sweep``, ``tokentune.trial_id``), so a restarted sweep or
trial never duplicates a run. Params and tags pass through :func:`redact` first: no tokens, keys
or passwords reach the tracking store.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TAG_SWEEP = "tokentune.sweep"
TAG_ROLE = "tokentune.role"  # "sweep" (parent) | "trial" (child)
TAG_TRIAL = "tokentune.trial_id"
TAG_ERROR = "tokentune.error"
TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"
STATUSES = ("FINISHED", "FAILED", "KILLED")

MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value
MAX_TAG_VALUE = 8000  # ... on a tag value
MAX_KEY = 250  # ... on a param/metric/tag key
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
REDACTED = "***"


# --------------------------------------------------------------------------------- tracking URI
def default_tracking_uri(sweep_dir: str | Path, explicit: str | None = None) -> str:
    """The tracking URI of a sweep, always absolute.

    Resolution order: ``explicit`` (the sweep spec / CLI option) > ``MLFLOW_TRACKING_URI`` > a SQLite
    file ``<sweep_dir>/mlflow.db``. Relative SQLite paths and plain paths resolve against the current
    directory here, at the driver: Ray trials change their working directory.
    """
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri.strip():
        return sqlite_uri(Path(sweep_dir).expanduser().resolve() / "mlflow.db")
    return absolute_uri(uri.strip())


def sqlite_uri(path: str | Path) -> str:
    """``/abs/dir/mlflow.db`` -> ``sqlite:////abs/dir/mlflow.db`` (SQLAlchemy: 3 slashes + absolute path)."""
    return "sqlite:///" + str(Path(path).expanduser().resolve())


def absolute_uri(uri: str) -> str:
    """Make a local tracking URI absolute; server and database URIs pass unchanged."""
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


# ----------------------------------------------------------------------------------- redaction
_SECRET_KEY = re.compile(
    r"(^|[_\-.])(token|auth|authorization|bearer|secret|password|passwd|pwd|credentials?|"
    r"api[_\-]?key|apikey|access[_\-]?key|private[_\-]?key|secret[_\-]?key|session[_\-]?key)$"
    r"|secret|password|passwd|credential|^aws_|^hf_token$|api[_\-]?key",
    re.IGNORECASE,
)
#: tokenizer settings that end in ``_token`` but are not secrets
_NOT_SECRET_KEYS = {
    "pad_token",
    "eos_token",
    "bos_token",
    "unk_token",
    "sep_token",
    "cls_token",
    "mask_token",
}
_SECRET_VALUE = re.compile(
    r"hf_[A-Za-z0-9]{16,}"  # Hugging Face
    r"|(?:AKIA|ASIA)[A-Z0-9]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}"  # GitHub
    r"|sk-[A-Za-z0-9_\-]{20,}"  # OpenAI-style
    r"|xox[abpr]-[A-Za-z0-9\-]{10,}"  # Slack
    r"|eyJ[\w\-]{10,}\.[\w\-]{10,}\.[\w\-]+"  # JWT
    r"|(?i:bearer)\s+[\w.\-~+/=]{16,}"
)
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][\w+.\-]*://[^/\s:@]*:)(?P<pw>[^@/\s]+)(?P<at>@)")


def is_secret_key(key: str) -> bool:
    """True for keys like ``HF_TOKEN``, ``hub.auth_token``, ``db_password``, ``AWS_SECRET_ACCESS_KEY``."""
    leaf = str(key).rsplit(".", 1)[-1].lower()
    if leaf in _NOT_SECRET_KEYS:
        return False
    return bool(_SECRET_KEY.search(leaf)) or bool(re.search(r"(^|\.)aws_", str(key), re.IGNORECASE))


def redact_text(text: str) -> str:
    """Mask token-like substrings and URL passwords inside free text (error messages, values)."""
    text = _SECRET_VALUE.sub(REDACTED, text)
    return _URL_PASSWORD.sub(lambda m: m["head"] + REDACTED + m["at"], text)


def redact(params: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``params`` (nested or flat) with secret-looking keys and values masked as ``***``.

    A key is secret by name (``HF_TOKEN``, ``*_token``, ``*secret*``, ``*password*``, ``AWS_*``,
    ``*api_key*`` ...); a value is secret by shape (``hf_...``, ``AKIA...``, ``ghp_...``, ``sk-...``,
    JWTs, ``Bearer ...``); passwords inside URLs (``postgresql://user:pw@host``) are masked in place.
    """
    out: dict[str, Any] = {}
    for key, value in params.items():
        if is_secret_key(key) and value not in (None, ""):
            out[key] = REDACTED
        elif isinstance(value, Mapping):
            out[key] = redact(value)
        elif isinstance(value, (list, tuple)):
            out[key] = [redact(v) if isinstance(v, Mapping) else _redact_value(v) for v in value]
        else:
            out[key] = _redact_value(value)
    return out


def _redact_value(value: Any) -> Any:
    return redact_text(value) if isinstance(value, str) else value


# ---------------------------------------------------------------------------------- flattening
def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"lora": {"rank": 8}}`` -> ``{"lora.rank": 8}``; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


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
    return {clean_key(k): param_value(v) for k, v in flatten(redact(params)).items()}


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


# ------------------------------------------------------------------------- shared run operations
def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _log_metrics(client: Any, run_id: str, metrics: Mapping[str, Any], step: int | None) -> int:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    rows = [Metric(k, v, now, int(step or 0)) for k, v in numeric_metrics(metrics).items()]
    for i in range(0, len(rows), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=rows[i : i + METRICS_PER_BATCH])
    return len(rows)


def _log_params(client: Any, run_id: str, params: Mapping[str, Any]) -> list[str]:
    """Log params a run does not have yet; same values are skipped, changed ones become tags.

    MLflow refuses to change a logged param; on resume the old value stays and the new one is kept
    as the tag ``tokentune.changed.<key>``. Returns the changed keys.
    """
    from mlflow.entities import Param, RunTag

    wanted = to_params(params)
    existing = client.get_run(run_id).data.params
    new = [Param(k, v) for k, v in wanted.items() if k not in existing]
    changed = sorted(k for k, v in wanted.items() if k in existing and existing[k] != v)
    for i in range(0, len(new), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=new[i : i + PARAMS_PER_BATCH])
    if changed:
        log.warning("run %s: params changed since first logged, kept as tags: %s", run_id, changed)
        tags = [RunTag(clean_key(f"tokentune.changed.{k}"), wanted[k][:MAX_TAG_VALUE]) for k in changed]
        for i in range(0, len(tags), PARAMS_PER_BATCH):
            client.log_batch(run_id, tags=tags[i : i + PARAMS_PER_BATCH])
    return changed


def _set_tags(client: Any, run_id: str, tags: Mapping[str, Any]) -> None:
    from mlflow.entities import RunTag

    rows = [
        RunTag(clean_key(k), str(v)[:MAX_TAG_VALUE]) for k, v in redact(dict(tags)).items() if v is not None
    ]
    for i in range(0, len(rows), PARAMS_PER_BATCH):
        client.log_batch(run_id, tags=rows[i : i + PARAMS_PER_BATCH])


def _log_artifact(client: Any, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    path = Path(path)
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    elif path.is_file():
        client.log_artifact(run_id, str(path), artifact_path)
    else:
        raise FileNotFoundError(f"cannot log artifact {str(path)!r}: no such file or folder")


def _end(client: Any, run_id: str, status: str, error: str | None) -> None:
    if status not in STATUSES:
        raise ValueError(f"run status {status!r} is invalid: expected one of {', '.join(STATUSES)}")
    if error:
        text = redact_text(str(error))
        client.set_tag(run_id, TAG_ERROR, text[:MAX_TAG_VALUE])
        client.log_text(run_id, text, "error.txt")
    client.set_terminated(run_id, status=status)


class TrialLogger:
    """Logs into one existing run; rebuilt in any process from ``(tracking_uri, run_id)``.

    Pickles as its two strings (the MLflow client is made lazily), so it can ride along into a Ray
    Tune trial or a Ray task.
    """

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._client_obj: Any = None

    @property
    def client(self) -> Any:
        if self._client_obj is None:
            self._client_obj = _client(self.tracking_uri)
        return self._client_obj

    def __getstate__(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["tracking_uri"], state["run_id"])

    def __repr__(self) -> str:
        return f"TrialLogger({self.tracking_uri!r}, {self.run_id!r})"

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> int:
        """Log the numeric entries of ``metrics`` at ``step``; returns how many were logged."""
        return _log_metrics(self.client, self.run_id, metrics, step)

    def log_params(self, params: Mapping[str, Any]) -> list[str]:
        return _log_params(self.client, self.run_id, params)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        _set_tags(self.client, self.run_id, tags)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file, or a folder's contents, under ``artifact_path``."""
        _log_artifact(self.client, self.run_id, path, artifact_path)

    def log_artifacts(self, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
        for path in paths:
            _log_artifact(self.client, self.run_id, path, artifact_path)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, dict(data), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def end(self, status: str = "FINISHED", error: str | None = None) -> None:
        """Terminate the run; ``error`` becomes the tag ``tokentune.error`` and ``error.txt``."""
        _end(self.client, self.run_id, status, error)


# ---------------------------------------------------------------------------------- the sweep
class SweepTracker:
    """Parent/child MLflow runs of one sweep, found again by tags when a sweep resumes."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        sweep_name: str,
        parent_run_id: str | None = None,
    ) -> None:
        self.tracking_uri = absolute_uri(tracking_uri)
        self.experiment_name = experiment_name
        self.sweep_name = sweep_name
        self.parent_run_id = parent_run_id
        self._client_obj: Any = None
        self._experiment_id: str | None = None

    # pickling: strings only; client and experiment id are looked up again
    def __getstate__(self) -> dict[str, Any]:
        return {
            k: getattr(self, k) for k in ("tracking_uri", "experiment_name", "sweep_name", "parent_run_id")
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    @property
    def client(self) -> Any:
        if self._client_obj is None:
            self._client_obj = _client(self.tracking_uri)
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
                    )
                except MlflowException:  # lost the race; it exists now
                    exp = self.client.get_experiment_by_name(self.experiment_name)
                    if exp is None:
                        raise
            if exp is not None:
                if exp.lifecycle_stage == "deleted":
                    self.client.restore_experiment(exp.experiment_id)
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    def _matches(self, filter_string: str) -> list[Any]:
        """Active runs matching the filter, oldest first (ties broken by run id: every process agrees)."""
        runs = self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=50)
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    def _find(self, filter_string: str) -> Any:
        runs = self._matches(filter_string)
        return runs[0] if runs else None

    def _get_or_create(self, filter_string: str, tags: dict[str, str], run_name: str) -> Any:
        """The oldest run matching the filter, else a new one with ``tags``.

        Two processes may both find nothing and create a run (e.g. the driver's live callback and the
        trial itself): after creating, the loser deletes its own run and uses the oldest one.
        """
        run = self._find(filter_string)
        if run is not None:
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
        """Get-or-create the sweep's parent run; log the spec as ``sweep.yaml`` and flat params."""
        import yaml

        sweep = _quote(self.sweep_name)
        run = self._get_or_create(
            f"tags.`{TAG_SWEEP}` = '{sweep}' and tags.`{TAG_ROLE}` = 'sweep'",
            {TAG_SWEEP: self.sweep_name, TAG_ROLE: "sweep"},
            self.sweep_name,
        )
        self.parent_run_id = run.info.run_id
        if spec:
            safe = redact(dict(spec))
            self.client.log_text(self.parent_run_id, yaml.safe_dump(safe, sort_keys=False), "sweep.yaml")
            _log_params(self.client, self.parent_run_id, safe)
        return self.parent_run_id

    def trial_run(
        self, trial_id: str, params: Mapping[str, Any] | None = None, run_name: str | None = None
    ) -> str:
        """Get-or-create the child run of ``trial_id`` under the parent; log its flattened config."""
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
        )
        if params:
            _log_params(self.client, run.info.run_id, params)
        return run.info.run_id

    def trial_logger(self, run_id: str) -> TrialLogger:
        return TrialLogger(self.tracking_uri, run_id)

    def trial_runs(self) -> list[Any]:
        """The parent's child runs (any status), oldest first."""
        if self.parent_run_id is None:
            return []
        return list(
            self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{TAG_PARENT}` = '{self.parent_run_id}'",
                max_results=10000,
                order_by=["attributes.start_time ASC"],
            )
        )

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int | None = None) -> int:
        return _log_metrics(self.client, run_id, metrics, step)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> list[str]:
        return _log_params(self.client, run_id, params)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        _set_tags(self.client, run_id, tags)

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        _log_artifact(self.client, run_id, path, artifact_path)

    def log_artifacts(
        self, run_id: str, paths: Iterable[str | Path], artifact_path: str | None = None
    ) -> None:
        for path in paths:
            _log_artifact(self.client, run_id, path, artifact_path)

    def end_trial(self, run_id: str, status: str = "FINISHED", error: str | None = None) -> None:
        _end(self.client, run_id, status, error)

    def end_parent(self, status: str = "FINISHED", error: str | None = None) -> None:
        if self.parent_run_id is not None:
            _end(self.client, self.parent_run_id, status, error)

    def log_summary(
        self,
        rows: list[dict[str, Any]],
        out_dir: str | Path,
        score_key: str = "eval/score",
        memory_key: str = "peak_memory_bytes",
    ) -> dict[str, Path]:
        """Write results.csv, results.json and pareto.png to ``out_dir`` and log them on the parent.

        Also logs the table as an MLflow table artifact (``results_table.json``, shown in the UI's
        artifact view), the best trial's score as parent metrics and the Pareto front as a tag.
        """
        from orchestrator import report

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {
            "csv": report.write_csv(rows, out_dir / "results.csv"),
            "json": report.write_json(rows, out_dir / "results.json"),
            "pareto": report.pareto_plot(
                rows, out_dir / "pareto.png", score_key=score_key, memory_key=memory_key
            ),
        }
        if self.parent_run_id is None:
            return paths
        for path in paths.values():
            self.client.log_artifact(self.parent_run_id, str(path))
        if rows:
            columns = report.columns_of(rows)
            table = {c: [_table_cell(r.get(c)) for r in rows] for c in columns}
            try:
                self.client.log_table(self.parent_run_id, table, "results_table.json")
            except Exception as err:  # pandas missing or an odd column type: fall back to plain JSON
                log.warning("log_table failed (%s); logging the table as JSON", err)
                self.client.log_dict(self.parent_run_id, table, "results_table.json")
        front = report.pareto_front(rows, score_key, memory_key)
        best = report.best_row(rows, score_key)
        tags: dict[str, Any] = {"tokentune.pareto_front": ",".join(str(r.get("trial_id")) for r in front)}
        if best is not None:
            tags["tokentune.best_trial"] = best.get("trial_id")
            _log_metrics(
                self.client,
                self.parent_run_id,
                {f"best/{k}": best.get(k) for k in (score_key, memory_key, "val_loss")},
                None,
            )
        _set_tags(self.client, self.parent_run_id, tags)
        return paths

    def compare_url(self, host_port: str, run_ids: list[str] | None = None) -> str:
        """UI compare view of ``run_ids`` (default: every trial run of this sweep)."""
        ids = run_ids if run_ids is not None else [r.info.run_id for r in self.trial_runs()]
        return compare_url(host_port, ids, self.experiment_id)


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _table_cell(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else value
    return json.dumps(value, default=str) if isinstance(value, (list, dict)) else str(value)


# ------------------------------------------------------------------------------------------ UI
def _base_url(host_port: str) -> str:
    base = host_port.rstrip("/")
    return base if "://" in base else f"http://{base}"


def compare_url(host_port: str, run_ids: list[str], experiment_id: str | list[str]) -> str:
    """The MLflow UI's compare view, e.g. ``http://127.0.0.1:5000/#/compare-runs?runs=[...]&experiments=[...]``."""
    experiments = [experiment_id] if isinstance(experiment_id, str) else list(experiment_id)
    query = urllib.parse.urlencode(
        {"runs": json.dumps(list(run_ids)), "experiments": json.dumps(experiments)},
        quote_via=urllib.parse.quote,
    )
    return f"{_base_url(host_port)}/#/compare-runs?{query}"


def experiment_url(host_port: str, experiment_id: str) -> str:
    """The MLflow UI's runs table of one experiment (MLflow 3's plain experiment page is a GenAI
    overview without runs); the sweep's trials are nested under its parent row."""
    return f"{_base_url(host_port)}/#/experiments/{experiment_id}/runs"


def run_url(host_port: str, experiment_id: str, run_id: str) -> str:
    return f"{_base_url(host_port)}/#/experiments/{experiment_id}/runs/{run_id}"
