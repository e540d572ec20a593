"""The last lines a finished sweep prints and its exit status (``tokentune sweep``'s end).

    lines, code = sweep_summary(result)        # what to print, then sys.exit(code)

Exit status (also in ``tokentune sweep --help`` and the README's sweep reference):

- ``0``: every trial finished (or was stopped early by the scheduler or the time limit, or skipped before
  launch for its memory estimate over ``tune.max_memory_gb``: results, not failures);
- ``1``: no trial finished: every trial failed (or none ran);
- ``2``: the spec or the command line was refused before anything ran (``error: ...``, as every command);
- ``3``: some trials failed or did not run, others finished: the last line says how many and which;
- ``130`` / ``143``: stopped by SIGINT / SIGTERM (``128 + signal``, ``orchestrator.run.interrupt``): resume it.

A leaf of ``orchestrator.results``: no Ray, no MLflow; ``orchestrator.cli`` prints what it returns.
"""

from __future__ import annotations

from orchestrator.results.mlflow_ui import serve_hint
from orchestrator.results.types import SweepResult

ALL_DONE, NONE_FINISHED, REFUSED, SOME_FAILED = 0, 1, 2, 3
#: ``tokentune sweep --help``'s note on the exit status
EXIT_STATUS_HELP = (
    "Exit status: 0 every trial finished (or was stopped early by the scheduler, or skipped: estimated over "
    "tune.max_memory_gb); 1 every trial failed "
    "(none finished); 2 the spec or command line was refused; 3 some trials failed or did not run (the last "
    "line names them); 130/143 stopped by SIGINT/SIGTERM (continue it with --resume)."
)
SHOWN_IDS = 5  # failed trials named in the last line; the rest are counted
#: outcomes that are results, not failures (``skipped``: estimated over tune.max_memory_gb, never launched)
RESULTS = ("finished", "stopped", "skipped")


def exit_status(result: SweepResult) -> int:
    """The sweep's exit status from its trials' outcomes (see the module docstring)."""
    ok = sum(t.status in RESULTS for t in result.trials)
    if not any(t.status in ("finished", "stopped") for t in result.trials):
        return NONE_FINISHED
    return ALL_DONE if ok == len(result.trials) else SOME_FAILED


def sweep_summary(result: SweepResult, quiet: bool = False) -> tuple[list[str], int]:
    """The lines printed after the results table (where to look; ``quiet``: none), then, when a trial
    failed or did not run, a last line saying so; and the exit status."""
    code = exit_status(result)
    counts = {
        s: sum(t.status == s for t in result.trials)
        for s in ("finished", "stopped", "skipped", "failed", "pending")
    }
    lines: list[str] = []
    if not quiet:
        parts = [f"{counts['finished']} finished"]
        parts += [f"{counts['stopped']} stopped early (scheduler or time limit)"] if counts["stopped"] else []
        skipped = f"{counts['skipped']} skipped (estimate over the budget tune.max_memory_gb)"
        parts += [skipped] if counts["skipped"] else []
        parts += [f"{counts['failed']} failed"] + (
            [f"{counts['pending']} not run"] if counts["pending"] else []
        )
        lines.append(f"sweep {result.name}: {', '.join(parts)} -> {result.sweep_dir}")
        if result.results_csv:
            lines.append(f"results: {result.results_csv} and pareto.png beside it")
        if result.tracking_uri and result.mlflow_compare_url:  # the compare view says which trials it lists
            what = result.mlflow_compare_note or "the trials"
            lines.append(f"MLflow: {serve_hint(result.tracking_uri)}, then compare {what} at")
            lines.append(f"  {result.mlflow_compare_url}")
        elif result.tracking_uri:  # the store was down at the sweep's end
            lines.append(f"MLflow: {serve_hint(result.tracking_uri)} (the summary is logged by --resume)")
    if code != ALL_DONE:
        lines.append(_failure_line(result, code))
    return lines, code


def _failure_line(result: SweepResult, code: int) -> str:
    """``sweep x: 2 of 6 trials failed (...): t1, t4 (exit status 3)``."""
    n = len(result.trials)
    bad = [t for t in result.trials if t.status not in RESULTS]
    if not bad:
        return f"sweep {result.name}: no trial ran (exit status {code})"
    ids = ", ".join(t.trial_id for t in bad[:SHOWN_IDS]) + (
        f" and {len(bad) - SHOWN_IDS} more" if len(bad) > SHOWN_IDS else ""
    )
    what = f"all {n} trials" if len(bad) == n else f"{len(bad)} of {n} trials"
    where = f"; their errors are in {result.results_csv}" if result.results_csv else ""
    return f"sweep {result.name}: {what} failed or did not run: {ids}{where} (exit status {code})"
