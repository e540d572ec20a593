"""A model's sizes, read from its ``config.json`` without loading weights (no hub access).

The memory estimate and the methods' shape checks (e.g. an IST layer budget against the number of
decoder layers) need only these numbers; a dry run reads them for the shipped default, a local folder
or a model already in the Hugging Face cache.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelShape:
    """The sizes the memory estimate and the methods' shape checks need."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    head_dim_: int | None = None  # config.json's head_dim when it is not hidden // heads

    @property
    def head_dim(self) -> int:
        return self.head_dim_ or self.hidden // self.heads

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear module of one Llama-style decoder layer."""
        h, inter = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, inter),
            "up_proj": (h, inter),
            "down_proj": (inter, h),
        }


#: Shapes of hub models (their config.json's sizes), used when the config.json is not here: a dry run
#: offline, or of a spec meant for another machine, still checks the methods' shapes and estimates memory.
#: The models the shipped paper specs name (search_spaces/*_paper.yaml; bench/memory.py --preset
#: llama2-7b is the first), and a few of their common neighbours.
KNOWN_SHAPES = {
    "meta-llama/Llama-2-7b-hf": ModelShape(32, 4096, 11008, 32, 32, 32000),
    "huggyllama/llama-7b": ModelShape(32, 4096, 11008, 32, 32, 32000),
    "meta-llama/Llama-2-13b-hf": ModelShape(40, 5120, 13824, 40, 40, 32000),
    "huggyllama/llama-13b": ModelShape(40, 5120, 13824, 40, 40, 32000),
    "meta-llama/Meta-Llama-3-8B": ModelShape(32, 4096, 14336, 32, 8, 128256),
    "mistralai/Mistral-7B-v0.1": ModelShape(32, 4096, 14336, 32, 8, 32000),
}
_CACHE: dict[str, ModelShape | None] = {}


def model_shape(name_or_path: str | None) -> ModelShape | None:
    """Read ``config.json`` of the shipped default, a local folder, or a cached hub model.

    A hub model that is not cached gets its ``KNOWN_SHAPES`` entry; None (with a warning) if it has none.
    """
    key = str(name_or_path)
    if key not in _CACHE:
        _CACHE[key] = _read_shape(name_or_path)
    return _CACHE[key]


def _read_shape(name_or_path: str | None) -> ModelShape | None:
    config_file = _config_json(name_or_path)
    if config_file is None:
        if name_or_path in KNOWN_SHAPES:
            return KNOWN_SHAPES[name_or_path]
        log.warning(
            "model %r: no local config.json (not a folder, not in the HF cache); the methods' shape "
            "checks and the memory estimate are skipped for it",
            name_or_path,
        )
        return None
    c = json.loads(Path(config_file).read_text())
    c = c.get("text_config", c) if "num_hidden_layers" not in c else c
    hidden = c.get("hidden_size") or c.get("n_embd") or c.get("d_model")
    layers = c.get("num_hidden_layers") or c.get("n_layer") or c.get("num_layers")
    if not (hidden and layers):
        log.warning(
            "model %r: config.json has no hidden_size/num_hidden_layers; checks skipped", name_or_path
        )
        return None
    heads = c.get("num_attention_heads") or c.get("n_head") or 1
    return ModelShape(
        layers=int(layers),
        hidden=int(hidden),
        intermediate=int(c.get("intermediate_size") or c.get("n_inner") or 4 * hidden),
        heads=int(heads),
        kv_heads=int(c.get("num_key_value_heads") or heads),
        vocab=int(c.get("vocab_size") or 32000),
        tied=bool(c.get("tie_word_embeddings", False)),
        head_dim_=int(c["head_dim"]) if c.get("head_dim") else None,
    )


def _config_json(name_or_path: str | None) -> Path | None:
    if name_or_path is None:
        from tokentune import assets

        p = assets.default_model_path() / "config.json"
        return p if p.is_file() else None
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p / "config.json" if (p / "config.json").is_file() else None
    if p.exists() or str(name_or_path).startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(str(name_or_path), "config.json")
    except Exception:  # noqa: BLE001 - an invalid repo id is just "not cached"
        return None
    return Path(found) if isinstance(found, str) else None
