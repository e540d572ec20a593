"""The model and optimizer plumbing of IST/RST: find the decoder layers, freeze a layer for one
step in a way that works with plain PyTorch and under DeepSpeed ZeRO, and scale adapter outputs
(IST's suppression probes, run by ``probe_losses`` with shared layer prefixes).

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

import torch
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


def gradient_stopped(module: nn.Module) -> bool:
    """Whether ``module`` runs with its trainable parameters detached this step (``GradientStop``)."""
    forward = module.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func is _call_with_detached_params


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


# ---- IST's probe forwards ------------------------------------------------------------------------
def probe_plan(patterns: list[tuple[bool, ...]]) -> list[tuple[int, int]]:
    """The order to run the probes in and the layer each starts at: ``[(probe, start layer), ...]``.

    ``patterns[k][i]``: probe k suppresses layer i. Below the first layer where two probes' patterns
    differ their forwards are identical, so in lexicographic order each probe starts where it first
    differs from the probe run before it, from that probe's input to that layer; every shared prefix
    of layers is then computed once (the first probe starts at 0).
    """
    order = sorted(range(len(patterns)), key=lambda k: patterns[k])
    plan, prev = [], None
    for k in order:
        start = 0
        if prev is not None:
            while start < len(patterns[k]) and patterns[k][start] == prev[start]:
                start += 1
            start = min(start, len(patterns[k]) - 1)  # equal patterns: still run the top layer
        plan.append((k, start))
        prev = patterns[k]
    return plan


def _hidden_arg(args: tuple, kwargs: dict) -> Any:
    return args[0] if args else kwargs.get("hidden_states")


def _plain_layers(layers: nn.ModuleList) -> bool:
    """No forward hooks (global or on a layer) and no instance-level ``forward`` (accelerate's hooks)."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return False
    return not any(x._forward_hooks or x._forward_pre_hooks or "forward" in x.__dict__ for x in layers)


class _ChainCheck:
    """Checks, as a forward runs, that layers 0..n-1 are called once each, in order, each one's input
    being the previous one's output object (a tensor); holds no more than the last output."""

    def __init__(self, n: int) -> None:
        self.n, self.calls, self.good, self.last = n, [], True, None

    def enter(self, i: int, _m: nn.Module, args: tuple, kwargs: dict) -> None:
        x = _hidden_arg(args, kwargs)
        self.calls.append(("in", i))
        self.good &= isinstance(x, torch.Tensor) and (i == 0 or x is self.last)
        self.last = None

    def leave(self, i: int, _m: nn.Module, _args: tuple, out: Any) -> None:
        self.calls.append(("out", i))
        self.good &= isinstance(out, torch.Tensor)
        self.last = out

    def held(self) -> bool:
        self.last = None
        return self.good and self.calls == [(kind, i) for i in range(self.n) for kind in ("in", "out")]


class _PrefixRunner:
    """Runs ``model(**batch)`` from layer ``start``: the layers below it are skipped (they return the
    input of layer ``start`` captured in an earlier run) and the inputs of the layers in ``needed``
    above ``start`` are captured for later runs.

    Entry d of ``inputs`` is the input of layer d under the suppression pattern of the latest run
    (a run from ``start`` leaves the entries d <= start valid: below ``start`` its pattern is the
    previous run's). The first run (start 0) also checks the protocol the skipping relies on: the
    model calls its layers once each, in order, each layer's input being the previous layer's output
    object (a tensor), as transformers 5.x Llama-style decoders do; ``ok`` is False otherwise.
    """

    def __init__(self, layers: nn.ModuleList, needed: set[int]) -> None:
        self.layers = layers
        self.needed = needed
        self.inputs: dict[int, torch.Tensor] = {}
        self.ok = True

    @contextlib.contextmanager
    def run(self, start: int) -> Iterator[None]:
        handles, found = [], {}
        chain = _ChainCheck(len(self.layers))
        if start == 0:  # check the layer protocol on this full forward
            for i, layer in enumerate(self.layers):
                handles.append(
                    layer.register_forward_pre_hook(functools.partial(chain.enter, i), with_kwargs=True)
                )
                handles.append(layer.register_forward_hook(functools.partial(chain.leave, i)))
        else:
            cached = self.inputs[start]
            for layer in self.layers[:start]:
                layer.forward = lambda *_a, **_k: cached
        for d in sorted(x for x in self.needed if x > start):
            hook = functools.partial(self._capture, found, d)
            handles.append(self.layers[d].register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for layer in self.layers[:start]:
                del layer.forward
        if start == 0:
            self.ok = self.ok and chain.held()
        for d in (x for x in self.needed if x > start):
            if len(found.get(d, ())) != 1 or not isinstance(found[d][0], torch.Tensor):
                self.ok = False
            else:
                self.inputs[d] = found[d][0]

    @staticmethod
    def _capture(found: dict, d: int, _m: nn.Module, args: tuple, kwargs: dict) -> None:
        found.setdefault(d, []).append(_hidden_arg(args, kwargs))


def probe_losses(
    model: nn.Module,
    batch: dict[str, Any],
    layers: nn.ModuleList,
    suppressed: list[list[int]],
    modules: list[list[nn.Module]],
    factor: float,
    share_prefix: bool = True,
) -> list[torch.Tensor]:
    """The loss of ``model(**batch)`` with each set's ``modules`` outputs scaled by ``factor``.

    ``suppressed[k]``: the indices into ``layers`` that probe k suppresses (their adapter-output
    modules: ``modules[k]``). Runs under the caller's grad mode and autocast; returns detached float32
    losses in the order of ``suppressed``. With ``share_prefix`` (the default) the probes run in
    ``probe_plan``'s order and skip the layers they share with earlier probes, starting from a
    captured layer input: the same computation on the same inputs, hence bit-identical losses. It
    falls back to a full forward per probe when a layer or the process has forward hooks (e.g.
    DeepSpeed ZeRO-3's parameter gathering) or an instance-level forward (accelerate's offloading),
    or when the model does not call its layers as a plain chain (checked on the first, full forward).
    """
    n = len(layers)
    patterns = [tuple(i in set(s) for i in range(n)) for s in suppressed]
    losses: list[torch.Tensor | None] = [None] * len(suppressed)
    plan = probe_plan(patterns) if share_prefix and _plain_layers(layers) else []
    runner = _PrefixRunner(layers, {start for _, start in plan if start > 0})
    for k, start in plan:
        with scaled_outputs(modules[k], factor):
            if start > 0 and not (runner.ok and _plain_layers(layers[:start])):
                break  # a skipped layer would run hooks (or the chain check failed): full forwards
            with runner.run(start):
                losses[k] = model(**batch).loss.detach().float()
    for k, loss in enumerate(losses):  # the fallback: a full forward per probe
        if loss is None:
            with scaled_outputs(modules[k], factor):
                losses[k] = model(**batch).loss.detach().float()
    return losses  # type: ignore[return-value]
