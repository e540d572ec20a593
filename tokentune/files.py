"""State and result files that survive a kill or a full disk: atomic writes, tolerant JSONL reads.

A file is written to a temporary name in the same folder and renamed over the target
(``os.replace`` is atomic on POSIX), so a reader sees the old file or the new one, never half of
one. Append-only JSONL logs (events, Train reports) can end in a torn line when the writer is
killed mid-write: readers skip that last line with a warning instead of failing every later
attempt. A bad line anywhere else is real corruption and raises, unless the reader asks to skip it
(``read_jsonl(..., skip_corrupt=True)``, for logs that only inform). A leaf module.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | Path, obj: Any, default: Any = str) -> Path:
    """``obj`` as indented JSON, written atomically (``default`` serialises the rest)."""
    return write_text_atomic(path, json.dumps(obj, indent=2, default=default) + "\n")


def append_jsonl(path: str | Path, row: dict[str, Any]) -> None:
    """Append one JSON row (non-finite floats as null, so every line is valid JSON).

    A torn last line (its writer was killed) is cut off first: it was never a complete row, and the
    new row must not be glued onto it. So a torn line is only ever the last one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    with path.open("a+b") as f:
        _cut_torn_tail(f, path)
        f.write((json.dumps(clean, default=str) + "\n").encode())


def _cut_torn_tail(f: Any, path: Path) -> None:
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        return
    f.seek(size - 1)
    if f.read(1) == b"\n":
        return
    f.seek(0)
    data = f.read()
    keep = data.rfind(b"\n") + 1
    log.warning("%s: cutting a torn last line (%d bytes) before appending", path, size - keep)
    f.truncate(keep)
    f.seek(keep)


def read_jsonl(path: str | Path, skip_corrupt: bool = False) -> list[dict[str, Any]]:
    """The rows of a JSONL file ([] when missing); a torn last line is skipped with a warning.

    ``skip_corrupt``: a bad line anywhere (not JSON, not an object, not UTF-8) is skipped with a warning
    naming the file and the line, for logs that only inform (a trial's ``events.jsonl``); otherwise a
    bad line that is not the last raises ``ValueError``.
    """
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes().split(b"\n")
    lines = [(i, line) for i, line in enumerate(raw, 1) if line.strip()]
    rows = []
    for k, (i, line) in enumerate(lines):
        try:
            row = json.loads(line.decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None
        if isinstance(row, dict) or (row is not None and not skip_corrupt):
            rows.append(row)
        elif k == len(lines) - 1:
            log.warning("%s: skipping a torn last line %d (its writer was interrupted)", path, i)
        elif skip_corrupt:
            log.warning("%s: skipping line %d: not a valid JSON object (the file is corrupt there)", path, i)
        else:
            raise ValueError(f"{path}: line {i} is not valid JSON (the file is corrupt)")
    return rows
