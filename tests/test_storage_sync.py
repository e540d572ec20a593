"""Trial folders synced through a URI storage (``orchestrator.run.storage_sync``), without Ray.

The wiring (trials upload, the driver downloads) runs for real in ``test_sweep.py``'s failing-trial
sweep, whose storage is a ``file://`` URI.

A ``file://`` URI under ``tmp_path`` stands in for s3:// / gs://: pyarrow resolves it like any other
filesystem URI. "Node A" and "node B" are two local folders that do not see each other.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from orchestrator.run import storage_sync
from orchestrator.run.storage_sync import (
    download_trials,
    fetch_status,
    fetch_trial,
    is_uri,
    read_text,
    stored_wins,
    upload_file,
    upload_trial,
)

UPLOADED = {
    "status.json",
    "events.jsonl",
    "eval.json",
    "run_config.json",
    "result.json",
    "final/adapter_config.json",
    "final/adapter_model.safetensors",
    "final/tokenizer/tokenizer.json",
}


def make_trial(tdir: Path, status: str = "finished", score: float = 0.5) -> Path:
    """A trial folder as a finished (or failed) trial leaves it, with the large parts that stay local."""
    tdir.mkdir(parents=True, exist_ok=True)
    (tdir / "status.json").write_text(
        json.dumps({"status": status, "trial_id": tdir.name, "metrics": {"eval/score": score}})
    )
    (tdir / "events.jsonl").write_text(json.dumps({"event": "train started"}) + "\n")
    (tdir / "eval.json").write_text(json.dumps({"metrics": {"eval/score": score}}))
    (tdir / "run_config.json").write_text("{}")
    (tdir / "result.json").write_text("{}")
    (tdir / "final" / "tokenizer").mkdir(parents=True)
    (tdir / "final" / "adapter_config.json").write_text("{}")
    (tdir / "final" / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 16)
    (tdir / "final" / "tokenizer" / "tokenizer.json").write_text("{}")
    for big in ("merged", "merged.tmp", "checkpoint-000010", ".ray_stage"):
        (tdir / big).mkdir()
        (tdir / big / "model.safetensors").write_bytes(b"\0" * 1024)
    (tdir / "status.json.tmp").write_text("{}")
    return tdir


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def storage(tmp_path) -> tuple[str, Path]:
    """(the sweep's storage URI, the folder it points at)."""
    remote = tmp_path / "bucket" / "sweeps" / "sw"
    return remote.as_uri(), remote


# ---- upload (in a trial) -------------------------------------------------------------------------------
def test_upload_copies_the_trial_folder_but_not_merged_or_checkpoints(tmp_path, storage):
    uri, remote = storage
    tdir = make_trial(tmp_path / "nodeA" / "trials" / "t1")
    assert upload_trial(tdir, uri, "t1") is True
    stored = remote / "trials" / "t1"
    assert files_under(stored) == UPLOADED
    for name in UPLOADED:
        assert (stored / name).read_bytes() == (tdir / name).read_bytes(), name


def test_upload_exclude_is_configurable(tmp_path, storage):
    uri, remote = storage
    tdir = make_trial(tmp_path / "nodeA" / "t1")
    assert upload_trial(tdir, uri, "t1", exclude=("final", "*.tmp", "checkpoint-*", ".ray_stage"))
    stored = files_under(remote / "trials" / "t1")
    assert "merged/model.safetensors" in stored and "merged.tmp/model.safetensors" not in stored
    assert not any(p.startswith("final/") for p in stored)


def test_upload_writes_status_last(tmp_path, storage, monkeypatch):
    uri, _ = storage
    tdir = make_trial(tmp_path / "t1")
    copied: list[str] = []
    real_copy = storage_sync._copy

    def spy(src, dest, src_fs, dest_fs):
        copied.append(Path(src).name)
        real_copy(src, dest, src_fs, dest_fs)

    monkeypatch.setattr(storage_sync, "_copy", spy)
    assert upload_trial(tdir, uri, "t1")
    assert copied[-1] == "status.json" and copied.count("status.json") == 1
    assert {"final", "eval.json", "events.jsonl"} <= set(copied[:-1])


@pytest.mark.parametrize("bad", ["nosuchscheme://bucket/sweeps/sw", "file-in-the-way"])
def test_upload_failure_only_warns(tmp_path, bad, caplog):
    tdir = make_trial(tmp_path / "t1")
    if bad == "file-in-the-way":  # a resolvable URI whose writes fail, like a bucket without access
        blocker = tmp_path / "blocker"
        blocker.write_text("a file, not a folder")
        bad = (blocker / "sweeps" / "sw").as_uri()
    with caplog.at_level(logging.WARNING, logger="orchestrator.run.storage_sync"):
        assert upload_trial(tdir, bad, "t1") is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "t1" in warnings[0].getMessage()
    assert (tdir / "status.json").is_file()  # the local trial is untouched


# ---- status of one trial -------------------------------------------------------------------------------
def test_fetch_status_reads_the_stored_status(tmp_path, storage, caplog):
    uri, _ = storage
    upload_trial(make_trial(tmp_path / "nodeA" / "t1", score=0.75), uri, "t1")
    st = fetch_status(uri, "t1")
    assert st is not None and st["status"] == "finished" and st["metrics"] == {"eval/score": 0.75}
    with caplog.at_level(logging.WARNING):
        assert fetch_status(uri, "never_ran") is None  # a missing trial is normal: no warning
    assert not caplog.records


def test_fetch_status_of_a_broken_uri_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="orchestrator.run.storage_sync"):
        assert fetch_status("nosuchscheme://bucket/sw", "t1") is None
    assert len(caplog.records) == 1


