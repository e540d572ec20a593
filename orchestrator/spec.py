"""Sweep specs: a YAML file (or dict) -> a validated ``SweepSpec``. Pure: never imports ray.

    spec = load_spec("search_spaces/quickstart.yaml", ["tune.num_samples=2", "train.lr=3e-4"])
    print(spec.plan_text())                       # the dry run: trials, resources, memory estimates
    cfg = spec.trial_config({"lora.rank": 8})     # one trial's full RunConfig

A spec has these top-level keys (see ``TOP_KEYS``); ``base`` is a run config (``tokentune.config``)
and ``search`` maps dotted config keys to one verb each::

    include: [_base.yaml]            # paths relative to this file; deep-merged, this file wins
    name: quickstart
    base: {model: ..., data: ..., methods: [lora], lora: {rank: 8}, train: {...}, eval: {...}}
    search:
      tokentune.ratio: {grid: [0.3, 1.0]}
      train.lr: {loguniform: [1.0e-4, 3.0e-3]}
      methods: {grid: [[lora], [lora, tokentune]]}
    objective: {metric: eval/score, mode: max}
    tune: {algorithm: grid, num_samples: 1, max_concurrent: auto, scheduler: {type: fifo}}
    after_trial: {merge: true, evaluate: true, keep_merged: best, cpus: 1, gpus: 0}
    tracking: {uri: null, experiment: null}
    storage: sweeps

Validation happens here, before any cluster resource is used: every grid combination and the
boundary values of every range and choice are built into a ``RunConfig``; IST/RST budgets are
checked against the model's layer count. Every error is a ``SpecError`` naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tokentune.config import (
    ComputeConfig,
    ConfigError,
    RunConfig,
    load_yaml,
    parse_override,
    set_dotted,
)

log = logging.getLogger(__name__)

TOP_KEYS = tuple("include name description base search objective tune after_trial tracking storage".split())
VERBS = ("grid", "choice", "uniform", "quniform", "loguniform", "randint", "fixed")
ALGORITHMS = ("grid", "random", "optuna")
SCHEDULERS = ("fifo", "asha")
TIME_ATTRS = ("training_iteration", "step")
KEEP_MERGED = ("best", "all", "none")
#: Metrics every trial reports (besides ``eval/<task>/<metric>`` and ``eval/score`` after evaluation).
TRIAL_METRICS = (
    "val_loss",
    "loss",
    "tokens_per_s",
    "peak_memory_bytes",
    "peak_memory_gb",
    "wall_s",
    "trial_wall_s",
)
MAX_VALIDATED_COMBINATIONS = 4096
DEFAULT_STORAGE = "sweeps"


class SpecError(ConfigError):
    """A user-facing sweep spec error; ``key`` is the offending key (e.g. ``search.lora.rank``)."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")


# ---- the spec's parts ----------------------------------------------------------------------------
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


@dataclass
class Objective:
    metric: str = "eval/score"
    mode: str = "max"


@dataclass
class SchedulerSpec:
    type: str = "fifo"
    grace_period: int = 1
    reduction_factor: float = 2
    metric: str = "val_loss"
    mode: str = "min"
    time_attr: str = "training_iteration"
    max_t: int | None = None  # None: computed from the largest train.max_steps


@dataclass
class TuneSettings:
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
    merge: bool = True
    evaluate: bool = True
    keep_merged: str = "best"  # best | all | none: merged checkpoints kept after the sweep
    cpus: float = 1
    gpus: float = 0


@dataclass
class Tracking:
    uri: str | None = None  # None: sqlite:///<sweep dir>/mlflow.db
    experiment: str | None = None  # None: the sweep name


@dataclass
class PlannedTrial:
    """One trial of the dry run: its sampled values, full config, resources and memory estimate."""

    index: int
    params: dict[str, Any]
    config: RunConfig
    resources: dict[str, Any]
    memory: MemoryEstimate | None
    over_limit: bool = False


