"""TokenTune for BERT-style encoders (sequence classification), the paper's second setting.

Same split as the decoder path (see ``decoder``), with bidirectional attention: S and R
queries attend over every non-padding key (R keys/values detached for S). The classifier reads the
first row of the encoder output; the S rows are packed in position order, so that row is the first
selected token, which must be the first real token ([CLS] / <s>; drawn masks always contain it, and
it is position 0 with right padding, which is what the stock pooler reads). Loss: the model's own
classification loss (``problem_type`` regression / single- / multi-label), computed by the stock
head because only the encoder's forward is replaced.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokentune.methods.checkpointing import layer_runner
from tokentune.methods.tokentune.split_forward import (
    Stream,
    additive,
    first_last_real,
    gather_rows,
    pack,
    replaced_forward,
    sdpa,
    split_layer,
    unwrap_model,
    validate_mask,
)


def _encoder_of(model: nn.Module) -> nn.Module:
    base = unwrap_model(model)
    return getattr(base, base.base_model_prefix)  # BertModel / RobertaModel


def _qkv(attn: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    shape = (x.shape[0], x.shape[1], -1, attn.attention_head_size)
    return [proj(x).view(shape).transpose(1, 2) for proj in (attn.query, attn.key, attn.value)]


def _masks(sel: Stream, rest: Stream | None, dtype: torch.dtype, cache: dict) -> tuple:
    """Bidirectional (R-query or None, S-query) masks over keys [R, S], built once per dtype.

    Every real key is allowed; packing slots of the queries may attend anywhere (never used).
    """
    if dtype not in cache:
        with torch.no_grad():
            valid_k = sel.valid if rest is None else torch.cat([rest.valid, sel.valid], 1)

            def mask(q: Stream | None) -> torch.Tensor | None:
                return (
                    None
                    if q is None
                    else additive((valid_k[:, None, :] | ~q.valid[:, :, None])[:, None], dtype)
                )

            cache[dtype] = (mask(rest), mask(sel))
    return cache[dtype]


def _encoder_layer(layer: nn.Module, sel: Stream, rest: Stream | None, cache: dict) -> None:
    """One encoder layer on the S stream (with grad) and the R stream (no grad), in place."""
    attn = layer.attention.self
    dropout = attn.dropout.p if attn.training else 0.0

    def finish(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        a = layer.attention.output(out, x)
        return layer.output(layer.intermediate(a), a)

    split_layer(
        sel,
        rest,
        qkv=lambda s: _qkv(attn, s.x),
        masks=lambda dtype: _masks(sel, rest, dtype, cache),
        attend=lambda q, k, v, mask: sdpa(q, k, v, mask, 1, dropout, attn.scaling),
        finish=finish,
        run=layer_runner(layer),
    )


def encoder_hidden(
    model: nn.Module, batch: dict[str, torch.Tensor], selected: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split forward of the encoder: hidden [B, nS, D] of the selected rows, index [B, nS], valid [B, nS]."""
    enc = _encoder_of(model)
    emb = enc.embeddings
    input_ids = batch["input_ids"]
    attention_mask = batch.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    real = attention_mask.bool()
    selected = validate_mask(selected.to(input_ids.device), attention_mask)
    first, _ = first_last_real(real)
    rows = torch.arange(real.shape[0], device=real.device)
    if (real.any(1) & ~selected[rows, first]).any():
        raise ValueError("encoder TokenTune needs the first real token ([CLS]) of every sequence selected")

    b, length = input_ids.shape
    positions = batch.get("position_ids")
    if positions is None and hasattr(emb, "create_position_ids_from_input_ids"):  # RoBERTa: from pad ids
        positions = emb.create_position_ids_from_input_ids(input_ids, emb.padding_idx)
    if positions is None:
        positions = emb.position_ids[:, :length]
    positions = positions.expand(b, length)
    token_types = batch.get("token_type_ids")
    if token_types is None:
        token_types = torch.zeros_like(input_ids)

    def embed(index: torch.Tensor) -> torch.Tensor:
        return emb(
            input_ids=gather_rows(input_ids, index),
            token_type_ids=gather_rows(token_types, index),
            position_ids=gather_rows(positions, index),
        )

    idx_s, valid_s = pack(selected)
    idx_r, valid_r = pack(real & ~selected)
    sel = Stream(embed(idx_s), idx_s, valid_s, None, None)
    rest = None
    if idx_r.shape[1]:
        with torch.no_grad():
            rest = Stream(embed(idx_r).detach(), idx_r, valid_r, None, None)
    masks: dict = {}
    for layer in enc.encoder.layer:
        _encoder_layer(layer, sel, rest, masks)
    return sel.x, idx_s, valid_s


def tokentune_encoder_forward(
    model: nn.Module, batch: dict[str, torch.Tensor], selected: torch.Tensor
) -> Any:
    """``model(**batch)`` (a SequenceClassifierOutput) with the encoder's forward replaced by the split one."""
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

    enc = _encoder_of(model)

    def split_forward(input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, **kw: Any):
        if input_ids is None or kw.get("inputs_embeds") is not None:
            raise ValueError("tokentune needs input_ids (inputs_embeds are not supported)")
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        inputs.update(token_type_ids=token_type_ids, position_ids=position_ids)
        hidden, _, _ = encoder_hidden(model, inputs, selected)
        pooled = enc.pooler(hidden) if getattr(enc, "pooler", None) is not None else None
        return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=hidden, pooler_output=pooled)

    with replaced_forward(enc, split_forward):
        return model(**batch)


def tokentune_encoder_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], selected: torch.Tensor
) -> torch.Tensor:
    """The classification loss with the split encoder forward (``batch['labels']``: one label per sequence)."""
    if batch.get("labels") is None:
        raise ValueError("tokentune needs labels in the batch")
    return tokentune_encoder_forward(model, batch, selected).loss
