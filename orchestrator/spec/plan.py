"""The dry run of a sweep: each planned trial's values, config, resources and memory estimate, as text.

    trials = dry_run_trials(spec)            # list[PlannedTrial]  (spec.dry_run_trials() is the same)
    print(format_plan(spec, trials))         # spec.plan_text()

Pure: never imports ray. The memory estimate is ``tokentune.estimate`` (composed from the methods' own
terms; a model's shape from its config.json, or ``tokentune.shape.KNOWN_SHAPES`` offline); a trial
estimated above ``tune.max_memory_gb`` is listed ``skipped: estimate X GB > budget Y GB``, as the trial itself
is skipped, never launched (``skip_reason``; the dry run counts them). The
settings lines are the sections' own ``describe()`` keys with the spec's values. The text ends with the
input checks' notes (what could not be checked here) and passes through ``tokentune.redact``: the console
never shows a token or a password.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.spec.parts import value_label
from orchestrator.spec.sections import section_docs
from tokentune.config import RunConfig
from tokentune.estimate import MemoryEstimate, estimate_memory
from tokentune.redact import redact_text
from tokentune.reference import format_value

if TYPE_CHECKING:
    from orchestrator.spec.sweep import SweepSpec

PLAN_ROWS = 50  # trials the plan text shows; the rest are counted
DRY_RUN_TRIALS = 1000  # trials a dry run builds (run_sweep(dry_run=True).trials); the rest are counted
PLAN_WIDTH = 110  # a settings line wraps here
UNKNOWN_MEMORY = "memory: unknown (model shape not available offline)"


@dataclass
class PlannedTrial:
    """One trial of the dry run: its searched values, full config, resources and memory estimate."""

    index: int
    searched: dict[str, Any]
    config: RunConfig
    resources: dict[str, Any]
    memory: MemoryEstimate | None
    over_limit: bool = False


def dry_run_trials(spec: SweepSpec, n: int | None = None) -> list[PlannedTrial]:
    """The first ``n`` (default: all) planned trials with resources and memory estimates."""
    planned = []
    limit = spec.tune.max_memory_gb
    for i, searched in enumerate(spec.searched_values(n)):
        cfg = spec.planned_config(searched)  # built once per spec: the tuner reads the same
        mem = estimate_memory(cfg)
        over = over_memory_limit(mem, limit)
        planned.append(PlannedTrial(i, searched, cfg, trial_resources(cfg, spec.tune.driver_cpus), mem, over))
    return planned


def over_memory_limit(estimate: MemoryEstimate | None, limit_gb: float | None) -> bool:
    """The rule the dry run marks skipped and a trial is skipped by, never launched (``tune.max_memory_gb``):
    what must fit on the device (``MemoryEstimate.fit_gb``) over the limit."""
    return bool(limit_gb and estimate is not None and estimate.fit_gb > limit_gb)


def skip_reason(estimate: MemoryEstimate, limit_gb: float) -> str:
    """``skipped: estimate 0.0612 GB > budget 0.05 GB (tune.max_memory_gb)``: the dry run's, the results'
    and the trial's words for a trial over the budget."""
    return f"skipped: estimate {estimate.fit_gb:.3g} GB > budget {limit_gb:g} GB (tune.max_memory_gb)"


def trial_resources(cfg: RunConfig, driver_cpus: float = 0.0) -> dict[str, Any]:
    """What one trial reserves: Train workers (CPUs/GPUs each), the ZeRO stage, the driver's CPUs.

    ``gpus`` is ``auto`` while ``compute.use_gpu`` is: it is decided when the cluster is known.
    """
    c = cfg.compute
    gpus: float | str = "auto" if c.use_gpu == "auto" else (c.workers * c.gpus_per_worker if c.use_gpu else 0)
    return {
        "workers": c.workers,
        "cpus": c.workers * c.cpus_per_worker,
        "gpus": gpus,
        "zero_stage": c.zero_stage,
        "driver_cpus": driver_cpus,
    }


