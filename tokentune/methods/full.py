"""Full fine-tuning: every weight trains, except names matching ``full.freeze`` patterns."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch

from tokentune.errors import check
from tokentune.methods.base import Method, register
from tokentune.settings import setting


@dataclass
class FullSettings:
    """Full fine-tuning (section ``full``)."""

    freeze: list[str] = setting(help="glob patterns of parameter names to keep frozen", factory=list)

    def __post_init__(self) -> None:
        check(
            isinstance(self.freeze, list) and all(isinstance(p, str) for p in self.freeze),
            "full.freeze",
            self.freeze,
            "a list of glob patterns",
        )


def freeze_matching(model: torch.nn.Module, patterns: list[str]) -> int:
    """Set ``requires_grad`` False for parameters matching any pattern; returns how many."""
    n = 0
    for name, p in model.named_parameters():
        frozen = any(fnmatch.fnmatch(name, pat) for pat in patterns)
        p.requires_grad_(not frozen)
        n += frozen
    return n


@register
class Full(Method):
    name = "full"
    config_cls = FullSettings
    kind = "trainer"
    order = 20
    conflicts = ("lora", "dora", "qlora")

    @classmethod
    def memory_terms(cls, settings: FullSettings, terms) -> None:
        h = terms.shape.hidden
        terms.trainable_per_layer = terms.linear_params_per_layer + 2 * h  # linears + two norms
        terms.trainable_outside = terms.embedding_params + h  # embeddings (+ head) + final norm
        terms.trainable_bytes = terms.weight_bytes
        terms.base_trains = True  # norms keep their normalised input, the head its input
        terms.saved_inputs = set(terms.shape.linear_dims())
        if terms.autocast and terms.weight_bytes != 2:  # autocast casts the fp32 norm output once per
            # linear: q/k/v and gate/up keep a bf16 copy each (o_proj's and down_proj's inputs are bf16)
            dims = terms.shape.linear_dims()
            fed = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
            terms.input_elems = sum(dims[n][0] for n in fed) + terms.shape.intermediate

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        freeze_matching(model, self.config.freeze)
        return model
