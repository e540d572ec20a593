"""After a trial: merge its adapter into the base, optionally run lm-eval on it, record the scores.

    out = merge_and_evaluate(result.final_dir, trial_dir, cfg.eval)          # in this process
    out = run_post_trial(result.final_dir, trial_dir, cfg.eval,              # as its own Ray task
                         resources={"num_cpus": 1, "num_gpus": 1})
    out = run_post_trial(result.final_dir, trial_dir, evaluate=False)        # merge only
    out["metrics"]   # {"merge_s": 3.1, "eval/tt_next/acc": 0.61, ..., "eval/score": 0.58}
    out["error"]     # None, or "evaluation failed: ValueError: unknown evaluation task 'x' ..."

The merge and the scored evaluation are ``tokentune.evaluate``'s ``prepare_checkpoint`` and
``evaluate_checkpoint`` (what ``tokentune eval`` runs, without Ray); this module adds the trial's
folder layout (``merged/``, ``eval.json``), reuse on resume, error capture and the Ray task. A failure
(merge or evaluation: unknown task, dataset not available offline, out of memory) is returned in
``out["error"]`` (and, when evaluating, written to ``eval.json``), never swallowed: the caller records
it on the trial's MLflow run. ``strict=True`` raises :class:`PostTrialError` instead. Errors,
tracebacks and ``eval.json`` pass through ``tokentune.redact`` (no token or key is stored).

``run_post_trial(..., timeout_s=N)`` (``after_trial.timeout_s``) waits for the task to start (queued for
a GPU or CPUs: not timed), N seconds for merge + eval (``started_then``), then cancels it and returns
the error ``merge+eval timed out after N s (after_trial.timeout_s)``: that trial fails, the sweep goes on.
A sweep's CPU merges and evaluations run on its warm workers instead (``orchestrator.run.post_pool``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from orchestrator.results.trial_status import log_event
from orchestrator.run.keep_merged import folder_gb
from orchestrator.spec.sections import KEEP_MERGED
from tokentune.config import EvalConfig
from tokentune.files import write_json_atomic
from tokentune.redact import redact, redact_text
from tokentune.settings import build_section

log = logging.getLogger(__name__)

_RESULT_KEYS = ("metrics", "results", "merged_dir", "eval_json", "error")


class PostTrialError(RuntimeError):
    """Merge or evaluation of a trial failed (raised with ``strict=True``)."""


def as_eval_config(eval_cfg: EvalConfig | Mapping[str, Any] | None) -> EvalConfig:
    """An ``EvalConfig`` from itself, its dict (a caller's shorthand) or None (the defaults)."""
    if isinstance(eval_cfg, EvalConfig):
        return eval_cfg
    return build_section("eval", EvalConfig, None if eval_cfg is None else dict(eval_cfg))


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    try:
        from lm_eval.utils import handle_non_serializable
    except ImportError:  # pragma: no cover - lm-eval is a dependency
        handle_non_serializable = str
    write_json_atomic(path, redact(data), default=handle_non_serializable)


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
    *,
    evaluate: bool = True,
    keep_merged: bool = True,
    device: str = "cpu",
    dtype: str = "float32",
    reuse: bool = True,
    strict: bool = False,
) -> dict[str, Any]:
    """Merge ``final_dir`` into ``trial_dir/merged`` and (``evaluate``) run lm-eval on it.

    Args:
        final_dir: the trial's ``final/`` folder (a peft adapter, or a full HF checkpoint that is
            evaluated in place).
        trial_dir: the trial's folder; gets ``merged/`` (adapters) and, when evaluating, ``eval.json``.
        eval_cfg: tasks, num_fewshot, limit, batch_size (an ``EvalConfig`` or its dict).
        evaluate: False merges only (``after_trial.action: merge``).
        keep_merged: False deletes ``merged/`` after evaluation.
        device, dtype: where ("cpu", "cuda", "cuda:0") and in what the base is merged and evaluated.
        reuse: return an existing successful ``eval.json`` made with the same config (resume).
        strict: raise :class:`PostTrialError` instead of returning the error.

    Returns:
        ``{"metrics": {"merge_s": float, "eval/<task>/<metric>": float, ..., "eval/score": float,
        "eval/wall_s": float, "disk/merged_gb": float}, "results": {task: {metric: value}},
        "merged_dir": str | None, "eval_json": str | None, "error": None | str}``.
    """
    final_dir, trial_dir = Path(final_dir).resolve(), Path(trial_dir).resolve()
    trial_dir.mkdir(parents=True, exist_ok=True)
    eval_json = trial_dir / "eval.json"
    cfg = as_eval_config(eval_cfg)
    if evaluate and reuse and (old := _cached(eval_json, cfg, final_dir)) is not None:
        log.info("post-trial: reusing %s", eval_json)
        return _result_keys(old)

    out = _new_result(final_dir, eval_json if evaluate else None, cfg)
    t0 = time.perf_counter()
    stage, made, target = "merge", False, None  # what the finally block needs to clean up
    try:
        target, made = _merge_into(out, final_dir, trial_dir, dtype, device)
        if evaluate:
            stage = "evaluation"
            _evaluate_into(out, target, trial_dir, cfg, device)
    except Exception as err:
        out["error"] = redact_text(f"{stage} failed: {type(err).__name__}: {err}")
        out["traceback"] = redact_text(traceback.format_exc())
        log.error("post-trial %s for %s: %s", stage, final_dir, out["error"])
    finally:
        if made and evaluate and not keep_merged and target is not None:
            shutil.rmtree(target, ignore_errors=True)
            out["merged_dir"] = None
    out["wall_s"] = time.perf_counter() - t0
    if evaluate:
        _write_json(eval_json, out)
    if strict and out["error"]:
        raise PostTrialError(out["error"])
    return _result_keys(out)


