"""A trial's folder and the two files that record its life (no Ray: the driver, the tuner and the
storage sync read them too).

    <sweep_dir>/trials/<trial_id>/status.json    {"status": "finished" | "failed", ...}: the commit point
    <sweep_dir>/trials/<trial_id>/events.jsonl   one line per event (``train started``, ...)

The events time a trial's phases (``PHASES``, in order; ``phase_durations`` turns the last attempt's
events into seconds per phase): the trial driver writes ``trial started``, ``train queued``,
``waiting for a train slot`` (only when it had to), ``train started``,
``train finished``, ``post-trial started``, ``post-trial queued`` (``queue``: merges waiting ahead,
``orchestrator.run.post_pool``), ``post-trial dispatched``, ``post-trial finished``, ``logged`` (or ``failed``); rank 0 of the
Train workers ``workers_ready``, ``model_loaded``, ``first_step``, ``last_step``, ``final_saved``,
``checkpoint_reported``; the merge + eval task ``merge_started``/``finished``, ``eval_started``/``finished``.

``status.json`` is written under a temporary name and renamed into place, so a folder that has one
holds a complete record. Both files pass through ``tokentune.redact`` first: an error or a
traceback that quotes a token, a key or a URL password is stored masked.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from tokentune.files import append_jsonl, write_json_atomic
from tokentune.redact import redact

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
    append_jsonl(Path(path) / EVENTS_FILE, redact(row))


def last_event(path: str | Path) -> str | None:
    """The name of the trial's last event (``events.jsonl``'s last line), or None."""
    try:
        with open(Path(path) / EVENTS_FILE, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            return json.loads(f.read().splitlines()[-1]).get("event")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


#: the events of one trial attempt, in the order they happen (post-trial ones only with after_trial)
PHASES = (
    "trial started", "train queued", "train started", "workers_ready", "model_loaded", "first_step", "last_step",
    "final_saved", "checkpoint_reported", "train finished", "post-trial started", "post-trial queued",
    "post-trial dispatched", "merge_started",
    "merge_finished", "eval_started", "eval_finished", "post-trial finished", "logged",
)  # fmt: skip
#: seconds between two events: ``phase/<name>_s``
SPANS = {
    "queued": ("train queued", "train started"),  # waiting for a training slot (orchestrator.run.slots)
    "start": ("train started", "workers_ready"),  # Ray Train controller + worker group + imports
    "load": ("workers_ready", "model_loaded"),  # model, tokenizer, methods
    "first_step": ("model_loaded", "first_step"),  # data, optimizer, engine, the first step
    "train": ("first_step", "last_step"),  # the training steps after the first
    "save": ("last_step", "checkpoint_reported"),  # final adapter, report to Ray storage
    "train_exit": ("checkpoint_reported", "train finished"),  # worker group shutdown
    "post_queued": ("post-trial started", "post-trial dispatched"),  # waiting for resources / a warm worker
    "post_start": ("post-trial started", "merge_started"),  # the merge + eval task's start (queue included)
    "merge": ("merge_started", "merge_finished"),
    "eval": ("eval_started", "eval_finished"),
    "post_exit": ("eval_finished", "post-trial finished"),
    "trial": ("trial started", "post-trial finished"),
}


def phase_durations(path: str | Path) -> dict[str, float]:
    """``phase/<span>_s`` of the trial's last attempt (the events after its last ``trial started``),
    plus ``phase/overhead_s`` = trial wall - training steps - waiting for a slot; spans whose events are
    missing are left out. Informative only: a corrupt line is skipped with a warning naming file and line,
    and an event without a numeric time is ignored, so no trial's result depends on this log."""
    from tokentune.files import read_jsonl

    events = read_jsonl(Path(path) / EVENTS_FILE, skip_corrupt=True)  # a bad line: skipped, with a warning
    starts = [i for i, e in enumerate(events) if e.get("event") == "trial started"]
    last: dict[str, float] = {}
    for e in events[starts[-1] if starts else 0 :]:
        if isinstance(e.get("time"), (int, float)) and isinstance(e.get("event"), str):
            last[e["event"]] = float(e["time"])
    if "post-trial finished" not in last and "train finished" in last:
        last["post-trial finished"] = last["train finished"]  # no after_trial: training ends the trial
    out = {f"phase/{k}_s": last[b] - last[a] for k, (a, b) in SPANS.items() if a in last and b in last}
    if "phase/trial_s" in out and "phase/train_s" in out:  # waiting for a slot is not a trial's cost
        out["phase/overhead_s"] = out["phase/trial_s"] - out["phase/train_s"] - out.get("phase/queued_s", 0.0)
    return out
