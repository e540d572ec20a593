"""The memory levers beside the methods: ZeRO-Offload (``compute.offload``), 8-bit optimizer states
(``train.optimizer``) and the time every run measures (``time/*``, ``tokentune.timing``).

Fast: the config decisions, the estimate's optimizer and host terms (the 8-bit term against
bitsandbytes' real state tensors), the step-cost model, the results columns. Slow: one CPU run with
``adamw_8bit``; one run through the real DeepSpeed engine with ZeRO-Offload (one gloo rank in a fresh
process: ZeRO-2 + optimizer offload, full fine-tuning; ZeRO-3 + optimizer+params, LoRA). GPU: the paged
optimizer.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import check_estimate, free_port, memory_run_dict, refused
from tokentune.config import ConfigError, RunConfig
from tokentune.engine import deepspeed_config
from tokentune.estimate import estimate_memory
from tokentune.memory import distinct_bytes
from tokentune.optimizers import optimizer_state_bytes
from tokentune.timing import TIME_METRICS, StepClock, expected_depth, relative_step_cost, worker_hours

ROOT = Path(__file__).resolve().parent.parent


def _spec(**base) -> dict:
    return {"base": base}


# ---- config decisions (before Ray) ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "offload, stage", [("optimizer", None), ("optimizer", 0), ("optimizer", 1), ("optimizer+params", 2)]
)
def test_offload_outside_its_zero_stages_is_refused_naming_compute_offload(offload, stage):
    compute = {"offload": offload, "zero_stage": stage}
    err = refused(_spec(compute=compute), "base", f"compute.offload={offload!r}", "compute.zero_stage")
    assert ("2 or 3" if offload == "optimizer" else "zero_stage 3") in err
    refused(
        _spec(compute={"offload": "gpu"}),
        "base",
        "compute.offload='gpu'",
        "none, optimizer, optimizer+params",
    )


def test_offload_within_its_stages_is_accepted_and_reaches_deepspeeds_config():
    for offload, stage in (("optimizer", 2), ("optimizer", 3), ("optimizer+params", 3)):
        RunConfig.from_dict({"compute": {"offload": offload, "zero_stage": stage}})
    zero = deepspeed_config(3, 2, 1, 1.0, False, offload="optimizer+params")["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    zero = deepspeed_config(2, 2, 1, 1.0, False, offload="optimizer")["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and "offload_param" not in zero
    assert "offload_optimizer" not in deepspeed_config(2, 2, 1, 1.0, False)["zero_optimization"]


def test_eight_bit_optimizers_refused_where_they_cannot_run(monkeypatch):
    refused(_spec(train={"optimizer": "sgd"}), "base", "train.optimizer='sgd'", "adamw_8bit")
    # under DeepSpeed: ZeRO steps its own fp32 partitions
    refused(
        _spec(train={"optimizer": "adamw_8bit"}, compute={"zero_stage": 2}),
        "base",
        "train.optimizer",
        "zero_stage",
    )
    # paged on a CPU run: bitsandbytes has no paged CPU kernel (it would silently run unpaged)
    d = _spec(train={"optimizer": "paged_adamw_8bit"}, compute={"use_gpu": False})
    refused(d, "base", "train.optimizer='paged_adamw_8bit'", "GPU", "adamw_8bit")
    # bitsandbytes not installed: the real find_spec answers None for it
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    refused(
        _spec(train={"optimizer": "adamw_8bit"}),
        "base",
        "train.optimizer='adamw_8bit'",
        "pip install bitsandbytes",
    )


# ---- the estimate ----------------------------------------------------------------------------------------
def test_estimate_keeps_offloaded_state_on_the_host_not_the_device():
    def est(**compute):
        return estimate_memory(RunConfig.from_dict({"methods": ["full"], "compute": compute}))

    on_device, opt, params = (
        est(zero_stage=3),
        est(zero_stage=3, offload="optimizer"),
        est(zero_stage=3, offload="optimizer+params"),
    )
    assert on_device.host_gb == 0 and "memory/estimate_host_gb" not in on_device.metrics()
    assert opt.total_gb == pytest.approx(on_device.total_gb)  # the same tensors, placed elsewhere
    assert opt.host_gb == pytest.approx(opt.grads_gb + opt.optimizer_gb)
    assert params.host_gb == pytest.approx(params.grads_gb + params.optimizer_gb + params.weights_gb)
    assert opt.fit_gb == pytest.approx(on_device.fit_gb - opt.host_gb)  # what the device must hold
    assert params.fit_gb < opt.fit_gb < on_device.fit_gb
    assert opt.metrics()["memory/estimate_host_gb"] == pytest.approx(opt.host_gb)


def test_eight_bit_state_term_matches_bitsandbytes_state_tensors():
    """The estimate's 8-bit term against the real optimizer's states after a step: tensors below 4096
    elements keep fp32 states, larger ones uint8 states with an fp32 absmax per 256-element block."""
    bnb = pytest.importorskip("bitsandbytes")
    sizes = [300, 4096, 5000, 70_000]
    params = [torch.nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(n))) for n in sizes]
    opt = bnb.optim.AdamW8bit(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    states = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert optimizer_state_bytes("adamw_8bit", sizes) == distinct_bytes(states)
    assert optimizer_state_bytes("adamw", sizes) == 8 * sum(sizes)


def test_estimate_optimizer_term_follows_train_optimizer():
    def est(methods, optimizer):
        return estimate_memory(RunConfig.from_dict({"methods": methods, "train": {"optimizer": optimizer}}))

    full, full8 = est(["full"], "adamw"), est(["full"], "adamw_8bit")
    assert full.optimizer_gb == pytest.approx(2 * full.grads_gb)  # AdamW: two fp32 states per parameter
    assert 0.24 < full8.optimizer_gb / full.optimizer_gb < 0.27  # ~2 bytes + absmax of 8 (norms: fp32)
    assert full8.weights_gb == full.weights_gb and full8.activations_gb == full.activations_gb


# ---- time ----------------------------------------------------------------------------------------------
def test_worker_hours_and_the_step_clock():
    assert worker_hours(2, 0, 3600) == 2  # CPU workers count one each
    assert worker_hours(2, 4, 1800) == 4
    assert worker_hours(1, 0.5, 3600) == 1  # a fraction of a GPU counts as one
    clock = StepClock(world=2)
    assert clock.metrics() == {}
    for tokens in (10, 30, 20):
        clock.start_step()
        clock.add_tokens(tokens)
        clock.end_step()
    m = clock.metrics()
    assert set(m) == set(TIME_METRICS)
    assert m["time/step_s"] == statistics.median(clock.steps)
    assert m["time/train_s"] >= sum(clock.steps)
    assert m["time/tokens_per_s"] == pytest.approx(60 * 2 / m["time/train_s"])
    assert m["time/worker_hours"] == pytest.approx(2 * m["time/train_s"] / 3600)


def test_expected_backward_depth_matches_every_uniform_draw():
    for layers, active in ((4, 1), (4, 2), (6, 3), (5, 5)):
        draws = list(itertools.combinations(range(layers), active))
        exact = sum(layers - min(d) for d in draws) / len(draws)
        assert expected_depth(layers, active) == pytest.approx(exact)


def test_relative_step_cost_of_the_methods():
    def cost(methods, **sections):
        return relative_step_cost(RunConfig.from_dict({"methods": methods, **sections}))

    assert cost(["lora"]) == cost(["full"]) == cost(["qlora", "lora"]) == 1.0  # each its own baseline
    tt = [cost(["lora", "tokentune"], tokentune={"ratio": r}) for r in (0.1, 0.5, 1.0)]
    assert tt[0] < tt[1] < tt[2] == pytest.approx(1.0)
    # full fine-tuning also skips weight gradients for the unselected tokens: it saves a larger share
    assert cost(["full", "tokentune"], tokentune={"ratio": 0.3}) < cost(
        ["lora", "tokentune"], tokentune={"ratio": 0.3}
    )
    ist = [cost(["lora", "ist"], ist={"budget": b}) for b in (0.25, 0.5, 1.0)]
    assert ist[0] < ist[1] < ist[2] == pytest.approx(1.0)


def test_results_rows_carry_time_and_host_memory(tmp_path):
    from orchestrator.results.report import results_table, write_csv

    metrics = {"memory/train_gb": 0.1, "memory/host_gb": 0.05, "eval/score": 0.5}
    metrics.update({k: 1.0 + i for i, k in enumerate(TIME_METRICS)})
    rows = results_table([{"trial_id": "t0", "status": "finished", "metrics": metrics, "searched": {}}])
    for key in ("memory/host_gb", *TIME_METRICS):
        assert rows[0][key] == metrics[key], key
    header = write_csv(rows, tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert set(TIME_METRICS) <= set(header)


def test_objective_may_be_a_time_metric():
    from orchestrator.spec.sections import Objective

    assert Objective(metric="time/worker_hours", mode="min").metric == "time/worker_hours"


# ---- measured runs ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_adamw_8bit_trains_on_cpu_with_its_estimate_and_time(long_rows, tmp_path, one_thread):
    pytest.importorskip("bitsandbytes")
    from tokentune.train import train

    d = memory_run_dict(["full"], long_rows, tmp_path / "out", max_length=64, steps=3)
    d["train"]["optimizer"] = "adamw_8bit"
    cfg = RunConfig.from_dict(d)
    res = train(cfg)
    m = res.memory
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history if "loss" in h)
    assert check_estimate(cfg, m) == []
    est = estimate_memory(cfg)
    assert m["memory/optimizer_gb"] == pytest.approx(est.optimizer_gb, rel=0.02)  # 8-bit, not AdamW's 8 B
    last = res.history[-1]
    assert set(TIME_METRICS) <= set(last) and res.time == {k: last[k] for k in TIME_METRICS}
    assert 0 < last["time/step_s"] <= last["time/train_s"]
    assert last["time/worker_hours"] == pytest.approx(last["time/train_s"] / 3600)
    summary = json.loads((tmp_path / "out" / "result.json").read_text())
    assert summary["time"]["time/train_s"] == pytest.approx(last["time/train_s"])
    # the paged optimizer is refused on this CPU run once the device is known (use_gpu: auto)
    d["train"]["optimizer"], d["train"]["output_dir"] = "paged_adamw_8bit", str(tmp_path / "paged")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.optimizer='paged_adamw_8bit'"):
            train(RunConfig.from_dict(d))


def _offload_runs(port: int, out_dir: str) -> None:
    """One gloo rank (a fresh process): ZeRO-2 + optimizer offload (full) and ZeRO-3 + optimizer+params
    (LoRA) through ``tokentune.train``; prints, per run, the optimizer class it built and its metrics."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")  # fmt: skip
    torch.set_num_threads(1)
    import torch.distributed as dist

    import tokentune.train as core
    from orchestrator.run.train_worker import import_deepspeed
    from tokentune.estimate import measured_estimate_metrics

    dist.init_process_group("gloo", rank=0, world_size=1)
    import_deepspeed()
    built: list[str] = []
    real_build = core.build_optimizer

    def recording_build(*args):
        opt = real_build(*args)
        built.append(type(opt).__name__)
        return opt

    core.build_optimizer = recording_build  # observe the real optimizer; nothing is replaced
    report = {}
    for methods, stage, offload in ((["full"], 2, "optimizer"), (["lora"], 3, "optimizer+params")):
        cfg = RunConfig.from_dict({
            "methods": methods, "compute": {"zero_stage": stage, "offload": offload, "use_gpu": False},
            "data": {"max_examples": 16, "max_length": 32},
            "train": {"output_dir": f"{out_dir}/{offload}", "max_steps": 3, "log_every": 1, "batch_size": 2},
        })  # fmt: skip
        res = core.train(cfg)
        last = res.history[-1]
        report[offload] = {**last, **measured_estimate_metrics(cfg, res.memory), "optimizer": built[-1]}
    print(json.dumps(report))
    dist.destroy_process_group()


