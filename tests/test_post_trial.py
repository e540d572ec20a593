"""The after-trial step: merge a freshly trained adapter (and lm-eval it on the shipped tasks, or not),
record errors; the same as a real Ray task; pruning merged checkpoints; the ``tokentune eval`` command
(the same merge and scored evaluation, without Ray)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from orchestrator.run.post_trial import PostTrialError, merge_and_evaluate, prune_merged, run_post_trial
from tokentune import cli
from tokentune.assets import SHIPPED_TASK_FAMILIES, default_model_path
from tokentune.cli_eval import add_eval_parser

EVAL = {"tasks": ["tt_next", "tt_antonym"], "limit": 4, "batch_size": 8}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A LoRA adapter on the shipped tiny model after a few optimizer steps (~10 s)."""
    from tokentune.config import RunConfig
    from tokentune.train import train

    out = tmp_path_factory.mktemp("train")
    cfg = RunConfig.from_dict(
        {
            "methods": ["lora"],
            "lora": {"rank": 4},
            "data": {"max_examples": 32, "max_length": 64},
            "train": {
                "max_steps": 3,
                "batch_size": 4,
                "warmup_steps": 0,
                "log_every": 1,
                "eval_batches": 1,
                "output_dir": str(out),
            },
        }
    )
    result = train(cfg)
    assert result.is_adapter
    return Path(result.final_dir)


def test_merge_and_evaluate_adapter(adapter, tmp_path):
    out = merge_and_evaluate(adapter, tmp_path / "t1", EVAL)
    assert out["error"] is None
    merged = Path(out["merged_dir"])
    assert merged == tmp_path / "t1" / "merged" and (merged / "config.json").is_file()
    assert not (merged / "adapter_config.json").exists()
    metrics = out["metrics"]
    accs = [metrics["eval/tt_next/acc"], metrics["eval/tt_antonym/acc"]]
    assert all(0.0 <= a <= 1.0 for a in accs)
    assert metrics["eval/score"] == pytest.approx(sum(accs) / 2)
    saved = json.loads((tmp_path / "t1" / "eval.json").read_text())
    assert saved["metrics"] == metrics and saved["error"] is None
    assert saved["eval_config"]["tasks"] == EVAL["tasks"] and saved["raw"]["results"]
    # resume: the same config reuses eval.json instead of evaluating again
    again = merge_and_evaluate(adapter, tmp_path / "t1", EVAL)
    assert again["metrics"] == metrics
    # keep_merged=False removes the merged model after evaluation
    gone = merge_and_evaluate(adapter, tmp_path / "t2", {**EVAL, "tasks": ["tt_next"]}, keep_merged=False)
    assert gone["error"] is None and gone["merged_dir"] is None and not (tmp_path / "t2" / "merged").exists()


def test_merge_only(adapter, tmp_path):
    """after_trial.action: merge: the same merge, no lm-eval, no eval.json."""
    out = merge_and_evaluate(adapter, tmp_path / "m", EVAL, evaluate=False)
    assert out["error"] is None and out["eval_json"] is None and out["results"] == {}
    assert set(out["metrics"]) == {"merge_s", "disk/merged_gb"}
    assert out["metrics"]["disk/merged_gb"] > 0  # what the merge wrote, reported per trial
    assert (
        out["merged_dir"] == str(tmp_path / "m" / "merged")
        and (tmp_path / "m" / "merged" / "config.json").is_file()
    )
    assert not (tmp_path / "m" / "eval.json").exists() and not (tmp_path / "m" / "merged.tmp").exists()
    missing = merge_and_evaluate(tmp_path / "nothing", tmp_path / "m2", evaluate=False)
    assert (
        missing["error"].startswith("merge failed: FileNotFoundError")
        and "adapter_config.json" in missing["error"]
    )


