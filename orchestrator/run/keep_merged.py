"""Disk used by merged checkpoints during a sweep (``after_trial.keep_merged: best``).

A merged checkpoint is as large as the base model (13 GB for a 7B model in bf16), one per trial:
``prune_beaten`` deletes each one that has been evaluated and is beaten by another evaluated trial, as
soon as a trial's evaluation finishes, so a sweep holds about one merged model plus those being
evaluated. What a trial's merge wrote is its ``disk/merged_gb`` metric (``folder_gb``). The end of the
sweep still prunes by the final best trial (``post_trial.prune_merged``). A leaf module: no Ray.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from orchestrator.results.best import number


def folder_gb(path: str | Path) -> float:
    """Bytes of the files under ``path`` (links not followed), in GB; 0 for a missing folder."""
    files = (p for p in Path(path).rglob("*") if p.is_file() and not p.is_symlink())
    return sum(p.stat().st_size for p in files) / 1024**3


def evaluated_value(trial_dir: Path, metric: str) -> float | None:
    """``metric`` from the trial's ``eval.json`` when its evaluation finished without error, else None."""
    try:
        data = json.loads((trial_dir / "eval.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("error"):
        return None
    return number((data.get("metrics") or {}).get(metric))


def prune_beaten(trials_dir: str | Path, metric: str, mode: str) -> list[Path]:
    """Delete ``<trials_dir>/*/merged`` of every evaluated trial that another evaluated trial beats on
    ``metric`` (``mode`` max or min); returns the deleted folders.

    Only trials whose ``eval.json`` holds ``metric`` take part (an evaluation still running, failed or
    scoring another metric keeps its checkpoint); every trial with the best value keeps its own (ties).
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode={mode!r} is invalid: expected max or min")
    scored = {}
    for trial in sorted(Path(trials_dir).iterdir()) if Path(trials_dir).is_dir() else []:
        value = evaluated_value(trial, metric)
        if value is not None:
            scored[trial] = value if mode == "max" else -value
    if not scored:
        return []
    best = max(scored.values())
    deleted = []
    for trial, value in scored.items():
        merged = trial / "merged"
        if value < best and merged.is_dir() and not merged.is_symlink():
            shutil.rmtree(merged, ignore_errors=True)
            deleted.append(merged)
    return deleted
