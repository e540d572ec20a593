"""``tokentune data preview``: what a run config will train on, before any GPU time is spent.

    print(preview_text(cfg, rows=3))

The first ``rows`` training rows rendered as the model sees them (the chat template applied, truncated
to ``data.max_length``), the supervised spans between ``[[`` and ``]]``, each row's token and supervised
counts; then totals over every training row: rows kept and dropped (no supervised token left after
truncation), tokens per row, supervised tokens, and the optimizer steps (``train.epochs`` resolved).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from tokentune.config import RunConfig
from tokentune.data import IGNORE_INDEX, DataError, prepare_tokenizer, row_encoder, split_rows

OPEN, CLOSE = "[[", "]]"


def marked_text(ids: list[int], labels: list[int], tokenizer: Any) -> str:
    """The tokens decoded with each run of supervised tokens between ``[[`` and ``]]``."""
    out, run, supervised = [], [], None
    for i, label in zip(ids, labels):
        on = label != IGNORE_INDEX
        if on != supervised and run:
            text = tokenizer.decode(run, skip_special_tokens=False)
            out.append(f"{OPEN}{text}{CLOSE}" if supervised else text)
            run = []
        supervised = on
        run.append(i)
    if run:
        text = tokenizer.decode(run, skip_special_tokens=False)
        out.append(f"{OPEN}{text}{CLOSE}" if supervised else text)
    return "".join(out)


def preview_text(cfg: RunConfig, rows: int = 3) -> str:
    """The preview of ``cfg``'s training data (see the module docstring)."""
    from tokentune.chat import ChatError
    from tokentune.models import load_tokenizer

    d = cfg.data
    tokenizer = prepare_tokenizer(load_tokenizer(cfg.model), d)
    source, numbered, _, _ = split_rows(d, cfg.train.seed)
    encode = row_encoder(tokenizer, d)
    lines = [
        f"data {source} (format {d.format}, max_length {d.max_length}"
        + (f", columns {d.columns}" if d.columns else "")
        + (f", chat template {d.chat_template or 'of the tokenizer'}" if d.format == "chat" else "")
        + f"); supervised tokens between {OPEN} and {CLOSE}",
    ]
    lengths, supervised, dropped = [], 0, 0
    for k, (number, row) in enumerate(numbered):
        try:
            ids, labels = encode(row)
        except ChatError as e:
            raise DataError(f"{source}: row {number}: {e}") from None
        n_sup = sum(x != IGNORE_INDEX for x in labels)
        if n_sup:
            lengths.append(len(ids))
            supervised += n_sup
        else:
            dropped += 1
        if k < rows:
            notes = [f"{len(ids)} tokens", f"{n_sup} supervised"]
            if len(ids) >= d.max_length:
                notes.append(f"truncated at data.max_length={d.max_length}")
            if not n_sup:
                notes.append("DROPPED: no supervised token left")
            lines += ["", f"--- row {number}: {', '.join(notes)}", marked_text(ids, labels, tokenizer)]
    lines.append("")
    if not lengths:
        lines.append(f"all {len(numbered)} rows would be dropped: raise data.max_length")
        return "\n".join(lines)
    tc = cfg.train
    steps = tc.total_steps(len(lengths), cfg.compute.workers)
    how = f"train.epochs {tc.epochs:g} = " if tc.epochs is not None else "train.max_steps "
    lines += [
        f"rows: {len(lengths)} kept, {dropped} dropped (no supervised token left after truncation)",
        f"tokens per row: mean {sum(lengths) / len(lengths):.1f}, max {max(lengths)}; supervised tokens: "
        f"{supervised} ({supervised / sum(lengths):.0%} of all)",
        f"steps: {how}{steps} (batch {tc.batch_size} x accumulation {tc.grad_accum} x workers "
        f"{cfg.compute.workers}; {len(lengths) * 1.0 / (tc.batch_size * cfg.compute.workers):.1f} "
        "micro-batches per epoch)",
    ]
    return "\n".join(lines)


def training_rows(cfg: RunConfig) -> int:
    """Training rows a run of ``cfg`` keeps (read, rendered and tokenized: rows whose supervised tokens
    truncation removes are not counted), which ``train.epochs`` resolves against; cached per data
    section, tokenizer and seed. Raises ``DataError`` naming the file and row of a bad row."""
    key = json.dumps(
        [dataclasses.asdict(cfg.data), cfg.model.name_or_path, cfg.model.tokenizer, cfg.train.seed],
        sort_keys=True,
        default=str,
    )
    if key not in _ROWS:
        from tokentune.data import load_splits
        from tokentune.models import load_tokenizer

        tokenizer = prepare_tokenizer(load_tokenizer(cfg.model), cfg.data)
        _ROWS[key] = len(load_splits(cfg.data, tokenizer, cfg.train.seed)[0])
    return _ROWS[key]


_ROWS: dict[str, int] = {}  # training_rows' cache


def check_trainable(cfg: RunConfig) -> None:
    """What would fail every run of ``cfg`` when it loads its data, found cheaply (a dry run's check for
    data it does not fully tokenize): rows are read and checked, and each split must keep a row with a
    supervised token after truncation (tokenizing stops at the first that does) and the training split
    must hold at least one global batch (checked first). Raises ``DataError`` naming the file."""
    from tokentune.models import load_tokenizer

    d, tc = cfg.data, cfg.train
    train_src, train_rows, val_src, val_rows = split_rows(d, tc.seed)
    check_batch_fits(cfg, len(train_rows), train_src)
    encode = row_encoder(prepare_tokenizer(load_tokenizer(cfg.model), d), d)
    for source, numbered in (
        (train_src, train_rows),
        (val_src or f"{train_src} (validation split)", val_rows),
    ):
        if not any(any(x != IGNORE_INDEX for x in encode(row)[1]) for _, row in numbered):
            raise DataError(
                f"{source}: data.max_length={d.max_length} truncates the answer of all {len(numbered)} rows "
                "away (no supervised token left); raise data.max_length"
            )


def check_batch_fits(cfg: RunConfig, rows: int, source: str) -> None:
    """The training rows must fill one global batch (``train.batch_size`` x ``compute.workers``), as the
    run's sampler requires; else a ``DataError`` naming the file."""
    batch = cfg.train.batch_size * cfg.compute.workers
    if rows < batch:
        raise DataError(
            f"{source}: {rows} training row(s) (after the validation split), fewer than one batch: "
            f"train.batch_size={cfg.train.batch_size} x compute.workers={cfg.compute.workers}; lower "
            "train.batch_size or give more rows"
        )
