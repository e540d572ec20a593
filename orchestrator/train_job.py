"""One training run as a Ray Train job: ``TorchTrainer`` workers calling ``tokentune.train.train``.

    init_ray()                                                        # local Ray, or RAY_ADDRESS
    res = run_train_job(cfg, name="run1", storage_path="/abs/ray")    # N workers, DeepSpeed ZeRO 0-3
    res.final_dir, res.metrics, res.error

The core knows nothing of Ray. Each worker rebuilds the ``RunConfig``, resumes from
``ray.train.get_checkpoint()`` when there is one, and adapts the core's ``report(metrics,
checkpoint_dir)`` to ``ray.train.report``:

- ``loss`` is averaged over ranks (the core reports its own rank's loss; ``loss_rank0`` keeps that).
- A checkpoint is reported by every rank with only the files that rank wrote: DeepSpeed's per-rank
  shards (``zero_pp_rank_<r>_*``) by rank r, everything else by rank 0. Shards never collide (also
  across nodes) and Ray merges them into one folder that every rank resumes from.
- After training, rank 0 reports one more checkpoint named ``final``: ``final/`` (the adapter or
  model gathered on rank 0, readable without DeepSpeed) and ``done.json``. Re-running a finished run
  under the same ``(storage_path, name)`` returns it without starting any worker.

Re-running with the same ``name`` and ``storage_path`` resumes from the latest checkpoint (Ray Train
V2 restores a run from that folder); ``resume=False`` starts from scratch under the same name. Inside a
Ray Tune trial function (the "driver" pattern), ``report_to_tune=True`` forwards every report to Tune.

``run_train_batch`` runs several small configs one after another in the same worker processes (one
start-up, one import of torch/transformers/deepspeed): for tests and benchmarks on tiny models.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokentune.config import ConfigError, RunConfig

log = logging.getLogger(__name__)

#: Environment variables the driver hands to every Ray worker (offline hub, DeepSpeed's accelerator
#: and compiled-op cache, the import path of a checkout that is not pip-installed).
PROPAGATED_ENV = (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_HOME",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS",
    "TOKENIZERS_PARALLELISM",
    "DS_ACCELERATOR",
    "TORCH_EXTENSIONS_DIR",
    "PYTHONPATH",
)
#: Test-only fault injection: ``"<rank>:<step>:<marker file>"`` makes that rank ``os._exit(1)`` when
#: it reports ``step``, once (the marker file records that it happened).
FAULT_ENV = "TOKENTUNE_FAULT_INJECT"

_SHARD = re.compile(r"zero_pp_rank_(\d+)_")
STAGE_DIR = ".ray_stage"  # per-rank upload staging, inside train.output_dir
FINAL = "final"
HISTORY_FILE = "ray_reports.jsonl"  # rank 0's reports, appended across attempts


@dataclass
class TrainJobResult:
    metrics: dict[str, Any]  # the last reported metrics (rank 0; loss averaged over ranks)
    history: list[dict[str, Any]] = field(default_factory=list)  # reports of this launch, all attempts
    final_dir: str | None = None  # final adapter / HF model (gathered on rank 0), readable without DeepSpeed
    checkpoint: str | None = None  # latest checkpoint in storage (the "final" one once finished)
    error: BaseException | None = None  # why the run failed; None when it finished
    path: str | None = None  # the run's folder in storage: <storage_path>/<name>
    rank_digests: list[str] = field(default_factory=list)  # hash of each rank's trained weights


# ---- cluster ---------------------------------------------------------------------------------------
def project_root() -> str:
    """The folder holding ``tokentune/`` (a checkout, or site-packages when installed)."""
    import tokentune

    return str(Path(tokentune.__file__).resolve().parent.parent)


def worker_env() -> dict[str, str]:
    """Environment for Ray workers: :data:`PROPAGATED_ENV` of this process, the project importable."""
    env = {k: os.environ[k] for k in PROPAGATED_ENV if os.environ.get(k)}
    path = [project_root(), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
    if os.environ.get(FAULT_ENV):
        env[FAULT_ENV] = os.environ[FAULT_ENV]
    return env


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    *,
    include_dashboard: bool | None = None,
    runtime_env: dict[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """Connect to a cluster (``address`` or ``RAY_ADDRESS``) or start a local one; returns its resources.

    A local cluster keeps its dashboard on 127.0.0.1 and Ray's token authentication on (a client of
    an existing cluster needs ``RAY_AUTH_MODE=token`` and the cluster's token); usage stats are off.
    Workers get :func:`worker_env`. When Ray is already initialised (e.g. inside a Tune trial) this
    only returns the resources.
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return dict(ray.cluster_resources())
    env = dict(runtime_env or {})
    env["env_vars"] = {**worker_env(), **env.get("env_vars", {})}
    env = without_job_conflicts(env)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, runtime_env=env, **kwargs)
    else:
        kwargs.setdefault("dashboard_host", "127.0.0.1")
        ray.init(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=include_dashboard,
            runtime_env=env,
            **kwargs,
        )
    return dict(ray.cluster_resources())


