"""Bad configuration gets a clear error naming the key and what would be accepted."""

from __future__ import annotations

import pytest

from tokentune.config import ConfigError, RunConfig, apply_overrides, load_config, parse_override


@pytest.mark.parametrize(
    "d, needle",
    [
        ({"trian": {}}, "unknown config key 'trian'"),
        ({"train": {"learning_rate": 1e-3}}, "train.learning_rate"),
        ({"train": {"lr": 0}}, "train.lr=0"),
        ({"train": {"lr": 5.0}}, "train.lr=5.0"),
        ({"train": {"lr": float("nan")}}, "train.lr=nan"),
        ({"train": {"max_steps": 0}}, "train.max_steps=0"),
        ({"train": {"schedule": "step"}}, "train.schedule='step'"),
        ({"methods": ["lora", "loar"]}, "unknown method 'loar'; known: "),
        ({"methods": []}, "methods=[]"),
        ({"methods": ["qlora"]}, "exactly one of"),
        ({"methods": ["qlora", "full"]}, "requires one of: lora, dora"),
        ({"methods": ["lora", "full"]}, "exactly one of"),
        ({"methods": ["lora", "lora"]}, "twice"),
        ({"lora": {"rank": 0}}, "lora.rank=0"),
        ({"lora": {"rank": 2.5}}, "lora.rank=2.5"),
        ({"lora": {"alpha": -1}}, "lora.alpha=-1"),
        ({"lora": {"dropout": 1.0}}, "lora.dropout=1.0"),
        ({"dora": {"rank": -4}, "methods": ["dora"]}, "dora.rank=-4"),
        ({"lora": {"rnak": 8}}, "lora.rnak"),
        ({"qlora": {"quant_type": "int3"}, "methods": ["qlora", "lora"]}, "qlora.quant_type='int3'"),
        ({"model": {"dtype": "float8"}}, "model.dtype='float8'"),
        ({"compute": {"zero_stage": 4}}, "compute.zero_stage=4"),
        ({"data": {"max_length": 2}}, "data.max_length=2"),
    ],
)
def test_bad_config_names_the_key(d, needle):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict(d)
    assert needle in str(e.value)


def test_unknown_key_lists_accepted_keys():
    with pytest.raises(ConfigError, match="accepted keys in lora: .*rank"):
        RunConfig.from_dict({"lora": {"rnak": 8}})


def test_defaults_and_alpha_tied_to_rank():
    cfg = RunConfig.from_dict({"lora": {"rank": 16}})
    assert cfg.methods == ["lora"]
    assert cfg.method_configs["lora"].alpha == 32


def test_round_trip_through_dict():
    cfg = RunConfig.from_dict({"methods": ["qlora", "dora"], "dora": {"rank": 4}, "train": {"lr": 3e-4}})
    again = RunConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


def test_overrides_use_the_yaml_names(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("methods: [lora]\ntrain: {lr: 1.0e-3}\n")
    cfg = load_config(p, ["train.lr=1e-4", "lora.rank=4", "methods=[dora]"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.methods == ["dora"]
    assert parse_override("train.bf16=true") == ("train.bf16", True)
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.lr"])


def test_missing_and_malformed_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
