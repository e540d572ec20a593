"""IST / RST: the math, the per-step freezing mechanism and their invariants (inactive layers bit-identical).

Tiny random Llama models with peft LoRA/DoRA, trained through ``MethodStack`` (the object that runs
the hook sequence of ``tokentune.train``) with AdamW + LambdaLR and gradient clipping, and, marked slow, the same bit-identity checks under DeepSpeed ZeRO-2 and ZeRO-3 (one subprocess each,
so no process group leaks into other tests).
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import re
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

if __name__ == "__main__":  # DeepSpeed worker mode (see test_deepspeed_*): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest
import torch

from tests.conftest import free_port, make_tiny_causal_lm
from tokentune.config import ConfigError, RunConfig
from tokentune.methods import REGISTRY, MethodStack, StepContext, validate_methods
from tokentune.methods.full import Full, FullSettings
from tokentune.methods.ist.layer_sampling import (
    centred_rewards,
    sample_layers,
    sample_suppression_sets,
    update_scores,
)
from tokentune.methods.ist.method import IST, RST, ISTSettings, RSTSettings, resolve_budget
from tokentune.methods.ist.sparse_layers import (
    GROUP_KEY,
    adapter_output_modules,
    find_decoder_layers,
    probe_losses,
    probe_plan,
    scaled_outputs,
)
from tokentune.methods.lora import DoRA, DoraSettings, LoRA, LoraSettings

NO_PROBE = 10**9  # start_step that is never reached


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- helpers ---------------------------------------------------------------------------------------
def adapted_model(num_layers: int = 4, dora: bool = False, seed: int = 0, dtype=torch.float32, **lora_kw):
    """A tiny random Llama wrapped with peft LoRA/DoRA; lora_B randomised so adapters matter."""
    model = make_tiny_causal_lm(
        num_layers=num_layers, hidden=32, heads=4, kv_heads=2, vocab=64, seed=seed, dtype=dtype
    )
    trainer = DoRA(DoraSettings(rank=4, **lora_kw)) if dora else LoRA(LoraSettings(rank=4, **lora_kw))
    model = trainer.prepare(model)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.05)
    return model


def make_batch(i: int, batch: int = 4, seq: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    ids = torch.randint(3, 64, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # one padded row
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def layer_of(name: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def opt_state(opt) -> dict[int, dict[str, torch.Tensor]]:
    return {
        id(p): {k: v.clone() for k, v in opt.state[p].items()} for g in opt.param_groups for p in g["params"]
    }


def lr_lambda(steps: int):
    return lambda s: min(1.0, (s + 1) / 2) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))


def clipped_step(model, opt, sched=None):
    """The optimizer step of the loop's engine: clip to norm 1, step, schedule, zero the gradients."""

    def step() -> float:
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)
        return float(norm)

    return step


def train_step(stack: MethodStack, model, opt, sched, step: int, probe_size: int = 8) -> dict:
    """One optimizer step through ``stack`` on ``make_batch(step)``; returns what the invariants check."""
    ctx = StepContext(
        step=step,
        model=model,
        optimizer=opt,
        probe_batch=lambda step=step: make_batch(500 + step, batch=probe_size),
    )
    record = {"before": trainable(model), "state_before": opt_state(opt), "active": None}

    def seen(batch, loss) -> None:  # after the micro-batch's backward, before the optimizer step
        for m in stack:
            if isinstance(m, (IST, RST)):
                record["active"] = [m.layer_index[j] for j in m.active.tolist()]
        record["with_grad"] = {n for n, p in model.named_parameters() if p.grad is not None}

    loss, _ = stack.step(
        ctx,
        [make_batch(step)],
        backward=lambda loss: loss.backward(),
        optimizer_step=clipped_step(model, opt, sched),
        on_micro_batch=seen,
    )
    record.update(loss=loss, after=trainable(model), state_after=opt_state(opt))
    return record


def run_loop(model, methods, steps: int, lr=1e-2, wd=0.1, scheduler=True, probe_size=8, schedule_steps=None):
    """The training loop of tokentune.train, reduced to what methods see; returns per-step records."""
    stack = MethodStack(methods)
    model = stack.prepare(model)
    opt = torch.optim.AdamW(stack.param_groups(model), lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(schedule_steps or steps)) if scheduler else None
    records = [train_step(stack, model, opt, sched, step, probe_size) for step in range(steps)]
    return model, opt, records


