"""A parsed ``SweepSpec`` checked before any cluster resource is used. Pure: never imports ray.

    notes = validate_spec(spec)     # raises SpecError naming the key; load_spec calls it

What is checked here (each settings section checked its own values when it was built,
``orchestrator.spec.sections``): what needs two sections (an ``eval/*`` objective needs
``after_trial.action: merge+eval``, Optuna takes no grid); no credentials inside ``tracking.uri``,
``storage`` or the ``MLFLOW_TRACKING_URI`` the sweep would use (they would be printed and stored: environment
variables or an instance role carry them); ``base`` built into a ``RunConfig``; each searched key's candidates
(every grid/choice value, the bounds of a range) built one key at a time, so that an error names that key;
then every combination of the candidates (e.g. ``methods`` x a method's settings; built once, as the spec's
planned configs). Every built config is also checked against the model's shape by the methods themselves
(``MethodStack.check_shape``: e.g. a layer budget above the layer count).

Then the inputs exist (``orchestrator.spec.inputs``: model, tokenizer, data files, template, eval tasks;
``validate_spec(spec, check_inputs=False)`` skips that and notes what it did not check); the notes (what
could not be checked here) are returned, for ``SweepSpec.notes``.
"""

from __future__ import annotations

import copy
import itertools
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from orchestrator.spec import inputs
from orchestrator.spec.parts import SearchDim, SpecError, apply_searched
from tokentune.config import ConfigError, RunConfig
from tokentune.methods import MethodStack
from tokentune.redact import redact_text, secret_in_uri
from tokentune.shape import model_shape

if TYPE_CHECKING:
    from orchestrator.spec.sweep import SweepSpec

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


def validate_spec(spec: SweepSpec, check_inputs: bool = True) -> list[str]:
    """Check what needs more than one part, build a RunConfig for every grid combination and range/choice
    bound, then (``check_inputs``) check that the inputs exist; returns the notes (what was not checked)."""
    check_across_sections(spec)
    _refuse_credentials(spec)
    _checked_config(spec.base, "base")
    dims = list(spec.search.values())
    for dim in dims:  # one key at a time: an error names that key
        for value in dim.candidates():
            try:
                cfg = _with_value(spec, dim, value, whole=len(dims) == 1)
            except ConfigError as e:
                raise SpecError(
                    f"search.{dim.key}", f"value {value!r}{_bound_note(dim, value)} is not accepted: {e}"
                ) from e
            section = dim.key.split(".", 1)[0]  # a method's setting (ist.budget) names itself
            check_shape(cfg, f"search.{dim.key}" if section in cfg.method_configs else "search")
    if len(dims) > 1:  # every combination of the candidates: e.g. methods x the methods' settings
        combos = itertools.product(*[d.candidates() for d in dims])
        for combo in itertools.islice(combos, MAX_VALIDATED_COMBINATIONS):
            params = {dim.key: value for dim, value in zip(dims, combo)}
            where = f"search (the combination {', '.join(f'{k}={v!r}' for k, v in params.items())})"
            try:
                cfg = spec.planned_config(params)
            except ConfigError as e:
                raise SpecError(where, str(e)) from e
            check_shape(cfg, where)
    return inputs.check_inputs(spec) if check_inputs else inputs.unchecked_inputs(spec)


def _with_value(spec: SweepSpec, dim: SearchDim, value: Any, whole: bool) -> RunConfig:
    """``base`` with ``dim`` at ``value``: a planned config when it is the only searched key (``whole``)."""
    if whole:
        return spec.planned_config({dim.key: value})
    d = copy.deepcopy(spec.base)
    apply_searched(d, dim.key, value)
    return RunConfig.from_dict(d)


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
        cfg = RunConfig.from_dict(d)
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


# ---- across sections ---------------------------------------------------------------------------------------
def check_across_sections(spec: SweepSpec) -> None:
    """What no single section can check (each checks its own values when it is built)."""
    for i, (metric, _) in enumerate(spec.goals):
        if metric.startswith("eval/") and not spec.after_trial.evaluates:
            raise SpecError(
                f"objective[{i}].metric" if spec.multi_objective else "objective.metric",
                f"{metric!r} needs after_trial.action: merge+eval (now {spec.after_trial.action!r}; or use "
                "objective: {metric: val_loss, mode: min})",
            )
    grids = [k for k, d in spec.search.items() if d.verb == "grid"]
    if spec.tune.algorithm == "optuna" and grids:
        raise SpecError(
            f"search.{grids[0]}",
            "grid verbs are not supported with tune.algorithm: optuna (TPE samples each key); use "
            "{choice: [...]} instead, or tune.algorithm: grid",
        )


def check_scheduler_metric(objectives: Sequence[Any], tune: Any, tune_raw: Any) -> None:
    """ASHA stops trials on one metric: with a list objective it must be named (``tune.scheduler.metric``,
    which ASHA then prunes on); its default (val_loss) is not silently chosen among several objectives."""
    if len(objectives) < 2 or tune.scheduler.type != "asha":
        return
    sched = tune_raw.get("scheduler") if isinstance(tune_raw, dict) else None
    if isinstance(sched, dict) and "metric" in sched:
        return
    listed = ", ".join(o.metric for o in objectives)
    raise SpecError(
        "tune.scheduler",
        f"ASHA stops trials on one metric, but objective lists several ({listed}): set "
        "tune.scheduler.metric (and mode) explicitly (val_loss, loss or memory/*; ASHA prunes on it alone), "
        "or use tune.scheduler: fifo",
    )
