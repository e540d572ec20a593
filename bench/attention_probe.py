"""Which sdpa calls TokenTune's split forward and the stock forward make, and (CUDA) that neither needs the
math kernel: ``python -m bench.attention_probe [--dry]``.

On the shipped tiny model (4 query / 2 key-value heads: GQA) with a right-padded batch, so the stock
forward passes a mask: the sdpa calls of both (query heads, key heads, mask, ``enable_gqa``) must agree,
as transformers' rule (``use_gqa_in_sdpa``) gives them. On CUDA, a bf16 forward + backward of each then
runs with the math kernel disabled (``torch.nn.attention.sdpa_kernel``): a call that would fall back to
it (masked GQA with ``enable_gqa``) fails there. ``--dry`` (CPU) compares the calls under the simulated
CUDA decision (``split_forward.kernel_device``) and skips the kernel run. Prints one JSON line; exit 1
when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tokentune.methods.tokentune import split_forward  # noqa: E402
from tokentune.methods.tokentune.decoder import selected_logits  # noqa: E402
from tokentune.methods.tokentune.method import select_tokens  # noqa: E402


@contextmanager
def recorded_sdpa(calls: list):
    """Record (query heads, key heads, has a mask, enable_gqa) of every sdpa call inside the block."""
    real = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, *args, enable_gqa=False, **kwargs):
        calls.append((q.shape[1], k.shape[1], attn_mask is not None, bool(enable_gqa)))
        return real(q, k, v, attn_mask, *args, enable_gqa=enable_gqa, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = recording
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = real


def no_math_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(
        [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    )


def probe(device: str, seq: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from tokentune import assets

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        assets.default_model_path(), dtype=dtype, attn_implementation="sdpa"
    ).to(device)
    ids = torch.randint(3, 500, (2, seq), generator=torch.Generator().manual_seed(0)).to(device)
    attention = torch.ones_like(ids)
    attention[1, seq // 2 :] = 0  # right padding: the stock forward builds a mask
    batch = {"input_ids": ids, "attention_mask": attention, "labels": ids}
    selected = select_tokens(attention.cpu(), 0.3, generator=torch.Generator().manual_seed(0)).to(device)
    stock_calls: list = []
    split_calls: list = []
    kernel = no_math_kernel() if device == "cuda" else nullcontext()
    with kernel:  # on CUDA: a call that needs the math kernel raises here
        with recorded_sdpa(stock_calls):
            model(input_ids=ids, attention_mask=attention).logits.float().sum().backward()
        with recorded_sdpa(split_calls):
            selected_logits(model, batch, selected).float().sum().backward()
    return {
        "device": device,
        "seq": seq,
        "stock_calls": sorted(set(stock_calls)),
        "split_calls": sorted(set(split_calls)),
        "agree": set(stock_calls) == set(split_calls),
        "math_kernel_disabled": device == "cuda",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", action="store_true", help="CPU: the calls under the simulated CUDA decision")
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default 512 on CUDA, 64 dry)")
    args = p.parse_args(argv)
    if args.dry:
        split_forward.kernel_device = lambda t: "cuda"  # the rule CUDA takes, on this CPU
        device = "cpu"
    elif not torch.cuda.is_available():
        p.error("no CUDA device: run with --dry on a CPU machine")
    else:
        device = "cuda"
    try:
        res = probe(device, args.seq or (64 if args.dry else 512))
    except RuntimeError as err:  # e.g. "No available kernel" with the math kernel disabled
        res = {"device": device, "agree": False, "error": f"{type(err).__name__}: {err}"[:300]}
    print(json.dumps(res))
    return 0 if res["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
