"""Instruction data: reading, errors naming file and row, masking, truncation, padding, sampling."""

from __future__ import annotations

import json

import pytest

from tokentune.config import DataConfig
from tokentune.data import (
    ALPACA_TEMPLATE,
    IGNORE_INDEX,
    DataError,
    StepSampler,
    collate,
    format_prompt,
    load_template,
    read_rows,
    tokenize_row,
)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl.*does not exist"):
        read_rows(str(tmp_path / "nope.jsonl"))


def test_malformed_row_names_file_and_row(tmp_path):
    p = _write(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, "{not json"])
    with pytest.raises(DataError, match=r"d\.jsonl: line 2 is not valid JSON"):
        read_rows(p)
    p = _write(tmp_path / "e.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a"}])
    with pytest.raises(DataError, match=r"e\.jsonl: row 2: field 'output'"):
        read_rows(p)


def test_json_list_and_optional_input(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(
        json.dumps(
            [{"instruction": "Say hi", "output": "hi"}, {"instruction": "x", "input": None, "output": "y"}]
        )
    )
    rows = read_rows(str(p))
    assert rows[0]["input"] == "" and rows[1]["input"] == ""


def test_offline_hub_dataset_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="could not load dataset 'nobody/no-such-dataset'"):
        read_rows("nobody/no-such-dataset")


def test_prompt_masked_and_eos_appended(tiny_workspace):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_workspace["model"])
    row = {"instruction": "Which number is larger?", "input": "3 or 7", "output": "7"}
    ids, labels = tokenize_row(row, tok, ALPACA_TEMPLATE, 512, train_on_inputs=False)
    n_prompt = len(tok(format_prompt(row, ALPACA_TEMPLATE))["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id
    ids2, labels2 = tokenize_row(row, tok, ALPACA_TEMPLATE, 512, train_on_inputs=True)
    assert ids2 == ids and labels2 == ids
    ids3, labels3 = tokenize_row(row, tok, ALPACA_TEMPLATE, 10, train_on_inputs=False)
    assert len(ids3) == len(labels3) == 10


def test_collate_pads_right_with_ignored_labels():
    b = collate(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}], pad_id=0
    )
    assert b["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]


def test_template_file(tmp_path):
    p = tmp_path / "t.json"
    p.write_text(
        json.dumps(
            {"prompt_input": "Q: {instruction} {input}\nA: ", "prompt_no_input": "Q: {instruction}\nA: "}
        )
    )
    t = load_template(str(p))
    assert format_prompt({"instruction": "x", "input": "", "output": "y"}, t) == "Q: x\nA: "
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps({"prompt_input": "x"}))
    with pytest.raises(DataError, match="prompt_no_input"):
        load_template(str(bad))
    with pytest.raises(DataError, match="data.template"):
        load_template("vicuna")
    with pytest.raises(Exception, match="data.max_length"):
        DataConfig(max_length=1)


def test_step_sampler_is_deterministic_and_sharded():
    one = StepSampler(100, batch_size=8, seed=3)
    r0 = StepSampler(100, batch_size=4, seed=3, world_size=2, rank=0)
    r1 = StepSampler(100, batch_size=4, seed=3, world_size=2, rank=1)
    for step in (0, 5, 12, 13):  # 12 steps per epoch: 13 is in the second epoch
        assert one.indices(step) == r0.indices(step) + r1.indices(step)
    assert StepSampler(100, 8, seed=3).indices(13) == one.indices(13)
    assert one.indices(0) != one.indices(12)  # a new permutation per epoch
    with pytest.raises(DataError, match="exceeds"):
        StepSampler(10, batch_size=8, seed=0, world_size=2)
