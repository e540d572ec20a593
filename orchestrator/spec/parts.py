"""The parts of a sweep spec and how each is read from YAML. Pure: never imports ray.

- ``SpecError``: every user-facing spec error, naming the offending key (``search.lora.rank``);
- ``SearchDim``: one searched config key and its verb (``{grid: [4, 8]}``, ``{loguniform: [1e-4, 1e-2]}``);
- the settings sections ``objective``, ``tune`` (with ``tune.scheduler``), ``after_trial``, ``tracking``;
- a trial's run config from a config dict: ``compute.max_memory_gb`` is a spec-only key (trials
  estimated above it are refused) that ``RunConfig`` does not know, so it is read here and stripped.

``orchestrator.spec.sweep`` assembles these into a ``SweepSpec``; ``orchestrator.spec.validate`` checks them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

import yaml

from tokentune.config import ConfigError, RunConfig
from tokentune.errors import is_int, is_number

VERBS = ("grid", "choice", "uniform", "quniform", "loguniform", "randint", "fixed")


class SpecError(ConfigError):
    """A user-facing sweep spec error; ``key`` is the offending key (e.g. ``search.lora.rank``)."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")


# ---- a searched key ------------------------------------------------------------------------------
@dataclass
class SearchDim:
    """One searched config key: ``verb`` and its arguments.

    grid/choice: ``values`` (a list); uniform/loguniform: ``low``, ``high``; quniform: ``low``,
    ``high``, ``q``; randint: ``low``, ``high`` (both included); fixed: ``values == [value]``.
    """

    key: str
    verb: str
    values: list[Any] = field(default_factory=list)
    low: float | None = None
    high: float | None = None
    q: float | None = None

    @property
    def is_range(self) -> bool:
        return self.verb in ("uniform", "quniform", "loguniform", "randint")

    def candidates(self) -> list[Any]:
        """The values validation builds: every grid/choice/fixed value, the bounds of a range."""
        if self.verb == "quniform":
            return [
                self.coerce(round(self.low / self.q) * self.q),
                self.coerce(round(self.high / self.q) * self.q),
            ]
        if self.is_range:
            return [self.coerce(self.low), self.coerce(self.high)]
        return list(self.values)

    def coerce(self, value: Any) -> Any:
        """Tune's sampled value -> the config value (ints stay ints; encoded lists decoded)."""
        if self.verb == "randint" or (self.verb == "quniform" and _all_int(self.low, self.high, self.q)):
            return int(round(value))
        if self.verb in ("grid", "choice") and isinstance(value, str) and self.has_encoded_values:
            return self.labels().get(value, value)
        return value

    def sample(self, rng: random.Random) -> Any:
        if self.verb in ("grid", "choice", "fixed"):
            return copy.deepcopy(rng.choice(self.values))
        if self.verb == "uniform":
            return rng.uniform(self.low, self.high)
        if self.verb == "loguniform":
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        if self.verb == "quniform":
            return self.coerce(round(rng.uniform(self.low, self.high) / self.q) * self.q)
        return rng.randint(int(self.low), int(self.high))  # randint: both ends included

    @property
    def has_encoded_values(self) -> bool:
        """True when some value is a list/dict (search algorithms like Optuna need string labels)."""
        return any(isinstance(v, (list, dict)) for v in self.values)

    def labels(self) -> dict[str, Any]:
        """A readable string label per value (``[lora, tokentune]``) -> the value."""
        return {value_label(v): v for v in self.values}

    def to_yaml(self) -> dict[str, Any]:
        if self.verb in ("grid", "choice"):
            return {self.verb: list(self.values)}
        if self.verb == "fixed":
            return {"fixed": self.values[0]}
        args = [self.low, self.high] + ([self.q] if self.verb == "quniform" else [])
        return {self.verb: args}

    def describe(self) -> str:
        return json.dumps(self.to_yaml(), default=str)


def parse_dim(key: str, value: Any) -> SearchDim:
    """``search.<key>``'s YAML value -> a ``SearchDim`` (a plain value means ``{fixed: value}``)."""
    where = f"search.{key}"
    accepted = f"one of {{{', '.join(VERBS)}}} or a plain value, e.g. {{choice: [4, 8]}}"
    if isinstance(value, list):
        raise SpecError(
            where,
            f"a plain list {value!r} is ambiguous: write {{grid: [...]}}, {{choice: [...]}} or {{fixed: [...]}}",
        )
    if not isinstance(value, dict):
        return SearchDim(key, "fixed", [value])
    if len(value) != 1:
        raise SpecError(where, f"{value!r} is invalid: expected exactly one verb, {accepted}")
    verb, args = next(iter(value.items()))
    if verb not in VERBS:
        raise SpecError(where, f"unknown verb {verb!r}; accepted verbs: {', '.join(VERBS)}")
    if verb == "fixed":
        return SearchDim(key, "fixed", [args])
    if verb in ("grid", "choice"):
        if not isinstance(args, list) or not args:
            raise SpecError(where, f"{verb}: {args!r} is invalid: expected a non-empty list of values")
        return SearchDim(key, verb, list(args))
    nargs = 3 if verb == "quniform" else 2
    form = "[low, high, q]" if verb == "quniform" else "[low, high]"
    if not (isinstance(args, list) and len(args) == nargs and all(is_number(a) for a in args)):
        raise SpecError(where, f"{verb}: {args!r} is invalid: expected {form} (numbers)")
    low, high = float(args[0]), float(args[1])
    if verb == "randint":
        if not _all_int(*args):
            raise SpecError(
                where, f"randint: {args!r} is invalid: expected two integers [low, high] (both included)"
            )
        if low > high:
            raise SpecError(where, f"randint: low {args[0]} > high {args[1]}: expected low <= high")
        return SearchDim(key, verb, low=int(args[0]), high=int(args[1]))
    if not low < high:
        raise SpecError(where, f"{verb}: low {args[0]} >= high {args[1]}: expected low < high")
    if verb == "loguniform" and low <= 0:
        raise SpecError(where, f"loguniform: low {args[0]} <= 0: expected 0 < low < high")
    q = None
    if verb == "quniform":
        q = args[2]
        if not q > 0:
            raise SpecError(where, f"quniform: q={q} is invalid: expected a step > 0")
        if _all_int(*args):
            return SearchDim(key, verb, low=int(args[0]), high=int(args[1]), q=int(q))
        q = float(q)
    return SearchDim(key, verb, low=low, high=high, q=q)


