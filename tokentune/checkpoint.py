"""What a run writes to disk and reads back: checkpoints and the final artifact.

- ``checkpoint-NNNNNN/`` (every ``train.save_every`` steps, the newest ``train.keep_checkpoints`` kept):
  trainable weights (``trainable.pt``, gathered under ZeRO-3), the engine's optimizer and scheduler
  state, each method's state (``methods.pt``), the torch RNG and the step (``state.json``, written
  last: a checkpoint without it is incomplete and never resumed from).
- ``final/``: a peft adapter (adapter methods) or a full Hugging Face checkpoint (full fine-tuning),
  written on rank 0 and readable without DeepSpeed, with the tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tokentune.engine import barrier
from tokentune.files import write_json_atomic

if TYPE_CHECKING:
    from tokentune.methods import MethodStack


def trainable_state(model: torch.nn.Module, zero_stage: int | None = None) -> dict[str, torch.Tensor]:
    """Copies of every trainable parameter, gathered on every rank under ZeRO-3."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {n: p.detach().clone().cpu() for n, p in named}
    return {n: p.detach().clone().cpu() for n, p in named}


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """A short sha256 of names + raw bytes: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable weights into ``model`` (names must exist in it)."""
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise RuntimeError(f"checkpoint holds parameters the model lacks, e.g. {missing[:3]}")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def save_final(model, tokenizer, out: Path, zero_stage: int | None, rank: int) -> bool:
    """Write the final artifact on rank 0: a peft adapter, or a full HF checkpoint. Returns is_adapter."""
    is_adapter = hasattr(model, "peft_config")
    state = None
    if zero_stage == 3:  # partitioned: gather what is saved (a full model includes frozen weights)
        state = trainable_state(model, 3) if is_adapter else _gathered_parameters(model)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if is_adapter:
            from peft import get_peft_model_state_dict

            sd = get_peft_model_state_dict(model, state_dict=_full_state_with(model, state))
            model.save_pretrained(str(out), state_dict=sd)
        else:
            model.save_pretrained(str(out), state_dict=_full_state_with(model, state))
        tokenizer.save_pretrained(str(out))
    return is_adapter


def _gathered_parameters(model) -> dict[str, torch.Tensor]:
    """Every parameter gathered from its ZeRO-3 partitions; tied names share one tensor (as unsharded)."""
    import deepspeed

    named = list(model.named_parameters(remove_duplicate=False))  # tied weights: every name
    unique = list({id(p): p for _, p in named}.values())
    with deepspeed.zero.GatheredParameters(unique, modifier_rank=None):
        copies = {id(p): p.detach().clone().cpu() for p in unique}
    return {n: copies[id(p)] for n, p in named}


def _full_state_with(model, gathered: dict[str, torch.Tensor] | None):
    if gathered is None:
        return None
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    sd.update(gathered)
    return sd


def save_checkpoint(
    out_dir: Path, step: int, model, engine, methods: MethodStack, zero: int | None, rank: int, keep: int
) -> Path:
    """``checkpoint-<step>/``: trainable weights, optimizer + scheduler, method states, RNG, step."""
    path = out_dir / f"checkpoint-{step:06d}"
    state = trainable_state(model, zero if zero == 3 else None)
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        torch.save(state, path / "trainable.pt")
        torch.save(methods.state_dict(), path / "methods.pt")
        torch.save({"torch": torch.get_rng_state()}, path / "rng.pt")
    barrier()
    engine.save(path)
    barrier()
    if rank == 0:
        write_json_atomic(path / "state.json", {"step": step})
        old = sorted(out_dir.glob("checkpoint-*"))[:-keep]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
    barrier()
    return path


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (one with ``state.json``) under ``out_dir``, or None."""
    done = [p for p in sorted(Path(out_dir).glob("checkpoint-*")) if (p / "state.json").exists()]
    return done[-1] if done else None


def load_checkpoint(path: Path, model, engine, methods: MethodStack, zero: int | None) -> int:
    """Restore weights, optimizer-side state, method states and the RNG; returns the step to resume at."""
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no state.json)")
    if zero is None:  # DeepSpeed restores the module itself
        load_trainable_state(model, torch.load(path / "trainable.pt", weights_only=True))
    engine.load(path)
    methods.load_state_dict(torch.load(path / "methods.pt", weights_only=True))
    torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["torch"])
    return int(json.loads((path / "state.json").read_text())["step"])
