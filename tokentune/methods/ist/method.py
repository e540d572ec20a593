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

This module holds the settings and the registered methods (when things happen); the math is in
``layer_sampling``; the per-step layer freezing (DeepSpeed-safe) and the probe forwards
(``probe_losses``: the K probes share the layers below their first difference) in ``sparse_layers``.

Scope: IST needs peft LoRA/DoRA adapters inside the layers (suppression scales adapter outputs). RST
works with lora, dora and full fine-tuning (layer-wise; parameters outside the layers always train).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from tokentune.errors import ConfigError, check, is_int, is_number
from tokentune.methods.base import IGNORE_INDEX, Method, StepContext, register
from tokentune.methods.ist.layer_sampling import (
    centred_rewards,
    sample_layers,
    sample_suppression_sets,
    update_scores,
)
from tokentune.methods.ist.sparse_layers import (
    GROUP_KEY,
    GradientStop,
    adapter_output_modules,
    find_decoder_layers,
    pause_groups,
    probe_losses,
    restore_groups,
    trainable_leaves,
)
from tokentune.settings import setting

BUDGET_HELP = "layers trained per step: a count (int) or a fraction of the layers (float), at least 1"


# ---- settings ------------------------------------------------------------------------------------
def _check_budget(section: str, budget: Any) -> None:
    ok = (is_int(budget) and budget >= 1) or (isinstance(budget, float) and 0 < budget <= 1)
    check(
        ok,
        f"{section}.budget",
        budget,
        "an integer >= 1 (layers trained per step) or a fraction of the layers in (0, 1], e.g. 0.25",
    )


@dataclass
class ISTSettings:
    """Importance-aware sparse tuning (section ``ist``)."""

    budget: int | float = setting(0.25, BUDGET_HELP)
    update_every: int = setting(10, "probe (update the importance scores) every N optimizer steps")
    start_step: int = setting(10, "first step that probes (0-based step just run)")
    probe_sets: int = setting(3, "K distinct suppression sets per probe round (capped at C(L, suppressed))")
    suppress_fraction: float = setting(0.5, "share of the layers suppressed in each set (at least 1 layer)")
    suppress_factor: float = setting(0.25, "suppressed layers' adapter outputs are scaled by this")
    score_lr: float = setting(10.0, "step size of the importance-score update")
    probe_batch_size: int = setting(16, "examples in the probe batch")
    seed: int = setting(0, "seed of IST's own generator (layer and suppression-set sampling)")

    def __post_init__(self) -> None:
        _check_budget("ist", self.budget)
        for key, ok, accepted in (
            ("update_every", is_int(self.update_every) and self.update_every >= 1, "an integer >= 1"),
            ("start_step", is_int(self.start_step) and self.start_step >= 0, "an integer >= 0"),
            ("probe_sets", is_int(self.probe_sets) and self.probe_sets >= 2, "an integer >= 2"),
            (
                "suppress_fraction",
                is_number(self.suppress_fraction) and 0 < self.suppress_fraction <= 1,
                "a fraction of the layers in (0, 1], e.g. 0.5",
            ),
            (
                "suppress_factor",
                is_number(self.suppress_factor) and 0 <= self.suppress_factor < 1,
                "a number in [0, 1), e.g. 0.25",
            ),
            ("score_lr", is_number(self.score_lr) and self.score_lr > 0, "a number > 0, e.g. 10"),
            (
                "probe_batch_size",
                is_int(self.probe_batch_size) and self.probe_batch_size >= 1,
                "an integer >= 1",
            ),
            ("seed", is_int(self.seed), "an integer"),
        ):
            check(ok, f"ist.{key}", getattr(self, key), accepted)


@dataclass
class RSTSettings:
    """Random sparse tuning (section ``rst``): uniform layer sampling, no probing."""

    budget: int | float = setting(0.25, BUDGET_HELP)
    seed: int = setting(0, "seed of RST's own generator (layer sampling)")

    def __post_init__(self) -> None:
        _check_budget("rst", self.budget)
        check(is_int(self.seed), "rst.seed", self.seed, "an integer")


def resolve_budget(budget: int | float, num_layers: int, key: str = "ist.budget") -> int:
    """Layers per step: a count, or ``floor(fraction * L)``; at least 1, at most L."""
    if is_int(budget):
        if budget > num_layers:
            raise ConfigError(
                f"{key}={budget!r} is invalid: the model has {num_layers} decoder layers with trainable "
                f"parameters; expected at most {num_layers} (or a fraction in (0, 1])"
            )
        return int(budget)
    return max(1, min(num_layers, math.floor(budget * num_layers + 1e-9)))


# ---- probe batches -------------------------------------------------------------------------------
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
            labels[out["attention_mask"] == 0] = IGNORE_INDEX
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
        if is_int(settings.budget):
            resolve_budget(settings.budget, shape.layers, f"{section}.budget")

    @classmethod
    def memory_terms(cls, settings: Any, terms: Any) -> None:
        layers, b = terms.shape.layers, settings.budget
        terms.active_layers = resolve_budget(min(b, layers) if is_int(b) else b, layers)

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
        self._layers: nn.ModuleList | None = None
        self._stop = GradientStop()
        self._paused: list[tuple[dict, Any, Any]] = []
        self._pending_state: dict[str, Any] | None = None

    # ---- hooks ---------------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        layers = self._layers = find_decoder_layers(model)
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
    #: run the K probes from the first layer where their suppressed sets differ (``probe_losses``);
    #: False: a full forward per probe (the same losses, bit for bit; kept for tests and comparisons)
    share_probe_prefix: bool = True

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
        suppressed = [[self.layer_index[j] for j in layer_set.tolist()] for layer_set in sets]
        modules = [[m for j in layer_set.tolist() for m in self._adapter_outputs[j]] for layer_set in sets]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), ctx.autocast() if ctx.autocast is not None else contextlib.nullcontext():
                losses = probe_losses(
                    model,
                    batch,
                    self._layers,
                    suppressed,
                    modules,
                    c.suppress_factor,
                    self.share_probe_prefix,
                )
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
        self.last_probe_sets = suppressed
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
