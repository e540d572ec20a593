"""A newcomer's plug-in works end to end without touching ``orchestrator/`` (issue 14's acceptance test).

``Toy`` is a method registered from this file only: a ``Method`` subclass with its own settings
dataclass (fields declared with ``setting``), a shape check and a memory term. A sweep's dry run
validates its searched keys, names them in its errors and plans with its memory term; a 2-step
training run composes it with LoRA through the real loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator import run_sweep
from orchestrator.spec.sweep import SpecError, load_spec
from tests.conftest import tiny_run_dict
from tokentune.config import RunConfig
from tokentune.errors import check, is_int, is_number
from tokentune.estimate import estimate_memory
from tokentune.methods import REGISTRY, Method, register
from tokentune.settings import describe, setting
from tokentune.train import train

TINY_LAYERS = 4  # the shipped tiny Llama the dry runs plan for


@dataclass
class ToySettings:
    """The toy's settings (section ``toy``)."""

    share: float = setting(1.0, "share of each sequence whose activations are saved, in (0, 1]")
    layers: int = setting(1, "decoder layers the toy needs (at most the model's)")

    def __post_init__(self) -> None:
        check(is_number(self.share) and 0 < self.share <= 1, "toy.share", self.share, "a number in (0, 1]")
        check(is_int(self.layers) and self.layers >= 1, "toy.layers", self.layers, "an integer >= 1")


class Toy(Method):
    """Counts optimizer steps; knows its shape rule and its memory term without a model."""

    name = "toy"
    config_cls = ToySettings
    kind = "modifier"
    order = 60  # after the trainer: prepare() sees the adapters

    @classmethod
    def check_shape(cls, settings: ToySettings, shape, section: str) -> None:
        check(
            settings.layers <= shape.layers,
            f"{section}.layers",
            settings.layers,
            f"at most the model's {shape.layers} decoder layers",
        )

    @classmethod
    def memory_terms(cls, settings: ToySettings, terms) -> None:
        terms.token_share *= settings.share

    def __init__(self, config: ToySettings) -> None:
        super().__init__(config)
        self.steps = 0
        self.trainable_seen = 0

    def prepare(self, model):
        self.trainable_seen = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return model

    def on_step_end(self, ctx) -> None:
        self.steps += 1

    def metrics(self) -> dict[str, float]:
        return {"toy/steps": float(self.steps), "toy/trainable": float(self.trainable_seen)}


@pytest.fixture
def toy():
    assert Toy.name not in REGISTRY
    register(Toy)
    yield Toy
    REGISTRY.pop(Toy.name, None)


def toy_spec(tmp_path: Path, search: dict, **base) -> dict:
    """A small spec on the shipped tiny model with methods [lora, toy]; ``base`` updates its base."""
    return {
        "name": "toy",
        "base": {
            "methods": ["lora", "toy"],
            "train": {"max_steps": 5, "batch_size": 2},
            "eval": {"limit": 5},
            **base,
        },
        "search": search,
        "storage": str(tmp_path / "sweeps"),
    }


def spec_error(d: dict) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_spec(d)
    return info.value


# ---- the dry run ----------------------------------------------------------------------------------------
def test_toy_settings_are_documented_and_typed(toy):
    assert [doc.key for doc in describe(ToySettings, "toy")] == ["toy.share", "toy.layers"]
    cfg = RunConfig.from_dict({"methods": ["lora", "toy"], "toy": {"share": 0.5}})
    assert cfg.toy.share == 0.5 and cfg.toy.layers == 1


def test_toy_searched_key_is_validated(toy, tmp_path):
    err = spec_error(toy_spec(tmp_path, {"toy.share": {"choice": [0.5, 1.5]}}))
    assert err.key == "search.toy.share"
    assert "toy.share=1.5" in str(err) and "(0, 1]" in str(err)
    err = spec_error(toy_spec(tmp_path, {"toy.shares": {"grid": [0.5]}}))
    assert err.key == "search.toy.shares" and "share" in str(err)
    assert load_spec(toy_spec(tmp_path, {"toy.share": {"grid": [0.25, 1.0]}})).num_trials() == 2


def test_toy_shape_check_names_the_key(toy, tmp_path):
    err = spec_error(toy_spec(tmp_path, {"toy.layers": {"grid": [1, 99]}}))
    assert err.key == "search.toy.layers"
    assert "toy.layers=99" in str(err) and f"{TINY_LAYERS} decoder layers" in str(err)

    err = spec_error(toy_spec(tmp_path, {}, toy={"layers": 99}))
    assert err.key == "base" and "toy.layers=99" in str(err)

    two_layers = tmp_path / "two_layers"  # layers=3 fits the shipped model; only the pair fails
    two_layers.mkdir()
    (two_layers / "config.json").write_text(
        '{"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4}'
    )
    search = {"toy.layers": {"grid": [1, 3]}, "model.name_or_path": {"grid": [None, str(two_layers)]}}
    err = spec_error(toy_spec(tmp_path, search))
    assert err.key.startswith("search (the combination toy.layers=3, model.name_or_path=")
    assert "2 decoder layers" in str(err)


def test_toy_memory_term_changes_the_plan(toy, tmp_path):
    d = toy_spec(tmp_path, {"toy.share": {"grid": [0.25, 1.0]}})
    res = run_sweep(d, dry_run=True, progress=False)
    assert [t.status for t in res.trials] == ["planned", "planned"]
    quarter, whole = load_spec(d).dry_run_trials()
    assert quarter.config.toy.share == 0.25 and whole.config.toy.share == 1.0
    assert quarter.memory.activations_gb < whole.memory.activations_gb
    assert quarter.memory.total_gb < whole.memory.total_gb
    assert quarter.memory.short() in res.plan_text and whole.memory.short() in res.plan_text

    lora_only = load_spec({**d, "base": {**d["base"], "methods": ["lora"]}, "search": {}})
    assert whole.memory.total_gb == pytest.approx(lora_only.dry_run_trials()[0].memory.total_gb)


# ---- a training run ----------------------------------------------------------------------------------------
def test_toy_trains_with_lora(toy, tiny_workspace, tmp_path):
    cfg = RunConfig.from_dict(
        tiny_run_dict(tiny_workspace, ["lora", "toy"], tmp_path / "run", toy={"share": 0.5})
    )
    result = train(cfg)
    assert result.steps == 2 and result.is_adapter
    last = result.history[-1]
    assert last["toy/steps"] == 2.0
    # toy.prepare ran after LoRA's: it saw only the adapters (as many as the estimate counts)
    assert last["toy/trainable"] == estimate_memory(cfg).trainable_params > 0
    assert all(math.isfinite(h["loss"]) for h in result.history if "loss" in h)
