"""Run identity: a run's checkpoints carry its config hash, so a fresh run never writes into another
run's folder and a resume never continues another config (or past ``max_steps``); a finished Ray
Train run is reused only for the same config; a sweep is a UUID (``sweep.yaml``), locked while it
runs, and its MLflow parent run is found by that UUID, not by its name."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.conftest import tiny_run_dict
from tokentune.checkpoint import check_output_dir, check_resume, config_hash, latest_checkpoint
from tokentune.config import RunConfig
from tokentune.errors import ConfigError
from tokentune.train import train

RESUME_TOL = 1e-5  # as tests/test_methods_contract.py: resumed losses equal the uninterrupted run's


def _cfg(ws, out: Path, **train_changes) -> RunConfig:
    d = tiny_run_dict(ws, ["lora"], out, train={"max_steps": 4, "save_every": 2, "keep_checkpoints": 4})
    d["train"].update(train_changes)
    return RunConfig.from_dict(d)


@pytest.fixture(scope="module")
def base_run(tiny_workspace, tmp_path_factory):
    """One 4-step LoRA run with checkpoints at step 2 (and no checkpoint at the last step)."""
    out = tmp_path_factory.mktemp("identity") / "run"
    cfg = _cfg(tiny_workspace, out)
    res = train(cfg)
    return {"cfg": cfg, "out": out, "losses": [h["loss"] for h in res.history if "loss" in h]}


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the run gets as far as loading a model."""

    def refuse(*a, **k):
        raise AssertionError("the model was loaded: the run was not refused before training")

    monkeypatch.setattr("tokentune.train.load_model", refuse)


# ---- the core: output folder and resume ------------------------------------------------------------------
def test_every_checkpoint_carries_its_config_hash(base_run):
    ckpt = base_run["out"] / "checkpoint-000002"
    state = json.loads((ckpt / "state.json").read_text())
    assert state == {"step": 2, "config_hash": config_hash(base_run["cfg"])}
    assert json.loads((ckpt / "run_config.json").read_text()) == base_run["cfg"].to_dict()
    # what is trained changes the hash; where and how often the run writes does not
    other = base_run["cfg"].copy()
    other.train.lr = 5e-4
    assert config_hash(other) != config_hash(base_run["cfg"])
    same = base_run["cfg"].copy()
    same.train.output_dir, same.train.log_every, same.train.max_steps = "/elsewhere", 7, 99
    assert config_hash(same) == config_hash(base_run["cfg"])


def test_fresh_run_into_another_runs_folder_is_refused_before_training(base_run, tiny_workspace, no_model):
    out = base_run["out"]
    before = sorted(p.name for p in out.iterdir())
    other = _cfg(tiny_workspace, out, lr=5e-4)
    with pytest.raises(ConfigError, match=r"holds checkpoints of another run .*differing keys: train\.lr"):
        train(other)
    same = _cfg(tiny_workspace, out)  # the same config: also refused without --resume
    with pytest.raises(ConfigError, match="already holds checkpoints of this config.*use --resume"):
        train(same)
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written, nothing pruned


def test_fresh_run_into_a_finished_folder_without_checkpoints_is_refused(base_run, tmp_path, no_model):
    out = tmp_path / "finished"
    out.mkdir()
    shutil.copytree(base_run["out"] / "final", out / "final")
    shutil.copy(base_run["out"] / "run_config.json", out / "run_config.json")
    cfg = base_run["cfg"].copy()
    cfg.train.output_dir = str(out)
    with pytest.raises(ConfigError, match=r"already holds a finished run of this config \(final/"):
        train(cfg)
    assert check_output_dir(tmp_path / "empty", cfg) is None  # an empty or missing folder is fine


def test_resume_from_another_configs_checkpoint_is_refused(base_run, tiny_workspace, tmp_path, no_model):
    ckpt = base_run["out"] / "checkpoint-000002"
    other = _cfg(tiny_workspace, tmp_path / "new", lr=5e-4)
    mine, theirs = config_hash(other), config_hash(base_run["cfg"])
    with pytest.raises(ConfigError, match=rf"another config .*{theirs}.*{mine}.*differing keys: train\.lr"):
        train(other, resume_from=ckpt)
    assert not (tmp_path / "new").exists()


def test_resume_past_max_steps_is_refused(base_run, tiny_workspace, tmp_path, no_model):
    ckpt = base_run["out"] / "checkpoint-000002"
    shorter = _cfg(tiny_workspace, tmp_path / "short", max_steps=2)
    with pytest.raises(ConfigError, match=r"at step 2 and train.max_steps=2: nothing is left to train"):
        train(shorter, resume_from=ckpt)
    assert check_resume(ckpt, _cfg(tiny_workspace, tmp_path / "long", max_steps=3)) == 2


