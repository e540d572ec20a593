"""The measured memory breakdown (``tokentune.memory``) and the estimate checked against it.

- ``MemoryMeter`` on a hand-sized model: exact bytes for weights, gradients, AdamW state and the
  tensors autograd saves (views and shared storages once, parameters never).
- The training loop reports the breakdown on sampled steps only, and ``TrainResult.memory``.
- Every allowed method combination (the contract set) on the shipped tiny model (seq 128) and on a
  random Llama of hidden 256 at seq 256: ``tokentune.estimate`` within +-15% of the measured
  ``memory/train_gb`` and each component within +-25% or 2 MB. Sequences fill ``data.max_length``
  (the estimate's assumption); IST/RST run until every layer has trained and the first layer was
  the lowest trained one at a sampled step (their estimated peak).
ZeRO-2/3 with 2 workers: ``tests/test_distributed.py::test_memory_estimate_under_zero``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import (
    SPARSE_METHODS,
    allowed_combinations,
    check_estimate,
    memory_run_dict,
    reached_sparse_peak,
    tiny_run_dict,
)
from tokentune.config import RunConfig
from tokentune.estimate import GB, estimate_measured, estimate_memory
from tokentune.memory import MemoryMeter, distinct_bytes
from tokentune.train import train


# ---- the meter on a model whose bytes are known ---------------------------------------------------------
def _toy(batch: int = 5):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt, torch.randn(batch, 8)


def test_meter_counts_exact_bytes_of_a_known_model():
    model, opt, x = _toy(batch=5)
    meter = MemoryMeter(model, opt, torch.device("cpu"))
    params = sum(p.numel() for p in model.parameters())  # 8*16 + 16 + 16*4 + 4 = 212
    for sampled in (True, True):
        meter.start_step(sampled=sampled)
        with meter.saved_tensors():
            loss = model(x).pow(2).sum()
        meter.note_batch(torch.zeros(5, 7))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        meter.end_step()
    m = meter.metrics()
    assert m["memory/weights_gb"] * GB == params * 4
    assert m["memory/grads_gb"] * GB == params * 4
    # exp_avg + exp_avg_sq per parameter, and one 4-byte ``step`` tensor per parameter tensor
    assert m["memory/optimizer_gb"] * GB == 2 * params * 4 + 4 * 4
    # saved for backward: the input (Linear 1's weight grad), ReLU's output (ReLU and Linear 2 share
    # it: counted once), the output (pow); never the weights
    assert m["memory/activations_gb"] * GB == (5 * 8 + 5 * 16 + 5 * 4) * 4
    parts = ("weights", "grads", "optimizer", "activations")
    assert m["memory/train_gb"] == pytest.approx(sum(m[f"memory/{k}_gb"] for k in parts))
    assert (m["memory/peak_batch"], m["memory/peak_seq_len"]) == (5.0, 7.0)
    assert m["memory/process_rss_gb"] > 0 and "memory/cuda_peak_gb" not in m  # CPU


def test_meter_measures_only_sampled_steps():
    model, opt, x = _toy()
    meter = MemoryMeter(model, opt, torch.device("cpu"))
    meter.start_step(sampled=False)
    with meter.saved_tensors():
        hooks_on = torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
        loss = model(x).sum()
    loss.backward()
    opt.step()
    meter.end_step()
    assert not hooks_on  # a step that is not sampled runs without saved-tensor hooks
    assert meter.sampled_steps == 0 and set(meter.metrics()) == {"memory/process_rss_gb"}


def test_views_and_shared_storage_count_once():
    base = torch.zeros(10, 10)
    assert distinct_bytes([base, base[2:], base.t(), None, torch.zeros(3)]) == 400 + 12


# ---- the loop reports it ----------------------------------------------------------------------------------
def test_training_reports_the_breakdown_on_log_steps(tiny_workspace, tmp_path, one_thread):
    d = tiny_run_dict(tiny_workspace, ["lora"], tmp_path / "out", train={"max_steps": 4, "log_every": 2})
    res = train(RunConfig.from_dict(d))
    logged = [h for h in res.history if "loss" in h]
    assert [h["step"] for h in logged] == [2, 4]
    for h in logged:  # measured on step 2 (the first after the first) and at each log step
        assert h["memory/train_gb"] > h["memory/weights_gb"] > 0 and h["memory/activations_gb"] > 0
    assert res.memory["memory/train_gb"] == pytest.approx(logged[-1]["memory/train_gb"])
    assert not hasattr(res, "peak_memory_bytes")


# ---- estimate vs measured over every allowed combination ------------------------------------------------
@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """A random Llama of hidden 256 (GQA, untied head) with the shipped tokenizer."""
    import transformers

    from tokentune import assets

    cfg = transformers.LlamaConfig(
        vocab_size=1612, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("wide")
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(assets.default_model_path()).save_pretrained(out)
    return str(out)


MODELS = {"tiny-seq128": (None, 128), "hidden256-seq256": ("wide", 256)}


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS, ids=str)
@pytest.mark.parametrize("methods", allowed_combinations(), ids=lambda m: "+".join(m))
def test_estimate_matches_measured(methods, model, long_rows, wide_llama, tmp_path, one_thread):
    path, max_length = MODELS[model]
    d = memory_run_dict(
        methods, long_rows, tmp_path / "out", max_length=max_length, model=wide_llama if path else None
    )
    cfg = RunConfig.from_dict(d)
    res = train(cfg)
    assert res.memory["memory/peak_seq_len"] == max_length  # the data fills max_length
    if any(m in methods for m in SPARSE_METHODS):
        assert reached_sparse_peak(res.history, 4), "IST/RST never trained every layer in 8 steps"
    assert check_estimate(cfg, res.memory) == []


def test_estimate_matches_measured_fast(long_rows, tmp_path, one_thread):
    """One combination of every kind of term in the fast loop (the whole set runs as a slow test)."""
    d = memory_run_dict(["qlora", "lora", "ist", "tokentune"], long_rows, tmp_path / "o", max_length=64)
    cfg = RunConfig.from_dict(d)
    res = train(cfg)
    assert check_estimate(cfg, res.memory) == []
    # the planning estimate (max_length) equals the measured-shape one here: sequences fill it
    assert estimate_memory(cfg).total_gb == pytest.approx(estimate_measured(cfg, res.memory).total_gb)
