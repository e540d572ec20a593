"""A parsed ``SweepSpec`` checked before any cluster resource is used. Pure: never imports ray.

    validate_spec(spec)     # raises SpecError naming the key; load_spec calls it

What is checked: the sweep's name (a plain folder name: no '/', not '..'); the settings sections
against ``SETTING_RULES`` and their cross-rules (ASHA needs a training metric, an ``eval/*`` objective
needs evaluation, Optuna takes no grid); no credentials inside ``tracking.uri``, ``storage`` or the
``MLFLOW_TRACKING_URI`` the sweep would use (they would be printed and stored: environment variables or
an instance role carry them); ``base`` built into a ``RunConfig``; each searched key's candidates (every
grid/choice value, the bounds of a range) built one key at a time, so that an error names that key;
then every combination of the candidates (e.g. ``methods`` x a method's settings). Every built config is
also checked against the model's shape by the methods themselves (``MethodStack.check_shape``: e.g. a
layer budget above the layer count).

Then the inputs exist (``orchestrator.spec.inputs``: model, tokenizer, data files, template, eval tasks;
``validate_spec(spec, check_inputs=False)`` skips that); what cannot be checked here goes to
``spec.notes``.
"""

from __future__ import annotations

import copy
import itertools
import os
import re
from typing import TYPE_CHECKING, Any

from orchestrator.spec import inputs
from orchestrator.spec.parts import SearchDim, SpecError, build_run_config, max_memory_gb
from tokentune.config import ConfigError, RunConfig, set_dotted
from tokentune.errors import is_int, is_number
from tokentune.methods import MethodStack
from tokentune.redact import redact_text, secret_in_uri
from tokentune.shape import model_shape

if TYPE_CHECKING:
    from orchestrator.spec.sweep import SweepSpec

ALGORITHMS = ("grid", "random", "optuna")
SCHEDULERS = ("fifo", "asha")
TIME_ATTRS = ("training_iteration", "step")
KEEP_MERGED = ("best", "all", "none")
#: Metrics every trial reports (besides ``eval/<task>/<metric>`` and ``eval/score`` after evaluation).
TRIAL_METRICS = (
    "val_loss",
    "loss",
    "tokens_per_s",
    "wall_s",
    "trial_wall_s",
)
#: Measured memory a trial reports while training (``tokentune.memory``), per worker, in GB.
MEMORY_METRICS = (
    "memory/train_gb",
    "memory/weights_gb",
    "memory/grads_gb",
    "memory/optimizer_gb",
    "memory/activations_gb",
    "memory/cuda_peak_gb",
    "memory/process_rss_gb",
)
MAX_VALIDATED_COMBINATIONS = 4096
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
#: where credentials for these URIs belong instead
CREDENTIALS_FROM = {
    "tracking.uri": "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) "
    "in the environment",
    "MLFLOW_TRACKING_URI": "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
    "MLFLOW_TRACKING_TOKEN) in the environment instead",
    "storage": "give them by environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
    "GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN) or use an "
    "instance role",
}


def validate_spec(spec: SweepSpec, check_inputs: bool = True) -> None:
    """Check the name and settings, build a RunConfig for every grid combination and range/choice bound,
    then (``check_inputs``) check that the inputs exist; what could not be checked goes to ``spec.notes``."""
    check_sweep_name(spec.name)
    _validate_settings(spec)
    _refuse_credentials(spec)
    max_memory_gb(spec.base)
    _checked_config(spec.base, "base")
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
            section = dim.key.split(".", 1)[0]  # a method's setting (ist.budget) names itself
            check_shape(cfg, f"search.{dim.key}" if section in cfg.method_configs else "search")
    if len(dims) > 1:  # every combination of the candidates: e.g. methods x the methods' settings
        combos = itertools.product(*[d.candidates() for d in dims])
        for combo in itertools.islice(combos, MAX_VALIDATED_COMBINATIONS):
            d = copy.deepcopy(spec.base)
            for dim, value in zip(dims, combo):
                set_dotted(d, dim.key, value)
            pairs = ", ".join(f"{dim.key}={value!r}" for dim, value in zip(dims, combo))
            _checked_config(d, f"search (the combination {pairs})")
    if check_inputs:
        spec.notes = inputs.check_inputs(spec)


