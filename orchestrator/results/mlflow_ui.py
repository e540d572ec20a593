"""Where a sweep lands in the MLflow UI: the experiment kind, the parent run's description, the URLs.

MLflow 3.17's UI opens an experiment in its GenAI view (traces, "no data"): its GenAI / Model
training switch defaults to GenAI and only the URL's ``workflowType`` overrides it (the experiment
tag alone does not, checked in tests/test_mlflow_ui.py). So a sweep's experiment is tagged as model
development (``KIND_TAGS``, shown in the experiment list), the URLs here carry
``workflowType=machine_learning``, its parent run gets a description (``mlflow.note.content``: the
results table and the best trial), and the sweep prints the compare view of its trials, served by
``mlflow ui`` on 127.0.0.1 (``DEFAULT_UI``).
"""

from __future__ import annotations

import json
import shlex
import urllib.parse

#: ``mlflow ui``'s default address (it binds to localhost)
DEFAULT_UI = "http://127.0.0.1:5000"
#: the experiment tag MLflow 3's UI reads to open the runs table instead of the GenAI overview
KIND_TAGS = {"mlflow.experimentKind": "custom_model_development"}
DESCRIPTION_TAG = "mlflow.note.content"
MODEL_TRAINING = "workflowType=machine_learning"


def experiment_url(base: str, experiment_id: str) -> str:
    """The experiment's page in the UI's model-training view (it opens on the runs table)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}?{MODEL_TRAINING}"


def runs_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table; the sweep's trials are nested under its parent row."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{MODEL_TRAINING}"


def compare_url(base: str, run_ids: list[str], experiment_id: str) -> str:
    """The compare view of ``run_ids``: ``<base>/#/compare-runs?runs=[...]&experiments=[...]``."""
    query = urllib.parse.urlencode(
        {"runs": json.dumps(list(run_ids)), "experiments": json.dumps([experiment_id])},
        quote_via=urllib.parse.quote,
    )
    return f"{base.rstrip('/')}/#/compare-runs?{query}&{MODEL_TRAINING}"


def ui_base(tracking_uri: str) -> str:
    """The UI's address: the tracking server itself, or ``mlflow ui``'s default for a local store."""
    return tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else DEFAULT_UI


def serve_hint(tracking_uri: str) -> str:
    """How to open the UI for this store (nothing to start for a tracking server); the command is
    shell-quoted (``shlex.quote``): a path with spaces or ``$`` pastes into a shell as it is."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)} --host 127.0.0.1"


def artifact_link(experiment_id: str, run_id: str, path: str) -> str:
    """A markdown link, for a run's description, to an artifact of ``run_id`` (the UI's run page)."""
    return f"[{path}](#/experiments/{experiment_id}/runs/{run_id}/artifactPath/{urllib.parse.quote(path)})"


def sweep_description(name: str, table: str, best_line: str, more: str = "") -> str:
    """The parent run's description (markdown): the best trial, the results table (fenced), and ``more``
    (what the table leaves out and where the full one is)."""
    tail = f"{more}\n" if more else ""
    return f"**Sweep `{name}`**\n\n{best_line or 'no trial has a score'}\n\n```\n{table}\n```\n{tail}"
