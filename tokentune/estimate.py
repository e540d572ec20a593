"""A per-worker memory estimate composed from the methods' own terms. Pure: no model is loaded.

    est = estimate_memory(cfg)            # MemoryEstimate | None (None: the model's shape is unknown)
    est.total_gb, est.short(), est.metrics()

It estimates the same four components ``tokentune.memory.MemoryMeter`` measures (weights, grads,
optimizer, activations; see there), for a micro-batch of ``train.batch_size`` sequences that fill
``data.max_length`` (shorter data needs less). It starts from a dense model in ``model.dtype`` with
nothing trainable; each listed method adjusts the terms it knows through ``Method.memory_terms``
(the trainer its trainable parameters and which inputs autograd saves, QLoRA the bytes of the linear
weights, TokenTune the share of tokens whose activations are saved, IST/RST the layers that get
gradients). ZeRO's partitioning is a compute setting, applied here, and so are DeepSpeed's own terms
(:func:`deepspeed_terms`: its bf16 casts every floating parameter; :func:`deepspeed_buffer_bytes`:
its gradient bucket, the ``buffers`` term). Adding a method never means editing this file.

Activations are counted the way PyTorch saves them for a Llama-style layer (per token, in elements):
each RMSNorm its input (and, when its weight trains, the normalised input); the input of every linear
whose weight or adapter trains (q/k/v share one, gate/up share one, o_proj's is the attention
output); attention's query, keys, values, output and log-sum-exp; the MLP's gate, up and SiLU
outputs; the logits in fp32. IST/RST is estimated at its peak: the step whose lowest trained layer is
the first, so every layer keeps what backward through it needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokentune.engine import ZERO3_PERSISTENCE_THRESHOLD, zero_bucket_elements
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
    added_tensors_per_layer: list[int] = field(default_factory=list)  # sizes of parameters a method adds
    base_trains: bool = False  # the model's own weights train (full fine-tuning): norms and head too
    saved_inputs: set[str] = field(default_factory=set)  # linear modules whose input autograd keeps
    extra_per_token: int = 0  # per trained layer and token, saved by the method (adapter intermediates)
    extra_per_layer: int = 0  # per trained layer and micro-batch, independent of the tokens
    active_layers: int = 0  # layers that get gradients in a step (all, unless a method samples)
    token_share: float = 1.0  # share of each sequence whose activations are saved for backward
    kv_width: int = 0  # elements of keys + values kept per token of the whole sequence per layer
    selection_mask: bool = False  # a split forward keeps a [selected x all] attention mask

    @property
    def linear_params_per_layer(self) -> int:
        return sum(i * o for i, o in self.shape.linear_dims().values())

    @property
    def embedding_params(self) -> int:
        return self.shape.vocab * self.shape.hidden * (1 if self.shape.tied else 2)


@dataclass
class MemoryEstimate:
    """One worker's estimated training memory in GB (the components ``MemoryMeter`` measures)."""

    weights_gb: float
    grads_gb: float
    optimizer_gb: float  # AdamW states (+ ZeRO's fp32 copy of the weights)
    activations_gb: float  # saved for backward, one micro-batch of max_length tokens, logits included
    trainable_params: int
    buffers_gb: float = 0.0  # DeepSpeed's gradient bucket (not in MemoryMeter's breakdown)

    @property
    def breakdown_gb(self) -> float:
        """The four components ``MemoryMeter`` measures: compare with ``memory/train_gb``."""
        return self.weights_gb + self.grads_gb + self.optimizer_gb + self.activations_gb

    @property
    def total_gb(self) -> float:
        """What must fit: the breakdown and DeepSpeed's buffers."""
        return self.breakdown_gb + self.buffers_gb

    def short(self) -> str:
        parts = (self.weights_gb, self.grads_gb + self.optimizer_gb, self.activations_gb)
        return f"{fmt_gb(self.total_gb)} (weights {fmt_gb(parts[0])} + opt {fmt_gb(parts[1])} + act {fmt_gb(parts[2])})"

    def metrics(self) -> dict[str, float]:
        """``memory/estimate_*`` keys, next to the measured ``memory/*`` of a run."""
        parts = ("weights", "grads", "optimizer", "activations")
        out = {f"memory/estimate_{k}_gb": getattr(self, f"{k}_gb") for k in parts}
        if self.buffers_gb:
            out["memory/estimate_buffers_gb"] = self.buffers_gb
        out["memory/estimate_gb"] = self.total_gb
        return out


