"""The sweep summary: a results table, CSV/JSON files, the Pareto front (the plots: ``results.plot``).

A *trial* (the input) is a dict as the sweep collects it::

    {"trial_id": "t_0001", "status": "finished",                  # only finished trials can be best
     "searched": {"methods": ["lora"], "lora.rank": 8, "train.lr": 1e-3, ...},  # dotted or nested
     "metrics": {"eval/tt_next/acc": 0.6, "eval/score": 0.55, "memory/train_gb": 0.11,
                 "memory/estimate_gb": 0.12, "tokens_per_s": 900.0, "wall_s": 41.0, "val_loss": 1.9, ...},
     "error": None}

Metric keys may also sit at the top level of the trial dict. A *row* (the output) is flat: trial id,
status, the searched values, eval scores, whether it is on the Pareto front, memory (measured and
estimated), cost and loss columns, error; redacted (``tokentune.redact.redact_rows``) wherever it is
written or shown.

The memory axis is measured, per worker (``tokentune.memory``): ``memory/cuda_peak_gb`` when every
trial ran on a GPU, else ``memory/train_gb`` (weights + gradients + optimizer state + saved
activations, the runtime excluded). ``memory_axis(rows)`` says which. Nothing here knows a method:
columns are the searched keys (or the searched keys whose values differ between trials), and a
point's label is its method list plus its searched values.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from orchestrator.results.best import Goal, best_trial, best_trials, front, number
from tokentune.files import write_json_atomic, write_text_atomic
from tokentune.redact import redact_rows
from tokentune.timing import TIME_METRICS

#: the run config's method list: the first searched column when present
METHODS_KEY = "methods"
#: searched keys that differ between trials but are not settings worth a column
IGNORED_KEYS = ("train.output_dir", "output_dir", "trial_id", "storage", "name")
TRAIN_MEMORY = "memory/train_gb"
CUDA_PEAK = "memory/cuda_peak_gb"
#: memory columns of a row, measured first; the CUDA and process peaks only where a trial has them
MEMORY_KEYS = [
    TRAIN_MEMORY,
    "memory/estimate_gb",
    "memory/estimate_ratio",
    CUDA_PEAK,
    "memory/process_rss_gb",
    "memory/host_gb",  # ZeRO-Offload's share of train_gb
]
COST_KEYS = [*MEMORY_KEYS, "tokens_per_s", "wall_s", *TIME_METRICS, "val_loss"]
OPTIONAL_KEYS = (CUDA_PEAK, "memory/process_rss_gb", "memory/host_gb", *TIME_METRICS)
SCORE_KEY = "eval/score"
PARETO_KEY = "pareto"
BEST_KEY = "best"  # "*" on the rows ``best.best_trials`` picks by the objective
SKIPPED = "skipped"  # a trial's status when its estimate was over tune.max_memory_gb (never launched)
MEMORY_LABELS = {
    TRAIN_MEMORY: "measured training memory per worker, GB (weights + grads + optimizer + activations)",
    CUDA_PEAK: "measured CUDA peak allocated per worker, GB",
}


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"lora": {"rank": 8}}`` -> ``{"lora.rank": 8}``; lists and empty mappings stay values."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def _metrics_of(trial: Mapping[str, Any]) -> dict[str, Any]:
    metrics = dict(trial.get("metrics") or {})
    for key in COST_KEYS:
        if key not in metrics and key in trial:
            metrics[key] = trial[key]
    for key, value in trial.items():
        if isinstance(key, str) and key.startswith("eval/") and key not in metrics:
            metrics[key] = value
    return metrics


def eval_score(metrics: Mapping[str, Any]) -> float | None:
    """``eval/score`` if present, else the mean of the ``eval/<task>/acc`` values."""
    if number(metrics.get(SCORE_KEY)) is not None:
        return number(metrics[SCORE_KEY])
    accs = [number(v) for k, v in metrics.items() if k.startswith("eval/") and k.endswith("/acc")]
    accs = [a for a in accs if a is not None]
    return sum(accs) / len(accs) if accs else None


def _searched_keys(searched: list[dict[str, Any]], search_keys: list[str] | None) -> list[str]:
    """``search_keys`` as given; else ``methods`` and the keys whose value differs between trials,
    the settings of the methods in the trials' method lists first (in the order the methods appear)."""
    if search_keys is not None:
        return list(search_keys)
    present = {k for c in searched for k in c}
    varying = []
    for key in sorted(present - {METHODS_KEY}):
        if key.endswith(IGNORED_KEYS):
            continue
        values = {json.dumps(c.get(key), sort_keys=True, default=str) for c in searched}
        if len(values) > 1:
            varying.append(key)
    order = list(dict.fromkeys(m for c in searched for m in methods_of(c)))
    rank = {name: i for i, name in enumerate(order)}
    varying.sort(key=lambda k: rank.get(k.split(".", 1)[0], len(order)))  # stable: sorted within a method
    return ([METHODS_KEY] if METHODS_KEY in present else []) + varying


