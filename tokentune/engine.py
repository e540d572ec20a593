"""How gradients become updates: plain PyTorch (optionally all-reducing across ranks) or DeepSpeed.

``dist_info()`` and ``barrier()`` are the process-group helpers the loop and the checkpoints use.
Both engines expose the same three calls the loop uses: ``backward(loss)`` per micro-batch, ``step()`` per
optimizer step (returns the gradient norm), and ``save``/``load`` of the optimizer-side state.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tokentune.optimizers import offload_config


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the process group, or (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank of the process group; a no-op when none is initialised (one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class PlainEngine:
    def __init__(self, model, optimizer, scheduler, grad_accum: int, max_grad_norm: float | None) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.accum, self.max_norm = grad_accum, max_grad_norm
        self.rank, self.world = dist_info()
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> float:
        if self.world > 1:  # data parallel without DeepSpeed: average gradients across ranks
            for p in self.params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(self.world)
        grads = [p for p in self.params if p.grad is not None]
        if self.max_norm:
            norm = float(torch.nn.utils.clip_grad_norm_(grads, self.max_norm))
        else:
            norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in grads)) if grads else 0.0
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def save(self, path: Path) -> None:
        if self.rank == 0:
            torch.save(self.state_dict(), path / "optimizer.pt")

    def load(self, path: Path) -> None:
        # onto this rank's own device (a checkpoint saved from cuda:0 would otherwise land on cuda:0)
        state = torch.load(path / "optimizer.pt", map_location=state_location(self.params), weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def state_location(params: list[torch.Tensor]) -> torch.device:
    """Where this rank loads optimizer state: the device of its own parameters (torch.load's default
    would restore each tensor onto the device it was saved from, cuda:0 for every rank)."""
    return params[0].device if params else torch.device("cpu")


#: ZeRO-3 keeps parameters with fewer elements than this whole on every rank (DeepSpeed's
#: ``stage3_param_persistence_threshold``, its default made explicit; the memory estimate uses it).
#: Not sized from the trainable parameters: it decides which parameters, frozen ones included, are too
#: small to be worth partitioning; an adapter's tensors stay below it and so need no gather.
ZERO3_PERSISTENCE_THRESHOLD = 100_000
#: DeepSpeed's defaults: gradient buckets (``reduce_bucket_size``/``allgather_bucket_size``), ZeRO-3's
#: prefetch bucket and live-parameter limit (elements)
DS_BUCKET_DEFAULT, DS_PREFETCH_DEFAULT, DS_MAX_LIVE_DEFAULT = 500_000_000, 50_000_000, 1_000_000_000
BUCKET_ALIGN = 4096  # elements; a multiple of every alignment DeepSpeed asks of a bucket


def zero_bucket_elements(trainable: int) -> int:
    """Elements of each of DeepSpeed's gradient buckets for ``trainable`` trainable parameters.

    Rule: room for every trainable gradient at once (one collective per step), rounded up to
    :data:`BUCKET_ALIGN`, never above DeepSpeed's default (full fine-tuning of a large model keeps
    DeepSpeed's pipelined buckets). DeepSpeed allocates a reduce bucket in full (ZeRO-1/2: per
    micro-step, ZeRO-3: for the run) whatever the trainable count: its 5e8-element default is a
    0.93 GiB bf16 buffer for a LoRA job of a few MB. ``tokentune.estimate`` counts what remains.
    """
    return min(DS_BUCKET_DEFAULT, max(BUCKET_ALIGN, -(-int(trainable) // BUCKET_ALIGN) * BUCKET_ALIGN))


def zero_sizes(stage: int, trainable: int, largest: int = 0) -> dict[str, int]:
    """The ``zero_optimization`` sizes for ``trainable`` trainable parameters (``largest``: the model's
    largest parameter, in elements).

    Gradient buckets: :func:`zero_bucket_elements`. ZeRO-3's prefetch bucket is the gradient bucket
    (at most DeepSpeed's default; DeepSpeed always prefetches at least one parameter); its live-parameter
    limit (elements gathered at once, frozen ones included) is two of the bucket or of the largest
    parameter, whichever is larger (the one in use and the one prefetched), at most DeepSpeed's default.
    """
    bucket = zero_bucket_elements(trainable)
    out = {"reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if stage == 3:
        out["stage3_prefetch_bucket_size"] = min(DS_PREFETCH_DEFAULT, bucket)
        out["stage3_max_live_parameters"] = min(DS_MAX_LIVE_DEFAULT, 2 * max(bucket, int(largest)))
        out["stage3_param_persistence_threshold"] = ZERO3_PERSISTENCE_THRESHOLD
    return out


def deepspeed_config(
    stage: int,
    micro_batch: int,
    grad_accum: int,
    max_grad_norm: float | None,
    bf16: bool,
    trainable: int = DS_BUCKET_DEFAULT,
    largest: int = 0,
    offload: str = "none",
) -> dict:
    """DeepSpeed's config for one rank; buckets sized for ``trainable`` parameters (:func:`zero_sizes`),
    ZeRO-Offload as ``compute.offload`` says (``tokentune.optimizers.offload_config``)."""
    world = dist_info()[1]
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world,
        "gradient_clipping": float(max_grad_norm or 0.0),
        "zero_optimization": {
            "stage": stage,
            "stage3_gather_16bit_weights_on_model_save": stage == 3,
            **zero_sizes(stage, trainable, largest),
            **offload_config(offload),
        },
        "bf16": {"enabled": bool(bf16)},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """DeepSpeed ZeRO 0-3 around a client optimizer/scheduler (the process group already exists)."""

    def __init__(
        self,
        model,
        optimizer,
        scheduler,
        grad_accum,
        max_grad_norm,
        stage: int,
        micro_batch: int,
        bf16: bool,
        offload: str = "none",
    ):
        import deepspeed

        self.stage = stage
        self.rank, self.world = dist_info()
        trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        largest = max((p.numel() for p in model.parameters()), default=0)
        cfg = deepspeed_config(
            stage, micro_batch, grad_accum, max_grad_norm, bf16, trainable, largest, offload
        )
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=cfg
        )
        self.model = self.engine.module

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()  # a no-op except at the accumulation boundary
        if boundary and self.stage == 3:
            self._clear_grad_partitions()

    def _clear_grad_partitions(self) -> None:
        """Zero ZeRO-3's persistent gradient partitions after each optimizer step.

        ZeRO-3 copies each reduced gradient into a flat buffer and, at the step, reads every trainable
        parameter's slot. A parameter that got no gradient this step (an IST/RST layer inactive for
        the step) would contribute its *last* gradient again: to Adam's moments and to the clipping
        norm. ZeRO-1/2 use zeros for such parameters; this makes ZeRO-3 do the same (and makes resume
        exact, since the stale buffer is not part of a checkpoint).
        """
        buf = getattr(self.engine.optimizer, "grad_partitions_flat_buffer", None)
        if isinstance(buf, torch.Tensor):
            buf.zero_()

    def step(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def save(self, path: Path) -> None:
        # frozen weights (a LoRA base) come from the base model on resume: never copy them per checkpoint
        self.engine.save_checkpoint(
            str(path), tag="deepspeed", save_latest=False, exclude_frozen_parameters=True
        )

    def load(self, path: Path) -> None:
        self.engine.load_checkpoint(str(path), tag="deepspeed", load_module_strict=False)
