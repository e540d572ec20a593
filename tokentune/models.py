"""Load base models and tokenizers by hub name or local path (the shipped tiny Llama by default)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from tokentune.config import ModelConfig
from tokentune.errors import ConfigError


class ModelLoadError(ConfigError):
    """The model or tokenizer could not be loaded; the message says which and why."""


def resolve(name_or_path: str | None) -> str:
    if name_or_path is None:
        from tokentune import assets

        return str(assets.default_model_path())
    return str(name_or_path)


def _load(fn, what: str, name: str, **kwargs):
    local = Path(name).exists()
    if not local and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise ModelLoadError(f"model.{what}: path {name!r} does not exist")
    try:
        return fn(name, **kwargs)
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (
            " The hub is offline (HF_HUB_OFFLINE=1): give a local directory or a model already in the HF cache."
            if offline and not local
            else ""
        )
        raise ModelLoadError(
            f"model.{what}: cannot load {name!r}: {str(e).splitlines()[0][:300]}.{hint}"
        ) from e


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    name = cfg.tokenizer or resolve(cfg.name_or_path)
    tok = _load(AutoTokenizer.from_pretrained, "tokenizer", name, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def weights_dtype(dtype: str, device: torch.device | str | None) -> str:
    """``model.dtype`` decided for ``device``: ``auto`` is bfloat16 on a CUDA device that supports it
    (what fine-tuning on GPUs uses), else float32; any other name as given."""
    if dtype != "auto":
        return dtype
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def load_model(
    cfg: ModelConfig, extra: dict[str, Any] | None = None, device: torch.device | str | None = None
):
    """``AutoModelForCausalLM.from_pretrained`` with the config's dtype and attention kernel."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, weights_dtype(cfg.dtype, device)),
        "attn_implementation": cfg.attn_implementation,
        "trust_remote_code": cfg.trust_remote_code,
    }
    kwargs.update(extra or {})
    if "quantization_config" in kwargs and device is not None and str(device) != "cpu":
        kwargs["device_map"] = {"": torch.device(device).index or 0}
    model = _load(AutoModelForCausalLM.from_pretrained, "name_or_path", resolve(cfg.name_or_path), **kwargs)
    if device is not None and "quantization_config" not in kwargs:
        model = model.to(device)
    return model
