"""A ``SweepSpec`` -> Ray Tune: search space, search algorithm, scheduler, concurrency.

    space = to_tune_space(spec)                       # {"lora.rank": tune.choice([4, 8]), ...}
    search_alg = make_search_alg(spec)               # BasicVariantGenerator (seeded) or OptunaSearch (TPE;
                                                     # multi-objective TPE for a list objective)
    scheduler = make_scheduler(spec)                 # FIFOScheduler or ASHAScheduler
    n = max_concurrent_trials(spec, ray.cluster_resources())

Keys stay flat and dotted (``"lora.rank"``); ``SweepSpec.trial_config`` reads them back. Lists such
as ``methods`` values stay lists under grid/random search; Optuna only takes scalars, so there they
travel as readable labels (``"[lora, tokentune]"``) that ``trial_config`` decodes.
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune.search.optuna import OptunaSearch

from orchestrator.run.trial import SKIPPED_OVER_GB
from orchestrator.spec.parts import SearchDim, SpecError, value_label
from orchestrator.spec.sweep import SweepSpec

BUDGET_CONSTRAINT = "memory_budget_gb"  # the Optuna constraint of a trial over tune.max_memory_gb


# ---- the search space -------------------------------------------------------------------------------
def to_tune_space(spec: SweepSpec, *, labels: bool | None = None) -> dict[str, Any]:
    """One ``ray.tune`` domain per searched key. ``labels``: encode list/dict values as strings
    (default: only for Optuna)."""
    if labels is None:
        labels = spec.tune.algorithm == "optuna"
    return {key: to_domain(dim, labels=labels) for key, dim in spec.search.items()}


def to_domain(dim: SearchDim, *, labels: bool = False) -> Any:
    from ray import tune

    values = [value_label(v) for v in dim.values] if labels and dim.has_encoded_values else list(dim.values)
    if dim.verb == "grid":
        return tune.grid_search(values)
    if dim.verb == "choice":
        return tune.choice(values)
    if dim.verb == "fixed":
        return values[0]
    if dim.verb == "uniform":
        return tune.uniform(dim.low, dim.high)
    if dim.verb == "quniform":
        return tune.quniform(dim.low, dim.high, dim.q)
    if dim.verb == "loguniform":
        return tune.loguniform(dim.low, dim.high)
    if dim.verb == "randint":
        return tune.randint(int(dim.low), int(dim.high) + 1)  # the spec includes high; Tune excludes it
    raise SpecError(f"search.{dim.key}", f"unknown verb {dim.verb!r}")


# ---- search algorithm ----------------------------------------------------------------------------------
def make_search_alg(spec: SweepSpec, max_concurrent: int | None = None) -> Any:
    """``BasicVariantGenerator`` (grid/random, seeded) or ``OptunaSearch`` (TPE, seeded; with a list
    objective, Optuna's multi-objective TPE: ``OptunaSearch(metric=[...], mode=[...])``, a study with one
    direction per objective).

    The variant generator takes the space from ``param_space``; Optuna gets it here (``grid`` is
    rejected by the spec's validation). ``max_concurrent`` bounds the trials in flight: the variant
    generator's own limit, a ``ConcurrencyLimiter`` around Optuna. (Tune ignores
    ``TuneConfig.max_concurrent_trials`` when given a search-generator instance.)
    """
    t = spec.tune
    if t.algorithm in ("grid", "random"):
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=t.seed, max_concurrent=max_concurrent or 0)
    if t.algorithm == "optuna":
        import optuna
        from ray.tune.search import ConcurrencyLimiter

        grids = [k for k, d in spec.search.items() if d.verb == "grid"]
        if grids:
            raise SpecError(
                f"search.{grids[0]}", "grid verbs are not supported with tune.algorithm: optuna; use choice"
            )
        startup = t.startup_trials or max(2, min(10, math.ceil(t.num_samples / 3)))
        sampler = optuna.samplers.TPESampler(seed=t.seed, n_startup_trials=startup)
        space = to_tune_space(spec, labels=True)
        metric, mode = (
            ([m for m, _ in spec.goals], [d for _, d in spec.goals])
            if spec.multi_objective
            else (spec.objective.metric, spec.objective.mode)
        )
        searcher = FinalMetricOptunaSearch(space=space, metric=metric, mode=mode, sampler=sampler)
        return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent) if max_concurrent else searcher
    raise SpecError("tune.algorithm", f"{t.algorithm!r} is invalid: expected grid, random or optuna")


class FinalMetricOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that ignores intermediate results lacking the objective, and is told a trial over
    the memory budget is infeasible.

    A trial reports training metrics (loss, val_loss) while it trains and ``eval/score`` only at the
    end; stock ``OptunaSearch.on_trial_result`` indexes ``result[metric]`` on every result.

    A trial skipped for its memory estimate (``tune.max_memory_gb``; its last result carries
    ``SKIPPED_OVER_GB``, the GB over the budget) has no objective values. Ray's ``OptunaSearch`` has no
    constraint of its own, so the constraint goes on the Optuna trial itself
    (``optuna.Trial.set_constraint("memory_budget_gb", GB over)``: > 0 is infeasible, Optuna's constrained
    TPE samples away from it) and the trial is told to the study as ``PRUNED`` (no values), never as a
    bad score.
    """

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, str) and self.metric not in result:
            return
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        over = (result or {}).get(SKIPPED_OVER_GB)
        if over is None or trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)
        from optuna.trial import TrialState

        ot_trial = self._ot_trials[trial_id]
        ot_trial.set_constraint(BUDGET_CONSTRAINT, max(float(over), 1e-9))  # > 0: infeasible
        self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
        self._completed_trials.add(trial_id)


