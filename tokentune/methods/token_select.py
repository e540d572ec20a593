"""TokenTune: backpropagate through a random subset of tokens (Simoulin et al., EMNLP 2024).

Per sequence and micro-batch a subset S of real (unpadded) token positions is drawn; the rest R
get no gradient. The split forward computes every token exactly as the stock model does, but the
R rows of every decoder layer run under ``torch.no_grad()``, so only S's activations (plus every
token's keys and values, which the S queries attend to) are saved for backward:

    per layer:  S rows (grad):     norm -> q,k,v -> RoPE(original positions) -> attention over
                                   cat(K_R.detach(), K_S), cat(V_R.detach(), V_S) -> o_proj,
                                   residual -> norm -> MLP -> residual
                R rows (no grad):  the same ops; R queries attend over every token's keys
    head:       final norm + LM head on S rows only; position i predicts labels[i + 1]

The layer is re-assembled from the stock submodules, each called as a module
(``layer.self_attn.q_proj(x)``, ``layer.mlp(x)``), so peft LoRA/DoRA/4-bit layers and DeepSpeed
ZeRO-3 gathering hooks keep working; no model file is forked. Attention is always
``torch.nn.functional.scaled_dot_product_attention`` with an explicit boolean mask in original
position space (causal + padding + the layer's sliding window, if any); a baseline to compare
against should use ``attn_implementation="sdpa"``. Attention dropout is the module's own
``attention_dropout`` (train mode only), drawn by SDPA (a different random stream than stock).
Gradient checkpointing is not applied to the split forward.

Positions are column indices, as in the stock forward (``position_ids = arange(L)``): with right
padding these are the tokens' true positions. Padded positions are never selected and a selected
token whose next position is padding gets no loss (even if its label there is not -100).

Encoders (BERT/RoBERTa sequence classification) live in ``token_select_encoder``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokentune.errors import ConfigError
from tokentune.methods.base import Method, StepContext, register

DECODERS = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
)
ENCODERS = ("BertForSequenceClassification", "RobertaForSequenceClassification")
SUPPORTED = DECODERS + ENCODERS
IGNORE_INDEX = -100


# ---- settings ----------------------------------------------------------------------------------
@dataclass
class TokenTuneSettings:
    """How many tokens of each sequence get a gradient.

    ratio: fraction of each sequence's real (unpadded) length n, in (0, 1]:
        k = ceil(ratio * n) (with a 1e-9 tolerance, so 0.3 * 10 gives 3), at least min(n, 2), at most n.
    count: a fixed number of tokens per sequence (>= 2): k = min(count, n). When set, it takes
        precedence and ``ratio`` is reset to None, so a saved config shows the rule that applied.
    The first and last real tokens are always among the k; the other k - 2 are drawn uniformly
    without replacement, redrawn for every micro-batch from a dedicated generator seeded by ``seed``.
    """

    ratio: float | None = 0.3
    count: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.count is not None:
            if not (isinstance(self.count, int) and not isinstance(self.count, bool) and self.count >= 2):
                raise ConfigError(
                    f"tokentune.count={self.count!r} is invalid: expected an integer >= 2 "
                    "(the first and last real tokens are always selected), or null to use tokentune.ratio"
                )
            self.ratio = None
        elif self.ratio is None:
            raise ConfigError(
                "tokentune.ratio=None is invalid: set tokentune.ratio in (0, 1] or tokentune.count >= 2"
            )
        elif not (
            isinstance(self.ratio, (int, float))
            and not isinstance(self.ratio, bool)
            and math.isfinite(self.ratio)
            and 0 < self.ratio <= 1
        ):
            raise ConfigError(
                f"tokentune.ratio={self.ratio!r} is invalid: expected a number in (0, 1], e.g. 0.3"
            )
        if not (isinstance(self.seed, int) and not isinstance(self.seed, bool)):
            raise ConfigError(f"tokentune.seed={self.seed!r} is invalid: expected an integer")


# ---- selection (pure functions) ----------------------------------------------------------------
def num_selected(lengths: torch.Tensor, ratio: float | None = None, count: int | None = None) -> torch.Tensor:
    """k per sequence from its real length n (LongTensor[B]); see ``TokenTuneSettings`` for the rule."""
    if (ratio is None) == (count is None):
        raise ValueError("give exactly one of ratio (in (0, 1]) or count (>= 2)")
    if count is not None:
        if count < 2:
            raise ValueError(f"count={count} is invalid: expected >= 2 (first and last are always selected)")
        k = torch.full_like(lengths, count)
    else:
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio={ratio} is invalid: expected a number in (0, 1]")
        k = torch.ceil(lengths.double() * ratio - 1e-9).long()
    return torch.minimum(torch.maximum(k, lengths.clamp(max=2)), lengths)


def first_last_real(real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column of the first and last True per row of a BoolTensor[B, L] (0 for empty rows)."""
    cols = torch.arange(real.shape[1], device=real.device)
    first = torch.where(real, cols, real.shape[1]).min(1).values.clamp(max=real.shape[1] - 1)
    last = torch.where(real, cols, -1).max(1).values.clamp(min=0)
    return first, last


