"""Inputs are checked before any cluster resource is used, and bad input says where it is: the model,
data files, template and eval tasks exist (or the dry run says it cannot check them); non-UTF-8 files,
unknown template placeholders and wrong types name the file or key; sweep names are plain names; rows
whose answer is truncated away are counted and reported; merge + eval has a timeout that fails only
that trial."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.spec.sweep import SpecError, load_spec
from tests.conftest import refused
from tokentune.assets import default_model_path
from tokentune.config import ConfigError, DataConfig, RunConfig
from tokentune.data import DataError, load_template, read_rows, tokenize_rows

REPO = Path(__file__).resolve().parents[1]


def spec(**base) -> dict:
    """A small spec on the shipped defaults; ``base`` sections replace the base's."""
    return {"name": "inputs", "base": {"train": {"max_steps": 2}, **base}}


def fake_hub_cache(root: Path, repo: str) -> Path:
    """A hub cache holding ``repo``'s config.json, laid out as huggingface_hub writes it."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    snap = folder / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text((default_model_path() / "config.json").read_text())
    return root


# ---- the inputs exist ---------------------------------------------------------------------------------------
def test_shipped_defaults_pass_without_notes():
    s = load_spec(REPO / "search_spaces" / "quickstart.yaml")
    assert s.notes == () and "note:" not in s.plan_text()


def test_model_path_must_exist(tmp_path):
    missing = str(tmp_path / "no_model")
    refused(spec(model={"name_or_path": missing}), "base.model.name_or_path", missing, "does not exist")
    (tmp_path / "empty").mkdir()
    refused(spec(model={"name_or_path": str(tmp_path / "empty")}), "base.model.name_or_path", "config.json")
    searched = spec()
    searched["search"] = {"model.name_or_path": {"grid": [None, missing]}}
    refused(searched, "search.model.name_or_path", missing)
    assert load_spec(spec(model={"name_or_path": str(default_model_path())})).notes == ()


def test_hub_model_offline_online_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = spec(model={"name_or_path": "nobody/not-cached"})
    refused(d, "base.model.name_or_path", "'nobody/not-cached'", "HF_HUB_OFFLINE=1", "cache")
    monkeypatch.delenv("HF_HUB_OFFLINE")  # online: cannot be checked here, a note instead of an error
    s = load_spec(d)
    assert len(s.notes) == 1 and "nobody/not-cached" in s.notes[0]
    assert "note: base.model.name_or_path" in s.plan_text() and "downloaded at trial start" in s.plan_text()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake_hub_cache(tmp_path / "hub", "someone/cached-model")
    assert load_spec(spec(model={"name_or_path": "someone/cached-model"})).notes == ()


def test_data_files_must_exist(tmp_path, monkeypatch):
    missing = str(tmp_path / "train.jsonl")
    refused(spec(data={"train": missing}), "base.data.train", missing, "no such file")
    refused(spec(data={"val": str(tmp_path / "v.json")}), "base.data.val", "v.json")
    refused(spec(data={"train": 5}), "base.data.train", "5 is invalid", ".json/.jsonl")
    d = spec()
    d["search"] = {"data.train": {"grid": [None, missing]}}
    refused(d, "search.data.train", missing)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    refused(spec(data={"train": "nobody/no-such-dataset"}), "base.data.train", "HF_DATASETS_OFFLINE=1")
    (tmp_path / "datasets" / "somebody___cached").mkdir(parents=True)
    assert load_spec(spec(data={"train": "somebody/cached"})).notes == ()


def test_eval_tasks_must_be_known(monkeypatch):
    from orchestrator.spec import inputs

    monkeypatch.setattr(inputs, "_lm_eval_tasks", lambda: frozenset({"arc_easy", "hellaswag"}))
    err = refused(
        spec(eval={"tasks": ["tt_next", "no_such_task_xyz:5"]}),
        "base.eval.tasks",
        "'no_such_task_xyz'",
        "tt_next",  # the shipped tasks are listed
        "lm-eval",
    )
    assert "tt_antonym" in err
    d = spec()
    d["search"] = {"eval.tasks": {"grid": [None, ["arc_easy:25", "nope_task"]]}}
    refused(d, "search.eval.tasks", "nope_task")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s = load_spec(spec(eval={"tasks": ["tt_next", "arc_easy:25"]}))  # known; its dataset: a note offline
    assert len(s.notes) == 1 and "arc_easy" in s.notes[0] and "offline" in s.notes[0]
    assert load_spec(spec(eval={"tasks": ["tokentune_mini", "tt_next:2"]})).notes == ()


@pytest.mark.slow
def test_eval_task_names_against_lm_evals_own_index():
    assert load_spec(spec(eval={"tasks": ["arc_easy", "tt_next"]}))
    refused(spec(eval={"tasks": ["arc_easyy"]}), "base.eval.tasks", "'arc_easyy'")


def test_skipping_the_input_checks():
    s = load_spec(spec(data={"train": "/nowhere/train.jsonl"}), check_inputs=False)
    assert s.base["data"]["train"] == "/nowhere/train.jsonl"
    # the plan says what was not checked (the shipped defaults need no check)
    assert len(s.notes) == 1 and "inputs not checked" in s.notes[0]
    assert "base.data.train='/nowhere/train.jsonl'" in s.notes[0] and "model" not in s.notes[0]
    assert "note: inputs not checked (check_inputs=False / --no-input-checks)" in s.plan_text()
    assert load_spec(spec(), check_inputs=False).notes == ()  # only shipped defaults: nothing to say


# ---- files say which file and where -------------------------------------------------------------------------
def test_non_utf8_spec_file_names_the_file_and_byte(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("name: caf\xe9\n".encode("latin-1"))
    err = refused(p, "spec", "latin1.yaml", "not UTF-8", "byte 9")
    assert "Traceback" not in err
    inc = tmp_path / "main.yaml"
    inc.write_text("include: [latin1.yaml]\nname: main\n")
    refused(inc, "include", "latin1.yaml", "byte 9")


def test_non_utf8_data_and_template_name_the_file(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_bytes(b'{"instruction": "caf\xe9", "output": "x"}\n')
    with pytest.raises(DataError, match=r"rows\.jsonl.*not UTF-8.*byte 20"):
        read_rows(str(data))
    tpl = tmp_path / "t.json"
    tpl.write_bytes(b'{"prompt_input": "\xff{instruction}", "prompt_no_input": "{instruction}"}')
    with pytest.raises(DataError, match=r"t\.json.*not UTF-8"):
        load_template(str(tpl))


def test_template_with_an_unknown_placeholder(tmp_path):
    tpl = tmp_path / "tpl.json"
    tpl.write_text(
        json.dumps({"prompt_input": "Q: {question}\n{input}\nA:", "prompt_no_input": "{instruction}"})
    )
    with pytest.raises(DataError) as info:
        load_template(str(tpl))
    err = str(info.value)
    assert all(s in err for s in ("tpl.json", "prompt_input", "{question}", "{instruction}", "{input}"))
    no_input = tmp_path / "no_input.json"
    no_input.write_text(json.dumps({"prompt_input": "{instruction} {input}", "prompt_no_input": "{input}"}))
    with pytest.raises(
        DataError, match=r"prompt_no_input has the unknown placeholder \{input\}.*\{instruction\}"
    ):
        load_template(str(no_input))
    brace = tmp_path / "brace.json"
    brace.write_text(json.dumps({"prompt_input": "{instruction", "prompt_no_input": "{instruction}"}))
    with pytest.raises(DataError, match="brace.json.*prompt_input is not a valid template"):
        load_template(str(brace))
    refused(spec(data={"template": str(tpl)}), "base.data.template", "{question}")  # the dry run checks it


def test_type_errors_name_the_dotted_key():
    with pytest.raises(ConfigError, match=r"train\.betas=0\.9 is invalid: expected tuple\[float, float\]"):
        RunConfig.from_dict({"train": {"betas": 0.9}})
    refused(spec(train={"betas": 0.9}), "base", "train.betas=0.9")
    refused({"name": "t", "after_trial": {"timeout_s": "soon"}}, "after_trial.timeout_s", "'soon'")


# ---- sweep names --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["..", ".", "../escape", "a/b", "/abs", "with space", "-dash", "x" * 129])
def test_sweep_name_must_be_a_plain_name(name):
    refused({"name": name}, "name", repr(name), "plain folder name")


def test_plain_names_pass_and_a_rename_is_checked_again():
    s = load_spec({"name": "my-sweep_1.0"})
    assert s.name == "my-sweep_1.0"
    assert load_spec({"name": "_private"}).name == "_private"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.name = ".."  # a resolved spec is frozen
    with pytest.raises(
        SpecError
    ) as info:  # e.g. run_sweep(name=...): a renamed copy is checked as it is made
        s.replaced(name="..")
    assert info.value.key == "name"
    assert s.replaced(name="other").name == "other" and s.name == "my-sweep_1.0"


@pytest.mark.parametrize("name", ["..", "with space", "-dash", "x" * 129, "a/b"])
def test_run_sweep_checks_its_name_argument_like_a_spec_name(tmp_path, monkeypatch, name):
    """run_sweep(name=...) is checked by check_sweep_name before anything is read or written (a resumed
    '..' would otherwise read and run the sweep of storage's parent folder)."""
    import orchestrator.api as api

    def went_on(*args, **kwargs):
        raise AssertionError(f"run_sweep went on with the name {name!r}")

    monkeypatch.setattr(api, "_stored_spec", went_on)
    monkeypatch.setattr(api, "sweep_lock", went_on)
    with pytest.raises(SpecError) as info:
        api.run_sweep({"name": "ok", "storage": str(tmp_path / "sweeps")}, name=name, resume=True)
    assert info.value.key == "name" and "plain folder name" in str(info.value)


# ---- dropped rows -------------------------------------------------------------------------------------------
def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_path()))