@dataclass
class SweepSpec:
    name: str
    base: dict[str, Any]
    search: dict[str, SearchDim] = field(default_factory=dict)
    objective: Objective = field(default_factory=Objective)
    tune: TuneSettings = field(default_factory=TuneSettings)
    after_trial: AfterTrial = field(default_factory=AfterTrial)
    tracking: Tracking = field(default_factory=Tracking)
    storage: str = DEFAULT_STORAGE
    description: str = ""
    source: str | None = None  # the YAML file it came from

    # ---- trials ----------------------------------------------------------------------------------
    def trial_config(self, tune_config: dict[str, Any] | None = None) -> RunConfig:
        """The trial's full config: ``base`` plus the sampled values of ``tune_config``.

        ``tune_config`` may be flat (``{"lora.rank": 8}``) or nested (``{"lora": {"rank": 8}}``).
        """
        d = copy.deepcopy(self.base)
        for key, dim in self.search.items():
            found, value = lookup_dotted(tune_config or {}, key)
            if not found and dim.verb != "fixed":
                raise SpecError(f"search.{key}", f"the trial config has no value for it: {tune_config!r}")
            set_dotted(d, key, dim.coerce(value) if found else copy.deepcopy(dim.values[0]))
        return build_run_config(d)

    def grid_dims(self) -> list[SearchDim]:
        return [d for d in self.search.values() if d.verb == "grid"]

    def expand_grid(self) -> list[dict[str, Any]]:
        """Every combination of the ``grid`` values (``[{}]`` when nothing is a grid)."""
        dims = self.grid_dims()
        return [
            dict(zip([d.key for d in dims], combo)) for combo in itertools.product(*[d.values for d in dims])
        ]

    def num_trials(self) -> int:
        if self.tune.algorithm == "optuna":
            return self.tune.num_samples
        return len(self.expand_grid()) * self.tune.num_samples

    def sampled_params(self) -> list[dict[str, Any]]:
        """The trials' searched values: grid product x num_samples, other verbs drawn with the seed.

        The sampled values (and all of Optuna's, which depend on earlier results) are illustrative:
        Ray Tune draws its own with the same seed.
        """
        rng = random.Random(self.tune.seed)
        grid = [{}] if self.tune.algorithm == "optuna" else self.expand_grid()
        out = []
        for _ in range(self.tune.num_samples):
            for point in grid:
                params = {}
                for key, dim in self.search.items():
                    params[key] = point[key] if key in point else dim.sample(rng)
                out.append(params)
        return out

    def dry_run_trials(self, n: int | None = None) -> list[PlannedTrial]:
        """The first ``n`` (default: all) planned trials with resources and memory estimates."""
        planned = []
        limit = max_memory_gb(self.base)
        for i, params in enumerate(self.sampled_params()[:n]):
            cfg = self.trial_config(params)
            mem = estimate_memory(cfg)
            over = bool(limit and mem and mem.total_gb > limit)
            planned.append(PlannedTrial(i, params, cfg, trial_resources(cfg, self), mem, over))
        return planned

    def plan_text(self, n: int | None = 50) -> str:
        """The dry run as text: the sweep's settings, then one row per planned trial."""
        return format_plan(self, self.dry_run_trials(n))

    # ---- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The resolved spec (includes and overrides applied): loadable with ``load_spec``."""
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["base"] = copy.deepcopy(self.base)
        out["search"] = {k: d.to_yaml() for k, d in self.search.items()}
        out["objective"] = dataclasses.asdict(self.objective)
        out["tune"] = dataclasses.asdict(self.tune)
        out["after_trial"] = dataclasses.asdict(self.after_trial)
        out["tracking"] = dataclasses.asdict(self.tracking)
        out["storage"] = self.storage
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---- loading ---------------------------------------------------------------------------------------
def load_spec(
    path_or_dict: str | Path | dict[str, Any] | SweepSpec,
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    base_dir: str | Path | None = None,
) -> SweepSpec:
    """Read a sweep spec (file or dict), apply ``include``s and ``--set`` overrides, validate it.

    Overrides: ``tune.num_samples=2`` and ``base.train.max_steps=20`` address the spec;
    a bare config key (``train.lr=3e-4``) means ``base.train.lr`` and pins a searched key;
    ``search.lora.rank={choice: [4, 8]}`` replaces one search dimension.
    """
    if isinstance(path_or_dict, SweepSpec):
        if not overrides:
            return path_or_dict
        path_or_dict = path_or_dict.to_dict()
    source = None
    if isinstance(path_or_dict, dict):
        raw = resolve_includes(copy.deepcopy(path_or_dict), Path(base_dir or "."), ())
    else:
        path = Path(path_or_dict)
        source = str(path.resolve())
        raw = read_spec_file(path)
    raw = apply_spec_overrides(raw, overrides)
    spec = parse_spec(raw, default_name=Path(source).stem if source else "sweep")
    spec.source = source
    validate_spec(spec)
    return spec


