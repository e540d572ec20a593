"""The multi-token-answer task families of the embedded default (group ``tokentune_multi``).

Called by ``python -m tools.build_assets`` after the one-token tasks; it has its own seeds
and writes its own files, so it never changes the one-token files or the model:

    data/multi_train.jsonl, data/multi_val.jsonl   Alpaca rows (instruction/input/output)
    tasks/tt_<family>.yaml, tasks/data/tt_<family>.jsonl, tasks/tokentune_multi.yaml

Every response is 8-40 tokens of the shipped tokenizer (checked here): a comma-separated list of 5
items (9 tokens) or of 3 ``word: opposite`` pairs (11 tokens). lm-eval scores a family as
``multiple_choice`` over whole continuations, metric ``acc``: the right response and three near-misses
(items in a wrong order, one item wrong), so only a model that gets every item right and in its place
scores. The base model never saw these instructions and scores near chance (0.25). Measured (100 docs
per family; LoRA r 16, batch 16, 300 steps on ``multi_train.jsonl``, seeds 0 and 1):

    family         base   lr 1e-3      lr 3e-3
    tt_sort        0.15   0.46, 0.40   0.56, 0.63
    tt_series      0.30   0.47, 0.46   0.55, 0.51
    tt_opposites   0.15   0.42, 0.46   0.51, 0.53

    tt_sort        sort 5 nouns alphabetically; misses: the input order, two neighbours swapped, one
                   word replaced
    tt_series      the next 5 items of an arithmetic series (numbers step 1-3, letters step 1);
                   misses: restarting at the last shown item, skipping one item, one item wrong
    tt_opposites   each of 3 adjectives with its opposite, in the input's order; misses: the right
                   pairs in a wrong order (wrong pairs the base model tells apart from prose alone)

Tried and dropped: reversing a 5-word list (300 LoRA steps: 0.19 -> 0.14-0.32, no clear lift) and
opposites as a bare list with one-item-wrong misses (the base model tells those apart from prose).
"""

from __future__ import annotations

import random
from pathlib import Path

from tools.asset_common import (
    ADJECTIVES,
    ITEMS,
    LETTERS,
    NUMBERS,
    OPPOSITE,
    write_jsonl,
    write_task_files,
)

SEED = "tokentune-multi-1"
GROUP = "tokentune_multi"
MIN_TOKENS, MAX_TOKENS = 8, 40  # response length, in tokens of the shipped tokenizer (eos excluded)
N_ITEMS = 5
N_OPPOSITES = 3  # ``word: opposite`` pairs (11 tokens)

Case = tuple[str, str, str, list[str]]  # instruction, input, output, choices (output among them)


def _join(items: list[str]) -> str:
    return ", ".join(items)


def _swap_at(items: list[str], i: int) -> list[str]:
    out = list(items)
    out[i], out[i + 1] = out[i + 1], out[i]
    return out


def _replace_one(items: list[str], pool: list[str], rng: random.Random) -> list[str]:
    out = list(items)
    out[rng.randrange(len(out))] = rng.choice([w for w in pool if w not in items])
    return out


def _case(instruction: str, shown: list[str], answer: list[str], misses: list[list[str]]) -> Case:
    choices = [_join(answer), *(_join(m) for m in misses)]
    assert len(set(choices)) == len(choices), choices
    return instruction, _join(shown), choices[0], choices


def sort_case(rng: random.Random) -> Case:
    while True:
        words = rng.sample(ITEMS, N_ITEMS)
        answer = sorted(words)
        misses = [words, _swap_at(answer, rng.randrange(N_ITEMS - 1)), _replace_one(answer, ITEMS, rng)]
        # distinct first letters; the input unsorted and unlike the swapped miss
        if len({w[0] for w in words}) == N_ITEMS and len({_join(m) for m in [answer, *misses]}) == 4:
            return _case("Sort the words alphabetically.", words, answer, misses)


def series_case(rng: random.Random) -> Case:
    symbols, step = rng.choice([(NUMBERS, 1), (NUMBERS, 2), (NUMBERS, 3), (list(LETTERS), 1)])
    n_shown = rng.randint(3, 5)
    span = n_shown + N_ITEMS + 1
    start = rng.randrange(0, len(symbols) - span * step)
    seq = [symbols[start + i * step] for i in range(span)]
    shown, answer = seq[:n_shown], seq[n_shown : n_shown + N_ITEMS]
    misses = [
        seq[n_shown - 1 : n_shown - 1 + N_ITEMS],  # restarts at the last shown item
        seq[n_shown + 1 : n_shown + 1 + N_ITEMS],  # skips one item
        _replace_one(answer, symbols, rng),
    ]
    return _case(f"List the next {N_ITEMS} items of the series.", shown, answer, misses)


