"""Sweep specs without Ray: every shipped file loads and dry-runs; every error names its key."""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.spec.sweep import SpecError, SweepSpec, load_spec
from tokentune.estimate import estimate_memory
from tokentune.shape import model_shape

ROOT = Path(__file__).resolve().parents[1]
SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))
TINY_LAYERS = 4  # the shipped tiny Llama


def spec_dict(**changes) -> dict:
    """A small valid spec on the shipped tiny model; ``changes`` replace top-level keys."""
    d = {
        "name": "t",
        "base": {"methods": ["lora"], "train": {"max_steps": 5, "batch_size": 2}, "eval": {"limit": 5}},
        "search": {"lora.rank": {"grid": [4, 8]}},
    }
    d.update(changes)
    return d


def expect_error(d: dict, key: str, *fragments: str, overrides=None) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_spec(d, overrides)
    err = info.value
    assert err.key == key, f"error names {err.key!r}, expected {key!r}: {err}"
    for frag in fragments:
        assert frag in str(err), f"{frag!r} not in: {err}"
    return err


# ---- every shipped file ---------------------------------------------------------------------------------
def test_search_spaces_present():
    names = {p.name for p in SPACES}
    assert {
        "_base.yaml",
        "quickstart.yaml",
        "tokentune_paper.yaml",
        "ist_paper.yaml",
        "joint_search.yaml",
        "fidelity.yaml",
    } <= names


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_search_space_loads_and_dry_runs(path):
    # the paper specs name a 7B hub model and data of a GPU cluster: their inputs exist there, not here
    spec = load_spec(path, check_inputs="paper" not in path.name)
    trials = spec.dry_run_trials()
    assert len(trials) == spec.num_trials() >= 1
    for t in trials:
        cfg = spec.trial_config(t.searched)
        assert cfg.methods == t.config.methods
        assert t.resources["workers"] >= 1
    text = spec.plan_text()
    assert spec.name in text and "memory/worker" in text


def test_quickstart_covers_the_three_dimensions():
    spec = load_spec(ROOT / "search_spaces" / "quickstart.yaml")
    trials = spec.dry_run_trials()
    assert len(trials) >= 4
    methods = {tuple(t.config.methods) for t in trials}
    assert (
        ("lora",) in methods and any("tokentune" in m for m in methods) and any("ist" in m for m in methods)
    )
    assert len({t.config.method_configs["lora"].rank for t in trials}) >= 2
    assert spec.objective.metric == "eval/score" and spec.after_trial.evaluates
    tt = [t.config.method_configs["tokentune"] for t in trials if "tokentune" in t.config.methods]
    assert tt and all(c.select == "labelled" for c in tt)  # not handicapped by the one-token answers


def test_paper_specs_settings():
    tt = load_spec(ROOT / "search_spaces" / "tokentune_paper.yaml", check_inputs=False)
    cfg = tt.trial_config({"methods": ["lora", "tokentune"]})
    assert cfg.model.name_or_path == "meta-llama/Llama-2-7b-hf"
    assert cfg.data.train == "garage-bAInd/Open-Platypus" and cfg.data.max_length == 2048
    lora = cfg.method_configs["lora"]
    assert (lora.rank, lora.alpha, sorted(lora.target_modules)) == (
        8,
        16,
        ["down_proj", "gate_proj", "up_proj"],
    )
    assert cfg.method_configs["tokentune"].ratio == 0.3
    assert cfg.compute.workers * cfg.train.batch_size * cfg.train.grad_accum == 32
    assert cfg.compute.zero_stage == 2 and cfg.train.lr == 4e-4 and cfg.train.schedule == "cosine"
    assert cfg.eval.tasks == [
        "arc_challenge:25",
        "hellaswag:10",
        "mmlu:5",
        "truthfulqa_mc2:0",
        "winogrande:5",
    ]

    ist = load_spec(ROOT / "search_spaces" / "ist_paper.yaml", check_inputs=False)
    cfg = ist.trial_config({"methods": ["lora", "ist"]})
    assert cfg.model.name_or_path == "huggyllama/llama-7b"
    lora = cfg.method_configs["lora"]
    assert (lora.rank, lora.alpha) == (32, 64)
    assert sorted(lora.target_modules) == ["down_proj", "k_proj", "q_proj", "up_proj", "v_proj"]
    assert cfg.method_configs["ist"].budget == 0.25 and cfg.train.lr == 2e-4
    assert cfg.train.batch_size * cfg.compute.workers == 16 and cfg.data.max_length == 256

    joint = load_spec(ROOT / "search_spaces" / "joint_search.yaml")
    assert joint.tune.algorithm == "optuna" and joint.tune.scheduler.type == "asha"
    assert {"tokentune.ratio", "lora.rank", "ist.budget"} <= set(joint.search)


