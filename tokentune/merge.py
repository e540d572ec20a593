"""Adapter + base -> merged HF checkpoint, loadable with ``AutoModelForCausalLM.from_pretrained``.

The base is always reloaded unquantised (never merged into 4-bit QLoRA weights): a QLoRA adapter
merges into the bf16/fp32 base it was quantised from. It is loaded in the run's training dtype
(``model.dtype``; ``auto`` decided for ``device`` as training decides it) on ``device``: a 7B base in
bf16 on a GPU, not 27 GB of fp32 on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tokentune.errors import ConfigError
from tokentune.models import weights_dtype

MERGE_DTYPES = ("float32", "bfloat16", "float16", "float64")


def adapter_base(adapter_dir: str | Path) -> str | None:
    cfg = Path(adapter_dir) / "adapter_config.json"
    if not cfg.is_file():
        return None
    return json.loads(cfg.read_text()).get("base_model_name_or_path")


def merge_adapter(
    adapter_dir: str | Path,
    out_dir: str | Path,
    base: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
) -> Path:
    """Merge a peft adapter into its base and save a plain HF checkpoint (+ tokenizer) in ``out_dir``.

    ``dtype``: float32, bfloat16, float16, float64 or auto (``tokentune.models.weights_dtype``);
    ``device``: where the base is loaded and merged ("cpu", "cuda", "cuda:1")."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ConfigError(
            f"merge: {str(adapter_dir)!r} is not a peft adapter directory (no adapter_config.json)"
        )
    base = base or adapter_base(adapter_dir)
    if base is None:
        from tokentune.models import resolve

        base = resolve(None)
    if dtype not in ("auto", *MERGE_DTYPES):
        raise ConfigError(f"merge dtype={dtype!r} is invalid: expected auto, {', '.join(MERGE_DTYPES)}")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, weights_dtype(dtype, device)))
    model = model.to(device)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir))
    tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else base
    AutoTokenizer.from_pretrained(str(tok_src)).save_pretrained(str(out_dir))
    return out_dir
