"""Copies of the trial folders at a URI storage (``s3://``, ``gs://``, any pyarrow filesystem URI).

    upload_trial(tdir, "s3://bucket/sweeps/my_sweep", trial_id)    # in the trial, after status.json
    fetch_status("s3://bucket/sweeps/my_sweep", trial_id)          # the stored status.json, or None
    download_trials("s3://bucket/sweeps/my_sweep", sweep_dir)      # at the driver: restore missing trials

With a local (or shared, mounted) ``storage`` everything of a sweep is in one folder and none of this
runs. With a URI storage Ray keeps Tune/Train state at the URI, but each trial writes its folder
(``trials/<trial_id>/``) on the local disk of the node Ray placed it on, and the driver keeps its sweep
folder under ``./sweeps/<name>``. So a trial uploads its folder to ``<storage>/<name>/trials/<trial_id>/``
once its ``status.json`` is written, and the driver downloads the trials it lacks (or has only as
failed while the stored copy finished) before it reads them (the results table) and before a resume.
Layout at the URI::

    <storage>/<name>/sweep.yaml                  the resolved spec (for --resume from another machine)
    <storage>/<name>/trials/<trial_id>/...       status.json, events.jsonl, eval.json, run_config.json,
                                                 result.json, final/ (never merged/, checkpoint-*)
    <storage>/<name>/tune/, train/               Ray Tune / Ray Train state (written by Ray)

``status.json`` is a trial's commit point: it is uploaded last and downloaded last (written locally under
a temporary name, then renamed), so a stored or restored folder with a ``status.json`` is complete.
Merged checkpoints (``merged/``, many GB for a 7B model) are not uploaded: they stay on the node that
produced them; the adapter in ``final/`` is uploaded, and a merge can be redone from it. Only what is on
the trial's own node is uploaded: ``final/``, ``run_config.json`` and ``result.json`` are written by the
Ray Train rank-0 worker and ``eval.json`` by the post-trial task, so they are there when those ran on the
same node (``status.json`` holds every train and eval metric either way).

Every function here is best effort: a failure (bad URI, no credentials, network) is logged as a
warning and reported by the return value, never raised, so a sync problem never fails a trial or a sweep.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from orchestrator.results.trial_status import STATUS_FILE, TRIALS_DIR, read_status

log = logging.getLogger(__name__)

#: Top-level names in a trial folder that are never uploaded: merged checkpoints (large; they stay on
#: their node), mid-run training checkpoints (Ray Train already persists them under ``<storage>/train``),
#: Ray Train's per-rank staging folder and half-written files.
DEFAULT_EXCLUDE = ("merged", "merged.tmp", "checkpoint-*", ".ray_stage", "*.tmp")
CHUNK_BYTES = 64 * 1024**2  # as Ray Train's uploads: large chunks for checkpoint-sized files


def is_uri(storage: str | None) -> bool:
    """True for ``s3://...``, ``gs://...``, ``file:///...``; False for a plain folder (or None)."""
    return bool(storage) and "://" in str(storage)


def trial_uri(storage_uri: str, trial_id: str) -> str:
    """Where a trial's folder is stored: ``<storage_uri>/trials/<trial_id>``."""
    return f"{storage_uri.rstrip('/')}/{TRIALS_DIR}/{trial_id}"


# ---- in a trial ----------------------------------------------------------------------------------------
def upload_trial(
    trial_dir: str | Path, storage_uri: str, trial_id: str, exclude: Iterable[str] = DEFAULT_EXCLUDE
) -> bool:
    """Copy ``trial_dir`` to ``<storage_uri>/trials/<trial_id>/``, skipping top-level names that match a
    pattern of ``exclude`` (fnmatch); ``status.json`` goes last. True on success; a failure is logged
    as a warning (the trial's result stands: the driver then only misses this trial's files)."""
    trial_dir = Path(trial_dir)
    patterns = tuple(exclude)
    try:
        import pyarrow.fs as pafs

        fs, root = _resolve(storage_uri)
        dest = _join(root, TRIALS_DIR, trial_id)
        local = pafs.LocalFileSystem()
        entries = sorted(
            (p for p in trial_dir.iterdir() if not any(fnmatch.fnmatch(p.name, pat) for pat in patterns)),
            key=lambda p: p.name == STATUS_FILE,  # the commit point last
        )
        fs.create_dir(dest, recursive=True)
        for p in entries:
            if p.is_dir():
                fs.create_dir(_join(dest, p.name), recursive=True)
            _copy(str(p), _join(dest, p.name), local, fs)
        return True
    except Exception as err:  # noqa: BLE001 - a failed upload must never fail the trial
        log.warning(
            "trial %s: uploading %s to %s failed (the driver will not see this trial's files): %s",
            trial_id,
            trial_dir,
            trial_uri(storage_uri, trial_id),
            _short(err),
        )
        return False


def fetch_status(storage_uri: str, trial_id: str) -> dict[str, Any] | None:
    """The trial's stored ``status.json`` (read into memory, nothing written locally), or None when
    there is none or it cannot be read (logged)."""
    try:
        text = _read(storage_uri, _join(TRIALS_DIR, trial_id, STATUS_FILE))
        return None if text is None else json.loads(text)
    except Exception as err:  # noqa: BLE001 - without it the trial runs (again): slow, not wrong
        log.warning("trial %s: reading its status from %s failed: %s", trial_id, storage_uri, _short(err))
        return None