def without_job_conflicts(runtime_env: dict[str, Any]) -> dict[str, Any]:
    """Drop the fields and env vars a submitting job already set in its ``runtime_env``.

    Inside ``ray job submit`` Ray merges the job's runtime_env with ``ray.init``'s and refuses any
    overlap (a ValueError). The job's values are the user's explicit choice, so they win.
    """
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return runtime_env
    try:
        job_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return runtime_env
    job_vars = job_env.get("env_vars") or {}
    out = {k: v for k, v in runtime_env.items() if k == "env_vars" or k not in job_env}
    env_vars = {k: v for k, v in (runtime_env.get("env_vars") or {}).items() if k not in job_vars}
    if env_vars:
        out["env_vars"] = env_vars
    else:
        out.pop("env_vars", None)
    return out


def resolve_use_gpu(cfg: RunConfig, resources: dict[str, float]) -> bool:
    """``compute.use_gpu``: true/false as given; auto = the cluster has a GPU."""
    return cfg.compute.wants_gpu(resources.get("GPU", 0) > 0)


def check_launch(cfg: RunConfig, resources: dict[str, float] | None = None) -> bool:
    """Pre-launch checks, before any cluster resource is used; raises ``ConfigError``. Returns use_gpu.

    No method x ZeRO-stage combination is refused: on CPU (2 workers, gloo) full, lora, dora,
    qlora+lora, lora+tokentune, lora+ist, lora+rst and lora+tokentune+ist all train under ZeRO-2 and
    ZeRO-3 with identical weights on every rank (tests/test_distributed.py), bf16 included.
    """
    c = cfg.compute
    resources = resources or {}
    if not Path(cfg.train.output_dir).is_absolute():
        raise ConfigError(
            f"train.output_dir={cfg.train.output_dir!r} must be absolute under Ray (workers change directory)"
        )
    use_gpu = resolve_use_gpu(cfg, resources)
    if c.zero_stage is not None:
        try:
            import_deepspeed()
        except Exception as e:  # noqa: BLE001 - any import failure is the same user-facing problem
            raise ConfigError(
                f"compute.zero_stage={c.zero_stage} needs DeepSpeed, which cannot be imported: {e}"
            ) from e
    if c.backend == "nccl" and not use_gpu:
        raise ConfigError("compute.backend='nccl' needs GPU workers (use_gpu is false): use 'gloo' or 'auto'")
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


