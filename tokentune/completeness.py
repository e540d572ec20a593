"""When a folder a run wrote is complete, and what happens to one that is not.

A run can be killed, or its disk fill, while it writes. A checkpoint is complete once its ``state.json``
(the step and the config hash) is written, last; ``final/`` once its ``complete.json`` (each file's size),
written last, matches its files. A ``final/`` written before the marker existed counts as complete when
its config and weights files read back. :func:`set_aside_incomplete` renames the others to
``<name>.incomplete[-N]`` (kept for inspection, never resumed from).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from tokentune.files import write_json_atomic

COMPLETE = "complete.json"  # written last into final/: its files and their sizes
STATE = "state.json"  # written last into a checkpoint: the step and the config hash
INCOMPLETE = ".incomplete"  # the suffix of a half-written checkpoint or final/ that was set aside


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_complete_marker(folder: Path) -> None:
    """Write ``complete.json`` (each file's size) into ``folder``, last: its contents are complete."""
    files = {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}
    files.pop(COMPLETE, None)
    write_json_atomic(folder / COMPLETE, {"files": files})


def final_complete(folder: str | Path) -> bool:
    """Whether ``final/`` was written to the end: its ``complete.json`` lists files that all exist with
    those sizes. Without the marker (written before it existed): its ``adapter_config.json`` or
    ``config.json`` and a weights file read back."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    marker = _read_json(folder / COMPLETE)
    if marker is not None:
        files = marker.get("files") if isinstance(marker, dict) else None
        return isinstance(files, dict) and all(
            (folder / name).is_file() and (folder / name).stat().st_size == size
            for name, size in files.items()
        )
    if (folder / COMPLETE).exists():  # a marker that does not read: torn
        return False
    config = _read_json(folder / "adapter_config.json") or _read_json(folder / "config.json")
    return config is not None and _weights_read(folder)


def _weights_read(folder: Path) -> bool:
    """A safetensors weights file whose header and tensors read, or a non-empty ``.bin`` (legacy)."""
    tensors = sorted(folder.glob("*.safetensors"))
    if not tensors:
        return any(f.stat().st_size > 0 for f in folder.glob("*.bin"))
    try:
        from safetensors.torch import load_file

        for f in tensors:
            load_file(str(f))
    except Exception:  # noqa: BLE001 - truncated or corrupt: any reader error means incomplete
        return False
    return True


def checkpoint_complete(path: str | Path) -> bool:
    """Whether ``checkpoint-*/`` was written to the end: its ``state.json`` (written last) reads and has
    the step. Checkpoints from before config hashes had it too: the same rule holds for them."""
    meta = _read_json(Path(path) / STATE)
    return isinstance(meta, dict) and isinstance(meta.get("step"), int)


def set_aside_incomplete(out_dir: str | Path) -> list[Path]:
    """Rename every incomplete ``checkpoint-*`` and an incomplete ``final/`` in ``out_dir`` to
    ``<name>.incomplete[-N]`` (kept for inspection, never resumed from), warning for each; returns the
    new paths."""
    out_dir = Path(out_dir)
    found = [p for p in sorted(out_dir.glob("checkpoint-*")) if p.is_dir() and INCOMPLETE not in p.name]
    bad = [p for p in found if not checkpoint_complete(p)]
    if (out_dir / "final").is_dir() and not final_complete(out_dir / "final"):
        bad.append(out_dir / "final")
    moved = []
    for p in bad:
        target, n = p.with_name(p.name + INCOMPLETE), 1
        while target.exists():
            n += 1
            target = p.with_name(f"{p.name}{INCOMPLETE}-{n}")
        p.rename(target)
        what = f"no {STATE}" if p.name != "final" else f"no valid {COMPLETE}"
        warnings.warn(
            f"{p} is incomplete ({what}: its writer was interrupted); set aside as {target.name}",
            stacklevel=2,
        )
        moved.append(target)
    return moved
