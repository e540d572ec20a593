"""Chat data end to end (issue 25): ``tokentune train`` on a ``messages`` JSONL and on a column-mapped
ShareGPT JSONL trains and merges, the merged model loads in a fresh process and its tokenizer keeps the
chat template; ``tokentune data preview`` shows the spans; bad chat input is refused before Ray starts;
the chat quickstart sweep runs (slow, Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tokentune import assets
from tokentune.cli import main

ROOT = Path(__file__).resolve().parents[1]
CHAT_QUICKSTART = ROOT / "search_spaces" / "chat_quickstart.yaml"
SHARE_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


def _shipped_conversations(n: int) -> list[dict]:
    lines = assets.default_chat_train_data().read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _run_config(tmp_path: Path, data: dict, name: str) -> Path:
    cfg = {
        "data": {"format": "chat", "max_length": 64, **data},
        "methods": ["lora"],
        "lora": {"rank": 4},
        "train": {"max_steps": None, "epochs": 1, "batch_size": 4, "log_every": 1, "warmup_steps": 0,
                  "output_dir": str(tmp_path / name)},
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


LOAD_MERGED = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
tok = AutoTokenizer.from_pretrained(sys.argv[1])
text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
print(json.dumps({"arch": type(model).__name__, "template": tok.chat_template, "text": text}))
"""


