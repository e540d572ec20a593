"""What a run writes to disk and reads back: checkpoints and the final artifact.

- ``checkpoint-NNNNNN/`` (every ``train.save_every`` steps, the newest ``train.keep_checkpoints`` kept):
  trainable weights (``trainable.pt``, gathered under ZeRO-3), the engine's optimizer and scheduler
  state, each method's state (``methods.pt``), the torch RNG (``rng.pt``: the CPU generator, and every
  CUDA device's when CUDA is available) and the step (``state.json``, written last: a checkpoint
  without it is incomplete and never resumed from). Everything is read back onto the CPU or the
  rank's own device, never onto the device it was saved from.
- ``final/``: a peft adapter (adapter methods) or a full Hugging Face checkpoint (full fine-tuning),
  written on rank 0 and readable without DeepSpeed, with the tokenizer, and last ``complete.json``
  (every file's size): a ``final/`` without it is incomplete. One written before the marker existed
  counts as complete when its config and weights files read back (:func:`final_complete`). Under ZeRO-3
  the partitions are gathered one parameter at a time and only rank 0 keeps a copy (:func:`trainable_state`).

Half-written state (a run killed while writing, a full disk): :func:`check_output_dir` first sets aside
(renames to ``<name>.incomplete[-N]``, with a warning) every incomplete checkpoint and an incomplete
``final/``, so such a run can be resumed from its last complete checkpoint, or started again when it
has none. :func:`latest_checkpoint` only ever returns a complete one.

Run identity: every checkpoint carries a copy of ``run_config.json`` and its :func:`config_hash` (in
``state.json``). The hash covers what decides the trained weights; it leaves out where and how often
a run writes (``train.output_dir``, ``log_every``, ``eval_every``, ``eval_batches``, ``save_every``,
``keep_checkpoints``), ``train.max_steps`` (a run may be continued to more steps; the learning-rate
schedule then follows the new value), the resources ``compute.cpus_per_worker``/``gpus_per_worker``,
the ``eval`` section and the sections of methods not in ``methods``. :func:`check_output_dir` refuses,
before anything is loaded, a fresh run into a folder that already holds a run (checkpoints or
``final/``, of any config: a fresh run never mixes its checkpoints with older ones), a resume into a
folder holding another config's run, and (:func:`check_resume`) a checkpoint of another config or one
with no step left before ``train.max_steps``. A checkpoint written before hashes existed is checked
against the ``run_config.json`` beside it, else resumed with a warning.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tokentune.completeness import (
    INCOMPLETE,
    checkpoint_complete,
    set_aside_incomplete,
    write_complete_marker,
)
from tokentune.engine import barrier
from tokentune.errors import ConfigError
from tokentune.files import write_bytes_atomic, write_json_atomic

if TYPE_CHECKING:
    from tokentune.config import RunConfig
    from tokentune.methods import MethodStack

RUN_CONFIG = "run_config.json"  # the run's config, written by train() and copied into each checkpoint
#: keys left out of config_hash: where and how often a run writes, its length, its resources
UNHASHED = {
    "train": tuple(
        "output_dir max_steps log_every eval_every eval_batches save_every keep_checkpoints".split()
    ),
    "compute": ("cpus_per_worker", "gpus_per_worker"),
}
#: keys added after runs were hashed: left out while at these defaults, so older runs keep their hashes
LATER_KEYS = {
    "data": {"format": "alpaca", "columns": {}, "chat_template": None, "split": "train", "subset": None,
             "revision": None},
    "train": {"epochs": None},
}  # fmt: skip
CORE_SECTIONS = ("model", "data", "train", "compute", "methods")  # + the sections of the listed methods


def trainable_state(
    model: torch.nn.Module, zero_stage: int | None = None, rank: int = 0
) -> dict[str, torch.Tensor]:
    """CPU copies of every trainable parameter. Under ZeRO-3 (a collective: every rank calls it) each
    parameter is gathered in turn and only ``rank`` 0 copies it: other ranks get ``{}``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return _gathered(named, rank) if zero_stage == 3 else {n: p.detach().clone().cpu() for n, p in named}


def _gathered(named: list[tuple[str, torch.Tensor]], rank: int) -> dict[str, torch.Tensor]:
    """ZeRO-3 partitions gathered one parameter at a time (one whole parameter alive per rank); rank 0
    keeps a CPU copy of each (tied names share one copy), the others nothing."""
    import deepspeed

    copies: dict[int, torch.Tensor] = {}
    for p in {id(p): p for _, p in named}.values():  # each tensor once, in the same order on every rank
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            if rank == 0:
                copies[id(p)] = p.detach().to("cpu", copy=True)
    return {n: copies[id(p)] for n, p in named} if rank == 0 else {}


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """A short sha256 of names + raw bytes: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name in sorted(state):
        _hash_tensor(h, name, state[name])
    return h.hexdigest()[:16]


def trainable_digest(model: torch.nn.Module, zero_stage: int | None = None) -> str:
    """:func:`state_digest` of :func:`trainable_state`, on every rank, without copying the weights:
    under ZeRO-3 each parameter is gathered and hashed in turn."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    h = hashlib.sha256()
    for name in sorted(named):
        if zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([named[name]], modifier_rank=None):
                _hash_tensor(h, name, named[name])
        else:
            _hash_tensor(h, name, named[name])
    return h.hexdigest()[:16]


