"""Gradient checkpointing (``tokentune.methods.checkpointing``): the same gradients as without it for
every trainer and with TokenTune and IST/RST (float64, same seed), recompute only where backward goes
(IST/RST: nothing below the lowest trained layer), less saved for backward, the layer choice and its
errors, the CLI listing, and one real run whose measured memory matches the estimate."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import check_estimate, make_tiny_causal_lm, memory_run_dict, refused
from tokentune.config import ConfigError, RunConfig
from tokentune.estimate import estimate_memory
from tokentune.methods import MethodStack, StepContext
from tokentune.methods.checkpointing import CheckpointingSettings, checkpointed_layers

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = 3
SPARSE = {"budget": 1, "seed": 0}


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded batch of 3 sequences (lengths 14, 9, 6), the first two tokens unsupervised."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([14, 9, 6])
    mask = (torch.arange(14)[None] < lengths[:, None]).long()
    ids = torch.randint(3, 128, (3, 14), generator=g).masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _prepared(names: list[str], configs: dict | None = None):
    """A float64 tiny Llama (3 layers) under ``names``; adapters' B matrices random (seeded) so that
    every adapter weight gets a non-zero gradient."""
    torch.manual_seed(0)  # peft's adapter init
    stack = MethodStack.build(names, dict(configs or {}))
    model = stack.prepare(make_tiny_causal_lm("llama", num_layers=LAYERS, dtype=torch.float64))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    model.train()
    return stack, model


def _loss_and_grads(names: list[str], configs: dict | None = None):
    stack, model = _prepared(names, configs)
    ctx = StepContext(step=0, model=model)
    for m in stack:
        m.on_step_start(ctx)
    loss = stack.loss(model, _batch(), ctx)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, stack


COMBINATIONS = {
    "full": (["full"], {}),
    "lora": (["lora"], {}),
    "dora": (["dora"], {}),
    "lora+tokentune": (["lora", "tokentune"], {"tokentune": {"ratio": 0.4, "seed": 3}}),
    "full+tokentune": (["full", "tokentune"], {"tokentune": {"ratio": 0.4, "seed": 3}}),
    "lora+ist": (["lora", "ist"], {"ist": SPARSE}),
    "full+rst": (["full", "rst"], {"rst": SPARSE}),
    "lora+tokentune+ist": (["lora", "tokentune", "ist"], {"ist": SPARSE, "tokentune": {"ratio": 0.4}}),
}


@pytest.mark.parametrize("combo", COMBINATIONS)
def test_gradients_equal_with_and_without_checkpointing(combo):
    names, configs = COMBINATIONS[combo]
    loss, want, _ = _loss_and_grads(names, configs)
    loss_ck, got, stack = _loss_and_grads([*names, "checkpointing"], configs)
    assert stack.names[-1] == "checkpointing"  # hook order: after the trainer, TokenTune and IST/RST
    torch.testing.assert_close(loss_ck, loss, atol=0, rtol=1e-12)
    assert got.keys() == want.keys() and any(g.abs().sum() > 0 for g in want.values())
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-12, rtol=1e-10, msg=n)


def _forward_calls(model, names: list[str], configs: dict) -> tuple[list[int], list[int], StepContext]:
    """Per decoder layer, how often its MLP started in forward and in backward (a recompute stops after
    the last tensor it must rebuild, inside the MLP: a pre-hook sees it)."""
    stack = MethodStack.build(names, configs)
    model = stack.prepare(model)
    ctx = StepContext(step=0, model=model)
    for m in stack:
        m.on_step_start(ctx)
    layers = model.get_base_model().model.layers if hasattr(model, "get_base_model") else model.model.layers
    calls = [0] * len(layers)
    handles = [
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(layers)
    ]
    loss = stack.loss(model, _batch(), ctx)
    forward = list(calls)
    loss.backward()
    for h in handles:
        h.remove()
    return forward, [c - f for c, f in zip(calls, forward)], stack


def test_ist_layers_below_the_lowest_trained_one_are_not_recomputed():
    """IST trains layer 2 of 0..3 here: layers 0 and 1 save nothing and never run again in backward;
    layer 2 (trained) and layer 3 (frozen, above it: backward passes through) are recomputed."""
    model = make_tiny_causal_lm("llama", num_layers=4, dtype=torch.float64)
    configs = {"ist": {"budget": 1, "seed": 0}}
    forward, recomputed, stack = _forward_calls(model, ["lora", "ist", "checkpointing"], configs)
    ist = next(m for m in stack if m.name == "ist")
    lowest = ist.layer_index[int(ist.active.min())]
    assert lowest == 2, "the seed was chosen so that IST's lowest trained layer is 2"
    assert forward == [1, 1, 1, 1]
    assert recomputed == [0, 0, 1, 1]


def test_tokentune_recomputes_only_the_selected_stream():
    """Under TokenTune each layer's MLP runs twice in forward (selected rows with grad, the rest
    without); with checkpointing the selected rows' path runs once more in backward, the rest never."""
    model = make_tiny_causal_lm("llama", num_layers=LAYERS, dtype=torch.float64)
    forward, recomputed, _ = _forward_calls(model, ["lora", "tokentune", "checkpointing"], {})
    assert forward == [2] * LAYERS and recomputed == [1] * LAYERS