def test_resume_with_the_same_config_continues_exactly(base_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_run["out"], out)
    shutil.rmtree(out / "final")
    (out / "checkpoint-000004").mkdir()  # a torn checkpoint (no state.json) is not resumed from
    cfg = base_run["cfg"].copy()
    cfg.train.output_dir, cfg.train.save_every = str(out), 1  # another cadence: still the same run
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == "checkpoint-000002"
    resumed = train(cfg, resume_from=ckpt)
    assert [h["step"] for h in resumed.history if "loss" in h] == [3, 4]
    losses = [h["loss"] for h in resumed.history if "loss" in h]
    assert losses == pytest.approx(base_run["losses"][2:], abs=RESUME_TOL)
    state = json.loads((out / "checkpoint-000003" / "state.json").read_text())
    assert state["config_hash"] == config_hash(base_run["cfg"])  # the continued run's checkpoints too


# ---- Ray Train: a finished run is reused only for the same config -------------------------------------------
def _stored_run(monkeypatch, root: Path, ckpt_dir: Path) -> str:
    """A stored Ray Train run whose latest checkpoint is ``ckpt_dir`` (``Result.from_path`` faked)."""
    import ray.train

    storage = root / "ray"
    (storage / "job").mkdir(parents=True)
    result = SimpleNamespace(checkpoint=ray.train.Checkpoint.from_directory(str(ckpt_dir)), metrics={})
    monkeypatch.setattr(ray.train.Result, "from_path", lambda path: result)
    return str(storage)


def _final_checkpoint(root: Path, cfg: RunConfig, **done) -> Path:
    d = root / "stored" / "final"
    (d / "final").mkdir(parents=True)
    info = {"max_steps": cfg.train.max_steps, "config_hash": config_hash(cfg), "metrics": {"step": 4}}
    (d / "done.json").write_text(json.dumps({**info, **done}))
    return d


def test_finished_train_run_is_reused_only_for_the_same_config(base_run, tmp_path, monkeypatch):
    from orchestrator.run.train_driver import _finished_run

    cfg = base_run["cfg"]
    storage = _stored_run(monkeypatch, tmp_path, _final_checkpoint(tmp_path, cfg))
    reused = _finished_run(storage, "job", cfg)
    assert reused is not None and reused.final_dir == str(tmp_path / "stored" / "final" / "final")
    other = cfg.copy()
    other.train.lr = 5e-4  # same max_steps, another lr: the old result must not come back
    with pytest.raises(ConfigError, match=rf"another config \(config hash {config_hash(cfg)}"):
        _finished_run(storage, "job", other)


def test_finished_train_run_without_a_hash_is_not_reused(base_run, tmp_path, monkeypatch):
    from orchestrator.run.train_driver import _finished_run

    cfg = base_run["cfg"]
    storage = _stored_run(monkeypatch, tmp_path, _final_checkpoint(tmp_path, cfg, config_hash=None))
    with pytest.raises(ConfigError, match="already finished 4 steps"):
        _finished_run(storage, "job", cfg)


def test_mid_run_train_checkpoint_of_another_config_is_refused_before_launch(base_run, tmp_path, monkeypatch):
    from orchestrator.run.train_driver import _finished_run

    storage = _stored_run(monkeypatch, tmp_path, base_run["out"] / "checkpoint-000002")
    assert _finished_run(storage, "job", base_run["cfg"]) is None  # the workers resume it
    other = base_run["cfg"].copy()
    other.lora.rank = 2
    with pytest.raises(ConfigError, match="holds checkpoint checkpoint-000002 of another config"):
        _finished_run(storage, "job", other)


def test_train_worker_checks_the_hash_of_a_finished_checkpoint(base_run, tmp_path):
    from orchestrator.run.train_worker import _already_finished, _clear_stale

    cfg = base_run["cfg"]
    ckpt = _final_checkpoint(tmp_path, cfg)
    assert _already_finished(ckpt, cfg)["config_hash"] == config_hash(cfg)
    other = cfg.copy()
    other.train.lr = 5e-4
    with pytest.raises(RuntimeError, match=f"config hash {config_hash(cfg)}"):
        _already_finished(ckpt, other)
    # starting a Train run over (no checkpoint to resume) clears the local final/ too
    out = tmp_path / "out"
    (out / "final").mkdir(parents=True)
    (out / "checkpoint-000002").mkdir()
    _clear_stale(out, after_step=0)
    assert not (out / "final").exists() and not (out / "checkpoint-000002").exists()


