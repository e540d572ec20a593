"""Benchmark the methods' quality on the shipped tiny default: accuracy after equal training budgets.

    python bench/quality.py                                   # LoRA vs LoRA+TokenTune r=0.3, 200 steps, 3 seeds
    python bench/quality.py --variants lora,tokentune --ratios 0.3,0.5,0.7 --seeds 0
    python bench/quality.py --variants lora,tokentune,ist,rst --steps 200,600 --json
    python bench/quality.py --config my_run.yaml --set model.name_or_path=/models/llama --limit 200
    python bench/quality.py --tasks both --variants lora,tokentune,tokentune_labelled --limit 100

Every run is ``examples/tiny_lora.yaml`` (or ``--config``) trained in this process with
``tokentune.train.train`` and its final adapter scored by ``tokentune.evaluate.evaluate`` on the
config's lm-eval tasks (default: the shipped ``tokentune_mini`` group, 150 documents per task). A
variant adds one method on top of the config's trainer: ``lora`` (none), ``tokentune`` at each
``--ratios`` (the paper's uniform rule), ``tokentune_labelled`` (the same k, ``tokentune.select:
labelled``: answer positions drawn first; ours), ``ist`` / ``rst`` at each ``--budgets``. ``--seeds``
sets ``train.seed`` and the method's own seed, so each seed is a different data order, LoRA init and
token/layer draw. ``--tasks``: ``mini`` (the config's data and tasks; default: the one-token
``tokentune_mini``), ``multi`` (trains on the shipped multi-token data, scores ``tokentune_multi``)
or ``both`` (each task set is its own training run and its own table, since the data differ).

The table shows, per (variant, setting, steps), the mean and sample standard deviation over seeds
of the group accuracy, the answer-token budget, each task's mean accuracy, the final validation
loss, the training wall time and IST's probe time within it; ``--json`` prints one JSON object per
run as well (with TokenTune's logged ``label_coverage`` and IST's final layer scores). The budget
(``ans/seq``) is the mean number of supervised answer positions per sequence that get a gradient
in a step (of ``sup/seq`` supervised ones): all of them for LoRA; for TokenTune, those inside the
selection, drawn by the method's own selection function (``select_tokens`` / ``select_labelled``,
the method's seed) on the run's first ``BUDGET_BATCHES`` training batches. Seed-to-seed spread is
the noise to judge a difference by; the 600-document group accuracy also has a binomial standard
error of about 0.02.
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
# variant -> (method added on top of the config's methods, the config key its setting goes to, extra overrides)
VARIANTS: dict[str, tuple[str | None, str | None, tuple[str, ...]]] = {
    "lora": (None, None, ()),
    "tokentune": ("tokentune", "tokentune.ratio", ("tokentune.select=uniform",)),
    "tokentune_labelled": ("tokentune", "tokentune.ratio", ("tokentune.select=labelled",)),
    "ist": ("ist", "ist.budget", ()),
    "rst": ("rst", "rst.budget", ()),
}
_DATA = "tokentune/assets/data"
# --tasks -> the config overrides of each task set (mini: the config's own data and tasks)
TASK_SETS: dict[str, list[str]] = {
    "mini": [],
    "multi": [
        f"data.train={ROOT / _DATA / 'multi_train.jsonl'}",
        f"data.val={ROOT / _DATA / 'multi_val.jsonl'}",
        "eval.tasks=[tokentune_multi]",
    ],
}
BUDGET_BATCHES = 8  # training batches the answer-token budget is drawn on


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
    p.add_argument(
        "--tasks", choices=["mini", "multi", "both"], default="mini",
        help="task set: one-token mini (the config's), multi-token multi, or both (separate trainings)",
    )  # fmt: skip
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
    args.task_sets = ["mini", "multi"] if args.tasks == "both" else [args.tasks]
    return args


def plan(args: argparse.Namespace, base_steps: int, base_methods: list[str]) -> list[dict[str, Any]]:
    """One entry per run: variant, setting, steps, seed and the config overrides that make it."""
    runs = []
    for tasks in args.task_sets:
        for steps in args.steps or [base_steps]:
            for name in args.variants:
                method, key, extra = VARIANTS[name]
                settings = args.ratios if method == "tokentune" else args.budgets if key else [None]
                for setting in settings:
                    for seed in args.seeds:
                        overrides = [f"train.max_steps={steps}", f"train.seed={seed}"]
                        if method:
                            methods = ",".join([*base_methods, method])
                            overrides += [f"methods=[{methods}]", f"{key}={setting}", f"{method}.seed={seed}"]
                            overrides += extra
                        runs.append(
                            dict(tasks=tasks, variant=name, setting=setting, steps=steps, seed=seed,
                                 overrides=overrides)
                        )  # fmt: skip
    return runs


def answer_budget(cfg: Any, n_batches: int = BUDGET_BATCHES) -> tuple[float, float]:
    """(answer positions with a gradient, supervised answer positions) per sequence, mean over the
    run's first ``n_batches`` training batches (built as ``tokentune.train`` builds them). With
    TokenTune in ``cfg.methods`` the selection is drawn by its own ``select_tokens`` /
    ``select_labelled`` from a generator seeded as the method's; otherwise every token has a gradient."""
    import torch

    from tokentune.data import StepSampler, collate, load_splits
    from tokentune.methods.tokentune.method import select_labelled, select_tokens, supervised_positions
    from tokentune.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    train_ds, _ = load_splits(cfg.data, tokenizer, seed=cfg.train.seed)
    sampler = StepSampler(len(train_ds), cfg.train.batch_size, cfg.train.seed)
    tt = cfg.tokentune if "tokentune" in cfg.methods else None
    gen = torch.Generator().manual_seed(tt.seed) if tt else None
    covered = supervised = seqs = 0
    for i in range(n_batches):
        b = collate([train_ds[j] for j in sampler.indices(i)], tokenizer.pad_token_id)
        mask, labels = b["attention_mask"], b["labels"]
        sup = supervised_positions(labels, mask)
        if tt is None:
            sel = mask.bool()
        elif tt.select == "labelled":
            sel = select_labelled(mask, labels, tt.ratio, tt.count, gen)
        else:
            sel = select_tokens(mask, tt.ratio, tt.count, gen)
        covered += int((sup & sel).sum())
        supervised += int(sup.sum())
        seqs += mask.shape[0]
    return covered / seqs, supervised / seqs


