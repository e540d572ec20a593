"""The parts of a sweep spec and how each is read from YAML. Pure: never imports ray.

- ``SpecError``: every user-facing spec error, naming the offending key (``search.lora.rank``);
- ``SearchDim``: one searched config key and its verb (``{grid: [4, 8]}``, ``{loguniform: [1e-4, 1e-2]}``);
- ``setup``: the one searched key that is not a config key: each value is a named mapping of dotted config
  keys set together (``{name: lora+offload, methods: [lora], compute.offload: optimizer}``), so a grid
  compares whole setups side by side instead of the product of their parts;
- small helpers: ``value_label``, ``lookup_dotted``, ``apply_searched``.

The settings sections (``objective``, ``tune``, ``after_trial``, ``tracking``) are in
``orchestrator.spec.sections``; ``orchestrator.spec.sweep`` assembles the parts into a ``SweepSpec``;
``orchestrator.spec.validate`` checks what needs more than one part.
"""

from __future__ import annotations

import copy
import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

import yaml

from tokentune.config import ConfigError
from tokentune.errors import is_int, is_number

VERBS = ("grid", "choice", "uniform", "quniform", "loguniform", "randint", "fixed")
#: the searched key whose values are named bundles of config keys (see ``apply_searched``)
SETUP_KEY = "setup"


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
        if self.key == SETUP_KEY:  # the setups by name (each one's keys are in the spec file)
            return f"{self.verb} over setups: {', '.join(value_label(v) for v in self.values)}"
        return json.dumps(self.to_yaml(), default=str)


def parse_dim(key: str, value: Any) -> SearchDim:
    """``search.<key>``'s YAML value -> a ``SearchDim`` (a plain value means ``{fixed: value}``)."""
    dim = _parse_dim(key, value)
    if key == SETUP_KEY:
        check_setups(dim)
    return dim


def _parse_dim(key: str, value: Any) -> SearchDim:
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


# ---- setups: named bundles of config keys ---------------------------------------------------------------
def check_setups(dim: SearchDim) -> None:
    """``search.setup``: grid, choice or fixed over mappings, each with a unique ``name`` and at least one
    dotted config key besides it."""
    where = f"search.{SETUP_KEY}"
    example = (
        "e.g. {grid: [{name: lora, methods: [lora]}, {name: lora+ckpt, methods: [lora, checkpointing]}]}"
    )
    if dim.verb not in ("grid", "choice", "fixed"):
        raise SpecError(
            where, f"{dim.verb} is not accepted here: expected grid, choice or fixed over setups, {example}"
        )
    names: set[str] = set()
    for v in dim.values:
        if (
            not isinstance(v, dict)
            or not isinstance(v.get("name"), str)
            or not v["name"].strip()
            or len(v) < 2
        ):
            raise SpecError(
                where,
                f"{v!r} is invalid: expected a mapping with a name and the config keys it sets, {example}",
            )
        if v["name"] in names:
            raise SpecError(where, f"the name {v['name']!r} is used twice: each setup needs its own name")
        names.add(v["name"])
        bad = [k for k in v if not isinstance(k, str) or not k or k == SETUP_KEY]
        if bad:
            raise SpecError(
                where, f"{v['name']}: {bad[0]!r} is not a config key (e.g. methods, compute.offload)"
            )


def setup_keys(dim: SearchDim) -> set[str]:
    """The config keys a ``setup`` dimension sets (empty for any other key)."""
    if dim.key != SETUP_KEY:
        return set()
    return {k for v in dim.values for k in v if k != "name"}


def check_search_keys(search: dict[str, SearchDim]) -> None:
    """No searched key inside another (``lora`` and ``lora.rank``), none set again by a ``setup``."""
    keys = list(search)
    inner = setup_keys(search[SETUP_KEY]) if SETUP_KEY in search else set()
    for a in keys:
        for b in inner:
            if a == b or b.startswith(a + ".") or a.startswith(b + "."):
                raise SpecError(
                    f"search.{a}", f"overlaps search.{SETUP_KEY}, whose setups set {b}: set it in one place"
                )
    for a in keys:
        for b in keys:
            if a != b and b.startswith(a + "."):
                raise SpecError(f"search.{b}", f"overlaps search.{a}: search a section or its keys, not both")


def apply_searched(d: dict[str, Any], key: str, value: Any) -> None:
    """Set a searched key's value in the config mapping ``d``: a ``setup`` sets each of its keys."""
    from tokentune.config import set_dotted

    if key != SETUP_KEY:
        set_dotted(d, key, value)
        return
    for k, v in value.items():
        if k != "name":
            set_dotted(d, k, copy.deepcopy(v))


# ---- small helpers -------------------------------------------------------------------------------------
def setup_name(v: Any) -> str | None:
    """A setup's name (a ``search.setup`` value: a mapping with a ``name``), else None."""
    return v["name"] if isinstance(v, dict) and isinstance(v.get("name"), str) else None


def value_label(v: Any) -> str:
    """A compact, readable label: ``[lora, tokentune]``, ``0.0003``, ``8``; a setup's name."""
    name = setup_name(v)
    if name is not None:
        return name
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
