"""A per-worker memory estimate composed from the methods' own terms. Pure: no model is loaded.

    est = estimate_memory(cfg)  # MemoryEstimate | None (the model's shape unknown); est.total_gb, est.metrics()

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
the first, so every layer keeps what backward through it needs. A checkpointed layer (``checkpointing``)
keeps only its input (with TokenTune also the other tokens' keys/values): one layer rebuilt, a transient.

Dtypes (measured on CPU with saved-tensor hooks; the same autocast rules hold on CUDA). Whatever the
model's dtype, Llama's RMSNorm saves its input upcast to fp32 (and its fp32 rsqrt), attention saves
its log-sum-exp in fp32, and the loss keeps fp32 logits. Under bf16 autocast (``train.bf16``) the
matmuls' inputs and outputs are bf16 (``MemoryTerms.compute_bytes``) whatever the weights' dtype, and
autocast's bf16 copy of every fp32 weight a matmul needs in backward is saved too: each decoder linear
and the head while the weights stay fp32 (``_autocast_weight_copies``). Without autocast everything
else is in the weights' dtype. A method that changes what its modules save says so in its terms
(LoRA: each adapter's own copy of its input; QLoRA: fp32 embeddings, norms, head and MLP products).

Besides the four measured components the estimate gives what must also fit on a device at the peak
(``MemoryEstimate.fit_gb``), which ``memory/train_gb`` does not count: ``transient_gb`` (the larger of
the logits' gradients during backward and AdamW's foreach temporary at the step on CUDA) and
``device_gb`` (see ``device_bytes``: the CUDA context and cuBLAS workspace, NCCL's buffers with more
than one worker; zero on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokentune.engine import ZERO3_PERSISTENCE_THRESHOLD, zero_bucket_elements
from tokentune.methods import MethodStack
from tokentune.optimizers import optimizer_state_bytes
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
    autocast: bool = False  # bf16 autocast over the forward (set before the methods run; they read it)
    input_elems: int | None = None  # per trained layer and token: the saved linear inputs, when a method
    # counts them itself (None: ``saved_inputs`` grouped, one input per group of modules that share it)
    input_bytes: float | None = None  # bytes per element of those inputs (None: ``compute_bytes``)
    linear_out_bytes: float | None = None  # bytes of the base linears' outputs and so of the MLP's
    # gate/up/SiLU outputs (None: ``compute_bytes``)
    extra_bytes_per_token: float = 0  # per trained layer and token, bytes a method saves (its own dtypes)
    extra_bytes_per_layer: float = 0  # per trained layer, bytes independent of the tokens
    recompute_share: float = 0.0  # share of the layers' forward run again in backward (timing.step_macs)
    checkpointed_layers: int = 0  # layers that keep only their inputs and recompute in backward

    @property
    def compute_bytes(self) -> float:
        """Bytes per element of what matmuls produce and save: bf16 under autocast, else the weights'."""
        return 2 if self.autocast else self.weight_bytes

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
    optimizer_gb: float  # optimizer states (train.optimizer; + ZeRO's fp32 copy of the weights)
    activations_gb: float  # saved for backward, one micro-batch of max_length tokens, logits included
    trainable_params: int
    buffers_gb: float = 0.0  # DeepSpeed's gradient bucket (not in MemoryMeter's breakdown)
    transient_gb: float = 0.0  # at the peak, beyond the four (logits' gradients; AdamW's foreach copy)
    device_gb: float = 0.0  # what the device holds beyond tensors (``device_bytes``; zero on CPU)
    host_gb: float = 0.0  # of the four, what ZeRO-Offload keeps in host memory (``compute.offload``)

    @property
    def breakdown_gb(self) -> float:
        """The four components ``MemoryMeter`` measures: compare with ``memory/train_gb``."""
        return self.weights_gb + self.grads_gb + self.optimizer_gb + self.activations_gb

    @property
    def total_gb(self) -> float:
        """The breakdown and DeepSpeed's buffers (``memory/estimate_gb``; the breakdown without DeepSpeed)."""
        return self.breakdown_gb + self.buffers_gb

    @property
    def fit_gb(self) -> float:
        """What must fit on the device: the four less what ZeRO-Offload keeps on the host, DeepSpeed's
        buffers, the peak's transients and the device term (``tune.max_memory_gb`` gates on this)."""
        return self.total_gb - self.host_gb + self.transient_gb + self.device_gb

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
        out["memory/estimate_transient_gb"] = self.transient_gb
        out["memory/estimate_device_gb"] = self.device_gb
        out["memory/estimate_fit_gb"] = self.fit_gb
        if self.host_gb:
            out["memory/estimate_host_gb"] = self.host_gb
        return out

    def vs_measured(self, memory: dict[str, float]) -> dict[str, float]:
        """``metrics()`` and ``memory/estimate_ratio`` (estimate / measured ``memory/train_gb``)."""
        out = self.metrics()
        measured = memory.get("memory/train_gb")
        if isinstance(measured, (int, float)) and measured > 0:
            out["memory/estimate_ratio"] = self.breakdown_gb / measured  # train_gb: no DeepSpeed buffers
        return out


