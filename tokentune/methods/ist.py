"""IST (importance-aware sparse tuning) and RST (random sparse tuning): train a sampled subset of
decoder layers per optimizer step.

IST (Yao et al., Findings of EMNLP 2024) keeps a score per layer (higher = *less* important, init 0).
Every step it samples ``budget`` layers with weights ``sigmoid(-s)`` without replacement; only their
adapters train. Every ``update_every`` steps from ``start_step`` it probes: K times it suppresses a
distinct set of layers (weights ``sigmoid(s)``) by scaling each suppressed module's adapter output by
``suppress_factor``, measures the loss on one probe batch (eval mode, no grad), and moves the scores
of the suppressed layers by ``score_lr * r_j * p (1 - p)`` with the centred reward
``r_j = exp(-loss_j) - mean_k exp(-loss_k)``. RST samples layers uniformly and never probes (the
public IST code has no RST file; this is our definition).

How a layer is frozen for one step (works with plain PyTorch and under DeepSpeed ZeRO, where
toggling ``requires_grad`` breaks gradient partitioning):

- ``requires_grad`` never changes. Each module of an inactive layer that owns trainable parameters
  runs its forward with those parameters *detached* (``module.weight`` reads ``p.detach()`` during the
  call; the parameter itself stays registered). The layer then behaves exactly as if its adapters were frozen: no
  gradient reaches them, the gradient w.r.t. the layer's input still flows through the adapter branch
  (as with ``requires_grad=False`` in the original), and a layer whose input needs no gradient (every
  layer below the lowest active one) builds no graph and saves nothing for backward.
- Every trainable parameter is in the optimizer from the start: one parameter group per layer
  (tagged ``GROUP_KEY``: the layer index) plus one group for trainable parameters outside the layers
  (e.g. ``modules_to_save``; they always train). For the step, an inactive layer's group gets
  ``lr = 0`` and ``weight_decay = 0``: plain AdamW skips parameters whose grad is None; an optimizer
  that sees zero gradients instead (DeepSpeed's flat partitions) leaves the weights bit-identical.
  ``on_step_end`` restores ``weight_decay`` and, unless the scheduler already wrote a new lr, the lr.

Scope: IST needs peft LoRA/DoRA adapters inside the layers (suppression scales adapter outputs). RST
works with lora, dora and full fine-tuning (layer-wise; parameters outside the layers always train).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from tokentune.errors import ConfigError
from tokentune.methods.base import Method, StepContext, register

GROUP_KEY = "ist_layer"  # optimizer param-group key: the decoder layer index the group belongs to
LAYER_LIST_NAMES = ("layers", "h", "layer", "blocks")
_MIN_WEIGHT = 1e-12  # floor for sampling weights (sigmoid underflow must not starve multinomial)
_MAX_TRIES_PER_SET = 100  # rejection sampling of distinct suppression sets, then a deterministic fill


# ---- settings ------------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(cond: bool, key: str, value: Any, accepted: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is invalid: expected {accepted}")


def _check_budget(section: str, budget: Any) -> None:
    ok = (_is_int(budget) and budget >= 1) or (isinstance(budget, float) and 0 < budget <= 1)
    _check(
        ok,
        f"{section}.budget",
        budget,
        "an integer >= 1 (layers trained per step) or a fraction of the layers in (0, 1], e.g. 0.25",
    )


@dataclass
class ISTSettings:
    """Importance-aware sparse tuning (section ``ist``)."""

    budget: int | float = 0.25  # layers trained per step: a count (int) or a fraction of the layers (float)
    update_every: int = 10  # probe every N optimizer steps ...
    start_step: int = 10  # ... from this step (0-based step just run)
    probe_sets: int = 3  # K distinct suppression sets per probe round (capped at C(L, n_suppress))
    suppress_fraction: float = 0.5  # share of layers suppressed per set (at least 1 layer)
    suppress_factor: float = 0.25  # suppressed layers' adapter outputs are scaled by this
    score_lr: float = 10.0  # step size of the score update
    probe_batch_size: int = 16  # examples in the probe batch (read by the training loop)
    seed: int = 0  # seed of IST's own generator (layer and suppression-set sampling)

    def __post_init__(self) -> None:
        _check_budget("ist", self.budget)
        _check(
            _is_int(self.update_every) and self.update_every >= 1,
            "ist.update_every",
            self.update_every,
            "an integer >= 1",
        )
        _check(
            _is_int(self.start_step) and self.start_step >= 0,
            "ist.start_step",
            self.start_step,
            "an integer >= 0",
        )
        _check(
            _is_int(self.probe_sets) and self.probe_sets >= 2,
            "ist.probe_sets",
            self.probe_sets,
            "an integer >= 2",
        )
        _check(
            _is_number(self.suppress_fraction) and 0 < self.suppress_fraction <= 1,
            "ist.suppress_fraction",
            self.suppress_fraction,
            "a fraction of the layers in (0, 1], e.g. 0.5",
        )
        _check(
            _is_number(self.suppress_factor) and 0 <= self.suppress_factor < 1,
            "ist.suppress_factor",
            self.suppress_factor,
            "a number in [0, 1), e.g. 0.25",
        )
        _check(
            _is_number(self.score_lr) and self.score_lr > 0,
            "ist.score_lr",
            self.score_lr,
            "a number > 0, e.g. 10",
        )
        _check(
            _is_int(self.probe_batch_size) and self.probe_batch_size >= 1,
            "ist.probe_batch_size",
            self.probe_batch_size,
            "an integer >= 1",
        )
        _check(_is_int(self.seed), "ist.seed", self.seed, "an integer")


@dataclass
class RSTSettings:
    """Random sparse tuning (section ``rst``): uniform layer sampling, no probing."""

    budget: int | float = 0.25  # layers trained per step: a count (int) or a fraction of the layers (float)
    seed: int = 0

    def __post_init__(self) -> None:
        _check_budget("rst", self.budget)
        _check(_is_int(self.seed), "rst.seed", self.seed, "an integer")


def resolve_budget(budget: int | float, num_layers: int, key: str = "ist.budget") -> int:
    """Layers per step: a count, or ``floor(fraction * L)``; at least 1, at most L."""
    if _is_int(budget):
        if budget > num_layers:
            raise ConfigError(
                f"{key}={budget!r} is invalid: the model has {num_layers} decoder layers with trainable "
                f"parameters; expected at most {num_layers} (or a fraction in (0, 1])"
            )
        return int(budget)
    return max(1, min(num_layers, math.floor(budget * num_layers + 1e-9)))


# ---- the math (pure functions) ---------------------------------------------------------------------
def sample_layers(
    scores: torch.Tensor, k: int, generator: torch.Generator | None = None, uniform: bool = False
) -> torch.Tensor:
    """``k`` distinct layer indices (sorted), drawn with weights ``sigmoid(-scores)`` (or uniformly)."""
    n = scores.numel()
    if not 1 <= k <= n:
        raise ValueError(f"cannot sample {k} of {n} layers")
    weights = (
        torch.ones(n, dtype=torch.float64) if uniform else torch.sigmoid(-scores.detach().double().cpu())
    )
    idx = torch.multinomial(weights.clamp_min(_MIN_WEIGHT), k, replacement=False, generator=generator)
    return idx.sort().values


def sample_suppression_sets(
    scores: torch.Tensor, n_sets: int, n_suppress: int, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """Up to ``n_sets`` distinct sets of ``n_suppress`` layers, each drawn with weights ``sigmoid(scores)``.

    The count is capped at ``C(L, n_suppress)``. Rejection sampling is bounded; should it fall short
    (extremely skewed weights), the remaining sets are the unused combinations of the highest-weight
    layers, so the function always terminates.
    """
    n = scores.numel()
    if not 1 <= n_suppress <= n:
        raise ValueError(f"cannot suppress {n_suppress} of {n} layers")
    n_sets = min(n_sets, math.comb(n, n_suppress))
    weights = torch.sigmoid(scores.detach().double().cpu()).clamp_min(_MIN_WEIGHT)
    chosen: list[tuple[int, ...]] = []
    for _ in range(_MAX_TRIES_PER_SET * n_sets):
        if len(chosen) == n_sets:
            break
        s = tuple(
            sorted(torch.multinomial(weights, n_suppress, replacement=False, generator=generator).tolist())
        )
        if s not in chosen:
            chosen.append(s)
    if len(chosen) < n_sets:
        by_weight = torch.argsort(weights, descending=True, stable=True).tolist()
        for combo in itertools.combinations(by_weight, n_suppress):
            s = tuple(sorted(combo))
            if s not in chosen:
                chosen.append(s)
            if len(chosen) == n_sets:
                break
    return [torch.tensor(s, dtype=torch.long) for s in chosen]


def centred_rewards(losses: torch.Tensor) -> torch.Tensor:
    """``exp(-loss_j) - mean_k exp(-loss_k)`` (float64; sums to zero)."""
    r = torch.exp(-losses.detach().double().cpu())
    return r - r.mean()


def update_scores(
    scores: torch.Tensor, sets: list[torch.Tensor], rewards: torch.Tensor, lr_s: float
) -> torch.Tensor:
    """``s_i += lr_s * r_j * p_i (1 - p_i)`` for each layer i of set j, with ``p = sigmoid(s)`` before the update."""
    p = torch.sigmoid(scores.double())
    slope = p * (1 - p)
    new = scores.double().clone()
    for layer_set, r in zip(sets, rewards.double()):
        new.index_add_(0, layer_set, lr_s * r * slope[layer_set])
    return new.to(scores.dtype)


# ---- model plumbing ----------------------------------------------------------------------------
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


def _draw_probe_batch(probe_batch: Any, size: int) -> dict[str, Any]:
    """``probe_batch(size)`` when the loop's callable takes a size, else ``probe_batch()``."""
    try:
        takes_size = bool(inspect.signature(probe_batch).parameters)
    except (TypeError, ValueError):
        takes_size = False
    return probe_batch(size) if takes_size else probe_batch()


