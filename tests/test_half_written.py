"""Every half-written state is recoverable (issue 27, items 4, 7 and 8), at unit level:

- a checkpoint or ``final/`` is complete only when its marker (``state.json``, ``complete.json``),
  written last, says so; incomplete ones are set aside and a run starts again or resumes;
- a corrupt line anywhere in a trial's ``events.jsonl`` is skipped with a warning; the phase summary
  never fails a trial;
- a tracking server that is down is one clear error before anything is written; ``--resume`` takes a
  new ``storage``/``tracking.uri``, refuses a sweep that never ran and names the keys that differ;
- SIGTERM/SIGINT to the driver become a clean stop (``SweepInterrupted``).

The real processes (``ulimit -f`` during ``tokentune train``, SIGTERM to a sweep driver) are in
tests/test_faults.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_run_dict
from tokentune.checkpoint import check_output_dir, latest_checkpoint
from tokentune.completeness import COMPLETE, checkpoint_complete, final_complete
from tokentune.config import RunConfig
from tokentune.errors import ConfigError
from tokentune.files import read_jsonl


@pytest.fixture(scope="module")
def finished_run(tiny_workspace, tmp_path_factory):
    """One 2-step LoRA run with a checkpoint at step 1 and ``final/``."""
    from tokentune.train import train

    out = tmp_path_factory.mktemp("half") / "run"
    cfg = RunConfig.from_dict(
        tiny_run_dict(tiny_workspace, ["lora"], out, train={"max_steps": 2, "save_every": 1})
    )
    train(cfg)
    return cfg, out


def _copy(finished_run, tmp_path: Path) -> tuple[RunConfig, Path]:
    cfg, out = finished_run
    dst = tmp_path / "run"
    shutil.copytree(out, dst)
    cfg = cfg.copy()
    cfg.train.output_dir = str(dst)
    return cfg, dst


# ---- markers -------------------------------------------------------------------------------------------
def test_final_is_complete_only_with_its_marker_written_last(finished_run, tmp_path):
    _, out = finished_run
    marker = json.loads((out / "final" / COMPLETE).read_text())
    assert "adapter_model.safetensors" in marker["files"] and final_complete(out / "final")
    _, dst = _copy(finished_run, tmp_path)
    weights = dst / "final" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a torn write the marker does not match
    assert not final_complete(dst / "final")


def test_final_written_before_the_marker_counts_when_its_files_read(finished_run, tmp_path):
    """The legacy rule (documented in tokentune.checkpoint): no marker, but config and weights read."""
    _, dst = _copy(finished_run, tmp_path)
    (dst / "final" / COMPLETE).unlink()
    assert final_complete(dst / "final")
    weights = dst / "final" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    assert not final_complete(dst / "final")


def test_run_killed_writing_its_first_checkpoint_starts_again(finished_run, tmp_path):
    """Before: "use --resume" for a fresh start, and --resume found no checkpoint: neither worked."""
    cfg, dst = _copy(finished_run, tmp_path)
    shutil.rmtree(dst / "final")
    ckpt = dst / "checkpoint-000001"
    (ckpt / "state.json").unlink()  # the marker is written last: the writer died before it
    (ckpt / "trainable.pt").write_bytes((ckpt / "trainable.pt").read_bytes()[:50])
    assert not checkpoint_complete(ckpt) and latest_checkpoint(dst) is None
    with pytest.warns(
        UserWarning, match="checkpoint-000001 is incomplete .* set aside as checkpoint-000001.incomplete"
    ):
        check_output_dir(dst, cfg)  # a fresh start: accepted
    assert not ckpt.exists() and (dst / "checkpoint-000001.incomplete" / "trainable.pt").is_file()
    assert latest_checkpoint(dst) is None


def test_run_killed_writing_final_is_not_a_finished_run(finished_run, tmp_path):
    """Before: "already holds a finished run" although final/ held only README.md."""
    cfg, dst = _copy(finished_run, tmp_path)
    for f in (dst / "final").iterdir():
        if f.name != "README.md":
            f.unlink()
    ckpt = latest_checkpoint(dst)
    assert ckpt is not None and ckpt.name == "checkpoint-000001"
    with pytest.raises(ConfigError, match="use --resume"):  # a fresh start still needs --resume
        check_output_dir(dst, cfg)
    assert (dst / "final.incomplete").is_dir() and not (dst / "final").exists()
    check_output_dir(dst, cfg, resume_from=ckpt)  # --resume continues from the last complete one
    shutil.rmtree(dst / "checkpoint-000001")
    (dst / "final").mkdir()
    (dst / "final" / "README.md").write_text("x")
    with pytest.warns(UserWarning, match="final is incomplete .* final.incomplete-2"):
        check_output_dir(dst, cfg)  # no complete checkpoint either: it trains again from scratch
    assert sorted(p.name for p in dst.iterdir() if "incomplete" in p.name) == [
        "final.incomplete",
        "final.incomplete-2",
    ]


# ---- the phase log -------------------------------------------------------------------------------------
def test_corrupt_event_lines_anywhere_are_skipped_with_file_and_line(tmp_path, caplog):
    from orchestrator.results.trial_status import EVENTS_FILE, phase_durations

    t0 = 1000.0
    rows = [
        {"event": "trial started", "time": t0},
        {"event": "train started", "time": t0 + 1},
        {"event": "workers_ready", "time": t0 + 3},
    ]
    lines = [json.dumps(r) for r in rows]
    lines.insert(1, '{"event": "train queued", "ti')  # a bad line in the middle
    lines.insert(3, '["not", "an", "object"]')
    (tmp_path / EVENTS_FILE).write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe\n")
    with caplog.at_level(logging.WARNING):
        got = phase_durations(tmp_path)
    assert got["phase/start_s"] == pytest.approx(2.0)
    text = caplog.text
    assert f"{tmp_path / EVENTS_FILE}: skipping line 2" in text and "skipping line 4" in text
    assert "line 6" in text
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):  # other logs stay strict
        read_jsonl(tmp_path / EVENTS_FILE)


def test_phase_summary_never_fails_a_trial(tmp_path, caplog):
    from orchestrator.results.trial_status import EVENTS_FILE
    from orchestrator.run.trial import phase_summary

    (tmp_path / EVENTS_FILE).mkdir()  # unreadable as a file
    with caplog.at_level(logging.WARNING):
        assert phase_summary(tmp_path) == {}
    assert "phase times left out" in caplog.text


# ---- the tracking store and --resume ---------------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(tmp_path: Path, name: str = "hw", **changes) -> dict:
    d = {
        "name": name,
        "storage": str(tmp_path / "sweeps"),
        "base": {"train": {"max_steps": 2}},
        "search": {"lora.rank": {"grid": [2]}},
    }
    d.update(changes)
    return d


class _PastChecks(Exception):
    """Raised where a sweep would start Ray: every check before it passed."""


@pytest.fixture
def stop_at_ray(monkeypatch):
    def refuse(*a, **k):
        raise _PastChecks()

    monkeypatch.setattr("orchestrator.run.ray_cluster.init_ray", refuse)


def test_tracking_server_down_is_one_error_before_anything_is_written(tmp_path, stop_at_ray):
    from orchestrator.api import run_sweep
    from orchestrator.spec.sweep import SpecError

    uri = f"http://127.0.0.1:{_closed_port()}/mlflow"
    t0 = time.monotonic()
    with pytest.raises(SpecError) as info:
        run_sweep(_spec(tmp_path, tracking={"uri": uri}), progress=False)
    assert time.monotonic() - t0 < 15
    msg = str(info.value)
    assert msg.startswith("tracking.uri: the tracking server http://") and "127.0.0.1" in msg
    assert "/mlflow (tracking.uri) did not answer" in msg and "\n" not in msg
    assert not (tmp_path / "sweeps").exists()  # no folder, no lock, no sweep.yaml


def test_resume_of_a_sweep_that_never_ran_names_the_sweeps_that_exist(tmp_path, stop_at_ray):
    from orchestrator.api import run_sweep
    from orchestrator.spec.sweep import SpecError

    for other in ("first", "second"):
        (tmp_path / "sweeps" / other).mkdir(parents=True)
        (tmp_path / "sweeps" / other / "sweep.yaml").write_text(yaml.safe_dump(_spec(tmp_path, other)))
    with pytest.raises(SpecError, match=r"sweep 'hw' never ran here .* sweeps in .*: first, second"):
        run_sweep(_spec(tmp_path), resume=True, progress=False)
    assert not (tmp_path / "sweeps" / "hw").exists()


def test_resume_uses_new_where_settings_and_names_the_keys_that_differ(tmp_path, caplog):
    from orchestrator.api import SPEC_FILE, _stored_spec
    from orchestrator.spec.sweep import load_spec

    moved = tmp_path / "moved"
    stored = load_spec(_spec(tmp_path), ["tune.num_samples=3"])
    (moved / "hw").mkdir(parents=True)
    (moved / "hw" / SPEC_FILE).write_text(yaml.safe_dump({"sweep_id": "x"}) + stored.to_yaml())
    sets = [f"storage={moved}", f"tracking.uri=sqlite:///{tmp_path}/new.db", "train.lr=0.5"]
    fresh = load_spec(_spec(tmp_path), sets)
    with caplog.at_level(logging.WARNING):
        got = _stored_spec(fresh, moved / "hw", str(moved / "hw"), True, sets)
    assert got.storage == str(moved) and got.tracking.uri == f"sqlite:///{tmp_path}/new.db"
    assert got.tune.num_samples == 3 and got.base["train"].get("lr") != 0.5  # what is trained: stored
    text = caplog.text
    assert "base.train.lr: the stored" in text and "(given 0.5 is ignored)" in text
    assert "tune.num_samples: the stored 3 is used" in text
    assert f"storage: the given '{moved}' is used" in text and "tracking.uri: the given" in text


# ---- signals -----------------------------------------------------------------------------------------------
def test_sigterm_outside_tune_raises_a_clean_stop_and_restores_handlers():
    from orchestrator.run.interrupt import StopOnSignal, SweepInterrupted

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SweepInterrupted) as info, StopOnSignal():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs here
    assert info.value.exit_code == 143 and "SIGTERM" in str(info.value)
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigint_during_tune_is_handed_to_tunes_graceful_stop(monkeypatch):
    from orchestrator.run.interrupt import StopOnSignal, SweepInterrupted

    got = []
    monkeypatch.setattr(signal, "getsignal", lambda s: lambda *a: got.append(s))
    with StopOnSignal() as stop, stop.fitting():
        assert os.environ["TUNE_DISABLE_SIGINT_HANDLER"] == "1"
        stop._handle(signal.SIGINT, None)  # as the signal would: Tune's stop, no exception
    assert got == [signal.SIGUSR1]
    with pytest.raises(SweepInterrupted, match="SIGINT"):
        stop.raise_if_stopped()


def test_finished_trial_is_recorded_once_in_a_new_tracking_store(tmp_path):
    """--resume --set tracking.uri=<new store>: a trial that finished before gets its one child run in
    the new store (before: get_run of the old store's run id failed the trial on every resume)."""
    from mlflow import MlflowClient

    from orchestrator.results.tracking import SweepTracker
    from orchestrator.results.tracking_journal import close_open_run
    from orchestrator.results.trial_status import read_status, write_status

    run_id = "0" * 32  # the old store's run: this store never held it
    metrics = {"eval/score": 0.5, "step": 4.0}
    write_status(
        tmp_path, "finished", trial_id="t_0001", metrics=metrics, searched={"lora.rank": 4}, run_id=run_id
    )
    new = SweepTracker(f"sqlite:///{tmp_path}/new.db", "exp", "s", sweep_id="id1")
    new.start_parent({})
    for _ in range(2):  # a second resume finds the new run and leaves it closed
        close_open_run(new, tmp_path, read_status(tmp_path))
    runs = MlflowClient(f"sqlite:///{tmp_path}/new.db").search_runs(
        [new.experiment_id], "tags.`tokentune.role` = 'trial'"
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.metrics["eval/score"] == 0.5
    assert runs[0].data.params["search.lora/rank"] == "4"
    assert read_status(tmp_path)["run_id"] == runs[0].info.run_id