def test_fetch_trial_restores_one_trial(tmp_path, storage):
    uri, _ = storage
    src = make_trial(tmp_path / "nodeA" / "t1")
    upload_trial(src, uri, "t1")
    dest = tmp_path / "driver" / "trials" / "t1"
    assert fetch_trial(uri, "t1", dest) is True
    assert files_under(dest) == UPLOADED
    assert json.loads((dest / "status.json").read_text())["status"] == "finished"
    assert not (dest / "status.json.download").exists()
    assert fetch_trial(uri, "t1", dest) is False  # now local and finished: nothing to do
    assert fetch_trial(uri, "never_ran", tmp_path / "driver" / "trials" / "never_ran") is False


# ---- download (at the driver) ---------------------------------------------------------------------------
def test_download_restores_missing_trials_and_keeps_local_ones(tmp_path, storage):
    uri, remote = storage
    node_b = tmp_path / "nodeB" / "trials"
    for tid, status, score in [("a", "finished", 0.1), ("b", "finished", 0.2), ("c", "failed", 0.0)]:
        upload_trial(make_trial(node_b / tid, status, score), uri, tid)
    # "d": an upload that did not get to its status.json (the trial's node died mid-upload)
    (remote / "trials" / "d").mkdir(parents=True)
    (remote / "trials" / "d" / "eval.json").write_text("{}")
    sweep = tmp_path / "driver"
    local_a = make_trial(sweep / "trials" / "a", "finished", 0.9)  # ran on the driver's node too
    local_a_status = (local_a / "status.json").read_text()

    assert download_trials(uri, sweep) == ["b", "c"]
    assert (local_a / "status.json").read_text() == local_a_status  # not overwritten
    assert json.loads((sweep / "trials" / "b" / "status.json").read_text())["metrics"] == {"eval/score": 0.2}
    assert files_under(sweep / "trials" / "b") == UPLOADED
    assert json.loads((sweep / "trials" / "c" / "status.json").read_text())["status"] == "failed"
    assert not (sweep / "trials" / "d").exists()
    assert download_trials(uri, sweep) == []  # idempotent


