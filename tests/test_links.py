"""No state file is written through a link (issue 27, item 3): a symbolic link planted in a sweep folder
where one of our files belongs (the lock, ``sweep.yaml``, ``status.json``, ``events.jsonl``, the results,
the Pareto plot, a checkpoint's ``state.json``, the MLflow database) is refused with a message naming
it, and the file it points to is left as it was. No Ray needed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tokentune.errors import ConfigError
from tokentune.files import (
    UnsafeFile,
    append_jsonl,
    open_in_place,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)

VICTIM_TEXT = "someone else's file: must stay as it is\n"


@pytest.fixture
def victim(tmp_path) -> Path:
    """A file outside the sweep folder that a planted link points to."""
    path = tmp_path / "elsewhere" / "precious.txt"
    path.parent.mkdir()
    path.write_text(VICTIM_TEXT)
    return path


@pytest.fixture
def sweep_dir(tmp_path) -> Path:
    path = tmp_path / "sweeps" / "s"
    path.mkdir(parents=True)
    return path


def _plant(link: Path, target: Path) -> Path:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link


def test_the_sweep_lock_never_truncates_what_a_planted_link_points_to(sweep_dir, victim):
    from orchestrator.api import LOCK_FILE, sweep_lock

    link = _plant(sweep_dir / LOCK_FILE, victim)
    with pytest.raises(UnsafeFile, match="symbolic link") as err, sweep_lock(sweep_dir, "s"):
        pass
    assert str(link) in str(err.value) and isinstance(err.value, ConfigError)  # the CLI prints one line
    assert victim.read_text() == VICTIM_TEXT
    link.unlink()
    os.link(victim, sweep_dir / LOCK_FILE)  # a hard link: O_NOFOLLOW does not see it, the link count does
    with pytest.raises(UnsafeFile, match="hard-linked"), sweep_lock(sweep_dir, "s"):
        pass
    assert victim.read_text() == VICTIM_TEXT
    (sweep_dir / LOCK_FILE).unlink()
    with sweep_lock(sweep_dir, "s"):  # a lock of its own works as before
        assert (sweep_dir / LOCK_FILE).read_text() == f"{os.getpid()}\n"


@pytest.mark.parametrize(
    "write",
    [
        lambda p: write_text_atomic(p, "new"),
        lambda p: write_json_atomic(p, {"new": 1}),
        lambda p: write_bytes_atomic(p, b"new"),
        lambda p: append_jsonl(p, {"new": 1}),
    ],
    ids=["text", "json", "bytes", "jsonl"],
)
def test_every_state_file_writer_refuses_a_link_and_names_it(sweep_dir, victim, write):
    link = _plant(sweep_dir / "state.json", victim)
    with pytest.raises(UnsafeFile, match=f"{link}.*symbolic link"):
        write(link)
    assert victim.read_text() == VICTIM_TEXT and link.is_symlink()


def test_the_temporary_file_of_an_atomic_write_is_never_an_existing_one(sweep_dir, victim, monkeypatch):
    """The old temporary name was predictable (``.<name>.<pid>.tmp``): a link planted there was written
    through, and then renamed over the target."""
    target = sweep_dir / "status.json"
    _plant(sweep_dir / f".status.json.{os.getpid()}.tmp", victim)
    write_json_atomic(target, {"status": "finished"})
    assert json.loads(target.read_text()) == {"status": "finished"} and not target.is_symlink()
    assert victim.read_text() == VICTIM_TEXT


def test_open_in_place_refuses_what_is_not_a_file_of_its_own(sweep_dir):
    os.mkfifo(sweep_dir / "events.jsonl")
    with pytest.raises(UnsafeFile, match="not a regular file"):
        open_in_place(sweep_dir / "events.jsonl", os.O_RDWR | os.O_CREAT)


def test_the_sweeps_own_files_refuse_planted_links(sweep_dir, victim, monkeypatch):
    """Each writer of a sweep-folder file, as the sweep calls it."""
    from orchestrator.api import SPEC_FILE, _stored_file, _write_spec
    from orchestrator.results import plot, report
    from orchestrator.results.tracking import default_tracking_uri
    from orchestrator.results.trial_status import EVENTS_FILE, STATUS_FILE, log_event, write_status
    from orchestrator.spec.sweep import load_spec

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    trial = sweep_dir / "trials" / "t1"
    rows = report.results_table([{"trial_id": "t1", "status": "finished", "searched": {"lora.rank": 4}}])
    writers = {
        trial / STATUS_FILE: lambda: write_status(trial, "finished"),
        trial / EVENTS_FILE: lambda: log_event(trial, "finished"),
        sweep_dir / "results.csv": lambda: report.write_csv(rows, sweep_dir / "results.csv"),
        sweep_dir / "results.json": lambda: report.write_json(rows, sweep_dir / "results.json"),
        sweep_dir / "pareto.png": lambda: plot.pareto_plot(rows, sweep_dir / "pareto.png"),
        sweep_dir / SPEC_FILE: lambda: _write_spec(
            load_spec({"name": "s"}, check_inputs=False), sweep_dir, None, False
        ),
        sweep_dir / "mlflow.db": lambda: default_tracking_uri(sweep_dir),
    }
    for link, write in writers.items():
        _plant(link, victim)
        with pytest.raises(UnsafeFile, match=str(link)):
            write()
        assert victim.read_text() == VICTIM_TEXT, link.name
    with pytest.raises(UnsafeFile, match=SPEC_FILE):  # a resume never reads another file's spec either
        _stored_file(sweep_dir, str(sweep_dir))


def test_a_checkpoint_never_writes_through_a_planted_link(tmp_path, victim):
    """``checkpoint-<step>/run_config.json`` (copied from the run folder) and ``state.json`` (the marker
    written last) refuse links planted in a checkpoint folder."""
    from tokentune.checkpoint import RUN_CONFIG, save_checkpoint

    class Nothing:
        def state_dict(self):
            return {}

        def save(self, path):
            pass

    out = tmp_path / "run"
    out.mkdir()
    (out / RUN_CONFIG).write_text(json.dumps({"train": {"lr": 0.1}}))
    ckpt = out / "checkpoint-000002"
    for name in (RUN_CONFIG, "state.json"):
        _plant(ckpt / name, victim)
        with pytest.raises(UnsafeFile, match=name):
            save_checkpoint(out, 2, torch_module(), Nothing(), Nothing(), None, 0, keep=2)
        assert victim.read_text() == VICTIM_TEXT
        (ckpt / name).unlink()


def torch_module():
    import torch

    return torch.nn.Linear(2, 2)