# ---- the math ------------------------------------------------------------------------------------
def test_sample_layers_distinct_sorted_seeded():
    scores = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5])
    a = sample_layers(scores, 3, torch.Generator().manual_seed(3))
    b = sample_layers(scores, 3, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.long
    assert len(set(a.tolist())) == 3 and a.tolist() == sorted(a.tolist())
    assert sample_layers(scores, 5, torch.Generator()).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        sample_layers(scores, 0, torch.Generator())


def test_sample_layers_prefers_low_scores_and_rst_is_uniform():
    g = torch.Generator().manual_seed(0)
    biased = torch.tensor([-3.0, 0.0, 0.0, 3.0])  # layer 0 important, layer 3 not
    counts = torch.zeros(4)
    for _ in range(2000):
        counts[sample_layers(biased, 1, g)] += 1
    assert counts[0] > 3 * counts[3]

    # uniform sampling ignores the scores: chi-square over 4000 draws of 2 of 8 layers (df 7, p=0.001: 24.3)
    counts = torch.zeros(8)
    scores = torch.linspace(-5, 5, 8)
    for _ in range(4000):
        counts[sample_layers(scores, 2, g, uniform=True)] += 1
    expected = 4000 * 2 / 8
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 24.3, (counts, chi2)


def test_suppression_sets_distinct_capped_and_terminating():
    g = torch.Generator().manual_seed(0)
    # L=2, one layer suppressed: only C(2,1) = 2 distinct sets exist (the original looped forever)
    sets = sample_suppression_sets(torch.zeros(2), 3, 1, g)
    assert sorted(s.tolist() for s in sets) == [[0], [1]]
    sets = sample_suppression_sets(torch.zeros(1), 3, 1, g)
    assert [s.tolist() for s in sets] == [[0]]
    for n_layers, n_sup in [(3, 1), (3, 2), (4, 2), (8, 4)]:
        sets = sample_suppression_sets(torch.randn(n_layers), 3, n_sup, g)
        keys = [tuple(s.tolist()) for s in sets]
        assert len(keys) == min(3, math.comb(n_layers, n_sup)) == len(set(keys))
        assert all(len(k) == n_sup for k in keys)
    # pathological weights: one set holds ~all the mass; still terminates with distinct sets
    sets = sample_suppression_sets(torch.tensor([60.0, 60.0, -60.0, -60.0]), 3, 2, g)
    assert len({tuple(s.tolist()) for s in sets}) == 3 and [0, 1] in [s.tolist() for s in sets]


def test_centred_rewards_sum_to_zero():
    losses = torch.tensor([2.0, 2.5, 1.7])
    r = centred_rewards(losses)
    assert abs(float(r.sum())) < 1e-12
    e = torch.exp(-losses.double())
    assert torch.allclose(r, e - e.mean())
    assert r.argmax() == 2  # lowest loss, highest reward


def test_update_scores_moves_only_probed_layers():
    scores = torch.tensor([0.0, 0.5, -1.0, 2.0, 0.3], dtype=torch.float64)
    sets = [torch.tensor([0, 2]), torch.tensor([1, 2])]
    rewards = torch.tensor([0.1, -0.1], dtype=torch.float64)
    new = update_scores(scores, sets, rewards, 10.0)
    p = torch.sigmoid(scores)
    slope = p * (1 - p)
    expected = scores.clone()
    expected[0] += 10 * 0.1 * slope[0]
    expected[1] += 10 * -0.1 * slope[1]
    expected[2] += 10 * (0.1 - 0.1) * slope[2]  # p taken before the update, for both sets
    assert torch.allclose(new, expected, atol=1e-15)
    assert new[3] == scores[3] and new[4] == scores[4]
    assert torch.equal(scores, torch.tensor([0.0, 0.5, -1.0, 2.0, 0.3], dtype=torch.float64))  # pure


def test_resolve_budget():
    assert resolve_budget(0.25, 32) == 8
    assert resolve_budget(0.25, 3) == 1  # int(0.25 * 3) == 0 in the original
    assert resolve_budget(0.5, 3) == 1 and resolve_budget(0.7, 3) == 2
    assert resolve_budget(1.0, 3) == 3 and resolve_budget(1, 3) == 1
    assert resolve_budget(3, 3) == 3
    with pytest.raises(ConfigError, match=r"ist\.budget=5 .*4 decoder layers"):
        resolve_budget(5, 4)


# ---- settings ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key,value",
    [
        ("budget", 0),
        ("budget", 0.0),
        ("budget", 1.5),
        ("budget", -2),
        ("budget", True),
        ("budget", "8"),
        ("update_every", 0),
        ("start_step", -1),
        ("probe_sets", 1),
        ("suppress_fraction", 0.0),
        ("suppress_fraction", 1.2),
        ("suppress_factor", 1.0),
        ("suppress_factor", -0.1),
        ("score_lr", 0),
        ("score_lr", float("nan")),
        ("probe_batch_size", 0),
        ("seed", 1.5),
    ],
)
def test_invalid_ist_settings_name_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"^ist\.{key}="):
        ISTSettings(**{key: value})


