"""Training data: rows -> masked, truncated, padded token batches, in one of three ``data.format``s.

``alpaca``: rows ``{"instruction": str, "input": str (optional), "output": str}``; ``chat``: rows
``{"messages": [{"role", "content"}, ...]}`` or ShareGPT ``{"conversations": [{"from", "value"}]}``,
rendered with the tokenizer's chat template, loss on the assistant turns (``tokentune.chat``);
``text``: rows ``{"text": str}``, loss on every token. Rows come from a local JSON/JSONL file or an
HF dataset name (``data.split``, ``data.subset``, ``data.revision``); ``data.columns`` maps our field
names to the dataset's columns. Alpaca: the prompt comes from a template (Alpaca by default, or a JSON file with
``prompt_input`` and ``prompt_no_input``); prompt tokens get label -100 unless ``train_on_inputs``.
Files must be UTF-8 (an error names the file and the byte offset); a template may use only the
placeholders ``{instruction}`` and ``{input}`` (``{instruction}`` in ``prompt_no_input``), plain (no
``!r`` conversion or ``:>99`` format spec). A row whose
answer is truncated away (no supervised token left) is dropped: the count is logged once per file and
kept on the dataset (``TokenizedDataset.dropped``); a file whose rows are all dropped is an error.
A conversation cut by ``data.max_length`` inside an assistant turn keeps the part before the cut.
"""

from __future__ import annotations

import json
import logging
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokentune.chat import ChatError, chat_template_for, check_chat_row, tokenize_chat, tokenize_text
from tokentune.config import DATA_FIELDS, DataConfig
from tokentune.errors import ConfigError
from tokentune.methods.base import IGNORE_INDEX

log = logging.getLogger(__name__)

#: template key -> the placeholders it may use
TEMPLATE_FIELDS = {"prompt_input": ("instruction", "input"), "prompt_no_input": ("instruction",)}

# The Alpaca template, in the parts the shipped tokenizer and tasks are built from (tools/asset_common)
PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)
PREAMBLE_NO_INPUT = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
INSTRUCTION_HEADER = "\n\n### Instruction:\n"
INPUT_HEADER = "\n\n### Input:\n"
# No trailing newline: lm-eval moves trailing whitespace of a context into the continuation, so the
# "\n" after "### Response:" must stay a token of its own for context and training prompts to agree.
RESPONSE_HEADER = "\n\n### Response:"
ALPACA_TEMPLATE = {
    "prompt_input": (
        f"{PREAMBLE_INPUT}{INSTRUCTION_HEADER}{{instruction}}{INPUT_HEADER}{{input}}{RESPONSE_HEADER}\n"
    ),
    "prompt_no_input": f"{PREAMBLE_NO_INPUT}{INSTRUCTION_HEADER}{{instruction}}{RESPONSE_HEADER}\n",
}


class DataError(ConfigError):
    """Missing or malformed data; the message names the file (and row)."""


