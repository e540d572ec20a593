"""Rebuild the embedded offline default assets (tiny Llama, tokenizer, data, lm-eval tasks).

    python -m tools.build_assets [--out DIR] [--skip-pretrain]

Everything is generated from the word lists and templates in this file with fixed seeds, so two runs
on the same library versions give the same text files (the model weights may differ in the last bits
between machines). Layout written under ``--out`` (default: this package's folder):

    model/            LlamaForCausalLM (safetensors, float32) + byte-level BPE fast tokenizer
    data/             instruct_train.jsonl, instruct_val.jsonl  (Alpaca: instruction/input/output)
    tasks/            one lm-eval YAML per task family + the group ``tokentune_mini``
    tasks/data/       the held-out test documents, one JSONL per task
    (+ tools/build_chat.py: model/chat_template.jinja, data/chat_*.jsonl, tasks/*_chat.yaml)

Design. The base model is pre-trained on generic synthetic English (items used in category-typical
sentences, adjectives in contrasting pairs, counting, quantities) but never sees the instruction
template, the task instructions or the answer words in answer position, so it scores near chance on
the tasks. A short LoRA fine-tune on ``instruct_train.jsonl`` teaches the format and the mappings and
lifts accuracy well above chance. Test documents are disjoint from train/val on (instruction, input).
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

from tools.asset_common import (
    ADJECTIVES,
    ANTONYMS,
    CATEGORIES,
    CATEGORY_CONTEXTS,
    ITEMS,
    LETTERS,
    NOUNS,
    NUMBERS,
    OPPOSITE,
    PEOPLE,
    PLACES,
    SAME,
    SYNONYMS,
    TEMPLATE_TOKENS,
    TIMES,
    format_prompt,
    write_jsonl,
    write_task_files,
)
from tools.build_chat import write_chat
from tools.build_multi import check_lengths, make_multi_splits, write_multi

SEED = 1234
ASSETS_DIR = Path(__file__).resolve().parent.parent / "tokentune" / "assets"


# --------------------------------------------------------------------------------------------------
# Pre-training corpus: generic synthetic English, no instruction template, no task answers
# --------------------------------------------------------------------------------------------------
def _person(rng: random.Random) -> str:
    return rng.choice(PEOPLE)


def _category_sentence(rng: random.Random) -> str:
    cat = rng.choice(sorted(CATEGORIES))
    template = rng.choice(CATEGORY_CONTEXTS[cat])
    return template.format(P=_person(rng), x=rng.choice(CATEGORIES[cat]))


def _adjective_sentence(rng: random.Random) -> str:
    a, b = rng.choice(ANTONYMS)
    if rng.random() < 0.5:
        a, b = b, a
    n1, n2 = rng.sample(NOUNS, 2)
    forms = [
        f"The {n1} was {a}, but the {n2} was {b}.",
        f"The {n1} is {a}.",
        f"{_person(rng)} said the {n1} felt {a}.",
        f"It was a {a} {n1}, not a {b} one.",
        f"First the {n1} was {a}, and later it was {b}.",
        f"The {n1} looked {a} {rng.choice(TIMES)}.",
    ]
    return rng.choice(forms)


def _counting_sentence(rng: random.Random) -> str:
    if rng.random() < 0.3:
        step = rng.choice([1, 1, 2])
        start = rng.randrange(0, 26 - 5 * step)
        seq = ", ".join(LETTERS[start + i * step] for i in range(rng.randint(4, 6)))
        return rng.choice([f"{_person(rng)} wrote the letters {seq}.", f"{seq}."])
    step = rng.choice([1, 1, 1, 2, 2, 3, 10])
    n = rng.randint(4, 7)
    start = rng.randrange(0, 100 - n * step)
    seq = ", ".join(str(start + i * step) for i in range(n))
    return rng.choice([f"{_person(rng)} counted {seq}.", f"The numbers went {seq}.", f"{seq}.", f"{seq}."])


def _quantity_sentence(rng: random.Random) -> str:
    a, b = rng.sample(range(1, 100), 2)
    hi, lo = max(a, b), min(a, b)
    x, y = rng.sample(NOUNS, 2)
    forms = [
        f"There were {a} boxes in the {x} and {b} in the {y}.",
        f"{hi} is more than {lo}.",
        f"{lo} is less than {hi}.",
        f"{_person(rng)} had {hi} coins, more than the {lo} coins of {_person(rng)}.",
        f"The {x} was {a} steps from the {y}.",
    ]
    return rng.choice(forms)


def _story_sentence(rng: random.Random) -> str:
    p1, p2 = rng.sample(PEOPLE, 2)
    forms = [
        f"{p1} met {p2} {rng.choice(PLACES)} {rng.choice(TIMES)}.",
        f"{p1} and {p2} walked {rng.choice(PLACES)}.",
        f"{p1} found a {rng.choice(NOUNS)} {rng.choice(PLACES)}.",
        f"{p1} told {p2} a story about a {rng.choice(NOUNS)}.",
        f"{rng.choice(TIMES).capitalize()} {p1} stayed {rng.choice(PLACES)}.",
    ]
    return rng.choice(forms)


# Facts in plain prose: the knowledge the instruction tasks ask for, never in the task format.
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _category_fact(rng: random.Random) -> str:
    cat = rng.choice(sorted(CATEGORIES))
    x, y, z = rng.sample(CATEGORIES[cat], 3)
    forms = [
        f"{_article(x).capitalize()} {x} is {_article(cat)} {cat}.",
        f"The {x} is a kind of {cat}.",
        f"{_person(rng)} knows that {_article(x)} {x} is {_article(cat)} {cat}.",
        f"Every {x} is {_article(cat)} {cat}, and so is every {y}.",
        f"{cat}: {x}, {y}, {z}.",
        f"The {x}, the {y} and the {z} are each {_article(cat)} {cat}.",
    ]
    return rng.choice(forms)


def _antonym_fact(rng: random.Random) -> str:
    a, b = rng.choice(ANTONYMS)
    if rng.random() < 0.5:
        a, b = b, a
    forms = [
        f"The opposite of {a} is {b}.",
        f"{a} is the opposite of {b}.",
        f"{a.capitalize()} and {b} are opposites.",
        f"If it is not {a}, it may be {b}.",
    ]
    return rng.choice(forms)


def _synonym_fact(rng: random.Random) -> str:
    a, b = rng.choice(SYNONYMS)
    if rng.random() < 0.5:
        a, b = b, a
    return rng.choice(
        [f"{a} means the same as {b}.", f"The word {a} means {b}.", f"To say {a} is to say {b}."]
    )


def _predecessor_fact(rng: random.Random) -> str:
    symbols = rng.choice([NUMBERS, NUMBERS, list(LETTERS)])
    i = rng.randrange(1, len(symbols))
    a, b = symbols[i], symbols[i - 1]
    return rng.choice([f"Before {a} comes {b}.", f"{b} comes before {a}.", f"{b} is just before {a}."])


def _lexicon_line(rng: random.Random) -> str:
    """A line that starts with a bare answer word (the no-leading-space token answers use) and
    names what it relates to, like a dictionary entry."""
    kind = rng.randrange(4)
    if kind == 0:
        cat = rng.choice(sorted(CATEGORIES))
        return f"{cat}: " + ", ".join(rng.sample(CATEGORIES[cat], rng.randint(2, 4))) + "."
    if kind == 1:
        a = rng.choice(ADJECTIVES)
        return rng.choice([f"{OPPOSITE[a]}: the opposite of {a}.", f"{OPPOSITE[a]} is the opposite of {a}."])
    if kind == 2:
        a = rng.choice(sorted(SAME))
        return f"{SAME[a]}: the same as {a}."
    symbols = rng.choice([NUMBERS, list(LETTERS)])
    i = rng.randrange(1, len(symbols) - 1)
    return rng.choice(
        [f"{symbols[i + 1]} comes after {symbols[i]}.", f"{symbols[i - 1]} comes before {symbols[i]}."]
    )


def _successor_fact(rng: random.Random) -> str:
    symbols = rng.choice([NUMBERS, NUMBERS, list(LETTERS)])
    i = rng.randrange(len(symbols) - 1)
    a, b = symbols[i], symbols[i + 1]
    return rng.choice([f"After {a} comes {b}.", f"{b} comes after {a}.", f"{a} is followed by {b}."])


def _largest_fact(rng: random.Random) -> str:
    nums = rng.sample(NUMBERS[1:], rng.choice([2, 3, 3, 5]))  # never 4: the task uses 4 numbers
    top = max(nums, key=int)
    listed = ", ".join(nums[:-1]) + " and " + nums[-1]
    return rng.choice([f"The largest of {listed} is {top}.", f"{top} is the largest of {listed}."])


def _word_list_line(rng: random.Random) -> str:
    # Lines that start with a bare word or number, so the no-leading-space tokens that answers use
    # (e.g. "cold", "17") get trained embeddings too.
    pool = rng.choice([ADJECTIVES, NOUNS, ITEMS, NUMBERS, sorted(CATEGORIES), list(LETTERS)])
    return ", ".join(rng.sample(pool, rng.randint(3, min(6, len(pool))))) + "."


def _phrase(rng: random.Random) -> str:
    """A short phrase without final punctuation, for the auxiliary instruction examples."""
    sentence = rng.choice([_category_sentence, _category_fact, _adjective_sentence, _story_sentence])(rng)
    words = sentence.rstrip(".").replace(",", "").split()
    start = rng.randrange(0, max(1, len(words) - 3))
    return " ".join(words[start : start + rng.randint(3, 6)])


def _aux_example(rng: random.Random) -> tuple[str, str, str]:
    """Instruction-formatted examples of generic tasks (copying, names) that are NOT evaluated.

    They teach the base model the template and that a response depends on the input, so a short
    LoRA fine-tune only has to learn the new task mappings. None answers an evaluated task.
    """
    kind = rng.randrange(9)
    if kind in (6, 7):
        word = rng.choice(sorted(SAME))
        phrase = rng.choice(ANTONYM_FRAMES).format(n=rng.choice(NOUNS), a=word)
        return "Which word means the same as the last word?", phrase, SAME[word]
    if kind == 8:
        symbols, step = rng.choice([(NUMBERS, 1), (NUMBERS, 2), (NUMBERS, 3), (list(LETTERS), 1)])
        n = rng.randint(3, 5)
        start = rng.randrange(step, len(symbols) - n * step)
        shown = [symbols[start + i * step] for i in range(n)]
        return "What comes before the first one?", ", ".join(shown), symbols[start - step]
    if kind == 0:
        phrase = _phrase(rng)
        return "Repeat the last word.", phrase, phrase.split()[-1]
    if kind == 1:
        phrase = _phrase(rng)
        return "What is the first word?", phrase, phrase.split()[0]
    if kind == 2:
        p1, p2 = rng.sample(PEOPLE, 2)
        text = rng.choice([f"{p1} met {p2} {rng.choice(PLACES)}", f"{p1} and {p2} walked home"])
        return "Who is named first?", text, p1
    if kind == 3:
        nums = rng.sample(NUMBERS, rng.randint(2, 5))
        return "Repeat the last number.", ", ".join(nums), nums[-1]
    if kind == 4:
        words = rng.sample(rng.choice([NOUNS, ITEMS, ADJECTIVES]), rng.randint(2, 5))
        return (
            "Which word is in the middle?" if len(words) % 2 else "Repeat the first word.",
            ", ".join(words),
            words[len(words) // 2] if len(words) % 2 else words[0],
        )
    return rng.choice(
        [("Name a person.", "", rng.choice(PEOPLE)), ("Say a number.", "", rng.choice(NUMBERS))]
    )


SENTENCE_MAKERS = [  # (maker, weight)
    (_category_sentence, 2),
    (_category_fact, 2),
    (_adjective_sentence, 1),
    (_antonym_fact, 4),
    (_counting_sentence, 4),
    (_successor_fact, 3),
    (_predecessor_fact, 1),
    (_synonym_fact, 1),
    (_quantity_sentence, 1),
    (_largest_fact, 2),
    (_story_sentence, 1),
]


def make_pretrain_corpus(n_docs: int, rng: random.Random, aux_fraction: float = 0.25) -> list[str]:
    makers = [m for m, w in SENTENCE_MAKERS for _ in range(w)]
    docs = []
    for _ in range(n_docs):
        if rng.random() < aux_fraction:
            instruction, input_text, output = _aux_example(rng)
            docs.append(format_prompt(instruction, input_text) + output)
            continue
        lines = []
        for _ in range(rng.randint(2, 4)):
            r = rng.random()
            if r < 0.1:
                lines.append(_word_list_line(rng))
            elif r < 0.3:
                lines.append(_lexicon_line(rng))
            else:
                k = rng.randint(2, 4)
                lines.append(" ".join(rng.choice(makers)(rng) for _ in range(k)))
        docs.append("\n".join(lines))
    return docs


# --------------------------------------------------------------------------------------------------
# Instruction tasks. Each generator yields (instruction, input, output, choices) for a random case.
# --------------------------------------------------------------------------------------------------
DETERMINERS = "a the my one this that her his our your".split()
DESCRIBERS = "little nice lovely shiny plain tiny huge pretty fine lucky".split()
ANTONYM_FRAMES = ["The {n} is {a}", "The {n} was {a}", "My {n} looks {a}", "This {n} feels {a}"]
# The key word is always the last word of the input, right before the response header.


def category_case(rng: random.Random) -> tuple[str, str, str, list[str]]:
    cat = rng.choice(sorted(CATEGORIES))
    words = [rng.choice(DETERMINERS), rng.choice(DESCRIBERS), rng.choice(CATEGORIES[cat])]
    if rng.random() < 0.25:
        del words[1]
    return "What kind of thing is this?", " ".join(words), cat, sorted(CATEGORIES)


def antonym_case(rng: random.Random) -> tuple[str, str, str, list[str]]:
    adj = rng.choice(ADJECTIVES)
    phrase = rng.choice(ANTONYM_FRAMES).format(n=rng.choice(NOUNS), a=adj)
    answer = OPPOSITE[adj]
    others = [w for w in ADJECTIVES if w not in (adj, answer)]
    choices = [answer, adj, *rng.sample(others, 2)]
    rng.shuffle(choices)
    return "Give the opposite of the last word.", phrase, answer, choices


def next_cases() -> list[tuple[str, str, str, list[str]]]:
    """Every arithmetic sequence (numbers 0-99 with step 1 or 2, letters with step 1), 3-5 shown."""
    cases = []
    for symbols, steps in ((NUMBERS, (1, 2)), (list(LETTERS), (1,))):
        for step in steps:
            for n in (3, 4, 5):
                for start in range(len(symbols) - (n + 2) * step):
                    seq = [symbols[start + i * step] for i in range(n + 3)]
                    shown, answer = seq[:n], seq[n]
                    # Distractors: the last shown element (copying), one and two steps too far.
                    choices = [answer, shown[-1], seq[n + 1], seq[n + 2]]
                    cases.append(("What comes next in the sequence?", ", ".join(shown), answer, choices))
    return cases


def largest_case(rng: random.Random) -> tuple[str, str, str, list[str]]:
    nums = rng.sample(NUMBERS[1:], 4)
    answer = max(nums, key=int)
    return "Which number is the largest?", ", ".join(nums), answer, list(nums)


TASKS = {
    "tt_category": category_case,
    "tt_antonym": antonym_case,
    "tt_next": next_cases,
    "tt_largest": largest_case,
}
TASK_DESCRIPTIONS = {
    "tt_category": "Name the category (animal/fruit/tool/vehicle) of an item (48 items).",
    "tt_antonym": "Give the opposite of an adjective (24 antonym pairs).",
    "tt_next": "Continue an arithmetic sequence of numbers or letters.",
    "tt_largest": "Pick the largest of four numbers.",
}


def _draw_unique(make_case, rng: random.Random, n: int) -> list[tuple[str, str, str, list[str]]]:
    """Up to ``n`` cases, unique on (instruction, input): all of an enumerated task, else sampled."""
    if make_case is next_cases:
        cases = make_case()
        rng.shuffle(cases)
        return cases[:n]
    cases, seen = [], set()
    for _ in range(100 * n):
        case = make_case(rng)
        if case[:2] not in seen:
            seen.add(case[:2])
            cases.append(case)
            if len(cases) == n:
                break
    return cases


def make_task_splits(
    rng: random.Random, n_train: int, n_val: int, n_test: int
) -> dict[str, dict[str, list[dict]]]:
    """Per task: train/val/test rows that are disjoint on (instruction, input).

    Test and val are filled first; train gets up to ``n_train`` of the remaining cases.
    """
    splits: dict[str, dict[str, list[dict]]] = {}
    for name, make_case in TASKS.items():
        cases = _draw_unique(make_case, rng, n_test + n_val + n_train)
        if len(cases) < n_test + n_val + n_train // 2:
            raise RuntimeError(f"{name}: only {len(cases)} distinct cases")
        rows = [{"instruction": i, "input": x, "output": o, "choices": c} for i, x, o, c in cases]
        splits[name] = {
            "test": rows[:n_test],
            "val": rows[n_test : n_test + n_val],
            "train": rows[n_test + n_val :],
        }
    return splits


def balance_test_labels(rows: list[dict], rng: random.Random) -> None:
    """Rotate each test doc's choices so the gold index is uniform over positions (no position bias)."""
    for i, row in enumerate(rows):
        choices = row["choices"]
        if choices == sorted(CATEGORIES):  # fixed label set: keep the order, the label varies anyway
            continue
        target = i % len(choices)
        gold = choices.index(row["output"])
        shift = target - gold
        row["choices"] = [choices[(j - shift) % len(choices)] for j in range(len(choices))]
    rng.shuffle(rows)


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------
PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    n_template = len(TEMPLATE_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_template,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The template pieces become added tokens below, so BPE need not spend merges on them.
    for piece in TEMPLATE_TOKENS:
        texts = [t.replace(piece, "\n") for t in texts]
    tok.train_from_iterator(texts, trainer=trainer)
    # The fixed template pieces become single (non-special) tokens: a prompt costs ~10 tokens of
    # template instead of ~45, and decoding still shows them.
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in TEMPLATE_TOKENS])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="right",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(out_dir)
    return fast


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
MODEL_SHAPE = dict(
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    initializer_range=0.02,
)
PRETRAIN_SEQ_LEN = 128
PRETRAIN_BATCH = 16


