"""The method plug-in protocol and registry.

A method is a small class that decides *when* something happens; pure functions in its module do
the math. Methods compose as a list (``[qlora, lora, tokentune, ist]``): the training loop calls
each hook on every method in ``order`` and never branches on method names.

Hooks (all optional, called by ``tokentune.train``):

- ``load_kwargs()``            -> extra ``from_pretrained`` kwargs (e.g. QLoRA's quantization config)
- ``prepare(model)``           -> the model to train (wrap, freeze, hook modules)
- ``param_groups(model)``      -> optimizer parameter groups, or None (IST: one group per layer)
- ``on_step_start(ctx)``       before the micro-batches of an optimizer step (sample layers, ...)
- ``compute_loss(model, batch, ctx)`` -> loss tensor, or None to let the next method/stock forward do it
- ``on_before_step(ctx)``      after the micro-batches' backward, before the optimizer step (plain
                                engine: gradients are on ``p.grad``; under DeepSpeed they live in the engine)
- ``on_step_end(ctx)``         after ``optimizer.step()`` (probe, restore optimizer groups, ...)
- ``metrics()``                -> dict merged into the step's report
- ``state_dict()`` / ``load_state_dict(state)``: method state saved with checkpoints
- ``train_mode_only``: methods only touch training; eval, generation and merge use the stock forward.

What a method knows without a model (class methods, called by validation and the memory estimate):
- ``check_shape(settings, shape, section)``: raise ``ConfigError`` if the settings cannot work on a
  model of this ``ModelShape`` (IST/RST: a layer budget above the decoder's layer count).
- ``memory_terms(settings, terms)``: adjust the estimate's ``MemoryTerms`` (``tokentune.estimate``).

``MethodStack`` (``tokentune.methods.stack``) runs these hooks in order; the training loop, the
benchmarks and the tests all drive it.

Capability flags the loop and validators read:
- ``kind``: 'trainer' (decides which weights train: full, lora, dora; exactly one per run),
  'quantizer' (qlora), 'modifier' (tokentune, ist, rst).
- ``requires_any``: at least one of these must also be in the list.
- ``conflicts``: none of these may be in the list.
- ``overrides_loss``: provides ``compute_loss`` (at most one such method per run).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from tokentune.errors import ConfigError
from tokentune.settings import build_section

if TYPE_CHECKING:
    from tokentune.estimate import MemoryTerms
    from tokentune.shape import ModelShape

#: the label of a position that gets no loss (PyTorch's ``cross_entropy`` default): prompt tokens and
#: padding in the batches ``tokentune.data`` builds, and what a method's loss skips
IGNORE_INDEX = -100


@dataclass
class NoConfig:
    """A method without settings."""


@dataclass
class StepContext:
    """What a hook may read or use during one optimizer step."""

    step: int  # optimizer step about to run (0-based) or just run (in on_step_end)
    model: torch.nn.Module
    optimizer: Any = None
    batch: dict[str, torch.Tensor] | None = None  # the current micro-batch (compute_loss)
    probe_batch: Callable[[], dict[str, torch.Tensor]] | None = None  # draws a training batch for probes
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast: Callable[[], Any] | None = None  # context manager factory the forward runs under
    world_size: int = 1
    rank: int = 0


class Method:
    name: ClassVar[str] = ""
    config_cls: ClassVar[type] = NoConfig
    kind: ClassVar[str] = "modifier"
    order: ClassVar[int] = 50  # hook order: quantizer 10, trainer 20, modifiers 30+
    requires_any: ClassVar[tuple[str, ...]] = ()
    conflicts: ClassVar[tuple[str, ...]] = ()
    overrides_loss: ClassVar[bool] = False
    #: optional packages only this method needs (peft imports them when installed; a process that
    #: trains none of the methods naming one may skip them: ``tokentune.methods.skip_unused_packages``)
    packages: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any) -> None:
        self.config = config

    # ---- what the method knows without a model ---------------------------------------------------
    @classmethod
    def check_shape(cls, settings: Any, shape: ModelShape, section: str) -> None:
        """Raise ``ConfigError`` (naming ``section.<key>``) if ``settings`` cannot work on ``shape``."""
        return None

    @classmethod
    def memory_terms(cls, settings: Any, terms: MemoryTerms) -> None:
        """Adjust the memory estimate's terms for this method (see ``tokentune.estimate``)."""
        return None

    # ---- hooks (defaults do nothing) -----------------------------------------------------------
    def load_kwargs(self) -> dict[str, Any]:
        return {}

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def param_groups(self, model: torch.nn.Module) -> list[dict[str, Any]] | None:
        return None

    def on_step_start(self, ctx: StepContext) -> None:
        return None

    def compute_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], ctx: StepContext):
        return None

    def on_before_step(self, ctx: StepContext) -> None:
        return None

    def on_step_end(self, ctx: StepContext) -> None:
        return None

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    REGISTRY[cls.name] = cls
    return cls


def known_methods() -> str:
    return ", ".join(sorted(REGISTRY))


def validate_methods(names: list[str], configs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check a method list's composition; return a config dataclass per listed method.

    Raises ``ConfigError`` naming the method and what would be accepted.
    """
    configs = dict(configs or {})
    if not isinstance(names, list) or not names:
        raise ConfigError(f"methods={names!r} is invalid: expected a non-empty list, e.g. [lora, tokentune]")
    for n in names:
        if n not in REGISTRY:
            raise ConfigError(f"unknown method {n!r}; known: {known_methods()}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(
            f"methods={names!r} lists {', '.join(map(repr, twice))} twice; each method at most once"
        )
    trainers = [n for n in names if REGISTRY[n].kind == "trainer"]
    if len(trainers) != 1:
        accepted = ", ".join(sorted(n for n, c in REGISTRY.items() if c.kind == "trainer"))
        raise ConfigError(
            f"methods={names!r} must contain exactly one of: {accepted} (it decides which weights train)"
        )
    for n in names:
        cls = REGISTRY[n]
        if cls.requires_any and not any(r in names for r in cls.requires_any):
            raise ConfigError(
                f"method {n!r} requires one of: {', '.join(cls.requires_any)} (methods={names!r})"
            )
        for c in cls.conflicts:
            if c in names:
                raise ConfigError(f"method {n!r} cannot be combined with {c!r} (methods={names!r})")
    if sum(REGISTRY[n].overrides_loss for n in names) > 1:
        raise ConfigError(f"methods={names!r}: at most one method may replace the forward/loss")
    out: dict[str, Any] = {}
    for n in names:
        cfg = configs.get(n)
        if cfg is None or not dataclasses.is_dataclass(cfg):
            cfg = build_section(n, REGISTRY[n].config_cls, cfg)
        out[n] = cfg
    # sections for methods not in the list are kept (sweeps may switch methods on and off)
    for n, cfg in configs.items():
        out.setdefault(
            n, cfg if dataclasses.is_dataclass(cfg) else build_section(n, REGISTRY[n].config_cls, cfg)
        )
    return out
