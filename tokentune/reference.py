"""The settings reference: every run-config section and method's settings with default and help.

The help lives once, on the settings dataclasses (``tokentune.settings.setting``); this module only
renders ``describe()``, as console lines for ``tokentune methods`` (``format_lines`` also renders a sweep
spec's sections for ``tokentune sweep --help-spec``). The README's config tables are
rendered from the same ``docs()`` by ``python -m tools.readme_tables``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tokentune.settings import SettingDoc, describe

#: the run config's method list: a key of its own, not a section
METHODS_KEY = "methods"


def run_config_sections() -> dict[str, type]:
    """The run config's fixed sections (model, data, train, compute, eval) by name."""
    from tokentune.config import SECTIONS

    return dict(SECTIONS)


def method_sections() -> dict[str, type]:
    """Every registered method's settings dataclass by method name."""
    from tokentune.methods import REGISTRY

    return {name: REGISTRY[name].config_cls for name in sorted(REGISTRY)}


def docs(name: str) -> list[SettingDoc]:
    """The settings of a section or method by name (``methods``: the method list itself)."""
    if name == METHODS_KEY:
        from tokentune.config import RunConfig

        field = next(f for f in dataclasses.fields(RunConfig) if f.name == METHODS_KEY)
        help_text = field.metadata.get("help") or (
            "the method list, composed in order (`tokentune methods` lists them and what they combine with)"
        )
        return [SettingDoc(METHODS_KEY, field.default_factory(), str(help_text))]  # type: ignore[misc]
    sections = {**run_config_sections(), **method_sections()}
    if name not in sections:
        raise KeyError(f"no settings section {name!r}; sections: {', '.join(sections)}")
    return describe(sections[name], name)


def format_value(value: Any) -> str:
    """A default as one writes it in YAML or ``--set``: ``null``, ``true``, ``[q_proj, v_proj]``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)


def console_lines(name: str, width: int = 36) -> list[str]:
    """``    lora.rank = 8                  adapter rank`` lines (help aligned; none printed when empty)."""
    return format_lines(docs(name), width)


def format_lines(settings: list[SettingDoc], width: int = 36) -> list[str]:
    """Console lines of any settings' docs (a sweep spec's sections too: ``tokentune sweep --help-spec``)."""
    out = []
    for doc in settings:
        line = f"    {doc.key} = {format_value(doc.default)}"
        out.append(f"{line.ljust(width)}  {doc.help}".rstrip() if doc.help else line)
    return out
