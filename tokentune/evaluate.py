"""lm-eval on a checkpoint: the shipped offline tasks plus any lm-eval task name.

    result = evaluate("runs/t1/merged")                       # shipped ``tokentune_mini`` group
    result = evaluate(model, tokenizer, tasks=["tt_category", "arc_challenge:25"], limit=50)
    result["metrics"]  # {"eval/tt_category/acc": 0.91, ...}
    result = evaluate_checkpoint("runs/t1/final", tasks="tt_next")  # an adapter: merged first
    result["score"]    # the mean task accuracy, also result["metrics"]["eval/score"]

``evaluate_checkpoint`` (merge an adapter with ``prepare_checkpoint``, evaluate, score) is the one
merge-then-evaluate path: ``tokentune eval`` calls it, and the sweep's after-trial step
(``orchestrator.run.post_trial``) runs the same two steps as a Ray task.

A task is a shipped name (see ``shipped_tasks()``), any lm-eval task/group/tag name, the path of an
lm-eval task YAML (``tokentune.task_files``: its folder is indexed, as lm-eval's ``--include_path``), or
``name:fewshot``. Only when a non-shipped name is asked for does lm-eval index its ~14k built-in
tasks (~15 s); a built-in task whose dataset is unavailable offline raises ``RuntimeError``.

The shipped ``*_chat`` tasks (group ``tokentune_mini_chat``) ask their documents as a chat turn: they
are evaluated with lm-eval's ``apply_chat_template`` (the checkpoint tokenizer's chat template), which
``apply_chat_template=None`` (auto) turns on exactly when the tasks are chat tasks.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tokentune.assets import DEFAULT_TASKS, default_tasks_dir
from tokentune.task_files import folder_tasks, resolve_task_files
from tokentune.task_files import read_task_yaml as _read_yaml

log = logging.getLogger(__name__)

SCORE_KEY = "eval/score"
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


def _chat_tasks(names: list[str], shipped: list[str]) -> bool:
    """True when every task is a shipped chat task, False when none is; a mix is an error."""
    chat = [n for n in names if n in shipped and n.endswith("_chat")]
    if chat and len(chat) != len(names):
        raise ValueError(
            f"tasks {', '.join(chat)} are chat tasks (evaluated with the chat template) and "
            f"{', '.join(n for n in names if n not in chat)} are not: evaluate them in separate runs"
        )
    return bool(chat)


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
    apply_chat_template: bool | None = None,
) -> dict[str, Any]:
    """Run lm-eval tasks on a causal LM and return flat metrics.

    Args:
        model: path to an HF checkpoint folder (or hub name, if cached) or a loaded ``PreTrainedModel``.
        tokenizer: a tokenizer or its path; default: the model's folder.
        tasks: task names (``"name"`` or ``"name:fewshot"``), a list or a comma-separated string;
            default: the shipped ``tokentune_mini`` group.
        num_fewshot: shots for tasks without a ``:fewshot`` suffix (None: the task's default).
        limit: documents per task (int) or fraction (float < 1); None: all.
        batch_size: lm-eval batch size.
        device: where a model loaded from a path is placed (a passed model is moved there too).
        seed: seeds lm-eval's python/numpy/torch/few-shot randomness.
        apply_chat_template: prompts rendered with the chat template; None: for the ``*_chat`` tasks.

    Returns:
        ``{"results": {task: {metric: value}}, "metrics": {"eval/<task>/<metric>": value}, "raw": ...}``
        (raw: lm-eval's results, JSON-serialisable). Group rows (``tokentune_mini``) carry their tasks' mean.
    """
    from lm_eval.tasks import TaskManager

    specs, folders = resolve_task_files([parse_task_spec(s) for s in _as_list(tasks)])  # task files: names
    shipped, from_files = shipped_tasks(), folder_tasks(tuple(folders))
    names = [name for name, _ in specs]
    _check_names([n for n in names if n not in from_files], shipped)
    needs_defaults = any(name not in shipped and name not in from_files for name in names)
    chat = _chat_tasks(names, shipped) if apply_chat_template is None else apply_chat_template

    model_obj, tok = _load_model_and_tokenizer(model, tokenizer, device)
    was_training = model_obj.training
    model_obj.eval()
    try:
        # The shipped YAMLs load their documents relative to their own folder (tasks/tt_data.py).
        paths = [str(default_tasks_dir()), *folders]  # task files' folders, as lm-eval's --include_path
        manager = TaskManager(include_path=paths, include_defaults=needs_defaults)
        _check_names_indexed(names, manager, shipped)
        loaded = [t for name, shots in specs for t in _load_task(manager, name, shots, num_fewshot)]
        raw = _simple_evaluate(model_obj, tok, loaded, manager, limit, batch_size, seed, chat)
    finally:
        model_obj.train(was_training)
    if raw is None:  # non-zero rank in a distributed run
        return {"results": {}, "metrics": {}, "raw": {}}
    return summarize(raw)


def _simple_evaluate(
    model: Any,
    tokenizer: Any,
    tasks: list[Any],
    manager: Any,
    limit: int | float | None,
    batch_size: int,
    seed: int,
    chat: bool = False,
) -> dict[str, Any] | None:
    """``lm_eval.simple_evaluate`` on the loaded ``tasks`` (few-shot counts set per task), seeded; ``chat``:
    prompts rendered with the tokenizer's chat template."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    return lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
        tasks=tasks,
        task_manager=manager,
        num_fewshot=None,  # set per task in _load_task
        limit=limit,
        bootstrap_iters=0,
        log_samples=False,
        apply_chat_template=chat,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )


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


def score_of(summary: dict[str, Any]) -> float | None:
    """Mean ``acc`` over the evaluated tasks (group rows left out: they are means themselves)."""
    raw = summary.get("raw") or {}
    groups = set(raw.get("groups") or {}) | {
        g for g, subs in (raw.get("group_subtasks") or {}).items() if subs
    }
    results = summary.get("results") or {}
    accs = [m["acc"] for task, m in results.items() if task not in groups and "acc" in m]
    if not accs:  # only groups reported accuracy
        accs = [m["acc"] for m in results.values() if "acc" in m]
    return sum(accs) / len(accs) if accs else None


def metrics_table(results: dict[str, dict[str, float]], score: float | None = None) -> str:
    """``task  metric  value`` lines, fixed width, with the mean accuracy last."""
    rows = [(task, metric, f"{value:.4f}") for task, ms in results.items() for metric, value in ms.items()]
    if score is not None:
        rows.append(("(mean acc)", SCORE_KEY, f"{score:.4f}"))
    if not rows:
        return "(no metrics)"
    header = ("task", "metric", "value")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ a checkpoint folder
def is_adapter(checkpoint: str | Path) -> bool:
    """A peft adapter folder (``adapter_config.json``), as opposed to a full HF checkpoint."""
    return (Path(checkpoint) / "adapter_config.json").is_file()


def prepare_checkpoint(
    checkpoint: str | Path,
    merged_dir: str | Path | None,
    base: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
) -> tuple[Path, bool]:
    """The HF checkpoint folder to evaluate, and whether it is a merge made for it.

    A full checkpoint (``config.json``) is evaluated where it is. A peft adapter is merged into its base
    (``base``, default: the one recorded in the adapter; loaded in ``dtype`` on ``device``) at
    ``merged_dir``: written to ``<merged_dir>.tmp`` and renamed, so a killed merge never looks complete; a complete merge newer than the adapter is
    reused (a resumed after-trial step).
    """
    ckpt = Path(checkpoint)
    if not is_adapter(ckpt):
        if not (ckpt / "config.json").is_file():
            raise FileNotFoundError(
                f"checkpoint {str(ckpt)!r} has neither config.json (HF model) nor adapter_config.json "
                "(peft adapter)"
            )
        return ckpt, False
    if merged_dir is None:
        raise ValueError(f"checkpoint {str(ckpt)!r} is an adapter: give a folder to merge it into")
    from tokentune.merge import merge_adapter

    merged = Path(merged_dir)
    adapter_mtime = max(p.stat().st_mtime for p in ckpt.iterdir())
    if _is_complete(merged) and (merged / "config.json").stat().st_mtime >= adapter_mtime:
        return merged, True
    tmp = merged.with_name(merged.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merge_adapter(ckpt, tmp, base=base, dtype=dtype, device=device)
    shutil.rmtree(merged, ignore_errors=True)
    os.replace(tmp, merged)
    return merged, True


def evaluate_checkpoint(
    checkpoint: str | Path,
    tasks: list[str] | str | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    base: str | None = None,
    merged_dir: str | Path | None = None,
) -> dict[str, Any]:
    """:func:`evaluate` a checkpoint folder and score it: a full checkpoint in place, an adapter merged
    first (into ``merged_dir``, else a temporary folder deleted afterwards; see :func:`prepare_checkpoint`).

    Returns :func:`evaluate`'s summary plus ``"score"`` (:func:`score_of`, also in
    ``metrics["eval/score"]`` when there is one).
    """
    if merged_dir is None and is_adapter(checkpoint):
        with tempfile.TemporaryDirectory(prefix="tokentune-merged-") as tmp:
            return evaluate_checkpoint(
                checkpoint, tasks, num_fewshot, limit, batch_size, device, base, Path(tmp) / "merged"
            )
    target, _ = prepare_checkpoint(checkpoint, merged_dir, base)
    summary = evaluate(
        str(target), tasks=tasks, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, device=device
    )
    summary["score"] = score_of(summary)
    if summary["score"] is not None:
        summary["metrics"][SCORE_KEY] = summary["score"]
    return summary


# ----------------------------------------------------------------------------------------- helpers
def _is_complete(path: Path) -> bool:
    return (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin")))


def _as_list(tasks: list[str] | str | None) -> list[str]:
    if tasks is None:
        return list(DEFAULT_TASKS)
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    names = [t.strip() for t in tasks if t and t.strip()]
    if not names:
        raise ValueError(f"no evaluation tasks given (tasks={tasks!r})")
    return names


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
