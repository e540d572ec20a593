"""One contract over every registered method and every allowed combination (STYLE.md, composer).

Two optimizer steps on a tiny model through the real loop: loss finite; frozen parameters
bit-identical; only trainable parameters get gradients (adapter methods: only adapter weights);
a checkpoint round-trip resumes onto the same loss trajectory.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import ALL_COMBINATIONS_ENV, allowed_combinations, sampled_combinations, tiny_run_dict
from tokentune.config import RunConfig
from tokentune.methods import REGISTRY, Method, register
from tokentune.train import train

RESUME_TOL = 1e-5  # resumed losses equal the uninterrupted run's (same data, RNG and method state)


class Inspector(Method):
    """A test-only modifier that records what the contract checks, through the public hooks."""

    name = "_inspect"
    kind = "modifier"
    order = 99
    seen: dict = {}

    def prepare(self, model):
        rec = Inspector.seen
        rec["frozen"] = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        rec["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}
        rec["is_adapter"] = hasattr(model, "peft_config")
        rec["grads"] = []
        rec["model"] = model
        return model

    def on_before_step(self, ctx):
        Inspector.seen["grads"].append({n for n, p in ctx.model.named_parameters() if p.grad is not None})


@pytest.fixture
def inspector():
    register(Inspector)
    yield Inspector.seen
    REGISTRY.pop(Inspector.name, None)
    Inspector.seen.clear()


def test_every_method_is_covered():
    combos = allowed_combinations()
    covered = {n for c in combos for n in c}
    assert covered == set(REGISTRY) - {Inspector.name}
    assert ["qlora", "lora"] in combos and ["full"] in combos
    fast = {n for c in FAST_CONTRACT for n in c}
    assert all(c in combos for c in FAST_CONTRACT) and fast == covered, sorted(covered - fast)


#: the fast loop's share of the contract: every method and every trainer at least once, QLoRA and each
#: modifier combined with others (DoRA, ~5x slower on CPU, once); every other allowed combination is
#: marked slow. The full suite runs every combination without checkpointing and, with it, the sampled
#: ones (conftest.CHECKPOINTING_SAMPLE: each trainer, QLoRA, with TokenTune, with IST; its gradients are
#: checked against no checkpointing in test_checkpointing.py); ALL_COMBINATIONS_ENV=1 runs all 56.
FAST_CONTRACT = [
    ["full"],
    ["full", "rst"],
    ["lora"],
    ["lora", "rst", "tokentune"],
    ["qlora", "lora", "ist", "tokentune"],
    ["dora", "ist", "tokentune"],
    ["lora", "checkpointing", "ist", "tokentune"],
]


def _contract_params() -> list:
    run = sampled_combinations(everything=False)
    return [
        pytest.param(m, id="+".join(m), marks=[] if m in FAST_CONTRACT else [pytest.mark.slow])
        for m in allowed_combinations()
        if m in run or m in FAST_CONTRACT
    ]


def test_the_contract_runs_every_combination_or_its_checkpointing_sample(monkeypatch):
    ids = {p.id for p in _contract_params()}
    every = {"+".join(m) for m in allowed_combinations()}
    assert {i for i in every if "checkpointing" not in i} <= ids  # no other combination is sampled
    assert 7 <= sum("checkpointing" in i for i in ids) < sum("checkpointing" in i for i in every)
    monkeypatch.setenv(ALL_COMBINATIONS_ENV, "1")
    assert {p.id for p in _contract_params()} == every


@pytest.mark.parametrize("methods", _contract_params())
def test_method_contract(methods, tiny_workspace, tmp_path, inspector):
    d = tiny_run_dict(
        tiny_workspace, methods + ["_inspect"], tmp_path / "a", train={"max_steps": 4, "save_every": 2}
    )
    if "ist" in methods:
        d["ist"] = {"budget": 1, "start_step": 1, "update_every": 2, "probe_batch_size": 4}
    full = train(RunConfig.from_dict(d))
    losses = [h["loss"] for h in full.history if "loss" in h]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)

    model = inspector["model"]
    params = dict(model.named_parameters())
    for n, before in inspector["frozen"].items():
        assert torch.equal(params[n].detach(), before), f"frozen parameter {n} changed"
    for grads in inspector["grads"]:
        assert grads, "no parameter received a gradient"
        assert grads <= inspector["trainable"], (
            f"frozen params got grads: {sorted(grads - inspector['trainable'])[:3]}"
        )
        if inspector["is_adapter"]:
            assert all("lora_" in n for n in grads), sorted(n for n in grads if "lora_" not in n)[:3]
    if "full" in methods:
        assert not inspector["frozen"] and not inspector["is_adapter"]

    # checkpoint round-trip: resume from step 2 and redo steps 3-4
    ckpt = tmp_path / "a" / "checkpoint-000002"
    assert (ckpt / "state.json").exists()
    d2 = dict(d, train=dict(d["train"], output_dir=str(tmp_path / "b")))
    resumed = train(RunConfig.from_dict(d2), resume_from=ckpt)
    r_losses = [h["loss"] for h in resumed.history if "loss" in h]
    assert [h["step"] for h in resumed.history if "loss" in h] == [3, 4]
    assert r_losses == pytest.approx(losses[2:], abs=RESUME_TOL)


def test_qlora_training_keeps_one_4bit_kernel_after_an_eval_pass(tiny_workspace):
    """bitsandbytes repacks 4-bit weights for a CPU inference kernel on the first eval-mode no-grad
    forward (on AVX512-BF16 CPUs); QLoRA.prepare turns that off, so an IST probe or in-loop
    validation leaves training's numerics (and exact resume) unchanged."""
    import bitsandbytes as bnb

    from tokentune.config import ModelConfig
    from tokentune.methods.qlora import QLoRA, QLoraSettings
    from tokentune.models import load_model

    q = QLoRA(QLoraSettings(compute_dtype="float32"))
    model = q.prepare(load_model(ModelConfig(name_or_path=tiny_workspace["model"]), q.load_kwargs()))
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears and not any(m.support_avx512bf16_for_cpu for m in linears)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    before = model(input_ids=ids).logits.detach()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    after = model(input_ids=ids).logits.detach()
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in linears)
    assert torch.equal(before, after)


