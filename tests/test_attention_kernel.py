"""TokenTune's split forward calls sdpa as the stock model does on the same device (transformers'
``use_gqa_in_sdpa`` rule), so the two use the same kernel family: on CUDA a masked GQA call with
``enable_gqa`` would fall back to the math kernel while stock repeats keys/values and runs a fused one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import use_gqa_in_sdpa

from tests.conftest import make_tiny_causal_lm
from tokentune.methods.tokentune import split_forward
from tokentune.methods.tokentune.decoder import selected_logits
from tokentune.methods.tokentune.method import select_tokens
from tokentune.methods.tokentune.split_forward import gqa_in_kernel

pytestmark = pytest.mark.usefixtures("one_thread")


def _kv(head_dim: int) -> torch.Tensor:
    return torch.zeros(1, 2, 3, head_dim)


@pytest.mark.parametrize("head_dim", [48, 256, 320])
@pytest.mark.parametrize("masked", [False, True])
def test_gqa_rule_is_transformers_rule_on_cuda_and_cpu(head_dim, masked, monkeypatch):
    """Ours and transformers' agree here (neither XPU nor MPS): in-kernel GQA only without a mask and with
    head dims <= 256; CUDA follows the same rule; XPU and MPS (recent torch) take masked GQA."""
    monkeypatch.delenv("TRANSFORMERS_SDPA_FORCE_GQA", raising=False)
    mask = torch.zeros(1, 1, 3, 3) if masked else None
    k = v = _kv(head_dim)
    expected = use_gqa_in_sdpa(mask, k, v)
    assert expected == (not masked and head_dim <= 256)
    assert gqa_in_kernel("cpu", mask, k, v) == expected
    assert gqa_in_kernel("cuda", mask, k, v) == expected
    assert gqa_in_kernel("xpu", mask, k, v) is True  # torch >= 2.8 here
    monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "1")
    assert gqa_in_kernel("cuda", torch.zeros(1, 1, 3, 3), k, v) is True


def _record_sdpa(monkeypatch) -> list[tuple]:
    """Every sdpa call as (query heads, key heads, value heads, has a mask, enable_gqa)."""
    calls: list[tuple] = []
    real = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, *args, enable_gqa=False, **kwargs):
        calls.append((q.shape[1], k.shape[1], v.shape[1], attn_mask is not None, bool(enable_gqa)))
        return real(q, k, v, attn_mask, *args, enable_gqa=enable_gqa, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    return calls


def test_split_forward_calls_sdpa_like_stock_under_cuda_rule(monkeypatch):
    """A GQA model (4 query / 2 key-value heads), a right-padded batch (stock builds a mask): under the
    CUDA decision the split forward repeats keys/values and drops ``enable_gqa``, exactly as stock does,
    and its logits on the selected tokens still equal stock's."""
    monkeypatch.delenv("TRANSFORMERS_SDPA_FORCE_GQA", raising=False)
    monkeypatch.setattr(split_forward, "kernel_device", lambda t: "cuda")
    model = make_tiny_causal_lm("llama", heads=4, kv_heads=2, dtype=torch.float64).eval()
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(ids)
    attention[1, 8:] = 0
    batch = {"input_ids": ids, "attention_mask": attention, "labels": ids}
    selected = select_tokens(attention, 0.5, generator=torch.Generator().manual_seed(0))
    calls = _record_sdpa(monkeypatch)
    with torch.no_grad():
        stock = model(input_ids=ids, attention_mask=attention).logits
    stock_calls, calls[:] = list(calls), []
    with torch.no_grad():
        split = selected_logits(model, batch, selected)
    split_calls = calls
    assert stock_calls and split_calls
    assert set(stock_calls) == {(4, 4, 4, True, False)}, stock_calls
    assert set(split_calls) == set(stock_calls), split_calls
    torch.testing.assert_close(split, stock[selected])


def test_split_forward_shares_kv_in_kernel_where_the_rule_allows(monkeypatch):
    """Where masked GQA is fine (XPU with torch >= 2.8), the split forward keeps keys/values at the
    key-value heads' width and lets the kernel share them."""
    monkeypatch.delenv("TRANSFORMERS_SDPA_FORCE_GQA", raising=False)
    monkeypatch.setattr(split_forward, "kernel_device", lambda t: "xpu")
    model = make_tiny_causal_lm("llama", heads=4, kv_heads=2).eval()
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(1))
    attention = torch.ones_like(ids)
    selected = select_tokens(attention, 0.5, generator=torch.Generator().manual_seed(1))
    calls = _record_sdpa(monkeypatch)
    with torch.no_grad():
        selected_logits(model, {"input_ids": ids, "attention_mask": attention, "labels": ids}, selected)
    assert calls and set(calls) == {(4, 2, 2, True, True)}, calls
