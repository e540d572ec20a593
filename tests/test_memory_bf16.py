"""The memory estimate against the measured breakdown under bf16: bf16 weights, and bf16 autocast over
fp32 weights, for the allowed method combinations (a file of its own so that the two long estimate sweeps,
fp32 in ``test_memory.py`` and bf16 here, run on different test workers)."""

from __future__ import annotations

import pytest

from tests.conftest import (
    SPARSE_METHODS,
    check_estimate,
    memory_run_dict,
    reached_sparse_peak,
    sampled_combinations,
)
from tokentune.config import RunConfig
from tokentune.estimate import autocast_on
from tokentune.train import train

# ---- bf16: bf16 weights, and bf16 autocast over fp32 weights ------------------------------------------------
#: setting -> (model.dtype, train.bf16)
BF16 = {"bf16-weights": ("bfloat16", "true"), "autocast-fp32-weights": ("float32", "true")}


def bf16_run_dict(methods, setting, data, out_dir, max_length, steps=8) -> dict:
    dtype, bf16 = BF16[setting]
    d = memory_run_dict(methods, data, out_dir, max_length=max_length, steps=steps)
    d["model"] = {"dtype": dtype}
    d["train"]["bf16"] = bf16
    if "qlora" in methods:  # the 4-bit matmuls compute in the weights' dtype
        d["qlora"] = {"compute_dtype": dtype}
    return d


@pytest.mark.slow
@pytest.mark.parametrize("setting", BF16)
@pytest.mark.parametrize("methods", sampled_combinations(everything=False), ids=lambda m: "+".join(m))
def test_estimate_matches_measured_bf16(methods, setting, long_rows, tmp_path, one_thread):
    steps = 8 if any(m in methods for m in SPARSE_METHODS) else 2  # the second step has every state
    cfg = RunConfig.from_dict(bf16_run_dict(methods, setting, long_rows, tmp_path / "out", 128, steps))
    res = train(cfg)
    assert res.memory["memory/peak_seq_len"] == 128
    if any(m in methods for m in SPARSE_METHODS):
        assert reached_sparse_peak(res.history, 4), "IST/RST never trained every layer in 8 steps"
    assert check_estimate(cfg, res.memory) == []


@pytest.mark.parametrize(
    "methods, setting",
    [(["qlora", "lora", "tokentune"], "bf16-weights"), (["full"], "autocast-fp32-weights")],
    ids=["qlora+lora+tokentune-bf16-weights", "full-autocast-fp32-weights"],
)
def test_estimate_matches_measured_bf16_fast(methods, setting, long_rows, tmp_path, one_thread):
    """QLoRA's fp32 upcast and LoRA's input copies under autocast; autocast's bf16 copies of fp32
    weights and of each linear's input (full fine-tuning). Every combination: the slow test above."""
    cfg = RunConfig.from_dict(bf16_run_dict(methods, setting, long_rows, tmp_path / "o", 64, steps=2))
    assert autocast_on(cfg)
    res = train(cfg)
    assert check_estimate(cfg, res.memory) == []
