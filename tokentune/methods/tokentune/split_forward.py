"""Shared pieces of TokenTune's split forward, for the decoder and the encoder paths alike.

A split forward runs the selected rows S (with grad) and the rest R (no grad) of each layer as two
packed streams (``Stream``): ``pack`` lists a row subset's positions, ``gather_rows`` takes them,
``additive`` turns a boolean attention mask into the one float mask every layer shares, ``sdpa`` is
the attention both paths call (GQA by transformers' per-device rule, ``gqa_in_kernel``) and
``split_layer`` runs one layer on both streams. ``unwrap_model`` finds the transformers model inside
peft, DDP and DeepSpeed wrappers, and ``replaced_forward`` swaps its forward for the split one while
the wrappers still run. A leaf module: ``method``, ``decoder`` and ``encoder`` import it, it imports
none of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def first_last_real(real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column of the first and last True per row of a BoolTensor[B, L] (0 for empty rows)."""
    cols = torch.arange(real.shape[1], device=real.device)
    first = torch.where(real, cols, real.shape[1]).min(1).values.clamp(max=real.shape[1] - 1)
    last = torch.where(real, cols, -1).max(1).values.clamp(min=0)
    return first, last


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


@dataclass
class Stream:
    """One group of rows (S or R), packed: hidden [B, n, D], positions [B, n], valid [B, n]."""

    x: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask -> additive float mask (0 / -inf) in the queries' dtype.

    SDPA converts a boolean mask to this form inside every call (and saves the copy for backward);
    building it once per forward lets all layers share one saved tensor.
    """
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def gqa_in_kernel(
    device_type: str, mask: torch.Tensor | None, key: torch.Tensor, value: torch.Tensor
) -> bool:
    """Whether sdpa shares GQA keys/values in the kernel (``enable_gqa``) rather than repeating them.

    transformers' own rule (``use_gqa_in_sdpa`` in ``transformers/integrations/sdpa_attention.py``), per
    device: XPU (torch >= 2.8) and MPS (torch >= 2.13) take masked GQA; CUDA (and CPU, NPU) only without a
    mask and with head dims <= 256, since otherwise CUDA falls back to the math kernel (fp32 scores and
    repeated keys/values materialised). ``TRANSFORMERS_SDPA_FORCE_GQA=1`` forces it, as it does for stock.
    """
    if os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA", "0") == "1":
        return True
    if device_type in ("xpu", "mps"):
        return _torch_at_least((2, 8) if device_type == "xpu" else (2, 13))
    return mask is None and key.shape[-1] == value.shape[-1] <= 256


def _torch_at_least(version: tuple[int, int]) -> bool:
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    return (major, minor) >= version


def kernel_device(t: torch.Tensor) -> str:
    """The device type whose sdpa rule applies to ``t`` (a function so tests can simulate CUDA on CPU)."""
    return t.device.type


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Keys or values [B, Hkv, n, d] -> [B, Hkv * groups, n, d], each head repeated for its query heads."""
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    groups: int,
    dropout: float,
    scale,
) -> torch.Tensor:
    """Attention [B, H, nq, d] -> [B, nq, H * d], with GQA handled as the stock sdpa path does on this
    device (``gqa_in_kernel``): shared in the kernel, or keys/values repeated per query head first, so
    TokenTune and its stock baseline run the same kernel family (never CUDA's math fallback by our doing)."""
    gqa = {}
    if groups > 1:
        if gqa_in_kernel(kernel_device(query), mask, key, value):
            gqa["enable_gqa"] = True
        else:
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scale, **gqa
    )
    return out.transpose(1, 2).reshape(query.shape[0], query.shape[2], -1)


def split_layer(
    sel: Stream,
    rest: Stream | None,
    qkv: Callable[[Stream], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    masks: Callable[[torch.dtype], tuple[torch.Tensor | None, torch.Tensor]],
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    finish: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    run: Callable[..., Any] | None = None,
) -> None:
    """One transformer layer on the S stream (with grad) and the R stream (no grad), in place.

    The architecture supplies ``qkv(stream)`` -> q, k, v [B, H, n, d]; ``masks(dtype)`` -> the
    (R-query or None, S-query) masks over keys ordered [R, S]; ``attend(q, k, v, mask)`` -> [B, n, H * d];
    ``finish(attention_out, x)`` -> the stream's next hidden state (output projection, MLP, residuals).
    S queries attend over R's keys and values detached, so no gradient flows into R.

    Order: R's q, k, v (no grad); S's whole path, a function of tensors only (its stream, R's keys and
    values, its mask) run through ``run(fn, *tensors)`` (``checkpointing.layer_runner``: maybe
    checkpointed, then recomputed from exactly these inputs in backward); R's attention and the rest of
    its layer (no grad), over S's keys and values as the S path computed them.
    """
    q_r = kv_r = mask_r = mask_s = None
    if rest is not None:
        with torch.no_grad():
            q_r, k_r, v_r = qkv(rest)
        kv_r = (k_r, v_r)
        mask_r, mask_s = masks(q_r.dtype)

    def s_path(x: torch.Tensor, mask: torch.Tensor | None, *kv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q_s, k_s, v_s = qkv(Stream(x, sel.pos, sel.valid, sel.cos, sel.sin))
        if mask is None:  # no R rows: the mask's dtype is the S queries'
            mask = masks(q_s.dtype)[1]
        keys, values = (torch.cat([kv[0], k_s], 2), torch.cat([kv[1], v_s], 2)) if kv else (k_s, v_s)
        return finish(attend(q_s, keys, values, mask), x), k_s.detach(), v_s.detach()

    args = (sel.x, mask_s, *(kv_r or ()))
    x_s, k_s, v_s = run(s_path, *args) if run is not None else s_path(*args)
    if rest is not None:
        keys, values = torch.cat([kv_r[0], k_s], 2), torch.cat([kv_r[1], v_s], 2)  # no grad in either
        with torch.no_grad():
            rest.x = finish(attend(q_r, keys, values, mask_r), rest.x)
    sel.x = x_s