def _hash_tensor(h, name: str, t: torch.Tensor) -> None:
    h.update(name.encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


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
        named = model.named_parameters(remove_duplicate=False)  # a full model: every (tied) name
        state = trainable_state(model, 3, rank) if is_adapter else _gathered(list(named), rank)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if is_adapter:
            from peft import get_peft_model_state_dict

            sd = get_peft_model_state_dict(model, state_dict=_full_state_with(model, state))
            model.save_pretrained(str(out), state_dict=sd)
        else:
            model.save_pretrained(str(out), state_dict=_full_state_with(model, state))
        tokenizer.save_pretrained(str(out))
        write_complete_marker(out)
    return is_adapter


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
    state = trainable_state(model, zero if zero == 3 else None, rank)
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        torch.save(state, path / "trainable.pt")
        torch.save(methods.state_dict(), path / "methods.pt")
        torch.save(rng_state(), path / "rng.pt")
    barrier()
    engine.save(path)
    barrier()
    if rank == 0:
        meta: dict[str, Any] = {"step": step}
        if (out_dir / RUN_CONFIG).is_file():  # written by train() at the start of this run
            write_bytes_atomic(path / RUN_CONFIG, (out_dir / RUN_CONFIG).read_bytes())  # never via a link
            meta["config_hash"] = config_hash(_read_json(path / RUN_CONFIG))
        write_json_atomic(path / "state.json", meta)
        old = sorted(p for p in out_dir.glob("checkpoint-*") if INCOMPLETE not in p.name)[:-keep]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
    barrier()
    return path


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (one with a readable ``state.json``) under ``out_dir``, or None."""
    found = sorted(p for p in Path(out_dir).glob("checkpoint-*") if INCOMPLETE not in p.name)
    done = [p for p in found if checkpoint_complete(p)]
    return done[-1] if done else None


def load_checkpoint(
    path: Path, model, engine, methods: MethodStack, zero: int | None, cfg: RunConfig | None = None
) -> int:
    """Restore weights, optimizer-side state, method states and the RNG; returns the step to resume at.

    With ``cfg``, a checkpoint of another config or past ``train.max_steps`` is refused first
    (:func:`check_resume`; ``ConfigError``)."""
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no state.json)")
    if cfg is not None:
        check_resume(path, cfg)
    if zero is None:  # DeepSpeed restores the module itself
        load_trainable_state(model, torch.load(path / "trainable.pt", map_location="cpu", weights_only=True))
    engine.load(path)
    methods.load_state_dict(torch.load(path / "methods.pt", map_location="cpu", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", map_location="cpu", weights_only=True))
    return int(json.loads((path / "state.json").read_text())["step"])


def rng_state() -> dict[str, Any]:
    """What ``rng.pt`` holds: the CPU generator's state and, when CUDA is available, every CUDA device's
    (``torch.cuda.get_rng_state_all``: dropout on a GPU draws from those)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`; the CUDA states when both the checkpoint and this process have them
    (one per device: a resume on another device count restores none, with a warning)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if len(cuda) != torch.cuda.device_count():
        warnings.warn(
            f"the checkpoint holds the RNG of {len(cuda)} CUDA devices, this process sees "
            f"{torch.cuda.device_count()}: CUDA RNG not restored (dropout will differ)",
            stacklevel=2,
        )
        return
    torch.cuda.set_rng_state_all(cuda)


# ---- run identity --------------------------------------------------------------------------------------
def run_identity(d: dict[str, Any]) -> dict[str, Any]:
    """The part of a run config (``RunConfig.to_dict()`` or a ``run_config.json``) that decides what
    is trained: see the module docstring. JSON-normalised, so a dict read back from a file compares
    equal to the config it was written from."""
    methods = list(d.get("methods") or [])
    out = {k: v for k, v in d.items() if k in CORE_SECTIONS or k in methods}
    for section, keys in UNHASHED.items():
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k not in keys}
    for section, defaults in LATER_KEYS.items():
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k not in defaults or v != defaults[k]}
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def config_hash(cfg: RunConfig | dict[str, Any]) -> str:
    """A short sha256 of :func:`run_identity`: equal hashes mean the same training run."""
    d = cfg if isinstance(cfg, dict) else cfg.to_dict()
    text = json.dumps(run_identity(d), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def differing_keys(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The dotted keys (``train.lr``, ``methods``) whose values differ between two run configs' identities."""
    ia, ib = run_identity(a), run_identity(b)
    out = []
    for section in sorted(set(ia) | set(ib)):
        x, y = ia.get(section), ib.get(section)
        if isinstance(x, dict) and isinstance(y, dict):
            out += [f"{section}.{k}" for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
        elif x != y:
            out.append(section)
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stored_identity(ckpt: Path) -> tuple[str | None, dict[str, Any] | None]:
    """(config hash, run config dict) of a checkpoint; legacy ones: from the ``run_config.json`` beside it."""
    meta = _read_json(ckpt / "state.json") or {}
    stored = _read_json(ckpt / RUN_CONFIG) or _read_json(ckpt.parent / RUN_CONFIG)
    h = meta.get("config_hash") or (config_hash(stored) if stored else None)
    return h, stored


def _differs(stored: dict[str, Any] | None, cfg: RunConfig) -> str:
    keys = differing_keys(stored, cfg.to_dict()) if stored else []
    return f"; differing keys: {', '.join(keys[:8])}" if keys else ""


def check_resume(path: str | Path, cfg: RunConfig) -> int:
    """Refuse (``ConfigError``) to resume ``cfg`` from a checkpoint of another config, or from one with no
    step left before ``train.max_steps``. Returns the checkpoint's step."""
    path = Path(path)
    meta = _read_json(path / "state.json")
    if meta is None:
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no readable state.json)")
    stored_hash, stored = _stored_identity(path)
    mine = config_hash(cfg)
    if stored_hash is None:
        warnings.warn(f"checkpoint {path} has no config hash (older version): not verified", stacklevel=2)
    elif stored_hash != mine:
        raise ConfigError(
            f"checkpoint {path} belongs to another config (its config hash {stored_hash}, this config's "
            f"{mine}{_differs(stored, cfg)}): resume it with the config it was trained with, or train this "
            "config into another train.output_dir without --resume"
        )
    step = int(meta["step"])
    if step >= cfg.train.max_steps:
        raise ConfigError(
            f"checkpoint {path} is at step {step} and train.max_steps={cfg.train.max_steps}: nothing is left "
            f"to train; set train.max_steps above {step} to continue it"
        )
    return step


def check_output_dir(out_dir: str | Path, cfg: RunConfig, resume_from: str | Path | None = None) -> None:
    """Refuse (``ConfigError``) an output folder that would mix two runs; call before writing into it.

    Incomplete checkpoints and an incomplete ``final/`` are set aside first (:func:`set_aside_incomplete`).
    Fresh (``resume_from`` None): ``out_dir`` must hold no ``checkpoint-*`` and no ``final/`` (of any
    config: delete the folder or choose another to train again). Resume: ``resume_from`` passes
    :func:`check_resume`, and the checkpoints (or ``final/``) already in ``out_dir`` are of this config.
    """
    out_dir = Path(out_dir)
    if resume_from is not None:
        check_resume(resume_from, cfg)
    if out_dir.is_dir():
        set_aside_incomplete(out_dir)
    ckpts = sorted(p for p in out_dir.glob("checkpoint-*") if p.is_dir() and INCOMPLETE not in p.name)
    final = (out_dir / "final").is_dir()
    if not ckpts and not final:
        return
    mine = config_hash(cfg)
    found = [_stored_identity(p) for p in ckpts]
    if final:
        stored = _read_json(out_dir / RUN_CONFIG)
        found.append((config_hash(stored) if stored else None, stored))
    other = next(((h, d) for h, d in found if h is not None and h != mine), None)
    where = f"train.output_dir={str(out_dir)!r}"
    if other is not None:
        raise ConfigError(
            f"{where} holds checkpoints of another run (config hash {other[0]}; this config's {mine}"
            f"{_differs(other[1], cfg)}): choose another train.output_dir, or continue that run with its "
            "own config and --resume"
        )
    if resume_from is not None:
        return
    if any(h is None for h, _ in found):
        raise ConfigError(
            f"{where} holds checkpoints of a run whose config is unknown: choose another train.output_dir "
            "or delete that folder"
        )
    if ckpts:
        raise ConfigError(
            f"{where} already holds checkpoints of this config (config hash {mine}, newest {ckpts[-1].name}): "
            "use --resume to continue that run, or choose another train.output_dir (or delete it) to train "
            "again from scratch"
        )
    raise ConfigError(
        f"{where} already holds a finished run of this config (final/, config hash {mine}): choose another "
        "train.output_dir (or delete it) to train again"
    )
