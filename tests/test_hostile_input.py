"""Bounded work on hostile or mistaken input, and a dry run that catches what every trial would fail on
(issue 27, items 5 and 6): a YAML alias bomb is refused before anything formats it; a sweep of 10**8
trials is planned lazily; a template placeholder with a conversion or format spec is refused; data
files that every trial would fail on (a JSON line named by its line, every answer truncated away,
fewer rows than a batch; not UTF-8, empty and rows without an answer as before) are errors of the dry
run naming the file; an lm-eval task YAML given by path is accepted as lm-eval's ``--include_path``
takes it."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pytest

from orchestrator.spec.sweep import load_spec
from tests.conftest import refused
from tokentune.assets import default_tasks_dir
from tokentune.data import DataError, load_template
from tokentune.errors import MAX_EXPANDED_SIZE, expanded_size

REPO = Path(__file__).resolve().parents[1]


def spec(**base) -> dict:
    return {"name": "hostile", "base": {"train": {"max_steps": 2}, **base}}


@contextlib.contextmanager
def memory_headroom(gb: float = 3.0):
    """Cap this process's address space at its current size + ``gb`` (Linux): unbounded work fails with
    ``MemoryError`` here instead of exhausting the machine (the old dry run built 10**8 trials)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    size = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (size + int(gb * 2**30), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def alias_bomb(levels: int) -> str:
    """A YAML "billion laughs" value: each level a list of nine aliases of the one before (9**levels
    strings once expanded), its anchors defined inline."""
    expr = '&l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]'
    for i in range(1, levels):
        expr = f"&l{i} [{expr}, {', '.join([f'*l{i - 1}'] * 8)}]"
    return expr


# ---- item 5: bounded work -----------------------------------------------------------------------------------
def test_expanded_size_counts_through_aliases_and_stops_at_the_limit():
    shared = ["lol"] * 9
    assert expanded_size({"a": shared, "b": shared}) == 1 + 2 * 2 + 2 * (1 + 9 * 4)  # keys count as strings
    looped: list = []
    looped.append(looped)  # a self-referencing list (YAML: &a [*a]) stops at the limit
    assert expanded_size(looped, limit=1000) == 1001


def test_an_alias_bomb_is_refused_naming_the_file(tmp_path):
    """9**7 (4.8M) strings once expanded (9**9 would need gigabytes for str()): refused at once."""
    p = tmp_path / "bomb.yaml"
    p.write_text(f"name: bomb\ndescription: {alias_bomb(7)}\n")
    t0 = time.perf_counter()
    err = refused(p, "spec", "bomb.yaml", "aliases", f"{MAX_EXPANDED_SIZE:,}")
    assert time.perf_counter() - t0 < 10 and len(err) < 1000
    inc = tmp_path / "main.yaml"  # an included bomb names the included file
    inc.write_text("include: [bomb.yaml]\nname: main\n")
    refused(inc, "include", "bomb.yaml", "aliases")


def test_an_alias_bomb_in_a_dict_or_a_set_override_is_refused():
    import yaml

    bomb = yaml.safe_load(f"x: {alias_bomb(7)}")["x"]  # 4.8M strings, shared: small in memory
    refused({**spec(), "description": bomb}, "spec", "aliases")
    refused(spec(), "spec", "--set", "aliases", overrides={"description": bomb})


def test_a_hundred_million_trials_are_planned_lazily():
    """``tune.num_samples: 100000000``: the dry run builds the first rows and counts the rest."""
    t0 = time.perf_counter()
    with memory_headroom():
        s = load_spec(REPO / "search_spaces" / "quickstart.yaml", ["tune.num_samples=100000000"])
        text = s.plan_text()
    assert s.num_trials() == 400_000_000
    assert "trials: 400000000" in text and "... 399,999,950 more (400,000,000 trials in all)" in text
    assert len(s.dry_run_trials(3)) == 3 and len(s.searched_values(5)) == 5
    assert time.perf_counter() - t0 < 60


def test_the_dry_run_result_holds_a_bounded_number_of_trials(monkeypatch):
    from orchestrator.api import run_sweep

    monkeypatch.setattr("orchestrator.api.DRY_RUN_TRIALS", 6, raising=False)
    with memory_headroom():
        quickstart = REPO / "search_spaces" / "quickstart.yaml"
        res = run_sweep(quickstart, ["tune.num_samples=100000000"], dry_run=True, progress=False)
    assert len(res.trials) == 6 and res.spec.num_trials() == 400_000_000
    assert "... 399,999,994 more (400,000,000 trials in all)" in res.plan_text  # the text: 6 rows, the total


def test_lazy_planning_keeps_the_seeded_draws():
    """Drawn values are the same whether all or the first few trials are built."""
    d = spec()
    d["search"] = {"lora.rank": {"grid": [4, 8]}, "train.lr": {"loguniform": [1e-4, 1e-2]}}
    d["tune"] = {"algorithm": "random", "num_samples": 3, "seed": 7}
    s = load_spec(d)
    assert s.searched_values(4) == s.searched_values()[:4] and len(s.searched_values()) == 6


@pytest.mark.parametrize("placeholder", ["{instruction!r:>100000000}", "{instruction:>99}", "{input!s}"])
def test_a_template_placeholder_with_a_conversion_or_format_spec_is_refused(tmp_path, placeholder):
    tpl = tmp_path / "tpl.json"
    tpl.write_text(
        json.dumps({"prompt_input": f"Q: {placeholder} {{input}}", "prompt_no_input": "Q: {instruction}"})
    )
    with pytest.raises(DataError, match="conversion or format spec") as info:
        load_template(str(tpl))
    assert "tpl.json" in str(info.value) and "prompt_input" in str(info.value)
    refused(spec(data={"template": str(tpl)}), "base.data.template", "format spec")


# ---- item 6: the dry run catches what every trial would fail on --------------------------------------------------
def rows(n: int, **extra) -> list[dict]:
    return [{"instruction": f"Say {i}.", "output": f"{i}", **extra} for i in range(n)]


def write_jsonl(path: Path, items: list) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in items))
    return str(path)


