"""The shipped offline defaults: model, tokenizer, instruction data, lm-eval task files."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import yaml

from tokentune.assets import (
    DEFAULT_TASKS,
    SHIPPED_TASK_FAMILIES,
    default_model_path,
    default_tasks_dir,
    default_tokenizer_path,
    default_train_data,
    default_val_data,
)
from tokentune.data import RESPONSE_HEADER
from tools.asset_common import format_prompt

MAX_MODEL_BYTES = 20 * 2**20


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _test_docs():
    return {name: _rows(default_tasks_dir() / "data" / f"{name}.jsonl") for name in SHIPPED_TASK_FAMILIES}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_tokenizer_path())


def test_model_loads_offline_and_is_small(tokenizer):
    from transformers import AutoModelForCausalLM

    path = default_model_path() / "model.safetensors"
    assert path.stat().st_size <= MAX_MODEL_BYTES
    model = AutoModelForCausalLM.from_pretrained(default_model_path())
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.num_hidden_layers >= 4
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert cfg.vocab_size == len(tokenizer)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    ids = tokenizer(["The dog ran.", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape[:2] == ids["input_ids"].shape
    assert torch.isfinite(logits).all()


def test_tokenizer_special_tokens_and_template(tokenizer):
    assert tokenizer.padding_side == "right"
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    prompt = format_prompt("What kind of thing is named in the sentence?", "I saw a dog.")
    ids = tokenizer(prompt)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) <= 40  # the template pieces are single tokens
    assert tokenizer.decode(ids, skip_special_tokens=True) == prompt
    # Prompt tokens are a prefix of prompt+answer tokens (prompt masking and lm-eval both rely on it),
    # also when the trailing "\n" is cut off as lm-eval does before splitting context/continuation.
    whole = tokenizer(prompt + "animal")["input_ids"]
    assert whole[: len(ids)] == ids
    assert whole[: len(ids) - 1] == tokenizer(prompt.rstrip())["input_ids"]
    assert prompt.rstrip().endswith(RESPONSE_HEADER)


def test_instruction_rows_have_string_fields():
    for path in (default_train_data(), default_val_data()):
        rows = _rows(path)
        assert len(rows) >= 100
        for row in rows:
            assert set(row) == {"instruction", "input", "output"}
            assert all(isinstance(row[k], str) for k in row)
            assert row["instruction"] and row["output"]


def test_splits_are_disjoint():
    def keys(rows):
        return {(r["instruction"], r["input"]) for r in rows}

    train, val = keys(_rows(default_train_data())), keys(_rows(default_val_data()))
    test = set().union(*(keys(docs) for docs in _test_docs().values()))
    assert not train & val
    assert not train & test
    assert not val & test


def test_task_docs_match_training_prompt():
    for name, docs in _test_docs().items():
        assert 50 <= len(docs) <= 500, name
        labels = [d["label"] for d in docs]
        for doc in docs:
            assert doc["prompt"] == format_prompt(doc["instruction"], doc["input"])
            assert doc["choices"][doc["label"]] == doc["output"]
            assert len(doc["choices"]) == 4 and len(set(doc["choices"])) == 4
        # balanced gold positions: a model with a position/label bias scores chance
        assert max(labels.count(i) for i in range(4)) <= 0.4 * len(docs), name


def test_task_yamls():
    from tokentune.evaluate import _read_yaml  # reads lm-eval's !function tags as text

    tasks_dir = default_tasks_dir()
    for name in SHIPPED_TASK_FAMILIES:
        cfg = _read_yaml(tasks_dir / f"{name}.yaml")
        assert cfg["task"] == name
        assert cfg["output_type"] == "multiple_choice"
        assert cfg["target_delimiter"] == ""
        # the documents load relative to the YAML's folder (tt_data.py), from any working directory
        assert cfg["custom_dataset"] == "tt_data.load_docs" and (tasks_dir / "tt_data.py").is_file()
        assert (tasks_dir / cfg["dataset_kwargs"]["data_files"]["test"]).is_file()
    group = yaml.safe_load((tasks_dir / "tokentune_mini.yaml").read_text())
    assert DEFAULT_TASKS == [group["group"]]
    assert group["task"] == SHIPPED_TASK_FAMILIES