def opposites_case(rng: random.Random) -> Case:
    """``hot, big, wet, old`` -> ``hot: cold, big: small, wet: dry, old: young``."""
    words: list[str] = []
    for adj in rng.sample(ADJECTIVES, len(ADJECTIVES)):  # no word with its own opposite in the list
        if OPPOSITE[adj] not in words:
            words.append(adj)
        if len(words) == N_OPPOSITES:
            break
    pairs = [f"{w}: {OPPOSITE[w]}" for w in words]
    # Near-misses keep every pair right and get the order wrong (the input's order is the task's);
    # wrong pairs would be told apart by the base model's prose knowledge of opposites.
    i, j = rng.sample(range(N_OPPOSITES - 1), 2)
    misses = [_swap_at(pairs, i), _swap_at(pairs, j), pairs[1:] + pairs[:1]]
    return _case("Write each word with its opposite.", words, pairs, misses)


FAMILIES = {
    "tt_sort": sort_case,
    "tt_series": series_case,
    "tt_opposites": opposites_case,
}
DESCRIPTIONS = {
    "tt_sort": f"Sort {N_ITEMS} nouns alphabetically; choices: the right list and 3 near-misses.",
    "tt_series": f"List the next {N_ITEMS} items of an arithmetic series; the right list and 3 near-misses.",
    "tt_opposites": f"Write {N_OPPOSITES} adjectives with their opposites; the misses have a wrong order.",
}


def make_multi_splits(n_train: int, n_val: int, n_test: int) -> dict[str, dict[str, list[dict]]]:
    """Per family: train/val/test rows, unique and disjoint on (instruction, input); test gold positions
    balanced over the 4 choices."""
    splits = {}
    for name, make_case in FAMILIES.items():
        rng = random.Random(f"{SEED}-{name}")
        cases, seen = [], set()
        for _ in range(100 * (n_train + n_val + n_test)):
            case = make_case(rng)
            if case[:2] not in seen:
                seen.add(case[:2])
                cases.append(case)
                if len(cases) == n_test + n_val + n_train:
                    break
        if len(cases) < n_test + n_val + n_train:
            raise RuntimeError(f"{name}: only {len(cases)} distinct cases")
        rows = [{"instruction": i, "input": x, "output": o, "choices": c} for i, x, o, c in cases]
        test = rows[:n_test]
        for k, row in enumerate(test):  # gold at position k % 4, the misses in their drawn order
            misses = [c for c in row["choices"] if c != row["output"]]
            row["choices"] = misses[: k % 4] + [row["output"]] + misses[k % 4 :]
        rng.shuffle(test)
        splits[name] = {"test": test, "val": rows[n_test : n_test + n_val], "train": rows[n_test + n_val :]}
    return splits


def check_lengths(splits: dict[str, dict[str, list[dict]]], tokenizer) -> tuple[int, int]:
    """Every response and choice is MIN_TOKENS..MAX_TOKENS tokens; returns the (shortest, longest)."""
    texts = [c for task in splits.values() for rows in task.values() for r in rows for c in r["choices"]]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    bad = [t for t, n in zip(texts, lengths) if not MIN_TOKENS <= n <= MAX_TOKENS]
    assert not bad, f"responses outside {MIN_TOKENS}-{MAX_TOKENS} tokens: {bad[:3]}"
    return min(lengths), max(lengths)


def write_multi(out: Path, splits: dict[str, dict[str, list[dict]]]) -> tuple[int, int]:
    """The training/validation JSONL and the lm-eval task files; returns (train rows, val rows)."""
    strip = ("instruction", "input", "output")
    train = [{k: r[k] for k in strip} for rows in splits.values() for r in rows["train"]]
    val = [{k: r[k] for k in strip} for rows in splits.values() for r in rows["val"]]
    random.Random(f"{SEED}-train").shuffle(train)
    random.Random(f"{SEED}-val").shuffle(val)
    write_jsonl(out / "data" / "multi_train.jsonl", train)
    write_jsonl(out / "data" / "multi_val.jsonl", val)
    test_rows = {name: rows["test"] for name, rows in splits.items()}
    write_task_files(out / "tasks", test_rows, DESCRIPTIONS, GROUP, "build_multi")
    return len(train), len(val)
