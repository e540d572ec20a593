"""The model and optimizer plumbing of IST/RST: find the decoder layers, freeze a layer for one
step in a way that works with plain PyTorch and under DeepSpeed ZeRO, and scale adapter outputs
(IST's suppression probes).

Toggling ``requires_grad`` per step breaks DeepSpeed's gradient partitioning, so a layer is frozen
for a step like this instead:

- ``requires_grad`` never changes. Each module of an inactive layer that owns trainable parameters
  runs its forward with those parameters *detached* (``GradientStop``: ``module.weight`` reads
  ``p.detach()`` during the call; the parameter itself stays registered). The layer then behaves
  exactly as if its adapters were frozen: no gradient reaches them, the gradient w.r.t. the layer's
  input still flows through the adapter branch (as with ``requires_grad=False``), and a layer whose
  input needs no gradient (every layer below the lowest active one) builds no graph and saves
  nothing for backward.
- Every trainable parameter is in the optimizer from the start: one parameter group per layer
  (tagged ``GROUP_KEY``: the layer index) plus one group for trainable parameters outside the layers
  (e.g. ``modules_to_save``; they always train). For the step, an inactive layer's group gets
  ``lr = 0`` and ``weight_decay = 0`` (``pause_groups``): plain AdamW skips parameters whose grad is
  None; an optimizer that sees zero gradients instead (DeepSpeed's flat partitions) leaves the
  weights bit-identical. ``restore_groups`` puts back ``weight_decay`` and, unless the scheduler
  already wrote a new lr, the lr.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

from torch import nn

from tokentune.errors import ConfigError

GROUP_KEY = "ist_layer"  # optimizer param-group key: the decoder layer index the group belongs to
LAYER_LIST_NAMES = ("layers", "h", "layer", "blocks")


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks: the longest ModuleList named layers, h, layer or blocks."""
    best: nn.ModuleList | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.rsplit(".", 1)[-1] in LAYER_LIST_NAMES and len(mod) > 0:
            if best is None or len(mod) > len(best):
                best = mod
    if best is None:
        raise ConfigError(
            f"no decoder layer list found in {type(model).__name__}: expected a ModuleList named "
            f"{', '.join(LAYER_LIST_NAMES)} (IST/RST train whole layers)"
        )
    return best


def trainable_leaves(layer: nn.Module) -> list[nn.Module]:
    """Modules of ``layer`` that directly own a trainable parameter (LoRA A/B, DoRA magnitude, ...)."""
    return [m for m in layer.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


def adapter_output_modules(layer: nn.Module) -> list[nn.Module]:
    """Per peft LoRA module and active adapter, the submodule whose output is the adapter's output.

    Vanilla LoRA: ``lora_B[a]`` (the module then multiplies by its own ``scaling[a]``); DoRA: the
    magnitude module ``lora_magnitude_vector[a]``, which returns the whole DoRA delta. Scaling these
    outputs scales each module's adapter contribution, whatever its rank or alpha.
    """
    from peft.tuners.lora import LoraLayer

    out: list[nn.Module] = []
    for name, m in layer.named_modules():
        if not isinstance(m, LoraLayer):
            continue
        for a in m.active_adapters:
            if a not in m.lora_A:
                continue
            if a in m.lora_magnitude_vector:
                out.append(m.lora_magnitude_vector[a])
            elif a in getattr(m, "lora_variant", {}):
                raise ConfigError(
                    f"ist: module {name!r} uses the LoRA variant {type(m.lora_variant[a]).__name__}; "
                    "IST supports plain LoRA and DoRA adapters"
                )
            else:
                out.append(m.lora_B[a])
    return out


def _call_with_detached_params(module: nn.Module, inner, *args, **kwargs):
    """Run ``inner`` (the module's forward) seeing detached copies of its trainable parameters.

    The detached tensors shadow the parameters as instance attributes (``module.weight`` reads them),
    while ``module._parameters`` is left alone: ``parameters()``, optimizers and DeepSpeed ZeRO-3's
    bookkeeping (which walks ``_parameters`` of enclosing modules during nested calls, e.g. DoRA's
    magnitude module calling lora_A/lora_B) see the real parameters throughout.
    """
    names = [k for k, p in module._parameters.items() if p is not None and p.requires_grad]
    for k in names:
        module.__dict__[k] = module._parameters[k].detach()  # taken now: after ZeRO-3 gathered it
    try:
        return inner(*args, **kwargs)
    finally:
        for k in names:
            module.__dict__.pop(k, None)


_NO_INSTANCE_FORWARD = object()


class GradientStop:
    """Installs/removes detached-parameter forwards on modules (idempotent, exact restore)."""

    def __init__(self) -> None:
        self._installed: dict[nn.Module, Any] = {}

    def install(self, modules: list[nn.Module]) -> None:
        for m in modules:
            if m in self._installed:
                continue
            self._installed[m] = m.__dict__.get("forward", _NO_INSTANCE_FORWARD)
            m.forward = functools.partial(_call_with_detached_params, m, m.forward)

    def remove(self) -> None:
        for m, prev in self._installed.items():
            if prev is _NO_INSTANCE_FORWARD:
                del m.forward
            else:
                m.forward = prev
        self._installed.clear()

    def __len__(self) -> int:
        return len(self._installed)


@contextlib.contextmanager
def scaled_outputs(modules: list[nn.Module], factor: float) -> Iterator[None]:
    """Multiply each module's output by ``factor`` inside the block (forward hooks, removed after)."""
    handles = [m.register_forward_hook(lambda _m, _args, out: out * factor) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _PausedLR(float):
    """``lr = 0`` written by IST/RST for an inactive layer's group (a scheduler's write replaces it)."""

    __slots__ = ()


def pause_groups(optimizer: Any, layers: set[int]) -> list[tuple[dict, Any, Any]]:
    """Set lr and weight_decay to 0 in the param groups of ``layers``; returns what to restore."""
    paused = []
    for g in getattr(optimizer, "param_groups", []):
        if g.get(GROUP_KEY) in layers:
            paused.append((g, g["lr"], g.get("weight_decay")))
            g["lr"] = _PausedLR(0.0)
            if "weight_decay" in g:
                g["weight_decay"] = 0.0
    return paused


def restore_groups(paused: list[tuple[dict, Any, Any]]) -> None:
    """Undo ``pause_groups``; an lr the scheduler already rewrote (not our 0) is kept."""
    for g, lr, wd in paused:
        if isinstance(g["lr"], _PausedLR):
            g["lr"] = lr
        if wd is not None:
            g["weight_decay"] = wd