def test_invalid_settings_through_run_config():
    with pytest.raises(ConfigError, match=r"ist\.budget=0 is invalid"):
        RunConfig.from_dict({"methods": ["lora", "ist"], "ist": {"budget": 0}})
    with pytest.raises(ConfigError, match=r"rst\.budget=2\.0 is invalid"):
        RunConfig.from_dict({"methods": ["lora", "rst"], "rst": {"budget": 2.0}})
    with pytest.raises(ConfigError, match=r"rst\.update_every"):
        RunConfig.from_dict({"methods": ["lora", "rst"], "rst": {"update_every": 3}})
    with pytest.raises(ConfigError, match="requires one of: lora, dora"):
        validate_methods(["full", "ist"])
    with pytest.raises(ConfigError, match="cannot be combined"):
        validate_methods(["lora", "ist", "rst"])
    cfg = RunConfig.from_dict({"methods": ["dora", "ist"], "ist": {"budget": 2, "score_lr": 5.0}})
    assert cfg.method_configs["ist"].budget == 2
    assert REGISTRY["ist"].order == REGISTRY["rst"].order == 40 and REGISTRY["ist"].kind == "modifier"


def test_budget_larger_than_layers_is_an_error_at_prepare():
    with pytest.raises(ConfigError, match=r"ist\.budget=5 is invalid: the model has 3 decoder layers"):
        IST(ISTSettings(budget=5)).prepare(adapted_model(3))


def test_ist_needs_adapters_inside_layers():
    model = make_tiny_causal_lm(num_layers=2, hidden=32, vocab=64)
    model = Full(FullSettings()).prepare(model)
    with pytest.raises(ConfigError, match="ist: no peft LoRA/DoRA adapters"):
        IST(ISTSettings()).prepare(model)
    frozen = make_tiny_causal_lm(num_layers=2, hidden=32, vocab=64).requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters inside the model's 2 decoder layers"):
        RST(RSTSettings()).prepare(frozen)


# ---- structure -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dora", [False, True])
def test_every_trainable_parameter_is_in_the_optimizer_one_group_per_layer(dora):
    model = adapted_model(3, dora=dora, modules_to_save=["lm_head"])
    ist = IST(ISTSettings(budget=1))
    model = ist.prepare(model)
    groups = ist.param_groups(model)
    in_groups = [id(p) for g in groups for p in g["params"]]
    assert len(in_groups) == len(set(in_groups))
    assert set(in_groups) == {id(p) for p in model.parameters() if p.requires_grad}
    names = {id(p): n for n, p in model.named_parameters()}
    layer_groups = [g for g in groups if GROUP_KEY in g]
    assert [g[GROUP_KEY] for g in layer_groups] == [0, 1, 2]
    for g in layer_groups:
        ns = [names[id(p)] for p in g["params"]]
        assert all(layer_of(n) == g[GROUP_KEY] for n in ns)
        assert all("lora_" in n for n in ns)
        if dora:
            assert any("lora_magnitude_vector" in n for n in ns)
    (rest,) = [g for g in groups if GROUP_KEY not in g]
    assert all(layer_of(names[id(p)]) is None for p in rest["params"])  # modules_to_save lm_head


def test_finds_decoder_layers_of_peft_models():
    model = adapted_model(3)
    assert find_decoder_layers(model) is model.get_base_model().model.layers
    with pytest.raises(ConfigError, match="no decoder layer list"):
        find_decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# ---- the invariants ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ist", "rst"])
