"""Benchmark the methods' quality on the shipped tiny default: accuracy after equal training budgets.

    python bench/quality.py                                   # LoRA vs LoRA+TokenTune r=0.3, 200 steps, 3 seeds
    python bench/quality.py --variants lora,tokentune --ratios 0.3,0.5,0.7 --seeds 0
    python bench/quality.py --variants lora,tokentune,ist,rst --steps 200,600 --json
    python bench/quality.py --config my_run.yaml --set model.name_or_path=/models/llama --limit 200

Every run is ``examples/tiny_lora.yaml`` (or ``--config``) trained in this process with
``tokentune.train.train`` and its final adapter scored by ``tokentune.evaluate.evaluate`` on the
config's lm-eval tasks (default: the shipped ``tokentune_mini`` group, 150 documents per task). A
variant adds one method on top of the config's trainer: ``lora`` (none), ``tokentune`` at each
``--ratios``, ``ist`` / ``rst`` at each ``--budgets``. ``--seeds`` sets ``train.seed`` and the
method's own seed, so each seed is a different data order, LoRA init and token/layer draw.

The table shows, per (variant, setting, steps), the mean and sample standard deviation over seeds
of the group accuracy, each task's mean accuracy, the final validation loss and the training wall
time; ``--json`` prints one JSON object per run as well. Seed-to-seed spread is the noise to judge
a difference by; the 600-document group accuracy also has a binomial standard error of about 0.02.
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
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_CONFIG = ROOT / "examples" / "tiny_lora.yaml"
# variant -> (method added on top of the config's methods, the config key its setting goes to)
VARIANTS: dict[str, tuple[str | None, str | None]] = {
    "lora": (None, None),
    "tokentune": ("tokentune", "tokentune.ratio"),
    "ist": ("ist", "ist.budget"),
    "rst": ("rst", "rst.budget"),
}


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="run config YAML (default: %(default)s)"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)"
    )
    p.add_argument("--variants", default="lora,tokentune", help=f"comma list of {sorted(VARIANTS)}")
    p.add_argument("--ratios", type=_floats, default=[0.3], help="TokenTune ratios (default: 0.3)")
    p.add_argument("--budgets", type=_floats, default=[0.25], help="IST/RST layer budgets (default: 0.25)")
    p.add_argument("--steps", type=_ints, default=None, help="train.max_steps values (default: the config's)")
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="seeds (default: 0,1,2)")
    p.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    p.add_argument("--json", action="store_true", help="also print one JSON object per run")
    p.add_argument("--out", type=Path, default=None, help="keep run folders here (default: a temp folder)")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {sorted(VARIANTS)}")
    if not args.config.is_file():
        p.error(f"--config: no such file {args.config}")
    return args


def plan(args: argparse.Namespace, base_steps: int, base_methods: list[str]) -> list[dict[str, Any]]:
    """One entry per run: variant, setting, steps, seed and the config overrides that make it."""
    runs = []
    for steps in args.steps or [base_steps]:
        for name in args.variants:
            method, key = VARIANTS[name]
            settings = args.ratios if name == "tokentune" else args.budgets if key else [None]
            for setting in settings:
                for seed in args.seeds:
                    overrides = [f"train.max_steps={steps}", f"train.seed={seed}"]
                    if method:
                        methods = ",".join([*base_methods, method])
                        overrides += [f"methods=[{methods}]", f"{key}={setting}", f"{method}.seed={seed}"]
                    runs.append(
                        dict(variant=name, setting=setting, steps=steps, seed=seed, overrides=overrides)
                    )
    return runs


def run_one(args: argparse.Namespace, run: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    from tokentune.config import load_config
    from tokentune.evaluate import evaluate
    from tokentune.train import train

    cfg = load_config(args.config, [*args.set, *run["overrides"], f"train.output_dir={out_dir}"])
    t0 = time.perf_counter()
    result = train(cfg)
    train_s = time.perf_counter() - t0
    metrics = evaluate(result.final_dir, tasks=cfg.eval.tasks, limit=args.limit, batch_size=32)["metrics"]
    acc = {k.split("/")[1]: v for k, v in metrics.items() if k.endswith("/acc")}
    return {
        "variant": run["variant"],
        "methods": list(cfg.methods),
        "setting": run["setting"],
        "steps": run["steps"],
        "seed": run["seed"],
        "acc": acc,
        "val_loss": result.val_loss,
        "train_s": round(train_s, 1),
    }


def _group_name(acc: dict[str, float]) -> str:
    # the group row (e.g. tokentune_mini) when there is one, else the first task
    groups = [k for k in acc if not k.startswith("tt_")]
    return groups[0] if groups else next(iter(acc))


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows grouped over seeds: mean/sd of the headline accuracy, per-task means, val loss, time."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["setting"], r["steps"]), []).append(r)
    table = []
    for (variant, setting, steps), rs in groups.items():
        head = _group_name(rs[0]["acc"])
        scores = [r["acc"][head] for r in rs]
        tasks = sorted(k for k in rs[0]["acc"] if k != head)
        table.append(
            {
                "variant": variant,
                "setting": setting,
                "steps": steps,
                "seeds": len(rs),
                "metric": head,
                "acc_mean": statistics.fmean(scores),
                "acc_sd": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                "tasks": {t: statistics.fmean(r["acc"][t] for r in rs) for t in tasks},
                "val_loss": statistics.fmean(r["val_loss"] for r in rs if r["val_loss"] is not None),
                "train_s": statistics.fmean(r["train_s"] for r in rs),
            }
        )
    return table


def print_table(table: list[dict[str, Any]]) -> None:
    tasks = sorted({t for row in table for t in row["tasks"]})
    head = ["variant", "setting", "steps", "seeds", "acc (mean ± sd)", *tasks, "val_loss", "train_s"]
    lines = [head]
    for row in table:
        setting = "-" if row["setting"] is None else f"{row['setting']:g}"
        lines.append(
            [
                row["variant"],
                setting,
                str(row["steps"]),
                str(row["seeds"]),
                f"{row['acc_mean']:.3f} ± {row['acc_sd']:.3f}",
                *(f"{row['tasks'].get(t, float('nan')):.3f}" for t in tasks),
                f"{row['val_loss']:.3f}",
                f"{row['train_s']:.0f}",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for i, line in enumerate(lines):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    from tokentune.config import load_config

    base = load_config(args.config, args.set)
    runs = plan(args, base.train.max_steps, list(base.methods))
    root = args.out or Path(tempfile.mkdtemp(prefix="tt-quality-"))
    rows = []
    for i, run in enumerate(runs, 1):
        label = f"{run['variant']} {run['setting'] if run['setting'] is not None else ''} steps={run['steps']} seed={run['seed']}"
        print(f"[{i}/{len(runs)}] {label}", file=sys.stderr, flush=True)
        row = run_one(args, run, root / f"run{i:03d}")
        rows.append(row)
        print(f"    acc {row['acc']}  val_loss {row['val_loss']:.3f}  {row['train_s']:.0f}s", file=sys.stderr)
        if args.json:
            print(json.dumps(row), flush=True)
    table = summarize(rows)
    print_table(table)
    return table


if __name__ == "__main__":
    main()