def test_after_trial_action_decides_merge_and_evaluation(adapter, tmp_path, monkeypatch):
    """The trial driver's ``after_training`` follows ``after_trial.action``: none does nothing, merge merges
    without evaluating, merge+eval merges and evaluates; the EvalConfig goes on as the typed object. The
    post-trial call runs in this process here (its Ray task is test_run_post_trial_as_a_ray_task's)."""
    from orchestrator.run import post_trial
    from orchestrator.run.trial import after_training
    from orchestrator.spec.sections import AfterTrial
    from tokentune.config import EvalConfig

    calls = []

    def in_process(final_dir, trial_dir, eval_cfg, *, evaluate, keep_merged, **ray_options):
        calls.append((type(eval_cfg), evaluate))
        return merge_and_evaluate(final_dir, trial_dir, eval_cfg, evaluate=evaluate, keep_merged=keep_merged)

    monkeypatch.setattr(post_trial, "run_post_trial", in_process)
    eval_cfg = EvalConfig(tasks=["tt_next"], limit=4)
    for tdir in ("none", "merge", "eval"):
        (tmp_path / tdir).mkdir()
    assert after_training(AfterTrial(action="none"), str(adapter), tmp_path / "none", eval_cfg) == {}
    assert calls == [] and not any((tmp_path / "none").iterdir())
    merged = after_training(AfterTrial(action="merge"), str(adapter), tmp_path / "merge", eval_cfg)
    assert set(merged) == {"merge_s", "disk/merged_gb"} and calls == [(EvalConfig, False)]
    assert (tmp_path / "merge" / "merged" / "config.json").is_file()
    assert not (tmp_path / "merge" / "eval.json").exists()
    scored = after_training(AfterTrial(action="merge+eval"), str(adapter), tmp_path / "eval", eval_cfg)
    assert calls[-1] == (EvalConfig, True) and scored["eval/score"] == scored["eval/tt_next/acc"]
    assert (tmp_path / "eval" / "eval.json").is_file()


def test_keep_merged_best_deletes_a_beaten_merge_as_the_sweep_runs(adapter, tmp_path, monkeypatch):
    """``keep_merged: best``: once a trial is evaluated, merged checkpoints another evaluated trial beats
    are deleted (disk stays bounded during the sweep); ``all`` keeps them until the sweep ends."""
    from orchestrator.run import post_trial
    from orchestrator.run.trial import PostTrialPlan, after_training
    from orchestrator.spec.sections import AfterTrial, Objective
    from tokentune.config import EvalConfig

    def in_process(final_dir, trial_dir, eval_cfg, *, evaluate, keep_merged, dtype, **ray_options):
        return merge_and_evaluate(final_dir, trial_dir, eval_cfg, evaluate=evaluate, dtype=dtype)

    monkeypatch.setattr(post_trial, "run_post_trial", in_process)
    trials = tmp_path / "trials"
    (trials / "best" / "merged").mkdir(parents=True)  # an evaluated trial no real score beats
    (trials / "best" / "eval.json").write_text(json.dumps({"metrics": {"eval/score": 2.0}, "error": None}))
    plan, eval_cfg = (
        PostTrialPlan(objective=Objective(), dtype="auto"),
        EvalConfig(tasks=["tt_next"], limit=4),
    )
    kept = after_training(AfterTrial(keep_merged="all"), str(adapter), trials / "kept", eval_cfg, plan)
    assert (trials / "kept" / "merged").is_dir() and kept["disk/merged_gb"] > 0
    beaten = after_training(AfterTrial(), str(adapter), trials / "beaten", eval_cfg, plan)
    assert beaten["disk/merged_gb"] > 0 and beaten["eval/score"] < 2.0
    assert not (trials / "beaten" / "merged").exists() and not (trials / "kept" / "merged").exists()
    assert (trials / "best" / "merged").is_dir()
    deleted = [json.loads(line) for line in (trials / "kept" / "events.jsonl").read_text().splitlines()]
    assert {"event": "merged deleted", "reason": "beaten", "after": "beaten"}.items() <= deleted[-1].items()