def _saved_bytes(names: list[str], configs: dict | None = None) -> int:
    stack, model = _prepared(names, configs)
    seen: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter) and not isinstance(t._base, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = stack.loss(model, _batch(), StepContext(step=0, model=model))
    loss.backward()
    return sum(seen.values())


@pytest.mark.parametrize("names", [["lora"], ["lora", "tokentune"]], ids="+".join)
def test_checkpointing_saves_less_for_backward(names):
    plain, checkpointed = _saved_bytes(names), _saved_bytes([*names, "checkpointing"])
    assert checkpointed < 0.7 * plain, (plain, checkpointed)
    half = _saved_bytes([*names, "checkpointing"], {"checkpointing": {"layers": [1]}})
    assert checkpointed < half < plain


def test_eval_and_no_grad_run_the_stock_forward():
    stack, model = _prepared(["lora", "checkpointing"])
    model.eval()
    with torch.no_grad():
        out = model(**_batch()).logits
    stack_ref, ref = _prepared(["lora"])
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(out, ref(**_batch()).logits, atol=0, rtol=0)


# ---- settings, layer choice, errors, CLI -----------------------------------------------------------------
def test_layer_choice():
    assert checkpointed_layers("all", 4) == [0, 1, 2, 3]
    assert checkpointed_layers(0.5, 4) == [0, 2]
    assert checkpointed_layers(0.25, 8) == [0, 4]
    assert checkpointed_layers(0.1, 4) == [0]  # at least one layer
    assert checkpointed_layers(1.0, 3) == [0, 1, 2]
    assert checkpointed_layers([3, 1], 4) == [1, 3]
    with pytest.raises(ConfigError, match=r"checkpointing\.layers=\[0, 7\].*0\.\.3"):
        checkpointed_layers([0, 7], 4)


@pytest.mark.parametrize("bad", ["some", 0.0, 1.5, 2, True, [], [1, 1], [-1], ["0"]])
def test_bad_layers_name_the_key(bad):
    with pytest.raises(ConfigError, match=r"checkpointing\.layers=.*expected 'all', a fraction"):
        CheckpointingSettings(layers=bad)


def test_bad_input_is_refused_before_ray_starts():
    base = {"train": {"max_steps": 2}}
    twice = ["lora", "checkpointing", "checkpointing"]
    refused({"name": "c", "base": {**base, "methods": twice}}, "base", "methods=", "'checkpointing' twice")
    searched = {"name": "c", "base": base, "search": {"methods": {"grid": [["lora"], twice]}}}
    refused(searched, "search.methods", "'checkpointing' twice")
    shipped_layers = {**base, "methods": ["lora", "checkpointing"], "checkpointing": {"layers": [0, 9]}}
    refused({"name": "c", "base": shipped_layers}, "base", "checkpointing.layers=[0, 9]", "0..3")


def test_cli_lists_checkpointing_with_its_settings(capsys):
    from orchestrator.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "checkpointing kind=modifier" in out and "checkpointing.layers = all" in out


# ---- the estimate, and one real run against it -----------------------------------------------------------
def test_estimate_keeps_layer_inputs_and_adds_the_recompute_peak(long_rows, tmp_path):
    def est(names, **ck):
        d = memory_run_dict(names, long_rows, tmp_path, max_length=512)
        if ck:
            d["checkpointing"] = ck
        return estimate_memory(RunConfig.from_dict(d))

    lora, ck, every_other = (
        est(["lora"]),
        est(["lora", "checkpointing"]),
        est(["lora", "checkpointing"], layers=0.5),
    )
    assert ck.activations_gb < every_other.activations_gb < lora.activations_gb
    assert ck.weights_gb == lora.weights_gb and ck.optimizer_gb == lora.optimizer_gb
    assert ck.transient_gb > lora.transient_gb  # one layer rebuilt in backward
    tt, tt_ck = est(["lora", "tokentune"]), est(["lora", "tokentune", "checkpointing"])
    assert tt_ck.activations_gb < tt.activations_gb


def test_measured_memory_matches_the_estimate(long_rows, tmp_path):
    """One real training run (the contract set runs every combination with checkpointing, slow)."""
    from tokentune.train import train

    methods = ["lora", "tokentune", "ist", "checkpointing"]
    cfg = RunConfig.from_dict(memory_run_dict(methods, long_rows, tmp_path, max_length=64, steps=8))
    res = train(cfg)
    assert res.memory["memory/peak_seq_len"] == 64
    assert check_estimate(cfg, res.memory) == []
