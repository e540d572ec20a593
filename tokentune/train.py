"""The training loop: ``train(cfg, report) -> TrainResult``. Plain PyTorch; never imports ray or mlflow.

Reads top to bottom: load model and methods, build data, optimizer and schedule, then per optimizer
step: ``MethodStack.step`` (method hooks, micro-batches, where a method may replace the forward/loss,
the optimizer step), report, validate, checkpoint (``tokentune.checkpoint``). Ray Train workers
call this same function (see ``orchestrator/``).

``report(metrics, checkpoint_dir=None)`` is called every ``train.log_every`` steps, at every
checkpoint and at the end, on every rank (Ray Train's report is a barrier). The first report also
carries ``data/dropped_rows`` (``TokenizedDataset.dropped`` of the training data) and
``train/total_steps`` (``train.max_steps``, or ``train.epochs`` resolved to steps from the number of
training rows, the batch, the accumulation and the workers: ``TrainConfig.total_steps``).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokentune.checkpoint import (
    check_output_dir,
    load_checkpoint,
    save_checkpoint,
    save_final,
    trainable_digest,
)
from tokentune.config import RunConfig
from tokentune.data import StepSampler, collate, load_splits, prepare_tokenizer
from tokentune.engine import DeepSpeedEngine, PlainEngine, dist_info
from tokentune.estimate import measured_estimate_metrics
from tokentune.files import write_json_atomic
from tokentune.memory import MemoryMeter, Throughput, reset_peak
from tokentune.methods import MethodStack, StepContext
from tokentune.methods.base import IGNORE_INDEX
from tokentune.models import load_model, load_tokenizer
from tokentune.optimizers import build_optimizer
from tokentune.timing import StepClock

Report = Callable[..., None]


@dataclass
class TrainResult:
    output_dir: str
    final_dir: str  # peft adapter (adapter methods) or full HF checkpoint (full fine-tuning)
    is_adapter: bool
    steps: int
    val_loss: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    memory: dict[str, float] = field(default_factory=dict)  # ``memory/*`` of this rank (tokentune.memory)
    tokens_per_s: float = 0.0
    time: dict[str, float] = field(default_factory=dict)  # ``time/*`` of this call (tokentune.timing)
    trainable_digest: str = ""  # hash of this rank's (gathered) trainable weights: equal on every rank


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def pick_device(cfg: RunConfig) -> torch.device:
    if cfg.compute.wants_gpu(torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("compute.use_gpu=true but no CUDA device is visible")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def autocast_factory(cfg: RunConfig, device: torch.device) -> Callable[[], Any]:
    on = cfg.train.bf16 == "true" or (
        cfg.train.bf16 == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if not on:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def validation_loss(model, batches: list[dict[str, torch.Tensor]], autocast) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        with autocast():
            loss = model(**b).loss
        n = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += float(loss) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def train(
    cfg: RunConfig,
    report: Report | None = None,
    *,
    resume_from: str | Path | None = None,
    device: torch.device | None = None,
    progress: bool = False,
    on_phase: Callable[[str], None] | None = None,
) -> TrainResult:
    """Fine-tune ``cfg.model`` with ``cfg.methods`` on ``cfg.data``; see the module docstring.

    ``on_phase(name)`` (timing, e.g. a trial's events) is called with ``model_loaded``, ``first_step``
    (the first optimizer step of this call done), ``last_step`` and ``final_saved``.
    """
    phase = on_phase or (lambda name: None)
    t_start = time.perf_counter()
    tc = cfg.train
    rank, world = dist_info()
    device = device or pick_device(cfg)
    out_dir = Path(tc.output_dir)
    if rank == 0:
        check_output_dir(out_dir, cfg, resume_from)  # another run's checkpoints, or a wrong resume: refused
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "run_config.json", cfg.to_dict())
    torch.manual_seed(tc.seed)
    report = report or (lambda metrics, checkpoint_dir=None: None)

    # ---- model + methods ---------------------------------------------------------------------
    methods = MethodStack.of(cfg)
    tokenizer = prepare_tokenizer(load_tokenizer(cfg.model), cfg.data)
    model = methods.prepare(load_model(cfg.model, methods.load_kwargs(), device=device))
    model.train()
    phase("model_loaded")

    # ---- data --------------------------------------------------------------------------------
    train_ds, val_ds = load_splits(cfg.data, tokenizer, seed=tc.seed)
    sampler = StepSampler(len(train_ds), tc.batch_size, tc.seed, world, rank)
    total = tc.total_steps(len(train_ds), world)  # train.max_steps, or train.epochs resolved to steps
    probe_sampler = StepSampler(len(train_ds), min(tc.batch_size * 2, len(train_ds)), tc.seed + 7919)
    pad = tokenizer.pad_token_id

    def to_device(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in b.items()}

    def micro_batch(i: int) -> dict[str, torch.Tensor]:
        return to_device(collate([train_ds[j] for j in sampler.indices(i)], pad))

    probe_counter = [0]

    def probe_batch(size: int | None = None) -> dict[str, torch.Tensor]:
        """A training batch for method probes: the same examples on every rank."""
        idx = probe_sampler.indices(probe_counter[0])
        probe_counter[0] += 1
        if size:
            idx = (idx * (size // len(idx) + 1))[:size]
        return to_device(collate([train_ds[j] for j in idx], pad))

    n_val = len(val_ds) if tc.eval_batches == 0 else min(len(val_ds), tc.eval_batches * tc.batch_size)
    val_batches = [
        to_device(collate([val_ds[j] for j in range(i, min(i + tc.batch_size, n_val))], pad))
        for i in range(0, n_val, tc.batch_size)
    ]

    # ---- optimizer, schedule, engine -----------------------------------------------------------
    groups = methods.param_groups(model)
    if not any(len(g["params"]) for g in groups):
        raise RuntimeError(f"methods={cfg.methods}: no parameter is trainable")
    optimizer = build_optimizer(cfg, groups, device)  # train.optimizer; DeepSpeedCPUAdam under offload
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc.schedule, tc.warmup_steps, total))
    autocast = autocast_factory(cfg, device)
    zero = cfg.compute.zero_stage
    if zero is not None:
        engine: Any = DeepSpeedEngine(
            model,
            optimizer,
            scheduler,
            tc.grad_accum,
            tc.max_grad_norm,
            zero,
            tc.batch_size,
            autocast is not contextlib.nullcontext,
            cfg.compute.offload,
        )
    else:
        engine = PlainEngine(model, optimizer, scheduler, tc.grad_accum, tc.max_grad_norm)

    # ---- resume --------------------------------------------------------------------------------
    start_step = 0
    if resume_from is not None:
        resolved = cfg if tc.epochs is None else _with_steps(cfg, total)
        start_step = load_checkpoint(Path(resume_from), model, engine, methods, zero, resolved)

    # ---- the loop ------------------------------------------------------------------------------
    history: list[dict[str, Any]] = []
    speed = Throughput()
    # hooks the client optimizer (DeepSpeed steps it too); compute.offload: what it counts as host memory
    meter = MemoryMeter(model, optimizer, device, cfg.compute.offload)
    clock = StepClock(world, cfg.compute.gpus_per_worker if device.type == "cuda" else 0)
    reset_peak(device)
    losses: list[float] = []

    def seen_micro_batch(batch: dict[str, torch.Tensor], _loss: torch.Tensor) -> None:
        n = int(batch["attention_mask"].sum())
        speed.add(n)
        clock.add_tokens(n)
        meter.note_batch(batch["input_ids"])  # the shape of the activation peak (estimate at that shape)

    val_loss: float | None = None
    step = start_step
    for step in range(start_step, total):
        done = step + 1
        # the breakdown is measured on the first step after the first (allocations settled), then at each log
        meter.start_step(sampled=done % max(tc.log_every, 1) == 0 or done == min(start_step + 2, total))
        clock.start_step()
        ctx = StepContext(
            step=step, model=model, optimizer=engine.optimizer, probe_batch=probe_batch, device=device,
            autocast=autocast, world_size=world, rank=rank,
        )  # fmt: skip
        step_loss, grad_norm = methods.step(
            ctx,
            (micro_batch(step * tc.grad_accum + k) for k in range(tc.grad_accum)),
            backward=engine.backward,
            optimizer_step=engine.step,
            forward_context=lambda: _both(autocast(), meter.saved_tensors()),
            on_micro_batch=seen_micro_batch,
        )
        clock.end_step()
        meter.end_step()
        if step == start_step:
            phase("first_step")
        losses.append(step_loss)
        if not math.isfinite(step_loss):
            raise FloatingPointError(
                f"loss became {step_loss} at step {step}; lower train.lr or check the data"
            )

        is_last = done == total
        metrics: dict[str, Any] | None = None
        if tc.eval_every and done % tc.eval_every == 0 or is_last:
            val_loss = validation_loss(model, val_batches, autocast)
        if done % max(tc.log_every, 1) == 0 or is_last:
            metrics = {
                "step": done,
                "loss": sum(losses) / len(losses),
                "lr": optimizer.param_groups[0]["lr"] if zero is None else engine.scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens_per_s": speed.tick() * world,
                "epoch": done * tc.grad_accum * tc.batch_size * world / len(train_ds),
            }
            losses = []
            metrics.update(meter.metrics())
            metrics.update(clock.metrics())
            metrics.update(methods.metrics())
        if val_loss is not None and (tc.eval_every and done % tc.eval_every == 0 or is_last):
            metrics = metrics or {"step": done}
            metrics["val_loss"] = val_loss
        ckpt_dir = None
        if tc.save_every and done % tc.save_every == 0 and not is_last:
            ckpt_dir = save_checkpoint(out_dir, done, model, engine, methods, zero, rank, tc.keep_checkpoints)
        if metrics is not None or ckpt_dir is not None:
            metrics = metrics or {"step": done}
            if not history:  # the first report: training rows the data left out (answer truncated away)
                metrics["data/dropped_rows"] = train_ds.dropped
                metrics["train/total_steps"] = total  # train.max_steps, or train.epochs resolved
            history.append(metrics)
            if progress and rank == 0:
                print(_progress_line(metrics, total, tc.epochs), flush=True)
            report(metrics, checkpoint_dir=str(ckpt_dir) if ckpt_dir else None)

    # ---- final artifact --------------------------------------------------------------------------
    phase("last_step")
    final_dir = out_dir / "final"
    is_adapter = save_final(engine.model, tokenizer, final_dir, zero, rank)
    phase("final_saved")
    digest = trainable_digest(engine.model, zero)
    wall = time.perf_counter() - t_start
    tokens = [h["tokens_per_s"] for h in history if "tokens_per_s" in h]
    result = TrainResult(
        output_dir=str(out_dir),
        final_dir=str(final_dir),
        is_adapter=is_adapter,
        steps=total,
        val_loss=val_loss,
        history=history,
        wall_s=wall,
        memory=meter.metrics(),
        tokens_per_s=sum(tokens) / len(tokens) if tokens else 0.0,
        time=clock.metrics(),
        trainable_digest=digest,
    )
    if rank == 0:
        summary = {k: v for k, v in result.__dict__.items() if k != "history"}
        summary["memory"] = {**result.memory, **measured_estimate_metrics(cfg, result.memory)}
        write_json_atomic(out_dir / "result.json", summary)
    return result


@contextlib.contextmanager
def _both(first: Any, second: Any):
    with first, second:
        yield


def _with_steps(cfg: RunConfig, total: int) -> RunConfig:
    """``cfg`` with ``train.epochs`` resolved to ``train.max_steps`` (for the checks against a checkpoint)."""
    out = cfg.copy()
    out.train.max_steps, out.train.epochs = total, None
    return out


def _progress_line(m: dict[str, Any], total: int, epochs: float | None = None) -> str:
    parts = [f"step {m['step']}/{total}"]
    if "epoch" in m:
        parts.append(f"epoch {m['epoch']:.2f}" + (f"/{epochs:g}" if epochs is not None else ""))
    for key, fmt in (("loss", ".4f"), ("val_loss", ".4f"), ("lr", ".2e"), ("tokens_per_s", ".0f")):
        if key in m:
            parts.append(f"{key} {m[key]:{fmt}}")
    return "  ".join(parts)