def test_full_checkpoint_is_evaluated_in_place(tmp_path):
    out = merge_and_evaluate(default_model_path(), tmp_path / "full", {"tasks": ["tt_next"], "limit": 2})
    assert out["error"] is None and out["merged_dir"] == str(default_model_path())
    assert not (tmp_path / "full" / "merged").exists() and "eval/tt_next/acc" in out["metrics"]


def test_unknown_task_is_an_error_not_silence(adapter, tmp_path):
    out = merge_and_evaluate(adapter, tmp_path / "bad", {"tasks": ["no_such_task_xyz"], "limit": 2})
    assert out["error"].startswith("evaluation failed: ValueError")
    assert "no_such_task_xyz" in out["error"] and out["metrics"].get("eval/score") is None
    saved = json.loads((tmp_path / "bad" / "eval.json").read_text())
    assert saved["error"] == out["error"] and "Traceback" in saved["traceback"]
    with pytest.raises(PostTrialError, match="no_such_task_xyz"):
        merge_and_evaluate(adapter, tmp_path / "bad", {"tasks": ["no_such_task_xyz"]}, strict=True)
    missing = merge_and_evaluate(tmp_path / "nothing", tmp_path / "bad2", EVAL)
    assert missing["error"].startswith("merge failed")


@pytest.mark.ray
def test_run_post_trial_as_a_ray_task(adapter, tmp_path, ray_local):
    ray = ray_local
    out = run_post_trial(
        adapter, tmp_path / "ray", {"tasks": ["tt_next"], "limit": 4}, resources={"num_cpus": 1}
    )
    assert out["error"] is None, out["error"]
    assert (tmp_path / "ray" / "merged" / "config.json").is_file()
    assert out["metrics"]["eval/score"] == out["metrics"]["eval/tt_next/acc"]
    bad = run_post_trial(
        adapter, tmp_path / "ray", {"tasks": ["no_such_task_xyz"]}, resources={"num_cpus": 1}
    )
    assert "no_such_task_xyz" in bad["error"]
    deadline = time.monotonic() + 30  # the task's CPU comes back (resource view updates lazily)
    while ray.available_resources().get("CPU") != 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU") == 2


@pytest.mark.ray
def test_the_pool_serves_trials_in_one_warm_process(adapter, tmp_path, ray_local):
    """Merges through the sweep's merge + eval pool (one warm worker here) run in one process that stays
    up, each call holding after_trial.cpus in a placement group that is released afterwards."""
    from orchestrator.run.post_pool import run_on_pool, start_pool
    from orchestrator.spec.sections import AfterTrial

    ray = ray_local
    name, _handle = start_pool("test-warm", AfterTrial(workers=1), ray.cluster_resources(), in_flight=1)
    pids = []
    for i in range(2):
        tdir = tmp_path / f"t{i}"
        out = run_on_pool(name, adapter, tdir, EVAL, evaluate=False, resources={"num_cpus": 1}, timeout_s=300)
        assert out["error"] is None and Path(out["merged_dir"], "config.json").is_file(), out
        events = [json.loads(line) for line in (tdir / "events.jsonl").read_text().splitlines()]
        pids.append({e["pid"] for e in events if e["event"] == "merge_started"})
        queued = [e for e in events if e["event"] == "post-trial queued"]
        assert queued and queued[0]["workers"] == 1 and queued[0]["queue"] == 0  # nothing ahead of it
    assert pids[0] == pids[1] and len(pids[0]) == 1  # the same warm process
    assert not (pids[0] & {os.getpid()})  # not this one
    deadline = time.monotonic() + 30  # the reserved CPU comes back
    while ray.available_resources().get("CPU") != 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU") == 2


