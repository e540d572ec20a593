"""TokenTune: backpropagate through a random subset of tokens (Simoulin et al., EMNLP 2024).

Per sequence and micro-batch a subset S of real (unpadded) token positions is drawn
(``select_tokens``: the paper's uniform rule; ``select_labelled``: our label-aware extension, same k);
the rest R get no gradient. The split forward computes every token exactly as
the stock model does, but runs R's rows of every layer under ``torch.no_grad()``, so only S's
activations (plus the keys and values S attends to) are saved for backward.

This module holds the settings, the selection (pure functions) and the registered method;
the split forward lives in ``decoder`` (Llama-style decoders) and
``encoder`` (BERT/RoBERTa sequence classification), on pieces shared through
``split_forward``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tokentune.errors import ConfigError, is_int, is_number
from tokentune.methods.base import IGNORE_INDEX, Method, StepContext, register
from tokentune.methods.tokentune.decoder import next_token_targets, tokentune_decoder_loss
from tokentune.methods.tokentune.encoder import tokentune_encoder_loss
from tokentune.methods.tokentune.split_forward import first_last_real, unwrap_model
from tokentune.settings import setting

DECODERS = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
)
ENCODERS = ("BertForSequenceClassification", "RobertaForSequenceClassification")
SUPPORTED = DECODERS + ENCODERS
SELECT_RULES = ("uniform", "labelled")


# ---- settings ----------------------------------------------------------------------------------
@dataclass
class TokenTuneSettings:
    """How many tokens of each sequence get a gradient.

    ratio: fraction of each sequence's real (unpadded) length n, in (0, 1]:
        k = ceil(ratio * n) (with a 1e-9 tolerance, so 0.3 * 10 gives 3), at least min(n, 2), at most n.
    count: a fixed number of tokens per sequence (>= 2): k = min(count, n). When set, it takes
        precedence and ``ratio`` is reset to None, so a saved config shows the rule that applied.
    The first and last real tokens are always among the k; the other k - 2 are drawn without
    replacement, redrawn for every micro-batch from a dedicated generator seeded by ``seed``:
    select: ``uniform`` (the paper's rule) draws them uniformly; ``labelled`` (our extension, not the
        paper's; decoders only) draws the positions that predict a supervised label first (all of
        them when they fit), then uniformly among the others. Same k, so the same memory.
    """

    ratio: float | None = setting(
        0.3,
        "share of each sequence's real tokens that get a gradient, in (0, 1]; first and last real "
        "token always kept; 1.0 = stock training",
    )
    count: int | None = setting(None, "a fixed number of tokens per sequence (>= 2) instead of a ratio")
    seed: int = setting(0, "seed of the dedicated selection generator (saved in checkpoints)")
    select: str = setting(
        "uniform",
        "which k tokens: uniform (the paper's rule) or labelled (ours, decoders only: positions that "
        "predict a supervised label first, same k)",
    )

    def __post_init__(self) -> None:
        if self.select not in SELECT_RULES:
            raise ConfigError(
                f"tokentune.select={self.select!r} is invalid: expected one of {', '.join(SELECT_RULES)}"
            )
        if self.count is not None:
            if not (is_int(self.count) and self.count >= 2):
                raise ConfigError(
                    f"tokentune.count={self.count!r} is invalid: expected an integer >= 2 "
                    "(the first and last real tokens are always selected), or null to use tokentune.ratio"
                )
            self.ratio = None
        elif self.ratio is None:
            raise ConfigError(
                "tokentune.ratio=None is invalid: set tokentune.ratio in (0, 1] or tokentune.count >= 2"
            )
        elif not (is_number(self.ratio) and 0 < self.ratio <= 1):
            raise ConfigError(
                f"tokentune.ratio={self.ratio!r} is invalid: expected a number in (0, 1], e.g. 0.3"
            )
        if not is_int(self.seed):
            raise ConfigError(f"tokentune.seed={self.seed!r} is invalid: expected an integer")


# ---- selection (pure functions) ----------------------------------------------------------------
def num_selected(lengths: torch.Tensor, ratio: float | None = None, count: int | None = None) -> torch.Tensor:
    """k per sequence from its real length n (LongTensor[B]); see ``TokenTuneSettings`` for the rule.

    Exactly one of ``ratio`` and ``count`` is given, already valid (``TokenTuneSettings`` checks them).
    """
    assert (ratio is None) != (count is None), "give exactly one of ratio or count"
    if count is not None:
        k = torch.full_like(lengths, count)
    else:
        k = torch.ceil(lengths.double() * ratio - 1e-9).long()
    return torch.minimum(torch.maximum(k, lengths.clamp(max=2)), lengths)


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
    scores = torch.rand(real.shape, generator=generator)
    return _lowest_k(scores, real, num_selected(real.sum(1), ratio, count)).to(attention_mask.device)


def _lowest_k(scores: torch.Tensor, real: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per row, the k positions of lowest score, the first and last real token forced, never padding."""
    scores = torch.where(real, scores, math.inf)  # padding last: never among the k smallest (k <= n)
    first, last = first_last_real(real)
    rows = torch.arange(real.shape[0])
    scores[rows, first] = torch.where(real[rows, first], -1.0, scores[rows, first])
    scores[rows, last] = torch.where(real[rows, last], -1.0, scores[rows, last])
    rank = scores.argsort(dim=1, stable=True).argsort(dim=1, stable=True)
    return rank < k[:, None]