@pytest.mark.parametrize("dora", [False, True])
def test_budget_all_layers_without_probing_equals_plain_lora(method, dora):
    steps = 4
    _, _, ref = run_loop(adapted_model(3, dora=dora), [], steps)
    m = IST(ISTSettings(budget=1.0, start_step=NO_PROBE)) if method == "ist" else RST(RSTSettings(budget=3))
    _, _, got = run_loop(adapted_model(3, dora=dora), [m], steps)
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]  # bit-identical trajectory
    for a, b in zip(got, ref):
        assert a["after"].keys() == b["after"].keys()
        assert all(torch.equal(a["after"][n], b["after"][n]) for n in a["after"])


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("scheduler", [True, False])
def test_inactive_layers_bit_identical_after_a_step(dora, scheduler):
    """weight_decay > 0 and Adam state from earlier active steps: a stepped param would move."""
    ist = IST(ISTSettings(budget=1, start_step=1, update_every=2))
    model, opt, records = run_loop(adapted_model(4, dora=dora), [ist], steps=8, wd=0.1, scheduler=scheduler)
    params = dict(model.named_parameters())
    moved = set()
    for r in records:
        for n, before in r["before"].items():
            layer = layer_of(n)
            same = torch.equal(before, r["after"][n])
            if layer in r["active"]:
                assert n in r["with_grad"]
                if not same:
                    moved.add(layer)
                continue
            assert same, (n, r["active"])
            assert n not in r["with_grad"]  # no gradient reached it
            s0, s1 = r["state_before"][id(params[n])], r["state_after"][id(params[n])]
            assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)  # Adam state too
    assert moved == {layer for r in records for layer in r["active"]}  # every drawn layer trained
    # the groups are back to their nominal settings between steps
    for g in opt.param_groups:
        assert g["weight_decay"] == 0.1
        assert type(g["lr"]) is float and g["lr"] == opt.param_groups[-1]["lr"]
    assert any(len(r["active"]) == 1 for r in records)


def test_gradients_equal_requires_grad_freezing():
    """Detaching an inactive layer's adapters == the original's requires_grad=False freezing."""
    model = adapted_model(4, dtype=torch.float64)
    ref = copy.deepcopy(model)
    ist = IST(ISTSettings(budget=2, start_step=NO_PROBE))
    model = ist.prepare(model)
    ist.scores = torch.tensor([5.0, -5.0, 5.0, -5.0], dtype=torch.float64)  # make {1, 3} very likely
    opt = torch.optim.AdamW(ist.param_groups(model), lr=1e-3)
    ist.on_step_start(StepContext(step=0, model=model, optimizer=opt))
    active = set(ist.active.tolist())
    for n, p in ref.named_parameters():
        if p.requires_grad and layer_of(n) not in active:
            p.requires_grad_(False)
    batch = make_batch(0)
    model(**batch).loss.backward()
    ref(**batch).loss.backward()
    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        rp = ref_params[n]
        if layer_of(n) in active:
            assert torch.allclose(p.grad, rp.grad, rtol=1e-12, atol=1e-15), n
        else:
            assert p.grad is None and rp.grad is None
    ist.on_step_end(StepContext(step=0, model=model, optimizer=opt))
    assert all(type(m).forward is not None and "forward" not in m.__dict__ for m in model.modules())


def test_layers_below_the_lowest_active_layer_save_nothing_for_backward():
    model = adapted_model(4)
    ist = IST(ISTSettings(budget=2, start_step=NO_PROBE))
    model = ist.prepare(model)
    ist.scores = torch.tensor([30.0, 30.0, -30.0, -30.0], dtype=torch.float64)  # only {2, 3} are drawable
    layers = find_decoder_layers(model)
    where = {"at": "embed"}
    handles = [
        layer.register_forward_pre_hook(lambda *_, i=i: where.update(at=i)) for i, layer in enumerate(layers)
    ]
    handles.append(
        model.get_base_model().model.norm.register_forward_pre_hook(lambda *_: where.update(at="head"))
    )

    def saved_per_layer() -> dict:
        counts: dict = {}

        def pack(t):
            counts[where["at"]] = counts.get(where["at"], 0) + t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**make_batch(0)).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return counts

    full = saved_per_layer()  # no step started: every layer trains (plain LoRA)
    opt = torch.optim.AdamW(ist.param_groups(model), lr=1e-3)
    ctx = StepContext(step=0, model=model, optimizer=opt)
    ist.on_step_start(ctx)
    assert ist.active.tolist() == [2, 3]
    sparse = saved_per_layer()
    ist.on_step_end(ctx)
    for h in handles:
        h.remove()
    assert all(full.get(i, 0) > 0 for i in range(4))
    assert sparse.get(0, 0) == 0 and sparse.get(1, 0) == 0, sparse
    assert sparse[2] > 0 and sparse[3] > 0
    assert sum(sparse.values()) < sum(full.values())