def _new_result(final_dir: Path, eval_json: Path | None, cfg: EvalConfig) -> dict[str, Any]:
    """An empty result (what ``eval.json`` holds): no metrics, no error yet."""
    return {
        "metrics": {},
        "results": {},
        "merged_dir": None,
        "eval_json": None if eval_json is None else str(eval_json),
        "error": None,
        "final_dir": str(final_dir),
        "eval_config": dataclasses.asdict(cfg),
        "raw": None,
    }


def _merge_into(
    out: dict[str, Any], final_dir: Path, trial_dir: Path, dtype: str, device: str
) -> tuple[Path, bool]:
    """Merge (``trial_dir/merged``; a full checkpoint is used in place); the merged folder and whether
    it was made here, recorded in ``out`` (``disk/merged_gb``: what the merge put on disk)."""
    from tokentune.evaluate import prepare_checkpoint

    t0 = time.perf_counter()
    log_event(trial_dir, "merge_started")
    target, made = prepare_checkpoint(final_dir, trial_dir / "merged", dtype=dtype, device=device)
    log_event(trial_dir, "merge_finished")
    out["merged_dir"] = str(target)
    out["metrics"]["merge_s"] = time.perf_counter() - t0
    out["metrics"]["disk/merged_gb"] = folder_gb(target) if made else 0.0  # a full checkpoint: in place
    return target, made


def _evaluate_into(out: dict[str, Any], target: Path, trial_dir: Path, cfg: EvalConfig, device: str) -> None:
    """Run lm-eval on the merged ``target``; its results and metrics go into ``out``."""
    from tokentune.evaluate import evaluate_checkpoint

    log_event(trial_dir, "eval_started")
    t1 = time.perf_counter()
    summary = evaluate_checkpoint(
        target,
        tasks=cfg.tasks,
        num_fewshot=cfg.num_fewshot,
        limit=cfg.limit,
        batch_size=cfg.batch_size,
        device=device,
    )
    out["results"] = summary["results"]
    out["raw"] = summary.get("raw")
    out["metrics"].update(summary["metrics"])
    out["metrics"]["eval/wall_s"] = time.perf_counter() - t1
    log_event(trial_dir, "eval_finished")


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
    fn: Any,
    resources: Mapping[str, Any] | None = None,
    escape_placement_group: bool = True,
    streaming: bool = False,
) -> Any:
    """``fn`` as a Ray remote function with :func:`post_trial_options`; on GPU its worker runs one
    call and exits (``max_calls=1``), which frees the GPU memory the model held. ``streaming``: ``fn``
    is a generator; ``.remote()`` returns Ray's generator of its items.

        ray.get(as_ray_task(merge_and_evaluate, {"num_gpus": 1}).remote(final_dir, trial_dir))
    """
    import ray

    opts = post_trial_options(resources, escape_placement_group)
    if streaming:
        opts["num_returns"] = "streaming"
    return ray.remote(max_calls=1 if opts["num_gpus"] > 0 else 0)(fn).options(**opts)


STARTED = "started"  # the first item of a post-trial stream: merge + eval has its resources and runs


def started_then(
    fn: Any, *args: Any, dispatched: Mapping[str, Any] | None = None, **kwargs: Any
) -> Iterator[Any]:
    """Yield :data:`STARTED`, then ``fn(*args, **kwargs)``: the caller's timeout starts at the first item,
    so time queued for a GPU, CPUs or a warm worker does not count against ``after_trial.timeout_s``.
    First the trial folder (``args[1]``, :func:`merge_and_evaluate`'s ``trial_dir``) gets the event
    ``post-trial dispatched`` with ``dispatched`` (here, before ``merge_started``)."""
    log_event(Path(args[1]), "post-trial dispatched", **(dispatched or {}))
    yield STARTED
    yield fn(*args, **kwargs)