def test_data_every_trial_would_fail_on_is_refused_by_the_dry_run(tmp_path):
    good = rows(40)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"instruction": "caf\xe9", "output": "x"}\n')
    refused(spec(data={"train": str(latin1)}), "base.data", "latin1.jsonl", "not UTF-8", "byte 20")
    (tmp_path / "empty.jsonl").write_text("")
    refused(spec(data={"train": str(tmp_path / "empty.jsonl")}), "base.data", "empty.jsonl", "no rows")
    bad_line = write_jsonl(
        tmp_path / "bad_line.jsonl", [*good[:10], '{"instruction": "x", "output": ', *good[10:]]
    )
    refused(spec(data={"train": bad_line}), "base.data", "bad_line.jsonl: line 11 is not valid JSON")
    no_answer = write_jsonl(tmp_path / "no_answer.jsonl", [*good[:5], {"instruction": "?"}, *good[5:]])
    refused(spec(data={"train": no_answer}), "base.data", "no_answer.jsonl: row 6", "'output'")
    # every answer truncated away (alpaca with max_steps: the trial would fail loading its data)
    refused(
        spec(data={"train": write_jsonl(tmp_path / "ok.jsonl", good), "max_length": 8}),
        "base.data",
        "ok.jsonl",
        "truncates the answer of all",
        "data.max_length=8",
    )
    # fewer training rows than one batch
    few = write_jsonl(tmp_path / "few.jsonl", good[:6])
    refused(
        spec(data={"train": few}, train={"max_steps": 2, "batch_size": 8}),
        "base.data",
        "few.jsonl",
        "fewer than one batch",
        "train.batch_size=8",
    )
    assert load_spec(spec(data={"train": write_jsonl(tmp_path / "fine.jsonl", good)})).notes == ()


def own_task_folder(root: Path) -> Path:
    """A user's task folder: the shipped tt_next task renamed my_next, with its loader and documents."""
    shipped = default_tasks_dir()
    (root / "data").mkdir(parents=True)
    text = (shipped / "tt_next.yaml").read_text().replace("task: tt_next", "task: my_next")
    (root / "my_next.yaml").write_text(text)
    (root / "tt_data.py").write_text((shipped / "tt_data.py").read_text())
    (root / "data" / "tt_next.jsonl").write_text((shipped / "data" / "tt_next.jsonl").read_text())
    return root / "my_next.yaml"


def test_an_eval_task_yaml_by_path_is_accepted_as_an_include_path(tmp_path, monkeypatch):
    """Chosen: accept (lm-eval's own ``--include_path``): the dry run checks that lm-eval indexes the
    file's task in its folder, and the path is made absolute for the workers."""
    task = own_task_folder(tmp_path / "tasks")
    monkeypatch.chdir(tmp_path)
    s = load_spec(spec(eval={"tasks": ["tasks/my_next.yaml:0", "tt_next"]}))
    assert s.base["eval"]["tasks"] == [f"{task}:0", "tt_next"] and s.notes == ()
    (tmp_path / "not_a_task.yaml").write_text("foo: 1\n")
    refused(spec(eval={"tasks": ["not_a_task.yaml"]}), "base.eval.tasks", "not_a_task.yaml", "names no task")


@pytest.mark.slow
def test_evaluate_runs_a_task_given_by_its_yaml_path(tmp_path):
    from tokentune.assets import default_model_path
    from tokentune.evaluate import evaluate

    task = own_task_folder(tmp_path / "tasks")
    result = evaluate(str(default_model_path()), tasks=[f"{task}:0"], limit=4)
    assert set(result["results"]) == {"my_next"} and "eval/my_next/acc" in result["metrics"]
