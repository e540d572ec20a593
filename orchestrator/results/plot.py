"""The sweep's plots: ``pareto.png`` (accuracy vs measured memory, the front labelled) and, for any two
metrics of the results, a scatter with a third as colour or marker size (``axes_plot``).

    pareto_plot(rows, "sweeps/s/pareto.png")                     # eval/score vs memory (the default)
    axes_plot(rows, "front.png", x="memory/train_gb", y="eval/score", colour="time/worker_hours")

A sweep whose objective lists several metrics also writes ``front.png``: its second objective on x, its
first on y, a third as colour, the front (the ``pareto`` column: every listed objective) outlined.
From the command line, on a sweep's ``results.json``::

    python -m orchestrator.results.plot sweeps/s/results.json --x time/worker_hours --y eval/score \
        --colour memory/train_gb -o sweeps/s/time.png        # or --size for marker size

Rows are ``report.results_table``'s; nothing here knows a method. Matplotlib is imported when a plot is made.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orchestrator.results.best import Goal, front, number
from orchestrator.results.report import (
    MEMORY_LABELS,
    PARETO_KEY,
    SCORE_KEY,
    memory_axis,
    methods_of,
    pareto_front,
    searched_label,
    write_csv,
    write_json,
)
from tokentune.files import write_bytes_atomic
from tokentune.redact import redact_rows

FRONT_PNG = "front.png"  # the list objective's plot, beside pareto.png


def pareto_plot(
    rows: list[dict[str, Any]],
    path: str | Path,
    score_key: str = SCORE_KEY,
    memory_key: str | None = None,
    title: str | None = None,
) -> Path:
    """Scatter of score vs measured memory, the front highlighted and labelled with its configs.

    ``memory_key`` defaults to ``memory_axis(rows)``; the x label says which memory it is (MiB when
    every value is below 1 GB).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path, rows = Path(path), redact_rows(rows)  # the labels show searched values
    memory_key = memory_key or memory_axis(rows)
    points = [
        r for r in rows if number(r.get(score_key)) is not None and number(r.get(memory_key)) is not None
    ]
    front = pareto_front(points, score_key, memory_key)
    front_ids = {id(r) for r in front}
    method_names = {m for r in rows for m in methods_of(r)}
    label = MEMORY_LABELS.get(memory_key, memory_key)
    small = memory_key.endswith("_gb") and all(number(r[memory_key]) < 1 for r in points)
    mib = 1024.0 if small else 1.0
    xlabel = label.replace(", GB", ", MiB") if small else label

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    if points:
        other = [r for r in points if id(r) not in front_ids]
        ax.scatter(
            [number(r[memory_key]) * mib for r in other],
            [number(r[score_key]) for r in other],
            c="tab:gray",
            s=36,
            label="trial",
        )
        ax.scatter(
            [number(r[memory_key]) * mib for r in front],
            [number(r[score_key]) for r in front],
            c="tab:red",
            s=60,
            marker="D",
            label="Pareto front",
            zorder=3,
        )
        ax.step(
            [number(r[memory_key]) * mib for r in front],
            [number(r[score_key]) for r in front],
            where="post",
            c="tab:red",
            alpha=0.5,
        )
        for r in front:  # only the front: at hundreds of trials labels on every point are unreadable
            ax.annotate(
                searched_label(r, method_names),
                (number(r[memory_key]) * mib, number(r[score_key])),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(
            0.5, 0.5, "no trial has both a score and a memory value yet", ha="center", transform=ax.transAxes
        )
    missing = len(rows) - len(points)
    ax.set_xlabel(xlabel + " (lower is better)")
    ax.set_ylabel(score_key + " (higher is better)")
    ax.set_title(
        (title or "Accuracy vs memory")
        + (f" ({missing} trial(s) without values not shown)" if missing else "")
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    return write_bytes_atomic(path, png.getvalue())


def write_summary_files(
    rows: list[dict[str, Any]], out_dir: Path, goals: Sequence[Goal], memory_key: str | None = None
) -> dict[str, Path]:
    """results.csv, results.json, ``pareto.png`` (accuracy vs memory) and, for a list objective,
    ``front.png``: the second listed objective on x, the first on y, the third (if any) as colour, the
    results' front outlined."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = {
        "csv": write_csv(rows, out_dir / "results.csv"),
        "json": write_json(rows, out_dir / "results.json"),
        "pareto": pareto_plot(rows, out_dir / "pareto.png", memory_key=memory_key),
    }
    if len(goals) > 1:
        colour = goals[2][0] if len(goals) > 2 else None
        out["front"] = axes_plot(rows, out_dir / FRONT_PNG, goals[1][0], goals[0][0], colour)
    return out


def mode_of(metric: str, goals: Sequence[Goal] = ()) -> str:
    """Whether higher (``max``) or lower (``min``) is better: as ``goals`` say, else ``max`` for eval/*
    and tokens_per_s, ``min`` for the rest (memory, time, loss)."""
    listed = dict(goals)
    if metric in listed:
        return listed[metric]
    return "max" if metric.startswith("eval/") or metric == "tokens_per_s" else "min"


def _marked_front(rows: list[dict[str, Any]], goals: Sequence[Goal]) -> list[dict[str, Any]]:
    """The rows the results mark (``pareto`` ``*``) when ``goals`` are the sweep's, else ``goals``' front."""
    if any(r.get(PARETO_KEY) == "*" for r in rows) and not goals:
        return [r for r in rows if r.get(PARETO_KEY) == "*"]
    return front(rows, goals) if goals else []


def axes_plot(
    rows: list[dict[str, Any]],
    path: str | Path,
    x: str,
    y: str,
    colour: str | None = None,
    size: str | None = None,
    goals: Sequence[Goal] = (),
) -> Path:
    """Scatter of metric ``y`` against ``x``; ``colour`` and/or ``size``: a third metric as the colour
    (a colour bar) or the marker area. Outlined and labelled: the front, which is the results' ``pareto``
    column unless ``goals`` are given (then their front). Rows missing a plotted value are counted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path, rows = Path(path), redact_rows(rows)
    keys = [k for k in (x, y, colour, size) if k]
    points = [r for r in rows if all(number(r.get(k)) is not None for k in keys)]
    on_front = {id(r) for r in _marked_front(points if goals else rows, goals)}
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    if points:
        _scatter(ax, fig, points, x, y, colour, size)
        names = {m for r in rows for m in methods_of(r)}
        marked = [r for r in points if id(r) in on_front]
        ax.scatter(
            [number(r[x]) for r in marked],
            [number(r[y]) for r in marked],
            s=[_area(r, size, points) * 1.8 for r in marked],
            facecolors="none",
            edgecolors="tab:red",
            linewidths=1.5,
            label="Pareto front",
            zorder=3,
        )
        for r in marked:
            ax.annotate(searched_label(r, names), (number(r[x]), number(r[y])), xytext=(4, 4), fontsize=7,
                        textcoords="offset points")  # fmt: skip
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no trial has every plotted value", ha="center", transform=ax.transAxes)
    better = {"max": "higher is better", "min": "lower is better"}
    ax.set_xlabel(f"{x} ({better[mode_of(x, goals)]})")
    ax.set_ylabel(f"{y} ({better[mode_of(y, goals)]})")
    missing = len(rows) - len(points)
    extra = ", ".join(f"{what}: {k}" for what, k in (("colour", colour), ("size", size)) if k)
    ax.set_title(
        f"{y} vs {x}"
        + (f" ({extra})" if extra else "")
        + (f"; {missing} trial(s) not shown" if missing else "")
    )
    ax.grid(alpha=0.3)
    return _save(fig, plt, path)


def _scatter(
    ax: Any, fig: Any, points: list[dict[str, Any]], x: str, y: str, colour: str | None, size: str | None
) -> None:
    values = [number(r[colour]) for r in points] if colour else None
    drawn = ax.scatter(
        [number(r[x]) for r in points],
        [number(r[y]) for r in points],
        c=values if values else "tab:gray",
        cmap="viridis" if values else None,
        s=[_area(r, size, points) for r in points],
        label="trial",
    )
    if values:
        fig.colorbar(drawn, ax=ax, label=f"{colour} ({mode_of(colour)})")


def _area(row: dict[str, Any], size: str | None, points: list[dict[str, Any]]) -> float:
    """The marker area: 36 without ``size``, else 16..200 by the row's value of ``size`` among ``points``."""
    if not size:
        return 36.0
    values = [number(r[size]) for r in points]
    low, high = min(values), max(values)
    return 16.0 + 184.0 * ((number(row[size]) - low) / (high - low) if high > low else 0.5)


def _save(fig: Any, plt: Any, path: Path) -> Path:
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    return write_bytes_atomic(path, png.getvalue())


def main(argv: list[str] | None = None) -> int:
    """``python -m orchestrator.results.plot RESULTS.json --x X --y Y [--colour C] [--size S] -o OUT``."""
    p = argparse.ArgumentParser(
        prog="python -m orchestrator.results.plot", description=__doc__.split("\n")[0]
    )
    p.add_argument("results", help="a sweep's results.json (report.results_table's rows)")
    p.add_argument("--x", default=None, help="x metric (default: the measured memory, as pareto.png)")
    p.add_argument("--y", default=SCORE_KEY, help=f"y metric (default: {SCORE_KEY})")
    p.add_argument("--colour", "--color", default=None, help="a third metric as the points' colour")
    p.add_argument("--size", default=None, help="a third metric as the markers' area")
    p.add_argument("-o", "--out", required=True, help="the PNG to write")
    args = p.parse_args(argv)
    try:
        rows = json.loads(Path(args.results).read_text())
    except (OSError, ValueError) as e:
        print(
            f"error: {args.results}: cannot read the results ({e}); expected a sweep's results.json",
            file=sys.stderr,
        )
        return 2
    columns = {k for r in rows for k in r}
    for flag in ("x", "y", "colour", "size"):
        key = getattr(args, flag)
        if key and key not in columns:
            print(
                f"error: --{flag} {key!r} is no column of {args.results}; columns: {', '.join(sorted(columns))}",
                file=sys.stderr,
            )
            return 2
    print(axes_plot(rows, args.out, args.x or memory_axis(rows), args.y, args.colour, args.size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