def methods_of(config: Mapping[str, Any]) -> list[str]:
    """The method names of a flat config or row (a list, or the comma-joined text of a row)."""
    value = config.get(METHODS_KEY)
    if isinstance(value, str):
        return [m.strip() for m in value.split(",") if m.strip()]
    return [str(m) for m in value] if isinstance(value, (list, tuple)) else []


def results_table(
    trials: list[dict[str, Any]],
    search_keys: list[str] | None = None,
    goals: Sequence[Goal] = ((SCORE_KEY, "max"),),
) -> list[dict[str, Any]]:
    """One flat row per trial: trial_id, status, searched values, eval scores, cost, val_loss, error.

    Searched columns are ``search_keys`` when given (a sweep passes its searched keys), else ``methods``
    plus every searched key whose value differs between trials. Eval columns: ``eval/score`` (mean task
    accuracy), every ``eval/<task>/acc`` and the metric of each of ``goals`` (the objective) that is
    no other column. Marks: ``best`` (the rows ``best.best_trials`` picks by ``goals``) and ``pareto``
    (``front_of``). A trial skipped for its memory estimate is a row (status ``skipped``, why in ``error``).
    """
    searched = [flatten(t.get("searched") or {}) for t in trials]
    keys = _searched_keys(searched, search_keys)
    metrics = [_metrics_of(t) for t in trials]
    acc_keys = sorted({k for m in metrics for k in m if k.startswith("eval/") and k.endswith("/acc")})
    acc_keys += [g for g, _ in goals if g not in (SCORE_KEY, *acc_keys, *COST_KEYS, *keys)]
    optional = [k for k in OPTIONAL_KEYS if any(number(m.get(k)) is not None for m in metrics)]
    rows = []
    for trial, values, m in zip(trials, searched, metrics):
        row: dict[str, Any] = {"trial_id": trial.get("trial_id"), "status": trial.get("status")}
        for key in keys:
            value = values.get(key)
            row[key] = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        row[SCORE_KEY] = eval_score(m)
        for key in acc_keys:
            row[key] = number(m.get(key))
        row[BEST_KEY] = row[PARETO_KEY] = None
        for key in COST_KEYS:
            if key not in OPTIONAL_KEYS or key in optional:
                row[key] = number(m.get(key))
        row["error"] = str(trial.get("error") or "") or None
        rows.append(row)
    rows = redact_rows(rows)  # searched values, errors: every cell of every output comes from here
    front = {id(r) for r in front_of(rows, goals)}
    best = {id(r) for r in best_trials(rows, goals)}
    for row in rows:
        row[BEST_KEY], row[PARETO_KEY] = ("*" if id(row) in best else ""), ("*" if id(row) in front else "")
    return rows


def front_of(rows: list[dict[str, Any]], goals: Sequence[Goal]) -> list[dict[str, Any]]:
    """The rows ``pareto`` marks, never a skipped trial: the front of every goal when there are several
    (row order), else of accuracy (``eval/score``) vs measured memory (``pareto_front``)."""
    rows = [r for r in rows if r.get("status") != SKIPPED]
    return front(rows, goals) if len(goals) > 1 else pareto_front(rows, SCORE_KEY, memory_axis(rows))


def memory_axis(rows: list[dict[str, Any]]) -> str:
    """The measured memory the Pareto front uses: CUDA peak when every trial with a score has one."""
    scored = [r for r in rows if number(r.get(SCORE_KEY)) is not None] or rows
    if scored and all(number(r.get(CUDA_PEAK)) is not None for r in scored):
        return CUDA_PEAK
    return TRAIN_MEMORY


def best_within(
    rows: list[dict[str, Any]],
    budget_gb: float,
    goals: Sequence[Goal] | None = None,
    memory_key: str | None = None,
) -> dict[str, Any] | None:
    """The best finished row (``best.best_trial`` by ``goals``, default the highest ``eval/score``)
    whose measured memory is at most ``budget_gb`` (None if none fits)."""
    memory_key = memory_key or memory_axis(rows)
    fits = [r for r in rows if (m := number(r.get(memory_key))) is not None and m <= budget_gb]
    return best_trial(fits, goals or [(SCORE_KEY, "max")])