# ---- the job ---------------------------------------------------------------------------------------
def run_train_job(
    cfg: RunConfig,
    *,
    name: str,
    storage_path: str,
    resume: bool = True,
    report_to_tune: bool = False,
    max_failures: int = 1,
    progress: bool = True,
) -> TrainJobResult:
    """Train ``cfg`` on ``cfg.compute.workers`` Ray Train workers; see the module docstring.

    Configuration problems raise ``ConfigError`` before anything starts; a failure during training
    comes back in ``TrainJobResult.error`` (after ``max_failures`` restarts from the last checkpoint).
    """
    cfg, storage, use_gpu = _prepare([cfg], storage_path)
    if resume:
        finished = _finished_run(storage, name, cfg[0])
        if finished is not None:
            return finished  # nothing to train: no worker is started
    launch = uuid.uuid4().hex
    loop_config = {
        "config": cfg[0].to_dict(),
        "use_gpu": use_gpu,
        "resume": resume,
        "launch_id": launch,
        "progress": progress,
    }
    trainer = _trainer(
        train_worker, loop_config, cfg[0], use_gpu, name, storage, max_failures, report_to_tune=report_to_tune
    )
    result, error = _fit(trainer)
    return _job_result(result, error, storage, name, Path(cfg[0].train.output_dir), launch)


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
    loop_config = {"configs": [c.to_dict() for c in cfgs], "use_gpu": use_gpu, "progress": progress}
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


def _finished_run(storage: str, name: str, cfg: RunConfig) -> TrainJobResult | None:
    """The result of a run under ``(storage, name)`` that already finished ``cfg``'s steps, else None."""
    import ray.train

    path = f"{storage.rstrip('/')}/{name}"
    if "://" not in storage and not Path(path).is_dir():
        return None
    try:
        result = ray.train.Result.from_path(path)
    except Exception:  # noqa: BLE001 - no (complete) run there: train
        return None
    ckpt = result.checkpoint
    if ckpt is None or Path(ckpt.path).name != FINAL:
        return None
    with ckpt.as_directory() as d:
        done_file = Path(d) / "done.json"
        done = json.loads(done_file.read_text()) if done_file.exists() else None
    if not done or done.get("max_steps") != cfg.train.max_steps:
        return None  # the workers resume it, or say why they cannot
    local = "://" not in storage and Path(ckpt.path, FINAL).is_dir()
    return TrainJobResult(
        metrics={**(result.metrics or {}), **done.get("metrics", {})},
        history=[done.get("metrics", {})],
        final_dir=str(Path(ckpt.path, FINAL)) if local else done.get("final_dir"),
        checkpoint=ckpt.path,
        path=path,
        rank_digests=list(done.get("rank_digests") or []),
    )


def _prepare(cfgs: list[RunConfig], storage_path: str) -> tuple[list[RunConfig], str, bool]:
    """Private copies with absolute output dirs, absolute storage, Ray up, pre-launch checks passed."""
    import ray

    if not cfgs:
        raise ConfigError("no training config given")
    cfgs = [RunConfig.from_dict(c.to_dict()) for c in cfgs]
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


def _trainer(
    fn, loop_config, cfg: RunConfig, use_gpu: bool, name, storage, max_failures, report_to_tune=False
):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    c = cfg.compute
    backend = c.backend if c.backend != "auto" else ("nccl" if use_gpu else "gloo")
    resources = {"CPU": c.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = c.gpus_per_worker
    callbacks = []
    if report_to_tune:
        import ray.tune.integration.ray_train as ray_train_integration  # looked up late: callers may subclass

        callbacks.append(ray_train_integration.TuneReportCallback())
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
            callbacks=callbacks,
            worker_runtime_env={"env_vars": worker_env()},
        ),
    )


def _fit(trainer):
    import threading

    stop = threading.Event()
    sweeper = threading.Thread(target=_sweep_orphans, args=(stop,), name="pg-orphan-sweeper", daemon=True)
    sweeper.start()
    try:
        return trainer.fit(), None
    except Exception as e:  # noqa: BLE001 - a failed run is returned, not raised
        return None, e
    finally:
        stop.set()


ORPHAN_SWEEP_S = 10.0


def _sweep_orphans(stop) -> None:
    while True:
        try:
            for pg in remove_orphaned_placement_groups():
                log.warning("removed placement group %s: its creator died with a lost node", pg)
        except Exception as e:  # noqa: BLE001 - best effort; never disturbs the run
            log.debug("placement-group sweep failed: %s", e)
        if stop.wait(ORPHAN_SWEEP_S):
            return