# ---- sweeps: a UUID, a lock, their own MLflow parent --------------------------------------------------------
class _RayStarted(Exception):
    """Raised where the sweep would start its MLflow parent run: everything before it (checks, a Ray
    cluster on this machine, sweep.yaml) has happened."""


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(*a, **k):
        raise _RayStarted()

    monkeypatch.setattr("orchestrator.run.ray_cluster.init_ray", lambda *a, **k: {"CPU": 1.0})  # not started
    monkeypatch.setattr("orchestrator.run.ray_cluster.nodes_on_other_machines", lambda: [])
    monkeypatch.setattr("orchestrator.results.tracking.SweepTracker", refuse)


def _spec(tmp_path: Path) -> dict:
    return {
        "name": "ident",
        "storage": str(tmp_path / "sweeps"),
        "base": {"train": {"max_steps": 2}},
        "search": {"lora.rank": {"grid": [2]}},
    }


TAG_SWEEP_ID = "tokentune.sweep_id"


def _sweep_id(sweep_dir: Path) -> str:
    return yaml.safe_load((sweep_dir / "sweep.yaml").read_text())["sweep_id"]


def test_sweep_id_is_made_at_creation_and_kept_on_resume(tmp_path, no_ray):
    from orchestrator.api import run_sweep
    from orchestrator.spec.sweep import SpecError

    sweep_dir = tmp_path / "sweeps" / "ident"
    with pytest.raises(_RayStarted):
        run_sweep(_spec(tmp_path), progress=False)
    first = _sweep_id(sweep_dir)
    assert str(uuid.UUID(first)) == first
    with pytest.raises(_RayStarted):  # the stored spec (with its id) loads; the id stays
        run_sweep(_spec(tmp_path), resume=True, progress=False)
    assert _sweep_id(sweep_dir) == first
    with pytest.raises(SpecError, match="already exists .* resume it"):  # a fresh start is refused
        run_sweep(_spec(tmp_path), progress=False)
    other_dir = tmp_path / "sweeps" / "ident2"
    with pytest.raises(_RayStarted):
        run_sweep(_spec(tmp_path), name="ident2", progress=False)
    assert _sweep_id(other_dir) != first


def test_second_start_of_a_running_sweep_is_refused(tmp_path, no_ray):
    from orchestrator.api import run_sweep
    from orchestrator.spec.sweep import SpecError

    sweep_dir = tmp_path / "sweeps" / "ident"
    sweep_dir.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, f'{os.getpid()}\\n'.encode())\n"
            "print('locked', flush=True)\n"
            "time.sleep(120)\n",
            str(sweep_dir / ".lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        for resume in (False, True):
            with pytest.raises(SpecError, match=rf"already running in .*ident \(pid {holder.pid}\); wait"):
                run_sweep(_spec(tmp_path), resume=resume, progress=False)
        assert not (sweep_dir / "sweep.yaml").exists()  # refused before anything was written
    finally:
        holder.kill()  # like kill -9: the kernel releases the lock
        holder.wait()
    with pytest.raises(_RayStarted):
        run_sweep(_spec(tmp_path), progress=False)
    from orchestrator.api import sweep_lock

    with sweep_lock(sweep_dir, "ident"):  # and the lock is free again once a sweep returned
        assert int((sweep_dir / ".lock").read_text()) == os.getpid()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow import MlflowClient

    from orchestrator.results.tracking import default_tracking_uri

    uri = default_tracking_uri(tmp_path_factory.mktemp("mlflow"))
    MlflowClient(uri).search_experiments()
    return uri


def test_sweeps_of_one_name_get_their_own_parent_run(store):
    import pickle

    from orchestrator.results.tracking import SweepTracker

    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    first = SweepTracker(store, "exp-identity", "same", sweep_id=a)
    parent_a = first.start_parent({"name": "same"})
    child = first.trial_run("t1", {"lr": 1e-3})
    first.end_trial(child)
    first.end_parent("FINISHED")

    second = SweepTracker(store, "exp-identity", "same", sweep_id=b)
    parent_b = second.start_parent({"name": "same"})
    assert parent_b != parent_a
    assert second.trial_run("t1") != child  # its trials are its own too
    client = first.client
    assert client.get_run(parent_a).info.status == "FINISHED"  # the other sweep's parent is untouched
    assert client.get_run(parent_b).data.tags[TAG_SWEEP_ID] == b

    resumed = pickle.loads(pickle.dumps(SweepTracker(store, "exp-identity", "same", sweep_id=a)))
    assert resumed.start_parent({"name": "same"}) == parent_a  # a resumed sweep reopens its own
    assert resumed.trial_run("t1") == child
    assert client.get_run(parent_a).info.status == "RUNNING"