def read_text(path: str | Path, what: str = "data file") -> str:
    """A file's text; one that is not UTF-8 is a ``DataError`` naming the file and the byte offset."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{what} {str(path)!r} is not UTF-8 text: byte {e.start} is {data[e.start : e.start + 1]!r} "
            "(save it as UTF-8)"
        ) from None


def load_template(spec: str) -> dict[str, str]:
    if spec == "alpaca":
        return dict(ALPACA_TEMPLATE)
    if not isinstance(spec, str):
        raise DataError(f"data.template={spec!r} is invalid: expected 'alpaca' or a JSON file that exists")
    p = Path(spec)
    if not p.is_file():
        raise DataError(f"data.template={spec!r} is invalid: expected 'alpaca' or a JSON file that exists")
    try:
        t = json.loads(read_text(p, "template file"))
    except json.JSONDecodeError as e:
        raise DataError(f"template file {spec!r} is not valid JSON: {e}") from e
    if not isinstance(t, dict):
        raise DataError(f"template file {spec!r}: expected a JSON object with prompt_input, prompt_no_input")
    missing = [k for k in TEMPLATE_FIELDS if not isinstance(t.get(k), str)]
    if missing:
        raise DataError(
            f"template file {spec!r} lacks string key(s) {missing}: expected prompt_input, prompt_no_input"
        )
    for key, allowed in TEMPLATE_FIELDS.items():
        _check_placeholders(spec, key, t[key], allowed)
    return t


def _check_placeholders(spec: str, key: str, text: str, allowed: tuple[str, ...]) -> None:
    accepted = ", ".join("{" + a + "}" for a in allowed)
    try:
        fields = [(f, c, s) for _, f, s, c in string.Formatter().parse(text) if f is not None]
    except ValueError as e:  # a lone "{" or "}"
        raise DataError(
            f"template file {spec!r}: {key} is not a valid template ({e}); write literal braces as {{{{ }}}}"
        ) from None
    for f, conversion, format_spec in fields:
        if f not in allowed:
            raise DataError(
                f"template file {spec!r}: {key} has the unknown placeholder {{{f}}}; allowed in {key}: {accepted}"
            )
        if conversion or format_spec:  # e.g. {instruction!r:>100000000}: a 100 MB prompt per row
            shown = (
                f"{{{f}{'!' + conversion if conversion else ''}{':' + format_spec if format_spec else ''}}}"
            )
            raise DataError(
                f"template file {spec!r}: {key} has the placeholder {shown[:60]!r} with a conversion or "
                f"format spec; write it plain as {{{f}}} (allowed in {key}: {accepted})"
            )


def format_prompt(row: dict[str, str], template: dict[str, str]) -> str:
    if row.get("input"):
        return template["prompt_input"].format(instruction=row["instruction"], input=row["input"])
    return template["prompt_no_input"].format(instruction=row["instruction"])


def _check_row(row: dict[str, Any], where: str) -> dict[str, str]:
    for key in ("instruction", "output"):
        if not isinstance(row.get(key), str):
            raise DataError(
                f"{where}: field {key!r} is missing or not a string (rows need instruction, output; input "
                f"optional); the row has: {_keys(row)} (map other columns with data.columns)"
            )
    inp = row.get("input", "")
    if inp is None:
        inp = ""
    if not isinstance(inp, str):
        raise DataError(f"{where}: field 'input' must be a string")
    return {"instruction": row["instruction"], "input": inp, "output": row["output"]}


def _keys(row: dict[str, Any]) -> str:
    return ", ".join(map(str, row)) or "no columns"


def check_row(row: Any, where: str, cfg: DataConfig | None = None) -> dict[str, Any]:
    """One row in ``cfg.format`` after the ``cfg.columns`` mapping; ``where`` (source and row) starts
    every error."""
    cfg = cfg or DataConfig()
    if not isinstance(row, dict):
        fields = "/".join(DATA_FIELDS[cfg.format])
        raise DataError(f"{where}: expected an object with {fields}, got {type(row).__name__}")
    mapped = dict(row)
    for ours, theirs in cfg.columns.items():
        if theirs not in row:
            raise DataError(
                f"{where}: no column {theirs!r} (data.columns.{ours}={theirs!r}); the row has: {_keys(row)}"
            )
        mapped[ours] = row[theirs]
    if cfg.format == "chat":
        try:
            return {"messages": check_chat_row(mapped, where)}
        except ChatError as e:
            raise DataError(str(e)) from None
    if cfg.format == "text":
        if not isinstance(mapped.get("text"), str):
            raise DataError(
                f"{where}: field 'text' is missing or not a string (data.format=text rows need text); "
                f"the row has: {_keys(row)} (map another column with data.columns, e.g. {{text: body}})"
            )
        return {"text": mapped["text"]}
    return _check_row(mapped, where)


def is_local_source(source: str) -> bool:
    """True when ``data.train``/``data.val`` names a local file (else it is an HF dataset name)."""
    p = Path(source).expanduser()
    return p.suffix in (".json", ".jsonl") or p.exists() or source.startswith((".", "/", "~"))


def read_rows(source: str, cfg: DataConfig | None = None, split: str | None = None) -> list[dict[str, Any]]:
    """Read and check the rows of a .json/.jsonl path, or an HF dataset name (``split``, default
    ``cfg.split``), in ``cfg.format`` (default: Alpaca rows)."""
    return [row for _, row in read_numbered_rows(source, cfg, split)]


def read_numbered_rows(
    source: str, cfg: DataConfig | None = None, split: str | None = None
) -> list[tuple[int, dict[str, Any]]]:
    """As :func:`read_rows`, each row with its number in the file (1-based: the line of a JSONL)."""
    cfg = cfg or DataConfig()
    p = Path(source).expanduser()
    if not is_local_source(source):
        return _read_hub_dataset(source, cfg, split or cfg.split)
    if not p.is_file():
        raise DataError(f"data file {source!r} does not exist")
    text = read_text(p)
    rows: list[Any]
    if p.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{source}: line {i} is not valid JSON ({e.msg}, column {e.colno}): a .jsonl file holds "
                    "one JSON object per line"
                ) from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{source} is not valid JSON: {e}") from e
        if not isinstance(data, list):
            raise DataError(f"{source}: expected a JSON list of rows")
        rows = list(enumerate(data, 1))
    out = [(i, check_row(r, f"{source}: row {i}", cfg)) for i, r in rows]
    if not out:
        raise DataError(f"data file {source!r} has no rows")
    return out


def _read_hub_dataset(name: str, cfg: DataConfig, split: str) -> list[tuple[int, dict[str, Any]]]:
    what = f"dataset {name!r}" + (f" (subset {cfg.subset!r})" if cfg.subset else "") + f", split {split!r}"
    try:
        import datasets

        ds = datasets.load_dataset(name, cfg.subset, split=split, revision=cfg.revision)
    except Exception as e:  # noqa: BLE001 - any failure becomes one clear error naming the dataset
        raise DataError(
            f"data: could not load {what} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Give a local .json/.jsonl path, or a hub name that is reachable or cached (offline: HF_HUB_OFFLINE=1)."
        ) from e
    have = list(ds.column_names)
    for ours, theirs in cfg.columns.items():
        if theirs not in have:
            raise DataError(
                f"{what} has no column {theirs!r} (data.columns.{ours}={theirs!r}); its columns: {', '.join(have)}"
            )
    return [(i, check_row(dict(r), f"{name}: row {i}", cfg)) for i, r in enumerate(ds, 1)]


def tokenize_row(
    row: dict[str, str], tokenizer, template: dict[str, str], max_length: int, train_on_inputs: bool
):
    """-> (input_ids, labels) lists; prompt encoded as lm-eval encodes a context, output + eos after it."""
    prompt_ids = tokenizer(format_prompt(row, template))["input_ids"]
    out_ids = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        out_ids = out_ids + [tokenizer.eos_token_id]
    ids = (prompt_ids + out_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) if not train_on_inputs else list(prompt_ids)) + out_ids
    return ids, labels[:max_length]


@dataclass
class TokenizedDataset(torch.utils.data.Dataset):
    input_ids: list[list[int]]
    labels: list[list[int]]
    dropped: int = 0  # rows left out: their answer was truncated away (no supervised token)
    source: str | None = None  # the file or dataset the rows came from

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


def row_encoder(tokenizer, cfg: DataConfig) -> Callable[[dict[str, Any]], tuple[list[int], list[int]]]:
    """``row -> (input_ids, labels)`` for ``cfg.format``, truncated to ``cfg.max_length``. A chat row
    that fails to render raises ``ChatError`` (the caller names the row)."""
    n = cfg.max_length
    if cfg.format == "chat":
        try:
            template = chat_template_for(tokenizer, cfg.chat_template)
        except ChatError as e:
            raise DataError(str(e)) from None

        def encode_chat(row: dict[str, Any]) -> tuple[list[int], list[int]]:
            ids, labels = tokenize_chat(row["messages"], tokenizer, template, cfg.train_on_inputs)
            return ids[:n], labels[:n]

        return encode_chat
    if cfg.format == "text":
        return lambda row: tuple(x[:n] for x in tokenize_text(row["text"], tokenizer))  # type: ignore[return-value]
    template = load_template(cfg.template)
    return lambda row: tokenize_row(row, tokenizer, template, n, cfg.train_on_inputs)


def tokenize_rows(
    rows, tokenizer, cfg: DataConfig, source: str | None = None, numbers: list[int] | None = None
) -> TokenizedDataset:
    """Tokenize and mask ``rows`` (from ``source``, named in the warning and errors; ``numbers``: each
    row's number there, default 1, 2, ...); rows with no supervised token left after truncation are
    dropped and counted (``dropped``)."""
    encode = row_encoder(tokenizer, cfg)
    where = source or "the data"
    ids, labels = [], []
    for k, row in enumerate(rows):
        try:
            a, b = encode(row)
        except ChatError as e:
            raise DataError(f"{where}: row {numbers[k] if numbers else k + 1}: {e}") from None
        if any(x != IGNORE_INDEX for x in b):  # fully truncated answers teach nothing
            ids.append(a)
            labels.append(b)
    dropped = len(rows) - len(ids)
    if not ids:
        raise DataError(
            f"{where}: data.max_length={cfg.max_length} truncates the answer of all {len(rows)} rows away "
            "(no supervised token left); raise data.max_length"
        )
    if dropped:
        log.warning(
            "%s: dropped %d of %d rows whose answer data.max_length=%d truncates away (no supervised token)",
            where,
            dropped,
            len(rows),
            cfg.max_length,
        )
    return TokenizedDataset(ids, labels, dropped=dropped, source=source)


def collate(examples: list[dict[str, list[int]]], pad_id: int, pad_to_multiple_of: int | None = None):
    """Right padding; padded positions get attention 0 and label -100."""
    n = max(len(e["input_ids"]) for e in examples)
    if pad_to_multiple_of:
        n = -(-n // pad_to_multiple_of) * pad_to_multiple_of
    B = len(examples)
    input_ids = torch.full((B, n), pad_id, dtype=torch.long)
    labels = torch.full((B, n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        input_ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        mask[i, :k] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def load_splits(cfg: DataConfig, tokenizer, seed: int = 0) -> tuple[TokenizedDataset, TokenizedDataset]:
    """Train and validation datasets (shipped instruction data when ``cfg.train`` is None)."""
    train_src, train_rows, val_src, val_rows = split_rows(cfg, seed)
    val_name = val_src or f"{train_src} (validation split)"
    train_n, train_rows = zip(*train_rows) if train_rows else ((), ())
    val_n, val_rows = zip(*val_rows) if val_rows else ((), ())
    return (
        tokenize_rows(list(train_rows), tokenizer, cfg, train_src, list(train_n)),
        tokenize_rows(list(val_rows), tokenizer, cfg, val_name, list(val_n)),
    )


def split_rows(cfg: DataConfig, seed: int = 0) -> tuple[str, list, str | None, list]:
    """``(train source, [(number, row)], val source or None, [(number, row)])``: the rows of
    ``data.train`` and ``data.val`` (a hub dataset's validation split), or a seeded share of the
    training rows as validation; ``data.max_examples`` caps the training rows."""
    from tokentune import assets

    if cfg.train is None and cfg.format == "text":
        raise DataError("data.train=None: no text data is shipped; give data.train for data.format=text")
    chat = cfg.format == "chat"
    shipped_train = assets.default_chat_train_data() if chat else assets.default_train_data()
    shipped_val = assets.default_chat_val_data() if chat else assets.default_val_data()
    train_src = cfg.train or str(shipped_train)
    train_rows = read_numbered_rows(train_src, cfg)
    val_src = cfg.val or (str(shipped_val) if cfg.train is None else None)
    if val_src:
        val_rows = read_numbered_rows(val_src, cfg, None if is_local_source(val_src) else "validation")
    else:  # split a validation share off the training rows, deterministically
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(train_rows), generator=g).tolist()
        n_val = max(1, int(len(train_rows) * cfg.val_fraction))
        val_rows = [train_rows[i] for i in perm[:n_val]]
        train_rows = [train_rows[i] for i in perm[n_val:]]
    if cfg.max_examples:
        train_rows = train_rows[: cfg.max_examples]
    return train_src, train_rows, val_src, val_rows


def prepare_tokenizer(tokenizer, cfg: DataConfig):
    """The tokenizer to train and save with: under ``data.format: chat`` with ``data.chat_template``, that
    template becomes the tokenizer's own (so the merged model keeps it)."""
    if cfg.format == "chat" and cfg.chat_template:
        tokenizer.chat_template = chat_template_for(tokenizer, cfg.chat_template)
    return tokenizer


class StepSampler:
    """Deterministic batches by global micro-step: resuming at step k yields exactly the same data.

    Each epoch is a permutation drawn from ``seed + epoch``; the global batch of one micro-step holds
    ``batch_size * world_size`` examples and rank r takes its slice, so 2 workers x b see the same
    examples as 1 worker x 2b.
    """

    def __init__(self, n: int, batch_size: int, seed: int, world_size: int = 1, rank: int = 0) -> None:
        self.n, self.b, self.seed, self.world, self.rank = n, batch_size, seed, world_size, rank
        self.global_b = batch_size * world_size
        if self.global_b > n:
            raise DataError(
                f"train.batch_size={batch_size} x {world_size} worker(s) exceeds the {n} training examples"
            )
        self.per_epoch = n // self.global_b
        self._perm_epoch, self._perm = -1, None

    def indices(self, micro_step: int) -> list[int]:
        epoch, k = divmod(micro_step, self.per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
        start = k * self.global_b + self.rank * self.b
        return self._perm[start : start + self.b]
