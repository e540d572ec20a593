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