def _probe_inputs(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    keys = ("input_ids", "attention_mask", "labels", "position_ids")
    out = {k: batch[k].to(device) for k in keys if k in batch and isinstance(batch[k], torch.Tensor)}
    if "labels" not in out:
        labels = out["input_ids"].clone()
        if "attention_mask" in out:
            labels[out["attention_mask"] == 0] = -100
        out["labels"] = labels
    return out


# ---- the methods ---------------------------------------------------------------------------------
class _SparseLayerTuning(Method):
    """Shared by IST and RST: layer discovery, per-layer groups, per-step freezing, state."""

    kind = "modifier"
    order = 40  # after the trainer (20) wrapped the model and TokenTune (30)
    uniform: ClassVar[bool] = False
    probes: ClassVar[bool] = False

    @classmethod
    def check_shape(cls, settings: Any, shape: Any, section: str) -> None:
        if _is_int(settings.budget):
            resolve_budget(settings.budget, shape.layers, f"{section}.budget")

    @classmethod
    def memory_terms(cls, settings: Any, terms: Any) -> None:
        layers, b = terms.shape.layers, settings.budget
        terms.active_layers = resolve_budget(min(b, layers) if _is_int(b) else b, layers)

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.generator = torch.Generator().manual_seed(int(config.seed))
        self.layer_index: list[int] = []  # model layer index of each candidate (layers with trainable params)
        self._leaves: list[list[nn.Module]] = []
        self._adapter_outputs: list[list[nn.Module]] = []
        self.budget = 0
        self.scores: torch.Tensor | None = None  # [L] float64; higher = less important
        self.active: torch.Tensor | None = None  # candidate positions trained this step
        self.step = 0  # optimizer steps completed
        self.probe_losses: list[float] = []
        self.last_probe_sets: list[list[int]] = []  # model layer indices suppressed in the last probe round
        self.probe_s = 0.0  # probe wall time in the last completed step
        self.probe_s_total = 0.0
        self._stop = GradientStop()
        self._paused: list[tuple[dict, Any, Any]] = []
        self._pending_state: dict[str, Any] | None = None

    # ---- hooks ---------------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        layers = find_decoder_layers(model)
        self.layer_index, self._leaves, self._adapter_outputs = [], [], []
        for i, layer in enumerate(layers):
            leaves = trainable_leaves(layer)
            if leaves:
                self.layer_index.append(i)
                self._leaves.append(leaves)
                if self.probes:
                    self._adapter_outputs.append(adapter_output_modules(layer))
        if not self.layer_index:
            raise ConfigError(
                f"{self.name}: no trainable parameters inside the model's {len(layers)} decoder layers; "
                f"{self.name} needs a per-layer trainer ({', '.join(self.requires_any)})"
            )
        if self.probes and not any(self._adapter_outputs):
            raise ConfigError(
                f"{self.name}: no peft LoRA/DoRA adapters inside the decoder layers (methods lora or dora)"
            )
        self.budget = resolve_budget(self.config.budget, len(self.layer_index), f"{self.name}.budget")
        self.scores = torch.zeros(len(self.layer_index), dtype=torch.float64)
        if self._pending_state is not None:
            self.load_state_dict(self._pending_state)
        return model

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        self._require_prepared()
        groups: list[dict[str, Any]] = []
        seen: set[int] = set()
        for i, leaves in zip(self.layer_index, self._leaves):
            params = [
                p
                for m in leaves
                for p in m.parameters(recurse=False)
                if p.requires_grad and id(p) not in seen
            ]
            seen.update(id(p) for p in params)
            if params:
                groups.append({"params": params, GROUP_KEY: i})
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
        if rest:
            groups.append({"params": rest})
        return groups

    def on_step_start(self, ctx: StepContext) -> None:
        self._require_prepared()
        self._restore()
        self.active = sample_layers(self.scores, self.budget, self.generator, uniform=self.uniform)
        active = set(self.active.tolist())
        inactive = [j for j in range(len(self.layer_index)) if j not in active]
        self._stop.install([m for j in inactive for m in self._leaves[j]])
        if ctx.optimizer is not None:
            self._paused = pause_groups(ctx.optimizer, {self.layer_index[j] for j in inactive})

    def on_step_end(self, ctx: StepContext) -> None:
        self._restore()
        self.step = ctx.step + 1
        self.probe_s = 0.0
        if self.probes and self._probe_due(ctx.step):
            self.probe(ctx)

    def metrics(self) -> dict[str, float]:
        p = self.name
        out = {f"{p}/active_layers": float(self.budget)}
        active = set(self.active.tolist()) if self.active is not None else set()
        for j, i in enumerate(self.layer_index):
            out[f"{p}/active/{i}"] = 1.0 if j in active else 0.0
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "scores": None if self.scores is None else self.scores.clone(),
            "generator": self.generator.get_state(),
            "step": self.step,
            "probe_losses": list(self.probe_losses),
            "probe_s_total": self.probe_s_total,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scores is None:  # not prepared yet: apply in prepare
            self._pending_state = dict(state)
            return
        self._pending_state = None
        scores = state.get("scores")
        if scores is not None:
            if scores.numel() != self.scores.numel():
                raise ConfigError(
                    f"{self.name}: checkpoint has scores for {scores.numel()} layers, "
                    f"the model has {self.scores.numel()} trainable layers"
                )
            self.scores = scores.detach().double().cpu().clone()
        if state.get("generator") is not None:
            self.generator.set_state(state["generator"])
        self.step = int(state.get("step", 0))
        self.probe_losses = list(state.get("probe_losses", []))
        self.probe_s_total = float(state.get("probe_s_total", 0.0))

    # ---- internals ------------------------------------------------------------------------------
    def _require_prepared(self) -> None:
        if self.scores is None:
            raise RuntimeError(f"{self.name}: prepare(model) must run before training")

    def _restore(self) -> None:
        self._stop.remove()
        restore_groups(self._paused)
        self._paused = []

    def _probe_due(self, step: int) -> bool:
        return False


@register
class IST(_SparseLayerTuning):
    """Importance-aware sparse tuning: sample layers by learned importance, probe to learn it."""

    name = "ist"
    config_cls = ISTSettings
    requires_any = ("lora", "dora")
    conflicts = ("rst",)
    probes = True

    def prepare(self, model: nn.Module) -> nn.Module:
        model = super().prepare(model)
        self.n_suppress = resolve_budget(float(self.config.suppress_fraction), len(self.layer_index))
        return model

    def _probe_due(self, step: int) -> bool:
        c = self.config
        n_sets = min(c.probe_sets, math.comb(len(self.layer_index), self.n_suppress))
        return n_sets >= 2 and step >= c.start_step and (step - c.start_step) % c.update_every == 0

    def probe(self, ctx: StepContext) -> torch.Tensor:
        """One probe round: K suppressed forwards on one probe batch, then the score update."""
        if ctx.probe_batch is None:
            raise RuntimeError("ist: the training loop passed no probe_batch; IST needs one to probe layers")
        t0 = time.perf_counter()
        c = self.config
        sets = sample_suppression_sets(self.scores, c.probe_sets, self.n_suppress, self.generator)
        batch = _probe_inputs(_draw_probe_batch(ctx.probe_batch, c.probe_batch_size), ctx.device)
        model = ctx.model
        was_training = model.training
        model.eval()
        losses = []
        try:
            with torch.no_grad(), ctx.autocast() if ctx.autocast is not None else contextlib.nullcontext():
                for layer_set in sets:
                    modules = [m for j in layer_set.tolist() for m in self._adapter_outputs[j]]
                    with scaled_outputs(modules, c.suppress_factor):
                        losses.append(model(**batch).loss.detach().float())
        finally:
            model.train(was_training)
        loss_t = torch.stack(losses)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ws = torch.distributed.get_world_size()
            if ws > 1:
                torch.distributed.all_reduce(loss_t, op=torch.distributed.ReduceOp.SUM)
                loss_t = loss_t / ws
        loss_t = loss_t.cpu()
        self.scores = update_scores(self.scores, sets, centred_rewards(loss_t), c.score_lr)
        self.probe_losses = loss_t.tolist()
        self.last_probe_sets = [[self.layer_index[j] for j in layer_set.tolist()] for layer_set in sets]
        self.probe_s = time.perf_counter() - t0
        self.probe_s_total += self.probe_s
        return loss_t

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        for j, i in enumerate(self.layer_index):
            out[f"ist/score/{i}"] = float(self.scores[j])
        for j, loss in enumerate(self.probe_losses):
            out[f"ist/probe_loss/{j}"] = loss
        out["ist/probe_s"] = self.probe_s
        out["ist/probe_s_total"] = self.probe_s_total
        return out


@register
class RST(_SparseLayerTuning):
    """Random sparse tuning: uniform layer sampling, no probing (defined here; absent from IST's code)."""

    name = "rst"
    config_cls = RSTSettings
    requires_any = ("lora", "dora", "full")
    conflicts = ("ist",)
    uniform = True