@pytest.mark.parametrize("dora", [False, True])
def test_suppression_scales_each_modules_adapter_output(dora):
    model = adapted_model(1, dora=dora, dtype=torch.float64)
    layer = find_decoder_layers(model)[0]
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    for proj in (layer.self_attn.q_proj, layer.mlp.down_proj):
        x_in = x if proj is layer.self_attn.q_proj else torch.randn(2, 5, 64, dtype=torch.float64)
        (target,) = adapter_output_modules(proj)
        full, base = proj(x_in), proj.base_layer(x_in)
        with scaled_outputs([target], 0.25):
            suppressed = proj(x_in)
        assert torch.allclose(suppressed, base + 0.25 * (full - base), atol=1e-12)
        assert torch.equal(proj(x_in), full)  # hooks removed, nothing changed


def test_suppression_respects_per_module_rank_and_alpha():
    """Scaling adapter outputs == multiplying each module's own peft scaling (vanilla LoRA)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    base = make_tiny_causal_lm(num_layers=2, hidden=32, vocab=64, dtype=torch.float64)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"q_proj": 2},
        alpha_pattern={"v_proj": 3},
    )
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    ref = copy.deepcopy(model)
    layer_ref = find_decoder_layers(ref)[1]
    scalings = set()
    for m in layer_ref.modules():
        if isinstance(m, LoraLayer):
            scalings.add(m.scaling["default"])
            m.scaling["default"] *= 0.25
    assert len(scalings) == 3  # three distinct per-module scalings
    model.eval(), ref.eval()
    batch = make_batch(0)
    with torch.no_grad():
        with scaled_outputs(adapter_output_modules(find_decoder_layers(model)[1]), 0.25):
            got = model(**batch).logits
        want = ref(**batch).logits
    assert torch.allclose(got, want, atol=1e-10)


def test_probe_moves_only_probed_scores_and_restores_the_model():
    model = adapted_model(4)
    ist = IST(ISTSettings(budget=1, start_step=0, update_every=1, probe_sets=2, suppress_fraction=0.25))
    model = ist.prepare(model)
    opt = torch.optim.AdamW(ist.param_groups(model), lr=1e-3)
    calls = []

    def probe_batch(size):
        calls.append(size)
        return make_batch(7, batch=size)

    ctx = StepContext(step=0, model=model, optimizer=opt, probe_batch=probe_batch)
    model.train()
    batch = make_batch(1)
    model.eval()
    with torch.no_grad():
        logits_before = model(**batch).logits
    model.train()
    ist.on_step_start(ctx)
    model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)  # no optimizer step: the weights stay as they were
    before = ist.scores.clone()
    ist.on_step_end(ctx)
    assert calls == [16]  # one probe batch per round, of the configured size
    assert model.training
    assert len(ist.last_probe_sets) == 2 and all(len(s) == 1 for s in ist.last_probe_sets)
    probed = {i for s in ist.last_probe_sets for i in s}
    for i in range(4):
        if i in probed:
            assert ist.scores[i] != before[i]
        else:
            assert ist.scores[i] == before[i]
    r = centred_rewards(torch.tensor(ist.probe_losses))
    assert abs(float(r.sum())) < 1e-12
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, logits_before)  # suppression fully undone
    m = ist.metrics()
    assert m["ist/active_layers"] == 1.0 and sum(m[f"ist/active/{i}"] for i in range(4)) == 1.0
    assert set(m) >= {"ist/score/0", "ist/score/3", "ist/probe_loss/0", "ist/probe_loss/1", "ist/probe_s"}
    assert m["ist/probe_s"] > 0


def test_probe_schedule():
    ist = IST(ISTSettings(budget=1, start_step=10, update_every=10))
    ist.prepare(adapted_model(4))
    assert [s for s in range(45) if ist._probe_due(s)] == [10, 20, 30, 40]


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_small_models_run(num_layers):
    ist = IST(ISTSettings(start_step=0, update_every=1))  # budget 0.25 -> 1 layer
    model, _, records = run_loop(adapted_model(num_layers), [ist], steps=3)
    assert ist.budget == 1 and all(len(r["active"]) == 1 for r in records)
    assert all(math.isfinite(r["loss"]) for r in records)
    if num_layers >= 2:
        assert ist.probe_losses and ist.scores.abs().sum() > 0
    rst = RST(RSTSettings())
    _, _, records = run_loop(adapted_model(num_layers), [rst], steps=2)
    assert all(len(r["active"]) == 1 for r in records)


def test_rst_never_probes_and_keeps_zero_scores():
    rst = RST(RSTSettings(budget=0.5, seed=3))
    run_loop(adapted_model(4), [rst], steps=4)
    assert torch.equal(rst.scores, torch.zeros(4, dtype=torch.float64))
    m = rst.metrics()
    assert m["rst/active_layers"] == 2.0 and not any("score" in k for k in m)


def test_rst_with_full_fine_tuning_layerwise():
    rst = RST(RSTSettings(budget=1))
    model = make_tiny_causal_lm(num_layers=3, hidden=32, vocab=64)
    full = Full(FullSettings())
    model, _, records = run_loop(model, [full, rst], steps=3)
    for r in records:
        for n, before in r["before"].items():
            layer = layer_of(n)
            if layer is not None and layer not in r["active"]:
                assert torch.equal(before, r["after"][n]), n
        assert not torch.equal(r["before"]["lm_head.weight"], r["after"]["lm_head.weight"])  # always trains


def test_state_dict_resume_continues_identically():
    settings = ISTSettings(budget=2, start_step=1, update_every=2)
    ist = IST(settings)
    _, _, records = run_loop(adapted_model(4), [ist], steps=6)

    first = IST(settings)
    model, opt, part = run_loop(adapted_model(4), [first], steps=3, schedule_steps=6)
    resumed = IST(settings)
    resumed.load_state_dict(first.state_dict())  # before prepare: applied in prepare
    stack = MethodStack([resumed])
    stack.prepare(model)
    assert torch.equal(resumed.scores, first.scores) and resumed.step == 3
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(6))
    for _ in range(3):
        sched.step()
    for step in range(3, 6):
        r = train_step(stack, model, opt, sched, step)
        assert r["active"] == records[step]["active"]
        assert abs(r["loss"] - records[step]["loss"]) < 1e-6
    assert torch.allclose(resumed.scores, ist.scores, atol=1e-9)


def test_composes_with_tokentune():
    tt_cls = REGISTRY["tokentune"]
    tt = tt_cls(tt_cls.config_cls())
    ist = IST(ISTSettings(budget=1, start_step=1, update_every=1))
    _, _, records = run_loop(adapted_model(3), [tt, ist], steps=3)
    for r in records:
        assert math.isfinite(r["loss"])
        for n, before in r["before"].items():
            if layer_of(n) not in r["active"]:
                assert torch.equal(before, r["after"][n])
    assert ist.probe_losses


# ---- probe rounds with shared layer prefixes ---------------------------------------------------
def test_probe_plan_orders_patterns_and_starts_at_the_first_difference():
    patterns = [(1, 0, 1, 0), (0, 1, 1, 0), (1, 1, 0, 0), (0, 1, 0, 1), (0, 0, 1, 1)]
    patterns = [tuple(bool(b) for b in p) for p in patterns]
    plan = probe_plan(patterns)
    assert [k for k, _ in plan] == [4, 3, 1, 0, 2]  # lexicographic
    assert [start for _, start in plan] == [0, 1, 2, 0, 1]  # first layer differing from the previous
    # every distinct prefix (trie node) of the patterns is computed exactly once
    computed = sum(len(patterns[k]) - start for k, start in plan)
    assert computed == len({p[:d] for p in patterns for d in range(1, 5)})
    assert probe_plan([patterns[0]]) == [(0, 0)] and probe_plan([]) == []


def full_probe_losses(model, batch, sets, modules, factor=0.25):
    """The reference: one complete forward per suppression set."""
    losses = []
    with torch.no_grad():
        for s in sets:
            with scaled_outputs([m for j in s for m in modules[j]], factor):
                losses.append(model(**batch).loss.float())
    return losses


def count_layer_runs(layers):
    """Counts each layer's attention calls (a hook on a sub-module leaves the fast path on)."""
    runs = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.self_attn.register_forward_pre_hook(lambda *_a, i=i: runs.__setitem__(i, runs[i] + 1))
    return runs


