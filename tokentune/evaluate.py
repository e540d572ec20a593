"""lm-eval on a checkpoint: the shipped offline tasks plus any lm-eval task name.

    result = evaluate("runs/t1/merged")                       # shipped ``tokentune_mini`` group
    result = evaluate(model, tokenizer, tasks=["tt_category", "arc_challenge:25"], limit=50)
    result["metrics"]  # {"eval/tt_category/acc": 0.91, ...}

A task is a shipped name (see ``shipped_tasks()``), any lm-eval task/group/tag name, or
``name:fewshot``. Only when a non-shipped name is asked for does lm-eval index its ~14k built-in
tasks (~15 s); a built-in task whose dataset is unavailable offline raises ``RuntimeError``.
"""

from __future__ import annotations

import functools
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

from tokentune.assets import DEFAULT_TASKS, default_tasks_dir

log = logging.getLogger(__name__)

_FEWSHOT_SUFFIX = re.compile(r"^(?P<name>.+):(?P<shots>\d+)$")
_NOT_METRICS = {"alias", "sample_len", "samples"}  # per-task bookkeeping in lm-eval's results


def shipped_tasks(tasks_dir: Path | None = None) -> list[str]:
    """Names of the task families and groups defined by the shipped YAMLs."""
    names = []
    for path in sorted((tasks_dir or default_tasks_dir()).glob("*.yaml")):
        cfg = _read_yaml(path)
        for key in ("group", "task"):
            if isinstance(cfg.get(key), str):
                names.append(cfg[key])
                break
    return names


def parse_task_spec(spec: str) -> tuple[str, int | None]:
    """``"arc_challenge:25"`` -> ``("arc_challenge", 25)``; ``"tt_next"`` -> ``("tt_next", None)``."""
    spec = spec.strip()
    match = _FEWSHOT_SUFFIX.match(spec)
    if match:
        return match["name"], int(match["shots"])
    return spec, None


