"""Conversations: ``messages`` (or ShareGPT ``conversations``) rows -> tokens with the loss on the
assistant turns, rendered with the model's own chat template.

    messages = check_chat_row(row, "data.jsonl: row 3")        # ShareGPT rows come back as messages
    template = chat_template_for(tokenizer, cfg.chat_template)  # the tokenizer's, or a Jinja file
    ids, labels = tokenize_chat(messages, tokenizer, template)   # labels: -100 outside assistant turns

Every assistant turn is supervised, its end-of-turn token included (the template's own text after
the content, e.g. ``</s>`` or ``<|im_end|>``, up to where the next turn starts); everything else is
masked. The spans come from the template's ``{% generation %}`` marks where it has them
(``apply_chat_template(return_assistant_tokens_mask=True)``); otherwise from an incremental render:
the text of the conversation up to turn ``i`` with the generation prompt, and up to and including
turn ``i``, whose difference is the assistant's span. A template whose renders are not prefixes of
each other cannot be split this way and is an error that says to add ``{% generation %}`` marks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
#: ShareGPT ``from`` values -> roles
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
GENERATION_MARK = re.compile(r"\{%-?\s*generation\s*-?%\}")
IGNORE_INDEX = -100


class ChatError(ValueError):
    """A conversation that cannot be used; the message names the row and the key."""


def check_chat_row(row: Any, where: str) -> list[dict[str, str]]:
    """The row's conversation as ``[{"role", "content"}]``; ``where`` (file and row) starts every error.
    Turns with ``from``/``value`` (ShareGPT) are read as such under either key."""
    if not isinstance(row, dict):
        raise ChatError(f"{where}: expected an object with 'messages', got {type(row).__name__}")
    key = "messages" if "messages" in row else "conversations" if "conversations" in row else None
    if key is None:
        raise ChatError(
            f"{where}: no 'messages' key (data.format=chat needs messages: [{{role, content}}, ...] or "
            f"ShareGPT conversations: [{{from, value}}, ...]); the row has: {', '.join(map(str, row)) or 'nothing'}"
            " (map another column with data.columns, e.g. {messages: dialog})"
        )
    turns = row[key]
    sharegpt = isinstance(turns, list) and bool(turns) and isinstance(turns[0], dict) and "from" in turns[0]
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    roles = SHAREGPT_ROLES if sharegpt else {r: r for r in ROLES}
    if not isinstance(turns, list):
        raise ChatError(f"{where}: {key!r} must be a list of turns, got {type(turns).__name__}")
    if not turns:
        raise ChatError(f"{where}: {key!r} is an empty conversation (it needs at least one assistant turn)")
    out = []
    for i, turn in enumerate(turns):
        at = f"{where}: {key}[{i}]"
        if not isinstance(turn, dict):
            raise ChatError(f"{at} must be an object with {role_key!r} and {content_key!r}")
        role = turn.get(role_key)
        if role not in roles:
            raise ChatError(f"{at}.{role_key}={role!r} is not a known role; accepted: {', '.join(roles)}")
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise ChatError(f"{at}.{content_key} is missing or not a string")
        out.append({"role": roles[role], "content": content})
    if not any(t["role"] == "assistant" for t in out):
        raise ChatError(f"{where}: {key!r} has no assistant turn (nothing to train on)")
    return out


def chat_template_for(tokenizer: Any, template_file: str | None, model: str | None = None) -> str:
    """The Jinja chat template: ``template_file`` (``data.chat_template``) when given, else the
    tokenizer's own; neither is an error naming the model."""
    if template_file:
        p = Path(template_file).expanduser()
        if not p.is_file():
            raise ChatError(
                f"data.chat_template={template_file!r}: no such file (expected a Jinja template file)"
            )
        try:
            return p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ChatError(
                f"chat template file {template_file!r} is not UTF-8 text (byte {e.start})"
            ) from None
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one
        template = template.get("default")
    if not template:
        name = model or getattr(tokenizer, "name_or_path", None) or "the model"
        raise ChatError(
            f"the tokenizer of {name!r} has no chat template, so data.format=chat cannot render its rows: "
            "give one as data.chat_template (a Jinja file), or use a model whose tokenizer has one"
        )
    return template


def render(tokenizer: Any, messages: list[dict[str, str]], template: str, generation_prompt: bool) -> str:
    """The conversation as text, rendered with ``template``; a failing render is a ``ChatError``."""
    try:
        text = tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # noqa: BLE001 - jinja's errors, raise_exception() of the template, ...
        raise ChatError(f"the chat template failed to render it ({type(e).__name__}: {e})") from None
    if not isinstance(text, str):
        raise ChatError(f"the chat template rendered {type(text).__name__}, not text")
    return text


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]], template: str) -> tuple[str, list]:
    """The rendered conversation and the character spans ``[start, end)`` of its assistant turns, by an
    incremental render (see the module docstring)."""
    full = render(tokenizer, messages, template, generation_prompt=False)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], template, generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1], template, generation_prompt=False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ChatError(
                f"the chat template does not render turn {i} as a prefix of the conversation, so the "
                "assistant's tokens cannot be found: mark them in the template with {% generation %} ... "
                "{% endgeneration %}"
            )
        end = len(upto)
        spans.append((len(before), end))
    return full, spans


def tokenize_chat(
    messages: list[dict[str, str]], tokenizer: Any, template: str, train_on_inputs: bool = False
) -> tuple[list[int], list[int]]:
    """-> (input_ids, labels): labels are the ids on assistant tokens (every token when
    ``train_on_inputs``) and -100 elsewhere. Not truncated."""
    if GENERATION_MARK.search(template):
        try:
            enc = tokenizer.apply_chat_template(
                messages,
                chat_template=template,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
            )
        except Exception as e:  # noqa: BLE001 - as in render()
            raise ChatError(f"the chat template failed to render it ({type(e).__name__}: {e})") from None
        ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
    else:
        text, spans = assistant_spans(tokenizer, messages, template)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [int(any(a <= s < b for a, b in spans)) for s, _ in enc["offset_mapping"]]
    labels = list(ids) if train_on_inputs else [i if m else IGNORE_INDEX for i, m in zip(ids, mask)]
    return ids, labels


def tokenize_text(text: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    """A ``text`` row: the tokenizer's own special tokens (e.g. BOS) plus eos; every token supervised."""
    ids = list(tokenizer(text)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids, list(ids)