def quantized_adapted_model(tmp_path, num_layers):
    """A 4-bit (bitsandbytes NF4) tiny Llama with LoRA, as QLoRA loads it (CPU)."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    from tokentune.methods.qlora import QLoRA, QLoraSettings

    make_tiny_causal_lm(num_layers=num_layers, hidden=64, heads=4, kv_heads=2, vocab=64).save_pretrained(
        tmp_path
    )
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quant)
    model = QLoRA(QLoraSettings(compute_dtype="float32")).prepare(model)
    model = LoRA(LoraSettings(rank=4)).prepare(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("adapter", ["lora", "dora", "qlora"])
def test_shared_prefix_probe_losses_are_bit_identical(adapter, tmp_path):
    """Every set of 2 of 5 layers: the shared-prefix losses equal full forwards bit for bit."""
    if adapter == "qlora":
        model = quantized_adapted_model(tmp_path, 5)
    else:
        model = adapted_model(5, dora=adapter == "dora")
    model.eval()
    layers = find_decoder_layers(model)
    modules = [adapter_output_modules(layer) for layer in layers]
    batch = make_batch(3)
    sets = [list(c) for c in itertools.combinations(range(5), 2)]
    want = full_probe_losses(model, batch, sets, modules)
    assert len({float(x) for x in want}) > len(want) // 2  # the sets really differ
    runs = count_layer_runs(layers)
    with torch.no_grad():
        got = probe_losses(
            model, batch, layers, sets, [[m for j in s for m in modules[j]] for s in sets], 0.25
        )
    assert all(torch.equal(a, b) for a, b in zip(got, want)), (got, want)
    plan = probe_plan([tuple(i in s for i in range(5)) for s in sets])
    assert sum(runs) == sum(5 - start for _, start in plan) < 5 * len(sets)  # layers were skipped
    assert runs[0] < len(sets) and runs[4] == len(sets)


@pytest.mark.parametrize("dora", [False, True])
def test_probe_rounds_shared_and_full_give_identical_scores(dora):
    """IST's probe rounds on a fixed seed: losses and scores bit-identical with and without sharing."""
    settings = ISTSettings(budget=2, start_step=0, update_every=1, probe_sets=4, seed=5)
    results = {}
    for share in (False, True):
        ist = IST(settings)
        ist.share_probe_prefix = share
        model = ist.prepare(adapted_model(6, dora=dora))
        model.train()
        rounds = []
        for step in range(6):
            ctx = StepContext(
                step=step, model=model, probe_batch=lambda size, step=step: make_batch(step, size)
            )
            rounds.append((ist.probe(ctx), ist.scores.clone(), ist.last_probe_sets))
            assert model.training
        results[share] = rounds
    for (la, sa, pa), (lb, sb, pb) in zip(results[False], results[True]):
        assert pa == pb and torch.equal(la, lb) and torch.equal(sa, sb)
    assert not torch.equal(results[True][-1][1], torch.zeros(6, dtype=torch.float64))


