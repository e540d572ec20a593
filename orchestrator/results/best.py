"""Which trials are best: the one rule the console, the results files, the MLflow tags, the parent run's
description and ``run_sweep``'s return value all use.

A *goal* is ``(metric, mode)``, mode ``max`` or ``min``. A sweep's objective is one goal
(``objective.metric``, ``objective.mode``) or, listed, several (``SweepSpec.goals``: a Pareto front over
them); both go through the same functions, and with several the best trial is the front's best by the
first listed goal::

    best_trial(rows, [("eval/score", "max")])                              # a finished row, or None
    best_trials(rows, [("eval/score", "max"), ("memory/train_gb", "min")])  # the front, best first
    front(rows, goals)                                                      # any status, row order

The results table marks ``best_trials`` in its ``best`` column; the console's ``best trial:`` line,
the MLflow tag ``tokentune.best_trial``, the parent run's description and ``SweepResult.best`` are
``best_trial``.

Rows are ``report.results_table``'s (flat: ``trial_id``, ``status``, metric columns); only finished
trials (status ``finished``) can be best, and a row without a finite value of every goal's metric is
left out. A leaf module: no Ray, no MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

#: (metric, mode): the metric and whether higher (``max``) or lower (``min``) is better
Goal = tuple[str, str]
MODES = ("max", "min")
FINISHED = "finished"
Row = TypeVar("Row", bound=Mapping[str, Any])


def number(value: Any) -> float | None:
    """A finite float of ``value`` (a number or numeric text); None for bools, None, NaN, inf, text."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _signed(row: Mapping[str, Any], goals: Sequence[Goal]) -> tuple[float, ...] | None:
    """The row's goal values, negated where lower is better (so higher is always better); None if one
    is missing."""
    values = []
    for metric, mode in goals:
        x = number(row.get(metric))
        if x is None:
            return None
        values.append(x if mode == "max" else -x)
    return tuple(values)


def _check(goals: Sequence[Goal]) -> None:
    if not goals:
        raise ValueError("no goal given: expected at least one (metric, mode), e.g. ('eval/score', 'max')")
    for metric, mode in goals:
        if mode not in MODES:
            raise ValueError(f"goal {metric!r} has mode {mode!r}: expected one of {', '.join(MODES)}")


def front(rows: Sequence[Row], goals: Sequence[Goal]) -> list[Row]:
    """Rows no other row dominates (at least as good on every goal, better on one), in row order.

    Rows missing a goal's value are left out; equal rows are all kept. One goal: the rows with its
    best value."""
    _check(goals)
    points = [(row, v) for row in rows if (v := _signed(row, goals)) is not None]
    return [
        row for row, v in points if not any(all(a >= b for a, b in zip(w, v)) and w != v for _, w in points)
    ]


def best_trials(rows: Sequence[Row], goals: Sequence[Goal]) -> list[Row]:
    """The best finished rows: for one goal the best row (the first in row order on a tie), for several
    the front of ``goals``, best first by the first goal (ties keep row order). Empty if none has values."""
    best = front([r for r in rows if r.get("status") == FINISHED], goals)
    metric, mode = goals[0]
    best.sort(key=lambda r: -number(r[metric]) if mode == "max" else number(r[metric]))
    return best[:1] if len(goals) == 1 else best


def best_trial(rows: Sequence[Row], goals: Sequence[Goal]) -> Row | None:
    """The best finished row by ``goals`` (the first of ``best_trials``), or None if none has a value."""
    best = best_trials(rows, goals)
    return best[0] if best else None
