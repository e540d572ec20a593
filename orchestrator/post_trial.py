"""After a trial: merge its adapter into the base, run lm-eval on the merged model, record the scores.

    out = merge_and_evaluate(result.final_dir, trial_dir, cfg.eval)          # in this process
    out = run_post_trial(result.final_dir, trial_dir, cfg.eval,              # as its own Ray task
                         resources={"num_cpus": 1, "num_gpus": 1})
    out["metrics"]   # {"eval/tt_next/acc": 0.61, ..., "eval/score": 0.58}
    out["error"]     # None, or "evaluation failed: ValueError: unknown evaluation task 'x' ..."

A failure (merge or evaluation: unknown task, dataset not available offline, out of memory) is
returned in ``out["error"]`` and written to ``eval.json``, never swallowed: the caller records it on
the trial's MLflow run. ``strict=True`` raises :class:`PostTrialError` instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokentune.config import EvalConfig

log = logging.getLogger(__name__)

SCORE_KEY = "eval/score"
PRUNE_POLICIES = ("none", "best", "all")


class PostTrialError(RuntimeError):
    """Merge or evaluation of a trial failed (raised with ``strict=True``)."""


def as_eval_config(eval_cfg: EvalConfig | Mapping[str, Any] | None) -> EvalConfig:
    if eval_cfg is None:
        return EvalConfig()
    if isinstance(eval_cfg, EvalConfig):
        return eval_cfg
    from tokentune.config import build_section

    return build_section("eval", EvalConfig, dict(eval_cfg))


def score_of(summary: Mapping[str, Any]) -> float | None:
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


def is_checkpoint_complete(path: Path) -> bool:
    return (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin")))


def export_for_eval(final_dir: Path, trial_dir: Path) -> tuple[Path, bool]:
    """The folder to evaluate and whether we made it: an adapter is merged into ``trial_dir/merged``
    (written to ``merged.tmp`` and renamed, so a killed merge never looks complete); a full
    checkpoint is evaluated where it is."""
    from tokentune.merge import export_checkpoint

    if not (final_dir / "adapter_config.json").is_file():
        if not (final_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"{str(final_dir)!r} is neither a peft adapter (adapter_config.json) nor an HF checkpoint"
                " (config.json)"
            )
        return final_dir, False
    merged = trial_dir / "merged"
    adapter_mtime = max(p.stat().st_mtime for p in final_dir.iterdir())
    if is_checkpoint_complete(merged) and (merged / "config.json").stat().st_mtime >= adapter_mtime:
        return merged, True  # merged from this adapter before (a resumed post-trial step)
    tmp = trial_dir / "merged.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    export_checkpoint(final_dir, tmp)
    shutil.rmtree(merged, ignore_errors=True)
    os.replace(tmp, merged)
    return merged, True


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    try:
        from lm_eval.utils import handle_non_serializable
    except ImportError:  # pragma: no cover - lm-eval is a dependency
        handle_non_serializable = str
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=handle_non_serializable) + "\n")
    os.replace(tmp, path)


def _cached(eval_json: Path, eval_cfg: EvalConfig, final_dir: Path) -> dict[str, Any] | None:
    if not eval_json.is_file():
        return None
    try:
        old = json.loads(eval_json.read_text())
    except (OSError, ValueError):
        return None
    same = old.get("eval_config") == dataclasses.asdict(eval_cfg) and old.get("final_dir") == str(final_dir)
    if not same or old.get("error") or not old.get("metrics"):
        return None
    return old


def merge_and_evaluate(
    final_dir: str | Path,
    trial_dir: str | Path,
    eval_cfg: EvalConfig | Mapping[str, Any] | None = None,
    keep_merged: bool = True,
    device: str = "cpu",
    reuse: bool = True,
    strict: bool = False,
) -> dict[str, Any]:
    """Merge ``final_dir`` (adapter or full checkpoint), run lm-eval, write ``trial_dir/eval.json``.

    Args:
        final_dir: the trial's ``final/`` folder (a peft adapter, or a full HF checkpoint that is
            evaluated in place).
        trial_dir: the trial's folder; gets ``merged/`` (adapters) and ``eval.json``.
        eval_cfg: tasks, num_fewshot, limit, batch_size (an ``EvalConfig`` or its dict).
        keep_merged: False deletes ``merged/`` after evaluation.
        device: where the model is evaluated ("cpu", "cuda", "cuda:0").
        reuse: return an existing successful ``eval.json`` made with the same config (resume).
        strict: raise :class:`PostTrialError` instead of returning the error.

    Returns:
        ``{"metrics": {"eval/<task>/<metric>": float, ..., "eval/score": float, "eval/wall_s": float},
        "results": {task: {metric: value}}, "merged_dir": str | None, "eval_json": str,
        "error": None | str}``.
    """
    final_dir, trial_dir = Path(final_dir).resolve(), Path(trial_dir).resolve()
    trial_dir.mkdir(parents=True, exist_ok=True)
    eval_json = trial_dir / "eval.json"
    cfg = as_eval_config(eval_cfg)
    if reuse and (old := _cached(eval_json, cfg, final_dir)) is not None:
        log.info("post-trial: reusing %s", eval_json)
        return {k: old.get(k) for k in ("metrics", "results", "merged_dir", "eval_json", "error")}

    out: dict[str, Any] = {
        "metrics": {},
        "results": {},
        "merged_dir": None,
        "eval_json": str(eval_json),
        "error": None,
        "final_dir": str(final_dir),
        "eval_config": dataclasses.asdict(cfg),
        "raw": None,
    }
    t0 = time.perf_counter()
    stage = "merge"
    made = False
    target: Path | None = None
    try:
        target, made = export_for_eval(final_dir, trial_dir)
        out["merged_dir"] = str(target)
        out["metrics"]["merge_s"] = time.perf_counter() - t0
        stage = "evaluation"
        t1 = time.perf_counter()
        from tokentune.evaluate import evaluate

        summary = evaluate(
            str(target),
            tasks=cfg.tasks,
            num_fewshot=cfg.num_fewshot,
            limit=cfg.limit,
            batch_size=cfg.batch_size,
            device=device,
        )
        out["results"] = summary["results"]
        out["raw"] = summary.get("raw")
        out["metrics"].update(summary["metrics"])
        score = score_of(summary)
        if score is not None:
            out["metrics"][SCORE_KEY] = score
        out["metrics"]["eval/wall_s"] = time.perf_counter() - t1
    except Exception as err:
        out["error"] = f"{stage} failed: {type(err).__name__}: {err}"
        out["traceback"] = traceback.format_exc()
        log.error("post-trial %s for %s: %s", stage, final_dir, out["error"])
    finally:
        if made and not keep_merged and target is not None:
            shutil.rmtree(target, ignore_errors=True)
            out["merged_dir"] = None
    out["wall_s"] = time.perf_counter() - t0
    _write_json(eval_json, out)
    if strict and out["error"]:
        raise PostTrialError(out["error"])
    return {k: out[k] for k in ("metrics", "results", "merged_dir", "eval_json", "error")}


# ------------------------------------------------------------------------------------ Ray task
def post_trial_options(
    resources: Mapping[str, Any] | None = None, escape_placement_group: bool = True
) -> dict:
    """Ray task options (valid for ``.options()``) from ``{"num_cpus": .., "num_gpus": .., ...}``.

    The task is never retried (a failure is a result to record, not a reason to evaluate twice). By
    default it is scheduled outside the calling trial's placement group, so the trial's slot is not
    needed. ``max_calls`` is not in here (Ray accepts it only in ``ray.remote``): use
    :func:`as_ray_task`, which adds ``max_calls=1`` on GPU.
    """
    resources = dict(resources or {})
    opts: dict[str, Any] = {
        "num_cpus": float(resources.pop("num_cpus", 1)),
        "num_gpus": float(resources.pop("num_gpus", 0) or 0),
        "max_retries": 0,
    }
    if "memory" in resources:
        opts["memory"] = resources.pop("memory")
    if resources:  # custom resources, e.g. {"accelerator_type:A100": 0.01}
        opts["resources"] = resources
    if escape_placement_group:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement_group=None)
    return opts


def as_ray_task(
    fn: Any, resources: Mapping[str, Any] | None = None, escape_placement_group: bool = True
) -> Any:
    """``fn`` as a Ray remote function with :func:`post_trial_options`; on GPU its worker runs one
    call and exits (``max_calls=1``), which frees the GPU memory the model held.

        ray.get(as_ray_task(export_for_eval, {"num_gpus": 1}).remote(final_dir, trial_dir))
    """
    import ray

    opts = post_trial_options(resources, escape_placement_group)
    return ray.remote(max_calls=1 if opts["num_gpus"] > 0 else 0)(fn).options(**opts)


def submit_post_trial(
    final_dir: str | Path,
    trial_dir: str | Path,
    eval_cfg: EvalConfig | Mapping[str, Any] | None = None,
    keep_merged: bool = True,
    resources: Mapping[str, Any] | None = None,
    device: str | None = None,
    escape_placement_group: bool = True,
) -> Any:
    """Start :func:`merge_and_evaluate` as a Ray task; returns its ``ObjectRef``."""
    if device is None:
        device = "cuda" if float((resources or {}).get("num_gpus") or 0) > 0 else "cpu"
    cfg = dataclasses.asdict(as_eval_config(eval_cfg))
    task = as_ray_task(merge_and_evaluate, resources, escape_placement_group)
    return task.remote(
        str(Path(final_dir).resolve()), str(Path(trial_dir).resolve()), cfg, keep_merged, device
    )


def run_post_trial(
    final_dir: str | Path,
    trial_dir: str | Path,
    eval_cfg: EvalConfig | Mapping[str, Any] | None = None,
    keep_merged: bool = True,
    resources: Mapping[str, Any] | None = None,
    device: str | None = None,
    timeout_s: float | None = None,
    escape_placement_group: bool = True,
) -> dict[str, Any]:
    """Run :func:`merge_and_evaluate` as its own Ray task and wait for it.

    ``resources``: ``{"num_cpus": 1, "num_gpus": 0}`` by default (plus ``memory`` or custom
    resources). ``device`` defaults to "cuda" when a GPU is requested, else "cpu". A task that dies
    (worker crash, out of memory, timeout) comes back as a result with ``error`` set.
    """
    import ray

    ref = submit_post_trial(
        final_dir, trial_dir, eval_cfg, keep_merged, resources, device, escape_placement_group
    )
    try:
        return ray.get(ref, timeout=timeout_s)
    except Exception as err:  # RayTaskError, WorkerCrashedError, GetTimeoutError, OutOfMemoryError ...
        if isinstance(err, ray.exceptions.GetTimeoutError):
            ray.cancel(ref, force=True)
        msg = f"post-trial task failed: {type(err).__name__}: {err}"
        log.error(msg)
        return {
            "metrics": {},
            "results": {},
            "merged_dir": None,
            "eval_json": str(Path(trial_dir).resolve() / "eval.json"),
            "error": msg,
        }


# ---------------------------------------------------------------------------------- pruning
def prune_merged(sweep_dir: str | Path, best_trial_id: str | None, policy: str = "best") -> list[Path]:
    """Delete ``<sweep_dir>/trials/*/merged`` per ``policy``; returns the deleted folders.

    ``none`` keeps every merged checkpoint, ``best`` keeps only ``best_trial_id``'s, ``all`` deletes
    them all (adapters in ``final/`` always stay: a merge can be redone).
    """
    if policy not in PRUNE_POLICIES:
        raise ValueError(
            f"keep-merged policy {policy!r} is invalid: expected one of {', '.join(PRUNE_POLICIES)}"
        )
    if policy == "none":
        return []
    deleted = []
    trials = Path(sweep_dir) / "trials"
    for merged in sorted(trials.glob("*/merged*")):
        if merged.name not in ("merged", "merged.tmp") or merged.is_symlink() or not merged.is_dir():
            continue
        if policy == "best" and merged.parent.name == str(best_trial_id) and merged.name == "merged":
            continue
        shutil.rmtree(merged)
        deleted.append(merged)
    return deleted
