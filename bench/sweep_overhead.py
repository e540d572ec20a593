"""Where a sweep's time goes: each trial's phases from its events, and the sweep's wall time against
the ideal (the training steps only, ``--concurrency`` at a time).

    python bench/sweep_overhead.py                          # 4 LoRA trials x 120 steps, 2 at a time
    python bench/sweep_overhead.py --trials 6 --steps 300   # the issue's efficiency target setting
    python bench/sweep_overhead.py --overlap true --post-cpus 0   # merge+eval beside the next training

A real sweep on the shipped tiny default (Ray Tune -> Ray Train -> merge + lm-eval -> MLflow), one
trial per LoRA rank, in a temporary folder. Per phase (``orchestrator.results.trial_status.SPANS``, the time
between two of a trial's events): the median, min and max over trials. ``overhead`` = a trial's wall
time (``trial started`` to ``post-trial finished``) minus its training steps (``train``: after the
first step to the last). The last lines compare the sweep's wall time (``run_sweep``, Ray start
included) with the ideal sum of the trials' ``train`` spans divided by ``--concurrency``, and the
training slots' busy share: the ``train`` spans over ``--concurrency`` x the sweep's wall time (on a
GPU cluster, the share of time the accelerators run training steps; CPU stands in for them here).
``queued`` is a trial's wait for a training slot (``after_trial.overlap``), not part of its overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def spec_dict(args: argparse.Namespace, storage: str) -> dict:
    return {
        "include": [str(ROOT / "search_spaces" / "_base.yaml")],
        "name": "sweep_overhead",
        "base": {
            "methods": ["lora"],
            "train": {"max_steps": args.steps, "log_every": max(1, args.steps // 10), "batch_size": 16},
            "eval": {"limit": args.eval_limit},
        },
        "search": {"lora.rank": {"grid": list(range(2, 2 + args.trials))}},
        "tune": {"max_concurrent": args.concurrency},
        "after_trial": {"overlap": args.overlap, "cpus": args.post_cpus},
        "storage": storage,
    }


def table(trials: list[dict], sweep_wall: float, concurrency: int) -> str:
    from orchestrator.results.trial_status import SPANS

    keys = [*SPANS, "overhead"]
    lines = [f"{'phase':12s} {'median s':>9s} {'min':>7s} {'max':>7s}"]
    for k in keys:
        vals = [t[f"phase/{k}_s"] for t in trials if f"phase/{k}_s" in t]
        if vals:
            lines.append(f"{k:12s} {statistics.median(vals):9.2f} {min(vals):7.2f} {max(vals):7.2f}")
    train = sum(t.get("phase/train_s", 0.0) for t in trials)
    ideal = train / concurrency
    lines.append(
        f"\nsweep wall {sweep_wall:.1f}s; ideal (sum of training steps {train:.1f}s / {concurrency}) "
        f"{ideal:.1f}s; wall/ideal {sweep_wall / max(ideal, 1e-9):.2f}x; "
        f"fixed overhead per trial (median) {statistics.median(t['phase/overhead_s'] for t in trials):.1f}s; "
        f"training slots busy {train / (concurrency * sweep_wall):.0%} of the wall time"
    )
    return "\n".join(lines)


def _overlap(text: str) -> str | bool:
    return {"true": True, "false": False}.get(text.lower(), text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--eval-limit", type=int, default=50)
    p.add_argument(
        "--overlap", type=_overlap, default="auto", help="after_trial.overlap: auto (GPU only), true, false"
    )
    p.add_argument(
        "--post-cpus", type=float, default=1.0, help="after_trial.cpus (0: merge+eval beside training)"
    )
    p.add_argument("--json", action="store_true", help="print each trial's phases as JSON too")
    args = p.parse_args(argv)

    from orchestrator import run_sweep
    from orchestrator.spec.sweep import load_spec

    with tempfile.TemporaryDirectory() as tmp:
        spec = load_spec(spec_dict(args, tmp))
        t0 = time.perf_counter()
        res = run_sweep(spec, progress=False)
        wall = time.perf_counter() - t0
    done = [t.metrics for t in res.trials if t.status == "finished"]
    print(
        f"{len(done)}/{len(res.trials)} trials finished; {args.trials} x {args.steps} steps, {args.concurrency} at a "
        f"time; after_trial overlap {args.overlap}, cpus {args.post_cpus:g}"
    )
    if not done or not all("phase/overhead_s" in m for m in done):
        print("no phase timings (a trial failed before its events were complete)")
        return 1
    print(table(done, wall, args.concurrency))
    if args.json:
        for m in done:
            print(json.dumps({k: v for k, v in m.items() if k.startswith("phase/")}))
    return 0 if len(done) == len(res.trials) else 1


if __name__ == "__main__":
    sys.exit(main())
