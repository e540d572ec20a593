"""MLflow tracking on a real SQLite store: nesting, resume without duplicates, metrics with steps,
failed trials, redaction, the sweep summary (files, table, Pareto front)."""

from __future__ import annotations

import base64
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.results import best, plot, report
from orchestrator.results.tracking import (
    TAG_ERROR,
    TAG_PARENT,
    TAG_TRIAL,
    SweepTracker,
    absolute_uri,
    default_tracking_uri,
    to_params,
)
from tokentune.redact import REDACTED, redact, redact_text

REPO = Path(__file__).resolve().parents[1]
HF_TOKEN = "hf_" + "A1b2C3d4E5f6G7h8I9j0KlMnOpQrStUv"


@pytest.fixture(scope="module")
def store(mlflow_store):
    """One SQLite store for the module (conftest's: its tables made once per session)."""
    return mlflow_store


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def _children(tracker: SweepTracker) -> list:
    """The child runs (any status) under the tracker's parent run."""
    return _client(tracker.tracking_uri).search_runs(
        [tracker.experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{tracker.parent_run_id}'"
    )


# ------------------------------------------------------------------------------ URI resolution
def test_default_tracking_uri_order_and_absolute(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = default_tracking_uri(tmp_path / "sweep")
    assert uri == "sqlite:///" + str((tmp_path / "sweep" / "mlflow.db").resolve())
    assert uri.startswith("sqlite:////")  # three slashes + an absolute path

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert default_tracking_uri(tmp_path) == "http://tracking:5000"
    assert default_tracking_uri(tmp_path, explicit="http://other:5000") == "http://other:5000"

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel/m.db")
    assert default_tracking_uri("x") == "sqlite:///" + str(tmp_path.resolve() / "rel" / "m.db")
    assert absolute_uri("runs/m.db") == "sqlite:///" + str(tmp_path.resolve() / "runs" / "m.db")
    assert absolute_uri("postgresql://u@db/mlflow") == "postgresql://u@db/mlflow"


# ------------------------------------------------------------------------------------ redaction
def test_redact_masks_secret_keys_and_values():
    params = {
        "HF_TOKEN": "abc",
        "hub": {"auth_token": "xyz", "repo": "org/model"},
        "aws": {"AWS_SECRET_ACCESS_KEY": "k", "region": "us-east-1"},
        "AWS_ACCESS_KEY_ID": "AKIAABCDEFGHIJKLMNOP",
        "db_password": "pw",
        "my_secret_thing": "s",
        "openai_api_key": "sk-123",
        "model": {"name_or_path": HF_TOKEN},  # a token pasted into a value
        "note": f"use {HF_TOKEN} please",
        "tracking": "postgresql://user:hunter2@db:5432/mlflow",
        "tokenizer": {"pad_token": "<pad>", "eos_token": "</s>"},  # not secrets
        "tokentune": {"ratio": 0.3},
        "train": {"max_tokens": 512, "lr": 1e-3},
        "methods": ["lora", "tokentune"],
    }
    out = redact(params)
    for key in ("HF_TOKEN", "AWS_ACCESS_KEY_ID", "db_password", "my_secret_thing", "openai_api_key"):
        assert out[key] == REDACTED, key
    assert out["hub"] == {"auth_token": REDACTED, "repo": "org/model"}
    assert out["aws"] == {"AWS_SECRET_ACCESS_KEY": REDACTED, "region": "us-east-1"}
    assert out["model"]["name_or_path"] == REDACTED
    assert out["note"] == f"use {REDACTED} please"
    assert out["tracking"] == f"postgresql://user:{REDACTED}@db:5432/mlflow"
    assert out["tokenizer"] == {"pad_token": "<pad>", "eos_token": "</s>"}
    assert out["tokentune"] == {"ratio": 0.3} and out["train"] == {"max_tokens": 512, "lr": 1e-3}
    assert out["methods"] == ["lora", "tokentune"]
    assert params["HF_TOKEN"] == "abc"  # the input is not modified
    # flat dotted keys too, and nothing secret survives into MLflow params
    flat = to_params({"hub.hf_token": "x", "env.AWS_SESSION_TOKEN": "y", "a.b": HF_TOKEN})
    assert set(flat.values()) == {REDACTED}
    assert "hunter2" not in redact_text("mysql://root:hunter2@host/db")


def test_to_params_flattens_stringifies_truncates():
    p = to_params(
        {"lora": {"rank": 8}, "methods": ["lora", "ist"], "x": None, "long": "a" * 7000, "bad key!": 1}
    )
    assert p["lora.rank"] == "8"
    assert json.loads(p["methods"]) == ["lora", "ist"]
    assert p["x"] == "null"
    assert len(p["long"]) == 6000
    assert p["bad key_"] == "1"


# ------------------------------------------------------------------------- nesting and resume
def _spec():
    return {
        "name": "s1",
        "base": {"model": {"name_or_path": None}, "methods": ["lora"], "hub": {"token": HF_TOKEN}},
        "search": {"lora.rank": {"grid": [4, 8]}, "train.lr": {"loguniform": [1e-4, 1e-2]}},
    }


def test_parent_and_trials_nest_and_resume_without_duplicates(store):
    uri, _ = store
    tracker = SweepTracker(uri, "exp-nesting", "s1")
    parent = tracker.start_parent(_spec())
    t1 = tracker.trial_run("t_0001", {"lora": {"rank": 4}, "train": {"lr": 1e-3}, "hf_token": HF_TOKEN})
    t2 = tracker.trial_run("t_0002", {"lora": {"rank": 8}, "train": {"lr": 1e-3}})
    for step in (1, 2, 3):
        tracker.log_metrics(t1, {"loss": 3.0 / step, "tokens_per_s": 100.0 * step}, step=step)
    tracker.end_trial(t1, "FINISHED")

    client = _client(uri)
    exp = client.get_experiment_by_name("exp-nesting")
    assert exp.artifact_location.startswith("file://") and "mlartifacts" in exp.artifact_location
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {parent, t1, t2}
    assert TAG_PARENT not in runs[parent].data.tags
    assert runs[t1].data.tags[TAG_PARENT] == parent and runs[t2].data.tags[TAG_PARENT] == parent
    assert runs[t1].data.tags[TAG_TRIAL] == "t_0001" and runs[t1].info.run_name == "t_0001"
    assert runs[t1].data.params["lora.rank"] == "4" and runs[t1].data.params["hf_token"] == REDACTED
    assert runs[parent].data.params["base.hub.token"] == REDACTED
    sweep_yaml = client.download_artifacts(parent, "sweep.yaml", str(store[1]))
    text = Path(sweep_yaml).read_text()
    assert "lora.rank" in text and HF_TOKEN not in text
    history = client.get_metric_history(t1, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 1.5), (3, 1.0)]
    assert runs[t1].info.status == "FINISHED" and runs[t2].info.status == "RUNNING"

    # a resumed sweep: a new tracker (here: pickled, as Ray would ship it) finds the same runs
    again = pickle.loads(pickle.dumps(SweepTracker(uri, "exp-nesting", "s1")))
    assert again.start_parent(_spec()) == parent
    assert again.trial_run("t_0001", {"lora": {"rank": 4}, "train": {"lr": 1e-3}}) == t1  # same params: fine
    assert (
        again.trial_run("t_0002", {"lora": {"rank": 8}, "train": {"lr": 2e-3}}) == t2
    )  # changed: kept as tag
    assert again.trial_run("t_0003", {"lora": {"rank": 16}}) not in (t1, t2)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 4  # 1 parent + 3 trials, no duplicates
    r2 = client.get_run(t2)
    assert r2.data.params["train.lr"] == "0.001" and r2.data.tags["tokentune.changed.train.lr"] == "0.002"
    assert client.get_run(t1).info.status == "RUNNING"  # reopened for the resumed trial
    # another sweep in the same experiment gets its own parent
    assert SweepTracker(uri, "exp-nesting", "s2").start_parent({}) != parent
    assert {r.info.run_id for r in _children(again)} == {t1, t2, again.trial_run("t_0003")}


def test_concurrent_create_keeps_one_run(store, monkeypatch):
    """Driver callback and trial both create the child run at once: the later one is deleted."""
    uri, _ = store
    tracker = SweepTracker(uri, "exp-race", "s")
    tracker.start_parent({})
    first = tracker.trial_run("t_race")
    other = SweepTracker(uri, "exp-race", "s", parent_run_id=tracker.parent_run_id)
    real_find = other._find
    calls = []

    def blind_once(filter_string):  # the first lookup misses the run created "at the same time"
        calls.append(filter_string)
        return None if len(calls) == 1 else real_find(filter_string)

    monkeypatch.setattr(other, "_find", blind_once)
    assert other.trial_run("t_race", {"lora": {"rank": 4}}) == first
    children = [r for r in _children(other) if r.data.tags.get(TAG_TRIAL) == "t_race"]
    assert [r.info.run_id for r in children] == [first]  # the duplicate was deleted
    assert _client(uri).get_run(first).data.params["lora.rank"] == "4"


def test_log_metrics_skips_non_numeric_and_batches(store):
    import numpy as np
    import torch

    uri, _ = store
    tracker = SweepTracker(uri, "exp-metrics", "s")
    run = tracker.trial_run("t", {})
    metrics = {"a": 1, "b": "text", "c": None, "d": True, "e": np.float32(0.5), "f": torch.tensor(2.0)}
    metrics.update({f"m{i}": float(i) for i in range(1200)})  # more than one log_batch call
    assert tracker.log_metrics(run, metrics, step=7) == 3 + 1200
    data = _client(uri).get_run(run).data.metrics
    assert data["a"] == 1 and data["e"] == 0.5 and data["f"] == 2.0 and data["m1199"] == 1199
    assert "b" not in data and "c" not in data and "d" not in data
    assert _client(uri).get_metric_history(run, "a")[0].step == 7


def test_failed_trial_from_another_process_has_error_tag_and_artifact(store, tmp_path):
    uri, _ = store
    tracker = SweepTracker(uri, "exp-fail", "s")
    tracker.start_parent({})
    run = tracker.trial_run("t_bad", {"lora": {"rank": 4}})
    # the Tune trial function runs in another process: ship the tracker there (as Ray pickles it)
    blob = base64.b64encode(pickle.dumps(tracker)).decode()
    code = (
        "import base64, pickle; "
        f"t = pickle.loads(base64.b64decode('{blob}')); "
        f"t.log_metrics('{run}', {{'loss': 2.5}}, step=5); "
        f"t.set_tags('{run}', {{'tokentune.stage': 'train', 'api_key': 'zzz'}}); "
        f"t.end_trial('{run}', 'FAILED', error='Traceback: RuntimeError: CUDA out of memory (token {HF_TOKEN})')"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path, timeout=120)

    got = _client(uri).get_run(run)
    assert got.info.status == "FAILED"
    assert "CUDA out of memory" in got.data.tags[TAG_ERROR] and HF_TOKEN not in got.data.tags[TAG_ERROR]
    assert got.data.tags["tokentune.stage"] == "train" and got.data.tags["api_key"] == REDACTED
    assert got.data.metrics["loss"] == 2.5
    err = Path(_client(uri).download_artifacts(run, "error.txt", str(tmp_path))).read_text()
    assert "CUDA out of memory" in err and REDACTED in err
    assert not (tmp_path / "mlruns").exists()  # nothing written relative to the working directory
    with pytest.raises(ValueError, match="FINISHED, FAILED, KILLED"):
        tracker.end_trial(run, "DONE")
    state = tracker.__getstate__()
    assert set(state.values()) == {uri, "exp-fail", "s", tracker.parent_run_id, None}  # sweep_id None


# ----------------------------------------------------------------------------------- summary
def _trials():
    def t(tid, methods, rank, ratio, accs, mem, status="finished", error=None):
        metrics = {f"eval/{task}/acc": a for task, a in accs.items()}
        metrics.update({"tokens_per_s": 1000.0, "wall_s": 30.0, "val_loss": 2.0})
        if mem is not None:
            metrics.update(
                {"memory/train_gb": mem, "memory/estimate_gb": 1.1 * mem, "memory/estimate_ratio": 1.1}
            )
        return {
            "trial_id": tid,
            "status": status,
            "searched": {
                "methods": methods,
                "lora": {"rank": rank},
                "tokentune": {"ratio": ratio},
                "train": {"lr": 1e-3, "output_dir": f"/s/trials/{tid}"},
                "data": {"max_length": 128},
            },
            "metrics": metrics if error is None else {},
            "error": error,
        }

    mib = 1 / 1024  # GB
    return [
        t("t1", ["lora"], 4, 1.0, {"a": 0.50, "b": 0.60}, 100 * mib),  # front (lowest memory)
        t("t2", ["lora", "tokentune"], 8, 0.3, {"a": 0.70, "b": 0.70}, 150 * mib),  # front
        t("t3", ["lora"], 8, 1.0, {"a": 0.60, "b": 0.60}, 200 * mib),  # dominated by t2
        t("t4", ["lora", "tokentune"], 16, 0.5, {"a": 0.80, "b": 0.90}, 300 * mib),  # front (best)
        t("t5", ["lora"], 16, 1.0, {"a": 0.80, "b": 0.90}, 400 * mib),  # dominated by t4 (tie on score)
        t("t6", ["lora"], 32, 1.0, {}, None, status="failed", error="RuntimeError: boom"),
    ]


SEARCHED = ["methods", "tokentune.ratio", "lora.rank", "train.lr"]


def test_results_table_and_pareto_front():
    rows = report.results_table(_trials(), search_keys=SEARCHED)  # as a sweep passes its searched keys
    assert [r["trial_id"] for r in rows] == ["t1", "t2", "t3", "t4", "t5", "t6"]
    columns = report.columns_of(rows)
    assert columns[:6] == ["trial_id", "status", *SEARCHED]
    assert "train.lr" in columns  # a searched key, even though it does not vary
    assert "data.max_length" not in columns and "train.output_dir" not in columns
    # without searched keys: methods, then what differs between trials, method settings by method order
    auto = report.columns_of(report.results_table(_trials()))
    assert auto[:5] == ["trial_id", "status", "methods", "lora.rank", "tokentune.ratio"]
    assert "train.lr" not in auto and "data.max_length" not in auto and "train.output_dir" not in auto
    assert rows[1]["methods"] == "lora,tokentune"
    assert rows[1]["eval/score"] == pytest.approx(0.7) and rows[0]["eval/score"] == pytest.approx(0.55)
    assert rows[5]["eval/score"] is None and rows[5]["error"] == "RuntimeError: boom"
    for key in (
        "eval/a/acc",
        "eval/b/acc",
        "pareto",
        "memory/train_gb",
        "memory/estimate_gb",
        "memory/estimate_ratio",
        "tokens_per_s",
        "wall_s",
        "val_loss",
        "error",
    ):
        assert key in columns

    assert "memory/cuda_peak_gb" not in columns  # no trial ran on a GPU: no empty column
    assert report.memory_axis(rows) == "memory/train_gb"
    front = report.pareto_front(rows, "eval/score", "memory/train_gb")
    assert [r["trial_id"] for r in front] == ["t1", "t2", "t4"]
    assert [r["trial_id"] for r in rows if r["pareto"] == "*"] == ["t1", "t2", "t4"]  # marked in the table
    # objective.memory_budget_gb: the best trial whose measured memory fits
    assert report.best_within(rows, 250 / 1024)["trial_id"] == "t2"
    assert report.best_within(rows, 50 / 1024) is None
    goals = [("eval/score", "max")]
    lines = report.summary_lines(
        rows, best.best_trial(rows, goals), goals, 250 / 1024, report.best_within(rows, 250 / 1024)
    )
    assert "best trial: t4 (eval/score=0.85, train_gb 300.0MiB measured (estimate 330.0MiB))" in lines
    assert "best within objective.memory_budget_gb=0.244140625: t2 (eval/score=0.7" in lines
    # GPU trials: the axis is the CUDA peak (the CUDA column appears)
    gpu = _trials()
    for i, t in enumerate(gpu[:5]):
        t["metrics"]["memory/cuda_peak_gb"] = [5, 1, 2, 3, 4][i]
    gpu_rows = report.results_table(gpu, search_keys=SEARCHED)
    assert report.memory_axis(gpu_rows) == "memory/cuda_peak_gb"
    assert [r["trial_id"] for r in gpu_rows if r["pareto"] == "*"] == ["t2", "t4"]
    assert best.best_trial(rows, [("eval/score", "max")])["trial_id"] == "t4"
    # hand-made rows: equal points are both on the front; missing values are ignored
    hand = [
        {"id": "a", "s": 1.0, "m": 10},
        {"id": "b", "s": 1.0, "m": 10},
        {"id": "c", "s": 0.5, "m": 5},
        {"id": "d", "s": 0.4, "m": 6},
        {"id": "e", "s": None, "m": 1},
        {"id": "f", "s": 2.0, "m": float("nan")},
    ]
    assert [r["id"] for r in report.pareto_front(hand, "s", "m")] == ["c", "a", "b"]
    assert report.pareto_front([], "s", "m") == []

    text = report.format_table(rows)
    lines = text.splitlines()
    assert lines[0].startswith("trial_id") and len(lines) == 2 + len(rows)
    assert "100.0MiB" in text and "1.10x" in text and "RuntimeError: boom" in text
    assert report.format_table([]) == "(no trials)"


def test_log_summary_writes_files_and_logs_on_parent(store, tmp_path):
    uri, _ = store
    tracker = SweepTracker(uri, "exp-summary", "s")
    parent = tracker.start_parent({"name": "s"})
    children = [tracker.trial_run(f"t{i}", {}) for i in (1, 2)]
    rows = report.results_table(_trials(), search_keys=SEARCHED)
    paths = tracker.log_summary(rows, tmp_path, description="**Sweep `s`**\n\nbest trial: t4")
    for name in ("results.csv", "results.json", "pareto.png"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["pareto"] == tmp_path / "pareto.png"
    assert json.loads((tmp_path / "results.json").read_text())[3]["trial_id"] == "t4"
    header = (tmp_path / "results.csv").read_text().splitlines()[0]
    assert header.startswith("trial_id,status,methods") and "eval/score" in header

    client = _client(uri)
    names = {a.path for a in client.list_artifacts(parent)}
    assert {"results.csv", "results.json", "pareto.png", "results_table.json", "sweep.yaml"} <= names
    run = client.get_run(parent)
    assert run.data.tags["tokentune.best_trial"] == "t4"
    assert run.data.tags["tokentune.pareto_front"] == "t1,t2,t4"
    assert run.data.metrics["best/eval/score"] == pytest.approx(0.85)
    assert run.data.metrics["best/memory/train_gb"] == pytest.approx(300 / 1024)
    assert run.data.tags["mlflow.note.content"].startswith("**Sweep `s`**")  # the parent's description
    # the UI opens the experiment on its runs (model development), not the GenAI overview
    assert (
        client.get_experiment(tracker.experiment_id).tags["mlflow.experimentKind"]
        == "custom_model_development"
    )
    assert tracker.child_run_ids() == children
    # metric names with '/' need backticks in search filters
    exp_id = tracker.experiment_id
    found = client.search_runs([exp_id], "metrics.`best/eval/score` > 0.8")
    assert [r.info.run_id for r in found] == [parent]
    assert {r.info.run_id for r in _children(tracker)} == set(children)  # the summary adds no run


def test_point_labels_name_methods_and_searched_values_only():
    rows = report.results_table(_trials(), search_keys=SEARCHED)
    names = {"lora", "tokentune"}
    assert report.searched_label(rows[1], names) == "lora,tokentune ratio=0.3 rank=8 lr=0.001"
    # t1 trains without tokentune: its tokentune.ratio did not apply and is not in the label
    assert report.searched_label(rows[0], names) == "lora rank=4 lr=0.001"
    # two settings with the same last part are named in full
    assert report.searched_label({"methods": "dora", "lora.rank": 4, "dora.rank": 8}) == (
        "dora lora.rank=4 dora.rank=8"
    )


def test_best_trial_follows_the_objective():
    rows = report.results_table(_trials(), search_keys=SEARCHED)
    assert best.best_trial(rows, [("eval/score", "max")])["trial_id"] == "t4"  # t5 ties: row order
    assert best.best_trial(rows, [("memory/train_gb", "min")])["trial_id"] == "t1"
    assert best.best_trial(rows, [("val_loss", "min")])["trial_id"] == "t1"  # all equal: the first
    assert best.best_trial(rows, [("eval/score", "min")])["trial_id"] == "t1"  # t6 failed: never best
    assert best.best_trial([], [("eval/score", "max")]) is None
    # a list objective: the finished rows on its front, best first by the first goal
    goals = [("eval/score", "max"), ("memory/train_gb", "min")]
    assert [r["trial_id"] for r in best.best_trials(rows, goals)] == ["t4", "t2", "t1"]
    assert best.best_trial(rows, goals)["trial_id"] == "t4"
    stopped = [{**r, "status": "stopped"} if r["trial_id"] == "t1" else r for r in rows]
    assert best.best_trial(stopped, [("memory/train_gb", "min")])["trial_id"] == "t2"  # only finished ones
    # the table marks what best_trials picks; a goal metric no other column holds gets a column
    by_memory = report.results_table(_trials(), SEARCHED, [("memory/train_gb", "min")])
    assert [r["trial_id"] for r in by_memory if r["best"] == "*"] == ["t1"]
    assert [r["trial_id"] for r in rows if r["best"] == "*"] == ["t4"]
    trials = _trials()
    trials[2]["metrics"]["loss"] = 0.1
    by_loss = report.results_table(trials, SEARCHED, [("loss", "min")])
    assert by_loss[2]["loss"] == 0.1 and by_loss[2]["best"] == "*"
    assert report.searched_label(by_loss[2]) == "lora ratio=1 rank=8 lr=0.001"  # no loss=: not searched
    with pytest.raises(ValueError, match="mode 'up'"):
        best.best_trial(rows, [("eval/score", "up")])


def test_summary_tags_the_trial_the_objective_picks(store, tmp_path):
    """Objective memory/train_gb (min): the MLflow tag, the parent's description, the results files'
    mark and ``SweepResult.best`` all name the same trial (the tag once said the best eval/score)."""
    from orchestrator.api import _summarise
    from orchestrator.results.types import TrialResult
    from orchestrator.spec.sweep import load_spec

    uri, _ = store
    spec = load_spec(
        {
            "name": "by-memory",
            "base": {"methods": ["lora"], "train": {"max_steps": 5}},
            "search": {"lora.rank": {"grid": [4, 8]}},
            "objective": {"metric": "memory/train_gb", "mode": "min"},
        }
    )
    trials = [
        TrialResult(
            t["trial_id"], {"lora.rank": t["searched"]["lora"]["rank"]}, t["metrics"], t["status"], t["error"]
        )
        for t in _trials()
    ]
    tracker = SweepTracker(uri, "exp-objective", spec.name)
    parent = tracker.start_parent({"name": spec.name})
    result = _summarise(spec, trials, tracker, tmp_path, progress=False, quiet=True)
    assert result.best is not None and result.best.trial_id == "t1"  # the least memory, not t4's score
    run = _client(uri).get_run(parent)
    assert run.data.tags["tokentune.best_trial"] == "t1"
    assert run.data.metrics["best/memory/train_gb"] == pytest.approx(100 / 1024)
    assert "best trial: t1 (memory/train_gb=0.09766" in run.data.tags["mlflow.note.content"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["trial_id"] for r in saved if r["best"] == "*"] == ["t1"]
    assert "best" in (tmp_path / "results.csv").read_text().splitlines()[0].split(",")


def test_pareto_plot_without_points(tmp_path):
    path = plot.pareto_plot([{"trial_id": "x", "eval/score": None}], tmp_path / "p.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_resume_closes_a_run_left_open_after_the_trial_committed(store, tmp_path):
    """A crash between status.json (the commit point) and closing the MLflow run leaves it RUNNING; the
    resumed trial skips training and closes the run FINISHED with the recorded metrics, exactly once."""
    from orchestrator.results.tracking_journal import close_open_run
    from orchestrator.results.trial_status import write_status

    uri, _ = store
    tracker = SweepTracker(uri, "exp-commit", "s1")
    tracker.start_parent({})
    run_id = tracker.trial_run("t_0001", {"lora": {"rank": 4}})
    metrics = {"eval/score": 0.7, "loss": 1.2, "step": 20.0}
    write_status(tmp_path, "finished", trial_id="t_0001", metrics=metrics, run_id=run_id)
    done = json.loads((tmp_path / "status.json").read_text())
    client = _client(uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # the crash window

    assert close_open_run(tracker, tmp_path, done) is True
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["eval/score"] == 0.7
    assert run.data.tags["tokentune.status"] == "finished"
    assert "status.json" in [a.path for a in client.list_artifacts(run_id)]
    assert close_open_run(tracker, tmp_path, done) is False  # already closed: nothing to do
    assert len(client.get_metric_history(run_id, "eval/score")) == 1


def test_phase_durations_of_the_last_attempt(tmp_path):
    """``phase/<span>_s`` from a trial's events: the last attempt only, overhead = trial - train steps -
    the wait for a training slot."""
    from orchestrator.results.trial_status import EVENTS_FILE, PHASES, phase_durations

    t = {name: 100.0 + i for i, name in enumerate(PHASES)}
    rows = [
        {"event": "trial started", "time": 1.0},
        {"event": "train started", "time": 2.0},
    ]  # an attempt killed
    rows += [{"event": name, "time": t[name]} for name in PHASES]
    (tmp_path / EVENTS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = phase_durations(tmp_path)
    assert d["phase/start_s"] == t["workers_ready"] - t["train started"]
    assert d["phase/train_s"] == t["last_step"] - t["first_step"]
    assert d["phase/trial_s"] == t["post-trial finished"] - t["trial started"]  # not the killed attempt's
    assert d["phase/queued_s"] == t["train started"] - t["train queued"] == 1.0
    assert d["phase/overhead_s"] == d["phase/trial_s"] - d["phase/train_s"] - d["phase/queued_s"]
    assert d["phase/merge_s"] == 1.0 and d["phase/eval_s"] == 1.0
    # without after_trial the trial ends when training does; missing events leave their spans out
    short = [r for r in rows[2:] if r["event"] in PHASES[: PHASES.index("train finished") + 1]]
    (tmp_path / EVENTS_FILE).write_text("".join(json.dumps(r) + "\n" for r in short))
    d = phase_durations(tmp_path)
    assert d["phase/trial_s"] == t["train finished"] - t["trial started"] and "phase/merge_s" not in d
