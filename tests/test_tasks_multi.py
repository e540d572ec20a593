"""The multi-token-answer tasks (``tokentune_multi``): generated files, lengths, lm-eval offline, and the
stock ``lm_eval`` CLI on the shipped tasks from any working directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from tokentune.assets import (
    ASSETS_DIR,
    CHAT_TASKS,
    MULTI_TASK_FAMILIES,
    MULTI_TASKS,
    SHIPPED_TASK_FAMILIES,
    default_model_path,
    default_multi_train_data,
    default_multi_val_data,
    default_tasks_dir,
    default_tokenizer_path,
    default_train_data,
    default_val_data,
)
from tools.asset_common import format_prompt
from tools.build_assets import main
from tools.build_multi import MAX_TOKENS, MIN_TOKENS


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _docs(name):
    return _rows(default_tasks_dir() / "data" / f"{name}.jsonl")


def _keys(rows):
    return {(r["instruction"], r["input"]) for r in rows}


def test_generator_rewrites_the_shipped_text_files_byte_identical(tmp_path):
    """``build_assets --skip-pretrain`` over a copy of the shipped model writes every shipped data and
    task file as committed (the one-token ones and the multi-token ones) and keeps the model."""
    out = tmp_path / "assets"
    shutil.copytree(default_model_path(), out / "model")
    main(["--out", str(out), "--skip-pretrain"])
    shipped = sorted(
        p.relative_to(ASSETS_DIR)
        for folder in ("data", "tasks", "model")
        for p in (ASSETS_DIR / folder).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    written = sorted(
        p.relative_to(out) for p in out.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    assert written == shipped
    for rel in shipped:
        assert (out / rel).read_bytes() == (ASSETS_DIR / rel).read_bytes(), rel


def test_multi_rows_and_docs():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_tokenizer_path())
    train, val = _rows(default_multi_train_data()), _rows(default_multi_val_data())
    assert 300 <= len(train) <= 3000 and len(val) >= 30
    one_token = _keys(_rows(default_train_data())) | _keys(_rows(default_val_data()))
    for rows in (train, val):
        for row in rows:
            assert set(row) == {"instruction", "input", "output"}
    test_keys = set()
    for name in MULTI_TASK_FAMILIES:
        docs = _docs(name)
        assert 50 <= len(docs) <= 500, name
        test_keys |= _keys(docs)
        labels = [d["label"] for d in docs]
        assert max(labels.count(i) for i in range(4)) <= 0.3 * len(docs), name  # balanced gold
        for doc in docs:
            assert doc["prompt"] == format_prompt(doc["instruction"], doc["input"])
            assert doc["choices"][doc["label"]] == doc["output"]
            assert len(doc["choices"]) == 4 and len(set(doc["choices"])) == 4
        # every choice (the answer and its near-misses) is MIN..MAX tokens
        lengths = [
            len(ids)
            for ids in tok([c for d in docs for c in d["choices"]], add_special_tokens=False)["input_ids"]
        ]
        assert MIN_TOKENS <= min(lengths) and max(lengths) <= MAX_TOKENS <= 40 and MIN_TOKENS >= 8, name
    assert not test_keys & (_keys(train) | _keys(val))
    assert not _keys(train) & _keys(val)
    assert not (_keys(train) | _keys(val) | test_keys) & one_token
    assert all(8 <= len(tok(r["output"], add_special_tokens=False)["input_ids"]) <= 40 for r in train)


def test_multi_task_yamls_and_group():
    from tokentune.evaluate import _read_yaml, shipped_tasks

    assert set(shipped_tasks()) == {
        "tokentune_mini",
        *SHIPPED_TASK_FAMILIES,
        *MULTI_TASKS,
        *MULTI_TASK_FAMILIES,
        *CHAT_TASKS,  # the one-token families asked as a chat turn (tools/build_chat.py)
        *(f"{name}_chat" for name in SHIPPED_TASK_FAMILIES),
    }
    group = _read_yaml(default_tasks_dir() / "tokentune_multi.yaml")
    assert [group["group"]] == MULTI_TASKS and group["task"] == MULTI_TASK_FAMILIES
    for name in MULTI_TASK_FAMILIES:
        cfg = _read_yaml(default_tasks_dir() / f"{name}.yaml")
        assert cfg["task"] == name and cfg["output_type"] == "multiple_choice"
        assert cfg["custom_dataset"] == "tt_data.load_docs"
        assert cfg["dataset_kwargs"]["data_files"] == {"test": f"data/{name}.jsonl"}


def test_multi_tasks_load_offline_via_evaluate():
    from tokentune.evaluate import evaluate

    out = evaluate(str(default_model_path()), tasks="tokentune_multi", limit=8, batch_size=32)
    assert set(out["results"]) == {*MULTI_TASKS, *MULTI_TASK_FAMILIES}
    assert all(0 <= out["results"][n]["acc"] <= 1 for n in MULTI_TASK_FAMILIES)
    single = evaluate(str(default_model_path()), tasks="tt_sort", limit=8, batch_size=32)
    assert single["results"]["tt_sort"] == out["results"]["tt_sort"]


def test_stock_lm_eval_cli_runs_the_shipped_tasks_from_any_directory(tmp_path):
    """``lm_eval --include_path <package>/tasks`` from an unrelated CWD, on a one-token and a
    multi-token task: documents load (relative to the YAMLs) and the scores equal tokentune.evaluate's."""
    from tokentune.evaluate import evaluate

    tasks, limit = ["tt_next", "tt_sort"], 12
    out = tmp_path / "results"
    cmd = [
        "lm_eval", "--model", "hf", "--model_args", f"pretrained={default_model_path()},dtype=float32",
        "--include_path", str(default_tasks_dir()), "--tasks", ",".join(tasks), "--device", "cpu",
        "--batch_size", "16", "--limit", str(limit), "--output_path", str(out),
    ]  # fmt: skip
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "HF_DATASETS_OFFLINE": "1",
    }
    env.pop("PYTHONPATH", None)  # the tasks need nothing of this project on the path
    run = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    ours = evaluate(str(default_model_path()), tasks=tasks, limit=limit, batch_size=16)["results"]
    for name in tasks:
        assert 0 <= results[name]["acc,none"] <= 1, name
        assert results[name]["acc,none"] == pytest.approx(ours[name]["acc"], abs=1e-9), name