# ---- at the driver ---------------------------------------------------------------------------------------
def fetch_trial(storage_uri: str, trial_id: str, trial_dir: str | Path) -> bool:
    """Restore ``trial_dir`` from ``<storage_uri>/trials/<trial_id>/`` when the stored copy has a
    ``status.json`` and the local folder has none, or a local ``failed`` one against a stored ``finished``
    one (the trial was retried on another node). A local finished trial is never overwritten. True if
    restored; a failure is logged."""
    trial_dir = Path(trial_dir)
    local = read_status(trial_dir)
    if local is not None and local.get("status") == "finished":
        return False
    try:
        fs, root = _resolve(storage_uri)
        src = _join(root, TRIALS_DIR, trial_id)
        stored = _read(storage_uri, _join(TRIALS_DIR, trial_id, STATUS_FILE))
        if stored is None or not stored_wins(local, json.loads(stored)):
            return False
        _restore(fs, src, trial_dir)
        return True
    except Exception as err:  # noqa: BLE001 - the driver goes on with the trials it has
        log.warning("trial %s: downloading it from %s failed: %s", trial_id, storage_uri, _short(err))
        return False


def download_trials(storage_uri: str, sweep_dir: str | Path) -> list[str]:
    """:func:`fetch_trial` for every trial stored at ``<storage_uri>/trials/`` into
    ``<sweep_dir>/trials/<trial_id>``; returns the restored trial ids (sorted). Failures are logged."""
    trials = Path(sweep_dir) / TRIALS_DIR
    try:
        import pyarrow.fs as pafs

        fs, root = _resolve(storage_uri)
        infos = fs.get_file_info(pafs.FileSelector(_join(root, TRIALS_DIR), allow_not_found=True))
        stored = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)
    except Exception as err:  # noqa: BLE001 - the driver goes on with the trials it has
        log.warning("listing the stored trials at %s failed: %s", storage_uri, _short(err))
        return []
    restored = [t for t in stored if fetch_trial(storage_uri, t, trials / t)]
    if restored:
        log.info("restored %d trial folder(s) from %s", len(restored), storage_uri)
    return restored


# ---- single files (sweep.yaml) ------------------------------------------------------------------------
def upload_file(path: str | Path, storage_uri: str, name: str) -> bool:
    """Copy the local file ``path`` to ``<storage_uri>/<name>``; True on success (a failure is logged)."""
    try:
        import pyarrow.fs as pafs

        fs, root = _resolve(storage_uri)
        dest = _join(root, name)
        fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
        _copy(str(path), dest, pafs.LocalFileSystem(), fs)
        return True
    except Exception as err:  # noqa: BLE001
        log.warning("uploading %s to %s/%s failed: %s", path, storage_uri.rstrip("/"), name, _short(err))
        return False


def read_text(storage_uri: str, name: str) -> str | None:
    """The text of ``<storage_uri>/<name>``, or None when it does not exist or cannot be read (logged)."""
    try:
        return _read(storage_uri, name)
    except Exception as err:  # noqa: BLE001
        log.warning("reading %s/%s failed: %s", storage_uri.rstrip("/"), name, _short(err))
        return None


# ---- helpers ----------------------------------------------------------------------------------------------
def _resolve(storage_uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it), as Ray Train resolves its ``storage_path``."""
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(storage_uri)
    return fs, path.rstrip("/")


def _read(storage_uri: str, name: str) -> str | None:
    import pyarrow.fs as pafs

    fs, root = _resolve(storage_uri)
    path = _join(root, name)
    if fs.get_file_info(path).type != pafs.FileType.File:  # a missing object is no error
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def _copy(src: str, dest: str, src_fs: Any, dest_fs: Any) -> None:
    """A file or a folder (recursively)."""
    import pyarrow.fs as pafs

    # uploads to S3 with threads are unsafe in pyarrow (apache/arrow#32372; Ray Train does the same)
    threads = not (hasattr(pafs, "S3FileSystem") and isinstance(dest_fs, pafs.S3FileSystem))
    pafs.copy_files(
        src,
        dest,
        source_filesystem=src_fs,
        destination_filesystem=dest_fs,
        chunk_size=CHUNK_BYTES,
        use_threads=threads,
    )


def stored_wins(local: dict[str, Any] | None, stored: dict[str, Any]) -> bool:
    """A stored status replaces a missing local one, and a finished one replaces a local unfinished one
    (``finished`` is final: a finished trial never runs again). No clocks compared: nodes may differ."""
    if local is None:
        return True
    return local.get("status") != "finished" and stored.get("status") == "finished"


def _restore(fs: Any, src: str, trial_dir: Path) -> None:
    """Download the stored trial folder ``src`` into ``trial_dir``, ``status.json`` last (renamed into
    place, so a folder with a ``status.json`` is complete)."""
    import pyarrow.fs as pafs

    local = pafs.LocalFileSystem()
    trial_dir.mkdir(parents=True, exist_ok=True)
    for info in fs.get_file_info(pafs.FileSelector(src)):
        if info.base_name == STATUS_FILE:
            continue
        if info.type == pafs.FileType.Directory:
            (trial_dir / info.base_name).mkdir(exist_ok=True)
        _copy(info.path, str(trial_dir / info.base_name), fs, local)
    tmp = trial_dir / (STATUS_FILE + ".download")
    _copy(_join(src, STATUS_FILE), str(tmp), fs, local)
    os.replace(tmp, trial_dir / STATUS_FILE)


def _short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text.splitlines()[0][:500] if text else type(err).__name__
