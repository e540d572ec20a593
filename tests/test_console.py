"""The sweep's console (orchestrator.results.console and the ``tokentune sweep`` ending): progress lines with
counts and ETA, stopped vs failed, the best trial's searched values in one line, ``--quiet``."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

from orchestrator.results.console import SweepProgress, duration, searched_text
from orchestrator.results.trial_status import trial_dir, write_status


def _trial(tid: str, **config) -> SimpleNamespace:
    return SimpleNamespace(trial_id=tid, config=config)


def test_searched_text_and_duration():
    assert searched_text({"methods": ["lora", "tokentune"], "lora.rank": 4, "ist.budget": None}) == (
        "methods=lora+tokentune lora.rank=4"
    )
    long = searched_text({f"k{i}": "x" * 10 for i in range(20)}, limit=40)
    assert len(long) == 40 and long.endswith("...")
    assert [duration(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m"]


def test_progress_lines_count_finished_stopped_and_failed(tmp_path):
    """Finished (status.json says so), stopped by Tune (no status.json: ASHA, time limit) and failed
    trials are counted apart; queued = not started yet; the ETA appears once a trial is done."""
    out = io.StringIO()
    p = SweepProgress(total=4, sweep_dir=str(tmp_path), objective="eval/score", every_s=3600, out=out)
    a, b, c = _trial("t_a", **{"lora.rank": 4}), _trial("t_b", **{"lora.rank": 8}), _trial("t_c")
    for t in (a, b, c):
        p.on_trial_start(0, [], t)
    d = trial_dir(tmp_path, "t_a")
    d.mkdir(parents=True)
    write_status(d, "finished", metrics={"eval/score": 0.615})
    p.on_trial_complete(0, [], a)
    p.on_trial_complete(0, [], b)  # no status.json: Tune stopped it
    d = trial_dir(tmp_path, "t_c")
    d.mkdir(parents=True)
    write_status(d, "failed", error="training failed: DataError: data file 'x' does not exist")
    p.on_trial_error(0, [], c)
    p.on_trial_error(0, [], c)  # a second report of the same end is ignored
    lines = [re.sub(r"^\[\d\d:\d\d:\d\d\] ", "", ln) for ln in out.getvalue().splitlines()]
    assert "trial t_a started | lora.rank=4" in lines
    assert any(ln.startswith("0/4 trials done, 3 running, 1 queued | elapsed ") for ln in lines)
    assert any(ln.startswith("trial t_a finished (") and ln.endswith("): eval/score=0.615") for ln in lines)
    assert any(ln.startswith("trial t_b stopped (") for ln in lines)
    assert any(ln.startswith("trial t_c failed (") and "DataError: data file 'x'" in ln for ln in lines)
    assert lines[-1].startswith("3/4 trials done (1 finished, 1 stopped, 1 failed), 0 running, 1 queued |")
    assert "ETA ~" in lines[-1]
    assert sum(ln.startswith("trial t_c failed") for ln in lines) == 1


def test_heartbeat_repeats_only_while_trials_run(tmp_path):
    out = io.StringIO()
    p = SweepProgress(total=1, sweep_dir=str(tmp_path), objective="val_loss", every_s=0.0, out=out)
    p.on_step_end(0, [])
    assert out.getvalue() == ""  # nothing runs yet
    p.on_trial_start(0, [], _trial("t"))
    n = len(out.getvalue().splitlines())
    p.on_step_end(0, [])
    assert len(out.getvalue().splitlines()) == n + 1


def test_heartbeat_counts_trials_waiting_in_the_merge_queue(tmp_path):
    """A running trial whose last event is ``post-trial queued`` waits for the merge + eval pool."""
    from orchestrator.results.trial_status import log_event

    out = io.StringIO()
    p = SweepProgress(total=3, sweep_dir=str(tmp_path), objective="val_loss", every_s=0.0, out=out)
    for tid in ("t_a", "t_b"):
        p.on_trial_start(0, [], _trial(tid))
        trial_dir(tmp_path, tid).mkdir(parents=True)
        log_event(trial_dir(tmp_path, tid), "post-trial queued", queue=0)
    log_event(trial_dir(tmp_path, "t_b"), "post-trial dispatched")
    p.on_step_end(0, [])
    assert re.sub(r"^\[.*?\] ", "", out.getvalue().splitlines()[-1]).startswith(
        "0/3 trials done, 2 running (1 waiting for merge + eval), 1 queued |"
    )


def test_sweep_command_ends_with_where_to_look_or_with_the_table_when_quiet(monkeypatch, capsys):
    from orchestrator import api, cli
    from orchestrator.results.types import SweepResult, TrialResult

    trials = [TrialResult("t1", {}, status="finished"), TrialResult("t2", {}, status="stopped")]
    result = SweepResult(
        "s", "/tmp/s", trials, results_csv="/tmp/s/results.csv", tracking_uri="sqlite:////tmp/s/mlflow.db"
    )
    result.mlflow_compare_url = "http://127.0.0.1:5000/#/compare-runs"
    seen = {}

    def fake_run_sweep(*args, **kwargs):
        seen.update(kwargs)
        return result

    monkeypatch.setattr(api, "run_sweep", fake_run_sweep)
    assert cli.main(["sweep", "x.yaml", "--quiet"]) == 0
    assert seen["quiet"] is True and seen["verbose"] is False
    assert capsys.readouterr().out == ""  # the table (printed by the sweep) stays the last line
    assert cli.main(["sweep", "x.yaml", "--verbose"]) == 0
    assert seen["verbose"] is True
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "sweep s: 1 finished, 1 stopped early (scheduler or time limit), 0 failed -> /tmp/s"
    assert lines[1].startswith("results: /tmp/s/results.csv")
    assert lines[2].startswith("MLflow: mlflow ui --backend-store-uri sqlite:////tmp/s/mlflow.db")
    assert lines[3].strip() == result.mlflow_compare_url


def test_a_resumed_sweep_counts_the_trials_that_ended_before_it(tmp_path):
    """On ``--resume`` Tune hands back the ended trials without starting them: they count as done (the
    line said "1/24 trials done, 23 queued, ETA ~24h" with 23 finished before), the ETA is this run's pace."""
    out = io.StringIO()
    p = SweepProgress(total=4, sweep_dir=str(tmp_path), objective="val_loss", every_s=3600, out=out)
    before = []
    for tid, tune_state, ours in (
        ("t_a", "TERMINATED", "finished"),
        ("t_b", "TERMINATED", "skipped"),
        ("t_c", "ERROR", "failed"),
    ):
        trial_dir(tmp_path, tid).mkdir(parents=True)
        write_status(trial_dir(tmp_path, tid), ours)
        before.append(SimpleNamespace(trial_id=tid, config={}, status=tune_state))
    d = _trial("t_d")
    d.status = "PENDING"
    p.on_step_begin(0, [*before, d])
    d.status = "RUNNING"
    p.on_trial_start(0, [*before, d], d)
    lines = [re.sub(r"^\[\d\d:\d\d:\d\d\] ", "", ln) for ln in out.getvalue().splitlines()]
    assert lines[-1].startswith(
        "3/4 trials done (3 before this run, 1 finished, 1 skipped, 1 failed), 1 running, 0 queued |"
    ), lines[-1]
    assert "ETA" not in lines[-1]  # nothing ended in this run yet: no pace to go by
    trial_dir(tmp_path, "t_d").mkdir(parents=True)
    write_status(trial_dir(tmp_path, "t_d"), "finished", metrics={"val_loss": 1.5})
    d.status = "TERMINATED"
    p.on_trial_complete(0, [*before, d], d)
    last = re.sub(r"^\[\d\d:\d\d:\d\d\] ", "", out.getvalue().splitlines()[-1])
    assert last.startswith(
        "4/4 trials done (3 before this run, 2 finished, 1 skipped, 1 failed), 0 running, 0 queued"
    )
