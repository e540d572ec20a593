"""Readable at any number of trials (issue 28 item 4), on synthetic result rows (no Ray): the console
table prints the top rows and the Pareto front with the count of the rest, the compare URL lists the
front (or the top 20 by the objective) and says so, the parent run's description holds the top rows
within MLflow's 8000 characters with its code fence and a link to the full table, and the Pareto plot
labels only the front."""

from __future__ import annotations

import json
import random
import urllib.parse

import pytest

from orchestrator.results import highlights, plot, report
from orchestrator.results.tracking import SweepTracker

GOALS = [("eval/score", "max")]


def synthetic_trials(n: int, seed: int = 0, memory: bool = True) -> list[dict]:
    """``n`` trials with random scores and memory (seeded); every tenth failed."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        failed = i % 10 == 9
        metrics = {
            "eval/score": rng.uniform(0.3, 0.8),
            "eval/tt_next/acc": rng.uniform(0.3, 0.8),
            "tokens_per_s": rng.uniform(500, 900),
            "wall_s": rng.uniform(20, 60),
            "val_loss": rng.uniform(1.5, 2.5),
        }
        if memory:
            metrics |= {"memory/train_gb": rng.uniform(0.01, 0.05), "memory/estimate_gb": 0.03}
        out.append(
            {
                "trial_id": f"t{i:04d}",
                "status": "failed" if failed else "finished",
                "searched": {
                    "methods": ["lora", "tokentune"] if i % 2 else ["lora"],
                    "lora.rank": rng.choice([4, 8, 16, 32]),
                    "tokentune.ratio": round(rng.uniform(0.1, 1.0), 2),
                    "train.lr": rng.choice([1e-4, 3e-4, 1e-3]),
                },
                "metrics": {} if failed else metrics,
                "error": "RuntimeError: boom" if failed else None,
            }
        )
    return out


def _front_ids(rows) -> list[str]:
    return [r["trial_id"] for r in rows if r["pareto"] == "*"]


def _top_ids(rows, k: int) -> list[str]:
    done = [r for r in rows if r["status"] == "finished"]
    return [r["trial_id"] for r in sorted(done, key=lambda r: -r["eval/score"])[:k]]


def test_sweep_summary_at_60_trials_shows_the_top_rows_and_the_front_and_says_what_it_left_out(
    mlflow_store, tmp_path
):
    """Through the sweep's own summary (``api._summarise``) on a real SQLite store with 60 trial runs:
    the printed table, the compare URL and the parent's description."""
    from mlflow import MlflowClient

    from orchestrator.api import _summarise
    from orchestrator.results.types import TrialResult
    from orchestrator.spec.sweep import load_spec

    uri, _ = mlflow_store
    spec = load_spec(
        {
            "name": "wide",
            "base": {"methods": ["lora"], "train": {"max_steps": 5}},
            "search": {"lora.rank": {"grid": [4, 8, 16, 32]}, "train.lr": {"grid": [1e-4, 3e-4, 1e-3]}},
            "after_trial": {"action": "merge+eval"},
        }
    )
    synthetic = synthetic_trials(60)
    trials = [
        TrialResult(
            t["trial_id"], {"lora.rank": t["searched"]["lora.rank"]}, t["metrics"], t["status"], t["error"]
        )
        for t in synthetic
    ]
    tracker = SweepTracker(uri, "exp-wide", spec.name)
    parent = tracker.start_parent({"name": spec.name})
    run_of = {t.trial_id: tracker.trial_run(t.trial_id) for t in trials}
    result = _summarise(spec, trials, tracker, tmp_path, progress=False, quiet=True)
    rows = report.results_table(
        [
            {"trial_id": t.trial_id, "status": t.status, "searched": t.searched, "metrics": t.metrics}
            for t in trials
        ],
        list(spec.search),
        GOALS,
    )
    front, top = _front_ids(rows), _top_ids(rows, highlights.TOP_ROWS)
    assert 0 < len(front) < 20

    # the console: the top 20 by the objective and the front, then the count of the rest
    lines = result.table_text.splitlines()
    shown = [line.split()[0] for line in lines[2:-1]]
    assert set(shown) == set(top) | set(front) and shown[: len(top)] == top
    assert lines[-1].startswith(f"... and {60 - len(shown)} more trial(s) not shown")
    assert lines[-1].endswith(str(tmp_path / "results.csv"))
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 61  # the full table: every trial

    # the compare URL: the front's runs, and it says so
    query = urllib.parse.urlparse(result.mlflow_compare_url).fragment.split("?", 1)[1]
    listed = json.loads(urllib.parse.parse_qs(query)["runs"][0])
    assert sorted(listed) == sorted(run_of[t] for t in front)
    assert result.mlflow_compare_note == f"the Pareto front ({len(front)} of 60 trials)"

    # the parent's description: the top rows, a closed code fence, the rest counted, the full table linked
    text = MlflowClient(uri).get_run(parent).data.tags["mlflow.note.content"]
    assert len(text) <= highlights.MAX_DESCRIPTION and text.count("```") == 2
    table = text.split("```")[1].strip().splitlines()
    assert [line.split()[0] for line in table[2:]] == shown
    assert f"{60 - len(shown)} more trial(s)" in text and "artifactPath/results.csv" in text


