"""Gradient checkpointing as a method: chosen decoder layers keep only their inputs for backward and
run their forward again when backward reaches them (``torch.utils.checkpoint``, always non-reentrant).

It composes with every trainer, with QLoRA, TokenTune and IST/RST, and decides per call, not per
method name, whether a layer is checkpointed (``checkpoints``): only in training mode, with grad
enabled, and when backward will pass through the layer (an input needs a gradient, or the layer owns
a trainable parameter that is not gradient-stopped this step). So:

- the stock forward (full, lora, dora, qlora): ``prepare`` replaces each chosen layer's ``forward``
  (an instance attribute; parameter names and state dicts are unchanged) by ``stock_forward``;
- TokenTune's split forward calls the layer's submodules itself, not ``layer.forward``: its shared
  ``split_layer`` runs the selected rows' path through ``layer_runner(layer)``, with the selected
  stream, the other rows' keys and values (computed without grad) and the attention mask as the
  checkpoint's inputs, so the recompute rebuilds exactly the selected-token stream;
- IST/RST: a layer below the lowest layer that trains this step has no input that needs a gradient
  and only gradient-stopped parameters (``GradientStop``): it runs plainly, saves nothing and is never
  recomputed. Layers from the lowest trained one upward are checkpointed (backward passes through
  them, trained this step or not).

Eval, generation, merge and IST's probes (eval mode or no grad) run the stock forward.

Memory (``memory_terms``): a checkpointed layer keeps its input (the residual stream of the tokens
that get a gradient; with TokenTune also the other tokens' keys and values) instead of its
activations; the estimate adds one layer's activations, rebuilt during backward, to the transient
peak (``tokentune.estimate``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tokentune.errors import ConfigError, is_int
from tokentune.methods.base import Method, register
from tokentune.methods.ist.sparse_layers import find_decoder_layers, gradient_stopped, trainable_leaves
from tokentune.settings import setting

#: attribute a prepared layer carries: its modules that own trainable parameters (``checkpoints`` reads it)
LEAVES_ATTR = "_checkpointing_leaves"

LAYERS_HELP = (
    "which decoder layers: all, a fraction in (0, 1] of the layers evenly spaced (0.5 = every other "
    "layer, from the first), or a list of layer indices (0-based)"
)


@dataclass
class CheckpointingSettings:
    """Gradient checkpointing (section ``checkpointing``); always non-reentrant."""

    layers: Any = setting("all", LAYERS_HELP)

    def __post_init__(self) -> None:
        v = self.layers
        ok = (
            v == "all"
            or (isinstance(v, float) and 0 < v <= 1)
            or (
                isinstance(v, list)
                and bool(v)
                and all(is_int(i) and i >= 0 for i in v)
                and len(set(v)) == len(v)
            )
        )
        if not ok:
            raise ConfigError(
                f"checkpointing.layers={v!r} is invalid: expected 'all', a fraction in (0, 1] (e.g. 0.5) "
                "or a non-empty list of distinct layer indices >= 0 (e.g. [0, 2])"
            )


def checkpointed_layers(layers: Any, num_layers: int) -> list[int]:
    """The 0-based indices of the checkpointed layers of a model with ``num_layers`` decoder layers.

    ``all``: every layer; a fraction f: ``n = max(1, round(f * L))`` layers evenly spaced from the
    first (``floor(i * L / n)``); a list: those indices (each must be < L: ``ConfigError``).
    """
    if layers == "all":
        return list(range(num_layers))
    if isinstance(layers, float):
        n = max(1, min(num_layers, round(layers * num_layers)))
        return [math.floor(i * num_layers / n) for i in range(n)]
    bad = [i for i in layers if i >= num_layers]
    if bad:
        raise ConfigError(
            f"checkpointing.layers={layers!r} is invalid: the model has {num_layers} decoder layers, "
            f"so indices must be in 0..{num_layers - 1} (got {bad})"
        )
    return sorted(layers)


def on_gradient_path(leaves: list[nn.Module], tensors: tuple[Any, ...]) -> bool:
    """Whether backward will reach a layer: an input tensor needs a gradient, or one of its
    trainable-parameter modules (``leaves``) is not gradient-stopped (IST/RST's inactive layers are)."""
    if any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        return True
    return any(not gradient_stopped(m) for m in leaves)


def checkpoints(layer: nn.Module, tensors: tuple[Any, ...]) -> bool:
    """Whether a call of ``layer`` on ``tensors`` is checkpointed: the layer was prepared by
    ``checkpointing``, trains, grad is enabled and it is on the gradient path."""
    leaves = getattr(layer, LEAVES_ATTR, None)
    return (
        leaves is not None
        and layer.training
        and torch.is_grad_enabled()
        and on_gradient_path(leaves, tensors)
    )


def run_layer(layer: nn.Module, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, checkpointed (non-reentrant) when ``checkpoints(layer, args)``, plainly otherwise."""
    if checkpoints(layer, args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


#: a decoder layer's cache arguments: a recompute would write the cache a second time, and training
#: never reads it, so a checkpointed call gets none (as transformers' own checkpointing does)
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def stock_forward(layer: nn.Module, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A prepared layer's ``forward``: ``forward(*args, **kwargs)``, checkpointed without a cache when
    ``checkpoints`` says so."""
    if not checkpoints(layer, (*args, *kwargs.values())):
        return forward(*args, **kwargs)
    kwargs = {k: (None if k in CACHE_KWARGS else v) for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def layer_runner(layer: nn.Module) -> Callable[..., Any]:
    """``run(fn, *tensors)`` for a split forward's per-layer work: ``run_layer`` on ``layer``."""
    return functools.partial(run_layer, layer)


@register
class Checkpointing(Method):
    """Recompute the chosen decoder layers' activations in backward instead of keeping them."""

    name = "checkpointing"
    config_cls = CheckpointingSettings
    kind = "modifier"
    order = 45  # after the trainer (20) and quantizer (10) built the layers, TokenTune (30) and IST (40)

    @classmethod
    def check_shape(cls, settings: CheckpointingSettings, shape: Any, section: str) -> None:
        checkpointed_layers(settings.layers, shape.layers)

    @classmethod
    def memory_terms(cls, settings: CheckpointingSettings, terms: Any) -> None:
        terms.checkpointed_layers = len(checkpointed_layers(settings.layers, terms.shape.layers))
        terms.recompute_share = terms.checkpointed_layers / max(1, terms.shape.layers)  # the step cost's term

    def __init__(self, config: CheckpointingSettings) -> None:
        super().__init__(config)
        self.layers: list[int] = []

    def prepare(self, model: nn.Module) -> nn.Module:
        layers = find_decoder_layers(model)
        self.layers = checkpointed_layers(self.config.layers, len(layers))
        for i in self.layers:
            layer = layers[i]
            if LEAVES_ATTR in layer.__dict__:
                continue  # prepared already (a second prepare of the same model)
            setattr(layer, LEAVES_ATTR, trainable_leaves(layer))
            layer.forward = functools.partial(stock_forward, layer, layer.forward)
        return model

    def metrics(self) -> dict[str, float]:
        return {"checkpointing/layers": float(len(self.layers))}
