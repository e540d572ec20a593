"""QLoRA: a 4-bit (bitsandbytes) frozen base under LoRA or DoRA adapters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokentune.errors import check
from tokentune.methods.base import Method, register
from tokentune.settings import setting


@dataclass
class QLoraSettings:
    """The 4-bit base of QLoRA (section ``qlora``), passed to bitsandbytes."""

    quant_type: str = setting("nf4", "4-bit data type: nf4 or fp4")
    compute_dtype: str = setting(
        "bfloat16", "dtype the 4-bit layers compute in: bfloat16, float32 or float16"
    )
    double_quant: bool = setting(
        True, "also quantize the quantization constants (about 0.37 bits per weight saved)"
    )

    def __post_init__(self) -> None:
        check(self.quant_type in ("nf4", "fp4"), "qlora.quant_type", self.quant_type, "nf4 or fp4")
        check(
            self.compute_dtype in ("bfloat16", "float32", "float16"),
            "qlora.compute_dtype",
            self.compute_dtype,
            "bfloat16, float32 or float16",
        )


def bnb_config(settings: QLoraSettings):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.quant_type,
        bnb_4bit_compute_dtype=getattr(torch, settings.compute_dtype),
        bnb_4bit_use_double_quant=settings.double_quant,
    )


@register
class QLoRA(Method):
    name = "qlora"
    config_cls = QLoraSettings
    kind = "quantizer"
    order = 10
    requires_any = ("lora", "dora")
    conflicts = ("full",)
    packages = ("bitsandbytes",)

    @classmethod
    def memory_terms(cls, settings: QLoraSettings, terms) -> None:
        # 4 bits per weight plus one block scale per 64 weights: uint8 (and an fp32 one per 256
        # blocks) with double quantization, else fp32
        scales = 1 / 64 + 4 / (64 * 256) if settings.double_quant else 4 / 64
        terms.linear_weight_bytes = 0.5 + scales
        # prepare_model_for_kbit_training upcasts every other parameter (embeddings, norms, head) to
        # fp32, so the residual stream is fp32 and Linear4bit returns fp32: the MLP's products stay fp32
        terms.weight_bytes = 4
        terms.linear_out_bytes = 4

    def load_kwargs(self) -> dict[str, Any]:
        return {"quantization_config": bnb_config(self.config)}

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        from peft import prepare_model_for_kbit_training

        keep_one_cpu_kernel(model)
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def keep_one_cpu_kernel(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On a CPU with AVX512-BF16, bitsandbytes (seen with 0.50.2) converts a ``Linear4bit``'s weight to a packed
    layout the first time the module runs in eval mode without grad (an IST probe, in-loop
    validation), and every later forward, training included, then runs another kernel with slightly
    different rounding. Training would change numerics mid-run, and a run resumed from a checkpoint
    (saved unpacked) would not repeat the uninterrupted one. Training keeps the one kernel instead.
    """
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
