"""Settings dataclasses: each field carries its help text; sections are built from mappings.

    @dataclass
    class LoraSettings:
        rank: int = setting(8, "adapter rank r")

``describe(cls)`` lists a section's fields with defaults and help (``tokentune methods`` prints it, and
a test checks the README's config tables against it); ``build_section`` turns a YAML mapping into the
dataclass, naming unknown keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from tokentune.errors import ConfigError


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None) -> Any:  # noqa: A002
    """A dataclass field with its help text (``factory`` for mutable defaults)."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


class UnknownKeyError(ConfigError):
    """A key a settings section does not have; ``key`` is ``section.key``, ``accepted`` the section's keys."""

    def __init__(self, section: str, key: str, accepted: list[str]) -> None:
        self.key = f"{section}.{key}"
        self.accepted = accepted
        super().__init__(
            f"unknown config key '{self.key}'; accepted keys in {section}: {', '.join(accepted)}"
        )


@dataclass(frozen=True)
class SettingDoc:
    key: str  # ``section.field``
    default: Any
    help: str


def describe(cls: type, section: str) -> list[SettingDoc]:
    """One ``SettingDoc`` per field of a settings dataclass, in declaration order."""
    out = []
    for f in fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        out.append(SettingDoc(f"{section}.{f.name}", default, str(f.metadata.get("help", ""))))
    return out


def build_section(name: str, cls: type, value: Any) -> Any:
    """Build one section dataclass from a mapping (or pass a built one through), naming unknown keys
    (``UnknownKeyError``); the dataclass's ``__post_init__`` checks the values."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {value!r}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise UnknownKeyError(name, unknown[0], sorted(names))
    try:
        return cls(**value)
    except TypeError as e:  # wrong types that slipped through (e.g. a number where a list goes)
        key = _type_error_key(cls, value)
        if key is None:
            raise ConfigError(f"{name}: {e}") from e
        expected = next(f.type for f in fields(cls) if f.name == key)
        raise ConfigError(f"{name}.{key}={value[key]!r} is invalid: expected {expected} ({e})") from e


def _type_error_key(cls: type, value: dict[str, Any]) -> str | None:
    """The key whose value alone makes ``cls(...)`` raise ``TypeError`` (the others at their defaults)."""
    for key, v in value.items():
        try:
            cls(**{key: v})
        except TypeError:
            return key
        except Exception:  # noqa: BLE001 - another error of this value: not the type error's key
            continue
    return None