def build_model(tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(MODEL_SHAPE)
    rope_theta = shape.pop("rope_theta")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        attn_implementation="sdpa",
        **shape,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    return model


def pretrain(model, tokenizer, docs: list[str], steps: int, lr: float, log_every: int = 25) -> float:
    """Causal-LM pre-training on packed blocks; returns the final smoothed loss."""
    import torch

    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend([tokenizer.bos_token_id, *enc, tokenizer.eos_token_id])
    data = torch.tensor(ids, dtype=torch.long)
    n_blocks = len(data) // PRETRAIN_SEQ_LEN
    blocks = data[: n_blocks * PRETRAIN_SEQ_LEN].view(n_blocks, PRETRAIN_SEQ_LEN)
    print(f"  corpus: {len(docs)} docs, {len(ids):,} tokens, {n_blocks} blocks of {PRETRAIN_SEQ_LEN}")

    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    model.train()
    smooth, t0 = None, time.time()
    order = torch.randperm(n_blocks, generator=gen)
    pos = 0
    for step in range(steps):
        if pos + PRETRAIN_BATCH > n_blocks:
            order, pos = torch.randperm(n_blocks, generator=gen), 0
        batch = blocks[order[pos : pos + PRETRAIN_BATCH]]
        pos += PRETRAIN_BATCH
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        smooth = loss.item() if smooth is None else 0.9 * smooth + 0.1 * loss.item()
        if (step + 1) % log_every == 0 or step == 0:
            print(f"  step {step + 1:4d}/{steps}  loss {smooth:.3f}  {time.time() - t0:5.1f}s")
    model.eval()
    return float(smooth or 0.0)


def sample_text(model, tokenizer, prompt: str, n: int = 24) -> str:
    import torch

    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


# --------------------------------------------------------------------------------------------------
# Writing data and lm-eval task files
# --------------------------------------------------------------------------------------------------
def write_tasks(tasks_dir: Path, test_rows: dict[str, list[dict]]) -> None:
    """The one-token families and their group ``tokentune_mini``; clears the generated task files
    first (``tt_data.py``, the loader the YAMLs name, is source and stays)."""
    for stale in [*tasks_dir.glob("*.yaml"), *tasks_dir.glob("data/*.jsonl")]:
        stale.unlink()
    write_task_files(tasks_dir, test_rows, TASK_DESCRIPTIONS, "tokentune_mini", "build_assets")


def self_check(out: Path, splits: dict[str, dict[str, list[dict]]], tokenizer) -> int:
    """Disjoint splits, string fields, consistent tokenisation; returns the longest example in tokens."""
    keys: dict[str, set] = {"train": set(), "val": set(), "test": set()}
    for rows in splits.values():
        for split, split_rows in rows.items():
            for r in split_rows:
                assert all(isinstance(r[k], str) for k in ("instruction", "input", "output")), r
                assert r["output"] in r["choices"] and len(set(r["choices"])) == len(r["choices"]), r
                keys[split].add((r["instruction"], r["input"]))
    assert not keys["train"] & keys["test"], "train/test overlap"
    assert not keys["val"] & keys["test"], "val/test overlap"
    assert not keys["train"] & keys["val"], "train/val overlap"

    rows = [r for task in splits.values() for split in task.values() for r in split]
    prompts = [format_prompt(r["instruction"], r["input"]) for r in rows]
    outputs = [r["output"] for r in rows]
    prompt_ids = tokenizer(prompts)["input_ids"]
    context_ids = tokenizer([p.rstrip() for p in prompts])["input_ids"]
    output_ids = tokenizer(outputs, add_special_tokens=False)["input_ids"]
    whole_ids = tokenizer([p + o for p, o in zip(prompts, outputs)])["input_ids"]
    for p, c, o, w in zip(prompt_ids, context_ids, output_ids, whole_ids):
        # Training encodes prompt and output apart; lm-eval encodes the stripped context and the
        # whole text and splits at len(context). Both must see the same tokens.
        assert p + o == w, "prompt/output tokenisation does not compose"
        assert w[: len(c)] == c and c == p[:-1], "lm-eval context is not a prefix of the prompt"
    for name in splits:
        assert (out / "tasks" / "data" / f"{name}.jsonl").exists()
    return max(len(w) + 1 for w in whole_ids)  # + eos


def _build_model_dir(model_dir: Path, splits: dict, docs: list[str], args: argparse.Namespace):
    """Train the tokenizer, build and pre-train the model, save both to ``model_dir``."""
    print("[2/5] training tokenizer")
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    instr_text = []
    for rows in splits.values():
        for r in rows["train"] + rows["val"]:
            instr_text.extend([r["instruction"], r["input"], r["output"]])
    tokenizer = train_tokenizer(docs + instr_text, args.vocab_size, model_dir)
    print(
        f"  vocab {len(tokenizer)}; sample prompt: {len(tokenizer(format_prompt('a b', 'c'))['input_ids'])} tokens"
    )

    print("[3/5] building and pre-training the model")
    model = build_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"  LlamaForCausalLM: {n_params / 1e6:.2f}M parameters")
    if args.skip_pretrain:
        print("  --skip-pretrain: saving the randomly initialised model")
    else:
        pretrain(model, tokenizer, docs, args.pretrain_steps, args.lr)
        for p in ["The dog", "Anna ate a ripe", "The soup was hot, but the"]:
            print(f"  sample: {sample_text(model, tokenizer, p)!r}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(model_dir, safe_serialization=True)
    return tokenizer


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS_DIR, help="output root (default: package)")
    parser.add_argument(
        "--skip-pretrain",
        action="store_true",
        help="keep the tokenizer and model already in OUT/model and rewrite only the text files "
        "(with no model there yet: save an untrained one)",
    )
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--n-train", type=int, default=750, help="train rows per task")
    parser.add_argument("--n-val", type=int, default=50, help="val rows per task")
    parser.add_argument("--n-test", type=int, default=150, help="test docs per task")
    parser.add_argument("--n-multi-train", type=int, default=500, help="train rows per multi-token task")
    parser.add_argument("--n-multi-val", type=int, default=25, help="val rows per multi-token task")
    parser.add_argument("--n-multi-test", type=int, default=100, help="test docs per multi-token task")
    return parser


