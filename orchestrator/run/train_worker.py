"""What runs inside each Ray Train worker: ``tokentune.train.train`` with its reports adapted to Ray.

The driver (``orchestrator.run.train_driver``) hands every worker the typed ``RunConfig`` in
``train_loop_config["config"]``. Each worker resumes from ``ray.train.get_checkpoint()`` when there
is one and adapts the core's ``report(metrics, checkpoint_dir)`` to ``ray.train.report``:

- ``loss`` is averaged over ranks (the core reports its own rank's loss; ``loss_rank0`` keeps that).
- A checkpoint is reported by every rank with only the files that rank wrote: DeepSpeed's per-rank
  shards (``zero_pp_rank_<r>_*``) by rank r, everything else by rank 0. Shards never collide (also
  across nodes) and Ray merges them into one folder that every rank resumes from.
- After training, rank 0 reports one more checkpoint named ``final``: ``final/`` (the adapter or
  model gathered on rank 0, readable without DeepSpeed) and ``done.json``.

Rank 0 appends every report to ``<output_dir>/ray_reports.jsonl`` (tagged with the launch and the
attempt), so the driver can return the history of a launch across restarts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from orchestrator.results.trial_status import log_event
from tokentune.checkpoint import config_hash
from tokentune.config import RunConfig
from tokentune.engine import barrier
from tokentune.files import append_jsonl, read_jsonl, write_json_atomic

#: Test-only fault injection: ``"<rank>:<step>:<marker file>"`` makes that rank ``os._exit(1)`` when
#: it reports ``step``, once (the marker file records that it happened).
FAULT_ENV = "TOKENTUNE_FAULT_INJECT"
STAGE_DIR = ".ray_stage"  # per-rank upload staging, inside train.output_dir
FINAL = "final"  # the name of the last checkpoint (final/ and done.json)
HISTORY_FILE = "ray_reports.jsonl"  # rank 0's reports, appended across attempts

_SHARD = re.compile(r"zero_pp_rank_(\d+)_")


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


#: DeepSpeed's accelerator override; "cpu" is right only for a worker without a GPU
DS_ACCELERATOR = "DS_ACCELERATOR"


def set_deepspeed_accelerator(use_gpu: bool, environ: MutableMapping[str, str] | None = None) -> str | None:
    """Decide DeepSpeed's accelerator for this worker, before DeepSpeed is imported; returns the value.

    A worker without a GPU gets ``DS_ACCELERATOR=cpu``. A GPU worker never keeps ``cpu`` (set for the
    test process or a CPU driver and forwarded to every Ray worker): it is removed, so DeepSpeed detects
    CUDA; any other value a user set (e.g. ``cuda``) is kept.
    """
    env = os.environ if environ is None else environ
    if not use_gpu:
        env[DS_ACCELERATOR] = "cpu"
    elif env.get(DS_ACCELERATOR, "").strip().lower() == "cpu":
        del env[DS_ACCELERATOR]
    return env.get(DS_ACCELERATOR)


def skip_unused(cfgs: list[RunConfig]) -> list[str]:
    """Keep this worker from importing the optional packages none of ``cfgs`` uses (e.g. bitsandbytes
    without QLoRA or an 8-bit optimizer); returns the skipped names."""
    from tokentune.methods import skip_unused_packages
    from tokentune.optimizers import optimizer_packages

    return skip_unused_packages(
        [c.methods for c in cfgs], keep={p for c in cfgs for p in optimizer_packages(c)}
    )


def _worker_setup(use_gpu: bool, cfgs: list[RunConfig]):
    """DeepSpeed imported (CPU accelerator unless GPU workers), the device; returns rank, world, device."""
    import ray.train
    import torch

    skip_unused(cfgs)
    ctx = ray.train.get_context()
    set_deepspeed_accelerator(use_gpu)
    if any(c.compute.zero_stage is not None for c in cfgs):
        import_deepspeed()
    device = None
    if use_gpu:
        from ray.train.torch import get_device

        device = get_device()  # this worker's GPU (Ray sets CUDA_VISIBLE_DEVICES)
        torch.cuda.set_device(device)  # DeepSpeed places the engine on the current device
    return ctx.get_world_rank(), ctx.get_world_size(), device


def train_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """What every Ray Train worker runs for ``run_train_job``."""
    import ray.train

    cfg: RunConfig = loop_config["config"]
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

        rank, world, device = _worker_setup(loop_config["use_gpu"], [cfg])
        start = _step_of(resume_dir) if resume_dir is not None else 0
        if ray.train.get_context().get_local_rank() == 0:
            _clear_stale(out_dir, after_step=start)
        attempt = _next_attempt(history_file, launch) if rank == 0 else 0
        barrier()
        phase = (lambda name: log_event(out_dir, name)) if rank == 0 else None  # the trial's timing
        if phase:
            phase("workers_ready")

        def report(metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
            metrics = _mean_loss_over_ranks(dict(metrics), world, device)
            _maybe_inject_fault(rank, int(metrics.get("step", -1)))
            _report(metrics, checkpoint_dir, rank, out_dir, launch)
            if rank == 0:
                append_jsonl(history_file, {"launch": launch, "attempt": attempt, **metrics})

        res = train(
            cfg,
            report,
            resume_from=resume_dir,
            device=device,
            progress=loop_config["progress"],
            on_phase=phase,
        )

    return _report_final(res, cfg, out_dir, launch, attempt, rank, world, device)


def _report_final(
    res: Any, cfg: RunConfig, out_dir: Path, launch: str, attempt: int, rank: int, world: int, device: Any
) -> dict[str, Any]:
    """The run's last report: final metrics (loss averaged over ranks) and, from rank 0, the final
    adapter as the Ray Train checkpoint ``final`` (with ``done.json``); returns what the driver gets."""
    import ray.train

    history_file = out_dir / HISTORY_FILE
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
        done = {**info, "max_steps": cfg.train.max_steps, "config_hash": config_hash(cfg)}
        write_json_atomic(stage / "done.json", done)
        write_json_atomic(stage / "launch.json", {"launch_id": launch})
    ckpt_out = ray.train.Checkpoint.from_directory(str(stage)) if stage is not None else None
    ray.train.report(final, checkpoint=ckpt_out, checkpoint_dir_name=FINAL)
    if stage is not None:
        shutil.rmtree(stage, ignore_errors=True)
    if rank == 0:
        log_event(out_dir, "checkpoint_reported")  # the final adapter is in Ray storage
        append_jsonl(history_file, {"launch": launch, "attempt": attempt, **final})
        info["history"] = read_history(history_file, launch)
    return info


def train_batch_worker(loop_config: dict[str, Any]) -> list[dict[str, Any]]:
    """What every Ray Train worker runs for ``run_train_batch`` (no Ray reports, no checkpoints)."""
    from tokentune.train import train

    cfgs: list[RunConfig] = loop_config["configs"]
    rank, world, device = _worker_setup(loop_config["use_gpu"], cfgs)
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
        barrier()
    return out


class _NoDir:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _already_finished(ckpt_dir: Path, cfg: RunConfig) -> dict[str, Any]:
    done = json.loads((ckpt_dir / "done.json").read_text())
    if done.get("max_steps") != cfg.train.max_steps or done.get("config_hash") != config_hash(cfg):
        raise RuntimeError(
            f"this run already finished {done.get('max_steps')} steps of config hash {done.get('config_hash')} "
            f"(checkpoint {ckpt_dir}); this config: {cfg.train.max_steps} steps, hash {config_hash(cfg)}: "
            "use a new name, or resume=False"
        )
    done["history"] = [done.get("metrics", {})]
    return done


# ---- checkpoints: each rank uploads its own files ------------------------------------------------------
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
        write_json_atomic(stage / "launch.json", {"launch_id": launch})
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
    """Remove local ``checkpoint-<k>`` with k > ``after_step`` (left by a failed attempt or older run);
    starting over (``after_step`` 0) also ``final/``, so ``train``'s output-folder check passes."""
    if after_step == 0:
        shutil.rmtree(out_dir / FINAL, ignore_errors=True)
    for p in out_dir.glob("checkpoint-*"):
        try:
            step = int(p.name.split("-", 1)[1])
        except ValueError:
            continue
        if step > after_step:
            shutil.rmtree(p, ignore_errors=True)
    shutil.rmtree(out_dir / STAGE_DIR, ignore_errors=True)


# ---- collectives -----------------------------------------------------------------------------------------
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


def _maybe_inject_fault(rank: int, step: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    r, s, marker = spec.split(":", 2)
    if int(r) == rank and int(s) == step and not os.path.exists(marker):
        Path(marker).write_text(f"rank {rank} exited at step {step}\n")
        print(f"[fault injection] rank {rank} exits at step {step}", file=sys.stderr, flush=True)
        os._exit(1)


# ---- the history file --------------------------------------------------------------------------------
def _next_attempt(history_file: Path, launch: str) -> int:
    return 1 + max((r.get("attempt", 0) for r in read_history(history_file, launch)), default=0)


def read_history(path: Path, launch: str) -> list[dict[str, Any]]:
    """The rows of ``path`` (a :data:`HISTORY_FILE`) written by launch ``launch``, all attempts."""
    return [r for r in read_jsonl(path) if r.get("launch") == launch]