def test_uncached_hub_model_skips_layer_check_with_warning(caplog, monkeypatch):
    # online, an uncached hub model is a note in the plan (offline it is an error)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    d = spec_dict(base={"model": {"name_or_path": "nobody/not-a-cached-model"}, "methods": ["lora", "ist"]})
    d["search"] = {"ist.budget": {"choice": [1, 64]}}
    with caplog.at_level("WARNING"):
        spec = load_spec(d)
    assert "not in the HF cache" in caplog.text
    assert spec.dry_run_trials()[0].memory is None  # no shape, no estimate
    assert (
        "memory: unknown (model shape not available offline): nobody/not-a-cached-model" in spec.plan_text()
    )
    assert "will be downloaded at trial start" in spec.plan_text()


def test_spec_loading_never_imports_ray():
    code = (
        "import sys, orchestrator\n"
        "from orchestrator import load_spec, SweepSpec\n"
        "s = load_spec('search_spaces/quickstart.yaml'); s.plan_text()\n"
        "bad = [m for m in ('ray', 'mlflow') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


# ---- errors name their key ----------------------------------------------------------------------------------
def test_unknown_top_level_key():
    expect_error(spec_dict(serach={}), "serach", "unknown top-level key", "search")


def test_unknown_section_key():
    expect_error(spec_dict(tune={"num_sample": 2}), "tune.num_sample", "accepted keys in tune", "num_samples")
    expect_error(spec_dict(after_trial={"keep": "best"}), "after_trial.keep", "keep_merged")


def test_unknown_config_key_in_search():
    d = spec_dict(search={"lora.rnk": {"grid": [4, 8]}})
    expect_error(d, "search.lora.rnk", "lora.rnk", "rank")


def test_unknown_verb():
    d = spec_dict(search={"lora.rank": {"sample": [4, 8]}})
    expect_error(d, "search.lora.rank", "unknown verb 'sample'", "grid", "choice", "loguniform")


def test_plain_list_is_ambiguous():
    expect_error(spec_dict(search={"lora.rank": [4, 8]}), "search.lora.rank", "ambiguous", "grid")


def test_ratio_above_one():
    d = spec_dict(search={"tokentune.ratio": {"uniform": [0.1, 1.5]}})
    d["base"]["methods"] = ["lora", "tokentune"]
    expect_error(d, "search.tokentune.ratio", "1.5", "upper bound", "(0, 1]")


def test_rank_not_positive():
    expect_error(spec_dict(search={"lora.rank": {"choice": [0, 8]}}), "search.lora.rank", "0", "integer >= 1")


def test_float_rank_from_a_float_range():
    expect_error(spec_dict(search={"lora.rank": {"loguniform": [4, 64]}}), "search.lora.rank", "integer")


def test_budget_above_layer_count():
    d = spec_dict(search={"ist.budget": {"choice": [1, 8]}})
    d["base"]["methods"] = ["lora", "ist"]
    err = expect_error(d, "search.ist.budget", "ist.budget=8", f"{TINY_LAYERS} decoder layers")
    assert "fraction" in str(err)
    d["search"] = {"ist.budget": {"choice": [1, 4, 0.5]}}  # counts up to L and fractions are fine
    assert load_spec(d).num_trials() == 1


def test_budget_in_base_is_checked_too():
    d = spec_dict(base={"methods": ["lora", "rst"], "rst": {"budget": 5}})
    expect_error(d, "base", "rst.budget=5", f"{TINY_LAYERS} decoder layers")


@pytest.mark.parametrize(
    "verb,args,fragment",
    [
        ("uniform", [1.0, 0.5], "low 1.0 >= high 0.5"),
        ("loguniform", [0, 0.1], "low 0 <= 0"),
        ("uniform", [0.1], "[low, high]"),
        ("quniform", [1, 8, 0], "q=0"),
        ("randint", [8, 2], "low 8 > high 2"),
        ("randint", [1.5, 4], "two integers"),
        ("choice", [], "non-empty list"),
    ],
)
def test_bad_ranges(verb, args, fragment):
    d = spec_dict(search={"train.lr": {verb: args}})
    expect_error(d, "search.train.lr", fragment)


def test_bad_objective():
    expect_error(
        spec_dict(objective={"metric": "eval/score", "mode": "maximize"}), "objective.mode", "min or max"
    )
    expect_error(spec_dict(objective={"metric": "accuracy", "mode": "max"}), "objective.metric", "eval/score")
    d = spec_dict(objective={"metric": "eval/score", "mode": "max"}, after_trial={"action": "merge"})
    expect_error(d, "objective.metric", "after_trial.action: merge+eval")
    # any measured memory/* key is an objective; peak_memory_bytes is gone
    spec = load_spec(spec_dict(objective={"metric": "memory/activations_gb", "mode": "min"}))
    assert spec.objective.metric == "memory/activations_gb"
    expect_error(spec_dict(objective={"metric": "peak_memory_bytes"}), "objective.metric", "memory/train_gb")
    budget = load_spec(spec_dict(objective={"metric": "eval/score", "memory_budget_gb": 0.5}))
    assert budget.objective.memory_budget_gb == 0.5
    expect_error(spec_dict(objective={"memory_budget_gb": 0}), "objective.memory_budget_gb", "GB > 0")


def test_default_objective_follows_evaluation():
    assert load_spec(spec_dict()).objective.metric == "eval/score"
    spec = load_spec(spec_dict(after_trial={"action": "none"}))
    assert (spec.objective.metric, spec.objective.mode) == ("val_loss", "min")
    assert load_spec(spec_dict(after_trial={"action": "merge"})).objective.metric == "val_loss"


def test_grid_with_optuna():
    d = spec_dict(tune={"algorithm": "optuna", "num_samples": 4})
    expect_error(d, "search.lora.rank", "optuna", "choice")
    d["search"] = {"lora.rank": {"choice": [4, 8]}}
    assert load_spec(d).num_trials() == 4


def test_tune_settings_errors():
    expect_error(spec_dict(tune={"num_samples": 0}), "tune.num_samples", ">= 1")
    expect_error(spec_dict(tune={"algorithm": "bayes"}), "tune.algorithm", "grid, random, optuna")
    expect_error(spec_dict(tune={"scheduler": {"type": "pbt"}}), "tune.scheduler.type", "fifo, asha")
    assert load_spec(spec_dict(tune={"scheduler": "asha"})).tune.scheduler.metric == "val_loss"
    d = spec_dict(tune={"scheduler": {"type": "asha", "metric": "eval/score", "mode": "max"}})
    expect_error(d, "tune.scheduler.metric", "val_loss, loss or a measured memory/* key")
    d = spec_dict(tune={"scheduler": {"type": "asha", "metric": "memory/train_gb", "mode": "min"}})
    assert load_spec(d).tune.scheduler.metric == "memory/train_gb"  # reported while training
    expect_error(spec_dict(tune={"max_concurrent": 0}), "tune.max_concurrent", "auto")
    expect_error(spec_dict(after_trial={"keep_merged": "some"}), "after_trial.keep_merged", "best")


def test_after_trial_action():
    assert load_spec(spec_dict()).after_trial.action == "merge+eval"
    for action, merges, evaluates in (
        ("none", False, False),
        ("merge", True, False),
        ("merge+eval", True, True),
    ):
        a = load_spec(spec_dict(after_trial={"action": action})).after_trial
        assert (a.action, a.merges, a.evaluates) == (action, merges, evaluates)
    expect_error(spec_dict(after_trial={"action": "eval"}), "after_trial.action", "'eval'", "none | merge")
    # merge: false with evaluate: true used to be silently ignored: the old keys name the new one
    for old in ({"merge": False, "evaluate": True}, {"evaluate": False}, {"merge": True}):
        expect_error(spec_dict(after_trial=old), "after_trial.action", "no longer accepted", "merge+eval")
    expect_error(spec_dict(), "after_trial.action", overrides=["after_trial.evaluate=false"])


def test_spec_sections_are_settings_checked_where_built():
    """Each section is a frozen setting(default, help) dataclass: documented, valid at its defaults, and
    checked when built (in Python as in YAML), naming section.key, the value and what is accepted."""
    from orchestrator.spec.sections import SECTIONS, AfterTrial, TuneSettings, section_docs

    for name, cls in SECTIONS.items():
        docs = section_docs(name)
        assert docs and all(d.help and d.key.startswith(name + ".") for d in docs), name
        cls()
    with pytest.raises(SpecError) as info:
        AfterTrial(keep_merged="some")
    assert (
        info.value.key == "after_trial.keep_merged"
        and "'some'" in str(info.value)
        and "best, all" in str(info.value)
    )
    with pytest.raises(SpecError) as info:
        TuneSettings(scheduler={"type": "asha", "grace_period": 0})
    assert info.value.key == "tune.scheduler.grace_period"
    assert TuneSettings(scheduler="asha").scheduler.type == "asha"
    with pytest.raises(dataclasses.FrozenInstanceError):
        TuneSettings().seed = 1
    expect_error(
        spec_dict(tune={"schedular": "asha"}), "tune.schedular", "accepted keys in tune", "scheduler"
    )
    expect_error(spec_dict(tune={"scheduler": {"typ": "asha"}}), "tune.scheduler.typ", "type")
    expect_error(spec_dict(tune={"scheduler": 3}), "tune.scheduler", "expected a mapping")
    expect_error(
        spec_dict(tune={"scheduler": {"grace_period": 4, "max_t": 2}}), "tune.scheduler.max_t", ">= grace"
    )


def test_trial_configs_are_built_once(monkeypatch):
    """A resolved spec builds each planned trial's RunConfig once: validation, the dry run and the tuner's
    resource and ASHA computations share them; a renamed copy keeps them; a trial's driver (the spec
    pickled to it) builds its own."""
    from orchestrator.run.space import default_max_t, max_concurrent_trials, trial_demand
    from tokentune.config import RunConfig

    built = []
    from_dict = RunConfig.from_dict.__func__
    monkeypatch.setattr(
        RunConfig, "from_dict", classmethod(lambda cls, d: built.append(1) or from_dict(cls, d))
    )
    search = {"methods": {"grid": [["lora"], ["lora", "tokentune"]]}, "lora.rank": {"grid": [4, 8]}}
    spec = load_spec(spec_dict(search=search))
    assert len(built) == 1 + 4 + 4  # base, each key's candidates, each combination (= the 4 trials)
    spec.plan_text()
    spec.dry_run_trials()
    cluster = {"CPU": 8.0}
    trial_demand(spec, cluster), max_concurrent_trials(spec, cluster), default_max_t(spec)
    spec.replaced(name="other").plan_text()
    assert len(built) == 9
    driver_copy = pickle.loads(pickle.dumps(spec))
    assert driver_copy == spec and driver_copy._configs == {}
    cfg = driver_copy.trial_config({"methods": ["lora"], "lora.rank": 8})
    assert len(built) == 10 and cfg is not spec.planned_config({"methods": ["lora"], "lora.rank": 8})


def test_known_model_shapes_stand_in_offline():
    """The hub models the shipped specs name have a known shape, so a dry run estimates their memory
    without their config.json; an unknown one says so."""
    from tokentune.shape import KNOWN_SHAPES

    for path in SPACES:
        model = (yaml.safe_load(path.read_text()).get("base") or {}).get("model") or {}
        name = model.get("name_or_path")
        assert name is None or name in KNOWN_SHAPES, f"{path.name}: add {name}'s shape to KNOWN_SHAPES"
        if name is not None:
            assert model_shape(name) == KNOWN_SHAPES[name]
    assert KNOWN_SHAPES["meta-llama/Llama-2-7b-hf"].layers == 32


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_search_space_dry_runs_offline_without_input_checks(path, monkeypatch):
    """``run_sweep(FILE, dry_run=True, check_inputs=False)`` (``tokentune sweep FILE --dry-run
    --no-input-checks``) plans every shipped spec offline, its memory estimated from the model's shape."""
    from orchestrator.api import run_sweep

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = run_sweep(path, dry_run=True, check_inputs=False, progress=False)
    assert len(res.trials) == res.spec.num_trials() >= 1
    assert all(t.status == "planned" and "memory/estimate_gb" in t.metrics for t in res.trials)
    assert "memory: unknown" not in res.plan_text
    if "paper" in path.name:
        assert "note: inputs not checked" in res.plan_text


def test_combination_errors_name_the_combination(tmp_path):
    two_layers = tmp_path / "two_layers"
    two_layers.mkdir()
    (two_layers / "config.json").write_text(
        '{"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4}'
    )
    d = spec_dict(
        base={"methods": ["lora", "ist"], "ist": {"budget": 1}},
        search={"ist.budget": {"grid": [1, 3]}, "model.name_or_path": {"grid": [None, str(two_layers)]}},
    )
    # budget 3 fits the shipped model and the 2-layer model fits budget 1: only the pair fails
    with pytest.raises(SpecError) as info:
        load_spec(d)
    assert info.value.key.startswith("search (the combination ist.budget=3, model.name_or_path=")
    assert "ist.budget=3" in str(info.value) and "2 decoder layers" in str(info.value)


def test_method_conflicts_name_the_key():
    d = spec_dict(search={"methods": {"grid": [["qlora", "lora"], ["qlora", "full"]]}})
    expect_error(d, "search.methods", "qlora", "full")


def test_base_errors_name_the_base():
    d = spec_dict(base={"train": {"lr": 5}})
    expect_error(d, "base", "train.lr=5")


# ---- includes and overrides -------------------------------------------------------------------------------------
def write(path: Path, d: dict) -> Path:
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def test_includes_deep_merge_and_this_file_wins(tmp_path):
    write(
        tmp_path / "_shared.yaml",
        {
            "base": {"methods": ["lora"], "train": {"max_steps": 7, "lr": 1e-3}, "lora": {"rank": 4}},
            "search": {"lora.rank": {"grid": [4, 8]}, "train.lr": {"choice": [1e-3, 2e-3]}},
            "tune": {"num_samples": 3, "seed": 5},
        },
    )
    (tmp_path / "sub").mkdir()
    child = write(
        tmp_path / "sub" / "child.yaml",
        {
            "include": ["../_shared.yaml"],
            "base": {"train": {"lr": 5e-3}},
            "search": {"lora.rank": {"choice": [16]}, "train.lr": None},  # replace one, remove one
            "tune": {"num_samples": 1},
        },
    )
    spec = load_spec(child)
    assert spec.name == "child"
    assert spec.base["train"] == {"max_steps": 7, "lr": 5e-3}
    assert spec.base["lora"] == {"rank": 4}
    assert list(spec.search) == ["lora.rank"] and spec.search["lora.rank"].verb == "choice"
    assert (spec.tune.num_samples, spec.tune.seed) == (1, 5)


def test_include_errors(tmp_path):
    a = write(tmp_path / "a.yaml", {"include": ["b.yaml"], "name": "a"})
    write(tmp_path / "b.yaml", {"include": ["a.yaml"]})
    with pytest.raises(SpecError, match="cycle") as info:
        load_spec(a)
    assert info.value.key == "include"
    c = write(tmp_path / "c.yaml", {"include": ["missing.yaml"]})
    with pytest.raises(SpecError, match="missing.yaml"):
        load_spec(c)


def test_overrides_address_spec_and_base():
    spec = load_spec(
        spec_dict(),
        [
            "base.train.max_steps=20",
            "tune.num_samples=2",
            "train.lr=1e-4",  # bare config key = base.train.lr
            "methods=[lora,tokentune]",
            "search.tokentune.ratio={grid: [0.2, 0.4]}",
        ],
    )
    assert spec.base["train"]["max_steps"] == 20 and spec.base["train"]["lr"] == 1e-4
    assert spec.base["methods"] == ["lora", "tokentune"]
    assert spec.tune.num_samples == 2
    assert spec.num_trials() == 2 * 2 * 2  # rank grid x ratio grid x samples
    cfg = spec.trial_config({"lora.rank": 8, "tokentune.ratio": 0.4})
    assert cfg.train.max_steps == 20 and cfg.method_configs["tokentune"].ratio == 0.4


def test_override_of_a_searched_key_pins_it():
    spec = load_spec(spec_dict(), ["lora.rank=16"])
    assert "lora.rank" not in spec.search and spec.num_trials() == 1
    assert spec.trial_config({}).method_configs["lora"].rank == 16


def test_override_errors_name_the_key():
    expect_error(spec_dict(), "search.lora.rank", "integer", overrides=["search.lora.rank={choice: [0.5]}"])
    expect_error(spec_dict(), "tune.num_samples", overrides=["tune.num_samples=0"])
    with pytest.raises(SpecError, match="lora.rnk"):
        load_spec(spec_dict(), ["lora.rnk=3"])


def test_resolved_spec_round_trips():
    spec = load_spec(ROOT / "search_spaces" / "joint_search.yaml", ["tune.num_samples=3"])
    again = load_spec(yaml.safe_load(spec.to_yaml()))
    assert again.to_dict() == spec.to_dict()
    assert isinstance(again, SweepSpec) and again.num_trials() == 3


# ---- trials --------------------------------------------------------------------------------------------------------
def test_trial_config_from_flat_nested_and_labelled_values():
    d = spec_dict(
        search={"methods": {"choice": [["lora"], ["lora", "tokentune"]]}, "lora.rank": {"randint": [2, 4]}}
    )
    spec = load_spec(d)
    flat = spec.trial_config({"methods": ["lora", "tokentune"], "lora.rank": 3.0})
    nested = spec.trial_config({"methods": ["lora", "tokentune"], "lora": {"rank": 3}})
    labelled = spec.trial_config({"methods": "[lora, tokentune]", "lora.rank": 3})  # Optuna's labels
    for cfg in (flat, nested, labelled):
        assert cfg.methods == ["lora", "tokentune"] and cfg.method_configs["lora"].rank == 3
    with pytest.raises(SpecError, match="search.lora.rank"):
        spec.trial_config({"methods": ["lora"]})


def test_expand_grid_and_samples_are_seeded():
    d = spec_dict(
        search={
            "methods": {"grid": [["lora"], ["lora", "tokentune"], ["lora", "tokentune", "ist"]]},
            "lora.rank": {"grid": [4, 8]},
            "train.lr": {"loguniform": [1e-4, 1e-2]},
            "tokentune.ratio": {"quniform": [0.1, 1.0, 0.1]},
        },
        tune={"num_samples": 2, "seed": 3},
    )
    spec = load_spec(d)
    assert len(spec.expand_grid()) == 6 and spec.num_trials() == 12
    a, b = spec.searched_values(), load_spec(d).searched_values()
    assert a == b  # the same seed draws the same values
    assert all(1e-4 <= p["train.lr"] <= 1e-2 and 0.1 <= p["tokentune.ratio"] <= 1.0 for p in a)
    other = load_spec({**d, "tune": {"num_samples": 2, "seed": 4}}).searched_values()
    assert [p["train.lr"] for p in other] != [p["train.lr"] for p in a]


# ---- memory estimate -------------------------------------------------------------------------------------------------
def memory_of(**base) -> float:
    d = spec_dict(base=base, search={})
    spec = load_spec(d)
    return estimate_memory(spec.trial_config({})).total_gb


def test_memory_estimate_orders_configs():
    shape = model_shape(None)
    assert shape is not None and shape.layers == TINY_LAYERS
    tt = {"methods": ["lora", "tokentune"]}
    assert memory_of(**tt, tokentune={"ratio": 0.3}) < memory_of(**tt, tokentune={"ratio": 1.0})
    # at ratio 1 the split forward still runs, with its [selected x all] attention mask
    assert memory_of(**tt, tokentune={"ratio": 1.0}) > memory_of(methods=["lora"])
    assert memory_of(methods=["lora"], lora={"rank": 4}) < memory_of(methods=["lora"], lora={"rank": 64})
    ist = {"methods": ["lora", "ist"]}
    assert (
        memory_of(**ist, ist={"budget": 1})
        < memory_of(**ist, ist={"budget": 3})
        < memory_of(methods=["lora"])
    )
    assert memory_of(methods=["lora"]) < memory_of(methods=["full"])
    long = {"data": {"max_length": 256}}
    assert memory_of(methods=["lora"]) < memory_of(methods=["lora"], **long)


def test_memory_estimate_of_a_7b_model():
    spec = load_spec(ROOT / "search_spaces" / "tokentune_paper.yaml", check_inputs=False)
    est = {tuple(p.config.methods): p.memory for p in spec.dry_run_trials()}
    lora, lora_tt = est[("lora",)], est[("lora", "tokentune")]
    q, q_tt = est[("qlora", "lora")], est[("qlora", "lora", "tokentune")]
    assert 12 < lora.weights_gb < 14  # 6.7B parameters in bf16
    assert q.weights_gb < lora.weights_gb / 3  # 4-bit linear layers
    assert q_tt.total_gb < q.total_gb < lora.total_gb and lora_tt.total_gb < lora.total_gb
    # the paper's spec trains under ZeRO-2 with bf16: DeepSpeed casts QLoRA's upcast norms back to bf16,
    # so its stream is bf16 like LoRA's (without DeepSpeed it is fp32: tests/test_memory.py)
    assert q.activations_gb == pytest.approx(lora.activations_gb)
    assert lora.trainable_params == 32 * 3 * 8 * (4096 + 11008)  # r (in + out) on 3 MLP modules x 32 layers


def test_memory_limit_marks_trials(tmp_path):
    d = spec_dict(search={"methods": {"grid": [["lora"], ["lora", "tokentune"]]}})
    d["tune"] = {"max_memory_gb": 0.05}
    d["base"]["tokentune"] = {"ratio": 0.2}
    d["base"]["train"]["batch_size"] = 16
    spec = load_spec(d)
    over = {tuple(p.config.methods): p.over_limit for p in spec.dry_run_trials()}
    assert over == {("lora",): True, ("lora", "tokentune"): False}
    assert "> budget 0.05 GB (tune.max_memory_gb)" in spec.plan_text()
    expect_error({**d, "tune": {"max_memory_gb": -1}}, "tune.max_memory_gb", "GB > 0")
    # it moved out of the run config: the old key names the new one
    old = {**d, "tune": {}, "base": {**d["base"], "compute": {"max_memory_gb": 0.05}}}
    expect_error(old, "tune.max_memory_gb", "base.compute.max_memory_gb is no longer accepted", "tune:")
    expect_error(spec_dict(), "tune.max_memory_gb", overrides=["compute.max_memory_gb=20"])
    expect_error(spec_dict(search={"compute.max_memory_gb": {"grid": [1, 2]}}), "tune.max_memory_gb")
