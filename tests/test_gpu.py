"""The GPU path, run where CUDA is visible (skipped elsewhere): ``python -m pytest -m gpu``.

Training on CUDA through the same loop: bf16 autocast, 4-bit QLoRA kernels, TokenTune's split
forward; the measured breakdown next to the CUDA allocator's peak, and the estimate against both.
The GPU benchmark is ``python bench/memory.py --device cuda --preset llama2-7b --seq 2048 --batch 1``.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import check_estimate, memory_run_dict
from tokentune.config import RunConfig
from tokentune.train import train

pytestmark = pytest.mark.gpu

COMBOS = [["full"], ["lora"], ["qlora", "lora"], ["lora", "tokentune"], ["qlora", "lora", "tokentune"],
          ["lora", "ist"], ["dora", "rst", "tokentune"]]  # fmt: skip


@pytest.mark.parametrize("methods", COMBOS, ids=lambda m: "+".join(m))
def test_trains_on_cuda_with_memory_breakdown(methods, long_rows, tmp_path):
    if "qlora" in methods:  # the lent GPU machine has no bitsandbytes unless its wheel came along
        pytest.importorskip("bitsandbytes")
    d = memory_run_dict(methods, long_rows, tmp_path / "out", max_length=128)
    d["compute"] = {"use_gpu": True}
    d["train"]["bf16"] = "false"  # fp32 activations: the estimate's dtype (bf16 is checked below)
    if "qlora" in methods:
        d["qlora"] = {"compute_dtype": "float32"}
    cfg = RunConfig.from_dict(d)
    res = train(cfg)
    m = res.memory
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history if "loss" in h)
    # every tensor the meter counts lives on the GPU, so the allocator's peak holds at least them
    assert 0 < m["memory/train_gb"] <= m["memory/cuda_peak_gb"] * 1.02, m
    assert check_estimate(cfg, m) == []


def test_bf16_autocast_on_cuda_reports_memory(long_rows, tmp_path):
    d = memory_run_dict(["lora", "tokentune"], long_rows, tmp_path / "out", max_length=128)
    d["compute"] = {"use_gpu": True}
    d["train"]["bf16"] = "true"
    res = train(RunConfig.from_dict(d))
    m = res.memory
    assert m["memory/activations_gb"] > 0 and m["memory/cuda_peak_gb"] >= m["memory/train_gb"] * 0.98


def test_tokentune_keeps_under_040_of_stock_activations_at_seq_512(long_rows, tmp_path):
    """The shipped tiny model is GQA (4 query / 2 key-value heads): TokenTune's masked sdpa calls repeat
    keys/values as stock does (transformers' rule), so no call falls to CUDA's math kernel and r=0.3
    keeps at most 0.40x of stock LoRA's saved activations at seq 512 (bf16, the GPU default)."""
    acts = {}
    for methods in (["lora"], ["lora", "tokentune"]):
        d = memory_run_dict(methods, long_rows, tmp_path / "+".join(methods), max_length=512, steps=3)
        d["compute"] = {"use_gpu": True}
        d["train"]["bf16"] = "true"
        if "tokentune" in methods:
            d["tokentune"] = {"ratio": 0.3}
        acts["+".join(methods)] = train(RunConfig.from_dict(d)).memory["memory/activations_gb"]
    assert acts["lora+tokentune"] <= 0.40 * acts["lora"], acts