def test_a_timed_out_task_is_cancelled(tmp_path, monkeypatch):
    """A merge + eval task (GPU, or URI storage) still running timeout_s after it started is cancelled;
    the pool's timeouts: tests/test_post_pool.py."""
    ray = pytest.importorskip("ray")
    from orchestrator.run import post_trial

    calls: dict = {}

    class Task:
        @staticmethod
        def remote(*args, **kwargs):
            return iter(["started-ref"])

    monkeypatch.setattr(post_trial, "as_ray_task", lambda *a, **k: Task)
    monkeypatch.setattr(ray, "cancel", lambda ref, force=False: calls.update(cancel=force))
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: post_trial.STARTED)
    monkeypatch.setattr(ray, "wait", lambda refs, timeout=None: ([], refs))
    gpu = post_trial.run_post_trial(tmp_path / "f", tmp_path / "t", resources={"num_gpus": 1}, timeout_s=5)
    assert calls["cancel"] is True
    assert gpu["error"] == "merge+eval timed out after 5 s (after_trial.timeout_s)"


def test_post_trial_options():
    from orchestrator.run.post_trial import as_ray_task, post_trial_options

    cpu = post_trial_options({"num_cpus": 2}, escape_placement_group=False)
    assert cpu == {"num_cpus": 2.0, "num_gpus": 0.0, "max_retries": 0}  # valid for .options()
    gpu = post_trial_options({"num_gpus": 1, "memory": 10**9, "A100": 0.1}, escape_placement_group=False)
    assert gpu["num_gpus"] == 1.0 and gpu["memory"] == 10**9 and gpu["resources"] == {"A100": 0.1}
    assert "max_calls" not in gpu  # only ray.remote(...) takes it; as_ray_task sets it on GPU
    as_ray_task(prune_merged, {"num_gpus": 1}, escape_placement_group=False)  # max_calls=1 (no Ray needed)


def test_prune_merged(tmp_path):
    def make():
        for tid in ("t1", "t2", "t3"):
            (tmp_path / "trials" / tid / "merged").mkdir(parents=True, exist_ok=True)
            (tmp_path / "trials" / tid / "final").mkdir(exist_ok=True)

    make()
    assert prune_merged(tmp_path, "t2", "all") == []  # keep: what stays
    deleted = prune_merged(tmp_path, "t2", "best")
    assert sorted(p.parent.name for p in deleted) == ["t1", "t3"]
    assert (tmp_path / "trials" / "t2" / "merged").is_dir() and (
        tmp_path / "trials" / "t1" / "final"
    ).is_dir()
    make()
    assert len(prune_merged(tmp_path, "t2", "none")) == 3
    with pytest.raises(ValueError, match="keep_merged='some' is invalid: expected one of best, all, none"):
        prune_merged(tmp_path, "t2", "some")


# --------------------------------------------------------------------------- tokentune eval
def eval_main(argv: list[str]) -> int:
    return cli.main(["eval", *argv])


def test_eval_cli_help_names_every_option(capsys):
    import argparse

    sub = argparse.ArgumentParser(prog="tokentune").add_subparsers()
    p = add_eval_parser(sub)
    text = p.format_help()
    for option in (
        "CHECKPOINT",
        "--tasks",
        "--limit",
        "--num-fewshot",
        "--batch-size",
        "--output",
        "--device",
    ):
        assert option in text
    assert all(a.help for a in p._actions)
    with pytest.raises(SystemExit):
        p.parse_args(["x", "--limit", "-1"])


def test_eval_cli_on_an_adapter(adapter, tmp_path, capsys):
    out = tmp_path / "res" / "eval.json"
    rc = eval_main([str(adapter), "--tasks", "tt_next,tt_antonym:1", "--limit", "2", "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "tt_next" in printed and "acc" in printed and "eval/score" in printed
    record = json.loads(out.read_text())
    assert set(record["results"]) == {"tt_next", "tt_antonym"} and "eval/score" in record["metrics"]
    assert record["raw"]["n-shot"]["tt_antonym"] == 1
    rc = eval_main([str(adapter), "--tasks", "no_such_task_xyz"])
    err = capsys.readouterr().err
    assert rc == 2 and "no_such_task_xyz" in err and len(SHIPPED_TASK_FAMILIES) == 4
    assert eval_main([str(tmp_path / "missing")]) == 2
    assert os.path.exists(out)
