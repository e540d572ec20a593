"""Chat and text data (issue 25): the label mask against an independent render, ShareGPT, text rows,
truncation, column mapping, epochs, the preview, and bad input named by file, row and key."""

from __future__ import annotations

import json

import pytest

from tokentune import assets
from tokentune.chat import GENERATION_MARK, ChatError, chat_template_for, tokenize_chat
from tokentune.config import ConfigError, DataConfig, RunConfig, TrainConfig
from tokentune.data import IGNORE_INDEX, DataError, read_rows, tokenize_rows
from tools.asset_common import INSTRUCTION_HEADER, RESPONSE_HEADER

SYSTEM = "Answer each question briefly."
TURNS = [
    ("What kind of thing is this?\nthat little horse", "animal"),
    ("Give the opposite of the last word.\nThe door was hard", "soft"),
    ("Which number is the largest?\n5, 49, 92, 60", "92"),
]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets.default_tokenizer_path())


def _messages(system: bool, turns=TURNS) -> list[dict[str, str]]:
    out = [{"role": "system", "content": SYSTEM}] if system else []
    for user, answer in turns:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return out


def independent_render(tok, messages) -> tuple[list[int], list[int]]:
    """The shipped template written out by hand (no Jinja), each piece tokenized on its own: the labels
    are exactly the assistant's content and its ``</s>``."""
    pieces = [(tok.bos_token, False)]
    for m in messages:
        if m["role"] == "system":
            pieces.append((m["content"], False))
        elif m["role"] == "user":
            pieces.append((INSTRUCTION_HEADER + m["content"], False))
        else:
            pieces += [(RESPONSE_HEADER + "\n", False), (m["content"] + tok.eos_token, True)]
    ids, labels = [], []
    for text, supervised in pieces:
        part = tok(text, add_special_tokens=False)["input_ids"]
        ids += part
        labels += part if supervised else [IGNORE_INDEX] * len(part)
    return ids, labels


def _unmarked(template: str) -> str:
    """The template without its ``{% generation %}`` marks (the incremental-render path)."""
    out = GENERATION_MARK.sub("", template)
    return out.replace("{%- endgeneration -%}", "").replace("{% endgeneration %}", "")


@pytest.mark.parametrize("system", [True, False], ids=["system", "no-system"])
@pytest.mark.parametrize("marks", [True, False], ids=["generation-marks", "incremental"])
def test_label_mask_equals_an_independent_render(tok, system, marks):
    template = chat_template_for(tok, None)
    assert GENERATION_MARK.search(template)  # the shipped template marks the assistant's tokens
    if not marks:
        template = _unmarked(template)
        assert not GENERATION_MARK.search(template) and "endgeneration" not in template
    messages = _messages(system)
    ids, labels = tokenize_chat(messages, tok, template)
    want_ids, want_labels = independent_render(tok, messages)
    assert ids == want_ids
    assert labels == want_labels
    supervised = [t for t, x in zip(ids, labels) if x != IGNORE_INDEX]
    assert tok.decode(supervised) == "".join(a + tok.eos_token for _, a in TURNS)  # every assistant turn
    assert supervised.count(tok.eos_token_id) == len(TURNS)  # each with its end-of-turn token


