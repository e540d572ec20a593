"""A list objective (a Pareto search over several metrics) and the memory budget that keeps trials from
launching (issue 26 items 5, 6): the spec's checks, the front, the Optuna searcher's constraint, the
dry run's skipped trials; one slow end-to-end sweep (optuna, list objective, a driver kill, --resume).
"""

from __future__ import annotations

import pytest

from orchestrator.spec.sweep import load_spec
from tests.conftest import refused

OBJECTIVES = [
    {"metric": "eval/score", "mode": "max"},
    {"metric": "memory/train_gb", "mode": "min"},
    {"metric": "time/worker_hours", "mode": "min"},
]


def spec_dict(**changes) -> dict:
    d = {
        "name": "mo",
        "base": {"methods": ["lora"], "train": {"max_steps": 2, "batch_size": 2}, "eval": {"limit": 4}},
        "search": {"lora.rank": {"choice": [2, 4, 8]}},
        "objective": OBJECTIVES,
        "tune": {"algorithm": "optuna", "num_samples": 6},
    }
    d.update(changes)
    return d


# ---- the spec ---------------------------------------------------------------------------------------------
def test_objective_list_parses_and_round_trips():
    spec = load_spec(spec_dict())
    assert spec.multi_objective and spec.goals == [(o["metric"], o["mode"]) for o in OBJECTIVES]
    assert (spec.objective.metric, spec.objective.mode) == ("eval/score", "max")  # the first listed
    assert load_spec(spec.to_dict()).goals == spec.goals
    single = load_spec(spec_dict(objective={"metric": "val_loss", "mode": "min"}))
    assert not single.multi_objective and single.goals == [("val_loss", "min")]
    assert single.to_dict()["objective"] == {"metric": "val_loss", "mode": "min", "memory_budget_gb": None}


def test_objective_list_bad_input_names_the_key():
    bad = dict(OBJECTIVES[1], metric="memory/nope_gb")
    refused(spec_dict(objective=[OBJECTIVES[0], bad]), "objective[1].metric", "memory/nope_gb", "time/")
    bad = dict(OBJECTIVES[1], mode="minimize")
    refused(spec_dict(objective=[OBJECTIVES[0], bad]), "objective[1].mode", "'minimize'", "min or max")
    refused(spec_dict(objective=[]), "objective", "empty list")
    refused(spec_dict(objective=[OBJECTIVES[0], OBJECTIVES[0]]), "objective[1].metric", "listed twice")
    refused(spec_dict(objective=[OBJECTIVES[0], {"metric": "val_loss"}]), "objective[1].mode", "min or max")
    with_budget = [OBJECTIVES[0], {**OBJECTIVES[1], "memory_budget_gb": 1}]
    refused(spec_dict(objective=with_budget), "objective[1].memory_budget_gb", "tune: {max_memory_gb")
    refused(
        spec_dict(objective=OBJECTIVES, after_trial={"action": "merge"}),
        "objective[0].metric",
        "merge+eval",
    )
    # any time/* metric is accepted by the same rule as memory/* (single or listed)
    assert load_spec(spec_dict(objective={"metric": "time/step_s", "mode": "min"})).objective.metric


def test_asha_with_a_list_objective_needs_its_metric_named():
    asha = {"algorithm": "random", "num_samples": 2, "scheduler": "asha"}
    refused(spec_dict(tune=asha), "tune.scheduler", "objective lists several", "tune.scheduler.metric")
    named = {**asha, "scheduler": {"type": "asha", "metric": "val_loss", "mode": "min"}}
    assert load_spec(spec_dict(tune=named)).tune.scheduler.metric == "val_loss"


# ---- the Optuna searcher: several objectives, a skipped trial is a constraint ------------------------------
def test_optuna_searches_every_objective_and_a_skipped_trial_is_infeasible():
    from optuna.trial import TrialState

    from orchestrator.run.space import BUDGET_CONSTRAINT, make_search_alg
    from orchestrator.run.trial import SKIPPED_OVER_GB

    searcher = make_search_alg(load_spec(spec_dict()))  # no concurrency limit: the OptunaSearch itself
    study_directions = [d.name for d in searcher._ot_study.directions]
    assert searcher.metric == [o["metric"] for o in OBJECTIVES]
    assert study_directions == ["MAXIMIZE", "MINIMIZE", "MINIMIZE"]
    assert searcher.suggest("a") and searcher.suggest("b") and searcher.suggest("c")
    searcher.on_trial_complete("a", {"eval/score": 0.5, "memory/train_gb": 0.1, "time/worker_hours": 0.01})
    searcher.on_trial_complete("b", {"memory/estimate_fit_gb": 0.2, SKIPPED_OVER_GB: 0.15})
    searcher.on_trial_complete("c", {"eval/score": 0.4, "memory/train_gb": 0.2, "time/worker_hours": 0.01})
    a, b, c = searcher._ot_study.get_trials(deepcopy=False)
    assert a.state == c.state == TrialState.COMPLETE and a.values == [0.5, 0.1, 0.01]
    assert b.state == TrialState.PRUNED and b.values is None  # no score at all, not a bad one
    assert b.constraints == {BUDGET_CONSTRAINT: pytest.approx(0.15)}  # > 0: infeasible
    assert a.constraints == {} and searcher.suggest("d")  # the sampler goes on with an infeasible trial
