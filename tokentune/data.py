"""Instruction data: Alpaca-style rows -> masked, truncated, padded token batches.

Rows are ``{"instruction": str, "input": str (optional), "output": str}`` from a local JSON/JSONL
file or an HF dataset name. The prompt comes from a template (Alpaca by default, or a JSON file with
``prompt_input`` and ``prompt_no_input``); prompt tokens get label -100 unless ``train_on_inputs``.
Files must be UTF-8 (an error names the file and the byte offset); a template may use only the
placeholders ``{instruction}`` and ``{input}`` (``{instruction}`` in ``prompt_no_input``). A row whose
answer is truncated away (no supervised token left) is dropped: the count is logged once per file and
kept on the dataset (``TokenizedDataset.dropped``); a file whose rows are all dropped is an error.
"""

from __future__ import annotations

import json
import logging
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokentune.config import DataConfig
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
        fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as e:  # a lone "{" or "}"
        raise DataError(
            f"template file {spec!r}: {key} is not a valid template ({e}); write literal braces as {{{{ }}}}"
        ) from None
    for f in fields:
        if f not in allowed:
            raise DataError(
                f"template file {spec!r}: {key} has the unknown placeholder {{{f}}}; allowed in {key}: {accepted}"
            )


def format_prompt(row: dict[str, str], template: dict[str, str]) -> str:
    if row.get("input"):
        return template["prompt_input"].format(instruction=row["instruction"], input=row["input"])
    return template["prompt_no_input"].format(instruction=row["instruction"])


def _check_row(row: Any, where: str) -> dict[str, str]:
    if not isinstance(row, dict):
        raise DataError(
            f"{where}: expected an object with instruction/input/output, got {type(row).__name__}"
        )
    for key in ("instruction", "output"):
        if not isinstance(row.get(key), str):
            raise DataError(
                f"{where}: field {key!r} is missing or not a string (rows need instruction, output; input optional)"
            )
    inp = row.get("input", "")
    if inp is None:
        inp = ""
    if not isinstance(inp, str):
        raise DataError(f"{where}: field 'input' must be a string")
    return {"instruction": row["instruction"], "input": inp, "output": row["output"]}


def is_local_source(source: str) -> bool:
    """True when ``data.train``/``data.val`` names a local file (else it is an HF dataset name)."""
    p = Path(source).expanduser()
    return p.suffix in (".json", ".jsonl") or p.exists() or source.startswith((".", "/", "~"))


def read_rows(source: str) -> list[dict[str, str]]:
    """Read Alpaca rows from a .json/.jsonl path, or an HF dataset name (train split)."""
    p = Path(source).expanduser()
    if is_local_source(source):
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
                    raise DataError(f"{source}: row {i} is not valid JSON: {e.msg}") from e
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{source} is not valid JSON: {e}") from e
            if not isinstance(data, list):
                raise DataError(f"{source}: expected a JSON list of rows")
            rows = list(enumerate(data, 1))
        out = [_check_row(r, f"{source}: row {i}") for i, r in rows]
        if not out:
            raise DataError(f"data file {source!r} has no rows")
        return out
    return _read_hub_dataset(source)


def _read_hub_dataset(name: str) -> list[dict[str, str]]:
    try:
        import datasets

        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # noqa: BLE001 - any failure becomes one clear error naming the dataset
        raise DataError(
            f"data: could not load dataset {name!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Give a local .json/.jsonl path, or a hub name that is reachable or cached (offline: HF_HUB_OFFLINE=1)."
        ) from e
    return [_check_row(dict(r), f"{name}: row {i}") for i, r in enumerate(ds, 1)]


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


def tokenize_rows(rows, tokenizer, cfg: DataConfig, source: str | None = None) -> TokenizedDataset:
    """Tokenize and mask ``rows`` (from ``source``, named in the warning and errors); rows with no
    supervised token left after truncation are dropped and counted (``dropped``)."""
    template = load_template(cfg.template)
    ids, labels = [], []
    for row in rows:
        a, b = tokenize_row(row, tokenizer, template, cfg.max_length, cfg.train_on_inputs)
        if any(x != IGNORE_INDEX for x in b):  # fully truncated answers teach nothing
            ids.append(a)
            labels.append(b)
    dropped = len(rows) - len(ids)
    where = source or "the data"
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
    from tokentune import assets

    train_src = cfg.train or str(assets.default_train_data())
    train_rows = read_rows(train_src)
    val_src = cfg.val or (str(assets.default_val_data()) if cfg.train is None else None)
    if val_src:
        val_rows = read_rows(val_src)
    else:  # split a validation share off the training rows, deterministically
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(train_rows), generator=g).tolist()
        n_val = max(1, int(len(train_rows) * cfg.val_fraction))
        val_rows = [train_rows[i] for i in perm[:n_val]]
        train_rows = [train_rows[i] for i in perm[n_val:]]
    if cfg.max_examples:
        train_rows = train_rows[: cfg.max_examples]
    val_name = val_src or f"{train_src} (validation split)"
    return tokenize_rows(train_rows, tokenizer, cfg, train_src), tokenize_rows(
        val_rows, tokenizer, cfg, val_name
    )


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
