"""``search.setup``: a grid over named bundles of config keys compares whole setups side by side (LoRA,
LoRA + checkpointing, LoRA + ZeRO-Offload, ...) instead of the product of their parts."""

from __future__ import annotations

import pytest

from orchestrator.spec.sweep import load_spec
from tests.conftest import refused

SETUPS = [
    {"name": "lora", "methods": ["lora"]},
    {"name": "lora+tokentune", "methods": ["lora", "tokentune"], "tokentune.ratio": 0.25},
    {"name": "lora+ist", "methods": ["lora", "ist"], "ist.budget": 2, "train.lr": 0.002},
]


def _spec(search: dict, **extra) -> dict:
    return {"name": "s", "base": {"train": {"max_steps": 2}}, "search": search, **extra}


def test_each_trial_gets_exactly_one_setups_keys_crossed_with_the_other_grids():
    spec = load_spec(_spec({"setup": {"grid": SETUPS}, "train.seed": {"grid": [0, 1]}}), check_inputs=False)
    assert spec.num_trials() == 6
    cfgs = spec.trial_configs()
    got = [(c.methods, c.train.seed, c.train.lr) for c in cfgs]
    base_lr = load_spec(_spec({}), check_inputs=False).trial_config().train.lr
    assert got == [
        (["lora"], 0, base_lr),
        (["lora"], 1, base_lr),
        (["lora", "tokentune"], 0, base_lr),
        (["lora", "tokentune"], 1, base_lr),
        (["lora", "ist"], 0, 0.002),
        (["lora", "ist"], 1, 0.002),
    ]
    assert cfgs[2].method_configs["tokentune"].ratio == 0.25
    assert cfgs[4].method_configs["ist"].budget == 2
    rows = spec.plan_text()
    assert "grid over setups: lora, lora+tokentune, lora+ist" in rows
    assert "lora+tokentune" in rows.splitlines()[-5]  # the trial rows show each setup by its name


def test_a_setup_from_tune_is_decoded_by_its_name():
    """Optuna gets string labels: a setup travels as its name and comes back as its keys."""
    spec = load_spec(_spec({"setup": {"choice": SETUPS}}), check_inputs=False)
    assert spec.trial_config({"setup": "lora+ist"}).methods == ["lora", "ist"]


@pytest.mark.parametrize(
    "setup, fragment",
    [
        ({"grid": [{"methods": ["lora"]}]}, "expected a mapping with a name"),
        ({"grid": [{"name": "a"}]}, "expected a mapping with a name"),
        ({"grid": ["lora"]}, "expected a mapping with a name"),
        ({"grid": [{"name": "a", "methods": ["lora"]}, {"name": "a", "methods": ["full"]}]}, "used twice"),
        ({"uniform": [0, 1]}, "expected grid, choice or fixed over setups"),
        ({"grid": [{"name": "a", "lora.rnak": 4}]}, "rnak"),
        ({"grid": [{"name": "a", "methods": ["lora", "lora"]}]}, "methods"),
    ],
)
def test_bad_setups_are_refused_naming_search_setup(setup, fragment):
    refused(_spec({"setup": setup}), "search.setup", fragment)


def test_a_key_set_by_a_setup_and_searched_again_is_refused():
    refused(
        _spec({"setup": {"grid": SETUPS}, "ist.budget": {"grid": [1, 2]}}),
        "search.ist.budget",
        "overlaps search.setup",
    )
