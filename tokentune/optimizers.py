"""The optimizer a run steps with (``train.optimizer``) and where ZeRO keeps its state (``compute.offload``).

    check_optimizer(cfg)                      # before anything loads: the choice can run here
    optimizer = build_optimizer(cfg, groups, device)
    optimizer_state_bytes(cfg.train.optimizer, tensor_sizes)   # the estimate's optimizer term

``train.optimizer``:

- ``adamw``: ``torch.optim.AdamW`` (two fp32 states per trainable parameter, 8 bytes);
- ``adamw_8bit``: bitsandbytes' ``AdamW8bit``: two uint8 states per parameter plus an fp32 absmax per
  256-element block of each state and two 256-entry fp32 code books; tensors below bitsandbytes'
  ``min_8bit_size`` (4096 elements: LoRA's small adapters, norms) keep fp32 states. bitsandbytes 0.50
  steps it on CPU;
- ``paged_adamw_8bit``: the same states in CUDA unified memory that pages out to the host under
  pressure. Paging is a CUDA feature: on CPU bitsandbytes silently falls back to ``adamw_8bit``, so a
  CPU run is refused rather than reported as paged.

Under DeepSpeed (``compute.zero_stage`` set) the 8-bit choices are refused: ZeRO hands its client
optimizer flat fp32 partitions and checkpoints the optimizer's state itself, a combination DeepSpeed
does not test (``zero_allow_untested_optimizer``) and whose memory would not be the 8-bit figure.

``compute.offload`` (ZeRO-Offload): ``optimizer`` (ZeRO-2 or 3) keeps the fp32 master weights, their
gradients and AdamW's states on the host and steps them with DeepSpeed's ``DeepSpeedCPUAdam`` (a C++
op built on first use, cached in ``TORCH_EXTENSIONS_DIR``); ``optimizer+params`` (ZeRO-3 only) also
keeps the parameter partitions on the host and gathers them to the device per layer.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

import torch

from tokentune.errors import ConfigError

if TYPE_CHECKING:
    from tokentune.config import RunConfig

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
EIGHT_BIT = ("adamw_8bit", "paged_adamw_8bit")
OFFLOADS = ("none", "optimizer", "optimizer+params")
#: compute.offload -> the ZeRO stages it runs under
OFFLOAD_STAGES = {"none": (None, 0, 1, 2, 3), "optimizer": (2, 3), "optimizer+params": (3,)}
#: bitsandbytes' 8-bit optimizer defaults: smaller tensors keep fp32 states; absmax blocks of 256
BNB_MIN_8BIT_SIZE, BNB_BLOCK = 4096, 256


def check_offload(offload: str, zero_stage: int | None) -> None:
    """``compute.offload`` is known and runs under ``compute.zero_stage`` (ZeRO-Offload needs ZeRO 2/3)."""
    if offload not in OFFLOADS:
        raise ConfigError(f"compute.offload={offload!r} is invalid: expected one of {', '.join(OFFLOADS)}")
    if zero_stage not in OFFLOAD_STAGES[offload]:
        stages = " or ".join(str(s) for s in OFFLOAD_STAGES[offload])
        raise ConfigError(
            f"compute.offload={offload!r} needs compute.zero_stage {stages} (got {zero_stage!r}): ZeRO-Offload "
            "moves ZeRO's optimizer partitions (stage 2/3) and parameter partitions (stage 3) to the host; "
            "use compute.offload=none otherwise"
        )


def optimizer_packages(cfg: RunConfig) -> set[str]:
    """The optional packages ``train.optimizer`` imports (a worker must not skip them)."""
    return {"bitsandbytes"} if cfg.train.optimizer in EIGHT_BIT else set()


def check_optimizer(cfg: RunConfig, gpu: bool | None = None) -> None:
    """``train.optimizer`` can run for ``cfg``: bitsandbytes installed for the 8-bit ones, no DeepSpeed
    with them, and a GPU for the paged one (``gpu``: whether the run uses one; None: not known yet, as
    for ``compute.use_gpu=auto`` before the workers start: the run checks again on its device)."""
    name = cfg.train.optimizer
    if name not in EIGHT_BIT:
        return
    if cfg.compute.zero_stage is not None:
        raise ConfigError(
            f"train.optimizer={name!r} with compute.zero_stage={cfg.compute.zero_stage}: DeepSpeed steps its "
            "own fp32 partitions (use train.optimizer=adamw, or compute.offload to save optimizer memory "
            "under ZeRO), or drop compute.zero_stage to use the 8-bit optimizer"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"train.optimizer={name!r} needs bitsandbytes, which is not installed "
            "(pip install bitsandbytes), or use train.optimizer=adamw"
        )
    if name == "paged_adamw_8bit" and gpu is False:
        raise ConfigError(
            "train.optimizer='paged_adamw_8bit' pages its states through CUDA unified memory and needs a "
            "GPU; on CPU bitsandbytes has no paged kernel (it would silently run adamw_8bit): use "
            "train.optimizer=adamw_8bit or adamw"
        )


def build_optimizer(
    cfg: RunConfig, groups: list[dict[str, Any]], device: torch.device
) -> torch.optim.Optimizer:
    """The client optimizer over ``groups`` for ``cfg`` (see the module docstring)."""
    tc = cfg.train
    check_optimizer(cfg, gpu=device.type == "cuda")
    kwargs = {"lr": tc.lr, "weight_decay": tc.weight_decay, "betas": tc.betas}
    if cfg.compute.offload != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    if tc.optimizer in EIGHT_BIT:
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if tc.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
        return cls(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def optimizer_state_bytes(name: str, sizes: list[int], nbytes: float = 4) -> float:
    """Bytes of ``name``'s state for trainable tensors of ``sizes`` elements (``nbytes``: AdamW's bytes
    per state element, the trainable dtype's). 8-bit: uint8 states and absmax blocks for tensors of at
    least ``BNB_MIN_8BIT_SIZE`` elements, fp32 states below, and the two shared code books."""
    if name not in EIGHT_BIT:
        return 2 * nbytes * sum(sizes)
    total = 2 * 256 * 4  # the two code books, one storage each for the whole optimizer
    for n in sizes:
        if n >= BNB_MIN_8BIT_SIZE:
            total += 2 * n + 2 * 4 * -(-n // BNB_BLOCK)
        else:
            total += 2 * 4 * n
    return total


def offload_config(offload: str) -> dict[str, Any]:
    """The ``zero_optimization`` entries of ``compute.offload`` (pinned memory off: CPU runs have none)."""
    out: dict[str, Any] = {}
    if offload in ("optimizer", "optimizer+params"):
        out["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload == "optimizer+params":
        out["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return out
