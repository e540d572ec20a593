"""``run_sweep``: the one Python entry point of a sweep (the CLI's ``tokentune sweep`` calls it).

    from orchestrator import run_sweep
    res = run_sweep("search_spaces/quickstart.yaml", ["train.max_steps=20"])
    res.best.trial_id, res.best.metrics["eval/score"], res.results_csv

Steps: load + validate the spec (no cluster resource is touched before this succeeds; on resume the stored
one, ``orchestrator.spec.resume``) -> a tracking server asked, bounded (``tracking_store``) -> Ray (local or
``address``; a file tracking store, e.g. the default SQLite, is refused when the cluster has nodes on
other machines: their trials' runs would be lost) -> sweep folder ``<storage>/<name>/`` with the
resolved ``sweep.yaml`` -> MLflow parent run (get-or-create) -> Ray Tune (a fresh Tuner, or
``Tuner.restore`` with ``resume=True``) -> results table (console, results.csv/.json, Pareto plot,
logged on the parent) -> merged checkpoints pruned per ``after_trial.keep_merged`` -> the parent run
ended. With a URI ``storage`` the trial folders are synced through it (``orchestrator.run.storage_sync``;
see ``sweep_location``).

Identity: a sweep is a UUID made when it is created (``sweep_id`` in ``sweep.yaml``; kept on resume),
not its name: its MLflow parent run is found by that id, so another sweep of the same name on a shared
tracking server gets its own. A running sweep holds ``<sweep folder>/.lock`` (``fcntl.flock``, released
when the process ends, also on ``kill -9``, so a killed sweep can be resumed): a second start of the
same folder, fresh or ``--resume``, is refused while it runs. A fresh start into a folder that holds a
sweep (finished or not) is refused: resume it or choose another name. With a URI ``storage`` the lock
guards the local sweep folder only (one driver machine). SIGTERM/SIGINT: ``orchestrator.run.interrupt``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from orchestrator.results.best import Goal, best_trial
from orchestrator.results.tracking_journal import end_parent, resend_pending
from orchestrator.results.tracking_store import check_tracking_store, tracking_origin
from orchestrator.results.types import SweepResult, TrialResult
from orchestrator.run.interrupt import StopOnSignal, SweepInterrupted, close_running_children
from orchestrator.run.storage_sync import download_trials, is_uri, read_text, upload_file
from orchestrator.spec.parts import value_label
from orchestrator.spec.plan import DRY_RUN_TRIALS, PLAN_ROWS, format_plan
from orchestrator.spec.resume import never_ran_error, resume_differences, where_overrides
from orchestrator.spec.sweep import SpecError, SweepSpec, load_spec
from orchestrator.spec.validate import check_sweep_name, refuse_local_store_on_cluster
from tokentune.files import open_in_place, refuse_link, write_text_atomic
from tokentune.redact import redact, unmasked

if TYPE_CHECKING:
    from orchestrator.results.tracking import SweepTracker
    from orchestrator.run.trial import TrialContext

log = logging.getLogger(__name__)

SPEC_FILE = "sweep.yaml"
LOCK_FILE = ".lock"  # flock'ed by the running sweep's driver; holds its pid


def run_sweep(
    spec: str | Path | dict[str, Any] | SweepSpec,
    overrides: list[str] | None = None,
    *,
    name: str | None = None,
    resume: bool = False,
    dry_run: bool = False,
    address: str | None = None,
    progress: bool = True,
    quiet: bool = False,
    verbose: bool = False,
    check_inputs: bool = True,
) -> SweepResult:
    """Run (or resume, or dry-run) a sweep; see the module docstring.

    Console: ``progress`` prints the plan, a line per trial event with the counts and ETA
    (``orchestrator.results.console``), the results table and the best trial; ``quiet`` only the progress
    lines and the table; ``verbose`` also streams Ray's worker logs and Tune's status tables (else
    they stay in Ray's log folder). ``progress=False`` prints nothing.

    ``spec``: a YAML path, a spec dict, or a ``SweepSpec``; ``overrides``: ``--set`` items
    (``tune.num_samples=2``, ``train.lr=3e-4`` = ``base.train.lr``); ``name``: the sweep folder
    (default: the spec's name); ``resume``: continue ``<storage>/<name>`` (finished trials are kept);
    ``dry_run``: validate and plan only (``SweepResult.plan_text``, ``trials`` with status planned: the
    first ``DRY_RUN_TRIALS``, 1000; ``spec.num_trials()`` counts them all);
    ``check_inputs=False``: do not check that the model, data and eval tasks exist here (a spec meant for
    another machine; the plan names what was not checked).
    """
    t0 = time.perf_counter()
    sweep = load_spec(spec, overrides, check_inputs=check_inputs)
    if name:
        check_sweep_name(name.strip())  # a plain folder name: never leads outside storage
        sweep = sweep.replaced(name=name.strip())
    sweep_dir, storage_uri = sweep_location(sweep)
    if resume:
        sweep = _stored_spec(sweep, sweep_dir, storage_uri, check_inputs, overrides)
    if dry_run:
        return _dry_run(sweep, sweep_dir)
    check_tracking_store(sweep_dir, sweep.tracking.uri, tracking_origin(sweep.tracking.uri))  # writes nothing
    plan = sweep.plan_text(PLAN_ROWS)
    with sweep_lock(sweep_dir, sweep.name), StopOnSignal() as stop:  # SIGTERM/SIGINT: a clean stop
        return _run(
            sweep,
            sweep_dir,
            storage_uri,
            resume=resume,
            address=address,
            progress=progress,
            plan=plan,
            t0=t0,
            quiet=quiet,
            verbose=verbose,
            stop=stop,
        )


@contextlib.contextmanager
def sweep_lock(sweep_dir: Path, name: str) -> Iterator[None]:
    """Hold ``<sweep_dir>/.lock`` (exclusive ``flock``) while the sweep runs; refuse if another process
    holds it (``SpecError`` naming its pid). The kernel releases it when the process dies."""
    import fcntl

    sweep_dir.mkdir(parents=True, exist_ok=True)
    fd = open_in_place(sweep_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)  # never through a link
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise SpecError(
            "name",
            f"sweep {name!r} is already running in {sweep_dir} (pid {holder}); wait for it or choose another "
            "name (--name / name=...)",
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def sweep_location(spec: SweepSpec) -> tuple[Path, str]:
    """(local sweep folder, storage root for Tune/Train).

    A folder ``storage`` (local, or a shared file system mounted at the same path on every node) holds
    everything at ``<storage>/<name>``. A URI ``storage`` (``s3://``, ``gs://``, ``file:///...``: any
    pyarrow filesystem URI) keeps Tune and Train state at ``<uri>/<name>``, and a local sweep folder
    ``./sweeps/<name>`` on every process that writes one: results, the pareto plot and (without a
    tracking server) the MLflow DB on the driver, the trial folders on the node where each trial ran.
    Each trial uploads its folder to ``<uri>/<name>/trials/<trial_id>`` (not ``merged/``: merged
    checkpoints stay on the node that produced them), and the driver downloads the trials it lacks
    before the results table and at ``--resume`` (``orchestrator.run.storage_sync``); ``sweep.yaml`` is
    stored there too, so a sweep can be resumed from another machine.
    """
    if is_uri(spec.storage):
        return Path("sweeps", spec.name).resolve(), f"{spec.storage.rstrip('/')}/{spec.name}"
    local = Path(spec.storage, spec.name).expanduser().resolve()
    return local, str(local)


def _stored_file(sweep_dir: Path, storage_uri: str) -> tuple[str, dict[str, Any]] | None:
    """(where, contents) of the sweep's ``sweep.yaml``: local, else at a URI storage; None if neither."""
    local = refuse_link(sweep_dir / SPEC_FILE)  # another file linked in would be resumed
    if local.is_file():
        return str(local), yaml.safe_load(local.read_text()) or {}
    if is_uri(storage_uri) and (text := read_text(storage_uri, SPEC_FILE)) is not None:
        return f"{storage_uri}/{SPEC_FILE}", yaml.safe_load(text) or {}  # resumed on another machine
    return None


def _stored_spec(
    fresh: SweepSpec,
    sweep_dir: Path,
    storage_uri: str,
    check_inputs: bool = True,
    overrides: list[str] | dict[str, Any] | None = None,
) -> SweepSpec:
    """The spec stored with the sweep (``sweep.yaml``: local, else at a URI storage) with the ``storage``
    and ``tracking.uri`` given in ``overrides`` (``orchestrator.spec.resume``); a ``SpecError`` naming
    the sweeps that exist when there is none (the sweep never ran)."""
    found = _stored_file(sweep_dir, storage_uri)
    if found is None:
        if (sweep_dir / LOCK_FILE).exists():  # a sweep starting there now: say that it runs
            with sweep_lock(sweep_dir, fresh.name):
                pass
        raise never_ran_error(
            fresh.name, fresh.storage, sweep_dir, storage_uri if is_uri(storage_uri) else None
        )
    stored, raw = found
    raw.pop("sweep_id", None)
    raw = unmasked(raw, fresh.to_dict())  # sweep.yaml is redacted: the given spec holds what was masked
    spec = load_spec(raw, where_overrides(overrides), check_inputs=check_inputs).replaced(source=stored)
    if spec.to_dict() != fresh.to_dict():
        before = load_spec(raw, check_inputs=False).to_dict()
        diff = resume_differences(before, fresh.to_dict(), spec.to_dict())
        log.warning("resume: the given spec differs from the stored one (%s): %s", stored, diff or "-")
    return spec


def _dry_run(sweep: SweepSpec, sweep_dir: Path) -> SweepResult:
    """The first ``DRY_RUN_TRIALS`` trials built once (status ``planned``; the rest are only counted); the
    text shows the first 50 and the total, as ``plan_text()`` does."""
    trials = sweep.dry_run_trials(DRY_RUN_TRIALS)
    planned = [TrialResult(f"plan_{p.index:04d}", p.searched, _plan_metrics(p), "planned") for p in trials]
    text = format_plan(sweep, trials[:PLAN_ROWS])
    return SweepResult(sweep.name, str(sweep_dir), planned, plan_text=text, spec=sweep)


def _plan_metrics(p) -> dict[str, Any]:
    out: dict[str, Any] = {f"resources/{k}": v for k, v in p.resources.items()}
    if p.memory is not None:
        out.update({k: round(v, 6) for k, v in p.memory.metrics().items()})
    return out


def _run(
    spec: SweepSpec,
    sweep_dir: Path,
    storage_uri: str,
    *,
    resume: bool,
    address: str | None,
    progress: bool,
    plan: str,
    t0: float,
    quiet: bool = False,
    verbose: bool = False,
    stop: StopOnSignal | None = None,
) -> SweepResult:
    """The sweep itself, step by step (the module docstring's list); the caller holds the lock. A signal
    (``stop``) ends the parent run KILLED, its open trial runs too, and raises ``SweepInterrupted``."""
    from orchestrator.results.tracking import SweepTracker
    from orchestrator.run.ray_cluster import init_ray, nodes_on_other_machines
    from orchestrator.run.tuner import set_tune_env, start_sweep_actors

    ctx = _trial_context(spec, sweep_dir, storage_uri, progress)
    if not resume:
        _refuse_existing(spec, sweep_dir, ctx.storage_uri)
    set_tune_env(verbose)
    cluster = init_ray(address, log_to_driver=verbose)  # worker logs stay in Ray's log folder
    stop = stop or StopOnSignal()
    stop.install()  # ray.init's own SIGTERM handler aborts the process
    # before anything is written: a refused sweep can be started again with another tracking URI
    refuse_local_store_on_cluster(
        ctx.tracking_uri, tracking_origin(spec.tracking.uri), nodes_on_other_machines()
    )
    sweep_id = _write_spec(spec, sweep_dir, ctx.storage_uri, resume)
    if progress and not quiet:
        _print_plan(plan, verbose)
    tracker = SweepTracker(ctx.tracking_uri, ctx.experiment, spec.name, sweep_id=sweep_id)
    ctx.parent_run_id = tracker.start_parent(spec.to_dict())
    if resume:  # the trials' tracking writes that could not be sent before
        resend_pending(tracker, sweep_dir)
    status = "FAILED"
    try:
        actors = start_sweep_actors(spec, ctx, cluster, sweep_id)  # noqa: F841 - they live while we hold them
        with stop.fitting():
            trials = _fit(spec, ctx, cluster, resume=resume, progress=progress, verbose=verbose)
        stop.raise_if_stopped(f"resume it with --resume (sweep folder {sweep_dir})")
        result = _summarise(spec, trials, tracker, sweep_dir, progress=progress, quiet=quiet)
        if spec.after_trial.merges:
            from orchestrator.run.post_trial import prune_merged

            best_id = result.best.trial_id if result.best else None
            prune_merged(sweep_dir, best_id, spec.after_trial.keep_merged)
        status = "FINISHED"
    except SweepInterrupted:
        status = "KILLED"
        close_running_children(tracker, "the sweep was stopped by a signal; --resume continues it")
        raise
    finally:
        end_parent(tracker, status)  # a store that is down: a warning
    result.mlflow_parent_run_id, result.tracking_uri = ctx.parent_run_id, ctx.tracking_uri
    result.plan_text, result.wall_s, result.spec = plan, time.perf_counter() - t0, spec
    return result


def _trial_context(spec: SweepSpec, sweep_dir: Path, storage_uri: str, progress: bool) -> TrialContext:
    """What every trial needs (the tracking store, the folders); the parent run id is added later."""
    from orchestrator.results.tracking import default_tracking_uri
    from orchestrator.run.trial import TrialContext

    return TrialContext(
        spec=spec,
        sweep_dir=str(sweep_dir),
        train_storage=f"{storage_uri}/train",
        tracking_uri=default_tracking_uri(sweep_dir, spec.tracking.uri),
        experiment=spec.tracking.experiment or spec.name,
        progress=progress,
        storage_uri=storage_uri if is_uri(storage_uri) else None,  # None: every file is under sweep_dir
    )


def _refuse_existing(spec: SweepSpec, sweep_dir: Path, remote: str | None) -> None:
    """A fresh start into a folder (or URI storage) that holds a sweep is a ``SpecError``."""
    where: Path | str | None = sweep_dir if (sweep_dir / SPEC_FILE).exists() else None
    if where is None and remote and read_text(remote, SPEC_FILE) is not None:
        where = remote
    if where is not None:
        raise SpecError(
            "name",
            f"sweep {spec.name!r} already exists at {where}: resume it (--resume / resume=True) or "
            "give a new name (--name / name=...)",
        )


def _write_spec(spec: SweepSpec, sweep_dir: Path, remote: str | None, resume: bool) -> str:
    """Write ``sweep.yaml`` (with the sweep's UUID: the stored one on resume, else a new one), also to a
    URI storage; on resume fetch the trials that finished elsewhere. Returns the sweep id."""
    found = _stored_file(sweep_dir, remote or "") if resume else None
    sweep_id = (found[1].get("sweep_id") if found else None) or str(uuid.uuid4())
    sweep_dir.mkdir(parents=True, exist_ok=True)
    safe = yaml.safe_dump(redact(spec.to_dict()), sort_keys=False)  # as MLflow's copy: no secret stored
    write_text_atomic(sweep_dir / SPEC_FILE, yaml.safe_dump({"sweep_id": sweep_id}) + safe)
    if remote:
        upload_file(sweep_dir / SPEC_FILE, remote, SPEC_FILE)
        if resume:  # trials that finished on other nodes (or machines) must not run again
            download_trials(remote, sweep_dir)
    return sweep_id


def _print_plan(plan: str, verbose: bool) -> None:
    from orchestrator.results.console import RAY_LOGS

    print(plan, flush=True)
    if not verbose:
        print(f"Ray worker logs: {RAY_LOGS} (--verbose prints them here)", flush=True)


def _fit(
    spec: SweepSpec,
    ctx: TrialContext,
    cluster: dict[str, float],
    *,
    resume: bool,
    progress: bool,
    verbose: bool,
) -> list[TrialResult]:
    """Run Ray Tune (restored on resume when it can be) and collect the trials."""
    from orchestrator.run.ray_cluster import orphaned_placement_groups_swept
    from orchestrator.run.tuner import build_tuner, can_restore, collect_trials, restore_tuner

    restoring = resume and can_restore(ctx)
    if resume and not restoring:
        log.warning("resume: no Tune experiment to restore under %s; starting the sweep", ctx.sweep_dir)
    if restoring:
        tuner = restore_tuner(spec, ctx)
    else:
        tuner = build_tuner(spec, ctx, cluster, progress=progress, verbose=verbose)
    with orphaned_placement_groups_swept():  # freed when a trial driver dies with its node
        grid = tuner.fit()
    if ctx.storage_uri:  # the trials that ran on other nodes
        download_trials(ctx.storage_uri, ctx.sweep_dir)
    return collect_trials(grid, spec, ctx.sweep_dir)


def objective_goals(spec: SweepSpec) -> list[Goal]:
    """The sweep's objective as ``best``'s goals: ``[(objective.metric, objective.mode)]``, or every
    listed objective (the first first: the best trial is the front's best by it)."""
    return spec.goals


def _summarise(
    spec: SweepSpec,
    trials: list[TrialResult],
    tracker: SweepTracker,
    sweep_dir: Path,
    *,
    progress: bool,
    quiet: bool,
) -> SweepResult:
    """The results table, the best trial (``best.best_trial`` by the objective, as the files, the
    MLflow tags and the parent's description have it), printed and logged on the parent run."""
    from orchestrator.results import highlights, report
    from orchestrator.results.console import searched_text

    goals = objective_goals(spec)
    rows = report.results_table([_row_input(t) for t in trials], list(spec.search), goals)
    budget = spec.objective.memory_budget_gb
    best_row = best_trial(rows, goals)
    fit_row = report.best_within(rows, budget, goals) if budget is not None else None
    best, fit = (_trial_of(trials, row) for row in (best_row, fit_row))
    table = highlights.console_table(rows, goals, str(sweep_dir / "results.csv"))  # the top rows, the front
    best_searched = searched_text(_row_input(best)["searched"]) if best else ""
    summary = report.summary_lines(rows, best_row, goals, budget, fit_row, best_searched)
    summary += highlights.front_line(rows, goals)  # a list objective: the front of every objective
    paths, compare, note = highlights.publish(tracker, rows, sweep_dir, goals, budget, spec.name, summary)
    if progress:
        print(table, flush=True)
    if progress and not quiet:
        print(summary, flush=True)
    return SweepResult(
        name=spec.name,
        sweep_dir=str(sweep_dir),
        trials=trials,
        best=best,
        best_within_budget=fit,
        mlflow_compare_url=compare,
        mlflow_compare_note=note,
        results_csv=str(paths["csv"]),
        table_text=table,
    )


def _trial_of(trials: list[TrialResult], row: dict[str, Any] | None) -> TrialResult | None:
    return next((t for t in trials if row is not None and t.trial_id == row["trial_id"]), None)


def _row_input(t: TrialResult) -> dict[str, Any]:
    searched = {k: (value_label(v) if isinstance(v, dict) else v) for k, v in t.searched.items()}
    return {
        "trial_id": t.trial_id,
        "status": t.status,
        "searched": searched,
        "metrics": t.metrics,
        "error": t.error,
    }