def run_one(args: argparse.Namespace, run: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    from tokentune.config import load_config
    from tokentune.evaluate import evaluate
    from tokentune.train import train

    overrides = [*TASK_SETS[run["tasks"]], *args.set, *run["overrides"], f"train.output_dir={out_dir}"]
    cfg = load_config(args.config, overrides)
    ans, sup = answer_budget(cfg)
    t0 = time.perf_counter()
    result = train(cfg)
    train_s = time.perf_counter() - t0
    metrics = evaluate(result.final_dir, tasks=cfg.eval.tasks, limit=args.limit, batch_size=32)["metrics"]
    acc = {k.split("/")[1]: v for k, v in metrics.items() if k.endswith("/acc")}
    hist = result.history or [{}]
    cover = [h["tokentune/label_coverage"] for h in hist if "tokentune/label_coverage" in h]
    last = hist[-1]  # IST's final layer scores (higher = less important) and its total probe time
    ist_scores = [last[k] for k in sorted(last) if k.startswith("ist/score/")]
    return {
        "tasks": run["tasks"],
        "variant": run["variant"],
        "methods": list(cfg.methods),
        "setting": run["setting"],
        "steps": run["steps"],
        "seed": run["seed"],
        "acc": acc,
        "answer_tokens": round(ans, 3),
        "supervised_tokens": round(sup, 3),
        "val_loss": result.val_loss,
        "train_s": round(train_s, 1),
        # cross-check of the budget: the method's own logged share of supervised positions selected
        "label_coverage": round(statistics.fmean(cover), 3) if cover else None,
        "ist_scores": [round(x, 3) for x in ist_scores] or None,
        "probe_s": round(last["ist/probe_s_total"], 2) if "ist/probe_s_total" in last else None,
    }


def _group_name(acc: dict[str, float]) -> str:
    # the group row (e.g. tokentune_mini) when there is one, else the first task
    groups = [k for k in acc if not k.startswith("tt_")]
    return groups[0] if groups else next(iter(acc))


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows grouped over seeds: mean/sd of the headline accuracy, per-task means, val loss, time."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r.get("tasks", "mini"), r["variant"], r["setting"], r["steps"]), []).append(r)
    table = []
    for (task_set, variant, setting, steps), rs in groups.items():
        head = _group_name(rs[0]["acc"])
        scores = [r["acc"][head] for r in rs]
        tasks = sorted(k for k in rs[0]["acc"] if k != head)
        table.append(
            {
                "tasks": task_set,
                "variant": variant,
                "setting": setting,
                "steps": steps,
                "seeds": len(rs),
                "metric": head,
                "acc_mean": statistics.fmean(scores),
                "acc_sd": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                "answer_tokens": statistics.fmean(r.get("answer_tokens", float("nan")) for r in rs),
                "supervised_tokens": statistics.fmean(r.get("supervised_tokens", float("nan")) for r in rs),
                "task_acc": {t: statistics.fmean(r["acc"][t] for r in rs) for t in tasks},
                "val_loss": statistics.fmean(r["val_loss"] for r in rs if r["val_loss"] is not None),
                "train_s": statistics.fmean(r["train_s"] for r in rs),
                "probe_s": statistics.fmean(r.get("probe_s") or 0.0 for r in rs),
            }
        )
    return table


def print_table(table: list[dict[str, Any]]) -> None:
    """One table per task set (their tasks differ)."""
    for i, name in enumerate(dict.fromkeys(row["tasks"] for row in table)):
        print(("\n" if i else "") + f"tasks: {name}")
        _print_rows([row for row in table if row["tasks"] == name])


def _print_rows(table: list[dict[str, Any]]) -> None:
    tasks = sorted({t for row in table for t in row["task_acc"]})
    head = ["variant", "setting", "steps", "seeds", "acc (mean ± sd)", "ans/seq", "sup/seq", *tasks,
            "val_loss", "train_s", "probe_s"]  # fmt: skip
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
                f"{row['answer_tokens']:.2f}",
                f"{row['supervised_tokens']:.2f}",
                *(f"{row['task_acc'].get(t, float('nan')):.3f}" for t in tasks),
                f"{row['val_loss']:.3f}",
                f"{row['train_s']:.0f}",
                f"{row['probe_s']:.1f}" if row["probe_s"] else "-",
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
        label = f"{run['tasks']} {run['variant']} {run['setting'] if run['setting'] is not None else ''} steps={run['steps']} seed={run['seed']}"
        print(f"[{i}/{len(runs)}] {label}", file=sys.stderr, flush=True)
        row = run_one(args, run, root / f"run{i:03d}")
        rows.append(row)
        print(
            f"    acc {row['acc']}  ans/seq {row['answer_tokens']}/{row['supervised_tokens']}  val_loss {row['val_loss']:.3f}  {row['train_s']:.0f}s",
            file=sys.stderr,
        )
        if args.json:
            print(json.dumps(row), flush=True)
    table = summarize(rows)
    print_table(table)
    return table


if __name__ == "__main__":
    main()