def test_description_keeps_its_fence_within_mlflow_limit_at_1000_trials():
    rows = report.results_table(synthetic_trials(1000), goals=GOALS)
    text = highlights.description("big", rows, GOALS, "best trial: t0001", "results.csv")
    assert len(text) <= highlights.MAX_DESCRIPTION and text.rstrip().count("```") == 2
    table = text.split("```")[1].strip().splitlines()
    kept = len(table) - 2
    assert 0 < kept and f"... and {1000 - kept} more trial(s) not shown" in text
    assert [line.split()[0] for line in table[2:]] == [
        r["trial_id"] for r in highlights.shown_rows(rows, GOALS)
    ][:kept]  # the top rows and the front, as many as fit
    short = highlights.description("big", rows, GOALS, "best trial: t0001", "results.csv", limit=3000)
    assert len(short) <= 3000 and short.count("```") == 2  # fewer rows, the fence kept
    fewer = len(short.split("```")[1].strip().splitlines()) - 2
    assert 0 < fewer < kept and f"... and {1000 - fewer} more trial(s) not shown" in short


def test_compare_lists_the_top_20_by_the_objective_when_there_is_no_front():
    rows = report.results_table(synthetic_trials(100, memory=False), goals=GOALS)
    assert _front_ids(rows) == []
    ids, note = highlights.compare_selection(rows, GOALS)
    assert ids == _top_ids(rows, 20) and note == "the top 20 by eval/score (20 of 100 trials)"
    few, note = highlights.compare_selection(rows[:5], GOALS)
    assert few == [r["trial_id"] for r in rows[:5]] and note == "the 5 trial(s)"


def test_pareto_plot_labels_only_the_front(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    labels: list[str] = []
    annotate = Axes.annotate

    def counted(self, text, *args, **kwargs):
        labels.append(text)
        return annotate(self, text, *args, **kwargs)

    monkeypatch.setattr(Axes, "annotate", counted)
    rows = report.results_table(synthetic_trials(300), goals=GOALS)
    plot.pareto_plot(rows, tmp_path / "p.png")
    front = [r for r in rows if r["pareto"] == "*"]
    assert 0 < len(front) < 20 and len(labels) == len(front)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("n", [3, 20])
def test_small_sweeps_show_every_row(n):
    rows = report.results_table(synthetic_trials(n), goals=GOALS)
    text = highlights.console_table(rows, GOALS)
    assert "more trial(s)" not in text and len(text.splitlines()) == n + 2
