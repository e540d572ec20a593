"""What a sweep returns: one ``TrialResult`` per trial and the ``SweepResult`` around them.

A leaf module (it imports nothing of ours at run time), so the API, the Tune glue and the report can
all use these types without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.spec.sweep import SweepSpec


@dataclass
class TrialResult:
    """One trial: its searched values, final metrics and outcome."""

    trial_id: str
    searched: dict[str, Any]  # its values of the searched keys, e.g. {"lora.rank": 8, "methods": ["lora"]}
    metrics: dict[str, Any] = field(default_factory=dict)
    status: str = "pending"  # finished | failed | stopped | pending | planned (dry run)
    error: str | None = None
    trial_dir: str | None = None


@dataclass
class SweepResult:
    """A sweep's trials, its best trial and where its results are."""

    name: str
    sweep_dir: str
    trials: list[TrialResult] = field(default_factory=list)
    best: TrialResult | None = None
    best_within_budget: TrialResult | None = None  # with objective.memory_budget_gb: best measured within it
    results_csv: str | None = None
    mlflow_parent_run_id: str | None = None
    mlflow_compare_url: str | None = None  # the compare view of the trials (``mlflow ui`` or the server)
    mlflow_compare_note: str = ""  # which trials it lists: "the Pareto front (5 of 800 trials)"
    tracking_uri: str | None = None
    plan_text: str = ""  # the dry run's plan (also set for real runs)
    table_text: str = ""  # the results table as printed
    wall_s: float = 0.0
    spec: SweepSpec | None = None
