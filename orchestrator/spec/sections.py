"""The settings sections of a sweep spec: ``objective``, ``tune`` (with ``tune.scheduler``), ``after_trial``
and ``tracking``. Pure: never imports ray.

Each is a frozen ``setting(default, help)`` dataclass, as the run config's sections are: its values are
checked in ``__post_init__`` (a ``SpecError`` naming ``section.key``, the value and what is accepted), it is
built from YAML by ``parse_section`` (an unknown key is named with the accepted ones), and ``describe()``
documents it: ``tokentune sweep --help-spec``, the dry run's settings lines and the README's tables all
come from ``SECTIONS``. Checks that need two sections (an ``eval/*`` objective needs an evaluation after
each trial, Optuna takes no grid verbs) are in ``orchestrator.spec.validate``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from orchestrator.spec.parts import SpecError, lookup_dotted
from tokentune.errors import is_int, is_number
from tokentune.settings import SettingDoc, UnknownKeyError, build_section, describe, setting
from tokentune.timing import TIME_METRICS

ALGORITHMS = ("grid", "random", "optuna")
SCHEDULERS = ("fifo", "asha")
TIME_ATTRS = ("training_iteration", "step")
KEEP_MERGED = ("best", "all", "none")
#: ``tune.driver_memory_gb``'s default: what one trial driver and its Ray Train controller hold. Measured
#: with bench/sweep_scale.py (peak RSS, sampled every second, CPU trials of the tiny default): a trial
#: driver process ~560 MB (Ray, Tune, Train, MLflow, torch imported; flat over the trials it serves), its
#: Train controller ~470 MB; the controller reserves nothing itself and Ray starts it on the driver's node
DRIVER_MEMORY_GB = 1.0
#: what happens after a trial trains (``after_trial.action``)
ACTIONS = ("none", "merge", "merge+eval")
#: Metrics every trial reports (besides ``eval/<task>/<metric>`` and ``eval/score`` after evaluation).
TRIAL_METRICS = ("val_loss", "loss", "tokens_per_s", "wall_s", "trial_wall_s", *TIME_METRICS)
#: Measured memory a trial reports while training (``tokentune.memory``), per worker, in GB.
MEMORY_METRICS = (
    "memory/train_gb",
    "memory/weights_gb",
    "memory/grads_gb",
    "memory/optimizer_gb",
    "memory/activations_gb",
    "memory/cuda_peak_gb",
    "memory/process_rss_gb",
    "memory/host_gb",
)


def check(ok: bool, key: str, value: Any, accepted: str) -> None:
    """Raise ``SpecError(key, "<value> is invalid: expected <accepted>")`` unless ``ok``."""
    if not ok:
        raise SpecError(key, f"{value!r} is invalid: expected {accepted}")


def _int_at_least(v: Any, n: int) -> bool:
    return is_int(v) and v >= n


def _number_at_least(v: Any, x: float) -> bool:
    return is_number(v) and v >= x


def _positive_or_null(v: Any) -> bool:
    return v is None or (is_number(v) and v > 0)


def _text_or_null(v: Any) -> bool:
    return v is None or (isinstance(v, str) and bool(v))


def is_memory_metric(v: Any) -> bool:
    return v in MEMORY_METRICS


def is_time_metric(v: Any) -> bool:
    """A measured ``time/<name>`` key (``time/worker_hours``, ``time/step_s``, ...)."""
    return isinstance(v, str) and v.startswith("time/") and len(v) > 5


def is_objective_metric(v: Any) -> bool:
    """What ``objective.metric`` accepts: a trial metric, ``memory/*``, ``time/*`` or ``eval/*``."""
    return (
        v in TRIAL_METRICS
        or is_memory_metric(v)
        or is_time_metric(v)
        or (isinstance(v, str) and v.startswith("eval/") and len(v) > 5)
    )


OBJECTIVE_METRICS = (
    f"one of {', '.join(TRIAL_METRICS)}, {', '.join(MEMORY_METRICS)}, a measured time/<name> "
    "(time/worker_hours, ...), eval/score or eval/<task>/<metric>"
)


# ---- the sections -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Objective:
    """``objective``: the metric Tune optimises (or, as a list of ``{metric, mode}``, its objectives)."""

    SECTION: ClassVar[str] = "objective"

    metric: str = setting(
        "eval/score",
        "what Tune optimises: eval/score (mean over the eval tasks), eval/<task>/<metric>, val_loss, loss, "
        "tokens_per_s, wall_s, trial_wall_s, a measured memory/* key (memory/train_gb, ...) or time/* key "
        "(time/worker_hours, ...); without an objective section: val_loss/min when after_trial.action is "
        "not merge+eval. A list of {metric, mode} searches their Pareto front (see the README)",
    )
    mode: str = setting("max", "max or min")
    memory_budget_gb: float | None = setting(
        None, "GB per worker: the summary also names the best trial measured within it; null = none"
    )

    def __post_init__(self) -> None:
        s = self.SECTION
        check(self.mode in ("min", "max"), f"{s}.mode", self.mode, "min or max")
        check(is_objective_metric(self.metric), f"{s}.metric", self.metric, OBJECTIVE_METRICS)
        budget = self.memory_budget_gb
        check(_positive_or_null(budget), f"{s}.memory_budget_gb", budget, "null or a number of GB > 0")


@dataclass(frozen=True)
class SchedulerSpec:
    """``tune.scheduler``: FIFO, or ASHA stopping trials early on a training metric."""

    SECTION: ClassVar[str] = "tune.scheduler"

    type: str = setting(
        "fifo",
        "fifo (every trial runs to its end) or asha (stops weak trials early); `tune.scheduler: asha` is short for {type: asha}",
    )
    grace_period: int = setting(1, "asha: time_attr units a trial runs before it can be stopped")
    reduction_factor: float = setting(
        2, "asha: about 1/reduction_factor of the trials go on at each rung (> 1)"
    )
    metric: str = setting(
        "val_loss",
        "asha: val_loss, loss or a measured memory/* key (reported while training; eval/* is too late)",
    )
    mode: str = setting("min", "asha: min or max")
    time_attr: str = setting("training_iteration", "asha: training_iteration (Tune reports) or step")
    max_t: int | None = setting(
        None, "asha: a trial's length in time_attr units; null = from the largest train.max_steps"
    )

    def __post_init__(self) -> None:
        s = self.SECTION
        check(self.type in SCHEDULERS, f"{s}.type", self.type, f"one of {', '.join(SCHEDULERS)}")
        check(self.mode in ("min", "max"), f"{s}.mode", self.mode, "min or max")
        check(
            self.time_attr in TIME_ATTRS, f"{s}.time_attr", self.time_attr, f"one of {', '.join(TIME_ATTRS)}"
        )
        check(_int_at_least(self.grace_period, 1), f"{s}.grace_period", self.grace_period, "an integer >= 1")
        rf = self.reduction_factor
        check(is_number(rf) and rf > 1, f"{s}.reduction_factor", rf, "a number > 1, e.g. 2")
        ok = self.max_t is None or _int_at_least(self.max_t, self.grace_period)
        check(ok, f"{s}.max_t", self.max_t, f"null or an integer >= grace_period ({self.grace_period})")
        check(
            self.type != "asha" or self.metric in ("val_loss", "loss") or is_memory_metric(self.metric),
            f"{s}.metric",
            self.metric,
            "val_loss, loss or a measured memory/* key (reported while training; eval/* only exists after "
            "a trial, too late to stop it early)",
        )


@dataclass(frozen=True)
class TuneSettings:
    """``tune``: the search algorithm, how many trials, how many at once, which are refused."""

    SECTION: ClassVar[str] = "tune"

    algorithm: str = setting("grid", "grid, random or optuna (seeded TPE; no grid verbs)")
    num_samples: int = setting(
        1, "grid and random: repeats of the grid product; optuna: the number of trials"
    )
    max_concurrent: int | str = setting(
        "auto",
        "trials at once: auto (from the cluster's CPUs/GPUs and each trial's workers) or an integer >= 1",
    )
    time_limit_s: float | None = setting(None, "seconds for the whole sweep, then Tune stops it; null = none")
    seed: int = setting(0, "seed of the search: random draws, TPE")
    max_failures: int = setting(0, "Tune retries of an errored trial (its Train run resumes by name)")
    startup_trials: int | None = setting(None, "optuna: random trials before TPE; null = about a third")
    driver_cpus: float = setting(
        0.0, "CPUs each trial's driver reserves (the Train workers reserve their own)"
    )
    driver_memory_gb: float = setting(
        DRIVER_MEMORY_GB,
        "GB each trial's driver reserves for itself and its Ray Train controller (pinned to its node); "
        "Ray spreads trial drivers across nodes by it. Default: their measured RSS (bench/sweep_scale.py)",
    )
    max_memory_gb: float | None = setting(
        None,
        "GB per worker, the sweep's memory budget: a trial whose memory estimate of what must fit "
        "(memory/estimate_fit_gb, sequences filling data.max_length) is above it is never launched: it is "
        "listed 'skipped: estimate X GB > budget Y GB' (dry run and results) and Optuna is told it is "
        "infeasible; null = no limit",
    )
    scheduler: SchedulerSpec = setting(help="FIFO or ASHA: the tune.scheduler section", factory=SchedulerSpec)

    def __post_init__(self) -> None:
        s = self.SECTION
        check(
            self.algorithm in ALGORITHMS, f"{s}.algorithm", self.algorithm, f"one of {', '.join(ALGORITHMS)}"
        )
        check(_int_at_least(self.num_samples, 1), f"{s}.num_samples", self.num_samples, "an integer >= 1")
        mc = self.max_concurrent
        check(
            mc == "auto" or _int_at_least(mc, 1),
            f"{s}.max_concurrent",
            mc,
            "'auto' (from the cluster) or an integer >= 1",
        )
        check(
            _positive_or_null(self.time_limit_s),
            f"{s}.time_limit_s",
            self.time_limit_s,
            "null or seconds > 0",
        )
        check(is_int(self.seed), f"{s}.seed", self.seed, "an integer")
        check(_int_at_least(self.max_failures, 0), f"{s}.max_failures", self.max_failures, "an integer >= 0")
        st = self.startup_trials
        check(st is None or _int_at_least(st, 1), f"{s}.startup_trials", st, "null or an integer >= 1")
        check(_number_at_least(self.driver_cpus, 0), f"{s}.driver_cpus", self.driver_cpus, "a number >= 0")
        gb = self.driver_memory_gb
        check(_positive_or_null(gb) and gb is not None, f"{s}.driver_memory_gb", gb, "a number of GB > 0")
        check(
            _positive_or_null(self.max_memory_gb),
            f"{s}.max_memory_gb",
            self.max_memory_gb,
            "null or a number of GB > 0",
        )
        if not isinstance(self.scheduler, SchedulerSpec):  # a mapping or just the type (``asha``)
            object.__setattr__(self, "scheduler", parse_scheduler(self.scheduler))


@dataclass(frozen=True)
class AfterTrial:
    """``after_trial``: what happens to each trained trial, in a Ray task (or warm worker) of its own."""

    SECTION: ClassVar[str] = "after_trial"

    action: str = setting(
        "merge+eval",
        "merge+eval (merge the adapter into the base, then lm-eval it), merge (merge only) or none",
    )
    keep_merged: str = setting(
        "best",
        "merged checkpoints kept: best (during the sweep, one is deleted once it is evaluated and beaten "
        "by another evaluated trial), all or none (deleted when the sweep ends)",
    )
    cpus: float = setting(1, "CPUs reserved per merge + eval (0: none)")
    gpus: float | str = setting(
        "auto",
        "GPUs per merge + eval: auto (1 when trials train on GPUs, else 0), or a number (a fraction "
        "shares one; 0: on CPU)",
    )
    overlap: bool | str = setting(
        "auto",
        "the next trial trains while one merges and evaluates: auto (when trials train on GPUs), true, or "
        "false (a trial holds its place in tune.max_concurrent until it is scored)",
    )
    timeout_s: float | None = setting(
        1800,
        "seconds for merge + eval of one trial, then it is cancelled and that trial fails; null = no limit",
    )
    workers: int | None = setting(
        None,
        "warm merge + eval workers (on CPU, storage a folder); null: the trials in flight, at most the "
        "calls of after_trial.cpus the cluster holds at once. Time queued for one is not timed",
    )

    def __post_init__(self) -> None:
        s = self.SECTION
        check(self.action in ACTIONS, f"{s}.action", self.action, f"one of {' | '.join(ACTIONS)}")
        check(
            self.keep_merged in KEEP_MERGED,
            f"{s}.keep_merged",
            self.keep_merged,
            f"one of {', '.join(KEEP_MERGED)}",
        )
        check(_number_at_least(self.cpus, 0), f"{s}.cpus", self.cpus, "a number >= 0")
        check(
            self.gpus == "auto" or _number_at_least(self.gpus, 0),
            f"{s}.gpus",
            self.gpus,
            "auto or a number >= 0",
        )
        check(self.overlap in ("auto", True, False), f"{s}.overlap", self.overlap, "auto, true or false")
        check(
            _positive_or_null(self.timeout_s),
            f"{s}.timeout_s",
            self.timeout_s,
            "null (no limit) or seconds > 0",
        )
        check(
            self.workers is None or (_number_at_least(self.workers, 1) and self.workers == int(self.workers)),
            f"{s}.workers",
            self.workers,
            "null (sized to the cluster) or a whole number >= 1",
        )

    def gpus_for(self, trials_use_gpus: bool) -> float:
        """GPUs for one merge + eval: ``auto`` is 1 when the sweep's trials train on GPUs (a 7B model
        evaluated on CPU would exceed ``timeout_s``), else 0; a number as given."""
        if self.gpus == "auto":
            return 1.0 if trials_use_gpus else 0.0
        return float(self.gpus)

    @property
    def merges(self) -> bool:
        """A trial's adapter is merged into the base (``merge`` or ``merge+eval``)."""
        return self.action != "none"

    @property
    def evaluates(self) -> bool:
        """The merged model is evaluated with lm-eval (``merge+eval``)."""
        return self.action == "merge+eval"


@dataclass(frozen=True)
class Tracking:
    """``tracking``: the MLflow tracking URI and experiment."""

    SECTION: ClassVar[str] = "tracking"

    uri: str | None = setting(
        None,
        "MLflow tracking URI (no credentials in it); null = MLFLOW_TRACKING_URI, else sqlite:///<sweep dir>/mlflow.db",
    )
    experiment: str | None = setting(None, "MLflow experiment; null = the sweep name")

    def __post_init__(self) -> None:
        check(_text_or_null(self.uri), "tracking.uri", self.uri, "null or a URI")
        check(_text_or_null(self.experiment), "tracking.experiment", self.experiment, "null or a name")


#: every settings section of a spec, by its YAML key (``tune.scheduler`` inside ``tune``)
SECTIONS: dict[str, type] = {
    "objective": Objective,
    "tune": TuneSettings,
    "tune.scheduler": SchedulerSpec,
    "after_trial": AfterTrial,
    "tracking": Tracking,
}
#: keys that moved: (old key, new key, what to write instead); the old one is a SpecError naming the new one
ACTION_HINT = "write after_trial.action: merge+eval (merge, then evaluate), merge (merge only) or none"
MOVED_KEYS = (
    ("after_trial.merge", "after_trial.action", ACTION_HINT),
    ("after_trial.evaluate", "after_trial.action", ACTION_HINT),
    (
        "base.compute.max_memory_gb",
        "tune.max_memory_gb",
        "it is a sweep setting, not a run setting: write tune: {max_memory_gb: <GB per worker>}",
    ),
)


def section_docs(name: str) -> list[SettingDoc]:
    """The documented settings of a spec section (a nested section is documented as its own)."""
    if name not in SECTIONS:
        raise KeyError(f"no spec section {name!r}; sections: {', '.join(SECTIONS)}")
    return [d for d in describe(SECTIONS[name], name) if not dataclasses.is_dataclass(d.default)]


def parse_section(name: str, value: Any, cls: type) -> Any:
    """A section's mapping (None: the defaults) -> ``cls``, checked; unknown keys name ``name.key``."""
    if value is not None and not isinstance(value, (dict, cls)):
        raise SpecError(name, f"expected a mapping, got {value!r}")
    try:
        return build_section(name, cls, value)
    except UnknownKeyError as e:
        raise SpecError(e.key, f"unknown key; accepted keys in {name}: {', '.join(e.accepted)}") from None


def parse_scheduler(value: Any) -> SchedulerSpec:
    """``tune.scheduler``: a mapping, or just the type (``asha``)."""
    if isinstance(value, str):
        value = {"type": value}
    return parse_section("tune.scheduler", value, SchedulerSpec)


def refuse_moved_keys(raw: dict[str, Any]) -> None:
    """A key that moved (``MOVED_KEYS``), set or searched, is a ``SpecError`` naming its new key."""
    search = raw.get("search") if isinstance(raw.get("search"), dict) else {}
    for old, new, hint in MOVED_KEYS:
        found, value = lookup_dotted(raw, old)
        if (found and value is not None) or old.removeprefix("base.") in search:
            raise SpecError(new, f"{old} is no longer accepted; {hint}")
