"""``objective``: one ``{metric, mode}`` mapping (one objective, as always), or a list of them (several:
the sweep searches and marks their Pareto front over every listed metric)."""

from __future__ import annotations

from typing import Any

from orchestrator.spec.parts import SpecError
from orchestrator.spec.sections import Objective, parse_section


def parse_objectives(value: Any) -> tuple[Objective, ...]:
    """``objective``: one mapping (one objective, as always), or a list of ``{metric, mode}`` (several:
    the sweep searches and marks their Pareto front). A list item is named ``objective[i].key``; a list
    is refused when empty or when it names a metric twice."""
    if not isinstance(value, list):
        return (parse_section("objective", value, Objective),)
    if not value:
        raise SpecError("objective", "empty list: expected {metric, mode} or a list of one or more of them")
    objectives: list[Objective] = []
    for i, item in enumerate(value):
        where = f"objective[{i}]"
        if isinstance(item, dict) and "memory_budget_gb" in item:
            raise SpecError(
                f"{where}.memory_budget_gb",
                "a budget is not an objective: write tune: {max_memory_gb: <GB per worker>} (trials estimated "
                "above it are skipped before launch)",
            )
        if isinstance(item, dict) and set(item) - {"metric", "mode"}:
            key = sorted(set(item) - {"metric", "mode"})[0]
            raise SpecError(
                f"{where}.{key}", "unknown key; accepted keys in an objective list item: metric, mode"
            )
        if not isinstance(item, dict) or "metric" not in item:
            raise SpecError(where, f"{item!r} is invalid: expected {{metric: <name>, mode: min | max}}")
        if "mode" not in item:
            raise SpecError(f"{where}.mode", "missing: a list item says min or max for its metric")
        try:
            objectives.append(parse_section("objective", item, Objective))
        except SpecError as e:
            raise SpecError(e.key.replace("objective", where, 1), str(e).split(": ", 1)[1]) from None
        if item["metric"] in [o.metric for o in objectives[:-1]]:
            raise SpecError(f"{where}.metric", f"{item['metric']!r} is listed twice: list each metric once")
    return tuple(objectives)
