"""Resources of one run (section ``compute``): workers, devices, DeepSpeed ZeRO and ZeRO-Offload."""

from __future__ import annotations

from dataclasses import dataclass

from tokentune.errors import check, is_int, is_number
from tokentune.optimizers import check_offload
from tokentune.settings import setting


@dataclass
class ComputeConfig:
    """Resources of one run (section ``compute``; a Ray Train job when workers > 1 or under a sweep)."""

    workers: int = setting(1, "training workers (> 1: a Ray Train job)")
    use_gpu: bool | str = setting("auto", "auto (when a GPU is available), true or false")
    cpus_per_worker: float = setting(1, "CPUs per worker")
    gpus_per_worker: float = setting(1, "GPUs per worker (when GPUs are used)")
    zero_stage: int | None = setting(None, "DeepSpeed ZeRO stage 0-3; null = no DeepSpeed")
    backend: str = setting("auto", "process group: auto (nccl on GPU, gloo on CPU), gloo or nccl")
    offload: str = setting(
        "none",
        "ZeRO-Offload: none, optimizer (ZeRO 2/3: fp32 master weights, gradients and AdamW states on the "
        "host, stepped by DeepSpeedCPUAdam) or optimizer+params (ZeRO 3: also the parameter partitions)",
    )

    def __post_init__(self) -> None:
        check(is_int(self.workers) and self.workers >= 1, "compute.workers", self.workers, ">= 1")
        if self.zero_stage is not None:
            check(
                self.zero_stage in (0, 1, 2, 3), "compute.zero_stage", self.zero_stage, "0, 1, 2, 3 or null"
            )
        check(self.backend in ("auto", "gloo", "nccl"), "compute.backend", self.backend, "auto, gloo or nccl")
        check_offload(self.offload, self.zero_stage)
        positive = is_number(self.cpus_per_worker) and self.cpus_per_worker > 0
        check(positive, "compute.cpus_per_worker", self.cpus_per_worker, "a number > 0")
        want = self.use_gpu.lower() if isinstance(self.use_gpu, str) else self.use_gpu
        want = {"true": True, "false": False}.get(want, want) if isinstance(want, str) else want
        check(want in (True, False, "auto"), "compute.use_gpu", self.use_gpu, "true, false or auto")
        self.use_gpu = want
        gpu_gloo = want is True and self.backend == "gloo"  # gloo cannot run DeepSpeed's collectives on GPUs
        check(not gpu_gloo, "compute.backend", self.backend, "nccl or auto when compute.use_gpu=true")

    def wants_gpu(self, gpu_available: bool) -> bool:
        """``compute.use_gpu`` decided: true/false as given; auto = when a GPU is available (CUDA on this
        machine for a local run, a GPU in the Ray cluster for a job). The one place it is interpreted."""
        return gpu_available if self.use_gpu == "auto" else bool(self.use_gpu)
