"""The GPU defaults, decided by our functions and checked on CPU: ``model.dtype: auto`` (bf16 where CUDA
supports it), ``after_trial.gpus: auto`` (a GPU for merge + eval when trials train on GPUs), the merge in
the training dtype on its device, ``after_trial.keep_merged: best`` pruning beaten merged checkpoints
while the sweep runs (and ``disk/merged_gb`` per trial)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestrator.run.keep_merged import folder_gb, prune_beaten
from orchestrator.spec.sections import AfterTrial
from orchestrator.spec.sweep import SpecError, load_spec
from tokentune.config import ConfigError, RunConfig
from tokentune.estimate import estimate_memory
from tokentune.models import weights_dtype

pytestmark = pytest.mark.usefixtures("one_thread")


def test_model_dtype_auto_is_bf16_where_cuda_supports_it(monkeypatch):
    assert RunConfig.from_dict({}).model.dtype == "auto"
    assert weights_dtype("auto", "cpu") == weights_dtype("auto", None) == "float32"
    assert weights_dtype("float16", "cpu") == "float16"  # an explicit dtype as given
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert weights_dtype("auto", "cuda") == weights_dtype("auto", torch.device("cuda", 1)) == "bfloat16"
    assert weights_dtype("auto", "cpu") == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100
    assert weights_dtype("auto", "cuda") == "float32"
    with pytest.raises(ConfigError, match="model.dtype.*auto, float32"):
        RunConfig.from_dict({"model": {"dtype": "float8"}})


def test_estimate_plans_auto_dtype_per_device():
    """``auto`` weights are planned as 2 bytes when trials train on GPUs, 4 on CPU."""
    base = {"methods": ["full"], "data": {"max_length": 32}}
    cpu = estimate_memory(RunConfig.from_dict({**base, "compute": {"use_gpu": False}}))
    gpu = estimate_memory(RunConfig.from_dict({**base, "compute": {"use_gpu": True}}))
    fp32 = estimate_memory(RunConfig.from_dict({**base, "model": {"dtype": "float32"}}))
    assert cpu.weights_gb == fp32.weights_gb == pytest.approx(2 * gpu.weights_gb)


def test_after_trial_gpus_auto_follows_the_trials_device():
    from orchestrator.run.space import post_trial_gpus, trial_demand

    assert AfterTrial().gpus == "auto"
    assert AfterTrial().gpus_for(True) == 1.0 and AfterTrial().gpus_for(False) == 0.0
    assert AfterTrial(gpus=0.5).gpus_for(True) == 0.5 and AfterTrial(gpus=0).gpus_for(True) == 0.0
    gpu = load_spec({"name": "g", "base": {"compute": {"use_gpu": True}}})
    cpu = load_spec({"name": "c", "base": {"compute": {"use_gpu": False}}})
    auto = load_spec({"name": "a"})  # compute.use_gpu: auto, decided by the cluster
    assert post_trial_gpus(gpu) == 1.0 and post_trial_gpus(cpu) == 0.0
    assert post_trial_gpus(auto, {"CPU": 8}) == 0.0 and post_trial_gpus(auto, {"CPU": 8, "GPU": 2}) == 1.0
    assert trial_demand(cpu)["GPU"] == 0.0 and trial_demand(gpu)["GPU"] == 1.0
    with pytest.raises(SpecError, match="after_trial.gpus.*auto or a number >= 0"):
        load_spec({"name": "x", "after_trial": {"gpus": "some"}})


def test_merge_loads_the_base_in_the_training_dtype(tmp_path):
    """The merged checkpoint is written in the dtype the run trained in (``auto`` on CPU: float32)."""
    from safetensors import safe_open

    from tokentune.merge import merge_adapter
    from tokentune.train import train

    cfg = RunConfig.from_dict(
        {
            "methods": ["lora"],
            "data": {"max_examples": 8, "max_length": 32},
            "train": {
                "max_steps": 1,
                "batch_size": 2,
                "warmup_steps": 0,
                "output_dir": str(tmp_path / "run"),
            },
        }
    )
    final = Path(train(cfg).final_dir)
    for dtype, expected in (("bfloat16", torch.bfloat16), ("auto", torch.float32)):
        out = merge_adapter(final, tmp_path / dtype, dtype=dtype, device="cpu")
        (weights,) = out.glob("*.safetensors")
        with safe_open(str(weights), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {expected}, dtype
    with pytest.raises(ConfigError, match="merge dtype='int8' is invalid: expected auto, float32"):
        merge_adapter(final, tmp_path / "bad", dtype="int8")


def _trial(trials: Path, name: str, score: float | None, error: str | None = None) -> Path:
    t = trials / name
    (t / "merged").mkdir(parents=True)
    (t / "merged" / "model.safetensors").write_bytes(b"\0" * 1024)
    if score is not None or error:
        metrics = {} if score is None else {"eval/score": score}
        (t / "eval.json").write_text(json.dumps({"metrics": metrics, "error": error}))
    return t


def test_prune_beaten_keeps_the_best_and_the_unevaluated(tmp_path):
    trials = tmp_path / "trials"
    low, high, tie = _trial(trials, "a", 0.2), _trial(trials, "b", 0.7), _trial(trials, "c", 0.7)
    running, failed = _trial(trials, "d", None), _trial(trials, "e", None, error="evaluation failed")
    assert prune_beaten(trials, "eval/score", "max") == [low / "merged"]
    assert not (low / "merged").exists()
    assert all((t / "merged").is_dir() for t in (high, tie, running, failed))
    assert prune_beaten(trials, "eval/score", "min") == [high / "merged", tie / "merged"]  # lower is better
    assert prune_beaten(tmp_path / "none", "eval/score", "max") == []
    assert folder_gb(running / "merged") == pytest.approx(1024 / 1024**3)
    with pytest.raises(ValueError, match="mode='best' is invalid: expected max or min"):
        prune_beaten(trials, "eval/score", "best")
