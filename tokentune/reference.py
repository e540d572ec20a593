"""The settings reference: every run-config section and method's settings with default and help.

The help lives once, on the settings dataclasses (``tokentune.settings.setting``); this module only
renders ``describe()``: as console lines for ``tokentune methods`` and as the README's config tables.
The README marks each generated table with the sections it lists::

    <!-- settings: model data train -->
    | key | default | meaning |
    ...
    <!-- /settings -->

``python -m tokentune.reference`` rewrites those tables in place (``--check``: exit 1 if they are out
of date); ``tests/test_reference.py`` fails when they are.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path
from typing import Any

from tokentune.settings import SettingDoc, describe

README = Path(__file__).resolve().parent.parent / "README.md"
#: the run config's method list: a key of its own, not a section
METHODS_KEY = "methods"
_BLOCK = re.compile(r"(<!-- settings: (?P<names>[\w ]+?) -->\n)(?P<body>.*?)(<!-- /settings -->)", re.DOTALL)


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
    out = []
    for doc in docs(name):
        line = f"    {doc.key} = {format_value(doc.default)}"
        out.append(f"{line.ljust(width)}  {doc.help}".rstrip() if doc.help else line)
    return out


def markdown_table(names: list[str]) -> str:
    """One table of the named sections; keys with the same name, default and help in several sections
    share a row (``lora.rank`` / ``dora.rank``)."""
    rows: dict[tuple[str, str, str], list[str]] = {}
    for name in names:
        for doc in docs(name):
            field = doc.key.rsplit(".", 1)[-1]
            rows.setdefault((field, format_value(doc.default), doc.help), []).append(doc.key)
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for (_, default, help_text), keys in rows.items():
        cell = " / ".join(f"`{k}`" for k in keys)
        meaning = help_text.replace("|", r"\|")
        lines.append(f"| {cell} | `{default}` | {meaning} |")
    return "\n".join(lines) + "\n"


def render(text: str) -> str:
    """``text`` (the README) with every settings table regenerated."""
    return _BLOCK.sub(lambda m: m[1] + markdown_table(m["names"].split()) + m[4], text)


def documented_sections(text: str) -> set[str]:
    """The section names the README's settings tables list."""
    return {name for m in _BLOCK.finditer(text) for name in m["names"].split()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tokentune.reference",
        description="Regenerate the README's settings tables from the settings dataclasses' help.",
    )
    parser.add_argument("path", nargs="?", default=str(README), help="the README (default: the repo's)")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a table is out of date; write nothing"
    )
    args = parser.parse_args(argv)
    path = Path(args.path)
    text = path.read_text()
    new = render(text)
    if args.check:
        print("up to date" if new == text else f"{path}: settings tables out of date")
        return 0 if new == text else 1
    path.write_text(new)
    print(f"{path}: {len(_BLOCK.findall(new))} settings tables written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
