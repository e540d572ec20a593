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
    tune: {algorithm: grid, num_samples: 1, max_concurrent: auto, max_memory_gb: null, scheduler: {type: fifo}}
    after_trial: {action: merge+eval, keep_merged: best, cpus: 1, gpus: 0, timeout_s: 1800}
    tracking: {uri: null, experiment: null}
    storage: sweeps

This module reads a spec (includes, ``--set`` overrides, parsing) and holds ``SweepSpec``, frozen once
resolved (``spec.replaced(name=...)`` makes a changed copy); its settings sections are in
``orchestrator.spec.sections``, its other parts in ``orchestrator.spec.parts``, the checks that need more
than one part in ``orchestrator.spec.validate`` (run by
``load_spec`` before any cluster resource is used; every error is a ``SpecError`` naming the key), the
dry run in ``orchestrator.spec.plan``. ``load_spec`` also checks that the inputs exist (model, data files,
template, eval tasks; ``check_inputs=False`` skips that, e.g. for a spec meant for another machine) and
keeps what it could not check (an uncached hub name while online, or every input when skipped) in
``SweepSpec.notes``. The planned trials' configs are built once per spec (``planned_config``) and shared by
the validation, the dry run and the tuner; a trial's driver builds its own (``trial_config``).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.spec import plan
from orchestrator.spec.inputs import absolute_local_paths
from orchestrator.spec.objectives import parse_objectives
from orchestrator.spec.parts import (
    SearchDim,
    SpecError,
    apply_searched,
    check_search_keys,
    lookup_dotted,
    parse_dim,
)
from orchestrator.spec.sections import (
    AfterTrial,
    Objective,
    Tracking,
    TuneSettings,
    parse_section,
    refuse_moved_keys,
)
from orchestrator.spec.validate import check_scheduler_metric, check_sweep_name, validate_spec
from tokentune.config import ConfigError, RunConfig, load_yaml, parse_override, set_dotted
from tokentune.errors import check_expanded_size

TOP_KEYS = tuple("include name description base search objective tune after_trial tracking storage".split())
DEFAULT_STORAGE = "sweeps"
#: fields that leave every trial's config as it is: a copy changing only these keeps the built configs
SAME_CONFIGS = ("name", "description", "source", "notes")