def test_a_worker_skips_the_packages_only_unused_methods_need():
    """``skip_unused_packages``: without QLoRA, bitsandbytes is not imported (peft still works); with
    QLoRA nothing is skipped. In fresh processes: the skip lasts for the process."""
    import subprocess
    import sys

    code = (
        "import sys; from tokentune.methods import skip_unused_packages as s; print(s({m})); "
        "import peft; print('bitsandbytes' in sys.modules and sys.modules['bitsandbytes'] is not None)"
    )
    lora = subprocess.run(
        [sys.executable, "-c", code.format(m=[["lora", "tokentune"]])], capture_output=True, text=True
    )
    assert lora.stdout.split() == ["['bitsandbytes']", "False"], lora.stderr[-2000:]
    qlora = subprocess.run(
        [sys.executable, "-c", code.format(m=[["lora"], ["qlora", "lora"]])], capture_output=True, text=True
    )
    assert qlora.stdout.split() == ["[]", "True"], qlora.stderr[-2000:]


def test_a_worker_keeps_bitsandbytes_for_an_8bit_optimizer_without_qlora():
    """A LoRA worker with ``train.optimizer: adamw_8bit`` needs bitsandbytes though no method does (the
    memory-levers sweep failed its adamw_8bit trials with "bitsandbytes is not installed" before)."""
    import subprocess
    import sys

    code = (
        "from orchestrator.run.train_worker import skip_unused; from tokentune.config import RunConfig; "
        "print(skip_unused([RunConfig.from_dict({{'methods': ['lora'], 'train': {{'optimizer': '{o}'}}}})]))"
    )
    for optimizer, skipped in (("adamw_8bit", "[]"), ("adamw", "['bitsandbytes']")):
        done = subprocess.run(
            [sys.executable, "-c", code.format(o=optimizer)], capture_output=True, text=True
        )
        assert done.stdout.split() == [skipped], done.stderr[-2000:]