def read_spec_file(path: Path, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    try:
        raw = load_yaml(path)
    except ConfigError as e:
        raise SpecError("include" if _seen else "spec", str(e)) from e
    return resolve_includes(raw, path.parent, (*_seen, str(path.resolve())))


def resolve_includes(raw: dict[str, Any], base_dir: Path, seen: tuple[str, ...]) -> dict[str, Any]:
    """Deep-merge the files named in ``include`` (in order), then ``raw`` on top."""
    includes = raw.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise SpecError(
            "include", f"{includes!r} is invalid: expected a list of YAML paths relative to the file"
        )
    merged: dict[str, Any] = {}
    for inc in includes:
        p = (base_dir / inc).resolve()
        if str(p) in seen:
            raise SpecError("include", f"{inc!r} includes itself (cycle: {' -> '.join([*seen, str(p)])})")
        if not p.is_file():
            raise SpecError("include", f"{inc!r} not found (looked for {p})")
        merged = merge_specs(merged, read_spec_file(p, seen))
    return merge_specs(merged, raw)


def merge_specs(low: dict[str, Any], high: dict[str, Any]) -> dict[str, Any]:
    """``high`` wins. Mappings merge recursively, except that a ``search`` entry replaces the included
    one whole (and ``null`` removes it)."""
    out = copy.deepcopy(low)
    for key, value in high.items():
        if key == "search" and isinstance(value, dict) and isinstance(out.get("search"), dict):
            search = out["search"]
            for k, v in value.items():
                if v is None:
                    search.pop(k, None)
                else:
                    search[k] = copy.deepcopy(v)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _deep_merge(low: dict[str, Any], high: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(low)
    for k, v in high.items():
        out[k] = (
            _deep_merge(out[k], v)
            if isinstance(v, dict) and isinstance(out.get(k), dict)
            else copy.deepcopy(v)
        )
    return out


def apply_spec_overrides(raw: dict[str, Any], overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    for key, value in items:
        head = key.split(".", 1)[0]
        if head == "search":
            rest = key[len("search.") :]
            if not rest:
                raise SpecError(f"--set {key}", "expected search.<config key>={verb: ...}")
            search = raw.setdefault("search", {}) or {}
            raw["search"] = search
            if value is None:
                search.pop(rest, None)
            else:
                search[rest] = value
            continue
        if head not in TOP_KEYS or head in ("include",):
            key = f"base.{key}"  # a bare config key: train.lr=... means base.train.lr
        if key.startswith("base."):
            config_key = key[len("base.") :]
            search = raw.get("search") or {}
            if config_key in search:  # pinning a searched key removes it from the search
                search.pop(config_key)
        try:
            set_dotted(raw, key, value)
        except ConfigError as e:
            raise SpecError(f"--set {key}", str(e)) from e
    return raw


# ---- parsing ----------------------------------------------------------------------------------------
def parse_spec(raw: dict[str, Any], default_name: str = "sweep") -> SweepSpec:
    if not isinstance(raw, dict):
        raise SpecError("spec", f"expected a mapping at the top level, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise SpecError(unknown[0], f"unknown top-level key; accepted: {', '.join(TOP_KEYS)}")
    name = raw.get("name") or default_name
    if not isinstance(name, str) or not name.strip() or "/" in name:
        raise SpecError("name", f"{name!r} is invalid: expected a folder name without '/'")
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise SpecError("base", f"expected a run config mapping (model, data, methods, ...), got {base!r}")
    search_raw = raw.get("search") or {}
    if not isinstance(search_raw, dict):
        raise SpecError("search", f"expected a mapping of config key -> {{verb: ...}}, got {search_raw!r}")
    search = {str(k): parse_dim(str(k), v) for k, v in search_raw.items()}
    _check_nested_keys(list(search))
    after = _section(raw, "after_trial", AfterTrial)
    tune_raw = dict(raw.get("tune") or {})
    if not isinstance(raw.get("tune") or {}, dict):
        raise SpecError("tune", f"expected a mapping, got {raw.get('tune')!r}")
    sched_raw = tune_raw.pop("scheduler", None)
    tune = _section({"tune": tune_raw}, "tune", TuneSettings)
    tune.scheduler = _parse_scheduler(sched_raw)
    obj_raw = raw.get("objective")
    if obj_raw is None:
        obj_raw = (
            {"metric": "eval/score", "mode": "max"}
            if after.evaluate
            else {"metric": "val_loss", "mode": "min"}
        )
    objective = _section({"objective": obj_raw}, "objective", Objective)
    storage = raw.get("storage") or DEFAULT_STORAGE
    if not isinstance(storage, str):
        raise SpecError("storage", f"{storage!r} is invalid: expected a folder or a URI (s3://..., gs://...)")
    return SweepSpec(
        name=name.strip(),
        base=copy.deepcopy(base),
        search=search,
        objective=objective,
        tune=tune,
        after_trial=after,
        tracking=_section(raw, "tracking", Tracking),
        storage=storage,
        description=str(raw.get("description") or ""),
    )


def parse_dim(key: str, value: Any) -> SearchDim:
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
    if not (isinstance(args, list) and len(args) == nargs and all(_is_number(a) for a in args)):
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


def _section(raw: dict[str, Any], name: str, cls: type) -> Any:
    value = raw.get(name)
    if value is None:
        return cls()
    if not isinstance(value, dict):
        raise SpecError(name, f"expected a mapping, got {value!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    for k in value:
        if k not in names:
            raise SpecError(f"{name}.{k}", f"unknown key; accepted keys in {name}: {', '.join(names)}")
    return cls(**value)


def _parse_scheduler(value: Any) -> SchedulerSpec:
    if value is None:
        return SchedulerSpec()
    if isinstance(value, str):
        value = {"type": value}
    return _section({"tune.scheduler": value}, "tune.scheduler", SchedulerSpec)


def _check_nested_keys(keys: list[str]) -> None:
    for a in keys:
        for b in keys:
            if a != b and b.startswith(a + "."):
                raise SpecError(f"search.{b}", f"overlaps search.{a}: search a section or its keys, not both")


# ---- validation ---------------------------------------------------------------------------------------
def validate_spec(spec: SweepSpec) -> None:
    """Check settings, then build a RunConfig for every grid combination and range/choice bound."""
    _validate_settings(spec)
    max_memory_gb(spec.base)
    try:
        base_cfg = build_run_config(spec.base)
    except ConfigError as e:
        raise SpecError("base", str(e)) from e
    check_layer_budgets(base_cfg, "base")
    dims = list(spec.search.values())
    for dim in dims:  # one key at a time: an error names that key
        for value in dim.candidates():
            d = copy.deepcopy(spec.base)
            try:
                set_dotted(d, dim.key, value)
                cfg = build_run_config(d)
            except ConfigError as e:
                raise SpecError(
                    f"search.{dim.key}", f"value {value!r}{_bound_note(dim, value)} is not accepted: {e}"
                ) from e
            check_layer_budgets(
                cfg, f"search.{dim.key}" if dim.key.split(".")[0] in ("ist", "rst") else "search"
            )
    combos = list(
        itertools.islice(itertools.product(*[d.candidates() for d in dims]), MAX_VALIDATED_COMBINATIONS)
    )
    if len(dims) > 1:  # every combination of the candidates: e.g. methods x the methods' settings
        for combo in combos:
            d = copy.deepcopy(spec.base)
            for dim, value in zip(dims, combo):
                set_dotted(d, dim.key, value)
            where = (
                "search (the combination " + ", ".join(f"{k.key}={v!r}" for k, v in zip(dims, combo)) + ")"
            )
            try:
                cfg = build_run_config(d)
            except ConfigError as e:
                raise SpecError(where, str(e)) from e
            check_layer_budgets(cfg, where)


def _one_of(*values: Any):
    return lambda v: v in values


def _int_ge(n: int):
    return lambda v: _is_int(v) and v >= n


def _num_gt(x: float, allow_equal: bool = False):
    return lambda v: _is_number(v) and (v >= x if allow_equal else v > x)


def _optional(check):
    return lambda v: v is None or check(v)


def _text(v: Any) -> bool:
    return isinstance(v, str) and bool(v)


#: section -> field -> (check, what is accepted); every failure names ``section.field``.
SETTING_RULES: dict[str, dict[str, tuple[Any, str]]] = {
    "tune": {
        "algorithm": (_one_of(*ALGORITHMS), f"one of {', '.join(ALGORITHMS)}"),
        "num_samples": (_int_ge(1), "an integer >= 1"),
        "max_concurrent": (
            lambda v: v == "auto" or _int_ge(1)(v),
            "'auto' (from the cluster) or an integer >= 1",
        ),
        "time_limit_s": (_optional(_num_gt(0)), "null or seconds > 0"),
        "seed": (lambda v: _is_int(v), "an integer"),
        "max_failures": (_int_ge(0), "an integer >= 0"),
        "startup_trials": (_optional(_int_ge(1)), "null or an integer >= 1"),
        "driver_cpus": (_num_gt(0, allow_equal=True), "a number >= 0"),
    },
    "tune.scheduler": {
        "type": (_one_of(*SCHEDULERS), f"one of {', '.join(SCHEDULERS)}"),
        "mode": (_one_of("min", "max"), "min or max"),
        "time_attr": (_one_of(*TIME_ATTRS), f"one of {', '.join(TIME_ATTRS)}"),
        "grace_period": (_int_ge(1), "an integer >= 1"),
        "reduction_factor": (_num_gt(1), "a number > 1, e.g. 2"),
        "max_t": (_optional(_int_ge(1)), "null or an integer >= grace_period"),
    },
    "objective": {
        "mode": (_one_of("min", "max"), "min or max"),
        "metric": (
            lambda v: v in TRIAL_METRICS or (isinstance(v, str) and v.startswith("eval/") and len(v) > 5),
            f"one of {', '.join(TRIAL_METRICS)}, eval/score or eval/<task>/<metric>",
        ),
    },
    "after_trial": {
        "merge": (_one_of(True, False), "true or false"),
        "evaluate": (_one_of(True, False), "true or false"),
        "keep_merged": (_one_of(*KEEP_MERGED), f"one of {', '.join(KEEP_MERGED)}"),
        "cpus": (_num_gt(0), "a number > 0"),
        "gpus": (_num_gt(0, allow_equal=True), "a number >= 0"),
    },
    "tracking": {
        "uri": (_optional(_text), "null or a URI"),
        "experiment": (_optional(_text), "null or a name"),
    },
}


def _validate_settings(spec: SweepSpec) -> None:
    sections = {
        "tune": spec.tune,
        "tune.scheduler": spec.tune.scheduler,
        "objective": spec.objective,
        "after_trial": spec.after_trial,
        "tracking": spec.tracking,
    }
    for section, rules in SETTING_RULES.items():
        for name, (check, accepted) in rules.items():
            value = getattr(sections[section], name)
            if not check(value):
                raise SpecError(f"{section}.{name}", f"{value!r} is invalid: expected {accepted}")
    s, metric = spec.tune.scheduler, spec.objective.metric
    if s.max_t is not None and s.max_t < s.grace_period:
        raise SpecError("tune.scheduler.max_t", f"{s.max_t} < grace_period {s.grace_period}")
    if s.type == "asha" and s.metric not in ("val_loss", "loss"):
        raise SpecError(
            "tune.scheduler.metric",
            f"{s.metric!r} is invalid: expected val_loss or loss (reported while training; eval/* only "
            "exists after a trial, too late to stop it early)",
        )
    if metric.startswith("eval/") and not spec.after_trial.evaluate:
        raise SpecError(
            "objective.metric", f"{metric!r} needs after_trial.evaluate: true (or use val_loss/min)"
        )
    grids = [k for k, d in spec.search.items() if d.verb == "grid"]
    if spec.tune.algorithm == "optuna" and grids:
        raise SpecError(
            f"search.{grids[0]}",
            "grid verbs are not supported with tune.algorithm: optuna (TPE samples each key); use "
            "{choice: [...]} instead, or tune.algorithm: grid",
        )


def _bound_note(dim: SearchDim, value: Any) -> str:
    if not dim.is_range:
        return ""
    return (
        f" (the {'lower' if value == dim.candidates()[0] else 'upper'} bound of {dim.verb} {dim.describe()})"
    )


# ---- run configs, layer counts --------------------------------------------------------------------------
def build_run_config(d: dict[str, Any]) -> RunConfig:
    """``RunConfig.from_dict`` minus the spec-only ``compute.max_memory_gb`` (when the core lacks it)."""
    return RunConfig.from_dict(_strip_memory_limit(d))


def max_memory_gb(d: dict[str, Any]) -> float | None:
    """``compute.max_memory_gb`` of a run config dict: trials estimated above it are refused."""
    value = (d.get("compute") or {}).get("max_memory_gb")
    if value is not None and not (_is_number(value) and value > 0):
        raise SpecError(
            "base.compute.max_memory_gb", f"{value!r} is invalid: expected null or a number of GB > 0"
        )
    return value


def _strip_memory_limit(d: dict[str, Any]) -> dict[str, Any]:
    if "max_memory_gb" in {f.name for f in dataclasses.fields(ComputeConfig)}:
        return d
    compute = d.get("compute")
    if isinstance(compute, dict) and "max_memory_gb" in compute:
        d = dict(d)
        d["compute"] = {k: v for k, v in compute.items() if k != "max_memory_gb"}
    return d


def check_layer_budgets(cfg: RunConfig, where: str) -> None:
    """IST/RST ``budget`` as a layer count must not exceed the model's decoder layers."""
    for name in ("ist", "rst"):
        settings = cfg.method_configs.get(name)
        if settings is None or not _is_int(getattr(settings, "budget", None)):
            continue
        shape = model_shape(cfg.model.name_or_path)
        if shape is None:
            continue
        from tokentune.methods.ist import resolve_budget

        try:
            resolve_budget(settings.budget, shape.layers, f"{name}.budget")
        except ConfigError as e:
            raise SpecError(where, str(e)) from e


@dataclass(frozen=True)
class ModelShape:
    """The sizes the memory estimate and the layer-budget check need."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    head_dim_: int | None = None  # config.json's head_dim when it is not hidden // heads

    @property
    def head_dim(self) -> int:
        return self.head_dim_ or self.hidden // self.heads


#: Shapes of the models the shipped paper specs use, for dry runs without the hub.
KNOWN_SHAPES = {
    "meta-llama/Llama-2-7b-hf": ModelShape(32, 4096, 11008, 32, 32, 32000),
    "huggyllama/llama-7b": ModelShape(32, 4096, 11008, 32, 32, 32000),
}
_SHAPES: dict[str, ModelShape | None] = {}


def model_shape(name_or_path: str | None) -> ModelShape | None:
    """Read ``config.json`` of the shipped default, a local folder, or a cached hub model.

    Returns None (with a warning) for a hub model that is not cached and not in ``KNOWN_SHAPES``.
    """
    key = str(name_or_path)
    if key not in _SHAPES:
        _SHAPES[key] = _read_shape(name_or_path)
    return _SHAPES[key]


def _read_shape(name_or_path: str | None) -> ModelShape | None:
    config_file = _config_json(name_or_path)
    if config_file is None:
        if name_or_path in KNOWN_SHAPES:
            return KNOWN_SHAPES[name_or_path]
        log.warning(
            "model %r: no local config.json (not a folder, not in the HF cache); the IST/RST layer-budget "
            "check and the memory estimate are skipped for it",
            name_or_path,
        )
        return None
    c = json.loads(Path(config_file).read_text())
    c = c.get("text_config", c) if "num_hidden_layers" not in c else c
    hidden = c.get("hidden_size") or c.get("n_embd") or c.get("d_model")
    layers = c.get("num_hidden_layers") or c.get("n_layer") or c.get("num_layers")
    if not (hidden and layers):
        log.warning(
            "model %r: config.json has no hidden_size/num_hidden_layers; checks skipped", name_or_path
        )
        return None
    heads = c.get("num_attention_heads") or c.get("n_head") or 1
    return ModelShape(
        layers=int(layers),
        hidden=int(hidden),
        intermediate=int(c.get("intermediate_size") or c.get("n_inner") or 4 * hidden),
        heads=int(heads),
        kv_heads=int(c.get("num_key_value_heads") or heads),
        vocab=int(c.get("vocab_size") or 32000),
        tied=bool(c.get("tie_word_embeddings", False)),
        head_dim_=int(c["head_dim"]) if c.get("head_dim") else None,
    )


def _config_json(name_or_path: str | None) -> Path | None:
    if name_or_path is None:
        from tokentune import assets

        p = assets.default_model_path() / "config.json"
        return p if p.is_file() else None
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p / "config.json" if (p / "config.json").is_file() else None
    if p.exists() or str(name_or_path).startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(str(name_or_path), "config.json")
    except Exception:  # noqa: BLE001 - an invalid repo id is just "not cached"
        return None
    return Path(found) if isinstance(found, str) else None


# ---- memory estimate -----------------------------------------------------------------------------------
DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}
_LINEAR_SHAPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class MemoryEstimate:
    """A rough per-worker estimate in GB (weights + grads + optimizer + activations); no runtime overhead."""

    weights_gb: float
    trainable_params: int
    optimizer_gb: float  # gradients + AdamW states of the trainable parameters
    activations_gb: float  # saved for backward, one micro-batch of max_length tokens, plus logits
    total_gb: float

    def short(self) -> str:
        parts = (self.weights_gb, self.optimizer_gb, self.activations_gb)
        return f"{fmt_gb(self.total_gb)} (weights {fmt_gb(parts[0])} + opt {fmt_gb(parts[1])} + act {fmt_gb(parts[2])})"


def fmt_gb(x: float) -> str:
    """``1.23 GB`` or ``45.6 MB`` below 1 GB."""
    return f"{x:.2f} GB" if x >= 1 else f"{x * 1024:.1f} MB"


def estimate_memory(cfg: RunConfig, shape: ModelShape | None = None) -> MemoryEstimate | None:
    """Estimate one worker's memory for ``cfg`` from the model's sizes and the method list.

    - weights: every base parameter in ``model.dtype`` (QLoRA: linear layers at ~4.5 bits);
    - trainable: LoRA/DoRA ``rank * (in + out)`` per targeted module (fp32), or every parameter (full);
    - optimizer: gradients (IST/RST: only the active share of layers) + two AdamW states;
      ZeRO 1/2/3 divide optimizer states / gradients / weights by the workers;
    - activations per micro-batch of ``batch_size x max_length`` tokens, per layer per token
      ``7h + 3kv + 4I`` values; TokenTune keeps them for the selected share ``ratio`` and only keys and
      values for the rest; IST/RST save nothing below the lowest active layer (expected depth);
      logits (fp32 + their gradient) for the selected tokens.
    """
    shape = shape or model_shape(cfg.model.name_or_path)
    if shape is None:
        return None
    h, inter, L, V = shape.hidden, shape.intermediate, shape.layers, shape.vocab
    q_dim, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    dims = {
        "q_proj": (h, q_dim),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q_dim, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }
    linear_per_layer = sum(i * o for i, o in dims.values())
    embed = V * h * (1 if shape.tied else 2)
    norms = L * 2 * h + h
    wbytes = DTYPE_BYTES.get(cfg.model.dtype, 4)
    methods = set(cfg.methods)
    linear_bytes = 0.56 if "qlora" in methods else wbytes
    weights = L * linear_per_layer * linear_bytes + (embed + norms) * wbytes

    # trainable parameters: adapters (fp32) or the full model
    trainer = next((m for m in ("lora", "dora", "full") if m in methods), "lora")
    if trainer == "full":
        per_layer_trainable = linear_per_layer + 2 * h
        outside = embed + h
        tbytes = wbytes
    else:
        ad = cfg.method_configs[trainer]
        targets = [t for t in ad.target_modules if t in dims]
        per_layer_trainable = sum(
            ad.rank * (dims[t][0] + dims[t][1]) + (dims[t][1] if trainer == "dora" else 0) for t in targets
        )
        outside = 0
        tbytes = 4
    trainable = L * per_layer_trainable + outside

    active_layers = L
    for name in ("ist", "rst"):
        if name in methods:
            budget = cfg.method_configs[name].budget
            active_layers = (
                min(L, int(budget)) if _is_int(budget) else max(1, min(L, math.floor(budget * L + 1e-9)))
            )
    grads = (active_layers * per_layer_trainable + outside) * tbytes
    states = 2 * trainable * tbytes
    zero, workers = cfg.compute.zero_stage, cfg.compute.workers
    if zero is not None and workers > 1:
        states /= workers if zero >= 1 else 1
        grads /= workers if zero >= 2 else 1
        weights /= workers if zero >= 3 else 1

    # activations
    abytes = 2 if cfg.train.bf16 == "true" else wbytes
    tokens = cfg.train.batch_size * cfg.data.max_length
    ratio = 1.0
    if "tokentune" in methods:
        tt = cfg.method_configs["tokentune"]
        ratio = min(1.0, tt.count / cfg.data.max_length) if tt.count is not None else float(tt.ratio)
    per_token_layer = 7 * h + 3 * kv + 4 * inter
    per_layer = tokens * (ratio * per_token_layer + (1 - ratio) * 2 * kv) * abytes
    depth = L - (L - active_layers) / (active_layers + 1)  # expected layers above the lowest active one
    logits = tokens * ratio * V * 8
    activations = depth * per_layer + logits

    gb = 1024**3
    total = weights + grads + states + activations
    return MemoryEstimate(
        weights_gb=weights / gb,
        trainable_params=int(trainable),
        optimizer_gb=(grads + states) / gb,
        activations_gb=activations / gb,
        total_gb=total / gb,
    )


# ---- resources and the plan ------------------------------------------------------------------------------
def trial_resources(cfg: RunConfig, spec: SweepSpec | None = None) -> dict[str, Any]:
    """What one trial reserves: Train workers (CPUs/GPUs each), the ZeRO stage, the driver's CPUs."""
    c = cfg.compute
    gpu = c.use_gpu
    gpus: float | str = (
        c.workers * c.gpus_per_worker if gpu in (True, "true") else (0 if gpu in (False, "false") else "auto")
    )
    return {
        "workers": c.workers,
        "cpus": c.workers * c.cpus_per_worker,
        "gpus": gpus,
        "zero_stage": c.zero_stage,
        "driver_cpus": spec.tune.driver_cpus if spec else 0.0,
    }


def value_label(v: Any) -> str:
    """A compact, readable label: ``[lora, tokentune]``, ``0.0003``, ``8``."""
    if isinstance(v, (list, dict)):
        return yaml.safe_dump(v, default_flow_style=True, width=10_000).strip()
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_plan(spec: SweepSpec, trials: list[PlannedTrial]) -> str:
    t, s = spec.tune, spec.tune.scheduler
    sched = (
        "fifo"
        if s.type == "fifo"
        else f"asha({s.metric}/{s.mode}, {s.time_attr}, grace {s.grace_period}, rf {s.reduction_factor})"
    )
    lines = [
        f"sweep {spec.name!r}" + (f" ({spec.source})" if spec.source else ""),
        f"  objective: {spec.objective.metric} ({spec.objective.mode});  algorithm: {t.algorithm} (seed {t.seed});  "
        f"scheduler: {sched}",
        f"  trials: {spec.num_trials()} ({'grid x ' if spec.grid_dims() else ''}num_samples {t.num_samples});  "
        f"max_concurrent: {t.max_concurrent};  time limit: {t.time_limit_s or 'none'}",
        f"  after each trial: merge={spec.after_trial.merge} evaluate={spec.after_trial.evaluate} "
        f"(cpus {spec.after_trial.cpus}, gpus {spec.after_trial.gpus}); keep merged: {spec.after_trial.keep_merged}",
        f"  storage: {spec.storage}/{spec.name}",
        "  search:",
    ]
    lines += [f"    {k}: {d.describe()}" for k, d in spec.search.items()] or [
        "    (nothing: one configuration)"
    ]
    if t.algorithm == "optuna" or any(d.verb != "grid" and d.verb != "fixed" for d in spec.search.values()):
        lines.append("  (sampled values below are illustrative draws with the seed; Tune draws its own)")
    keys = [k for k, d in spec.search.items() if d.verb != "fixed"]
    header = ["#", *keys, "workers", "cpus", "gpus", "zero", "memory/worker (est.)"]
    rows = []
    limit = max_memory_gb(spec.base)
    for p in trials:
        r = p.resources
        mem = p.memory.short() if p.memory else "? (model shape unknown)"
        if p.over_limit:
            mem += f"  REFUSED: > compute.max_memory_gb={limit}"
        rows.append(
            [
                str(p.index),
                *[value_label(p.params[k]) for k in keys],
                str(r["workers"]),
                f"{r['cpus']:g}",
                str(r["gpus"]),
                str(r["zero_stage"]),
                mem,
            ]
        )
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    lines.append("")
    lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)))
    if len(trials) < spec.num_trials():
        lines.append(f"  ... {spec.num_trials() - len(trials)} more")
    base_cfg = trials[0].config if trials else None
    if base_cfg is not None:
        tr = base_cfg.train
        lines.append("")
        lines.append(
            f"  base: model {base_cfg.model.name_or_path or '(shipped tiny Llama)'}, data {base_cfg.data.train or '(shipped)'}, "
            f"max_steps {tr.max_steps}, batch {tr.batch_size}x{tr.grad_accum}, max_length {base_cfg.data.max_length}, "
            f"eval tasks {base_cfg.eval.tasks or '(shipped)'} limit {base_cfg.eval.limit}"
        )
    return "\n".join(lines)


# ---- small helpers -----------------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _all_int(*vals: Any) -> bool:
    return all(_is_int(v) for v in vals)


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


__all__ = [
    "AfterTrial",
    "MemoryEstimate",
    "ModelShape",
    "Objective",
    "PlannedTrial",
    "SchedulerSpec",
    "SearchDim",
    "SpecError",
    "SweepSpec",
    "Tracking",
    "TuneSettings",
    "estimate_memory",
    "load_spec",
    "model_shape",
    "trial_resources",
]