def _load_in_fresh_process(merged: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", LOAD_MERGED, str(merged)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_train_and_merge_chat_jsonl_and_column_mapped_sharegpt(tmp_path, capsys):
    rows = _shipped_conversations(8)
    messages = _write_jsonl(tmp_path / "messages.jsonl", rows)
    cfg = _run_config(tmp_path, {"train": messages, "val": messages}, "messages")
    assert main(["train", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "step 2/2" in out and "epoch 1.00/1" in out  # 8 rows / batch 4 = 2 steps: one epoch
    assert main(["merge", str(tmp_path / "messages" / "final"), str(tmp_path / "merged1")]) == 0
    loaded = _load_in_fresh_process(tmp_path / "merged1")
    shipped = (assets.default_tokenizer_path() / "chat_template.jinja").read_text()
    assert loaded["arch"] == "LlamaForCausalLM" and loaded["template"] == shipped
    assert loaded["text"].endswith("### Response:\n")

    # ShareGPT rows under another column name, and a chat template of our own (data.chat_template)
    share = [
        {"id": i, "dialog": [{"from": SHARE_ROLES[m["role"]], "value": m["content"]} for m in r["messages"]]}
        for i, r in enumerate(rows)
    ]
    mapped = _write_jsonl(tmp_path / "sharegpt.jsonl", share)
    template = tmp_path / "mine.jinja"
    template.write_text(shipped.replace("### Instruction:", "### Question:"))
    data = {"train": mapped, "val": mapped, "columns": {"messages": "dialog"}, "chat_template": str(template)}
    cfg = _run_config(tmp_path, data, "mapped")
    assert main(["train", str(cfg)]) == 0
    assert main(["merge", str(tmp_path / "mapped" / "final"), str(tmp_path / "merged2")]) == 0
    loaded = _load_in_fresh_process(tmp_path / "merged2")
    assert (
        loaded["template"] == template.read_text()
    )  # the merged tokenizer keeps the template it was trained with
    assert "### Question:" in loaded["text"]


def test_data_preview_marks_the_supervised_spans(tmp_path, capsys):
    path = _write_jsonl(tmp_path / "c.jsonl", _shipped_conversations(6))
    cfg = _run_config(tmp_path, {"train": path, "val": path}, "preview")
    assert main(["data", "preview", str(cfg), "--rows", "2"]) == 0
    out = capsys.readouterr().out
    first = _shipped_conversations(1)[0]["messages"]
    answer = next(m["content"] for m in first if m["role"] == "assistant")
    assert f"[[{answer}</s>]]" in out  # the answer and its end-of-turn token are the supervised span
    assert "--- row 1:" in out and "--- row 2:" in out and "--- row 3:" not in out
    assert "rows: 6 kept, 0 dropped" in out and "train.epochs 1 = 1 " in out  # 6 // 4 micro-batches
    assert "### Instruction:" in out and "[[### Instruction" not in out
    # a bad row: exit 2 naming the file, the row and the key
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    assert main(["data", "preview", str(cfg), "--set", f"data.train={bad}"]) == 2
    assert "bad.jsonl: row 1: 'messages' has no assistant turn" in capsys.readouterr().err


def _chat_spec(tmp_path: Path, data: dict, **train) -> dict:
    return {
        "include": [str(ROOT / "search_spaces" / "_base.yaml")],
        "name": "chat_checks",
        "storage": str(tmp_path / "sweeps"),
        "base": {"data": {"format": "chat", **data}, "train": {"max_steps": None, "epochs": 1, **train}},
    }


@pytest.mark.parametrize(
    "row,match",
    [
        ({"dialog": []}, r"row 2: no 'messages' key"),
        ({"messages": [{"role": "bot", "content": "x"}]}, r"row 2: messages\[0\]\.role='bot'"),
        ({"messages": []}, r"row 2: 'messages' is an empty conversation"),
        ({"messages": [{"role": "user", "content": "x"}]}, r"row 2: 'messages' has no assistant turn"),
    ],
    ids=["no-messages", "role", "empty", "no-assistant"],
)
def test_bad_chat_rows_are_refused_before_ray(tmp_path, row, match):
    from orchestrator.spec.sweep import SpecError, load_spec

    path = _write_jsonl(tmp_path / "bad.jsonl", [*_shipped_conversations(1), row])
    with pytest.raises(SpecError, match=r"base\.data: .*bad\.jsonl: " + match):
        load_spec(_chat_spec(tmp_path, {"train": path}))


def test_bad_chat_settings_are_refused_before_ray(tmp_path):
    from orchestrator.spec.sweep import SpecError, load_spec

    good = _write_jsonl(tmp_path / "good.jsonl", _shipped_conversations(4))
    with pytest.raises(SpecError, match=r"good\.jsonl: row 1: no column 'dialog' \(data\.columns\.messages"):
        load_spec(_chat_spec(tmp_path, {"train": good, "columns": {"messages": "dialog"}}))
    with pytest.raises(SpecError, match=r"train\.epochs=1 and train\.max_steps=5 are both set"):
        load_spec(_chat_spec(tmp_path, {"train": good}, max_steps=5))
    broken = tmp_path / "broken.jinja"
    broken.write_text("{{ messages[0]['content'] | no_such_filter }}")
    with pytest.raises(SpecError, match=r"good\.jsonl: row \d: the chat template failed to render it"):
        load_spec(_chat_spec(tmp_path, {"train": good, "chat_template": str(broken)}))


def test_chat_quickstart_plan_resolves_epochs():
    from orchestrator.spec.sweep import load_spec

    spec = load_spec(CHAT_QUICKSTART)
    assert spec.num_trials() == 2
    text = spec.plan_text()
    assert "(chat), epochs 1 = max_steps 83 (1329 rows)" in text, text


@pytest.mark.slow
@pytest.mark.ray
def test_chat_quickstart_sweep_runs_end_to_end(tmp_path):
    """``search_spaces/chat_quickstart.yaml`` (shortened: a fifth of an epoch, 20 documents per task):
    both trials train on the chat data, merge, and are evaluated on the chat tasks."""
    import ray

    from orchestrator import run_sweep

    overrides = [f"storage={tmp_path}", "train.epochs=0.2", "train.log_every=4", "eval.limit=20"]
    t0 = time.time()
    try:
        res = run_sweep(CHAT_QUICKSTART, overrides, progress=False)
    finally:
        ray.shutdown()  # the sweep's in-process local Ray: later modules start their own
    assert len(res.trials) == 2
    for t in res.trials:
        assert t.status == "finished", (t.trial_id, t.error)
        assert t.metrics["step"] == 17  # the last step: train.epochs 0.2 = ceil(0.2 * (1329 // 16)) steps
        assert 0 <= t.metrics["eval/score"] <= 1
        assert "eval/tokentune_mini_chat/acc" in t.metrics
    print(f"chat quickstart (shortened): {time.time() - t0:.0f} s")