# ---- scheduler ------------------------------------------------------------------------------------------
def make_scheduler(spec: SweepSpec) -> Any:
    """FIFO, or ASHA on a metric reported while training (``val_loss``/``loss``).

    ``max_t`` defaults past the largest ``train.max_steps`` so that ASHA never stops a trial at its
    last training report, before merge + evaluation.
    """
    s = spec.tune.scheduler
    if s.type == "fifo":
        from ray.tune.schedulers import FIFOScheduler

        return FIFOScheduler()
    from ray.tune.schedulers import ASHAScheduler

    max_t = s.max_t or default_max_t(spec)
    return ASHAScheduler(
        time_attr=s.time_attr,
        metric=s.metric,
        mode=s.mode,
        max_t=max_t,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
    )


def default_max_t(spec: SweepSpec) -> int:
    from tokentune.preview import training_rows

    steps = max(
        cfg.train.total_steps(training_rows(cfg), cfg.compute.workers)
        if cfg.train.epochs
        else cfg.train.max_steps
        for cfg in spec.trial_configs(64)
    )
    return steps + 10  # training_iteration counts reports (at most one per step + final reports)


# ---- resources and concurrency ------------------------------------------------------------------------------
def trial_demand(spec: SweepSpec, cluster: dict[str, float] | None = None) -> dict[str, float]:
    """CPUs/GPUs one trial holds at its peak: the driver + max(Train workers, the post-trial task).

    The post-trial task starts after the trial's Train workers are released, so it reuses their slot
    unless it asks for more. The largest configuration of the sweep counts (compute may be searched).
    """
    train_cpus, train_gpus = _train_demand(spec, cluster or {})
    a = spec.after_trial
    after_cpus = a.cpus if a.merges else 0.0
    after_gpus = a.gpus_for(train_gpus > 0) if a.merges else 0.0
    return {
        "CPU": spec.tune.driver_cpus + max(train_cpus, after_cpus),
        "GPU": max(train_gpus, after_gpus),
    }


def _train_demand(spec: SweepSpec, cluster: dict[str, float]) -> tuple[float, float]:
    """CPUs and GPUs of the sweep's largest Train job (``compute.use_gpu: auto`` decided by ``cluster``)."""
    train_cpus, train_gpus = 0.0, 0.0
    for cfg in spec.trial_configs(64):
        c = cfg.compute
        use_gpu = c.wants_gpu(cluster.get("GPU", 0) > 0)
        train_cpus = max(train_cpus, c.workers * c.cpus_per_worker)
        train_gpus = max(train_gpus, c.workers * c.gpus_per_worker if use_gpu else 0.0)
    return train_cpus, train_gpus


def post_trial_gpus(spec: SweepSpec, cluster: dict[str, float] | None = None) -> float:
    """GPUs of one merge + eval task: ``after_trial.gpus`` with ``auto`` decided (1 when the sweep's trials
    train on GPUs in ``cluster``, else 0)."""
    return spec.after_trial.gpus_for(_train_demand(spec, cluster or {})[1] > 0)


def max_concurrent_trials(spec: SweepSpec, cluster: dict[str, float]) -> int:
    """``tune.max_concurrent``, or (``auto``) how many trials the cluster's CPUs and GPUs hold at once."""
    n_trials = max(1, spec.num_trials())
    if spec.tune.max_concurrent != "auto":
        return int(spec.tune.max_concurrent)
    need = trial_demand(spec, cluster)
    fits = []
    for res in ("CPU", "GPU"):
        if need[res] > 0:
            fits.append(int(cluster.get(res, 0) // need[res]))
    n = min(fits) if fits else n_trials
    if n < 1:
        have = {k: cluster.get(k, 0) for k in ("CPU", "GPU")}
        raise SpecError(
            "base.compute",
            f"one trial needs {need} (Train workers / the post-trial task) but the Ray cluster has {have}; "
            "lower compute.workers / compute.cpus_per_worker / after_trial.cpus, or use a bigger cluster",
        )
    return min(n, n_trials)


def driver_resources(spec: SweepSpec) -> dict[str, float]:
    """The trial driver's own reservation (``tune.with_resources``): ``tune.driver_cpus`` CPUs (left out
    when 0) and ``tune.driver_memory_gb`` of memory, in bytes, for the driver and its Ray Train
    controller (Ray starts the controller on the driver's node with no reservation of its own). Ray
    places trial drivers by this, so with what they really use a node that holds as many drivers as it
    can is passed over for the next (the Train workers reserve their own CPUs/GPUs, anywhere)."""
    out = {"memory": float(int(spec.tune.driver_memory_gb * 1024**3))}
    if spec.tune.driver_cpus:
        out["CPU"] = float(spec.tune.driver_cpus)
    return out
