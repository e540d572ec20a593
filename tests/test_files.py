"""State files survive interruption, and checkpoints never run code from storage (issue 16, items 2 and 5)."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_run_dict
from tokentune.files import append_jsonl, read_jsonl, write_json_atomic, write_text_atomic


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    write_json_atomic(target, {"step": 1})
    assert json.loads(target.read_text()) == {"step": 1}

    def crash(src, dst):  # the process dies between writing the new file and renaming it
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(target, json.dumps({"step": 2}))
    assert json.loads(target.read_text()) == {"step": 1}  # the old file, intact
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left behind


def test_jsonl_reader_skips_a_torn_last_line_with_a_warning(tmp_path, caplog):
    log = tmp_path / "ray_reports.jsonl"
    append_jsonl(log, {"step": 1, "loss": float("nan")})
    append_jsonl(log, {"step": 2, "loss": 0.5})
    with log.open("a") as f:
        f.write('{"step": 3, "lo')  # killed mid-write
    with caplog.at_level(logging.WARNING):
        rows = read_jsonl(log)
    assert rows == [{"step": 1, "loss": None}, {"step": 2, "loss": 0.5}]
    assert "torn last line 3" in caplog.text
    append_jsonl(log, {"step": 3, "loss": 0.4})  # the next attempt cuts the torn line, then appends
    assert read_jsonl(log)[-1] == {"step": 3, "loss": 0.4} and len(read_jsonl(log)) == 3
    log.write_text(log.read_text().replace('"step": 2', '"step": 2,,'))
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_jsonl(log)  # a bad line that is not the last is corruption, not a torn write


def test_train_history_of_a_killed_attempt_still_reads(tmp_path):
    """A Train worker killed while appending its report must not stop every later attempt."""
    from orchestrator.run.train_worker import read_history

    log = tmp_path / "ray_reports.jsonl"
    append_jsonl(log, {"launch": "a", "attempt": 1, "step": 2})
    with log.open("a") as f:
        f.write('{"launch": "a", "attem')
    assert read_history(log, "a") == [{"launch": "a", "attempt": 1, "step": 2}]


class _Payload:
    """Unpickling this object runs code: it touches a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["methods.pt", "rng.pt", "optimizer.pt"])
def test_resume_never_unpickles_code_from_a_checkpoint(tiny_workspace, tmp_path, name):
    from tokentune.checkpoint import latest_checkpoint
    from tokentune.config import RunConfig
    from tokentune.train import train

    out = tmp_path / "run"
    cfg = RunConfig.from_dict(tiny_run_dict(tiny_workspace, ["lora"], out, train={"save_every": 1}))
    train(cfg)
    ckpt = latest_checkpoint(out)
    marker = tmp_path / "code_ran"
    torch.save({"payload": _Payload(marker)}, ckpt / name)
    with pytest.raises(pickle.UnpicklingError):
        train(cfg, resume_from=ckpt)
    assert not marker.exists()
