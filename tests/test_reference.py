"""Settings are documented once: the README's config tables are generated from the settings dataclasses'
defaults and help (``python -m tools.readme_tables``), list every section and method of the run config and
every settings section of a sweep spec, and are up to date."""

from __future__ import annotations

import re
from pathlib import Path

from orchestrator.spec.sections import SECTIONS as SPEC_SECTIONS
from orchestrator.spec.sections import section_docs
from tokentune import reference
from tokentune.config import SECTIONS
from tokentune.methods import REGISTRY
from tokentune.settings import describe
from tools import readme_tables

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_settings_tables_are_up_to_date():
    text = README.read_text()
    assert readme_tables.render(text) == text, (
        "README settings tables are stale: run `python -m tools.readme_tables`"
    )


def test_readme_lists_every_section_and_method():
    listed = readme_tables.documented_sections(README.read_text())
    missing = ({"methods"} | set(SECTIONS) | set(REGISTRY) | set(SPEC_SECTIONS)) - listed
    assert not missing, f"add {sorted(missing)} to a `<!-- settings: ... -->` table in README.md"


def test_every_key_with_its_default_is_in_the_readme():
    """Independent of the renderer: each dataclass field's key and YAML-style default appear in a row."""
    rows = [line for line in README.read_text().splitlines() if line.startswith("| `")]
    cells = {}
    for row in rows:
        keys, default = row.split(" | ")[:2]
        for key in re.findall(r"`([\w.]+)`", keys):
            cells[key] = default.strip().strip("`")
    run_config = {**SECTIONS, **{n: REGISTRY[n].config_cls for n in REGISTRY}}
    documented = [d for name, cls in run_config.items() for d in describe(cls, name)]
    documented += [d for name in SPEC_SECTIONS for d in section_docs(name)]
    for doc in documented:
        assert doc.key in cells, f"{doc.key} is not in README.md"
        assert cells[doc.key] == reference.format_value(doc.default), doc.key
    assert (
        cells["lora.rank"] == "8" and cells["model.name_or_path"] == "null" and cells["train.lr"] == "0.001"
    )
    assert cells["after_trial.action"] == "merge+eval" and cells["tune.max_memory_gb"] == "null"
    assert cells["tune.scheduler.type"] == "fifo" and "tune.scheduler" not in cells  # documented as a section


def test_check_mode_reports_stale_tables(tmp_path, capsys):
    stale = tmp_path / "README.md"
    stale.write_text("x\n<!-- settings: lora -->\n| old |\n<!-- /settings -->\n")
    assert readme_tables.main([str(stale), "--check"]) == 1
    assert readme_tables.main([str(stale)]) == 0 and readme_tables.main([str(stale), "--check"]) == 0
    assert "| `lora.rank` | `8` |" in stale.read_text()


def test_check_mode_reports_a_stale_spec_table(tmp_path):
    stale = tmp_path / "README.md"
    stale.write_text(
        "x\n<!-- settings: tune.scheduler after_trial -->\n| `after_trial.merge` | `true` |\n<!-- /settings -->\n"
    )
    assert readme_tables.main([str(stale), "--check"]) == 1
    assert readme_tables.main([str(stale)]) == 0 and readme_tables.main([str(stale), "--check"]) == 0
    text = stale.read_text()
    assert "| `after_trial.action` | `merge+eval` |" in text and "`tune.scheduler.grace_period`" in text
    assert "after_trial.merge" not in text