def test_download_replaces_a_local_failure_with_a_stored_finish(tmp_path, storage):
    """A trial failed on the driver's node, was retried on node B and finished there."""
    uri, _ = storage
    upload_trial(make_trial(tmp_path / "nodeB" / "t1", "finished", 0.6), uri, "t1")
    sweep = tmp_path / "driver"
    tdir = sweep / "trials" / "t1"
    tdir.mkdir(parents=True)
    (tdir / "status.json").write_text(json.dumps({"status": "failed", "error": "OOM"}))
    assert download_trials(uri, sweep) == ["t1"]
    assert json.loads((tdir / "status.json").read_text())["status"] == "finished"


def test_stored_wins():
    finished, failed = {"status": "finished"}, {"status": "failed"}
    assert stored_wins(None, failed) and stored_wins(None, finished) and stored_wins(failed, finished)
    assert not stored_wins(finished, failed) and not stored_wins(finished, finished)
    assert not stored_wins(failed, failed)


def test_download_without_anything_stored(tmp_path, storage, caplog):
    uri, _ = storage
    with caplog.at_level(logging.WARNING):
        assert download_trials(uri, tmp_path / "driver") == []
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="orchestrator.run.storage_sync"):
        assert download_trials("nosuchscheme://bucket/sw", tmp_path / "driver") == []
    assert len(caplog.records) == 1


# ---- single files, URIs ------------------------------------------------------------------------------------
def test_upload_file_and_read_text(tmp_path, storage):
    uri, remote = storage
    spec = tmp_path / "sweep.yaml"
    spec.write_text("name: sw\n")
    assert read_text(uri, "sweep.yaml") is None
    assert upload_file(spec, uri, "sweep.yaml") is True
    assert (remote / "sweep.yaml").read_text() == "name: sw\n"
    assert read_text(uri, "sweep.yaml") == "name: sw\n"


def test_is_uri():
    assert is_uri("s3://bucket/sweeps") and is_uri("gs://b/x") and is_uri("file:///abs/sweeps")
    assert not is_uri("sweeps") and not is_uri("/mnt/shared/sweeps") and not is_uri(None)


# ---- wiring: sweep_location, resume's spec, run_trial ------------------------------------------------------
def spec_dict(storage: str) -> dict:
    return {
        "name": "sw",
        "storage": storage,
        "base": {"methods": ["lora"], "train": {"max_steps": 5, "batch_size": 2}, "eval": {"limit": 5}},
        "search": {"lora.rank": {"grid": [4, 8]}},
    }


def test_sweep_location(tmp_path, monkeypatch):
    from orchestrator.api import sweep_location
    from orchestrator.spec.sweep import load_spec

    monkeypatch.chdir(tmp_path)
    uri = (tmp_path / "bucket").as_uri()
    assert sweep_location(load_spec(spec_dict(uri))) == ((tmp_path / "sweeps" / "sw").resolve(), f"{uri}/sw")
    local = (tmp_path / "shared" / "sweeps" / "sw").resolve()
    assert sweep_location(load_spec(spec_dict(str(tmp_path / "shared" / "sweeps")))) == (local, str(local))


def test_resume_on_another_machine_reads_the_stored_spec(tmp_path, storage):
    from orchestrator.api import SPEC_FILE, _stored_spec
    from orchestrator.spec.sweep import SpecError, load_spec

    uri, remote = storage
    stored = load_spec(spec_dict(uri), ["tune.num_samples=3"])
    remote.mkdir(parents=True)
    (remote / SPEC_FILE).write_text(stored.to_yaml())
    fresh = load_spec(spec_dict(uri))
    got = _stored_spec(fresh, tmp_path / "empty_local_sweep", uri)
    assert got.tune.num_samples == 3 and got.source == f"{uri}/{SPEC_FILE}"
    with pytest.raises(SpecError, match="never ran here"):  # local storage: nothing to resume
        _stored_spec(fresh, tmp_path / "empty_local_sweep", str(remote))
