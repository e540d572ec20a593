"""One training run as a Ray Train job: ``TorchTrainer`` workers calling ``tokentune.train.train``.

    init_ray()                                                        # local Ray, or RAY_ADDRESS
    res = run_train_job(cfg, name="run1", storage_path="/abs/ray")    # N workers, DeepSpeed ZeRO 0-3
    res.final_dir, res.metrics, res.error

The core knows nothing of Ray; what each worker runs is ``orchestrator.run.train_worker`` (it gets the
``RunConfig`` object itself). Re-running with the same ``name`` and ``storage_path`` resumes from the
latest checkpoint (Ray Train V2 restores a run from that folder); ``resume=False`` starts from scratch
under the same name. A finished run (its ``final`` checkpoint holds ``final/`` and ``done.json``) is
returned without starting any worker when it trained this config: the same config hash
(``tokentune.checkpoint.config_hash``, stored in ``done.json`` and in every checkpoint) and
``train.max_steps``. A stored run of another config is refused with ``ConfigError`` before any worker
starts (another ``name``, or ``resume=False`` to train it again). Ray Train callbacks go in
``callbacks`` (a Tune trial passes one that forwards every report to Tune).

``run_train_batch`` runs several small configs one after another in the same worker processes (one
start-up, one import of torch/transformers/deepspeed): for tests and benchmarks on tiny models.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.run.ray_cluster import (
    init_ray,
    orphaned_placement_groups_swept,
    set_train_poll_interval,
    worker_env,
)
from orchestrator.run.train_worker import (
    DS_ACCELERATOR,
    FINAL,
    HISTORY_FILE,
    import_deepspeed,
    read_history,
    train_batch_worker,
    train_worker,
)
from tokentune.checkpoint import config_hash
from tokentune.config import ConfigError, RunConfig

log = logging.getLogger(__name__)

#: Ray Train's list of a run's checkpoints, in ``<storage>/<name>``; rewritten in place at every report
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


@dataclass
class TrainJobResult:
    """What a Train job left: its metrics and history, the final folder, or why it failed."""

    metrics: dict[str, Any]  # the last reported metrics (rank 0; loss averaged over ranks)
    history: list[dict[str, Any]] = field(default_factory=list)  # reports of this launch, all attempts
    final_dir: str | None = None  # final adapter / HF model (gathered on rank 0), readable without DeepSpeed
    checkpoint: str | None = None  # latest checkpoint in storage (the "final" one once finished)
    error: BaseException | None = None  # why the run failed; None when it finished
    path: str | None = None  # the run's folder in storage: <storage_path>/<name>
    rank_digests: list[str] = field(default_factory=list)  # hash of each rank's trained weights


def check_launch(cfg: RunConfig, resources: dict[str, float] | None = None) -> bool:
    """Pre-launch checks, before any cluster resource is used; raises ``ConfigError``. Returns use_gpu.

    No method x ZeRO-stage combination is refused: every shipped combination trains under ZeRO-2 and
    ZeRO-3 on 2 CPU workers (gloo) with identical weights on every rank (tests/test_distributed.py),
    bf16 included.
    """
    c = cfg.compute
    resources = resources or {}
    if not Path(cfg.train.output_dir).is_absolute():
        raise ConfigError(
            f"train.output_dir={cfg.train.output_dir!r} must be absolute under Ray (workers change directory)"
        )
    use_gpu = c.wants_gpu(resources.get("GPU", 0) > 0)
    if c.zero_stage is not None:
        try:
            import_deepspeed()
        except Exception as e:  # noqa: BLE001 - any import failure is the same user-facing problem
            raise ConfigError(
                f"compute.zero_stage={c.zero_stage} needs DeepSpeed, which cannot be imported: {e}"
            ) from e
    if c.backend == "nccl" and not use_gpu:
        raise ConfigError("compute.backend='nccl' needs GPU workers (use_gpu is false): use 'gloo' or 'auto'")
    if c.backend == "gloo" and use_gpu:
        raise ConfigError(
            "compute.backend='gloo' with GPU workers (compute.use_gpu=auto and the Ray cluster has GPUs): "
            "use 'nccl' or 'auto' (gloo cannot run DeepSpeed's collectives on GPUs), or compute.use_gpu=false"
        )
    if resources:
        cpus = resources.get("CPU", 0)
        need = c.workers * c.cpus_per_worker
        if need > cpus:
            raise ConfigError(
                f"compute.workers={c.workers} x compute.cpus_per_worker={c.cpus_per_worker:g} needs {need:g} CPUs, "
                f"but the Ray cluster has {cpus:g}: lower compute.workers or compute.cpus_per_worker"
            )
        if use_gpu:
            gpus = resources.get("GPU", 0)
            if gpus <= 0:
                raise ConfigError("compute.use_gpu=true, but the Ray cluster has no GPU")
            if c.workers * c.gpus_per_worker > gpus:
                raise ConfigError(
                    f"compute.workers={c.workers} x compute.gpus_per_worker={c.gpus_per_worker:g} needs "
                    f"{c.workers * c.gpus_per_worker:g} GPUs, but the Ray cluster has {gpus:g}"
                )
    return use_gpu


def run_train_job(
    cfg: RunConfig,
    *,
    name: str,
    storage_path: str,
    resume: bool = True,
    callbacks: list[Any] | None = None,
    max_failures: int = 1,
    progress: bool = True,
    sweep_orphans: bool = True,
) -> TrainJobResult:
    """Train ``cfg`` on ``cfg.compute.workers`` Ray Train workers; see the module docstring.

    ``callbacks`` are Ray Train ``UserCallback`` objects (e.g. a ``TuneReportCallback`` inside a Tune
    trial). Configuration problems raise ``ConfigError`` before anything starts; a failure during
    training comes back in ``TrainJobResult.error`` (after ``max_failures`` restarts from the last
    checkpoint). ``sweep_orphans``: run the orphaned-placement-group sweeper during ``fit()``
    (False where a caller already runs one for the job, as a sweep's driver does around Tune).
    """
    (cfg,), storage, use_gpu = _prepare([cfg], storage_path)
    set_aside_unreadable_snapshot(storage, name)
    if resume:
        finished = _finished_run(storage, name, cfg)
        if finished is not None:
            return finished  # nothing to train: no worker is started
    launch = uuid.uuid4().hex
    loop_config = {
        "config": cfg,
        "use_gpu": use_gpu,
        "resume": resume,
        "launch_id": launch,
        "progress": progress,
    }
    trainer = _trainer(train_worker, loop_config, cfg, use_gpu, name, storage, max_failures, callbacks)
    result, error = _fit(trainer, sweep_orphans)
    return _job_result(result, error, storage, name, Path(cfg.train.output_dir), launch)


def run_train_batch(
    cfgs: list[RunConfig], *, name: str, storage_path: str, progress: bool = False
) -> list[TrainJobResult]:
    """Train several configs one after another in the same Ray Train workers (no checkpoints to Ray).

    All configs must share ``compute`` workers and resources. Start-up (worker processes, imports,
    the process group) is paid once, which dominates small runs. A failing config fails the job: the
    error is in every result. Returns one result per config, in order.
    """
    cfgs, storage, use_gpu = _prepare(cfgs, storage_path)
    shape = {
        (c.compute.workers, c.compute.cpus_per_worker, c.compute.gpus_per_worker, c.compute.backend)
        for c in cfgs
    }
    if len(shape) != 1:
        raise ConfigError("run_train_batch: every config needs the same compute.workers/cpus/gpus/backend")
    loop_config = {"configs": cfgs, "use_gpu": use_gpu, "progress": progress}
    result, error = _fit(_trainer(train_batch_worker, loop_config, cfgs[0], use_gpu, name, storage, 0))
    runs = (getattr(result, "return_value", None) or []) if result is not None else []
    out = []
    for i, _ in enumerate(cfgs):
        r = runs[i] if i < len(runs) else {}
        out.append(
            TrainJobResult(
                metrics=dict(r.get("metrics") or {}),
                history=list(r.get("history") or []),
                final_dir=r.get("final_dir"),
                error=error,
                path=f"{storage.rstrip('/')}/{name}",
                rank_digests=list(r.get("rank_digests") or []),
            )
        )
    return out


def set_aside_unreadable_snapshot(storage: str, name: str) -> Path | None:
    """Rename an unreadable Ray Train checkpoint list of run ``name`` to ``<file>.corrupt-<time>``.

    Ray Train truncates and rewrites that file at every checkpoint; a full disk (or a kill mid-write)
    leaves it empty or cut, and every later start of the run then fails in Ray Train's controller
    (``CheckpointManagerInitializationError``), so the trial could never finish. Set aside, the run
    starts over from step 0 (its checkpoint folders stay on disk). Local storage only. Returns the
    new name, or None when the file is readable or missing.
    """
    if "://" in storage:
        return None
    path = Path(storage, name, RAY_SNAPSHOT)
    try:
        json.loads(path.read_text())
        return None
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        bad = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        os.replace(path, bad)
        log.warning("%s is unreadable (%s): set aside as %s; run %r starts over", path, err, bad.name, name)
        return bad


def _finished_run(storage: str, name: str, cfg: RunConfig) -> TrainJobResult | None:
    """The result of a run under ``(storage, name)`` that already finished ``cfg`` (same config hash and
    ``max_steps``), else None (nothing stored, or a checkpoint the workers resume from). A stored run of
    another config raises ``ConfigError``: resuming or returning it would pass it off as this one."""
    import ray.train

    path = f"{storage.rstrip('/')}/{name}"
    if "://" not in storage and not Path(path).is_dir():
        return None
    try:
        result = ray.train.Result.from_path(path)
    except Exception:  # noqa: BLE001 - no (complete) run there: train
        return None
    ckpt = result.checkpoint
    if ckpt is None:
        return None
    done = state = None
    if Path(ckpt.path).name == FINAL:
        with ckpt.as_directory() as d:
            done = _json(Path(d) / "done.json")
    elif "://" not in storage:  # a mid-run checkpoint (elsewhere only the workers read it: load_checkpoint)
        state = _json(Path(ckpt.path, "state.json"))
    mine = config_hash(cfg)
    stored = (done or state or {}).get("config_hash")
    if stored is not None and stored != mine:
        raise ConfigError(
            f"the Ray Train run {path} holds checkpoint {Path(ckpt.path).name} of another config (config hash "
            f"{stored}; this config's {mine}): give this run another name (train.output_dir), or resume=False "
            "to train it again from scratch"
        )
    if not done or Path(ckpt.path).name != FINAL:
        return None  # a mid-run checkpoint: the workers resume it
    if done.get("config_hash") != mine or done.get("max_steps") != cfg.train.max_steps:
        raise ConfigError(
            f"the Ray Train run {path} already finished {done.get('max_steps')} steps (config hash "
            f"{done.get('config_hash')}); this config asks for {cfg.train.max_steps} steps (config hash {mine}): "
            "give this run another name (train.output_dir), or resume=False to train it again from scratch"
        )
    local = "://" not in storage and Path(ckpt.path, FINAL).is_dir()
    return TrainJobResult(
        metrics={**(result.metrics or {}), **done.get("metrics", {})},
        history=[done.get("metrics", {})],
        final_dir=str(Path(ckpt.path, FINAL)) if local else done.get("final_dir"),
        checkpoint=ckpt.path,
        path=path,
        rank_digests=list(done.get("rank_digests") or []),
    )


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _prepare(cfgs: list[RunConfig], storage_path: str) -> tuple[list[RunConfig], str, bool]:
    """Private copies with absolute output dirs, absolute storage, Ray up, pre-launch checks passed."""
    import ray

    if not cfgs:
        raise ConfigError("no training config given")
    cfgs = [c.copy() for c in cfgs]
    for c in cfgs:
        c.train.output_dir = str(Path(c.train.output_dir).expanduser().resolve())
    storage = str(storage_path)
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    if not ray.is_initialized():
        init_ray()
    resources = dict(ray.cluster_resources())
    use_gpu = {check_launch(c, resources) for c in cfgs}
    if len(use_gpu) != 1:
        raise ConfigError("configs of one job must agree on compute.use_gpu")
    return cfgs, storage, use_gpu.pop()


def _trainer(fn, loop_config, cfg: RunConfig, use_gpu: bool, name, storage, max_failures, callbacks=None):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    c = cfg.compute
    backend = c.backend if c.backend != "auto" else ("nccl" if use_gpu else "gloo")
    resources = {"CPU": c.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = c.gpus_per_worker
    set_train_poll_interval()  # the controller polls reports every 0.2 s, not 2 s
    return TorchTrainer(
        fn,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=c.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend=backend),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            # the latest mid-run checkpoint + "final"; older ones are deleted from storage
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=max(2, cfg.train.keep_checkpoints)),
            callbacks=list(callbacks or []),
            worker_runtime_env={"env_vars": train_worker_env(use_gpu)},
        ),
    )


def train_worker_env(use_gpu: bool) -> dict[str, str]:
    """The environment of this job's workers: ``worker_env()``, without a ``DS_ACCELERATOR=cpu`` of this
    process when the workers have GPUs (each worker also decides it: ``set_deepspeed_accelerator``)."""
    env = worker_env()
    if use_gpu and env.get(DS_ACCELERATOR, "").strip().lower() == "cpu":
        del env[DS_ACCELERATOR]
    return env


def _fit(trainer, sweep_orphans: bool = True) -> tuple[Any, BaseException | None]:
    """``trainer.fit()``, with the orphaned-placement-group sweeper on unless ``sweep_orphans`` is
    False; a failure is returned, not raised."""
    with orphaned_placement_groups_swept() if sweep_orphans else contextlib.nullcontext():
        try:
            return trainer.fit(), None
        except Exception as e:  # noqa: BLE001 - a failed run is returned, not raised
            return None, e


def _job_result(result, error, storage: str, name: str, out_dir: Path, launch: str) -> TrainJobResult:
    ret = (getattr(result, "return_value", None) or {}) if result is not None else {}
    ckpt = getattr(result, "checkpoint", None) if result is not None else None
    ckpt_path = ckpt.path if ckpt is not None else None
    final_dir = ret.get("final_dir")
    if ckpt_path and "://" not in storage and Path(ckpt_path, FINAL).is_dir():
        final_dir = str(Path(ckpt_path, FINAL))  # the persisted copy: readable wherever storage is
    history = ret.get("history") or read_history(out_dir / HISTORY_FILE, launch)
    metrics = dict(getattr(result, "metrics", None) or {}) if result is not None else {}
    if history:
        metrics = {**metrics, **{k: v for k, v in history[-1].items() if k not in ("launch", "attempt")}}
    if result is not None and getattr(result, "error", None) is not None:
        error = error or result.error
    return TrainJobResult(
        metrics=metrics,
        history=history,
        final_dir=final_dir if error is None else None,
        checkpoint=ckpt_path,
        error=error,
        path=str(getattr(result, "path", "") or f"{storage.rstrip('/')}/{name}"),
        rank_digests=list(ret.get("rank_digests") or []),
    )