def remove_orphaned_placement_groups(job_id: str | None = "current") -> list[str]:
    """Remove this job's placement groups whose creating actor is dead; returns their ids.

    A Ray Train controller creates its workers' placement group. When the node running it dies (with
    the Tune trial driver), Ray keeps the group for as long as the *job* lives and re-places its
    bundles on the surviving nodes, where it holds their CPUs/GPUs forever: the retried trial's new
    group then waits for resources that never free (a hang, seen when a node of a 2-node sweep was
    killed). A group whose creator actor is dead can never be used or released by it, so removing it
    is safe. Groups made by a driver or task (no creator actor) and detached ones are never touched.
    ``job_id="current"``: the calling job's groups only; None: every job's.
    """
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    if job_id == "current":
        job_id = ray.get_runtime_context().get_job_id()
    table = gcs_pb2.PlacementGroupTableData
    removed = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        d = table.FromString(raw)
        if d.state == table.REMOVED or d.is_detached or d.creator_job_dead or not d.creator_actor_dead:
            continue
        if set(d.creator_actor_id) <= {0xFF}:  # nil actor id: made by a driver or a task
            continue
        if job_id is not None and d.creator_job_id.hex() != job_id:
            continue
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(d.placement_group_id)))
        removed.append(d.placement_group_id.hex())
    return removed


def _job_result(result, error, storage: str, name: str, out_dir: Path, launch: str) -> TrainJobResult:
    ret = (getattr(result, "return_value", None) or {}) if result is not None else {}
    ckpt = getattr(result, "checkpoint", None) if result is not None else None
    ckpt_path = ckpt.path if ckpt is not None else None
    final_dir = ret.get("final_dir")
    if ckpt_path and "://" not in storage and Path(ckpt_path, FINAL).is_dir():
        final_dir = str(Path(ckpt_path, FINAL))  # the persisted copy: readable wherever storage is
    history = ret.get("history") or _read_history(out_dir / HISTORY_FILE, launch)
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


# ---- inside each worker ----------------------------------------------------------------------------
def import_deepspeed():
    """``import deepspeed`` without its autotuner's optional ``import mlflow`` (~6 s per worker here).

    Training never uses DeepSpeed's autotuner; mlflow stays importable afterwards.
    """
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises ImportError meanwhile
    try:
        import deepspeed
    finally:
        if "mlflow" in sys.modules and sys.modules["mlflow"] is None:
            del sys.modules["mlflow"]
    return deepspeed


def _worker_setup(loop_config: dict[str, Any], cfgs: list[RunConfig]):
    """DeepSpeed imported (CPU accelerator unless GPU workers), the device; returns rank, world, device."""
    import ray.train
    import torch

    ctx = ray.train.get_context()
    if not loop_config["use_gpu"]:
        os.environ["DS_ACCELERATOR"] = "cpu"
    if any(c.compute.zero_stage is not None for c in cfgs):
        import_deepspeed()
    device = None
    if loop_config["use_gpu"]:
        from ray.train.torch import get_device

        device = get_device()  # this worker's GPU (Ray sets CUDA_VISIBLE_DEVICES)
        torch.cuda.set_device(device)  # DeepSpeed places the engine on the current device
    return ctx.get_world_rank(), ctx.get_world_size(), device


