"""The benchmark scripts run and report what their issues ask for (tiny sizes; no timing asserted)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

#: tiny models gain nothing from threads and lose 10-30x to them on a busy 2-core machine (no timing is
#: asserted here; the scripts' own thread option stays at its default)
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--seq", "64", "--hidden", "64", "--heads", "4", "--layers", "4", "--vocab", "500", "--steps", "2"]


def test_methods_bench_rows_and_memory_ordering(capsys):
    import methods as bench

    bench.main([*TINY, "--modes", "lora", "--variants", "stock,tokentune,ist,rst", "--ratios", "0.3,1.0",
                "--json", "--no-isolate"])  # fmt: skip
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["method"], r["ratio"]) for r in rows] == [
        ("stock", None), ("tokentune", 0.3), ("tokentune", 1.0), ("ist", 0.25), ("ist", 0.5),
        ("rst", 0.25), ("rst", 0.5),
    ]  # fmt: skip
    for r in rows:
        assert {"method", "ratio", "seq_len", "saved_bytes", "peak_bytes", "step_s", "probe_share"} <= set(r)
        assert r["saved_act_bytes"] > 0 and r["step_s"] > 0
    act = {(r["method"], r["ratio"]): r["saved_act_bytes"] for r in rows}
    stock = act[("stock", None)]
    assert act[("tokentune", 0.3)] < 0.6 * stock  # a token subset saves a fraction of the activations
    assert abs(act[("tokentune", 1.0)] - stock) <= 0.05 * stock  # every token: what stock saves
    assert act[("ist", 0.25)] < act[("ist", 0.5)] < stock  # fewer layers, fewer activations
    assert act[("rst", 0.25)] < stock
    probes = {r["method"]: r["probe_share"] for r in rows if r["ratio"] == 0.25}
    assert probes["ist"] > 0 and probes["rst"] == 0  # IST's measured window holds a probe round


def test_methods_bench_rejects_unknown_variant(capsys):
    import methods as bench
    import pytest

    with pytest.raises(SystemExit):
        bench.main([*TINY, "--variants", "stock,lisa"])
    assert "--variants: unknown ['lisa']" in capsys.readouterr().err


def test_quality_bench_runs_each_variant_and_ratio_one_equals_lora(tmp_path, capsys):
    """bench/quality.py trains and evaluates each (variant, setting, seed); TokenTune at ratio 1.0
    must reproduce the LoRA run of the same seed (every token selected is stock training), so their rows agree."""
    import quality

    table = quality.main(["--variants", "lora,tokentune", "--ratios", "0.3,1.0", "--steps", "4", "--seeds", "0",
                          "--limit", "12", "--json", "--out", str(tmp_path)])  # fmt: skip
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["variant"], r["setting"]) for r in rows] == [
        ("lora", None),
        ("tokentune", 0.3),
        ("tokentune", 1.0),
    ]
    assert rows[1]["methods"] == ["lora", "tokentune"]
    for r in rows:
        assert set(r["acc"]) == {"tokentune_mini", "tt_category", "tt_antonym", "tt_next", "tt_largest"}
        assert r["val_loss"] > 0 and r["steps"] == 4
    lora, full_ratio = rows[0], rows[2]
    assert abs(lora["val_loss"] - full_ratio["val_loss"]) < 1e-4, (lora["val_loss"], full_ratio["val_loss"])
    assert lora["acc"] == full_ratio["acc"]
    assert [t["acc_sd"] for t in table] == [0.0, 0.0, 0.0] and "acc (mean ± sd)" in out
    # the answer-token budget: LoRA and ratio 1.0 train every supervised position, r = 0.3 a part of them
    assert lora["answer_tokens"] == lora["supervised_tokens"] == full_ratio["answer_tokens"] > 0
    assert 0 < rows[1]["answer_tokens"] < rows[1]["supervised_tokens"] == lora["supervised_tokens"]
    assert "ans/seq" in out and "tasks: mini" in out


def test_quality_bench_task_sets_and_labelled_selection(tmp_path, capsys):
    """--tasks both trains each task set on its own data and scores its own group; the labelled
    variant runs TokenTune with select=labelled, whose budget covers more answer tokens than uniform's."""
    import quality

    table = quality.main(["--tasks", "both", "--variants", "lora,tokentune_labelled", "--steps", "2", "--seeds", "0",
                          "--limit", "8", "--json", "--out", str(tmp_path)])  # fmt: skip
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["tasks"], r["variant"]) for r in rows] == [
        ("mini", "lora"), ("mini", "tokentune_labelled"), ("multi", "lora"), ("multi", "tokentune_labelled"),
    ]  # fmt: skip
    assert set(rows[2]["acc"]) == {"tokentune_multi", "tt_sort", "tt_series", "tt_opposites"}
    assert [t["metric"] for t in table] == ["tokentune_mini"] * 2 + ["tokentune_multi"] * 2
    assert "tasks: mini" in out and "tasks: multi" in out
    cfg = json.loads((tmp_path / "run004" / "run_config.json").read_text())
    assert cfg["tokentune"]["select"] == "labelled" and cfg["methods"] == ["lora", "tokentune"]
    assert rows[2]["supervised_tokens"] > 4 * rows[0]["supervised_tokens"]  # multi-token answers
    for lora, labelled in (rows[0:2], rows[2:4]):
        assert labelled["supervised_tokens"] == lora["supervised_tokens"]
        assert labelled["answer_tokens"] > 0.8 * lora["answer_tokens"]  # answers are drawn first


