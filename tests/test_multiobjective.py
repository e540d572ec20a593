"""A list objective (a Pareto search over several metrics) and the memory budget that keeps trials from
launching (issue 26 items 5, 6): the spec's checks, the front, the Optuna searcher's constraint, the
dry run's skipped trials; one slow end-to-end sweep (optuna, list objective, a driver kill, --resume).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

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


# ---- the results: the front of every objective, skipped trials -------------------------------------------
GOALS3 = [("eval/score", "max"), ("memory/train_gb", "min"), ("time/worker_hours", "min")]


def _trial(tid: str, score: float, mem: float, hours: float, status: str = "finished") -> dict:
    metrics = {"eval/score": score, "memory/train_gb": mem, "time/worker_hours": hours}
    return {"trial_id": tid, "status": status, "searched": {"lora.rank": 4}, "metrics": metrics}


def three_axis_trials() -> list[dict]:
    skipped = {"trial_id": "t6", "status": "skipped", "searched": {"lora.rank": 64}, "error": "skipped: x"}
    skipped["metrics"] = {"memory/estimate_gb": 9.0}
    return [
        _trial("t1", 0.60, 0.30, 0.010),  # best score
        _trial("t2", 0.50, 0.10, 0.020),  # least memory
        _trial("t3", 0.40, 0.20, 0.005),  # fastest: on the 3-objective front, off the score-memory one
        _trial("t4", 0.40, 0.30, 0.020),  # dominated by t1 and t3
        _trial("t5", 0.55, 0.35, 0.030),  # dominated by t1
        skipped,
    ]


def test_results_mark_the_front_of_every_listed_objective():
    from orchestrator.results import highlights, report
    from orchestrator.results.best import best_trial

    rows = report.results_table(three_axis_trials(), ["lora.rank"], GOALS3)
    assert [r["trial_id"] for r in rows if r["pareto"] == "*"] == ["t1", "t2", "t3"]
    assert "time/worker_hours" in rows[0]  # every listed metric is a column
    # "best trial" of a list objective: the front's best by the first listed objective
    assert best_trial(rows, GOALS3)["trial_id"] == "t1"
    skipped = rows[-1]
    assert skipped["status"] == "skipped" and skipped["error"] == "skipped: x" and not skipped["pareto"]
    line = highlights.front_line(rows, GOALS3)
    assert "Pareto front over eval/score max, memory/train_gb min, time/worker_hours min: 3 of 6" in line
    # one objective: the pareto column stays accuracy vs memory, as before (t3 is off it)
    single = report.results_table(three_axis_trials(), ["lora.rank"], GOALS3[:1])
    assert [r["trial_id"] for r in single if r["pareto"] == "*"] == ["t1", "t2"]
    assert highlights.front_line(single, GOALS3[:1]) == ""


def test_a_skipped_trial_is_a_result_not_a_failure():
    from orchestrator.results.summary import exit_status, sweep_summary
    from orchestrator.results.types import SweepResult, TrialResult

    trials = [TrialResult("a", {}, status="finished"), TrialResult("b", {}, status="skipped", error="x")]
    result = SweepResult("s", "/tmp/s", trials)
    lines, code = sweep_summary(result)
    assert code == exit_status(result) == 0
    assert "1 finished, 1 skipped (estimate over the budget tune.max_memory_gb), 0 failed" in lines[0]


def test_any_two_axes_plot_with_a_third_as_colour_or_size(tmp_path):
    from orchestrator.results import plot, report

    rows = report.results_table(three_axis_trials(), ["lora.rank"], GOALS3)
    paths = plot.write_summary_files(rows, tmp_path, GOALS3)
    assert {p.name for p in paths.values()} == {"results.csv", "results.json", "pareto.png", "front.png"}
    args = ["--x", "time/worker_hours", "--y", "eval/score", "--size", "memory/train_gb"]
    assert plot.main([str(tmp_path / "results.json"), *args, "-o", str(tmp_path / "t.png")]) == 0
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    assert plot.main([str(tmp_path / "results.json"), "--x", "nope", "-o", str(tmp_path / "n.png")]) == 2
    assert json.loads((tmp_path / "results.json").read_text())[2]["pareto"] == "*"
    assert plot.mode_of("time/step_s") == "min" and plot.mode_of("eval/x/acc") == "max"


def test_dry_run_lists_the_trials_over_the_budget():
    d = spec_dict(search={"methods": {"grid": [["lora"], ["lora", "tokentune"]]}})
    d["tune"] = {"algorithm": "grid", "max_memory_gb": 0.05}
    d["base"].update(tokentune={"ratio": 0.2}, train={"max_steps": 2, "batch_size": 16})
    text = load_spec(d).plan_text()
    assert text.count("skipped: estimate ") == 1 and "> budget 0.05 GB (tune.max_memory_gb)" in text
    assert "skipped before launch: 1 of the 2 planned trial(s)" in text
    assert "objective: [eval/score max, memory/train_gb min, time/worker_hours min] (Pareto front)" in text


# ---- end to end: a multi-objective optuna sweep with a budget, a driver kill, --resume --------------------
@pytest.mark.slow
@pytest.mark.ray
def test_multi_objective_optuna_sweep_with_a_budget_resumes_after_a_driver_kill(tmp_path):
    """6 optuna trials over three objectives; trials without TokenTune are estimated over the budget and
    never launched (skipped, Optuna told they are infeasible). The driver is killed (SIGKILL, the whole
    tree) once a trial has finished; ``--resume`` ends the sweep: finished trials did not train again, the
    results mark the front of every objective and list the skipped trials."""
    import yaml

    from orchestrator.results.tracking import default_tracking_uri
    from tests.conftest import kill_tree, mlflow_sweep_runs

    root = Path(__file__).resolve().parents[1]
    d = {
        "include": [str(root / "search_spaces" / "_base.yaml")],
        "name": "mo",
        "base": {
            "train": {"max_steps": 3, "batch_size": 16, "log_every": 1, "warmup_steps": 1},
            "tokentune": {"ratio": 0.2},
        },
        "search": {
            "methods": {"choice": [["lora"], ["lora", "tokentune"]]},
            "lora.rank": {"choice": [2, 4, 8]},
        },
    }
    d["objective"] = [
        {"metric": "val_loss", "mode": "min"},
        {"metric": "memory/train_gb", "mode": "min"},
        {"metric": "trial_wall_s", "mode": "min"},
    ]
    d["tune"] = {
        "algorithm": "optuna",
        "num_samples": 6,
        "seed": 3,
        "max_concurrent": 1,
        "max_memory_gb": 0.05,
    }
    d["after_trial"] = {"action": "none"}  # keeps it short: the objectives are measured while training
    spec_file = tmp_path / "mo.yaml"
    spec_file.write_text(yaml.safe_dump(d))
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", str(spec_file), "--set", f"storage={tmp_path}"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    sweep_dir = tmp_path / "mo"

    dry = subprocess.run(cmd + ["--dry-run"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "objective: [val_loss min, memory/train_gb min, trial_wall_s min] (Pareto front)" in dry.stdout
    assert "skipped: estimate " in dry.stdout and "> budget 0.05 GB (tune.max_memory_gb)" in dry.stdout

    log = open(tmp_path / "first_run.log", "w")
    proc = subprocess.Popen(
        cmd, cwd=root, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            states = [json.loads(p.read_text())["status"] for p in sweep_dir.glob("trials/*/status.json")]
            if "finished" in states:
                break
            time.sleep(0.5)
    finally:
        kill_tree(proc)
        log.close()
    finished_before = {
        p.parent.name
        for p in sweep_dir.glob("trials/*/status.json")
        if json.loads(p.read_text())["status"] == "finished"
    }
    tail = (tmp_path / "first_run.log").read_text()[-3000:]
    assert finished_before, f"no trial finished before the deadline:\n{tail}"

    def events(tid: str) -> list[str]:
        lines = (sweep_dir / "trials" / tid / "events.jsonl").read_text().splitlines()
        return [json.loads(line)["event"] for line in lines if line.strip()]

    out = subprocess.run(cmd + ["--resume"], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with open(sweep_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["status"] for r in rows} <= {"finished", "skipped"}, rows
    skipped = [r for r in rows if r["status"] == "skipped"]
    finished = [r for r in rows if r["status"] == "finished"]
    assert finished and all(r["methods"] == "lora,tokentune" for r in finished)
    for r in skipped:  # the budget: no TokenTune -> estimated over it, never trained
        assert r["methods"] == "lora" and r["error"].startswith("skipped: estimate ") and not r["pareto"]
        assert "train started" not in events(r["trial_id"])
    for tid in finished_before:  # the kill did not make a finished trial train again
        assert events(tid).count("train started") == 1
    # the front of the three objectives, computed here by hand
    goals = [("val_loss", -1), ("memory/train_gb", -1), ("trial_wall_s", -1)]
    pts = {r["trial_id"]: tuple(s * float(r[m]) for m, s in goals) for r in finished}
    on_front = {
        a
        for a, p in pts.items()
        if not any(all(x >= y for x, y in zip(q, p)) and q != p for q in pts.values())
    }
    assert {r["trial_id"] for r in rows if r["pareto"] == "*"} == on_front
    assert (
        f"Pareto front over val_loss min, memory/train_gb min, trial_wall_s min: {len(on_front)} of 6"
        in out.stdout
    )
    assert f"{len(skipped)} skipped (estimate over the budget tune.max_memory_gb)" in out.stdout
    assert (sweep_dir / "front.png").is_file() and (sweep_dir / "pareto.png").is_file()
    parents, children = mlflow_sweep_runs(default_tracking_uri(sweep_dir), "mo")
    assert len(parents) == 1 and len(children) == 6  # one run per trial: none duplicated by the resume
    tags = {c.data.tags["tokentune.trial_id"]: c.data.tags.get("tokentune.pareto") for c in children}
    assert {t for t, v in tags.items() if v == "true"} == on_front
    assert set(parents[0].data.tags["tokentune.pareto_front"].split(",")) == on_front