@pytest.mark.slow
def test_zero_offload_trains_through_deepspeed_with_host_memory_measured(tmp_path):
    """The real DeepSpeed engine on one gloo rank: DeepSpeedCPUAdam steps the offloaded partitions; the
    host share measured by role (on CPU device and host are one RAM) matches the estimate's."""
    code = f"import tests.test_levers as t; t._offload_runs({free_port()}, {str(tmp_path)!r})"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for offload, m in report.items():
        assert m["optimizer"] == "DeepSpeedCPUAdam", offload
        assert torch.isfinite(torch.tensor(m["loss"])), offload
        assert m["memory/host_gb"] == pytest.approx(m["memory/estimate_host_gb"], rel=0.05), offload
        assert 0.85 <= m["memory/estimate_ratio"] <= 1.15, (offload, m["memory/estimate_ratio"])
        assert set(TIME_METRICS) <= set(m), offload
    opt, params = report["optimizer"], report["optimizer+params"]
    # optimizer offload: the fp32 master, its gradient and both states; with params: the weights' partitions
    assert opt["memory/host_gb"] == pytest.approx(opt["memory/grads_gb"] + opt["memory/optimizer_gb"])
    assert params["memory/host_gb"] == pytest.approx(
        params["memory/grads_gb"] + params["memory/optimizer_gb"] + params["memory/weights_gb"], rel=0.05
    )


@pytest.mark.gpu
def test_paged_adamw_8bit_on_cuda_matches_its_estimate(long_rows, tmp_path):
    pytest.importorskip("bitsandbytes")
    from tokentune.train import train

    d = memory_run_dict(["full"], long_rows, tmp_path / "out", max_length=128, steps=3)
    d["compute"] = {"use_gpu": True}
    d["train"].update(optimizer="paged_adamw_8bit", bf16="false")
    cfg = RunConfig.from_dict(d)
    res = train(cfg)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history if "loss" in h)
    assert res.memory["memory/optimizer_gb"] == pytest.approx(estimate_memory(cfg).optimizer_gb, rel=0.02)
    assert set(TIME_METRICS) <= set(res.history[-1])
