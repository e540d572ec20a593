"""What a reader is shown of a sweep's results at any number of trials: the top rows by the objective and
the Pareto front, and the count of the rest (every row is in results.csv and the parent run's
``results_table.json``).

    shown = shown_rows(rows, goals)                  # the top TOP_ROWS by the objective + the front
    print(console_table(rows, goals, "sweeps/s/results.csv"))
    ids, note = compare_selection(rows, goals)       # the compare view: the front, else the top 20
    text = description("s", rows, goals, best_line, link)   # the parent's description, under 8000 chars

Nothing is cut without a word: each says how many rows it leaves out and where the full table is.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orchestrator.results.best import Goal, number
from orchestrator.results.mlflow_ui import sweep_description
from orchestrator.results.report import PARETO_KEY, format_table
from tokentune.redact import redact_text

log = logging.getLogger(__name__)

Row = dict[str, Any]
TOP_ROWS = 20  # rows by the objective in the console and the parent's description
COMPARE_RUNS = 20  # runs in the compare view's URL (the UI loads every run it names)
MAX_DESCRIPTION = 8000  # MLflow's limit on a tag value (the description is the tag mlflow.note.content)


def ranked(rows: Sequence[Row], goals: Sequence[Goal]) -> list[Row]:
    """Rows by the objective's first goal, best first: finished rows with a value, then the other rows
    with a value, then the rest (each group keeps row order on ties)."""
    metric, mode = goals[0]

    def key(row: Row) -> tuple[int, float]:
        value = number(row.get(metric))
        if value is None:
            return (2, 0.0)
        return (0 if row.get("status") == "finished" else 1, -value if mode == "max" else value)

    return sorted(rows, key=key)


def shown_rows(rows: Sequence[Row], goals: Sequence[Goal], top: int = TOP_ROWS) -> list[Row]:
    """The first ``top`` rows by the objective and every row of the Pareto front (``pareto`` ``*``), in
    objective order; all rows when there are at most ``top``."""
    if len(rows) <= top:
        return list(rows)
    order = ranked(rows, goals)
    keep = {id(r) for r in order[:top]} | {id(r) for r in rows if r.get(PARETO_KEY) == "*"}
    return [r for r in order if id(r) in keep]


def front_line(rows: Sequence[Row], goals: Sequence[Goal], shown: int = TOP_ROWS) -> str:
    """For a list objective, ``\nPareto front over eval/score max, memory/train_gb min: 3 of 8 trials
    (t1, t4, t6)`` (the best trial above is the front's best by the first listed objective); else ''."""
    if len(goals) < 2:
        return ""
    ids = [str(r.get("trial_id")) for r in ranked(rows, goals) if r.get(PARETO_KEY) == "*"]
    listed = ", ".join(f"{m} {d}" for m, d in goals)
    more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
    return f"\nPareto front over {listed}: {len(ids)} of {len(rows)} trials ({', '.join(ids[:shown])}{more})"


def rest_line(shown: int, total: int, where: str = "results.csv") -> str:
    """``... and 980 more trial(s) not shown (...); the full table is in results.csv`` ('' if none)."""
    if shown >= total:
        return ""
    return (
        f"... and {total - shown} more trial(s) not shown (shown: {shown} of {total}, the best by the "
        f"objective and the Pareto front); the full table is in {where}"
    )


def console_table(rows: Sequence[Row], goals: Sequence[Goal], where: str = "results.csv") -> str:
    """The console's results table: ``shown_rows`` and, when rows are left out, how many and where."""
    shown = shown_rows(rows, goals)
    more = rest_line(len(shown), len(rows), where)
    return format_table(shown) + (f"\n{more}" if more else "")


def compare_selection(
    rows: Sequence[Row], goals: Sequence[Goal], limit: int = COMPARE_RUNS
) -> tuple[list[str], str]:
    """(trial ids, what they are) for the compare view: the Pareto front (its best ``limit`` by the
    objective when larger), else the top ``limit`` by the objective; every trial when there are at most
    ``limit``."""
    n = len(rows)
    if n <= limit:
        return [str(r.get("trial_id")) for r in rows], f"the {n} trial(s)"
    order = ranked(rows, goals)
    front = [r for r in order if r.get(PARETO_KEY) == "*"]
    if front:
        picked = front[:limit]
        what = (
            "the Pareto front"
            if len(front) <= limit
            else f"the best {limit} of the {len(front)} on the front"
        )
    else:
        picked, what = order[:limit], f"the top {limit} by {goals[0][0]}"
    return [str(r.get("trial_id")) for r in picked], f"{what} ({len(picked)} of {n} trials)"


def description(
    name: str,
    rows: Sequence[Row],
    goals: Sequence[Goal],
    best_line: str,
    full_table: str = "the artifact results.csv",
    limit: int = MAX_DESCRIPTION,
) -> str:
    """The parent run's description (markdown): the best trial, the table of ``shown_rows`` (fewer rows
    until it fits ``limit``, the code fence kept), how many rows it leaves out, and where the full table
    is: ``full_table`` (a link to the parent's artifact)."""
    shown = shown_rows(rows, goals)
    while True:
        more = rest_line(len(shown), len(rows), full_table) or f"The full table: {full_table}"
        text = sweep_description(name, format_table(shown), best_line, more)
        if len(text) <= limit or not shown:
            return text if len(text) <= limit else text[: limit - 4] + "\n```"
        shown = shown[: max(0, len(shown) - max(1, len(shown) // 8))]


# ---- on the parent run -------------------------------------------------------------------------------------
def publish(
    tracker: Any,
    rows: list[Row],
    out_dir: str | Path,
    goals: Sequence[Goal],
    budget_gb: float | None,
    name: str,
    best_line: str,
) -> tuple[dict[str, Path], str | None, str]:
    """Write results.csv/json and pareto.png, log them on the parent run with its description, and make
    the compare view's URL: (paths, URL, what it lists). The files are written whatever happens; a
    tracking store that is down is one warning, never a failed sweep (``--resume`` logs the summary)."""
    from orchestrator.results.mlflow_ui import artifact_link, compare_url, ui_base
    from orchestrator.results.plot import write_summary_files

    out_dir = Path(out_dir)
    try:
        link = artifact_link(tracker.experiment_id, tracker.parent_run_id, "results.csv")
        text = description(name, rows, goals, best_line, f"the parent run's artifact {link}")
        paths = tracker.log_summary(rows, out_dir, goals, memory_budget_gb=budget_gb, description=text)
        ids, note = compare_selection(rows, goals)
        runs = trial_run_ids(tracker)
        if len(goals) > 1:
            tag_front(tracker, rows, runs)
        url = compare_url(
            ui_base(tracker.tracking_uri), [runs[t] for t in ids if t in runs], tracker.experiment_id
        )
        return paths, url, note
    except Exception as err:  # noqa: BLE001 - tracking never fails a sweep whose trials ran
        log.warning(
            "MLflow: the sweep's summary was not logged (%s); --resume logs it", redact_text(str(err))
        )
    return write_summary_files(rows, out_dir, goals), None, ""  # again: the store may have failed before


FRONT_TAG = "tokentune.pareto"  # on each child run of a list objective's sweep: "true" on the front


def tag_front(tracker: Any, rows: Sequence[Row], runs: dict[str, str]) -> None:
    """A list objective: each trial's child run says whether it is on the front of every listed objective
    (``tokentune.pareto`` ``true``/``false``, set again by ``--resume``: a front can change), so the
    MLflow UI can filter ``tags.`tokentune.pareto` = 'true'``."""
    for row in rows:
        run_id = runs.get(str(row.get("trial_id")))
        if run_id:
            tracker.set_tags(run_id, {FRONT_TAG: "true" if row.get(PARETO_KEY) == "*" else "false"})


def trial_run_ids(tracker: Any) -> dict[str, str]:
    """``{trial id: run id}`` of every child run of the parent (all pages of the search)."""
    from orchestrator.results.tracking import TAG_PARENT, TAG_TRIAL

    out: dict[str, str] = {}
    token = None
    while True:
        page = tracker.client.search_runs(
            [tracker.experiment_id],
            f"tags.`{TAG_PARENT}` = '{tracker.parent_run_id}'",
            max_results=1000,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        for run in page:
            out.setdefault(run.data.tags.get(TAG_TRIAL, ""), run.info.run_id)  # the oldest of duplicates
        token = page.token
        if not token:
            return out