def test_probe_falls_back_to_full_forwards_with_layer_hooks():
    model = adapted_model(4).eval()
    layers = find_decoder_layers(model)
    modules = [adapter_output_modules(layer) for layer in layers]
    sets = [[0, 1], [0, 2], [1, 3]]
    want = full_probe_losses(model, make_batch(2), sets, modules)
    calls = [0]
    handle = layers[2].register_forward_hook(lambda *_a: calls.__setitem__(0, calls[0] + 1))  # e.g. ZeRO-3
    runs = count_layer_runs(layers)
    with torch.no_grad():
        got = probe_losses(
            model, make_batch(2), layers, sets, [[m for j in s for m in modules[j]] for s in sets], 0.25
        )
    handle.remove()
    assert runs == [3, 3, 3, 3] and calls[0] == 3
    assert all(torch.equal(a, b) for a, b in zip(got, want))


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x):
        return torch.tanh(self.lin(x))


class _Chain(torch.nn.Module):
    """A toy LM; with ``rebuild`` its layers are no plain chain (a new hidden tensor between layers)."""

    def __init__(self, rebuild: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(64, 16)
        self.layers = torch.nn.ModuleList(_Block() for _ in range(3))
        self.head = torch.nn.Linear(16, 64)
        self.rebuild = rebuild

    def forward(self, input_ids, labels, **_):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
            x = x * 1.0 if self.rebuild else x
        loss = torch.nn.functional.cross_entropy(self.head(x).flatten(0, 1), labels.flatten())
        return type("Out", (), {"loss": loss})()


@pytest.mark.parametrize("rebuild", [False, True])
def test_probe_checks_the_layer_chain_before_skipping(rebuild):
    model = _Chain(rebuild)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, 64, (2, 5), generator=g),
        "labels": torch.randint(0, 64, (2, 5), generator=g),
    }
    modules = [[block.lin] for block in model.layers]
    sets = [[1], [1, 2], [0, 2]]  # plan: 010 from 0, 011 from layer 2, 101 from 0
    want = full_probe_losses(model, batch, sets, modules)
    runs = [0, 0, 0]
    for i, block in enumerate(model.layers):
        block.lin.register_forward_pre_hook(lambda *_a, i=i: runs.__setitem__(i, runs[i] + 1))
    with torch.no_grad():
        got = probe_losses(
            model, batch, model.layers, sets, [[m for j in s for m in modules[j]] for s in sets], 0.25
        )
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert runs == ([3, 3, 3] if rebuild else [2, 2, 3])
    # a suppressed module that is a whole layer: a skipped layer with a hook is never skipped
    layers = [[block] for block in model.layers]
    want = full_probe_losses(model, batch, [[0], [0, 1]], layers)
    with torch.no_grad():
        got = probe_losses(
            model, batch, model.layers, [[0], [0, 1]], [layers[0], layers[0] + layers[1]], 0.25
        )
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# ---- DeepSpeed ZeRO-2 / ZeRO-3 (one subprocess each) ---------------------------------------------
def _deepspeed_check(stage: int, dora: bool) -> None:
    """Run in a fresh process: IST under DeepSpeed keeps inactive layers bit-identical."""
    import deepspeed

    model = adapted_model(4, dora=dora)
    ist = IST(ISTSettings(budget=1, start_step=1, update_every=2))
    stack = MethodStack([ist])
    model = stack.prepare(model)
    opt = torch.optim.AdamW(stack.param_groups(model), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(6))
    cfg = {
        "train_batch_size": 4,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
    }
    engine, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=cfg)
    module = engine.module
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]

    def snapshot() -> dict[str, torch.Tensor]:
        gather = deepspeed.zero.GatheredParameters([p for _, p in named]) if stage == 3 else nullcontext()
        with gather:
            return {n: p.detach().clone() for n, p in named}

    def ds_step() -> float:  # as tokentune.engine.DeepSpeedEngine: the engine steps (and clips) itself
        engine.step()
        return float(engine.get_global_grad_norm() or 0.0)

    if stage == 3:
        assert all(p.numel() == 0 for _, p in named), "ZeRO-3 should have partitioned the adapters"
    moved = set()
    for step in range(6):
        ctx = StepContext(step=step, model=module, optimizer=ds_opt, probe_batch=lambda: make_batch(77, 8))
        before = snapshot()
        loss, _ = stack.step(ctx, [make_batch(step)], backward=engine.backward, optimizer_step=ds_step)
        active = {ist.layer_index[j] for j in ist.active.tolist()}
        after = snapshot()
        for n, b in before.items():
            if layer_of(n) in active and not torch.equal(b, after[n]):
                moved.add(layer_of(n))
            elif layer_of(n) not in active:
                assert torch.equal(b, after[n]), f"stage {stage} step {step}: inactive {n} changed"
        for g in ds_opt.param_groups:
            assert type(g["lr"]) is float and g["weight_decay"] == 0.1
        assert math.isfinite(loss)
    assert moved, "no active layer trained"
    assert ist.probe_losses and ist.scores.abs().sum() > 0
    print(f"OK stage={stage} dora={dora} moved={sorted(moved)} scores={ist.scores.tolist()}")


def _run_deepspeed_subprocess(stage: int, dora: bool, tmp_path) -> None:
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # pragma: no cover - environment without deepspeed
        pytest.skip(f"deepspeed import failed: {e}")
    port = free_port()
    root = Path(__file__).resolve().parents[1]
    env = dict(
        os.environ,
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(root),
    )
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    proc = subprocess.run(
        [sys.executable, __file__, str(stage), str(int(dora))],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and f"OK stage={stage}" in proc.stdout, out[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("dora", [False, True])
def test_deepspeed_zero2_inactive_layers_bit_identical(dora, tmp_path):
    _run_deepspeed_subprocess(2, dora, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("dora", [False, True])
def test_deepspeed_zero3_inactive_layers_bit_identical(dora, tmp_path):
    _run_deepspeed_subprocess(3, dora, tmp_path)


if __name__ == "__main__":
    _deepspeed_check(int(sys.argv[1]), bool(int(sys.argv[2])))
