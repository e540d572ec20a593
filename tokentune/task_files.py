"""Evaluation tasks given as files: ``eval.tasks: [path/to/my_task.yaml]``, as lm-eval's ``--include_path``.

    name, folder = task_file("tasks/my_task.yaml")     # ("my_task", "/abs/tasks"), None for a task name
    specs, folders = resolve_task_files([("tasks/my_task.yaml", 5), ("tt_next", None)])

A task YAML is read (``read_task_yaml``: lm-eval's ``!function`` tags kept as text, nothing imported)
for the group or task it defines; its folder is indexed with lm-eval's own task index, as
``lm-eval --include_path FOLDER --tasks NAME`` would, so its ``include:`` and ``!function`` files
resolve beside it (keep a task's files in a folder of their own: the whole folder is indexed). A leaf
module: the dry run (``orchestrator.spec.inputs``) and ``tokentune.evaluate`` both use it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

TASK_SUFFIXES = (".yaml", ".yml")


def read_task_yaml(path: Path) -> dict[str, Any]:
    """A task YAML, with lm-eval's ``!function`` tags read as their text (nothing is imported)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    with path.open(encoding="utf-8") as f:
        return yaml.load(f, Loader=Loader) or {}


def task_file(spec: str) -> tuple[str, str] | None:
    """A task given as the path of an lm-eval task YAML -> (the group or task it defines, its folder, made
    absolute); None for a task name. A file that is no task YAML is a ``ValueError`` naming it."""
    p = Path(spec).expanduser()
    if p.suffix not in TASK_SUFFIXES or not p.is_file():
        return None
    try:
        cfg = read_task_yaml(p)
    except Exception as e:  # noqa: BLE001 - yaml's and the decoder's errors: one message naming the file
        raise ValueError(
            f"task file {spec!r} is not a readable YAML file ({type(e).__name__}: {e})"
        ) from None
    for key in ("group", "task"):
        if isinstance(cfg, dict) and isinstance(cfg.get(key), str):
            return cfg[key], str(p.resolve().parent)
    raise ValueError(
        f"task file {spec!r} names no task: expected an lm-eval task YAML with a 'task:' (or 'group:') name"
    )


def resolve_task_files(
    specs: list[tuple[str, int | None]],
) -> tuple[list[tuple[str, int | None]], list[str]]:
    """``(name, shots)`` specs with each task file replaced by the task it defines, and the distinct folders
    to index (``include_path``); each file's task is checked to be in its folder's index."""
    out, folders = [], []
    for name, shots in specs:
        found = task_file(name)
        if found:
            task, folder = found
            if task not in folder_tasks((folder,)):
                raise ValueError(
                    f"task file {name!r}: lm-eval does not index its task {task!r} in {folder} (see lm-eval's "
                    "task YAML guide: a task needs task:, dataset_path, output_type and a doc_to_* set)"
                )
            name, folders = task, folders + [folder] * (folder not in folders)
        out.append((name, shots))
    return out, folders


@functools.lru_cache(maxsize=16)
def folder_tasks(folders: tuple[str, ...]) -> frozenset[str]:
    """The task, group and tag names lm-eval indexes in ``folders`` (its built-in tasks left out)."""
    if not folders:
        return frozenset()
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager(include_path=list(folders), include_defaults=False).all_tasks)