def supervised_positions(labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """BoolTensor[B, L] (CPU): real positions i whose logits carry loss in a decoder, i.e. whose next
    token i + 1 is real and labelled (``labels[b, i + 1] != -100``), as ``tokentune_decoder_loss``."""
    real = attention_mask.detach().to("cpu", torch.bool)
    targets = next_token_targets(labels.detach().cpu(), real)
    return real & (targets != IGNORE_INDEX)


def select_labelled(
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    ratio: float | None = None,
    count: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``tokentune.select: labelled`` (our extension): BoolTensor[B, L] on ``attention_mask``'s device.

    The same k per sequence as ``select_tokens``, in this order of priority: the first and last real
    token; the positions that predict a supervised label (``supervised_positions``), uniformly among
    them when they do not all fit; then the other real tokens uniformly. Draws the same B * L CPU
    uniforms from ``generator`` as ``select_tokens``.
    """
    real = attention_mask.detach().to("cpu", torch.bool)
    u = torch.rand(real.shape, generator=generator)  # [0, 1): supervised keep u, the others 1 + u
    scores = torch.where(supervised_positions(labels, real), u, 1.0 + u)
    return _lowest_k(scores, real, num_selected(real.sum(1), ratio, count)).to(attention_mask.device)


# ---- the split-forward loss --------------------------------------------------------------------
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


def tokentune_loss(model: nn.Module, batch: dict[str, torch.Tensor], selected: torch.Tensor) -> torch.Tensor:
    """The training loss over the selected tokens, with the split forward (decoder or encoder).

    Runs through ``model(**batch)`` (so peft/DDP/DeepSpeed wrappers run their forward) with the
    transformers model's forward temporarily replaced by the split forward. Decoders: mean
    next-token cross-entropy over selected positions with a valid next label. Encoders: the
    model's own classification loss (see ``encoder``).
    """
    if check_supported(model) == "encoder":
        return tokentune_encoder_loss(model, batch, selected)
    return tokentune_decoder_loss(model, batch, selected)


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
        terms.selection_mask = True  # the split forward's [selected x all] attention mask
        # its sdpa always passes a mask, so on CUDA and CPU GQA keys/values are repeated per query head
        # before the kernel (``gqa_in_kernel``, transformers' rule) and saved at the query heads' width
        terms.kv_width = 2 * terms.shape.heads * terms.shape.head_dim

    def __init__(self, config: TokenTuneSettings) -> None:
        super().__init__(config)
        self.generator = torch.Generator().manual_seed(config.seed)
        self._selected = self._real = self._supervised = self._covered = 0

    def prepare(self, model: nn.Module) -> nn.Module:
        """Fail before training on an unsupported architecture; the model is returned unchanged.

        The generator is created (seeded) in ``__init__``, so ``load_state_dict`` may come before or after.
        """
        self._check_select(check_supported(model))
        return model

    def _check_select(self, kind: str) -> None:
        if self.config.select == "labelled" and kind != "decoder":
            raise ConfigError(
                "tokentune.select='labelled' needs per-token labels (a decoder's next-token loss); "
                "sequence classifiers have one label per sequence: use tokentune.select: uniform"
            )

    def on_step_start(self, ctx: StepContext) -> None:
        self._selected = self._real = self._supervised = self._covered = 0

    def compute_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: StepContext | None = None):
        if not model.training:
            return None
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(batch["input_ids"])
        kind = check_supported(model)
        self._check_select(kind)
        c, labels = self.config, batch.get("labels")
        if c.select == "labelled":
            if labels is None:
                raise ValueError("tokentune.select='labelled' needs labels in the batch")
            selected = select_labelled(attention_mask, labels, c.ratio, c.count, self.generator)
        else:
            selected = select_tokens(attention_mask, c.ratio, c.count, self.generator)
        self._selected += int(selected.sum())
        self._real += int(attention_mask.bool().sum())
        if kind == "decoder" and labels is not None:
            supervised = supervised_positions(labels, attention_mask)
            self._supervised += int(supervised.sum())
            self._covered += int((supervised & selected.cpu()).sum())
        return tokentune_loss(model, batch, selected)

    def metrics(self) -> dict[str, float]:
        """Over the last step's micro-batches: selected tokens, their fraction of real tokens and
        (decoders) ``label_coverage``, the share of supervised positions that were selected."""
        if not self._real:
            return {}
        out = {
            "tokentune/selected_frac": self._selected / self._real,
            "tokentune/selected_tokens": self._selected,
        }
        if self._supervised:
            out["tokentune/label_coverage"] = self._covered / self._supervised
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])
