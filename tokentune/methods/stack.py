"""``MethodStack``: the methods of one run, in hook order, and the one place the hook sequence lives.

    stack = MethodStack.build(["lora", "tokentune", "ist"], configs)   # or MethodStack.of(cfg)
    model = stack.prepare(load_model(cfg.model, stack.load_kwargs()))
    optimizer = torch.optim.AdamW(stack.param_groups(model), lr=1e-3)
    loss, grad_norm = stack.step(ctx, micro_batches, backward=engine.backward, optimizer_step=engine.step)

The training loop (``tokentune.train``), the benchmarks and the tests drive this object, so an
optimizer step means the same sequence everywhere: ``on_step_start`` -> per micro-batch the loss (a
method's ``compute_loss`` or the stock forward) and its backward -> ``on_before_step`` -> the
optimizer step -> ``on_step_end``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch

from tokentune.methods.base import REGISTRY, Method, StepContext, validate_methods
from tokentune.shape import ModelShape


class MethodStack:
    def __init__(self, methods: list[Method]) -> None:
        self.methods = sorted(methods, key=lambda m: m.order)  # stable for equal orders

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def build(cls, names: list[str], configs: dict[str, Any] | None = None) -> MethodStack:
        """Validate the list's composition and instantiate each method with its settings."""
        configs = validate_methods(names, configs)
        return cls([REGISTRY[n](configs[n]) for n in names])

    @classmethod
    def of(cls, cfg: Any) -> MethodStack:
        """The stack of a ``RunConfig`` (already validated when it was built)."""
        return cls([REGISTRY[n](cfg.method_configs[n]) for n in cfg.methods])

    @staticmethod
    def classes(names: list[str], configs: dict[str, Any]) -> list[tuple[type[Method], Any]]:
        """(method class, its settings) in hook order, without instantiating anything."""
        pairs = [(REGISTRY[n], configs[n]) for n in names]
        return sorted(pairs, key=lambda p: p[0].order)

    @staticmethod
    def check_shape(names: list[str], configs: dict[str, Any], shape: ModelShape) -> None:
        """Every listed method's own check against the model's shape (raises ``ConfigError``)."""
        for n in names:
            REGISTRY[n].check_shape(configs[n], shape, n)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.methods]

    def __iter__(self):
        return iter(self.methods)

    def __repr__(self) -> str:
        return f"MethodStack({self.names})"

    # ---- model and optimizer -----------------------------------------------------------------------
    def load_kwargs(self) -> dict[str, Any]:
        """Extra ``from_pretrained`` kwargs of every method (e.g. QLoRA's quantization config)."""
        out: dict[str, Any] = {}
        for m in self.methods:
            out.update(m.load_kwargs())
        return out

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        for m in self.methods:
            model = m.prepare(model)
        return model

    def param_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        """The first method's groups (IST: one per layer), else every trainable parameter in one group."""
        for m in self.methods:
            groups = m.param_groups(model)
            if groups is not None:
                return groups
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    # ---- one optimizer step ------------------------------------------------------------------------
    def loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], ctx: StepContext | None
    ) -> torch.Tensor:
        """The first method's ``compute_loss`` (TokenTune's split forward), else the stock forward's loss."""
        for m in self.methods:
            loss = m.compute_loss(model, batch, ctx)
            if loss is not None:
                return loss
        return model(**batch).loss

    def step(
        self,
        ctx: StepContext,
        micro_batches: Iterable[dict[str, torch.Tensor]],
        *,
        backward: Callable[[torch.Tensor], None],
        optimizer_step: Callable[[], float],
        forward_context: Callable[[], Any] = contextlib.nullcontext,
        on_micro_batch: Callable[[dict[str, torch.Tensor], torch.Tensor], None] | None = None,
    ) -> tuple[float, float]:
        """Run one optimizer step through every hook; returns (mean micro-batch loss, gradient norm).

        ``backward(loss)`` per micro-batch and ``optimizer_step()`` (-> gradient norm) come from the
        engine (plain PyTorch or DeepSpeed); ``forward_context`` wraps each forward (autocast, or a
        benchmark's saved-tensor hooks); ``on_micro_batch(batch, loss)`` sees each micro-batch.
        """
        for m in self.methods:
            m.on_step_start(ctx)
        total, n = 0.0, 0
        for batch in micro_batches:
            ctx.batch = batch
            with forward_context():
                loss = self.loss(ctx.model, batch, ctx)
            backward(loss)
            total += float(loss.detach())
            n += 1
            if on_micro_batch is not None:
                on_micro_batch(batch, loss)
        for m in self.methods:
            m.on_before_step(ctx)
        grad_norm = optimizer_step()
        for m in self.methods:
            m.on_step_end(ctx)
        return total / max(n, 1), grad_norm

    # ---- reports and checkpoints -------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for m in self.methods:
            out.update(m.metrics())
        return out

    def state_dict(self) -> dict[str, Any]:
        return {m.name: m.state_dict() for m in self.methods}

    def load_state_dict(self, states: dict[str, Any]) -> None:
        for m in self.methods:
            if m.name in states:
                m.load_state_dict(states[m.name])
