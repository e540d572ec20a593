"""The user-facing error type and its one check helper (a leaf module: imports nothing of ours)."""

from __future__ import annotations

import math
from typing import Any


class ConfigError(ValueError):
    """A user-facing configuration error; the message names the key and the accepted values."""


def check(cond: bool, key: str, value: Any, accepted: str) -> None:
    """Raise ``ConfigError("<key>=<value> is invalid: expected <accepted>")`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{key}={value!r} is invalid: expected {accepted}")


def is_int(v: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


#: the largest expanded size (``expanded_size``) a config or spec file may have: ~1 MB of YAML text
MAX_EXPANDED_SIZE = 1_000_000


def expanded_size(data: Any, limit: int = MAX_EXPANDED_SIZE) -> int:
    """The size of ``data`` with YAML aliases expanded (one per list item, mapping key and value, plus
    the characters of each string), counted only up to just past ``limit``: an alias bomb that shares
    one list a billion times is never expanded, and a self-referencing structure stops at the limit."""
    size, stack = 0, [data]
    while stack and size <= limit:
        item = stack.pop()
        size += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, (str, bytes)):
            size += len(item)
    return size


def check_expanded_size(data: Any, what: str, limit: int = MAX_EXPANDED_SIZE) -> None:
    """Refuse ``data`` (read from ``what``, e.g. ``config file 'x.yaml'``) whose expanded size is over
    ``limit``, before anything formats it: ``str()`` of an alias bomb would need gigabytes."""
    if expanded_size(data, limit) > limit:
        raise ConfigError(
            f"{what} is too large once its YAML aliases (*name) are expanded: over {limit:,} items and "
            "characters (the limit; an alias bomb?); write it without nested aliases, at most ~1 MB expanded"
        )