def check_sweep_name(name: Any, key: str = "name") -> None:
    """A sweep name is a plain folder name: it must not lead outside ``storage``."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise SpecError(
            key,
            f"{name!r} is invalid: expected a plain folder name (letters, digits, '.', '_', '-'; starting "
            "with a letter, digit or '_'; no '/', not '.' or '..'; at most 128 characters), e.g. quickstart",
        )


def _refuse_credentials(spec: SweepSpec) -> None:
    """``tracking.uri`` and ``storage`` (and ``MLFLOW_TRACKING_URI`` when the sweep takes its tracking
    URI from there) must not embed credentials."""
    uris = [("tracking.uri", spec.tracking.uri), ("storage", spec.storage)]
    if not spec.tracking.uri:
        uris.append(("MLFLOW_TRACKING_URI", os.environ.get("MLFLOW_TRACKING_URI")))
    for key, uri in uris:
        what = secret_in_uri(uri) if isinstance(uri, str) else None
        if what:
            raise SpecError(
                key,
                f"{redact_text(uri)!r} embeds credentials ({what}), which would be printed by the dry run and "
                f"stored in sweep.yaml, MLflow and Ray's state: remove them and {CREDENTIALS_FROM[key]}",
            )


#: tracking URIs that are a name, not a path (MLflow's Databricks and Unity Catalog stores)
NAMED_STORES = ("databricks", "databricks-uc", "uc")


def is_local_store(tracking_uri: str) -> bool:
    """A tracking store that is a file of this machine: ``sqlite:``, ``file:`` or a plain path."""
    uri = tracking_uri.strip()
    if uri in NAMED_STORES:
        return False
    return uri.startswith(("sqlite:", "file:")) or ("://" not in uri and ":" not in uri.split("/")[0])


def refuse_local_store_on_cluster(tracking_uri: str, origin: str, elsewhere: list[str]) -> None:
    """Refuse a file tracking store (SQLite, ``file:``) when the Ray cluster has alive nodes on other
    machines (``elsewhere``: their addresses): trials placed there would log to their own copy of the
    file and their runs would be lost. ``origin`` says where the URI came from (for the message)."""
    if not elsewhere or not is_local_store(tracking_uri):
        return
    nodes = ", ".join(elsewhere[:3]) + (f" and {len(elsewhere) - 3} more" if len(elsewhere) > 3 else "")
    raise SpecError(
        "tracking.uri",
        f"{redact_text(tracking_uri)!r} ({origin}) is a file on this machine, but the Ray cluster has nodes "
        f"on other machines ({nodes}): trials placed there would log to their own copy and their runs "
        "would be lost. Run `mlflow server` on the head (see cluster/README.md: the `ray up` files start "
        "one) and pass `tracking.uri: http://<head>:5000` (--set tracking.uri=...) or set "
        "MLFLOW_TRACKING_URI; a SQLite file on a shared file system is not accepted either (SQLite's "
        "locking is not safe over NFS)",
    )


def _checked_config(d: dict[str, Any], where: str) -> RunConfig:
    """``d`` built into a ``RunConfig`` and checked against the model's shape; errors name ``where``."""
    try:
        cfg = build_run_config(d)
    except ConfigError as e:
        raise SpecError(where, str(e)) from e
    check_shape(cfg, where)
    return cfg


def check_shape(cfg: RunConfig, where: str) -> None:
    """Each configured method's own check against the model's shape (skipped when it is unknown).

    Every method section of ``cfg`` is checked, listed in ``methods`` or not: a sweep may switch a
    method on in another dimension, and the error should name the searched key.
    """
    shape = model_shape(cfg.model.name_or_path)
    if shape is None:
        return
    try:
        MethodStack.check_shape(list(cfg.method_configs), cfg.method_configs, shape)
    except ConfigError as e:
        raise SpecError(where, str(e)) from e


def _bound_note(dim: SearchDim, value: Any) -> str:
    if not dim.is_range:
        return ""
    return (
        f" (the {'lower' if value == dim.candidates()[0] else 'upper'} bound of {dim.verb} {dim.describe()})"
    )


# ---- the settings sections -------------------------------------------------------------------------
def _one_of(*values: Any):
    return lambda v: v in values


def _int_ge(n: int):
    return lambda v: is_int(v) and v >= n


def _num_gt(x: float, allow_equal: bool = False):
    return lambda v: is_number(v) and (v >= x if allow_equal else v > x)


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
        "seed": (is_int, "an integer"),
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
            lambda v: (
                v in TRIAL_METRICS
                or _is_memory_metric(v)
                or (isinstance(v, str) and v.startswith("eval/") and len(v) > 5)
            ),
            f"one of {', '.join(TRIAL_METRICS)}, {', '.join(MEMORY_METRICS)}, eval/score or eval/<task>/<metric>",
        ),
        "memory_budget_gb": (_optional(_num_gt(0)), "null or a number of GB > 0"),
    },
    "after_trial": {
        "merge": (_one_of(True, False), "true or false"),
        "evaluate": (_one_of(True, False), "true or false"),
        "keep_merged": (_one_of(*KEEP_MERGED), f"one of {', '.join(KEEP_MERGED)}"),
        "cpus": (_num_gt(0, allow_equal=True), "a number >= 0"),
        "overlap": (_one_of("auto", True, False), "auto, true or false"),
        "gpus": (_num_gt(0, allow_equal=True), "a number >= 0"),
        "timeout_s": (_optional(_num_gt(0)), "null (no limit) or seconds > 0"),
    },
    "tracking": {
        "uri": (_optional(_text), "null or a URI"),
        "experiment": (_optional(_text), "null or a name"),
    },
}


def _is_memory_metric(v: Any) -> bool:
    return v in MEMORY_METRICS


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
    if s.type == "asha" and s.metric not in ("val_loss", "loss") and not _is_memory_metric(s.metric):
        raise SpecError(
            "tune.scheduler.metric",
            f"{s.metric!r} is invalid: expected val_loss, loss or a measured memory/* key (reported while "
            "training; eval/* only exists after a trial, too late to stop it early)",
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
