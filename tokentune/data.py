"""Instruction data: Alpaca-style rows -> masked, truncated, padded token batches.

Rows are ``{"instruction": str, "input": str (optional), "output": str}`` from a local JSON/JSONL
file or an HF dataset name. The prompt comes from a template (Alpaca by default, or a JSON file with
``prompt_input`` and ``prompt_no_input``); prompt tokens get label -100 unless ``train_on_inputs``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokentune.config import DataConfig
from tokentune.errors import ConfigError

IGNORE_INDEX = -100

ALPACA_TEMPLATE = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n"
    ),
}


class DataError(ConfigError):
    """Missing or malformed data; the message names the file (and row)."""


def load_template(spec: str) -> dict[str, str]:
    if spec == "alpaca":
        return dict(ALPACA_TEMPLATE)
    p = Path(spec)
    if not p.is_file():
        raise DataError(f"data.template={spec!r} is invalid: expected 'alpaca' or a JSON file that exists")
    try:
        t = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"template file {spec!r} is not valid JSON: {e}") from e
    missing = [k for k in ("prompt_input", "prompt_no_input") if not isinstance(t.get(k), str)]
    if missing:
        raise DataError(
            f"template file {spec!r} lacks string key(s) {missing}: expected prompt_input, prompt_no_input"
        )
    return t


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


def read_rows(source: str) -> list[dict[str, str]]:
    """Read Alpaca rows from a .json/.jsonl path, or an HF dataset name (train split)."""
    p = Path(source).expanduser()
    if p.suffix in (".json", ".jsonl") or p.exists() or source.startswith((".", "/", "~")):
        if not p.is_file():
            raise DataError(f"data file {source!r} does not exist")
        text = p.read_text()
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

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


def tokenize_rows(rows, tokenizer, cfg: DataConfig) -> TokenizedDataset:
    template = load_template(cfg.template)
    ids, labels = [], []
    for row in rows:
        a, b = tokenize_row(row, tokenizer, template, cfg.max_length, cfg.train_on_inputs)
        if any(x != IGNORE_INDEX for x in b):  # fully truncated answers teach nothing
            ids.append(a)
            labels.append(b)
    if not ids:
        raise DataError(f"data.max_length={cfg.max_length} truncates every example's answer away; raise it")
    return TokenizedDataset(ids, labels)


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
    if cfg.val:
        val_rows = read_rows(cfg.val)
    elif cfg.train is None:
        val_rows = read_rows(str(assets.default_val_data()))
    else:  # split a validation share off the training rows, deterministically
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(train_rows), generator=g).tolist()
        n_val = max(1, int(len(train_rows) * cfg.val_fraction))
        val_rows = [train_rows[i] for i in perm[:n_val]]
        train_rows = [train_rows[i] for i in perm[n_val:]]
    if cfg.max_examples:
        train_rows = train_rows[: cfg.max_examples]
    return tokenize_rows(train_rows, tokenizer, cfg), tokenize_rows(val_rows, tokenizer, cfg)


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
