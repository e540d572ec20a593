"""State and result files that survive a kill or a full disk: atomic writes, tolerant JSONL reads.

A file is written to a temporary name in the same folder and renamed over the target
(``os.replace`` is atomic on POSIX), so a reader sees the old file or the new one, never half of
one. Append-only JSONL logs (events, Train reports) can end in a torn line when the writer is
killed mid-write: readers skip that last line with a warning instead of failing every later
attempt. A bad line anywhere else is real corruption and raises, unless the reader asks to skip it
(``read_jsonl(..., skip_corrupt=True)``, for logs that only inform).

No write follows a link: a state file that is a symbolic link (or, opened in place, a hard link or
not a regular file) is refused with :class:`UnsafeFile` naming it, so a link planted in a sweep folder
can never make us truncate or overwrite the file it points to. The temporary file is created
exclusively under an unpredictable name, and the rename replaces the entry itself. Imports only
``tokentune.errors``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from tokentune.errors import ConfigError

log = logging.getLogger(__name__)
NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)


class UnsafeFile(ConfigError):
    """A state or result file is a link (or not a regular file): it is never written through."""


def refuse_link(path: str | Path) -> Path:
    """``path``, unless it is a symbolic link: then :class:`UnsafeFile` naming it and its target."""
    path = Path(path)
    if path.is_symlink():
        raise UnsafeFile(
            f"{path} is a symbolic link (to {os.readlink(path)}) where a regular file is expected: "
            "refusing to write through it; remove the link (and check who made it)"
        )
    return path


def open_in_place(path: str | Path, flags: int, mode: int = 0o666) -> int:
    """``os.open`` of a state file that is written in place (a lock, an append-only log), never through a
    link: a symbolic link, a hard-linked file or anything but a regular file is :class:`UnsafeFile`."""
    path = refuse_link(path)
    try:
        fd = os.open(path, flags | NO_FOLLOW, mode)
    except OSError:
        refuse_link(path)  # made a link meanwhile: say so
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"hard-linked ({st.st_nlink} names)"
        raise UnsafeFile(f"{path} is {what} where a file of its own is expected: remove it")
    return fd


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a new temporary file in the same folder and a rename; a
    ``path`` that is a symbolic link is refused (:class:`UnsafeFile`)."""
    path = refuse_link(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NO_FOLLOW, 0o666)  # never an existing file
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, as :func:`write_bytes_atomic`."""
    return write_bytes_atomic(path, text.encode("utf-8"))


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
    with os.fdopen(open_in_place(path, os.O_RDWR | os.O_CREAT | os.O_APPEND), "a+b") as f:
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