def run_post_trial(
    final_dir: str | Path,
    trial_dir: str | Path,
    eval_cfg: EvalConfig | Mapping[str, Any] | None = None,
    *,
    evaluate: bool = True,
    keep_merged: bool = True,
    resources: Mapping[str, Any] | None = None,
    device: str | None = None,
    dtype: str = "float32",
    timeout_s: float | None = None,
    escape_placement_group: bool = True,
) -> dict[str, Any]:
    """Run :func:`merge_and_evaluate` as its own Ray task and wait for it (``evaluate=False``: merge only).

    ``resources``: ``{"num_cpus": 1, "num_gpus": 0}`` by default (plus ``memory`` or custom
    resources). ``device`` defaults to "cuda" when a GPU is requested, else "cpu". (The sweep's warm CPU
    workers: ``orchestrator.run.post_pool``.) A task that dies (worker crash, out of memory) comes back
    as a result with ``error`` set; one still running ``timeout_s`` seconds after merge + eval started
    (None: no limit; time waiting for its resources is not counted) is cancelled and comes back with
    ``merge+eval timed out``. ``dtype``: the base's dtype for the merge.
    """
    import ray

    gpus = float((resources or {}).get("num_gpus") or 0)
    if device is None:
        device = "cuda" if gpus > 0 else "cpu"
    # the EvalConfig crosses to the task as the typed object, built and checked here
    args = (str(Path(final_dir).resolve()), str(Path(trial_dir).resolve()), as_eval_config(eval_cfg))
    kwargs = {"evaluate": evaluate, "keep_merged": keep_merged, "device": device, "dtype": dtype}
    log_event(Path(args[1]), "post-trial queued")  # for its resources, in Ray's queue
    try:
        task = as_ray_task(started_then, resources, escape_placement_group, streaming=True)
        stream = task.remote(merge_and_evaluate, *args, **kwargs)
        try:
            return result_after_start(stream, timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(stream, force=True)
            raise
    except Exception as err:  # RayTaskError, GetTimeoutError, OutOfMemoryError ...
        msg = failure_text(err, timeout_s)
    return failed_result(final_dir, trial_dir, eval_cfg, evaluate, msg)


def failed_result(
    final_dir: str | Path,
    trial_dir: str | Path,
    eval_cfg: EvalConfig | Mapping[str, Any] | None,
    evaluate: bool,
    msg: str,
) -> dict[str, Any]:
    """The result of a call that failed with ``msg`` outside :func:`merge_and_evaluate` (logged)."""
    log.error("post-trial of %s: %s", trial_dir, msg)
    eval_json = Path(trial_dir).resolve() / "eval.json" if evaluate else None
    return {**_result_keys(_new_result(Path(final_dir), eval_json, as_eval_config(eval_cfg))), "error": msg}


def result_after_start(stream: Any, timeout_s: float | None) -> Any:
    """The result a :func:`started_then` stream yields, waiting at most ``timeout_s`` after it started
    (raises Ray's ``GetTimeoutError``); waiting for it to start is not limited."""
    import ray

    started = ray.get(next(stream))  # raises the task's error if it failed before starting
    assert started == STARTED, started
    ready, _ = ray.wait([stream], timeout=timeout_s)
    if not ready:
        raise ray.exceptions.GetTimeoutError(f"merge + eval still running {timeout_s} s after it started")
    return ray.get(next(stream))


def _result_keys(out: Mapping[str, Any]) -> dict[str, Any]:
    return {k: out.get(k) for k in _RESULT_KEYS}


def failure_text(err: BaseException, timeout_s: float | None = None) -> str:
    """The one-line error of a post-trial call that raised ``err`` (redacted)."""
    import ray

    if isinstance(err, ray.exceptions.GetTimeoutError):
        return f"merge+eval timed out after {timeout_s:g} s (after_trial.timeout_s)"
    return redact_text(f"post-trial task failed: {type(err).__name__}: {err}")


# ---------------------------------------------------------------------------------- pruning
def prune_merged(sweep_dir: str | Path, best_trial_id: str | None, keep: str = "best") -> list[Path]:
    """Delete the ``<sweep_dir>/trials/*/merged`` checkpoints that ``keep`` (``after_trial.keep_merged``)
    does not keep; returns the deleted folders.

    ``all`` keeps every merged checkpoint, ``best`` only ``best_trial_id``'s, ``none`` deletes them all
    (adapters in ``final/`` always stay: a merge can be redone).
    """
    if keep not in KEEP_MERGED:
        raise ValueError(
            f"after_trial.keep_merged={keep!r} is invalid: expected one of {', '.join(KEEP_MERGED)}"
        )
    if keep == "all":
        return []
    deleted = []
    trials = Path(sweep_dir) / "trials"
    for merged in sorted(trials.glob("*/merged*")):
        if merged.name not in ("merged", "merged.tmp") or merged.is_symlink() or not merged.is_dir():
            continue
        if keep == "best" and merged.parent.name == str(best_trial_id) and merged.name == "merged":
            continue
        shutil.rmtree(merged)
        deleted.append(merged)
    return deleted