def test_quality_bench_rejects_unknown_variant(capsys):
    import pytest
    import quality

    with pytest.raises(SystemExit):
        quality.main(["--variants", "lora,lisa"])
    assert "--variants: unknown ['lisa']" in capsys.readouterr().err


@pytest.mark.slow
def test_memory_bench_rows_shares_and_overhead(tmp_path, capsys):
    """bench/memory.py: every row trains through tokentune.train (a subprocess each) and reports the
    estimate next to the measured breakdown; full fine-tuning is 100%; the methods save what they claim."""
    import memory as bench

    tiny = [*TINY[:-4], "--vocab", "1700", *TINY[-2:]]  # the shipped tokenizer's ids must fit
    args = [*tiny, "--sparse-steps", "8", "--cache-dir", str(tmp_path), "--json"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    rows = {r["row"]: r for r in (json.loads(line) for line in out.splitlines() if line.startswith("{"))}
    assert list(rows) == list(bench.ROWS)
    assert "train %full" in out and "100%" in out
    for r in rows.values():
        assert abs(r["estimate_gb"] / r["train_gb"] - 1) < 0.15, r
    train = {k: r["train_gb"] for k, r in rows.items()}
    assert train["qlora"] < train["lora"] < train["full"]
    assert train["lora+tokentune"] < train["lora"] and train["qlora+tokentune"] < train["qlora"]
    assert rows["lora+ist"]["grads_gb"] < rows["lora"]["grads_gb"]
    for base in ("lora", "lora+tokentune"):  # checkpointing keeps layer inputs instead of activations
        assert rows[f"{base}+checkpointing"]["activations_gb"] < rows[base]["activations_gb"]
    assert bench.main([*tiny, "--cache-dir", str(tmp_path), "--overhead", "--rounds", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert res["step_s_sampled"] > 0 and res["step_s_unsampled"] > 0


def test_memory_bench_rows_probe_with_the_training_batch_and_combinations_cover_the_registry(tmp_path):
    """bench/memory.py: IST's probe batch is the training batch (its default of 16 sequences would set
    IST's peak), and ``--combinations`` runs the method contract's list in both bf16 settings."""
    import memory as bench

    tiny = [*TINY[:-4], "--vocab", "1700", *TINY[-2:]]  # the shipped tokenizer's ids must fit
    args = bench.parse_args([*tiny, "--batch", "3", "--cache-dir", str(tmp_path)])
    args.model = "unused"  # run_config only: no checkpoint is built
    assert bench.run_config(args, ["lora", "ist"], str(tmp_path))["ist"]["probe_batch_size"] == 3
    combos = bench.parse_args(["--combinations", "--dtype", "bfloat16"])
    assert (combos.seq, combos.batch) == (128, 2) and Path(combos.model, "config.json").exists()
    assert {v for v in bench.BF16_SETTINGS.values()} == {("bfloat16", "true"), ("float32", "true")}


def _scale_result(n: int, nodes: int, rss_growth: float = 0.0) -> dict:
    """What ``sweep_scale.run_one`` returns, made up: ``n`` trials over ``nodes`` driver processes (one
    per node); each process's first trial pays its imports (cold), RSS grows by ``rss_growth`` overall."""
    usage = []
    for i in range(n):
        usage.append(
            {"time": float(i), "pid": 100 + i % nodes, "node": f"127.0.0.{2 + i % nodes}", "cold": i < nodes,
             "driver_cpu_s": 4.0 if i < nodes else 0.6 + 0.01 * (i % 3),
             "driver_rss_mb": 560.0 * (1 + rss_growth * i / n), "worker_node": f"127.0.0.{2 + (i + 1) % nodes}",
             "train_exit": 1.0}
        )  # fmt: skip
    return {
        "trials": n, "interrupted": False, "finished": n, "failed": 0, "failed_tracking_or_queue": 0,
        "errors": [], "resumed_finished": n, "usage": usage, "peak_mb": {"driver": 562, "controller": 470},
        "gcs_cpu_s": 30.0, "tune_mb": 20.0, "mlflow_mb": 70.0, "queued": [], "stalls": [0.05, 0.1],
        "wall_s": 1000.0, "resume_s": 2.0,
    }  # fmt: skip


def test_scale_bench_table_checks_flat_driver_usage_and_placement_on_every_node(tmp_path):
    """The scale bench's verdict (bench/sweep_scale.py), without a cluster: cold starts kept apart, the
    last 50 trials against the first 50, and a trial driver on every node."""
    import sweep_scale as bench

    text, ok = bench.report(_scale_result(200, 4), nodes=4)
    assert ok, text
    assert "driver processes (cold start CPU)" in text and "4 (" in text  # one cold start per process
    assert "127.0.0.5: 50" in text and "flat within 25%" in text and "NOT flat" not in text
    leaking, ok = bench.report(_scale_result(200, 4, rss_growth=0.6), nodes=4)
    assert not ok and "NOT flat" in leaking
    _, ok = bench.report(_scale_result(200, 4), nodes=5)  # no driver on the fifth node
    assert not ok
    # the rows come from the trial folders: node of the driver, its process's first trial, the worker's node
    for i, (pid, worker) in enumerate([(7, 70), (7, 71), (8, 72)]):
        d = tmp_path / f"t{i}"
        d.mkdir()
        events = [
            {"event": "trial started", "time": 10.0 * i, "pid": pid, "node": f"127.0.0.{2 + i}"},
            {"event": "workers_ready", "time": 10.0 * i + 1, "pid": worker},
            {
                "event": "logged",
                "time": 10.0 * i + 5,
                "pid": pid,
                "driver_cpu_s": 1.0,
                "driver_rss_mb": 500.0,
            },
        ]
        (d / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    trials = [{"dir": str(tmp_path / f"t{i}"), "metrics": {"phase/train_exit_s": 0.9}} for i in range(3)]
    rows = bench.trial_usage(trials, {70: "127.0.0.2", 71: "127.0.0.9"})
    assert [(r["node"], r["worker_node"], r["cold"]) for r in rows] == [
        ("127.0.0.2", "127.0.0.2", True), ("127.0.0.3", "127.0.0.9", False), ("127.0.0.4", "?", True),
    ]  # fmt: skip


def test_levers_table_groups_a_sweeps_trials_by_setup(tmp_path):
    """``bench/levers_table.py``: one row per setup in the spec's order, medians over the finished trials
    (a failed one left out), memory in MB and as a share of the first setup's."""
    import json
    import subprocess
    import sys

    import yaml

    setups = [
        {"name": "lora", "methods": ["lora"]},
        {"name": "lora+ckpt", "methods": ["lora", "checkpointing"]},
    ]
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"search": {"setup": {"grid": setups}}}))
    trials = [("lora", "finished", 0.04), ("lora", "finished", 0.02), ("lora+ckpt", "finished", 0.015)]
    trials += [("lora+ckpt", "failed", None)]
    for i, (name, status, gb) in enumerate(trials):
        (tmp_path / "trials" / str(i)).mkdir(parents=True)
        metrics = {"memory/train_gb": gb, "eval/score": 0.5 + i / 100} if gb else {}
        done = {"status": status, "searched": {"setup": setups[name != "lora"]}, "metrics": metrics}
        (tmp_path / "trials" / str(i) / "status.json").write_text(json.dumps(done))
    out = subprocess.run(
        [sys.executable, "bench/levers_table.py", str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out[2:]]
    assert [r[:4] for r in rows] == [
        ["lora", "2", "0.505 (0.500-0.510)", "30.7"],
        ["lora+ckpt", "1", "0.520 (0.520-0.520)", "15.4"],
    ]
    assert rows[1][-2] == "0.50"  # memory vs the first setup