def select_tokens(
    attention_mask: torch.Tensor,
    ratio: float | None = None,
    count: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw the selected positions: BoolTensor[B, L] on ``attention_mask``'s device.

    Per sequence, k positions among its real tokens (``attention_mask == 1``; see
    ``TokenTuneSettings`` for k): always the first and last real token, the others uniformly at
    random. Uniforms are drawn on the CPU from ``generator`` (the global RNG if None), B * L of them
    per call, so the same generator state and batch shape give the same mask on any device.
    """
    real = attention_mask.detach().to("cpu", torch.bool)
    k = num_selected(real.sum(1), ratio, count)
    scores = torch.rand(real.shape, generator=generator)
    scores = torch.where(real, scores, math.inf)  # padding last: never among the k smallest (k <= n)
    first, last = first_last_real(real)
    rows = torch.arange(real.shape[0])
    scores[rows, first] = torch.where(real[rows, first], -1.0, scores[rows, first])
    scores[rows, last] = torch.where(real[rows, last], -1.0, scores[rows, last])
    rank = scores.argsort(dim=1, stable=True).argsort(dim=1, stable=True)
    return (rank < k[:, None]).to(attention_mask.device)


def validate_mask(mask: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Check an explicit selection: a BoolTensor[B, L] that selects only real tokens, at least one.

    Any subset of real tokens is accepted (drawn masks also contain the first and last real
    token; encoders additionally need the first). Raises ValueError naming what is wrong.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"selected must be a 2-D torch.bool tensor [batch, seq], got {_describe(mask)}")
    if attention_mask is not None:
        if attention_mask.shape != mask.shape:
            raise ValueError(
                f"selected has shape {tuple(mask.shape)} but attention_mask has {tuple(attention_mask.shape)}"
            )
        if (mask & ~attention_mask.bool().to(mask.device)).any():
            raise ValueError(
                "selected marks padding positions (attention_mask == 0); select real tokens only"
            )
    if not mask.any():
        raise ValueError("selected marks no token; at least one real token must be selected")
    return mask


def _describe(x: Any) -> str:
    return f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


# ---- model plumbing ----------------------------------------------------------------------------
def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP/DeepSpeed engines and peft wrappers (adapters stay injected)."""
    from transformers import PreTrainedModel

    m = model
    for _ in range(8):
        if hasattr(m, "get_base_model"):
            m = m.get_base_model()
        elif not isinstance(m, PreTrainedModel) and isinstance(getattr(m, "module", None), nn.Module):
            m = m.module
        else:
            break
    return m


def check_supported(model: nn.Module) -> str:
    """'decoder' or 'encoder' for a supported model; ConfigError naming the supported ones otherwise."""
    peft_cfg = getattr(model, "active_peft_config", None)
    if peft_cfg is not None and getattr(peft_cfg, "is_prompt_learning", False):
        raise ConfigError(
            "tokentune cannot be combined with peft prompt learning (virtual tokens); use lora or dora"
        )
    base = unwrap_model(model)
    arch = type(base).__name__
    if arch not in SUPPORTED:
        raise ConfigError(
            f"tokentune does not support {arch}; supported architectures: {', '.join(SUPPORTED)}"
        )
    if arch in ENCODERS and getattr(base.config, "is_decoder", False):
        raise ConfigError(
            f"tokentune supports {arch} as a bidirectional encoder only (config.is_decoder=True)"
        )
    return "decoder" if arch in DECODERS else "encoder"


@contextmanager
def replaced_forward(module: nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """Temporarily replace ``module.forward`` so wrappers (peft, DDP, DeepSpeed) run around ours."""
    saved = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved


def pack(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the True entries per row, ascending, padded to the longest row.

    Returns index LongTensor[B, n] and valid BoolTensor[B, n]; padding slots hold position 0.
    """
    counts = mask.sum(1)
    n = int(counts.max()) if mask.numel() else 0
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :n]
    valid = torch.arange(n, device=mask.device)[None, :] < counts[:, None]
    return torch.where(valid, order, 0), valid


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b, j]] for x [B, L, ...] and index [B, n]."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], index]


def attention_mask_for(
    pos_q: torch.Tensor,
    valid_q: torch.Tensor,
    pos_k: torch.Tensor,
    valid_k: torch.Tensor,
    causal: bool,
    window: int | None = None,
) -> torch.Tensor:
    """BoolTensor[B, 1, nq, nk] (True = attend) in original position space.

    Padding slots of the packed queries may attend anywhere: their outputs are never used, and a
    row with no allowed key would make some SDPA kernels return NaN.
    """
    allowed = valid_k[:, None, :].expand(-1, pos_q.shape[1], -1)
    if causal:
        allowed = allowed & (pos_k[:, None, :] <= pos_q[:, :, None])
    if window is not None:
        allowed = allowed & (pos_q[:, :, None] - pos_k[:, None, :] < window)
    return (allowed | ~valid_q[:, :, None])[:, None]


def sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    groups: int,
    dropout: float,
    scale,
) -> torch.Tensor:
    """Attention [B, H, nq, d] -> [B, nq, H * d]; GQA keys/values repeated as the stock sdpa path does."""
    from transformers.integrations.sdpa_attention import repeat_kv

    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scale)
    return out.transpose(1, 2).reshape(query.shape[0], query.shape[2], -1)


# ---- decoder split forward ---------------------------------------------------------------------
@dataclass
class _Stream:
    """One group of rows (S or R), packed: hidden [B, n, D], positions [B, n], valid [B, n]."""

    x: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


def _qkv(attn: nn.Module, x: torch.Tensor, s: _Stream, rope: Callable) -> tuple[torch.Tensor, ...]:
    b, n, _ = x.shape
    shape = (b, n, -1, attn.head_dim)
    q = attn.q_proj(x).view(shape)
    k = attn.k_proj(x).view(shape)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = rope(q.transpose(1, 2), k.transpose(1, 2), s.cos, s.sin)
    return q, k, v


def _window(attn: nn.Module) -> int | None:
    if hasattr(attn, "sliding_window"):  # Qwen2/Qwen3: per layer (None on full-attention layers)
        return attn.sliding_window
    return getattr(attn.config, "sliding_window", None)  # Mistral: every layer; Llama/Gemma: none


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask -> additive float mask (0 / -inf) in the queries' dtype.

    SDPA converts a boolean mask to this form inside every call (and saves the copy for backward);
    building it once per forward lets all layers share one saved tensor.
    """
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _masks(sel: _Stream, rest: _Stream | None, window: int | None, dtype: torch.dtype, cache: dict) -> tuple:
    """(R-query mask or None, S-query mask) over keys ordered [R, S]; built once per window and dtype."""
    key = (window, dtype)
    if key not in cache:
        with torch.no_grad():
            if rest is None:
                mask_s = attention_mask_for(sel.pos, sel.valid, sel.pos, sel.valid, True, window)
                cache[key] = (None, additive(mask_s, dtype))
            else:
                pos_k, valid_k = torch.cat([rest.pos, sel.pos], 1), torch.cat([rest.valid, sel.valid], 1)
                mask_r = attention_mask_for(rest.pos, rest.valid, pos_k, valid_k, True, window)
                mask_s = attention_mask_for(sel.pos, sel.valid, pos_k, valid_k, True, window)
                cache[key] = (additive(mask_r, dtype), additive(mask_s, dtype))
    return cache[key]


def _decoder_layer(layer: nn.Module, sel: _Stream, rest: _Stream | None, rope: Callable, cache: dict) -> None:
    """One decoder layer on the S stream (with grad) and the R stream (no grad), in place."""
    attn = layer.self_attn
    dropout = attn.attention_dropout if attn.training else 0.0
    q_s, k_s, v_s = _qkv(attn, layer.input_layernorm(sel.x), sel, rope)
    mask_r, mask_s = _masks(sel, rest, _window(attn), q_s.dtype, cache)
    if rest is None:
        keys, values = k_s, v_s
    else:
        with torch.no_grad():
            q_r, k_r, v_r = _qkv(attn, layer.input_layernorm(rest.x), rest, rope)
        keys, values = torch.cat([k_r, k_s], 2), torch.cat([v_r, v_s], 2)  # R part carries no grad
        with torch.no_grad():
            groups = attn.num_key_value_groups
            out = sdpa(q_r, keys.detach(), values.detach(), mask_r, groups, dropout, attn.scaling)
            x = rest.x + attn.o_proj(out)
            rest.x = x + layer.mlp(layer.post_attention_layernorm(x))
    out = sdpa(q_s, keys, values, mask_s, attn.num_key_value_groups, dropout, attn.scaling)
    x = sel.x + attn.o_proj(out)
    sel.x = x + layer.mlp(layer.post_attention_layernorm(x))


def decoder_hidden(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, selected: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split forward of a supported decoder up to the final norm.

    Returns hidden [B, nS, D] of the selected rows (after the final norm), their positions
    index [B, nS] and valid [B, nS] (False on packing slots).
    """
    base = unwrap_model(model)
    inner = base.model
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    real = attention_mask.bool()
    selected = validate_mask(selected.to(input_ids.device), attention_mask)
    rope = sys.modules[type(inner.layers[0].self_attn).__module__].apply_rotary_pos_emb

    idx_s, valid_s = pack(selected)
    idx_r, valid_r = pack(real & ~selected)
    x_s = inner.embed_tokens(gather_rows(input_ids, idx_s))
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    cos, sin = inner.rotary_emb(x_s, positions)  # [1, L, d], exactly as the stock forward builds them
    sel = _Stream(x_s, idx_s, valid_s, cos[0][idx_s], sin[0][idx_s])
    rest = None
    if idx_r.shape[1]:
        with torch.no_grad():
            x_r = inner.embed_tokens(gather_rows(input_ids, idx_r)).detach()
        rest = _Stream(x_r, idx_r, valid_r, cos[0][idx_r], sin[0][idx_r])
    masks: dict = {}  # (window, dtype) -> the two attention masks, shared by the layers
    for layer in inner.layers[: base.config.num_hidden_layers]:
        _decoder_layer(layer, sel, rest, rope, masks)
    return inner.norm(sel.x), idx_s, valid_s


def next_token_targets(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """targets[b, i] = labels[b, i + 1], or -100 when i + 1 is padding or past the end."""
    nxt = torch.full_like(labels, IGNORE_INDEX)
    nxt[:, :-1] = labels[:, 1:]
    if attention_mask is not None:
        nxt[:, :-1] = torch.where(attention_mask[:, 1:].bool(), nxt[:, :-1], IGNORE_INDEX)
    return nxt


def selected_logits(model: nn.Module, batch: dict[str, torch.Tensor], selected: torch.Tensor) -> torch.Tensor:
    """Logits [N, V] of the selected rows, in ``selected.nonzero()`` order (for tests and debugging)."""
    hidden, _, valid = decoder_hidden(model, batch["input_ids"], batch.get("attention_mask"), selected)
    return unwrap_model(model).lm_head(hidden[valid])


def _decoder_loss(model: nn.Module, input_ids, attention_mask, labels, selected) -> torch.Tensor:
    hidden, idx, valid = decoder_hidden(model, input_ids, attention_mask, selected)
    targets = gather_rows(next_token_targets(labels, attention_mask), idx)
    keep = valid & (targets != IGNORE_INDEX)
    logits = unwrap_model(model).lm_head(hidden[keep])  # [N, V]: never built for R rows
    if logits.dtype in (torch.float16, torch.bfloat16):  # as stock, in float32 (float64 stays float64)
        logits = logits.float()
    loss = F.cross_entropy(logits, targets[keep], ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / keep.sum().clamp(min=1)  # 0 (with a graph) when no selected token has a label


def tokentune_loss(model: nn.Module, batch: dict[str, torch.Tensor], selected: torch.Tensor) -> torch.Tensor:
    """The training loss over the selected tokens, with the split forward (decoder or encoder).

    Runs through ``model(**batch)`` (so peft/DDP/DeepSpeed wrappers run their forward) with the
    transformers model's forward temporarily replaced by the split forward. Decoders: mean
    next-token cross-entropy over selected positions with a valid next label. Encoders: the
    model's own classification loss (see ``token_select_encoder``).
    """
    kind = check_supported(model)
    if kind == "encoder":
        from tokentune.methods.token_select_encoder import tokentune_encoder_loss

        return tokentune_encoder_loss(model, batch, selected)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    base = unwrap_model(model)

    def split_forward(input_ids=None, attention_mask=None, labels=None, inputs_embeds=None, **_: Any):
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("tokentune needs input_ids (inputs_embeds are not supported)")
        if labels is None:
            raise ValueError("tokentune needs labels in the batch")
        return CausalLMOutputWithPast(loss=_decoder_loss(base, input_ids, attention_mask, labels, selected))

    with replaced_forward(base, split_forward):
        return model(**batch).loss


# ---- the registered method ---------------------------------------------------------------------
@register
class TokenTune(Method):
    """Draws the selection for every training micro-batch and returns the split-forward loss."""

    name = "tokentune"
    kind = "modifier"
    order = 30
    overrides_loss = True
    config_cls = TokenTuneSettings

    @classmethod
    def memory_terms(cls, settings: TokenTuneSettings, terms) -> None:
        max_length = terms.cfg.data.max_length
        terms.token_share = (
            min(1.0, settings.count / max_length) if settings.count is not None else float(settings.ratio)
        )

    def __init__(self, config: TokenTuneSettings) -> None:
        super().__init__(config)
        self.generator = torch.Generator().manual_seed(config.seed)
        self._selected = self._real = 0

    def prepare(self, model: nn.Module) -> nn.Module:
        """Fail before training on an unsupported architecture; the model is returned unchanged.

        The generator is created (seeded) in ``__init__``, so ``load_state_dict`` may come before or after.
        """
        check_supported(model)
        return model

    def on_step_start(self, ctx: StepContext) -> None:
        self._selected = self._real = 0

    def compute_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: StepContext | None = None):
        if not model.training:
            return None
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(batch["input_ids"])
        selected = select_tokens(attention_mask, self.config.ratio, self.config.count, self.generator)
        self._selected += int(selected.sum())
        self._real += int(attention_mask.bool().sum())
        return tokentune_loss(model, batch, selected)

    def metrics(self) -> dict[str, float]:
        """Selected tokens and their fraction of real tokens over the last step's micro-batches."""
        if not self._real:
            return {}
        return {
            "tokentune/selected_frac": self._selected / self._real,
            "tokentune/selected_tokens": self._selected,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])
