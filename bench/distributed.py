"""Wall time per optimizer step under Ray Train: 1 vs 2 workers, plain PyTorch vs DeepSpeed ZeRO-2/3.

    python bench/distributed.py                       # shipped tiny Llama, lora + full, 12 steps
    python bench/distributed.py --methods lora --steps 20 --batch 8 --json

One Ray Train job per worker count runs every (method, engine) configuration in the same worker
processes (``orchestrator.run.train_driver.run_train_batch``), so start-up and imports are paid once per
job and not timed. Every worker gets ``--cpus-per-worker`` CPUs (Ray sets its thread count), the
micro-batch per worker is ``--batch``: two workers process twice the examples per step.

Columns: ``step_s`` is the median wall time between consecutive steps' reports on rank 0 (steps
after ``--warmup``, the last step excluded: it runs validation); ``examples/s`` = workers x batch /
step_s; ``init_s`` is the rest of the run (model load, engine set-up, warm-up steps, final save).
``engine``: ``plain`` = PyTorch + gradient all-reduce (no DeepSpeed), ``zero2``/``zero3`` = DeepSpeed.
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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.run.ray_cluster import init_ray  # noqa: E402
from orchestrator.run.train_driver import run_train_batch  # noqa: E402
from tokentune.config import RunConfig  # noqa: E402

ENGINES = {"plain": None, "zero2": 2, "zero3": 3}


def run_config(method: str, zero: int | None, workers: int, args, out: Path) -> RunConfig:
    return RunConfig.from_dict(
        {
            "methods": [method],
            "data": {"max_length": args.seq, "train_on_inputs": True},
            "train": {
                "max_steps": args.steps,
                "batch_size": args.batch,
                "lr": 1e-4,
                "warmup_steps": 0,
                "log_every": 1,
                "eval_batches": 1,
                "output_dir": str(out),
            },
            "compute": {"workers": workers, "zero_stage": zero, "cpus_per_worker": args.cpus_per_worker},
        }
    )


def step_times(history: list[dict], warmup: int) -> list[float]:
    t = [h["report_time"] for h in history if "report_time" in h]
    diffs = [b - a for a, b in zip(t, t[1:])]  # diffs[i]: step i+2 (1-based)
    return diffs[max(0, warmup - 1) : -1] or diffs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="1,2", help="worker counts, e.g. 1,2")
    p.add_argument("--engines", default="plain,zero2,zero3", help=f"subset of {','.join(ENGINES)}")
    p.add_argument("--methods", default="lora,full", help="trainer methods, e.g. lora,full,dora")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="steps not timed")
    p.add_argument("--batch", type=int, default=4, help="micro-batch per worker")
    p.add_argument("--seq", type=int, default=64, help="data.max_length")
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object per row as well")
    args = p.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    engines = args.engines.split(",")
    methods = args.methods.split(",")

    init_ray(num_cpus=max(os.cpu_count() or 2, max(workers) * int(args.cpus_per_worker)))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        for n in workers:
            keys = [(m, e) for m in methods for e in engines]
            cfgs = [run_config(m, ENGINES[e], n, args, Path(tmp) / f"{m}-{e}-{n}") for m, e in keys]
            t0 = time.perf_counter()
            results = run_train_batch(cfgs, name=f"bench-{n}w", storage_path=str(Path(tmp) / "ray"))
            job_s = time.perf_counter() - t0
            for (m, e), r in zip(keys, results):
                if r.error is not None:
                    rows.append({"workers": n, "method": m, "engine": e, "error": str(r.error)[:200]})
                    continue
                times = step_times(r.history, args.warmup)
                step_s = statistics.median(times)
                wall = r.metrics.get("wall_s", float("nan"))
                rows.append(
                    {
                        "workers": n,
                        "method": m,
                        "engine": e,
                        "step_s": step_s,
                        "examples_per_s": n * args.batch / step_s,
                        "tokens_per_s": r.metrics.get("tokens_per_s", float("nan")),
                        "init_s": wall - step_s * len(times),
                        "ranks_agree": r.metrics.get("ranks_agree"),
                        "job_s": job_s,
                    }
                )
    print(
        f"\nbatch {args.batch}/worker, seq <= {args.seq}, {args.steps} steps ({args.warmup} warm-up), "
        f"{args.cpus_per_worker:g} CPU/worker, {os.cpu_count()} cores"
    )
    header = f"{'method':<6} {'engine':<6} {'workers':>7} {'step_s':>8} {'examples/s':>10} {'init_s':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<6} {r['engine']:<6} {r['workers']:>7}  error: {r['error']}")
            continue
        print(
            f"{r['method']:<6} {r['engine']:<6} {r['workers']:>7} {r['step_s']:>8.3f} "
            f"{r['examples_per_s']:>10.1f} {r['init_s']:>7.1f}"
        )
    if args.json:
        for r in rows:
            print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