def test_dropped_rows_are_counted_and_logged(tmp_path, caplog):
    tok = _tokenizer()
    long = " ".join(["word"] * 100)
    rows = [
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": long, "input": "", "output": "answer"},  # the prompt fills max_length
        {"instruction": "Name a colour", "input": "", "output": "red"},
    ]
    cfg = DataConfig(max_length=64)
    with caplog.at_level("WARNING", logger="tokentune.data"):
        ds = tokenize_rows(rows, tok, cfg, source="rows.jsonl")
    assert len(ds) == 2 and ds.dropped == 1 and ds.source == "rows.jsonl"
    assert "rows.jsonl" in caplog.text and "dropped 1 of 3" in caplog.text and "max_length=64" in caplog.text
    with pytest.raises(DataError, match=r"rows\.jsonl: data\.max_length=64 .* all 1 rows"):
        tokenize_rows(rows[1:2], tok, cfg, source="rows.jsonl")


def test_dropped_count_from_load_splits(tmp_path):
    from tokentune.data import load_splits

    path = tmp_path / "train.jsonl"
    long = " ".join(["word"] * 100)
    rows = [{"instruction": f"Say {i}", "output": str(i)} for i in range(20)]
    rows += [{"instruction": long, "output": "x"}] * 3
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, val = load_splits(DataConfig(train=str(path), max_length=64, val_fraction=0.5), _tokenizer())
    assert train.dropped + val.dropped == 3 and train.source == str(path)
    assert val.source == f"{path} (validation split)"


