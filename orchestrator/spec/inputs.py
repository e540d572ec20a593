"""The inputs of a sweep exist here, before any cluster resource is used. Pure: never imports ray.

    notes = check_inputs(spec)   # raises SpecError naming the key; validate_spec calls it
    raw = absolute_local_paths(raw)   # relative input paths that exist here made absolute (load_spec)

Checked for ``base`` and for every searched candidate: ``model.name_or_path`` / ``model.tokenizer`` a
local folder or a hub name in the local Hugging Face cache; ``data.train`` / ``data.val`` a local
.json/.jsonl file or an HF dataset in the local cache; ``data.template`` ``alpaca`` or a valid template
file (UTF-8 JSON, only known placeholders); ``eval.tasks`` shipped, known to lm-eval's task index, or
the path of an lm-eval task YAML whose task lm-eval indexes in its folder (``tokentune.task_files``).
A hub name that is not cached is an error offline (``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1``: the
trial could never load it) and otherwise a note (it cannot be checked here; the trial downloads it);
an lm-eval task's dataset cannot be checked offline (a note). ``null`` means the shipped default.
``unchecked_inputs(spec)`` is the note of a spec whose inputs are not checked (``check_inputs=False``).
The rows of local data files are read and checked in ``data.format`` (with ``data.columns``); under
``data.format: chat`` or with ``train.epochs`` every row is also rendered and tokenized
(``tokentune.preview.training_rows``), so a bad row or a chat template that fails to render is an
error naming the file, the row and the key before Ray starts; otherwise (a local model) each split is
tokenized up to its first row with a supervised token (``tokentune.preview.check_trainable``). Either
way a split whose every answer is truncated away, or training rows fewer than one batch, is an error:
every trial would fail on it.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.spec.parts import SpecError, apply_searched, lookup_dotted, setup_keys
from tokentune.config import ConfigError
from tokentune.task_files import TASK_SUFFIXES

if TYPE_CHECKING:
    from orchestrator.spec.sweep import SweepSpec


INPUT_KEYS = (
    "model.name_or_path",
    "model.tokenizer",
    "data.train",
    "data.val",
    "data.template",
    "eval.tasks",
)
ACCEPTED_INPUT = {
    "model.name_or_path": "a local model folder, a hub name (org/name) or null (the shipped tiny Llama)",
    "model.tokenizer": "a local tokenizer folder, a hub name or null (the model's)",
    "data.train": "a .json/.jsonl file, an HF dataset name or null (the shipped instruction data)",
    "data.val": "a .json/.jsonl file, an HF dataset name or null",
}


#: config keys that may name a local file or folder: a relative one is taken from the working directory
PATH_KEYS = ("model.name_or_path", "model.tokenizer", "data.train", "data.val", "data.template", "eval.tasks")


def absolute_local_paths(raw: dict[str, Any]) -> dict[str, Any]:
    """Relative paths in :data:`PATH_KEYS` (in ``base`` and in ``search``) that exist from the working
    directory, made absolute: Ray's workers run elsewhere (hub names and missing files stay as they are,
    for the input checks to judge)."""

    def fix(value: Any) -> Any:
        if isinstance(value, list):  # eval.tasks: task YAML files among the names ("tasks/t.yaml:5")
            return [fix_task(v) for v in value]
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            p = Path(value).expanduser()
            return str(p.resolve()) if p.exists() else value
        return value

    def fix_task(value: Any) -> Any:
        from tokentune.evaluate import parse_task_spec

        if not isinstance(value, str):
            return value
        name, shots = parse_task_spec(value)
        return (
            value
            if Path(name).suffix not in TASK_SUFFIXES
            else fix(name) + (f":{shots}" if shots is not None else "")
        )

    base = raw.get("base")
    for key in PATH_KEYS:
        section, name = key.split(".")
        if isinstance(base, dict) and isinstance(base.get(section), dict) and name in base[section]:
            base[section][name] = fix(base[section][name])
        dim = (raw.get("search") or {}).get(key) if isinstance(raw.get("search"), dict) else None
        if isinstance(dim, dict):
            for verb in ("grid", "choice"):
                if isinstance(dim.get(verb), list):
                    dim[verb] = [fix(v) for v in dim[verb]]
        elif dim is not None:
            raw["search"][key] = fix(dim)
    return raw


def check_inputs(spec: SweepSpec) -> list[str]:
    """Check every input value of ``base`` and of the searched candidates; raise a ``SpecError`` naming
    the key for one that does not exist, return notes on what cannot be checked here."""
    notes: list[str] = []
    seen: set[tuple[str, str]] = set()
    for key in INPUT_KEYS:
        for where, value in _input_values(spec, key):
            if (key, repr(value)) in seen:
                continue
            seen.add((key, repr(value)))
            note = _check_input(key, value, where)
            if note and note not in notes:
                notes.append(note)
    check_data_rows(spec)
    return notes


def unchecked_inputs(spec: SweepSpec) -> list[str]:
    """``check_inputs=False`` (a spec meant for another machine): one note naming every input value that
    was not checked here (the shipped defaults need no check)."""
    items: list[str] = []
    for key in INPUT_KEYS:
        for where, value in _input_values(spec, key):
            if value is None or (key == "data.template" and value == "alpaca"):
                continue
            item = f"{where}={value!r}" if where.endswith(key) else f"{where} -> {key}={value!r}"
            if item not in items:
                items.append(item)
    if not items:
        return []
    return [
        "inputs not checked (check_inputs=False / --no-input-checks): "
        + ", ".join(items)
        + "; they must exist where the trials run"
    ]


def check_data_rows(spec: SweepSpec) -> None:
    """Read the rows of each distinct local ``data`` section of the trials (render and tokenize them
    under ``chat`` or ``train.epochs``); a bad row raises a ``SpecError`` naming the file, row and key.
    Hub datasets, and models that are not local, are left to the trial."""
    from tokentune.data import is_local_source, split_rows
    from tokentune.preview import check_batch_fits, check_trainable, training_rows

    seen: set[str] = set()
    for i, cfg in enumerate(spec.trial_configs(64)):
        d, model = cfg.data, cfg.model
        sources = [s for s in (d.train, d.val) if s]
        key = repr((d, model.name_or_path, model.tokenizer, cfg.train.epochs is None))
        if key in seen or any(not is_local_source(s) for s in sources):
            continue
        seen.add(key)
        render = d.format == "chat" or cfg.train.epochs is not None
        local_model = all(
            m is None or Path(m).expanduser().exists() for m in (model.name_or_path, model.tokenizer)
        )
        try:
            if render and local_model:
                check_batch_fits(cfg, training_rows(cfg), d.train or "data.train")
            elif sources and local_model:
                check_trainable(cfg)
            elif sources:
                split_rows(d, cfg.train.seed)
        except ConfigError as e:
            raise SpecError("base.data" if not spec.search else f"trial {i}: data", str(e)) from None


def _input_values(spec: SweepSpec, key: str):
    """(where, value) of ``key`` in ``base`` (unless searched) and in each searched candidate."""
    dims = [
        d
        for d in spec.search.values()
        if key == d.key
        or key.startswith(d.key + ".")
        or any(key == k or key.startswith(k + ".") for k in setup_keys(d))
    ]
    if not dims:
        yield f"base.{key}", lookup_dotted(spec.base, key)[1]
    for dim in dims:
        for value in dim.candidates():
            d: dict[str, Any] = copy.deepcopy(spec.base) if setup_keys(dim) else {}
            apply_searched(d, dim.key, copy.deepcopy(value))
            yield f"search.{dim.key}", lookup_dotted(d, key)[1]


def _check_input(key: str, value: Any, where: str) -> str | None:
    if value is None:  # the shipped default (the model's tokenizer, a split of data.train)
        return None
    if key == "eval.tasks":
        return _check_tasks(value, where)
    if key == "data.template":
        from tokentune.data import load_template

        try:
            load_template(value)
        except ConfigError as e:
            raise SpecError(where, str(e)) from None
        return None
    if not isinstance(value, str) or not value.strip():
        raise SpecError(where, f"{key}={value!r} is invalid: expected {ACCEPTED_INPUT[key]}")
    if key.startswith("model."):
        return _check_model(key, value, where)
    return _check_data(key, value, where)


def _check_model(key: str, value: str, where: str) -> str | None:
    p = Path(value).expanduser()
    if p.exists() or value.startswith((".", "/", "~")) or value.count("/") > 1:  # a path
        if not p.is_dir():
            what = "is not a folder" if p.exists() else f"does not exist (resolved from {Path.cwd()})"
            raise SpecError(where, f"{key}={value!r} {what}: expected {ACCEPTED_INPUT[key]}")
        if key == "model.name_or_path" and not (p / "config.json").is_file():
            raise SpecError(where, f"{key}={value!r}: the folder has no config.json (not a model folder)")
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        files = ("config.json",) if key == "model.name_or_path" else ("tokenizer_config.json", "config.json")
        cached = any(isinstance(try_to_load_from_cache(value, f, cache_dir=_hub_cache()), str) for f in files)
    except Exception:  # noqa: BLE001 - huggingface_hub's validation error: not a repo id
        raise SpecError(
            where, f"{key}={value!r} is neither a local folder nor a hub name (org/name)"
        ) from None
    return None if cached else _not_cached(key, value, where, "HF_HUB_OFFLINE")


def _check_data(key: str, value: str, where: str) -> str | None:
    from tokentune.data import is_local_source

    if is_local_source(value):
        if not Path(value).expanduser().is_file():
            raise SpecError(
                where,
                f"{key}={value!r}: no such file (resolved from {Path.cwd()}); expected {ACCEPTED_INPUT[key]}",
            )
        return None
    name = value.replace("/", "--")
    if (_hub_cache() / f"datasets--{name}" / "snapshots").is_dir() or _in_datasets_cache(value):
        return None
    return _not_cached(key, value, where, "HF_DATASETS_OFFLINE")


def _not_cached(key: str, value: str, where: str, offline_var: str) -> str:
    offline = [v for v in (offline_var, "HF_HUB_OFFLINE") if _is_set(v)]
    if offline:
        raise SpecError(
            where,
            f"{key}={value!r} is not a local path and not in the local Hugging Face cache, and the hub is "
            f"offline ({offline[0]}=1): expected {ACCEPTED_INPUT[key]}, downloaded beforehand for a hub name "
            "(a spec meant for another machine: --no-input-checks / check_inputs=False)",
        )
    return (
        f"{where}: {value!r} is not in the local Hugging Face cache, so it is not checked here (not "
        "cached; checking it would need the hub); it will be downloaded at trial start"
    )


def _check_tasks(value: Any, where: str) -> str | None:
    from tokentune.evaluate import parse_task_spec, shipped_tasks
    from tokentune.task_files import folder_tasks, resolve_task_files

    if not isinstance(value, list) or not all(isinstance(t, str) and t.strip() for t in value):
        raise SpecError(where, f"eval.tasks={value!r} is invalid: expected a list of task names or null")
    try:  # a task YAML file: the task it defines, its folder indexed as lm-eval's --include_path
        specs, folders = resolve_task_files([parse_task_spec(t) for t in value])
    except ValueError as e:
        raise SpecError(where, f"eval.tasks: {e}") from None
    shipped, from_files = shipped_tasks(), folder_tasks(tuple(folders))
    others = [n for n, _ in specs if n not in shipped and n not in from_files]
    if not others:
        return None
    known = _lm_eval_tasks()
    for name in others:
        if name not in known:
            raise SpecError(
                where,
                f"eval.tasks: unknown evaluation task {name!r}; shipped tasks: {', '.join(shipped)}; or any "
                "lm-eval task name (`lm-eval ls tasks`) or the path of a task YAML file, optionally as 'name:fewshot'",
            )
    if _is_set("HF_HUB_OFFLINE") or _is_set("HF_DATASETS_OFFLINE"):
        return (
            f"{where}: the datasets of the lm-eval tasks {', '.join(others)} cannot be checked offline; "
            "they must be in the local Hugging Face cache when the trials are evaluated"
        )
    return None


@functools.lru_cache(maxsize=1)
def _lm_eval_tasks() -> frozenset[str]:
    """Every task, group and tag name lm-eval knows (indexing them takes seconds: only when needed)."""
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager(include_defaults=True).all_tasks)


def _hub_cache() -> Path:
    """The Hugging Face hub cache, read from the environment now (HF_HUB_CACHE, HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _in_datasets_cache(name: str) -> bool:
    root = os.environ.get("HF_DATASETS_CACHE") or (
        os.path.join(os.environ["HF_HOME"], "datasets") if os.environ.get("HF_HOME") else None
    )
    if root is None:
        try:
            from datasets import config

            root = str(config.HF_DATASETS_CACHE)
        except ImportError:
            return False
    return (Path(root).expanduser() / name.replace("/", "___")).is_dir()


def _is_set(var: str) -> bool:
    return os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