def columns_of(rows: list[dict[str, Any]]) -> list[str]:
    """Column names in first-seen order over all rows."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    return columns


def column_table(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """``{column: [cell per row]}`` with JSON-friendly cells (MLflow's table artifact)."""

    def cell(value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return None if math.isnan(value) else value
        return json.dumps(value, default=str) if isinstance(value, (list, dict)) else str(value)

    safe = redact_rows(rows)
    return {c: [cell(r.get(c)) for r in safe] for c in columns_of(safe)}


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    rows = redact_rows(rows)
    columns = columns_of(rows) or ["trial_id"]
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    return write_text_atomic(path, buf.getvalue())


def write_json(rows: list[dict[str, Any]], path: str | Path) -> Path:
    return write_json_atomic(path, redact_rows(rows))


# ------------------------------------------------------------------------------------- Pareto
def pareto_front(
    rows: list[dict[str, Any]], score_key: str = SCORE_KEY, memory_key: str = TRAIN_MEMORY
) -> list[dict[str, Any]]:
    """Rows no other row dominates (score at least as high and memory at least as low, one strictly):
    ``best.front`` over (score, max) and (memory, min), any status. Rows missing either value are left
    out. Returned by memory, lowest first; ties (equal score and memory) are all kept.
    """
    points = front(rows, [(score_key, "max"), (memory_key, "min")])
    return sorted(points, key=lambda r: (number(r[memory_key]), -number(r[score_key])))


def searched_label(row: Mapping[str, Any], method_names: set[str] | frozenset[str] = frozenset()) -> str:
    """A short label from a row's method list and searched columns (those before ``eval/score``), e.g.
    ``lora,tokentune rank=8 ratio=0.3``.

    A setting is named by its last part (``rank``), or in full where two columns share it
    (``lora.rank``, ``dora.rank``). A setting of a method in ``method_names`` (every method of the
    sweep) that is not in this row's method list is left out: it did not apply to this trial.
    """
    skip = {"trial_id", "status", "error", BEST_KEY, PARETO_KEY, METHODS_KEY, *COST_KEYS}
    active = set(methods_of(row))
    columns = list(row)
    keys = [
        k
        for k, v in row.items()
        if k not in skip
        and (SCORE_KEY not in row or columns.index(k) < columns.index(SCORE_KEY))
        and not k.startswith("eval/")
        and v not in (None, "")
        and not (k.split(".", 1)[0] in method_names and k.split(".", 1)[0] not in active)
    ]
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    parts = [str(row[METHODS_KEY])] if row.get(METHODS_KEY) not in (None, "") else []
    for key, leaf in zip(keys, leaves):
        parts.append(f"{leaf if leaves.count(leaf) == 1 else key}={_fmt(row[key])}")
    return " ".join(parts) or str(row.get("trial_id"))


# ------------------------------------------------------------------------------------ console
def summary_lines(
    rows: list[dict[str, Any]],
    best: Mapping[str, Any] | None,
    goals: Sequence[Goal],
    budget_gb: float | None = None,
    fit: Mapping[str, Any] | None = None,
    best_searched: str = "",
) -> str:
    """``best trial: <id> (<metric>=<value>, train_gb 12.3MiB measured (estimate 13.1MiB)) | <searched>``
    (``best``: the row ``best.best_trial`` picked by ``goals``) and, with ``objective.memory_budget_gb``,
    the best trial measured within it (``fit``, from ``best_within``)."""
    axis = memory_axis(rows)

    def values(row: Mapping[str, Any]) -> str:
        est = _fmt_cell("memory/estimate_gb", row.get("memory/estimate_gb")) or "?"
        parts = [f"{metric}={_fmt(row.get(metric))}" for metric, _ in goals]
        if number(row.get(axis)) is not None:
            parts.append(
                f"{axis.removeprefix('memory/')} {_fmt_cell(axis, row.get(axis))} measured (estimate {est})"
            )
        return ", ".join(parts)

    lines = []
    if best is not None:
        lines.append(
            f"best trial: {best.get('trial_id')} ({values(best)})" + (best_searched and f" | {best_searched}")
        )
    if budget_gb is not None:
        lines.append(
            f"best within objective.memory_budget_gb={budget_gb}: {fit.get('trial_id')} ({values(fit)})"
            if fit
            else f"no trial measured within objective.memory_budget_gb={budget_gb} ({axis})"
        )
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _fmt_cell(key: str, value: Any) -> str:
    x = number(value)
    if key.endswith("_gb") and x is not None:
        return f"{x * 1024:.1f}MiB" if x < 1 else f"{x:.2f}GiB"
    if key.endswith("_ratio") and x is not None:
        return f"{x:.2f}x"
    return _fmt(value)


def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None, max_cell: int = 40) -> str:
    """Plain fixed-width text, one line per row, for the console."""
    if not rows:
        return "(no trials)"
    rows = redact_rows(rows)
    columns = columns or columns_of(rows)
    cells = []
    for row in rows:
        line = []
        for c in columns:
            text = _fmt_cell(c, row.get(c)).replace("\n", " ")
            line.append(text if len(text) <= max_cell else text[: max_cell - 3] + "...")
        cells.append(line)
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    header = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    lines = [header, "  ".join("-" * w for w in widths)]
    lines += ["  ".join(text.ljust(w) for text, w in zip(line, widths)).rstrip() for line in cells]
    return "\n".join(lines)