def train_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """What every Ray Train worker runs for :func:`run_train_job`."""
    import ray.train

    cfg = RunConfig.from_dict(loop_config["config"])
    out_dir = Path(cfg.train.output_dir)
    launch = loop_config["launch_id"]
    history_file = out_dir / HISTORY_FILE

    ckpt = ray.train.get_checkpoint()
    with ckpt.as_directory() if ckpt is not None else _NoDir() as ckpt_dir:
        resume_dir = Path(ckpt_dir) if ckpt_dir else None
        if resume_dir is not None and not loop_config["resume"] and _launch_of(resume_dir) != launch:
            resume_dir = None  # an earlier launch's checkpoint and resume=False: start over
        if resume_dir is not None and (resume_dir / "done.json").exists():
            return _already_finished(resume_dir, cfg)  # before the heavy imports

        from tokentune.train import train

        rank, world, device = _worker_setup(loop_config, [cfg])
        start = _step_of(resume_dir) if resume_dir is not None else 0
        if ray.train.get_context().get_local_rank() == 0:
            _clear_stale(out_dir, after_step=start)
        attempt = _next_attempt(history_file, launch) if rank == 0 else 0
        _barrier()

        def report(metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
            metrics = _mean_loss_over_ranks(dict(metrics), world, device)
            _maybe_inject_fault(rank, int(metrics.get("step", -1)))
            _report(metrics, checkpoint_dir, rank, out_dir, launch)
            if rank == 0:
                _append(history_file, {"launch": launch, "attempt": attempt, **metrics})

        res = train(cfg, report, resume_from=resume_dir, device=device, progress=loop_config["progress"])

    digests = _gather_strings(res.trainable_digest, world)
    final = {
        **(res.history[-1] if res.history else {}),
        "step": res.steps,
        "finished": 1,
        "wall_s": res.wall_s,
        "ranks_agree": int(len(set(digests)) == 1),
    }
    if res.val_loss is not None:
        final["val_loss"] = res.val_loss
    final = _mean_loss_over_ranks(final, world, device)
    info = {
        "final_dir": res.final_dir,
        "is_adapter": res.is_adapter,
        "rank_digests": digests,
        "metrics": final,
    }
    stage = None
    if rank == 0:
        stage = out_dir / STAGE_DIR / f"rank{rank}" / FINAL
        shutil.rmtree(stage, ignore_errors=True)
        shutil.copytree(res.final_dir, stage / FINAL)
        _write_json(stage / "done.json", {**info, "max_steps": cfg.train.max_steps})
        _write_json(stage / "launch.json", {"launch_id": launch})
    ckpt_out = ray.train.Checkpoint.from_directory(str(stage)) if stage is not None else None
    ray.train.report(final, checkpoint=ckpt_out, checkpoint_dir_name=FINAL)
    if stage is not None:
        shutil.rmtree(stage, ignore_errors=True)
    if rank == 0:
        _append(history_file, {"launch": launch, "attempt": attempt, **final})
        info["history"] = _read_history(history_file, launch)
    return info


def train_batch_worker(loop_config: dict[str, Any]) -> list[dict[str, Any]]:
    """What every Ray Train worker runs for :func:`run_train_batch` (no Ray reports, no checkpoints)."""
    from tokentune.train import train

    cfgs = [RunConfig.from_dict(d) for d in loop_config["configs"]]
    rank, world, device = _worker_setup(loop_config, cfgs)
    out = []
    for i, cfg in enumerate(cfgs):
        history: list[dict[str, Any]] = []

        def report(metrics: dict[str, Any], checkpoint_dir: str | None = None, _h=history) -> None:
            _h.append({**_mean_loss_over_ranks(dict(metrics), world, device), "report_time": time.time()})

        try:
            res = train(cfg, report, device=device, progress=loop_config["progress"])
        except Exception as e:
            raise RuntimeError(
                f"config {i} (methods={cfg.methods}, zero_stage={cfg.compute.zero_stage}) failed: {e}"
            ) from e
        digests = _gather_strings(res.trainable_digest, world)
        metrics = {
            **(history[-1] if history else {}),
            "wall_s": res.wall_s,
            "ranks_agree": int(len(set(digests)) == 1),
        }
        out.append(
            {"final_dir": res.final_dir, "rank_digests": digests, "history": history, "metrics": metrics}
        )
        _barrier()
    return out


class _NoDir:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _already_finished(ckpt_dir: Path, cfg: RunConfig) -> dict[str, Any]:
    done = json.loads((ckpt_dir / "done.json").read_text())
    if done.get("max_steps") != cfg.train.max_steps:
        raise RuntimeError(
            f"this run already finished at {done.get('max_steps')} steps (checkpoint {ckpt_dir}) and "
            f"train.max_steps is now {cfg.train.max_steps}: use a new name, or resume=False"
        )
    done["history"] = [done.get("metrics", {})]
    return done


def _report(
    metrics: dict[str, Any], checkpoint_dir: str | None, rank: int, out_dir: Path, launch: str
) -> None:
    """``ray.train.report`` with only this rank's files of ``checkpoint_dir`` (see the module docstring)."""
    import ray.train

    if not checkpoint_dir:
        ray.train.report(metrics)
        return
    src = Path(checkpoint_dir)
    stage = out_dir / STAGE_DIR / f"rank{rank}" / src.name
    shutil.rmtree(stage, ignore_errors=True)
    n = stage_rank_files(src, stage, rank)
    if rank == 0:
        _write_json(stage / "launch.json", {"launch_id": launch})
        n += 1
    ckpt = ray.train.Checkpoint.from_directory(str(stage)) if n else None
    try:
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=src.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def stage_rank_files(src: Path, dst: Path, rank: int) -> int:
    """Hard-link (or copy) into ``dst`` the files of ``src`` that ``rank`` uploads; returns how many.

    DeepSpeed's per-rank shards (``zero_pp_rank_<r>_*``) belong to rank r, every other file to rank 0.
    """
    n = 0
    for f in sorted(src.rglob("*")):
        if not f.is_file():
            continue
        m = _SHARD.search(f.name)
        if (int(m.group(1)) if m else 0) != rank:
            continue
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)
        n += 1
    return n


