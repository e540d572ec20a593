"""The measured memory breakdown (``tokentune.memory``) and the estimate checked against it.

- ``MemoryMeter`` on a hand-sized model: exact bytes for weights, gradients, AdamW state and the
  tensors autograd saves (views and shared storages once, parameters never).
- The training loop reports the breakdown on sampled steps only, and ``TrainResult.memory``.
- Every allowed method combination (the contract set) on the shipped tiny model (seq 128) and on a
  random Llama of hidden 256 at seq 256: ``tokentune.estimate`` within +-15% of the measured
  ``memory/train_gb`` and each component within +-25% or 2 MB. Sequences fill ``data.max_length``
  (the estimate's assumption); IST/RST run until every layer has trained and the first layer was
  the lowest trained one at a sampled step (their estimated peak).
- The same under bf16 (in ``test_memory_bf16.py``, ``BF16``): bf16 weights (``model.dtype: bfloat16``) and
  bf16 autocast over fp32 weights (``train.bf16: true``); the cross product is slow, one combination
  per setting (every kind of dtype term between them) runs in the fast loop.
- The estimate's device and transient terms (what must fit beyond ``memory/train_gb``), CUDA's
  reserved peak beside the allocated one, and a single run's ``result.json`` with the estimate.
ZeRO-2/3 with 2 workers: ``tests/test_distributed.py::test_memory_estimate_under_zero``.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tests.conftest import (
    SPARSE_METHODS,
    check_estimate,
    memory_run_dict,
    reached_sparse_peak,
    sampled_combinations,
    tiny_run_dict,
)
from tokentune.config import RunConfig
from tokentune.estimate import (
    CUDA_CONTEXT_GB,
    GB,
    NCCL_BUFFERS_GB,
    estimate_measured,
    estimate_memory,
)
from tokentune.memory import MemoryMeter, distinct_bytes
from tokentune.shape import model_shape
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
    cfg = RunConfig.from_dict(d)
    res = train(cfg)
    logged = [h for h in res.history if "loss" in h]
    assert [h["step"] for h in logged] == [2, 4]
    for h in logged:  # measured on step 2 (the first after the first) and at each log step
        assert h["memory/train_gb"] > h["memory/weights_gb"] > 0 and h["memory/activations_gb"] > 0
    assert res.memory["memory/train_gb"] == pytest.approx(logged[-1]["memory/train_gb"])
    assert not hasattr(res, "peak_memory_bytes")
    # a single run's result.json: the estimate beside the measurement, as a trial records it
    saved = json.loads((tmp_path / "out" / "result.json").read_text())["memory"]
    est = estimate_measured(cfg, res.memory)
    assert saved["memory/train_gb"] == pytest.approx(res.memory["memory/train_gb"])
    assert saved["memory/estimate_gb"] == pytest.approx(est.total_gb)
    assert saved["memory/estimate_ratio"] == pytest.approx(est.total_gb / res.memory["memory/train_gb"])
    assert 0.85 <= saved["memory/estimate_ratio"] <= 1.15
    assert saved["memory/estimate_device_gb"] == 0.0  # CPU


# ---- estimate vs measured over every allowed combination ------------------------------------------------
@pytest.fixture(scope="session")
def wide_llama(tmp_path_factory):
    """A random Llama of hidden 256 (GQA, untied head) with the shipped tokenizer (made once per test
    process, in seconds: session-scoped so that this file's many slow tests spread over the workers)."""
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


def _estimate_params() -> list:
    return [
        pytest.param(methods, model, id=f"{'+'.join(methods)}-{model}")
        for model in MODELS
        for methods in sampled_combinations(everything=model == "tiny-seq128")
    ]


@pytest.mark.slow
@pytest.mark.parametrize("methods, model", _estimate_params())
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


# ---- what must fit beyond train_gb ------------------------------------------------------------------------
def _estimate(methods, tiny_workspace, tmp_path, **compute):
    d = tiny_run_dict(tiny_workspace, methods, tmp_path, compute=compute)
    return estimate_memory(RunConfig.from_dict(d))


def test_device_term_counts_the_cuda_context_and_nccl_only_on_cuda(tiny_workspace, tmp_path):
    cpu = _estimate(["lora"], tiny_workspace, tmp_path, use_gpu=False)
    one = _estimate(["lora"], tiny_workspace, tmp_path, use_gpu=True)
    two = _estimate(["lora"], tiny_workspace, tmp_path, use_gpu=True, workers=2)
    assert cpu.device_gb == 0 and one.device_gb == CUDA_CONTEXT_GB
    assert two.device_gb == CUDA_CONTEXT_GB + NCCL_BUFFERS_GB
    assert one.fit_gb == pytest.approx(one.total_gb + one.transient_gb + one.device_gb)
    metrics = two.metrics()
    assert metrics["memory/estimate_fit_gb"] == pytest.approx(two.fit_gb)
    assert metrics["memory/estimate_gb"] == pytest.approx(two.total_gb)  # still comparable with train_gb


def test_transients_count_the_logits_gradient_and_adamw_foreach_copy(tiny_workspace, tmp_path):
    cpu = _estimate(["full"], tiny_workspace, tmp_path, use_gpu=False)
    cuda = _estimate(["full"], tiny_workspace, tmp_path, use_gpu=True)
    cfg = RunConfig.from_dict(tiny_run_dict(tiny_workspace, ["full"], tmp_path))
    logits = cfg.train.batch_size * cfg.data.max_length * model_shape(cfg.model.name_or_path).vocab
    assert cpu.transient_gb * GB >= logits * 4  # the fp32 logits' gradient at least
    # on CUDA AdamW's foreach step holds one more copy of every trainable parameter (fp32 here)
    assert (cuda.activations_gb + cuda.transient_gb) * GB >= cuda.trainable_params * 4
    assert cuda.transient_gb >= cpu.transient_gb


def test_cuda_reserved_peak_is_recorded_beside_the_allocated_peak(monkeypatch):
    model, opt, _ = _toy()
    meter = MemoryMeter(model, opt, torch.device("cuda"))  # no CUDA here: the allocator's figures below
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * GB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 4 * GB)
    m = meter.metrics()
    assert (m["memory/cuda_peak_gb"], m["memory/cuda_reserved_gb"]) == (3.0, 4.0)
