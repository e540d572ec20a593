"""The memory-levers table: a finished sweep's trials grouped by ``setup``, seeds pooled.

    python bench/levers_table.py sweeps/memory_levers            # after tokentune sweep search_spaces/memory_levers.yaml

One row per setup (``search.setup``), in the spec's order: eval/score (median over seeds and its range),
measured training memory per worker and each of its components (weights, gradients, optimizer states,
activations; MB, median over seeds), the estimate's ratio to it, ZeRO-Offload's host share, and the time
per optimizer step and per run (median), with each setup's memory and step time as a share of the first
row (plain LoRA). Reads each trial's ``status.json`` (what the sweep recorded) and ``sweep.yaml``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

PARTS = ("weights", "grads", "optimizer", "activations")


def trials_by_setup(sweep_dir: Path) -> dict[str, list[dict]]:
    """Finished trials' metrics by setup name, in the order the spec lists the setups."""
    spec = yaml.safe_load((sweep_dir / "sweep.yaml").read_text())
    setup = (spec.get("search") or {}).get("setup") or {}
    values = next(iter(setup.values())) if isinstance(setup, dict) and setup else []
    order = [v["name"] for v in values if isinstance(v, dict) and "name" in v]
    if not order:
        sys.exit(f"{sweep_dir / 'sweep.yaml'}: no search.setup: this table groups trials by setup")
    out: dict[str, list[dict]] = {name: [] for name in order}
    for status in sorted(sweep_dir.glob("trials/*/status.json")):
        done = json.loads(status.read_text())
        name = (done.get("searched") or {}).get("setup")
        name = name.get("name") if isinstance(name, dict) else name  # status.json keeps the setup's keys
        if done.get("status") == "finished" and name in out:
            out[name].append(done.get("metrics") or {})
    return out


def _median(rows: list[dict], key: str) -> float | None:
    vals = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else None


def _fmt(v: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}"


def table(groups: dict[str, list[dict]]) -> str:
    head = ["setup", "n", "eval/score (min-max)", "train MB", *(f"{p} MB" for p in PARTS)]
    head += ["est/meas", "host MB", "step s", "train s", "memory vs first", "step vs first"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    first = next(iter(groups.values()), [])
    mem0, step0 = _median(first, "memory/train_gb"), _median(first, "time/step_s")
    for name, rows in groups.items():
        scores = [float(r["eval/score"]) for r in rows if isinstance(r.get("eval/score"), (int, float))]
        score = f"{statistics.median(scores):.3f} ({min(scores):.3f}-{max(scores):.3f})" if scores else "-"
        mem, step = _median(rows, "memory/train_gb"), _median(rows, "time/step_s")
        cells = [name, str(len(rows)), score, _fmt(mem, 1024)]
        cells += [_fmt(_median(rows, f"memory/{p}_gb"), 1024) for p in PARTS]
        cells += [
            _fmt(_median(rows, "memory/estimate_ratio"), digits=2),
            _fmt(_median(rows, "memory/host_gb"), 1024),
        ]
        cells += [_fmt(step, digits=3), _fmt(_median(rows, "time/train_s"))]
        cells += [
            _fmt(mem / mem0 if mem and mem0 else None, digits=2),
            _fmt(step / step0 if step and step0 else None, digits=2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("sweep_dir", type=Path, help="a finished sweep's folder, e.g. sweeps/memory_levers")
    args = ap.parse_args(argv)
    if not (args.sweep_dir / "sweep.yaml").is_file():
        ap.error(f"{args.sweep_dir}: no sweep.yaml (expected a sweep folder such as sweeps/memory_levers)")
    print(table(trials_by_setup(args.sweep_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