def _launch_of(ckpt_dir: Path) -> str | None:
    p = ckpt_dir / "launch.json"
    return json.loads(p.read_text()).get("launch_id") if p.exists() else None


def _step_of(ckpt_dir: Path) -> int:
    p = ckpt_dir / "state.json"
    return int(json.loads(p.read_text())["step"]) if p.exists() else 0


def _clear_stale(out_dir: Path, after_step: int) -> None:
    """Remove local ``checkpoint-<k>`` with k > ``after_step`` (left by a failed attempt or older run)."""
    for p in out_dir.glob("checkpoint-*"):
        try:
            step = int(p.name.split("-", 1)[1])
        except ValueError:
            continue
        if step > after_step:
            shutil.rmtree(p, ignore_errors=True)
    shutil.rmtree(out_dir / STAGE_DIR, ignore_errors=True)


def _mean_loss_over_ranks(metrics: dict[str, Any], world: int, device) -> dict[str, Any]:
    """Average ``loss`` over ranks (all ranks report at the same steps, so the collective is safe)."""
    if world <= 1 or "loss" not in metrics:
        return metrics
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(metrics["loss"])], dtype=torch.float64, device=device or "cpu")
    dist.all_reduce(t)
    metrics["loss_rank0"] = metrics["loss"]
    metrics["loss"] = float(t.item()) / world
    return metrics


def _gather_strings(s: str, world: int) -> list[str]:
    if world <= 1:
        return [s]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, s)
    return [str(x) for x in out]


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _maybe_inject_fault(rank: int, step: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    r, s, marker = spec.split(":", 2)
    if int(r) == rank and int(s) == step and not os.path.exists(marker):
        Path(marker).write_text(f"rank {rank} exited at step {step}\n")
        print(f"[fault injection] rank {rank} exits at step {step}", file=sys.stderr, flush=True)
        os._exit(1)


def _next_attempt(history_file: Path, launch: str) -> int:
    return 1 + max((r.get("attempt", 0) for r in _read_history(history_file, launch)), default=0)


def _read_history(path: Path, launch: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("launch") == launch]


def _append(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    with path.open("a") as f:
        f.write(json.dumps(clean, default=str) + "\n")


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str))