def test_the_first_report_carries_the_dropped_rows(tiny_workspace, tmp_path):
    from tests.conftest import tiny_run_dict
    from tokentune.train import train

    rows = [{"instruction": f"Say {i}", "output": str(i)} for i in range(12)]
    rows += [{"instruction": " ".join(["word"] * 200), "output": "x"}] * 3  # prompts past max_length
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = tiny_run_dict(tiny_workspace, ["lora"], tmp_path / "run", train={"max_steps": 2, "log_every": 1})
    d["data"]["train"] = str(path)
    reports = []
    train(RunConfig.from_dict(d), report=lambda metrics, checkpoint_dir=None: reports.append(metrics))
    assert len(reports) == 2
    assert reports[0]["data/dropped_rows"] == 3 and "data/dropped_rows" not in reports[1]


# ---- merge + eval timeout -----------------------------------------------------------------------------------
def test_after_trial_timeout_setting():
    assert load_spec({"name": "t"}).after_trial.timeout_s == 1800
    assert load_spec({"name": "t", "after_trial": {"timeout_s": None}}).after_trial.timeout_s is None
    s = load_spec({"name": "t", "after_trial": {"timeout_s": 90}})
    assert "timeout_s=90" in s.plan_text()
    for bad in (0, -5, "x", True):
        refused({"name": "t", "after_trial": {"timeout_s": bad}}, "after_trial.timeout_s", "seconds > 0")


