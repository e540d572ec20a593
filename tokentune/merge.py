"""Adapter + base -> merged HF checkpoint, loadable with ``AutoModelForCausalLM.from_pretrained``.

The base is always reloaded in full precision (never merged into 4-bit QLoRA weights): a QLoRA
adapter merges into the bf16/fp32 base it was quantised from.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tokentune.errors import ConfigError


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
) -> Path:
    """Merge a peft adapter into its base and save a plain HF checkpoint (+ tokenizer) in ``out_dir``."""
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
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"merge dtype={dtype!r} is invalid: expected float32, bfloat16 or float16")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir))
    tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else base
    AutoTokenizer.from_pretrained(str(tok_src)).save_pretrained(str(out_dir))
    return out_dir