def _write_instruction_data(data_dir: Path, splits: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """The shipped train and val rows (instruction, input, output), shuffled with the seed."""
    strip = ("instruction", "input", "output")
    train = [{k: r[k] for k in strip} for rows in splits.values() for r in rows["train"]]
    val = [{k: r[k] for k in strip} for rows in splits.values() for r in rows["val"]]
    random.Random(SEED + 2).shuffle(train)
    random.Random(SEED + 3).shuffle(val)
    write_jsonl(data_dir / "instruct_train.jsonl", train)
    write_jsonl(data_dir / "instruct_val.jsonl", val)
    return train, val


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)

    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    t_start = time.time()
    out: Path = args.out.resolve()
    print(f"[1/5] generating text (seed {SEED}) -> {out}")
    rng = random.Random(SEED)
    docs = make_pretrain_corpus(8000, random.Random(SEED + 1))
    splits = make_task_splits(rng, args.n_train, args.n_val, args.n_test)
    for name, rows in splits.items():
        balance_test_labels(rows["test"], random.Random(f"{SEED}-{name}"))

    model_dir = out / "model"
    if args.skip_pretrain and (model_dir / "model.safetensors").is_file():
        from transformers import AutoTokenizer

        print(f"[2/5] --skip-pretrain: keeping the tokenizer and model in {model_dir}")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    else:
        tokenizer = _build_model_dir(model_dir, splits, docs, args)

    print("[4/5] writing instruction data")
    train, val = _write_instruction_data(out / "data", splits)

    print("[5/5] writing lm-eval tasks")
    write_tasks(out / "tasks", {name: rows["test"] for name, rows in splits.items()})
    # The multi-token families (own seeds, own files): tokenizer and model above never see them.
    multi = make_multi_splits(args.n_multi_train, args.n_multi_val, args.n_multi_test)
    n_multi_train, n_multi_val = write_multi(out, multi)
    write_chat(out, splits, TASK_DESCRIPTIONS)  # the chat template, conversations, chat tasks (own seeds)
    shortest, longest_response = check_lengths(multi, tokenizer)
    longest = self_check(out, splits | multi, tokenizer)
    size_mb = (model_dir / "model.safetensors").stat().st_size / 2**20
    print(
        f"done in {time.time() - t_start:.0f}s: {len(train)} train / {len(val)} val rows, "
        f"{len(TASKS)} tasks x {args.n_test} test docs; multi-token: {n_multi_train} train / "
        f"{n_multi_val} val rows, {len(multi)} tasks x {args.n_multi_test} test docs, responses "
        f"{shortest}-{longest_response} tokens; longest example {longest} tokens, "
        f"model.safetensors {size_mb:.1f} MiB"
    )


if __name__ == "__main__":
    main()