def fmt_gb(x: float) -> str:
    """``1.23 GB`` or ``45.6 MB`` below 1 GB."""
    return f"{x:.2f} GB" if x >= 1 else f"{x * 1024:.1f} MB"


def memory_terms(cfg: RunConfig, shape: ModelShape) -> MemoryTerms:
    """The dense starting point, then every listed method's adjustments (in hook order)."""
    dtype = cfg.model.dtype
    if dtype == "auto":  # bf16 where CUDA supports it (tokentune.models.weights_dtype); planned as CUDA's
        dtype = "bfloat16" if cfg.compute.use_gpu is True else "float32"
    wbytes = DTYPE_BYTES.get(dtype, 4)
    terms = MemoryTerms(
        shape=shape,
        cfg=cfg,
        weight_bytes=wbytes,
        linear_weight_bytes=wbytes,
        active_layers=shape.layers,
        kv_width=2 * shape.kv_heads * shape.head_dim,
        autocast=autocast_on(cfg),
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
    if zero is None:  # the client optimizer: gradients, its states (train.optimizer: AdamW's two, 8-bit)
        grads = stepped * t.trainable_bytes
        optimizer = optimizer_state_bytes(cfg.train.optimizer, trainable_sizes(t), t.trainable_bytes)
    else:  # DeepSpeed: fp32 partitions of each parameter group: gradient, master copy, 2 states
        grads = stepped * 4 / (shards if zero >= 2 else 1)
        optimizer = 3 * trainable * 4 / (shards if zero >= 1 else 1)
    activations = _activation_bytes(t, active)
    offload = cfg.compute.offload  # ZeRO-Offload: the fp32 partitions (and ZeRO-3's weights) on the host
    host = (grads + optimizer if offload != "none" else 0) + (weights if offload == "optimizer+params" else 0)
    cuda = cfg.compute.use_gpu is True
    step_copy = (trainable * t.trainable_bytes if zero is None else optimizer / 3) if cuda else 0
    return MemoryEstimate(
        weights_gb=weights / GB,
        grads_gb=grads / GB,
        optimizer_gb=optimizer / GB,
        activations_gb=activations / GB,
        trainable_params=int(trainable),
        buffers_gb=deepspeed_buffer_bytes(cfg, trainable) / GB,
        transient_gb=max(_logits_grad_bytes(t), step_copy - activations, _recompute_bytes(t)) / GB,
        device_gb=device_bytes(workers, cuda) / GB,
        host_gb=host / GB,
    )


#: What a CUDA process holds besides its tensors (documented figures, not measured here): the CUDA
#: context with torch's lazily loaded kernels (about 0.5 GiB on an H100 with CUDA 12/13) and the
#: cuBLAS workspace (32 MiB on Hopper, allocated after the first matmul)
CUDA_CONTEXT_GB = 0.5 + 32 / 1024
#: NCCL's buffers per rank when it has peers: NCCL_BUFFSIZE (4 MiB) per channel, send and receive,
#: for up to 32 channels and two algorithms (ring, tree): up to 4 MiB x 2 x 32 x 2 = 0.5 GiB
NCCL_BUFFERS_GB = 0.5


def device_bytes(workers: int, cuda: bool) -> float:
    """The device term of one worker: ``CUDA_CONTEXT_GB`` on CUDA, ``NCCL_BUFFERS_GB`` more with more
    than one worker; zero on CPU. Neither ``memory/train_gb`` nor ``memory/cuda_peak_gb`` counts it
    (``memory/cuda_reserved_gb`` holds the allocator's share, not the context)."""
    if not cuda:
        return 0.0
    return (CUDA_CONTEXT_GB + (NCCL_BUFFERS_GB if workers > 1 else 0.0)) * GB


def _logits_grad_bytes(t: MemoryTerms) -> float:
    """At the start of backward, besides the saved fp32 log-softmax: the gradient of the fp32 logits
    and, when the head computes in bf16, the gradient of its bf16 output."""
    tokens = t.cfg.train.batch_size * t.cfg.data.max_length * t.token_share
    c = t.compute_bytes
    return tokens * t.shape.vocab * (4 + (c if c != 4 else 0))


def estimate_measured(cfg: RunConfig, memory: dict[str, float]) -> MemoryEstimate | None:
    """The estimate at the micro-batch shape a run measured its peak on (``memory/peak_batch`` x
    ``memory/peak_seq_len``): comparable with the measured breakdown whatever the data's lengths."""
    batch, seq = memory.get("memory/peak_batch"), memory.get("memory/peak_seq_len")
    if not (batch and seq):
        return estimate_memory(cfg)
    at = cfg.copy()
    at.train.batch_size, at.data.max_length = int(batch), int(seq)
    return estimate_memory(at)


def measured_estimate_metrics(cfg: RunConfig, memory: dict[str, float]) -> dict[str, float]:
    """``memory/estimate_*`` and ``memory/estimate_ratio`` of a run's measured ``memory/*`` (a trial
    and a single run's ``result.json`` record the same keys); empty when the model's shape is unknown."""
    est = estimate_measured(cfg, memory)
    return est.vs_measured(memory) if est is not None else {}


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
    # what the methods counted because some weights stayed wider than bf16 is gone once DeepSpeed casts
    # them all: QLoRA's upcast norms no longer make the stream and the 4-bit linears' outputs fp32, and
    # neither an fp32 adapter nor autocast copies a module's input (the modules share their group's)
    t.linear_out_bytes = t.input_bytes = t.input_elems = None


def deepspeed_buffer_bytes(cfg: RunConfig, trainable: int) -> float:
    """DeepSpeed's gradient bucket: ZeRO-1/2 allocate one per micro-step, ZeRO-3 one for the run, of
    ``tokentune.engine.zero_bucket_elements(trainable)`` elements in the parameters' dtype. ZeRO-0 has
    none; no DeepSpeed, no bucket."""
    zero = cfg.compute.zero_stage
    if not zero:
        return 0.0
    nbytes = 2 if deepspeed_bf16(cfg) else DTYPE_BYTES.get(cfg.model.dtype, 4)
    return zero_bucket_elements(trainable) * nbytes


def trainable_sizes(t: MemoryTerms) -> list[int]:
    """Elements of each trainable tensor (an 8-bit optimizer keeps small ones in fp32): the base's
    linears, norms and embeddings when it trains, else the tensors the methods add; one tensor of the
    trainable count when the methods' terms do not add up to it."""
    s = t.shape
    if t.base_trains:
        per_layer = [i * o for i, o in s.linear_dims().values()] + [s.hidden] * 2
        outside = [s.vocab * s.hidden] * (1 if s.tied else 2) + [s.hidden]
    else:
        per_layer, outside = list(t.added_tensors_per_layer), []
    sizes = per_layer * s.layers + outside
    total = s.layers * t.trainable_per_layer + t.trainable_outside
    return sizes if sum(sizes) == total else [total]


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


def autocast_on(cfg: RunConfig) -> bool:
    """Whether the forward runs under bf16 autocast: ``train.bf16`` true, or auto on a GPU run."""
    return cfg.train.bf16 == "true" or (cfg.train.bf16 == "auto" and cfg.compute.use_gpu is True)


def grouped_inputs(shape: ModelShape, names: set[str]) -> int:
    """Per token, the inputs the linears ``names`` save when modules fed the same tensor share it:
    q/k/v one hidden-sized input, gate/up one, down_proj its own (o_proj's is attention's output)."""
    h, inter = shape.hidden, shape.intermediate
    n = h if names & {"q_proj", "k_proj", "v_proj"} else 0
    n += h if names & {"gate_proj", "up_proj"} else 0
    return n + (inter if "down_proj" in names else 0)


def _layer_bytes(t: MemoryTerms) -> tuple[float, float, float]:
    """Per token that gets a gradient: what a trained layer saves, what a frozen one above the lowest
    trained layer saves, and what a RMSNorm saves; see the module docstring for each term."""
    s = t.shape
    c, wb = t.compute_bytes, t.weight_bytes
    # RMSNorm: its input upcast to fp32 and the fp32 rsqrt; when its weight trains, the normalised input
    norm = 4 * (s.hidden + 1) + (wb * s.hidden if t.base_trains else 0)
    mlp = t.linear_out_bytes if t.linear_out_bytes is not None else c
    core = 2 * norm + 4 * s.heads + c * 2 * s.heads * s.head_dim + mlp * 3 * s.intermediate
    in_elems = t.input_elems if t.input_elems is not None else grouped_inputs(s, t.saved_inputs)
    inputs = in_elems * (t.input_bytes if t.input_bytes is not None else c)
    trained = core + inputs + c * t.extra_per_token + t.extra_bytes_per_token
    return trained, core, norm  # frozen = core: backward passes through it, nothing trains


def _checkpointed_input_bytes(t: MemoryTerms) -> float:
    """Per token of the sequence, what a checkpointed layer keeps: the residual stream of the tokens
    that get a gradient (in the weights' dtype: the stream's) and, when that is a share of them
    (TokenTune), the other tokens' keys and values, which the selected queries attend to: keys after
    RoPE, whose cos/sin are in the stream's dtype (so at least as wide), values as the linears output."""
    s, share = t.shape, t.token_share
    c, wb = t.compute_bytes, t.weight_bytes
    v_bytes = t.linear_out_bytes if t.linear_out_bytes is not None else c
    other_kv = (1 - share) * s.kv_heads * s.head_dim * (max(c, wb) + v_bytes)
    return share * s.hidden * wb + other_kv


def _activation_bytes(t: MemoryTerms, active: int) -> float:
    """Saved for backward in one micro-batch; see the module docstring for what each term is.

    Checkpointed layers keep their inputs only; the others are counted at the peak: as many of them
    trained as the active layers allow (IST/RST), the rest frozen above the lowest trained one."""
    s, cfg = t.shape, t.cfg
    c = t.compute_bytes
    seq = cfg.data.max_length
    tokens = cfg.train.batch_size * seq
    share = t.token_share
    trained, frozen, norm = _layer_bytes(t)
    kept = max(0, min(s.layers, t.checkpointed_layers))
    plain = s.layers - kept
    plain_active = min(active, plain)
    per_layer_tokens = tokens * share * (plain_active * trained + (plain - plain_active) * frozen)
    kv = tokens * t.kv_width * plain * c  # keys and values of every token (TokenTune: all rows)
    checkpointed = tokens * kept * _checkpointed_input_bytes(t)
    head = tokens * share * (norm + (c * s.hidden if t.base_trains else 0))  # final norm, lm_head input
    selection = tokens * share * seq * c if t.selection_mask else 0
    logits = tokens * share * s.vocab * 4  # log-softmax output, fp32 whatever the activation dtype
    constant = min(active, plain) * (t.extra_per_layer * c + t.extra_bytes_per_layer)
    constant += _autocast_weight_copies(t)
    return per_layer_tokens + kv + checkpointed + head + selection + logits + constant


def _recompute_bytes(t: MemoryTerms) -> float:
    """With checkpointed layers: one trained layer's activations, rebuilt in backward (a transient)."""
    if t.checkpointed_layers <= 0:
        return 0.0
    tokens = t.cfg.train.batch_size * t.cfg.data.max_length
    trained = _layer_bytes(t)[0]
    per_layer = t.extra_per_layer * t.compute_bytes + t.extra_bytes_per_layer
    return tokens * t.token_share * trained + tokens * t.kv_width * t.compute_bytes + per_layer


def _autocast_weight_copies(t: MemoryTerms) -> float:
    """Autocast's bf16 copies of the fp32 weights that backward multiplies by: every decoder linear
    (while not quantized; a checkpointed layer's are made again in backward) and the head. Not saved when the weights are bf16 already (fp16 weights
    would be copied too; that mix is not modelled)."""
    if not t.autocast:
        return 0.0
    s = t.shape
    plain = s.layers - max(0, min(s.layers, t.checkpointed_layers))  # checkpointed layers: recomputed
    copies = plain * t.linear_params_per_layer if t.linear_weight_bytes > 2 else 0  # fp32/fp64
    copies += s.vocab * s.hidden if t.weight_bytes > 2 else 0
    return 2.0 * copies
