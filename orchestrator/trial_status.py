"""A trial's folder and the two files that record its life (no Ray: the driver, the tuner and the
storage sync read them too).

    <sweep_dir>/trials/<trial_id>/status.json    {"status": "finished" | "failed", ...}: the commit point
    <sweep_dir>/trials/<trial_id>/events.jsonl   one line per event (``train started``, ...)

``status.json`` is written under a temporary name and renamed into place, so a folder that has one
holds a complete record. Both files pass through ``orchestrator.redaction`` first: an error or a
traceback that quotes a token, a key or a URL password is stored masked.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from orchestrator.redaction import redact
from tokentune.files import append_jsonl, write_json_atomic

TRIALS_DIR = "trials"
STATUS_FILE = "status.json"
EVENTS_FILE = "events.jsonl"


def trial_dir(sweep_dir: str | Path, trial_id: str) -> Path:
    """A trial's folder: ``<sweep_dir>/trials/<trial_id>``."""
    return Path(sweep_dir) / TRIALS_DIR / trial_id


def read_status(path: str | Path) -> dict[str, Any] | None:
    """``status.json`` of a trial folder, or None."""
    p = Path(path) / STATUS_FILE
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def write_status(path: Path, status: str, **info: Any) -> None:
    """Write ``status.json`` (atomically, redacted) with ``status``, the time and ``info``."""
    write_json_atomic(path / STATUS_FILE, redact({"status": status, "time": time.time(), **info}))


def log_event(path: Path, event: str, **info: Any) -> None:
    """Append ``event`` (with the time, this process's id and ``info``) to ``events.jsonl``."""
    row = {"event": event, "time": time.time(), "pid": os.getpid(), **info}
    append_jsonl(path / EVENTS_FILE, redact(row))