def test_post_trial_timeout_cancels_the_task(tmp_path, monkeypatch):
    """The timeout is waited for once the task has started (its first streamed item), then it is cancelled."""
    ray = pytest.importorskip("ray")
    from orchestrator.run import post_trial

    calls: dict = {}
    stream = iter(["started-ref"])

    class Task:
        def remote(self, *args, **kwargs):
            return stream

    def wait(refs, timeout=None):
        calls["timeout"] = timeout
        return [], refs

    monkeypatch.setattr(post_trial, "as_ray_task", lambda *a, **k: Task())
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: post_trial.STARTED)
    monkeypatch.setattr(ray, "wait", wait)
    monkeypatch.setattr(ray, "cancel", lambda ref, force=False: calls.update(cancel=(ref, force)))
    out = post_trial.run_post_trial(tmp_path / "final", tmp_path / "trial", timeout_s=5)
    assert out["error"] == "merge+eval timed out after 5 s (after_trial.timeout_s)"
    assert calls == {"timeout": 5, "cancel": (stream, True)}
    assert out["metrics"] == {} and out["merged_dir"] is None


def _never_returns(*args, **kwargs):
    time.sleep(600)


def _hold(seconds: float) -> None:
    time.sleep(seconds)


def _quick(final_dir, trial_dir, *args, **kwargs):
    return {"metrics": {"merge_s": 0.0}, "results": {}, "merged_dir": None, "eval_json": None, "error": None}


@pytest.mark.slow
@pytest.mark.ray
def test_post_trial_timeout_on_a_real_ray(tmp_path, monkeypatch, ray_local):
    """The stuck task is cancelled after timeout_s, its CPU comes back, and the next trial's task runs."""
    from orchestrator.run import post_trial

    ray = ray_local
    monkeypatch.setattr(post_trial, "merge_and_evaluate", _never_returns)
    t0 = time.monotonic()
    out = post_trial.run_post_trial(tmp_path / "f", tmp_path / "t1", timeout_s=3)
    assert out["error"] == "merge+eval timed out after 3 s (after_trial.timeout_s)"
    assert time.monotonic() - t0 < 60
    deadline = time.monotonic() + 60  # the cancelled task's CPU comes back
    while ray.available_resources().get("CPU") != 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU") == 2
    monkeypatch.setattr(post_trial, "merge_and_evaluate", _quick)
    ok = post_trial.run_post_trial(tmp_path / "f", tmp_path / "t2", timeout_s=60)
    assert ok["error"] is None and ok["metrics"] == {"merge_s": 0.0}


@pytest.mark.slow
@pytest.mark.ray
def test_post_trial_timeout_starts_when_merge_and_eval_start(tmp_path, monkeypatch, ray_local):
    """A task queued behind a task holding every CPU waits longer than timeout_s for them, then runs
    quickly: it is not timed out (the timeout counts merge + eval, not the wait for resources)."""
    from orchestrator.run import post_trial

    ray = ray_local
    hog = ray.remote(num_cpus=2)(_hold).remote(8)
    monkeypatch.setattr(post_trial, "merge_and_evaluate", _quick)
    t0 = time.monotonic()
    out = post_trial.run_post_trial(tmp_path / "f", tmp_path / "t", resources={"num_cpus": 2}, timeout_s=4)
    assert out["error"] is None and out["metrics"] == {"merge_s": 0.0}
    assert time.monotonic() - t0 > 4  # it did wait for the CPUs longer than timeout_s
    ray.get(hog)


def test_spec_file_round_trip_keeps_the_timeout(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"name": "rt", "after_trial": {"timeout_s": 120}}))
    s = load_spec(p)
    assert load_spec(yaml.safe_load(s.to_yaml())).after_trial.timeout_s == 120