@dataclass(frozen=True)
class SweepSpec:
    """A sweep: the ``base`` run config (a dict), the searched keys, and how Tune runs the trials.

    Frozen once resolved (``load_spec``): ``replaced(...)`` makes a changed copy (``run_sweep(name=...)``).
    """

    name: str
    base: dict[str, Any]
    search: dict[str, SearchDim] = field(default_factory=dict)
    objective: Objective = field(default_factory=Objective)  # the first listed: "best" means by it
    #: every objective (``objective`` first); one unless the YAML lists several (a Pareto search)
    objectives: tuple[Objective, ...] = ()
    tune: TuneSettings = field(default_factory=TuneSettings)
    after_trial: AfterTrial = field(default_factory=AfterTrial)
    tracking: Tracking = field(default_factory=Tracking)
    storage: str = DEFAULT_STORAGE
    description: str = ""
    source: str | None = None  # the YAML file it came from
    notes: tuple[str, ...] = ()  # what the input checks could not check
    #: planned trials' configs by their searched values (``planned_config``); not pickled, not compared
    _configs: dict[str, RunConfig] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_sweep_name(self.name)  # also a copy's (``replaced(name=...)``): it never leads outside storage
        object.__setattr__(self, "objectives", tuple(self.objectives) or (self.objective,))
        object.__setattr__(self, "notes", tuple(self.notes))

    def replaced(self, **changes: Any) -> SweepSpec:
        """A copy with ``changes`` (checked as a new spec); it keeps the configs built so far when only
        ``SAME_CONFIGS`` fields change."""
        new = dataclasses.replace(self, **changes)
        if set(changes) <= set(SAME_CONFIGS):
            new._configs.update(self._configs)
        return new

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_configs"}  # a trial builds its own

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _configs={})

    @property
    def goals(self) -> list[tuple[str, str]]:
        """Every objective as ``(metric, mode)`` (``orchestrator.results.best``'s goals), the first first."""
        return [(o.metric, o.mode) for o in self.objectives]

    @property
    def multi_objective(self) -> bool:
        """The objective lists several metrics: Optuna searches, and the results mark, their front."""
        return len(self.objectives) > 1

    def settings(self) -> dict[str, Any]:
        """Each settings section by its YAML key (as ``orchestrator.spec.sections.SECTIONS``)."""
        return {
            "objective": self.objective,
            "tune": self.tune,
            "tune.scheduler": self.tune.scheduler,
            "after_trial": self.after_trial,
            "tracking": self.tracking,
        }

    # ---- trials ----------------------------------------------------------------------------------
    def trial_config(self, searched: dict[str, Any] | None = None) -> RunConfig:
        """The trial's full config, built now (the trial's own, to change): ``base`` plus its values of
        the searched keys, ``searched``.

        ``searched`` may be flat (``{"lora.rank": 8}``) or nested (``{"lora": {"rank": 8}}``), and hold
        values as Tune samples them (encoded lists are decoded); a ``fixed`` key may be left out.
        """
        d = copy.deepcopy(self.base)
        for key, dim in self.search.items():
            found, value = lookup_dotted(searched or {}, key)
            if not found and dim.verb != "fixed":
                raise SpecError(
                    f"search.{key}", f"the trial's searched values have none for it: {searched!r}"
                )
            apply_searched(d, key, dim.coerce(value) if found else copy.deepcopy(dim.values[0]))
        return RunConfig.from_dict(d)

    def planned_config(self, searched: dict[str, Any]) -> RunConfig:
        """The config of planned searched values (``searched_values``, a validated combination), built once
        per spec and shared by the validation, the dry run and the tuner: read it, never change it."""
        key = json.dumps(searched, sort_keys=True, default=str)
        if key not in self._configs:
            self._configs[key] = self.trial_config(searched)
        return self._configs[key]

    def grid_dims(self) -> list[SearchDim]:
        return [d for d in self.search.values() if d.verb == "grid"]

    def expand_grid(self) -> list[dict[str, Any]]:
        """Every combination of the ``grid`` values (``[{}]`` when nothing is a grid)."""
        return list(self._grid_points())

    def _grid_points(self) -> Iterator[dict[str, Any]]:
        dims = self.grid_dims()
        keys = [d.key for d in dims]
        return (dict(zip(keys, combo)) for combo in itertools.product(*[d.values for d in dims]))

    def num_trials(self) -> int:
        """Counted, not built: the grid's size (the product of its value counts) x ``num_samples``."""
        if self.tune.algorithm == "optuna":
            return self.tune.num_samples
        return math.prod(len(d.values) for d in self.grid_dims()) * self.tune.num_samples

    def searched_values(self, n: int | None = None) -> list[dict[str, Any]]:
        """The first ``n`` (default: all) planned trials' searched values: grid product x num_samples,
        other verbs drawn with the seed; built lazily, so ``n`` bounds the work (``num_samples: 10**8``).

        The drawn values (and all of Optuna's, which depend on earlier results) are illustrative:
        Ray Tune draws its own with the same seed.
        """
        return list(itertools.islice(self._iter_searched(), n))

    def _iter_searched(self) -> Iterator[dict[str, Any]]:
        rng = random.Random(self.tune.seed)
        for _ in range(self.tune.num_samples):
            grid = iter([{}]) if self.tune.algorithm == "optuna" else self._grid_points()
            for point in grid:
                yield {
                    key: point[key] if key in point else dim.sample(rng) for key, dim in self.search.items()
                }

    def trial_configs(self, n: int | None = None) -> list[RunConfig]:
        """The configs of the first ``n`` (default: all) trials of ``searched_values`` (``planned_config``:
        built once, shared, read-only)."""
        return [self.planned_config(searched) for searched in self.searched_values(n)]

    def dry_run_trials(self, n: int | None = None) -> list[plan.PlannedTrial]:
        """The first ``n`` (default: all) planned trials with resources and memory estimates."""
        return plan.dry_run_trials(self, n)

    def plan_text(self, n: int | None = plan.PLAN_ROWS) -> str:
        """The dry run as text: the sweep's settings, then one row per planned trial."""
        return plan.format_plan(self, self.dry_run_trials(n))

    # ---- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The resolved spec (includes and overrides applied): loadable with ``load_spec``."""
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["base"] = copy.deepcopy(self.base)
        out["search"] = {k: d.to_yaml() for k, d in self.search.items()}
        out["objective"] = (
            [{"metric": m, "mode": d} for m, d in self.goals]
            if self.multi_objective
            else dataclasses.asdict(self.objective)
        )
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
    check_inputs: bool = True,
) -> SweepSpec:
    """Read a sweep spec (file or dict), apply ``include``s and ``--set`` overrides, validate it.

    ``check_inputs``: also check that the model, data files, template and eval tasks exist here
    (``orchestrator.spec.inputs.check_inputs``); False for a spec written for another machine (its
    ``notes`` then name the inputs that were not checked).

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
        _check_size(path_or_dict, "spec (a dict)")
        raw = resolve_includes(copy.deepcopy(path_or_dict), Path(base_dir or "."), ())
    else:
        path = Path(path_or_dict)
        source = str(path.resolve())
        raw = read_spec_file(path)
    raw = apply_spec_overrides(raw, overrides)
    _check_size(
        raw, "spec" + (f" {source!r}" if source else "") + (" with its --set overrides" if overrides else "")
    )
    raw = absolute_local_paths(raw)
    spec = parse_spec(raw, default_name=Path(source).stem if source else "sweep", source=source)
    return spec.replaced(notes=validate_spec(spec, check_inputs=check_inputs))


def _check_size(raw: Any, what: str) -> None:
    """Refuse a spec whose YAML aliases expand it past ``MAX_EXPANDED_SIZE`` before it is copied or
    formatted (``tokentune.errors.check_expanded_size``; files are checked as they are read)."""
    try:
        check_expanded_size(raw, what)
    except ConfigError as e:
        raise SpecError("spec", str(e)) from None


def read_spec_file(path: Path, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    try:
        raw = load_yaml(path)
    except ConfigError as e:  # not YAML, not UTF-8, or too large once its aliases are expanded
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
def parse_spec(raw: dict[str, Any], default_name: str = "sweep", source: str | None = None) -> SweepSpec:
    """A resolved spec mapping (includes and overrides applied) -> ``SweepSpec``: each settings section
    checked as it is built; what needs more than one part is ``validate_spec``'s."""
    if not isinstance(raw, dict):
        raise SpecError("spec", f"expected a mapping at the top level, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise SpecError(unknown[0], f"unknown top-level key; accepted: {', '.join(TOP_KEYS)}")
    refuse_moved_keys(raw)
    name = raw.get("name") or default_name
    check_sweep_name(name.strip() if isinstance(name, str) else name)
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise SpecError("base", f"expected a run config mapping (model, data, methods, ...), got {base!r}")
    search_raw = raw.get("search") or {}
    if not isinstance(search_raw, dict):
        raise SpecError("search", f"expected a mapping of config key -> {{verb: ...}}, got {search_raw!r}")
    search = {str(k): parse_dim(str(k), v) for k, v in search_raw.items()}
    check_search_keys(search)
    after = parse_section("after_trial", raw.get("after_trial"), AfterTrial)
    obj_raw = raw.get("objective")
    if obj_raw is None:  # eval/score (max) when each trial is evaluated, else val_loss (min)
        obj_raw = {} if after.evaluates else {"metric": "val_loss", "mode": "min"}
    objectives = parse_objectives(obj_raw)
    tune = parse_section("tune", raw.get("tune"), TuneSettings)
    check_scheduler_metric(objectives, tune, raw.get("tune"))
    storage = raw.get("storage") or DEFAULT_STORAGE
    if not isinstance(storage, str):
        raise SpecError("storage", f"{storage!r} is invalid: expected a folder or a URI (s3://..., gs://...)")
    return SweepSpec(
        name=name.strip(),
        base=copy.deepcopy(base),
        search=search,
        objective=objectives[0],
        objectives=objectives,
        tune=tune,
        after_trial=after,
        tracking=parse_section("tracking", raw.get("tracking"), Tracking),
        storage=storage,
        description=str(raw.get("description") or ""),
        source=source,
    )


__all__ = ["SpecError", "SweepSpec", "load_spec", "parse_spec"]
