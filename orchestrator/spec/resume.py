"""What ``--resume`` continues, decided from the stored spec and the given one (no Ray, no MLflow).

A resumed sweep runs the spec stored with it (``sweep.yaml``): what it trains never changes. Only the
settings that say *where* it lives (``WHERE_KEYS``: ``storage`` and ``tracking.uri``) may be given anew,
with ``--set`` (a moved folder, a new tracking server); those given values are used. Every other key the
given spec changes is named in one warning, with the value that is used (the stored one).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.spec.parts import SpecError

WHERE_KEYS = ("storage", "tracking.uri")  # say where the sweep's files and runs are, not what is trained
SPEC_FILE = "sweep.yaml"


def where_overrides(overrides: list[str] | Mapping[str, Any] | None) -> list[str]:
    """The ``--set`` items (``key=value``) of ``overrides`` that set a ``WHERE_KEYS`` key."""
    if not overrides:
        return []
    items = [f"{k}={v}" for k, v in overrides.items()] if isinstance(overrides, Mapping) else list(overrides)
    return [s for s in items if s.partition("=")[0].strip() in WHERE_KEYS]


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def resume_differences(stored: Mapping[str, Any], given: Mapping[str, Any], used: Mapping[str, Any]) -> str:
    """One line naming each key whose value differs between the ``stored`` and the ``given`` spec
    (``to_dict()`` forms) and which value the resumed sweep uses (``used``); "" when none differ."""
    s, g, u = flatten(stored), flatten(given), flatten(used)
    keys = sorted(k for k in set(s) | set(g) if k != "name" and s.get(k) != g.get(k))
    parts = []
    for k in keys:
        if u.get(k) == g.get(k):
            parts.append(f"{k}: the given {g.get(k)!r} is used (stored {s.get(k)!r})")
        else:
            parts.append(f"{k}: the stored {s.get(k)!r} is used (given {g.get(k)!r} is ignored)")
    return "; ".join(parts)


def never_ran_error(name: str, storage: str, sweep_dir: str | Path, remote: str | None) -> SpecError:
    """``--resume`` of a sweep with no stored ``sweep.yaml``: an error naming the sweeps that exist."""
    where = f"{sweep_dir}" + (f" nor at {remote}" if remote else "")
    found = existing_sweeps(Path(sweep_dir).parent)
    listed = ", ".join(found[:20]) + (f" (and {len(found) - 20} more)" if len(found) > 20 else "")
    return SpecError(
        "name",
        f"--resume: sweep {name!r} never ran here (no {SPEC_FILE} in {where}); sweeps in {storage}: "
        f"{listed or 'none'}. Resume one of those (--name), or start this one without --resume",
    )


def existing_sweeps(root: str | Path) -> list[str]:
    """The names of the sweep folders under ``root`` (those holding a ``sweep.yaml``)."""
    try:
        return sorted(p.name for p in Path(root).iterdir() if (p / SPEC_FILE).is_file())
    except OSError:
        return []
