"""What the asset builders share: the Alpaca prompt template, the word lists, the lm-eval task files.

``build_assets`` (the corpus, the model, the one-token tasks) and ``build_multi`` (the multi-token
tasks) both draw from these; changing a list changes every generated file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokentune.data import (
    ALPACA_TEMPLATE,
    INPUT_HEADER,
    INSTRUCTION_HEADER,
    PREAMBLE_INPUT,
    PREAMBLE_NO_INPUT,
    RESPONSE_HEADER,
)
from tokentune.data import format_prompt as alpaca_prompt

# --------------------------------------------------------------------------------------------------
# Prompt template: the training code's Alpaca template (tokentune.data), one token per part
# --------------------------------------------------------------------------------------------------
TEMPLATE_TOKENS = [PREAMBLE_INPUT, PREAMBLE_NO_INPUT, INSTRUCTION_HEADER, INPUT_HEADER, RESPONSE_HEADER]


def format_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt (``tokentune.data.format_prompt``); the response (``output`` + eos) follows it."""
    return alpaca_prompt({"instruction": instruction, "input": input_text}, ALPACA_TEMPLATE)


# --------------------------------------------------------------------------------------------------
# Word lists
# --------------------------------------------------------------------------------------------------
CATEGORIES = {
    "fruit": "apple banana cherry grape lemon mango orange peach pear plum melon kiwi".split(),
    "animal": "dog cat horse rabbit tiger lion sheep goat mouse bear fox wolf".split(),
    "tool": "hammer saw drill wrench shovel rake axe chisel ladder knife brush spade".split(),
    "vehicle": "car bus truck bike train boat plane van tractor taxi ship scooter".split(),
}
# Verbs/phrases that tie each category's items together in the pre-training text (no labels).
CATEGORY_CONTEXTS = {
    "fruit": [
        "{P} ate a ripe {x} after lunch.",
        "{P} cut the sweet {x} into small pieces.",
        "The {x} grew on a tree near the farm.",
        "{P} bought a fresh {x} at the market.",
        "A juicy {x} is nice to eat in summer.",
        "{P} peeled the {x} and shared it.",
    ],
    "animal": [
        "The {x} ran across the field.",
        "{P} fed the hungry {x} some food.",
        "A young {x} slept in the barn.",
        "The {x} heard a noise and looked up.",
        "{P} saw a wild {x} near the forest.",
        "The {x} drank water from the pond.",
    ],
    "tool": [
        "{P} fixed the fence with a {x}.",
        "{P} kept the {x} in the shed.",
        "The old {x} was heavy to use.",
        "{P} used a {x} to build a table.",
        "{P} picked up the {x} and started to work.",
        "A good {x} makes the job easy.",
    ],
    "vehicle": [
        "{P} drove the {x} to town.",
        "The {x} stopped at the station.",
        "{P} took the {x} to work.",
        "The {x} moved fast along the road.",
        "{P} waited for the {x} in the rain.",
        "The {x} carried many people.",
    ],
}
ANTONYMS = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("tall", "short"),
    ("light", "dark"), ("hard", "soft"), ("wet", "dry"), ("rich", "poor"), ("early", "late"),
    ("full", "empty"), ("loud", "quiet"), ("strong", "weak"), ("clean", "dirty"), ("thick", "thin"),
    ("open", "closed"), ("high", "low"), ("young", "old"), ("good", "bad"), ("easy", "difficult"),
    ("wide", "narrow"), ("sweet", "sour"), ("sharp", "dull"), ("safe", "dangerous"),
]  # fmt: skip
# Synonyms only feed the auxiliary (not evaluated) "same meaning" instruction examples.
SYNONYMS = [
    ("large", "huge"), ("quick", "rapid"), ("glad", "joyful"), ("angry", "mad"), ("smart", "clever"),
    ("tiny", "little"), ("calm", "still"), ("pretty", "lovely"), ("begin", "start"), ("end", "finish"),
    ("shut", "close"), ("gift", "present"), ("road", "street"), ("shout", "yell"), ("rock", "stone"),
    ("jump", "leap"),
]  # fmt: skip
SAME = {a: b for a, b in SYNONYMS} | {b: a for a, b in SYNONYMS}
OPPOSITE = {a: b for a, b in ANTONYMS} | {b: a for a, b in ANTONYMS}
ADJECTIVES = sorted(OPPOSITE)
NOUNS = (
    "room road river box bag cup door wall house street table window garden city bread soup "
    "water song night morning book coat rope path lake"
).split()
PEOPLE = "Anna Ben Clara David Emma Frank Grace Henry Ivy Jack Kate Leo Mia Noah Olivia Paul".split()
PLACES = [
    "in the garden", "on the table", "near the river", "under the tree", "in the kitchen",
    "behind the house", "at the market", "by the door", "on the hill", "in the yard",
    "next to the wall", "in the old barn",
]  # fmt: skip
TIMES = ["today", "yesterday", "this morning", "last night", "in the evening", "on Monday", "at noon"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
NUMBERS = [str(i) for i in range(100)]
ITEMS = [x for items in CATEGORIES.values() for x in items]


# --------------------------------------------------------------------------------------------------
# Writing data and lm-eval task files
# --------------------------------------------------------------------------------------------------
def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ``custom_dataset`` names the loader in ``tt_data.py`` beside the YAMLs: lm-eval imports it from the
# YAML's folder and it reads ``data_files`` relative to that folder, so the stock ``lm_eval`` CLI runs
# the tasks from any working directory (``dataset_path: json`` alone resolves them from the CWD).
LOADER = Path(__file__).resolve().parent.parent / "tokentune" / "assets" / "tasks" / "tt_data.py"
TASK_YAML = """\
# Generated by tools/{builder}.py -- do not edit by hand.
# {description}
# tt_data.load_docs reads data_files relative to this folder (works from any working directory).
task: {name}
output_type: multiple_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/{name}.jsonl
custom_dataset: !function tt_data.load_docs
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
GROUP_YAML = """\
# Generated by tools/{builder}.py -- do not edit by hand.
group: {group}
task:
{tasks}
aggregate_metric_list:
  - metric: acc
    aggregation: mean
    weight_by_size: false
metadata:
  version: 1.0
"""


def write_task_files(
    tasks_dir: Path, test_rows: dict[str, list[dict]], descriptions: dict[str, str], group: str, builder: str
) -> None:
    """Per task ``<name>.yaml`` + ``data/<name>.jsonl`` (prompt, choices, label), and ``<group>.yaml``;
    ``tt_data.py`` (the loader the YAMLs name) is copied there when ``tasks_dir`` is not the package's."""
    (tasks_dir / "data").mkdir(parents=True, exist_ok=True)
    if not (tasks_dir / LOADER.name).is_file() or not (tasks_dir / LOADER.name).samefile(LOADER):
        shutil.copyfile(LOADER, tasks_dir / LOADER.name)
    for name, rows in test_rows.items():
        docs = [
            {
                "instruction": r["instruction"],
                "input": r["input"],
                "output": r["output"],
                "prompt": format_prompt(r["instruction"], r["input"]),
                "choices": r["choices"],
                "label": r["choices"].index(r["output"]),
            }
            for r in rows
        ]
        write_jsonl(tasks_dir / "data" / f"{name}.jsonl", docs)
        text = TASK_YAML.format(name=name, description=descriptions[name], builder=builder)
        (tasks_dir / f"{name}.yaml").write_text(text)
    tasks = "\n".join(f"  - {name}" for name in test_rows)
    (tasks_dir / f"{group}.yaml").write_text(GROUP_YAML.format(tasks=tasks, group=group, builder=builder))