# ---- the settings sections ------------------------------------------------------------------------
@dataclass
class Objective:
    """The metric Tune optimises (``objective``)."""

    metric: str = "eval/score"
    mode: str = "max"
    memory_budget_gb: float | None = None  # the summary also names the best trial measured within it


@dataclass
class SchedulerSpec:
    """``tune.scheduler``: FIFO, or ASHA stopping trials early on a training metric."""

    type: str = "fifo"
    grace_period: int = 1
    reduction_factor: float = 2
    metric: str = "val_loss"
    mode: str = "min"
    time_attr: str = "training_iteration"
    max_t: int | None = None  # None: computed from the largest train.max_steps


@dataclass
class TuneSettings:
    """``tune``: the search algorithm, how many trials, how many at once."""

    algorithm: str = "grid"
    num_samples: int = 1
    max_concurrent: int | str = "auto"
    time_limit_s: float | None = None
    seed: int = 0
    max_failures: int = 0  # Tune retries of an errored trial (its Train run resumes by name)
    startup_trials: int | None = None  # optuna: random trials before TPE (None: about a third)
    driver_cpus: float = 0.0  # CPUs the trial driver reserves (the Train workers reserve their own)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)


@dataclass
class AfterTrial:
    """``after_trial``: merge and evaluate each trial's adapter, in a Ray task of its own."""

    merge: bool = True
    evaluate: bool = True
    keep_merged: str = "best"  # best | all | none: merged checkpoints kept after the sweep
    cpus: float = 1
    gpus: float = 0
    # merge + evaluate a trial while the next one trains (orchestrator.run.slots): auto = when trials train
    # on GPUs (on CPUs the merge and eval would take the cores training needs); false: a trial holds its
    # place in tune.max_concurrent until it is scored
    overlap: bool | str = "auto"
    # seconds for merge + eval of one trial (None: no limit); then the task is cancelled, the trial fails
    timeout_s: float | None = 1800


@dataclass
class Tracking:
    """``tracking``: the MLflow tracking URI and experiment."""

    uri: str | None = None  # None: sqlite:///<sweep dir>/mlflow.db
    experiment: str | None = None  # None: the sweep name


def parse_section(name: str, value: Any, cls: type) -> Any:
    """A settings section's mapping -> ``cls`` (None: the defaults); unknown keys name ``name.key``."""
    if value is None:
        return cls()
    if not isinstance(value, dict):
        raise SpecError(name, f"expected a mapping, got {value!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    for k in value:
        if k not in names:
            raise SpecError(f"{name}.{k}", f"unknown key; accepted keys in {name}: {', '.join(names)}")
    return cls(**value)


def parse_scheduler(value: Any) -> SchedulerSpec:
    """``tune.scheduler``: a mapping, or just the type (``asha``)."""
    if isinstance(value, str):
        value = {"type": value}
    return parse_section("tune.scheduler", value, SchedulerSpec)


# ---- a trial's run config ----------------------------------------------------------------------------
def build_run_config(d: dict[str, Any]) -> RunConfig:
    """``RunConfig.from_dict`` of a config dict without the spec-only ``compute.max_memory_gb``."""
    compute = d.get("compute")
    if isinstance(compute, dict) and "max_memory_gb" in compute:
        d = {**d, "compute": {k: v for k, v in compute.items() if k != "max_memory_gb"}}
    return RunConfig.from_dict(d)


def max_memory_gb(d: dict[str, Any]) -> float | None:
    """``compute.max_memory_gb`` of a config dict: trials estimated above it are refused."""
    value = (d.get("compute") or {}).get("max_memory_gb")
    if value is not None and not (is_number(value) and value > 0):
        raise SpecError(
            "base.compute.max_memory_gb", f"{value!r} is invalid: expected null or a number of GB > 0"
        )
    return value


# ---- small helpers -------------------------------------------------------------------------------------
def value_label(v: Any) -> str:
    """A compact, readable label: ``[lora, tokentune]``, ``0.0003``, ``8``."""
    if isinstance(v, (list, dict)):
        return yaml.safe_dump(v, default_flow_style=True, width=10_000).strip()
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def lookup_dotted(d: dict[str, Any], key: str) -> tuple[bool, Any]:
    """A dotted key in a flat (``{"a.b": 1}``) or nested (``{"a": {"b": 1}}``) mapping."""
    if key in d:
        return True, d[key]
    cur: Any = d
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return False, None
        cur = cur[part]
    return True, cur


def _all_int(*vals: Any) -> bool:
    return all(is_int(v) for v in vals)
