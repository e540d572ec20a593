"""``bench/gpu_check.sh --dry``: every step of the device check that needs no CUDA, on this CPU machine
(the attention probe under the simulated CUDA decision, the GPU tests collected, bench/memory.py on a
tiny Llama, the DeepSpeed run's config), and the summary it leaves in the output folder."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_gpu_check_dry_runs_every_cpu_step(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(out)}
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["step"]: s for s in summary["steps"]}
    assert list(steps) == ["env", "attention", "gpu tests", "memory 7B", "deepspeed"]
    assert all(s["status"] in ("pass", "skipped") for s in steps.values()), steps
    assert steps["attention"]["status"] == "pass"
    probe = json.loads(steps["attention"]["note"])
    assert probe["agree"] and probe["split_calls"] == [[4, 4, True, False]]  # K/V repeated, as stock
    assert "collected" in steps["gpu tests"]["note"]
    assert [r["row"] for r in summary["memory"]] == ["lora+tokentune"]
    text = (out / "summary.md").read_text()
    assert "| attention | pass |" in text and "## Memory per row (GB)" in text
