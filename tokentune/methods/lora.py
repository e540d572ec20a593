"""LoRA and DoRA through peft (no LoRA of our own)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokentune.errors import ConfigError
from tokentune.methods.base import Method, register

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSettings:
    """Low-rank adapters on the listed linear modules of every decoder layer."""

    rank: int = 8
    alpha: float | None = None  # None: 2 * rank
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    bias: str = "none"  # none | all | lora_only
    use_rslora: bool = False
    modules_to_save: list[str] | None = None  # extra fully trained modules (e.g. a classifier head)

    def __post_init__(self) -> None:
        prefix = type(self).section
        if not (isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1):
            raise ConfigError(f"{prefix}.rank={self.rank!r} is invalid: expected an integer >= 1, e.g. 8")
        if self.alpha is None:
            self.alpha = 2 * self.rank
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ConfigError(
                f"{prefix}.alpha={self.alpha!r} is invalid: expected a number > 0 (often 2 * rank)"
            )
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{prefix}.dropout={self.dropout!r} is invalid: expected a number in [0, 1)")
        if not self.target_modules or not all(isinstance(t, str) for t in self.target_modules):
            raise ConfigError(
                f"{prefix}.target_modules={self.target_modules!r} is invalid: expected module names"
            )
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"{prefix}.bias={self.bias!r} is invalid: expected none, all or lora_only")

    section = "lora"


@dataclass
class DoraSettings(LoraSettings):
    section = "dora"


def peft_config(settings: LoraSettings, use_dora: bool, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias=settings.bias,
        use_rslora=settings.use_rslora,
        use_dora=use_dora,
        modules_to_save=settings.modules_to_save,
        task_type=task_type,
    )


def wrap_with_adapter(model: torch.nn.Module, settings: LoraSettings, use_dora: bool) -> torch.nn.Module:
    """Freeze the base and add peft LoRA/DoRA adapters; a missing target module is a clear error."""
    from peft import get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in settings.target_modules if t not in names]
    if missing:
        linear = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        raise ConfigError(
            f"{type(settings).section}.target_modules: {missing} not found in the model; linear modules: {linear}"
        )
    task = "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM"
    return get_peft_model(model, peft_config(settings, use_dora, task))


def adapter_params_per_layer(settings: LoraSettings, dims: dict[str, tuple[int, int]], dora: bool) -> int:
    """Adapter parameters in one decoder layer: ``rank * (in + out)`` per targeted module (DoRA: + out)."""
    targets = [t for t in settings.target_modules if t in dims]
    return sum(settings.rank * (dims[t][0] + dims[t][1]) + (dims[t][1] if dora else 0) for t in targets)


@register
class LoRA(Method):
    name = "lora"
    config_cls = LoraSettings
    kind = "trainer"
    order = 20

    @classmethod
    def memory_terms(cls, settings: LoraSettings, terms) -> None:
        terms.trainable_per_layer = adapter_params_per_layer(settings, terms.shape.linear_dims(), dora=False)
        terms.trainable_bytes = 4  # adapters train in fp32

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return wrap_with_adapter(model, self.config, use_dora=False)


@register
class DoRA(Method):
    """Weight-decomposed LoRA (peft ``use_dora=True``)."""

    name = "dora"
    config_cls = DoraSettings
    kind = "trainer"
    order = 20

    @classmethod
    def memory_terms(cls, settings: DoraSettings, terms) -> None:
        terms.trainable_per_layer = adapter_params_per_layer(settings, terms.shape.linear_dims(), dora=True)
        terms.trainable_bytes = 4

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return wrap_with_adapter(model, self.config, use_dora=True)