def fmt_gb(x: float) -> str:
    """``1.23 GB`` or ``45.6 MB`` below 1 GB."""
    return f"{x:.2f} GB" if x >= 1 else f"{x * 1024:.1f} MB"


def memory_terms(cfg: RunConfig, shape: ModelShape) -> MemoryTerms:
    """The dense starting point, then every listed method's adjustments (in hook order)."""
    wbytes = DTYPE_BYTES.get(cfg.model.dtype, 4)
    terms = MemoryTerms(
        shape=shape,
        cfg=cfg,
        weight_bytes=wbytes,
        linear_weight_bytes=wbytes,
        active_layers=shape.layers,
        kv_width=2 * shape.kv_heads * shape.head_dim,
    )
    for cls, settings in MethodStack.classes(cfg.methods, cfg.method_configs):
        cls.memory_terms(settings, terms)
    return terms


def estimate_memory(cfg: RunConfig, shape: ModelShape | None = None) -> MemoryEstimate | None:
    """Estimate one worker's memory for ``cfg`` (None when the model's shape cannot be read)."""
    shape = shape or model_shape(cfg.model.name_or_path)
    if shape is None:
        return None
    t = memory_terms(cfg, shape)
    zero, workers = cfg.compute.zero_stage, cfg.compute.workers
    if zero is not None:
        deepspeed_terms(t)
    shards = workers if zero is not None else 1
    L = shape.layers
    trainable = L * t.trainable_per_layer + t.trainable_outside
    active = max(1, min(L, t.active_layers))

    weights = _weights_bytes(t, shards if zero == 3 else 1)
    stepped = active * t.trainable_per_layer + t.trainable_outside  # get a gradient in a step
    # optimizer states exist for every trainable parameter once each has had a gradient (IST: a few steps)
    if zero is None:  # plain AdamW: gradients, two states per parameter
        grads = stepped * t.trainable_bytes
        optimizer = 2 * trainable * t.trainable_bytes
    else:  # DeepSpeed: fp32 partitions of each parameter group: gradient, master copy, 2 states
        grads = stepped * 4 / (shards if zero >= 2 else 1)
        optimizer = 3 * trainable * 4 / (shards if zero >= 1 else 1)
    return MemoryEstimate(
        weights_gb=weights / GB,
        grads_gb=grads / GB,
        optimizer_gb=optimizer / GB,
        activations_gb=_activation_bytes(t, active) / GB,
        trainable_params=int(trainable),
        buffers_gb=deepspeed_buffer_bytes(cfg, trainable) / GB,
    )


def estimate_measured(cfg: RunConfig, memory: dict[str, float]) -> MemoryEstimate | None:
    """The estimate at the micro-batch shape a run measured its peak on (``memory/peak_batch`` x
    ``memory/peak_seq_len``): comparable with the measured breakdown whatever the data's lengths."""
    batch, seq = memory.get("memory/peak_batch"), memory.get("memory/peak_seq_len")
    if not (batch and seq):
        return estimate_memory(cfg)
    at = cfg.copy()
    at.train.batch_size, at.data.max_length = int(batch), int(seq)
    return estimate_memory(at)


# ---- DeepSpeed's own terms (compute.zero_stage set) ------------------------------------------------------
def deepspeed_bf16(cfg: RunConfig) -> bool:
    """DeepSpeed's bf16 is on: ``train.py`` enables it with autocast (``train.bf16`` true, or auto on a GPU)."""
    return cfg.train.bf16 == "true" or (cfg.train.bf16 == "auto" and cfg.compute.use_gpu is True)


