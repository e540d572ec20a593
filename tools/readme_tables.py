"""The README's settings tables, generated from the settings dataclasses' defaults and help.

The README marks each generated table with the sections it lists (a run config's sections and methods,
or a sweep spec's sections such as ``tune.scheduler``)::

    <!-- settings: model data train -->
    | key | default | meaning |
    ...
    <!-- /settings -->

``python -m tools.readme_tables`` rewrites those tables in place (``--check``: exit 1 if they are out
of date); ``tests/test_reference.py`` fails when they are.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from orchestrator.spec.sections import SECTIONS as SPEC_SECTIONS
from orchestrator.spec.sections import section_docs
from tokentune.reference import docs, format_value
from tokentune.settings import SettingDoc

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"(<!-- settings: (?P<names>[\w. ]+?) -->\n)(?P<body>.*?)(<!-- /settings -->)", re.DOTALL)


def settings_docs(name: str) -> list[SettingDoc]:
    """A sweep spec section's settings (``tune``, ``tune.scheduler`` ...), else a run config section's or a
    method's."""
    return section_docs(name) if name in SPEC_SECTIONS else docs(name)


def markdown_table(names: list[str]) -> str:
    """One table of the named sections; keys with the same name, default and help in several sections
    share a row (``lora.rank`` / ``dora.rank``)."""
    rows: dict[tuple[str, str, str], list[str]] = {}
    for name in names:
        for doc in settings_docs(name):
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
        prog="python -m tools.readme_tables",
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
