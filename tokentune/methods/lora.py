"""LoRA and DoRA through peft (no LoRA of our own)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from tokentune.errors import ConfigError, check, is_int, is_number
from tokentune.methods.base import Method, register
from tokentune.settings import setting

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSettings:
    """Low-rank adapters on the listed linear modules of every decoder layer (section ``lora``)."""

    section: ClassVar[str] = "lora"

    rank: int = setting(8, "adapter rank r (an integer >= 1)")
    alpha: float | None = setting(None, "scaling numerator; null = 2 x rank")
    dropout: float = setting(0.0, "adapter dropout, in [0, 1)")
    target_modules: list[str] = setting(
        help="names of the linear modules that get adapters", factory=lambda: list(DEFAULT_TARGETS)
    )
    bias: str = setting("none", "peft bias training: none, all or lora_only")
    use_rslora: bool = setting(False, "rank-stabilised scaling alpha / sqrt(rank) (peft use_rslora)")
    modules_to_save: list[str] | None = setting(
        None, "extra modules trained in full and saved with the adapter (e.g. a classifier head)"
    )

    def __post_init__(self) -> None:
        prefix = self.section
        check(is_int(self.rank) and self.rank >= 1, f"{prefix}.rank", self.rank, "an integer >= 1, e.g. 8")
        if self.alpha is None:
            self.alpha = 2 * self.rank
        check(
            is_number(self.alpha) and self.alpha > 0,
            f"{prefix}.alpha",
            self.alpha,
            "a number > 0 (often 2 * rank)",
        )
        check(
            is_number(self.dropout) and 0 <= self.dropout < 1,
            f"{prefix}.dropout",
            self.dropout,
            "a number in [0, 1)",
        )
        check(
            isinstance(self.target_modules, (list, tuple))
            and bool(self.target_modules)
            and all(isinstance(t, str) for t in self.target_modules),
            f"{prefix}.target_modules",
            self.target_modules,
            "module names",
        )
        check(
            self.bias in ("none", "all", "lora_only"), f"{prefix}.bias", self.bias, "none, all or lora_only"
        )


@dataclass
class DoraSettings(LoraSettings):
    """Weight-decomposed low-rank adapters (section ``dora``): the same settings as ``lora``."""

    section: ClassVar[str] = "dora"


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
            f"{settings.section}.target_modules: {missing} not found in the model; linear modules: {linear}"
        )
    task = "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM"
    return get_peft_model(model, peft_config(settings, use_dora, task))


def adapter_params_per_layer(settings: LoraSettings, dims: dict[str, tuple[int, int]], dora: bool) -> int:
    """Adapter parameters in one decoder layer: ``rank * (in + out)`` per targeted module (DoRA: + out)."""
    targets = [t for t in settings.target_modules if t in dims]
    return sum(settings.rank * (dims[t][0] + dims[t][1]) + (dims[t][1] if dora else 0) for t in targets)


class _Adapter(Method):
    """Shared by LoRA and DoRA: peft adapters on the base, which stays frozen."""

    kind = "trainer"
    order = 20
    use_dora: ClassVar[bool] = False

    @classmethod
    def memory_terms(cls, settings: LoraSettings, terms) -> None:
        dims = terms.shape.linear_dims()
        targets = [t for t in settings.target_modules if t in dims]
        r = settings.rank
        terms.trainable_per_layer = adapter_params_per_layer(settings, dims, dora=cls.use_dora)
        terms.trainable_bytes = 4  # adapters train in fp32
        terms.added_tensors_per_layer = [n for t in targets for n in (r * dims[t][0], r * dims[t][1])]
        terms.saved_inputs = set(targets)  # lora_A keeps its module's input
        terms.extra_per_token = r * len(targets)  # lora_A's output, kept by lora_B
        if terms.autocast or terms.compute_bytes != terms.trainable_bytes:
            # peft casts each adapter's input to the adapter's fp32 (and autocast casts it back to bf16):
            # every adapted module keeps its own copy instead of sharing its group's input
            terms.input_elems = sum(dims[t][0] for t in targets)
            terms.input_bytes = 2 if terms.autocast else terms.trainable_bytes
        if terms.autocast:  # autocast's bf16 copies of lora_A and lora_B, saved by their matmuls
            terms.extra_bytes_per_layer += 2 * r * sum(dims[t][0] + dims[t][1] for t in targets)
        if cls.use_dora:  # peft's DoRA: magnitudes; per token the base and adapter outputs; an in x in eye
            terms.added_tensors_per_layer += [dims[t][1] for t in targets]
            # (gate/up outputs are also the MLP's saved inputs: counted once)
            # peft computes DoRA in the adapter's fp32 unless autocast runs it in bf16; its per-token
            # outputs in the base layer's output dtype where that is wider (QLoRA: the fp32 stream's)
            dora_bytes = terms.compute_bytes if terms.autocast else terms.trainable_bytes
            out_bytes = terms.linear_out_bytes if terms.linear_out_bytes is not None else dora_bytes
            terms.extra_bytes_per_token += out_bytes * sum(
                (1 if t in ("gate_proj", "up_proj") else 2) * dims[t][1] for t in targets
            )
            per_layer = sum(i * i + i * r + 3 * o for i, o in (dims[t] for t in targets))
            terms.extra_bytes_per_layer += dora_bytes * per_layer

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return wrap_with_adapter(model, self.config, use_dora=self.use_dora)


@register
class LoRA(_Adapter):
    """Low-rank adapters (peft LoRA)."""

    name = "lora"
    config_cls = LoraSettings


@register
class DoRA(_Adapter):
    """Weight-decomposed LoRA (peft ``use_dora=True``)."""

    name = "dora"
    config_cls = DoraSettings
    use_dora = True