def deepspeed_terms(t: MemoryTerms) -> None:
    """DeepSpeed's bf16 casts every floating parameter and buffer to bf16 (the base, norms, embeddings and
    adapters; 4-bit weights stay packed); its optimizer then keeps the fp32 master copy, gradient and
    AdamW states per ZeRO partition (``estimate_memory``)."""
    if not deepspeed_bf16(t.cfg):
        return
    t.weight_bytes = 2
    if t.linear_weight_bytes >= 2:  # a floating linear weight (QLoRA's 4-bit ones are not cast)
        t.linear_weight_bytes = 2
    t.trainable_bytes = 2


def deepspeed_buffer_bytes(cfg: RunConfig, trainable: int) -> float:
    """DeepSpeed's gradient bucket: ZeRO-1/2 allocate one per micro-step, ZeRO-3 one for the run, of
    ``tokentune.engine.zero_bucket_elements(trainable)`` elements in the parameters' dtype. ZeRO-0 has
    none; no DeepSpeed, no bucket."""
    zero = cfg.compute.zero_stage
    if not zero:
        return 0.0
    nbytes = 2 if deepspeed_bf16(cfg) else DTYPE_BYTES.get(cfg.model.dtype, 4)
    return zero_bucket_elements(trainable) * nbytes


def _weights_bytes(t: MemoryTerms, shards: int) -> float:
    """Parameters and adapters held by one worker; ZeRO-3 (``shards`` > 1) keeps small ones whole."""
    s = t.shape
    per_layer = [(i * o, t.linear_weight_bytes) for i, o in s.linear_dims().values()]
    per_layer += [(s.hidden, t.weight_bytes)] * 2 + [
        (n, t.trainable_bytes) for n in t.added_tensors_per_layer
    ]
    outside = [(s.vocab * s.hidden, t.weight_bytes)] * (1 if s.tied else 2) + [(s.hidden, t.weight_bytes)]

    def held(n: int, nbytes: float) -> float:
        if shards == 1:
            return n * nbytes
        whole = n < ZERO3_PERSISTENCE_THRESHOLD
        return n * nbytes * ((1 if whole else 0) + 1 / shards)

    return s.layers * sum(held(n, b) for n, b in per_layer) + sum(held(n, b) for n, b in outside)


def _activation_bytes(t: MemoryTerms, active: int) -> float:
    """Saved for backward in one micro-batch; see the module docstring for what each term is."""
    s, cfg = t.shape, t.cfg
    h, inter, heads = s.hidden, s.intermediate, s.heads
    q = heads * s.head_dim
    bf16 = cfg.train.bf16 == "true" or (cfg.train.bf16 == "auto" and cfg.compute.use_gpu is True)
    abytes = 2 if bf16 else t.weight_bytes  # autocast's matmul outputs (norms and logits stay fp32)
    seq = cfg.data.max_length
    tokens = cfg.train.batch_size * seq
    share = t.token_share

    norm = 2 * h + 1 if t.base_trains else h + 1
    core = 2 * norm + 2 * q + heads + 3 * inter  # norms, query + output + lse, gate/up/SiLU outputs
    inputs = 0
    if t.saved_inputs & {"q_proj", "k_proj", "v_proj"}:
        inputs += h
    if t.saved_inputs & {"gate_proj", "up_proj"}:
        inputs += h
    if "down_proj" in t.saved_inputs:
        inputs += inter
    trained = core + inputs + t.extra_per_token
    frozen = core  # a layer above the lowest trained one: backward passes through it, nothing trains
    per_layer_tokens = tokens * share * (active * trained + (s.layers - active) * frozen)
    kv = tokens * t.kv_width * s.layers  # keys and values of every token (TokenTune: all rows)
    head = tokens * share * (norm + (h if t.base_trains else 0))  # final norm, lm_head input
    selection = tokens * share * seq if t.selection_mask else 0
    logits = tokens * share * s.vocab * 4  # log-softmax output, fp32 whatever the activation dtype
    constant = active * t.extra_per_layer
    return (per_layer_tokens + kv + head + selection + constant) * abytes + logits
