"""TokenTune's split forward for decoders (Llama, Mistral, Qwen2, Qwen3, Gemma).

Per layer, the selected rows S run with grad and the rest R under ``torch.no_grad()``, so only S's
activations (plus every token's keys and values, which the S queries attend to) are saved for
backward; every token is computed exactly as the stock model does:

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
With the ``checkpointing`` method, a checkpointed layer's S path (``split_layer``) keeps only its
inputs and is recomputed from them in backward.

Positions are column indices, as in the stock forward (``position_ids = arange(L)``): with right
padding these are the tokens' true positions. Padded positions are never selected and a selected
token whose next position is padding gets no loss (even if its label there is not -100).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokentune.methods.base import IGNORE_INDEX
from tokentune.methods.checkpointing import layer_runner
from tokentune.methods.tokentune.split_forward import (
    Stream,
    additive,
    gather_rows,
    pack,
    replaced_forward,
    sdpa,
    split_layer,
    unwrap_model,
    validate_mask,
)


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


def _qkv(attn: nn.Module, x: torch.Tensor, s: Stream, rope: Callable) -> tuple[torch.Tensor, ...]:
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


def _masks(sel: Stream, rest: Stream | None, window: int | None, dtype: torch.dtype, cache: dict) -> tuple:
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


def _decoder_layer(layer: nn.Module, sel: Stream, rest: Stream | None, rope: Callable, cache: dict) -> None:
    """One decoder layer on the S stream (with grad) and the R stream (no grad), in place."""
    attn = layer.self_attn
    dropout = attn.attention_dropout if attn.training else 0.0

    def finish(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = x + attn.o_proj(out)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    split_layer(
        sel,
        rest,
        qkv=lambda s: _qkv(attn, layer.input_layernorm(s.x), s, rope),
        masks=lambda dtype: _masks(sel, rest, _window(attn), dtype, cache),
        attend=lambda q, k, v, mask: sdpa(q, k, v, mask, attn.num_key_value_groups, dropout, attn.scaling),
        finish=finish,
        run=layer_runner(layer),
    )


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
    sel = Stream(x_s, idx_s, valid_s, cos[0][idx_s], sin[0][idx_s])
    rest = None
    if idx_r.shape[1]:
        with torch.no_grad():
            x_r = inner.embed_tokens(gather_rows(input_ids, idx_r)).detach()
        rest = Stream(x_r, idx_r, valid_r, cos[0][idx_r], sin[0][idx_r])
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


def tokentune_decoder_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], selected: torch.Tensor
) -> torch.Tensor:
    """Mean next-token cross-entropy over the selected positions with a valid next label.

    Runs ``model(**batch)`` (peft/DDP/DeepSpeed wrappers run their forward) with the transformers
    model's forward temporarily replaced by the split forward.
    """
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
