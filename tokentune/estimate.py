"""A per-worker memory estimate composed from the methods' own terms. Pure: no model is loaded.

    est = estimate_memory(cfg)            # MemoryEstimate | None (None: the model's shape is unknown)
    est.total_gb, est.short()

The estimate starts from a dense model in ``model.dtype`` with nothing trainable; each listed method
adjusts the terms it knows through ``Method.memory_terms`` (the trainer its trainable parameters,
QLoRA the bytes of the linear weights, TokenTune the share of tokens whose activations are saved,
IST/RST the layers that get gradients). ZeRO's partitioning is a compute setting, applied here.
Adding a method never means editing this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tokentune.methods import MethodStack
from tokentune.shape import ModelShape, model_shape

if TYPE_CHECKING:
    from tokentune.config import RunConfig

DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}
GB = 1024**3


@dataclass
class MemoryTerms:
    """The quantities the estimate composes; ``Method.memory_terms`` adjusts them in hook order."""

    shape: ModelShape
    cfg: RunConfig
    weight_bytes: float  # bytes per element of the model dtype (embeddings, norms)
    linear_weight_bytes: float  # bytes per element of the decoder layers' linear weights
    trainable_per_layer: int = 0  # trainable parameters inside one decoder layer
    trainable_outside: int = 0  # trainable parameters outside the decoder layers (embeddings, head)
    trainable_bytes: float = 4  # bytes per trainable element (and its gradient, AdamW states)
    active_layers: int = 0  # layers that get gradients in a step (all, unless a method samples)
    token_share: float = 1.0  # share of each sequence whose activations are saved for backward

    @property
    def linear_params_per_layer(self) -> int:
        return sum(i * o for i, o in self.shape.linear_dims().values())

    @property
    def embedding_params(self) -> int:
        return self.shape.vocab * self.shape.hidden * (1 if self.shape.tied else 2)


@dataclass
class MemoryEstimate:
    """A rough per-worker estimate in GB (weights + grads + optimizer + activations); no runtime overhead."""

    weights_gb: float
    trainable_params: int
    optimizer_gb: float  # gradients + AdamW states of the trainable parameters
    activations_gb: float  # saved for backward, one micro-batch of max_length tokens, plus logits
    total_gb: float

    def short(self) -> str:
        parts = (self.weights_gb, self.optimizer_gb, self.activations_gb)
        return f"{fmt_gb(self.total_gb)} (weights {fmt_gb(parts[0])} + opt {fmt_gb(parts[1])} + act {fmt_gb(parts[2])})"


def fmt_gb(x: float) -> str:
    """``1.23 GB`` or ``45.6 MB`` below 1 GB."""
    return f"{x:.2f} GB" if x >= 1 else f"{x * 1024:.1f} MB"


def memory_terms(cfg: RunConfig, shape: ModelShape) -> MemoryTerms:
    """The dense starting point, then every listed method's adjustments (in hook order)."""
    wbytes = DTYPE_BYTES.get(cfg.model.dtype, 4)
    terms = MemoryTerms(
        shape=shape, cfg=cfg, weight_bytes=wbytes, linear_weight_bytes=wbytes, active_layers=shape.layers
    )
    for cls, settings in MethodStack.classes(cfg.methods, cfg.method_configs):
        cls.memory_terms(settings, terms)
    return terms


def estimate_memory(cfg: RunConfig, shape: ModelShape | None = None) -> MemoryEstimate | None:
    """Estimate one worker's memory for ``cfg`` (None when the model's shape cannot be read).

    - weights: decoder linears at ``linear_weight_bytes``, embeddings and norms at the model dtype;
    - optimizer: gradients of the trainable parameters of the active layers (and outside them), plus
      two AdamW states of every trainable parameter; ZeRO 1/2/3 divide states / gradients / weights
      by the workers;
    - activations per micro-batch of ``batch_size x max_length`` tokens, per layer per token
      ``7h + 3kv + 4I`` values for the saved share of tokens and only keys and values for the rest;
      nothing below the lowest active layer (expected depth); logits (fp32 + their gradient) for the
      saved tokens.
    """
    shape = shape or model_shape(cfg.model.name_or_path)
    if shape is None:
        return None
    t = memory_terms(cfg, shape)
    h, inter, L, V = shape.hidden, shape.intermediate, shape.layers, shape.vocab
    kv = shape.kv_heads * shape.head_dim
    norms = L * 2 * h + h
    weights = (
        L * t.linear_params_per_layer * t.linear_weight_bytes + (t.embedding_params + norms) * t.weight_bytes
    )
    trainable = L * t.trainable_per_layer + t.trainable_outside
    active = max(1, min(L, t.active_layers))
    grads = (active * t.trainable_per_layer + t.trainable_outside) * t.trainable_bytes
    states = 2 * trainable * t.trainable_bytes
    zero, workers = cfg.compute.zero_stage, cfg.compute.workers
    if zero is not None and workers > 1:
        states /= workers if zero >= 1 else 1
        grads /= workers if zero >= 2 else 1
        weights /= workers if zero >= 3 else 1

    abytes = 2 if cfg.train.bf16 == "true" else t.weight_bytes
    tokens = cfg.train.batch_size * cfg.data.max_length
    share = t.token_share
    per_token_layer = 7 * h + 3 * kv + 4 * inter
    per_layer = tokens * (share * per_token_layer + (1 - share) * 2 * kv) * abytes
    depth = L - (L - active) / (active + 1)  # expected layers above the lowest active one
    logits = tokens * share * V * 8
    activations = depth * per_layer + logits

    total = weights + grads + states + activations
    return MemoryEstimate(
        weights_gb=weights / GB,
        trainable_params=int(trainable),
        optimizer_gb=(grads + states) / GB,
        activations_gb=activations / GB,
        total_gb=total / GB,
    )