def test_train_on_inputs_supervises_every_turn(tok):
    ids, labels = tokenize_chat(_messages(True), tok, chat_template_for(tok, None), train_on_inputs=True)
    assert labels == ids


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_sharegpt_rows_give_the_same_tokens_as_messages(tmp_path, tok):
    share = [
        {"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
        for m in _messages(True)
    ]
    cfg = DataConfig(format="chat", max_length=512)
    a = read_rows(_jsonl(tmp_path / "m.jsonl", [{"messages": _messages(True)}]), cfg)
    b = read_rows(_jsonl(tmp_path / "s.jsonl", [{"conversations": share}]), cfg)
    assert a == b
    da, db = tokenize_rows(a, tok, cfg), tokenize_rows(b, tok, cfg)
    assert (da.input_ids, da.labels) == (db.input_ids, db.labels)


def test_text_rows_are_all_supervised(tmp_path, tok):
    cfg = DataConfig(format="text", max_length=512)
    rows = read_rows(
        _jsonl(tmp_path / "t.jsonl", [{"text": "The dog ran home."}, {"text": "Anna ate."}]), cfg
    )
    ds = tokenize_rows(rows, tok, cfg)
    for ids, labels in zip(ds.input_ids, ds.labels):
        assert labels == ids and ids[-1] == tok.eos_token_id and IGNORE_INDEX not in labels


def test_truncation_inside_an_assistant_turn_keeps_the_part_before_the_cut(tok):
    messages = _messages(True)
    full_ids, full_labels = tokenize_chat(messages, tok, chat_template_for(tok, None))
    second = [i for i, x in enumerate(full_labels) if x != IGNORE_INDEX][2]  # "soft" (2nd answer)
    cfg = DataConfig(format="chat", max_length=second + 1)  # cut right after the 2nd answer's first token
    ds = tokenize_rows([{"messages": messages}], tok, cfg)
    assert ds.input_ids[0] == full_ids[: second + 1] and ds.labels[0] == full_labels[: second + 1]
    assert sum(x != IGNORE_INDEX for x in ds.labels[0]) == 3  # "animal</s>" and the first of "soft"
    # a conversation cut before its first answer teaches nothing: dropped and counted; a shorter one stays
    first = next(i for i, x in enumerate(full_labels) if x != IGNORE_INDEX)
    short = _messages(False, TURNS[:1])
    assert (
        next(i for i, x in enumerate(tokenize_chat(short, tok, chat_template_for(tok, None))[1]) if x != -100)
        < first
    )
    ds = tokenize_rows(
        [{"messages": messages}, {"messages": short}], tok, DataConfig(format="chat", max_length=first)
    )
    assert ds.dropped == 1 and len(ds) == 1


def test_column_mapping(tmp_path, tok):
    rows = [{"question": "Say hi", "answer": "hi", "id": 1}]
    cfg = DataConfig(columns={"instruction": "question", "output": "answer"})
    assert read_rows(_jsonl(tmp_path / "q.jsonl", rows), cfg) == [
        {"instruction": "Say hi", "input": "", "output": "hi"}
    ]
    chat = DataConfig(format="chat", columns={"messages": "dialog"})
    got = read_rows(_jsonl(tmp_path / "d.jsonl", [{"dialog": _messages(False)}]), chat)
    assert got == [{"messages": _messages(False)}]
    with pytest.raises(DataError, match=r"q\.jsonl: row 1: no column 'prompt' \(data\.columns\.instruction"):
        read_rows(str(tmp_path / "q.jsonl"), DataConfig(columns={"instruction": "prompt"}))
    with pytest.raises(
        DataError, match=r"q\.jsonl: row 1: field 'instruction' .*the row has: question, answer, id"
    ):
        read_rows(str(tmp_path / "q.jsonl"))  # unmapped and missing: the columns it has are named
    with pytest.raises(ConfigError, match=r"data\.columns\.question.*instruction, input, output"):
        DataConfig(columns={"question": "q"})


BAD_ROWS = [
    ({"dialog": []}, r"row 2: no 'messages' key .*the row has: dialog"),
    (
        {"messages": [{"role": "robot", "content": "x"}]},
        r"row 2: messages\[0\]\.role='robot' is not a known role",
    ),
    ({"messages": []}, r"row 2: 'messages' is an empty conversation"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"row 2: 'messages' has no assistant turn"),
    ({"messages": [{"role": "user", "content": 3}]}, r"row 2: messages\[0\]\.content is missing"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, r"row 2: conversations\[0\]\.from='bot'"),
]


@pytest.mark.parametrize(
    "row,match", BAD_ROWS, ids=["no-messages", "role", "empty", "no-assistant", "content", "sharegpt-role"]
)
def test_bad_chat_rows_name_file_row_and_key(tmp_path, row, match):
    path = _jsonl(tmp_path / "bad.jsonl", [{"messages": _messages(False)}, row])
    with pytest.raises(DataError, match=r"bad\.jsonl: " + match):
        read_rows(path, DataConfig(format="chat"))


def test_a_template_that_fails_to_render_names_the_row(tmp_path, tok):
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}{{ m['content'] | no_such_filter }}{% endfor %}")
    cfg = DataConfig(format="chat", chat_template=str(tpl))
    rows = [{"messages": _messages(False)}]
    with pytest.raises(DataError, match=r"x\.jsonl: row 4: the chat template failed to render it"):
        tokenize_rows(rows, tok, cfg, source="x.jsonl", numbers=[4])


def test_no_chat_template_is_an_error_naming_the_model(tok):
    import copy

    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(ChatError, match=r"tokenizer of .*model.* has no chat template.*data\.chat_template"):
        chat_template_for(bare, None)


def test_epochs_and_max_steps(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.epochs=2 and train\.max_steps=50 are both set"):
        RunConfig.from_dict({"train": {"epochs": 2, "max_steps": 50}})
    assert RunConfig().train.max_steps == 200  # neither: the default steps
    tc = TrainConfig(epochs=2, batch_size=4, grad_accum=2)
    assert tc.max_steps is None
    assert tc.total_steps(100) == 25  # 100 // 4 = 25 micro-batches per epoch, x2 epochs, / 2 accumulation
    assert tc.total_steps(100, world_size=2) == 12  # ceil(2 * 12 / 2)
    assert TrainConfig(epochs=0.1, batch_size=4).total_steps(100) == 3  # ceil(0.1 * 25)
    assert TrainConfig(max_steps=7).total_steps(100) == 7


def test_evaluate_applies_the_chat_template_to_chat_tasks_only():
    from tokentune.evaluate import _chat_tasks, shipped_tasks

    shipped = shipped_tasks()
    assert "tokentune_mini_chat" in shipped and "tt_next_chat" in shipped
    assert _chat_tasks(["tokentune_mini_chat"], shipped) is True
    assert _chat_tasks(["tokentune_mini", "tt_next"], shipped) is False
    with pytest.raises(ValueError, match="separate runs"):
        _chat_tasks(["tt_next_chat", "tt_next"], shipped)


def test_shipped_chat_data_and_labelled_selection_prefers_assistant_tokens(tok):
    """The shipped conversations: multi-turn, most with a system prompt; under chat the labels are the
    assistant's tokens, so ``tokentune.select: labelled`` picks them first."""
    import torch

    from tokentune.data import collate
    from tokentune.methods.tokentune.method import select_labelled, supervised_positions

    cfg = DataConfig(format="chat", max_length=96)
    rows = read_rows(str(assets.default_chat_train_data()), cfg)
    assert len(rows) > 500
    turns = [sum(m["role"] == "assistant" for m in r["messages"]) for r in rows]
    assert max(turns) >= 3 and min(turns) == 1
    assert 0.5 < sum(r["messages"][0]["role"] == "system" for r in rows) / len(rows) < 0.8
    ds = tokenize_rows(rows[:16], tok, cfg)
    batch = collate([ds[i] for i in range(16)], tok.pad_token_id)
    g = torch.Generator().manual_seed(0)
    chosen = select_labelled(batch["attention_mask"], batch["labels"], ratio=0.3, generator=g)
    wanted = supervised_positions(batch["labels"], batch["attention_mask"].bool())
    assert bool((chosen | ~wanted).all())  # every assistant-predicting position fits in 30% and is chosen