def evaluate(
    model: Any,
    tokenizer: Any = None,
    tasks: list[str] | str | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Run lm-eval tasks on a causal LM and return flat metrics.

    Args:
        model: path to an HF checkpoint folder (or hub name, if cached) or a loaded
            ``PreTrainedModel``.
        tokenizer: a tokenizer or its path; default: the model's folder.
        tasks: task names (``"name"`` or ``"name:fewshot"``), a list or a comma-separated string;
            default: the shipped ``tokentune_mini`` group.
        num_fewshot: shots for tasks without a ``:fewshot`` suffix (None: the task's default).
        limit: documents per task (int) or fraction (float < 1); None: all.
        batch_size: lm-eval batch size.
        device: where a model loaded from a path is placed (a passed model is moved there too).
        seed: seeds lm-eval's python/numpy/torch/few-shot randomness.

    Returns:
        ``{"results": {task: {metric: value}}, "metrics": {"eval/<task>/<metric>": value},
        "raw": <lm-eval results, JSON-serialisable>}``. Group rows (e.g. ``tokentune_mini``)
        carry the mean over their tasks.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    specs = [parse_task_spec(s) for s in _as_list(tasks)]
    shipped = shipped_tasks()
    _check_names([name for name, _ in specs], shipped)
    needs_defaults = any(name not in shipped for name, _ in specs)

    model_obj, tok = _load_model_and_tokenizer(model, tokenizer, device)
    was_training = model_obj.training
    model_obj.eval()
    try:
        with tempfile.TemporaryDirectory(prefix="tokentune-tasks-") as tmp:
            _write_shipped_tasks(default_tasks_dir(), Path(tmp))
            manager = TaskManager(include_path=tmp, include_defaults=needs_defaults)
            _check_names_indexed([name for name, _ in specs], manager, shipped)
            loaded = [t for name, shots in specs for t in _load_task(manager, name, shots, num_fewshot)]
            lm = HFLM(pretrained=model_obj, tokenizer=tok, batch_size=batch_size)
            raw = lm_eval.simple_evaluate(
                model=lm,
                tasks=loaded,
                task_manager=manager,
                num_fewshot=None,  # set per task in _load_task
                limit=limit,
                bootstrap_iters=0,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
    finally:
        model_obj.train(was_training)
    if raw is None:  # non-zero rank in a distributed run
        return {"results": {}, "metrics": {}, "raw": {}}
    return summarize(raw)


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """lm-eval output -> ``{"results", "metrics", "raw"}`` with ``",none"`` filters dropped."""
    from lm_eval.utils import handle_non_serializable

    results: dict[str, dict[str, float]] = {}
    for task, row in raw.get("results", {}).items():
        values = {}
        for key, value in row.items():
            if key in _NOT_METRICS or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr"):
                continue
            name = metric if filt in ("", "none") else f"{metric}_{filt}"
            values[name] = float(value)
        results[task] = values
    metrics = {
        f"eval/{task}/{metric}": value for task, values in results.items() for metric, value in values.items()
    }
    serialisable = _jsonable(raw, handle_non_serializable)
    return {"results": results, "metrics": metrics, "raw": serialisable}


# ----------------------------------------------------------------------------------------- helpers
def _as_list(tasks: list[str] | str | None) -> list[str]:
    if tasks is None:
        return list(DEFAULT_TASKS)
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    names = [t.strip() for t in tasks if t and t.strip()]
    if not names:
        raise ValueError(f"no evaluation tasks given (tasks={tasks!r})")
    return names


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    with path.open() as f:
        return yaml.safe_load(f) or {}


def _write_shipped_tasks(src: Path, dst: Path) -> None:
    """Copy the shipped YAMLs with ``data_files`` made absolute (lm-eval resolves them from CWD)."""
    import yaml

    for path in sorted(src.glob("*.yaml")):
        cfg = _read_yaml(path)
        data_files = cfg.get("dataset_kwargs", {}).get("data_files")
        if isinstance(data_files, dict):
            cfg["dataset_kwargs"]["data_files"] = {
                split: str((src / f).resolve()) for split, f in data_files.items()
            }
        (dst / path.name).write_text(yaml.safe_dump(cfg, sort_keys=False))


def _check_names(names: list[str], shipped: list[str]) -> None:
    """Fail fast on names that are neither shipped nor mentioned anywhere in lm-eval's task YAMLs."""
    unknown = [n for n in names if n not in shipped and n not in _builtin_words()]
    if unknown:
        raise _unknown_task_error(unknown[0], shipped)


def _check_names_indexed(names: list[str], manager: Any, shipped: list[str]) -> None:
    known = set(manager.all_tasks)
    for name in names:
        if name not in known and not Path(name).is_file():
            raise _unknown_task_error(name, shipped)


def _unknown_task_error(name: str, shipped: list[str]) -> ValueError:
    return ValueError(
        f"unknown evaluation task {name!r}; shipped tasks: {', '.join(shipped)}; "
        "or any lm-eval task name (see `lm-eval ls tasks`), optionally as 'name:fewshot'"
    )


@functools.lru_cache(maxsize=1)
def _builtin_words() -> frozenset[str]:
    """Every identifier-like word in lm-eval's built-in task YAMLs (a cheap superset of task names)."""
    import lm_eval

    words: set[str] = set()
    for path in (Path(lm_eval.__file__).parent / "tasks").rglob("*.yaml"):
        words.update(re.findall(r"[\w.\-]+", path.read_text(errors="ignore")))
    return frozenset(words)


def _load_task(manager: Any, name: str, shots: int | None, default_shots: int | None) -> list[Any]:
    """Build one task/group (this is where datasets load) and set its few-shot count."""
    try:
        loaded = manager.load([name])
    except KeyError as err:
        raise ValueError(f"unknown evaluation task {name!r}: {err}") from err
    except Exception as err:  # datasets/hub errors come in many types
        raise RuntimeError(
            f"evaluation task {name!r} could not load its dataset ({type(err).__name__}: {err}). "
            "Built-in lm-eval tasks need their dataset from the Hugging Face hub or the local cache; "
            "offline (HF_HUB_OFFLINE=1) only cached datasets work."
        ) from err
    n = shots if shots is not None else default_shots
    for task in loaded["tasks"].values():
        if n is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=n)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
    if name in loaded["groups"]:
        return [loaded["groups"][name]]
    return list(loaded["tasks"].values())  # a task, or the tasks of a tag


def _load_model_and_tokenizer(model: Any, tokenizer: Any, device: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = None
    if isinstance(model, (str, Path)):
        source = str(model)
        dtype = torch.float32 if str(device).startswith("cpu") else "auto"
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        except (OSError, ValueError) as err:
            raise RuntimeError(
                f"cannot load model {source!r}: {err}. Give a checkpoint folder, or a hub name "
                "that is in the local cache when offline (HF_HUB_OFFLINE=1)."
            ) from err
    model = model.to(device)

    if tokenizer is None:
        source = (
            source or getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
        )
        if not source:
            raise ValueError("evaluate(): pass `tokenizer` (the model has no folder to load one from)")
        tokenizer = source
    if isinstance(tokenizer, (str, Path)):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        except (OSError, ValueError) as err:
            raise RuntimeError(f"cannot load tokenizer from {str(tokenizer)!r}: {err}") from err
    return model, tokenizer


def _jsonable(obj: Any, fallback: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v, fallback) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, fallback) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return fallback(obj)