def format_plan(spec: SweepSpec, trials: list[PlannedTrial]) -> str:
    """The sweep's settings, then one row per planned trial (searched values, resources, memory), then
    the input checks' notes; redacted."""
    t = spec.tune
    lines = [
        f"sweep {spec.name!r}" + (f" ({spec.source})" if spec.source else ""),
        f"  trials: {spec.num_trials()} ({'grid x ' if spec.grid_dims() else ''}num_samples {t.num_samples})",
        *settings_lines(spec),
        f"  storage: {spec.storage}/{spec.name}",
        "  search:",
    ]
    lines += [f"    {k}: {d.describe()}" for k, d in spec.search.items()] or [
        "    (nothing: one configuration)"
    ]
    if t.algorithm == "optuna" or any(d.verb not in ("grid", "fixed") for d in spec.search.values()):
        lines.append("  (searched values below are illustrative draws with the seed; Tune draws its own)")
    lines += ["", *_trial_table(spec, trials)]
    total = spec.num_trials()
    if len(trials) < total:
        lines.append(f"  ... {total - len(trials):,} more ({total:,} trials in all)")
    if t.max_memory_gb:
        skipped = sum(p.over_limit for p in trials)
        lines.append(
            f"  skipped before launch: {skipped} of the {len(trials)} planned trial(s) shown (estimate > "
            f"budget tune.max_memory_gb={t.max_memory_gb:g} GB)"
        )
    if trials:
        cfg = trials[0].config
        tr = cfg.train
        lines.append("")
        lines.append(
            f"  base: model {cfg.model.name_or_path or '(shipped tiny Llama)'}, data {cfg.data.train or '(shipped)'} ({cfg.data.format}), "
            f"{steps_text(cfg)}, batch {tr.batch_size}x{tr.grad_accum}, max_length {cfg.data.max_length}, "
            f"eval tasks {cfg.eval.tasks or '(shipped)'} limit {cfg.eval.limit}"
        )
    unknown = sorted({str(p.config.model.name_or_path) for p in trials if p.memory is None})
    if unknown:
        lines.append(f"  {UNKNOWN_MEMORY}: {', '.join(unknown)}")
    lines += [f"  note: {note}" for note in spec.notes]
    return redact_text("\n".join(lines))


def settings_lines(spec: SweepSpec) -> list[str]:
    """``  tune: algorithm=grid num_samples=1 ...``: each section's documented keys (``describe()``) with the
    spec's values, wrapped at ``PLAN_WIDTH``."""
    out = []
    for name, section in spec.settings().items():
        if name == "objective" and spec.multi_objective:  # a list: each metric and mode, the first is "best"
            out.append("  objective: [" + ", ".join(f"{m} {d}" for m, d in spec.goals) + "] (Pareto front)")
            continue
        pairs = [
            f"{doc.key[len(name) + 1 :]}={format_value(getattr(section, doc.key[len(name) + 1 :]))}"
            for doc in section_docs(name)
        ]
        head = f"  {name}: "
        indent = " " * len(head)
        out += textwrap.wrap(
            " ".join(pairs), PLAN_WIDTH, initial_indent=head, subsequent_indent=indent, break_on_hyphens=False
        )
    return out


def steps_text(cfg: RunConfig) -> str:
    """``max_steps N``, or ``epochs E = N steps (R rows)`` (``train.epochs`` resolved from the data)."""
    tr = cfg.train
    if tr.epochs is None:
        return f"max_steps {tr.max_steps}"
    from tokentune.errors import ConfigError
    from tokentune.preview import training_rows

    try:
        rows = training_rows(cfg)
    except (ConfigError, OSError) as e:
        return f"epochs {tr.epochs:g} (steps resolved at trial start: {str(e)[:80]})"
    return f"epochs {tr.epochs:g} = max_steps {tr.total_steps(rows, cfg.compute.workers)} ({rows} rows)"


def _trial_table(spec: SweepSpec, trials: list[PlannedTrial]) -> list[str]:
    """The header and one left-aligned row per trial."""
    keys = [k for k, d in spec.search.items() if d.verb != "fixed"]
    header = ["#", *keys, "workers", "cpus", "gpus", "zero", "memory/worker (est.)"]
    rows = []
    for p in trials:
        r = p.resources
        mem = p.memory.short() if p.memory else "unknown"
        if p.over_limit and p.memory is not None:
            mem += "  " + skip_reason(p.memory, spec.tune.max_memory_gb or 0.0)
        rows.append(
            [
                str(p.index),
                *[value_label(p.searched[k]) for k in keys],
                str(r["workers"]),
                f"{r['cpus']:g}",
                str(r["gpus"]),
                str(r["zero_stage"]),
                mem,
            ]
        )
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in [header, *rows]]
