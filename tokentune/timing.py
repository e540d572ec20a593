"""Time, measured per run, and a step-cost estimate per method stack. Pure: no model is loaded.

    clock = StepClock(world=2, gpus_per_worker=0)
    clock.start_step(); clock.add_tokens(512); clock.end_step()   # per optimizer step
    clock.metrics()          # {"time/step_s": ..., "time/train_s": ..., "time/tokens_per_s": ..., ...}
    relative_step_cost(cfg)  # estimated step time of cfg's methods / its trainer alone (1.0: the same)

Measured (``TIME_METRICS``, reported by ``tokentune.train`` with every report, on every rank):

- ``time/step_s``: the median wall time of this call's optimizer steps (forward, backward and the
  optimizer step of every micro-batch; the first step, which allocates, included in the median);
- ``time/train_s``: wall time of the training loop in this call, from the first step's start to the
  last step's end (validation and checkpoints in between included; loading, the final save not);
- ``time/tokens_per_s``: real (non-padding) tokens over ``time/train_s``, this rank's count times the
  number of ranks;
- ``time/worker_hours``: ranks x max(1, GPUs per worker) x ``time/train_s`` / 3600 (CPU: one per rank).

A resumed run reports the time of the call that finished it: the steps before the restart are not
counted.

The step-cost estimate counts multiply-accumulates per token from the same ``MemoryTerms`` the memory
estimate composes (``tokentune.estimate.memory_terms``): the forward of every layer over all tokens
and of the head over the share whose logits are kept (``token_share``, as the memory estimate's
logits term: TokenTune's split forward takes the loss on its selected tokens); the backward's input gradients for the share of tokens whose activations are saved
(``token_share``: TokenTune) through the layers above the lowest trained one (IST/RST: its expected
depth when ``active_layers`` of ``L`` layers are drawn uniformly), and its weight gradients where the
base trains (full fine-tuning; adapters' are negligible); ``recompute_share`` of the layers' forward
again (gradient checkpointing). The ratio divides by the same count for the run's trainer and quantizer
alone (``kind`` of each method), the baseline ``bench/methods.py`` compares with. It leaves out
IST's probe rounds, the optimizer step and any kernel's efficiency at a smaller shape.
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokentune.config import RunConfig
    from tokentune.estimate import MemoryTerms
    from tokentune.shape import ModelShape

TIME_METRICS = ("time/step_s", "time/train_s", "time/tokens_per_s", "time/worker_hours")


class StepClock:
    """Wall time of each optimizer step and of the loop (see the module docstring)."""

    def __init__(self, world: int, gpus_per_worker: float = 0.0) -> None:
        self.world, self.gpus = max(1, int(world)), float(gpus_per_worker)
        self.steps: list[float] = []
        self.tokens = 0
        self._first: float | None = None
        self._t = 0.0
        self._last_end = 0.0

    def start_step(self) -> None:
        self._t = time.perf_counter()
        if self._first is None:
            self._first = self._t

    def add_tokens(self, n: int) -> None:
        """Real tokens of a micro-batch of this rank."""
        self.tokens += int(n)

    def end_step(self) -> None:
        self._last_end = time.perf_counter()
        self.steps.append(self._last_end - self._t)

    def metrics(self) -> dict[str, float]:
        if not self.steps or self._first is None:
            return {}
        train_s = max(self._last_end - self._first, 1e-9)
        return {
            "time/step_s": statistics.median(self.steps),
            "time/train_s": train_s,
            "time/tokens_per_s": self.tokens * self.world / train_s,
            "time/worker_hours": worker_hours(self.world, self.gpus, train_s),
        }


def worker_hours(workers: int, gpus_per_worker: float, train_s: float) -> float:
    """``workers x max(1, gpus_per_worker) x train_s / 3600``: device-hours a run held (a CPU worker, or a
    fraction of a GPU, counts as one)."""
    return workers * max(1.0, float(gpus_per_worker)) * train_s / 3600.0


# ---- the step-cost estimate -------------------------------------------------------------------------
def expected_depth(layers: int, active: int) -> float:
    """Layers backward passes through when ``active`` of ``layers`` are drawn uniformly: from the top down
    to the lowest drawn one, whose expected index is ``(layers - active) / (active + 1)``."""
    active = max(1, min(layers, active))
    return layers - (layers - active) / (active + 1)


def step_macs(t: MemoryTerms) -> float:
    """Multiply-accumulates per sequence token of one training step under ``t`` (module docstring)."""
    s, seq = t.shape, t.cfg.data.max_length
    L = s.layers
    # per token: the linears, and causal attention's scores and weighted sum over seq / 2 keys on average
    layer = t.linear_params_per_layer + seq * s.heads * s.head_dim
    head = s.vocab * s.hidden
    forward = L * layer + t.token_share * head  # the head runs on the tokens whose loss is taken
    depth = expected_depth(L, t.active_layers) if t.active_layers < L else L
    backward_input = depth * layer + head
    backward_weight = (min(L, t.active_layers) * t.linear_params_per_layer + head) if t.base_trains else 0.0
    recompute = t.recompute_share * L * layer
    return forward + t.token_share * (backward_input + backward_weight + recompute)


def relative_step_cost(cfg: RunConfig, shape: ModelShape | None = None) -> float | None:
    """Estimated step time of ``cfg``'s method stack over its trainer (and quantizer) alone; None when
    the model's shape cannot be read."""
    from tokentune.estimate import memory_terms
    from tokentune.methods import REGISTRY
    from tokentune.shape import model_shape

    shape = shape or model_shape(cfg.model.name_or_path)
    if shape is None:
        return None
    base = cfg.copy()
    base.methods = [m for m in cfg.methods if REGISTRY[m].kind in ("trainer", "quantizer")]
    return step_macs(memory_terms(cfg, shape)) / step_macs(memory_terms(base, shape))
