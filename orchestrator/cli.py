"""The ``tokentune`` command: train, merge, eval, sweep, methods.

Heavy imports (torch, ray, mlflow) happen inside the subcommands so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EPILOG = """\
examples:
  tokentune train examples/tiny_lora.yaml                      # one run on this machine, no Ray
  tokentune train examples/tiny_lora.yaml --set lora.rank=16 --set train.lr=3e-4
  tokentune train examples/tiny_lora.yaml --workers 2 --zero 2 # a Ray Train job, DeepSpeed ZeRO-2
  tokentune merge runs/tiny_lora/final runs/tiny_lora/merged   # adapter -> HF checkpoint
  tokentune eval runs/tiny_lora/merged --tasks tokentune_mini  # lm-eval on a checkpoint
  tokentune sweep search_spaces/quickstart.yaml --dry-run      # show the trials, resources, memory
  tokentune sweep search_spaces/quickstart.yaml                # run the sweep (local Ray + MLflow)
  tokentune sweep search_spaces/quickstart.yaml --resume       # finish a killed sweep
  tokentune methods                                            # registered methods and settings

Every config key has one name in YAML, Python and --set (e.g. train.lr, lora.rank, tokentune.ratio).
"""


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key (repeatable), e.g. --set train.lr=1e-4 --set methods=[lora,tokentune]",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokentune",
        description="Memory-efficient LLM fine-tuning (TokenTune, IST/RST, LoRA/QLoRA/DoRA, full) and "
        "Ray Tune sweeps over them, with merge + lm-eval + MLflow after each trial.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="fine-tune once from a run config (no Ray unless --workers > 1 or --zero)",
        description="Fine-tune one model from a run config YAML. With --workers > 1 or --zero the run is a "
        "Ray Train job (CPU+gloo or GPU+NCCL) under DeepSpeed ZeRO; otherwise it runs in this process.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The config's sections: model, data, train, compute, eval, methods, and one per method "
        "(lora, dora, qlora, full, tokentune, ist, rst). See README.md 'Config reference'.",
    )
    t.add_argument("config", nargs="?", help="run config YAML (omit to train the shipped tiny default)")
    _add_set(t)
    t.add_argument("--output-dir", help="where checkpoints and the final adapter/model go (train.output_dir)")
    t.add_argument(
        "--workers", type=int, help="Ray Train workers (compute.workers); > 1 runs a Ray Train job"
    )
    t.add_argument("--zero", type=int, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage (compute.zero_stage)")
    t.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        help="resume from a checkpoint dir, or the latest one in the output dir when given without a value",
    )
    t.add_argument(
        "--address", help="Ray cluster address for --workers/--zero runs (default: start a local Ray)"
    )
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    m = sub.add_parser(
        "merge",
        help="merge a peft adapter into its base: a standalone HF checkpoint",
        description="Merge a LoRA/DoRA/QLoRA adapter into its base model (reloaded in full precision, never "
        "into 4-bit weights) and save an HF checkpoint loadable with AutoModelForCausalLM.from_pretrained.",
    )
    m.add_argument("adapter", help="adapter directory (with adapter_config.json), e.g. runs/x/final")
    m.add_argument("output", help="directory for the merged checkpoint")
    m.add_argument("--base", help="base model path or hub name (default: the one recorded in the adapter)")
    m.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="merge dtype"
    )

    try:
        from orchestrator.cli_eval import add_eval_parser
    except ImportError:  # pragma: no cover - the eval subcommand ships with the tracking module
        add_eval_parser = None
    if add_eval_parser is not None:
        add_eval_parser(sub)

    s = sub.add_parser(
        "sweep",
        help="run a Ray Tune sweep from a search-space YAML",
        description="Search over TokenTune ratio, LoRA rank, IST/RST layer budget, learning rate, ... "
        "Each trial is a Ray Train job; completed trials are merged and evaluated with lm-eval; "
        "everything is logged to MLflow (a parent run per sweep, a child per trial).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Spec keys: include, name, base (a run config), search (key: {grid|choice|uniform|loguniform|"
        "randint: ...}), objective, tune, after_trial, tracking, storage. See README.md 'Sweep reference'.",
    )
    s.add_argument("spec", help="sweep YAML, e.g. search_spaces/quickstart.yaml")
    _add_set(s)
    s.add_argument("--name", help="sweep name (folder under storage; default: the spec's name)")
    s.add_argument(
        "--resume", action="store_true", help="finish an interrupted sweep; finished trials are kept"
    )
    s.add_argument(
        "--dry-run", action="store_true", help="validate and print the trials, resources and memory"
    )
    s.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")

    sub.add_parser("methods", help="list the registered methods, what they combine with and their settings")
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from tokentune.config import load_config

    overrides = list(args.set)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    if args.workers is not None:
        overrides.append(f"compute.workers={args.workers}")
    if args.zero is not None:
        overrides.append(f"compute.zero_stage={args.zero}")
    cfg = load_config(args.config, overrides)
    cfg.train.output_dir = str(Path(cfg.train.output_dir).resolve())
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    distributed = cfg.compute.workers > 1 or cfg.compute.zero_stage is not None
    if distributed:
        from orchestrator.train_job import init_ray, run_train_job

        init_ray(args.address)
        res = run_train_job(
            cfg,
            name=Path(cfg.train.output_dir).name,
            storage_path=str(Path(cfg.train.output_dir).parent / "ray"),
        )
        if getattr(res, "error", None):
            print(f"error: training failed: {res.error}", file=sys.stderr)
            return 1
        print(json.dumps({"final_dir": res.final_dir, **{k: v for k, v in res.metrics.items()}}, default=str))
        return 0

    from tokentune.train import latest_checkpoint, train

    resume = args.resume
    if resume == "latest":
        resume = latest_checkpoint(cfg.train.output_dir)
        if resume is None:
            print(f"no checkpoint in {cfg.train.output_dir}; starting from scratch", file=sys.stderr)
    print(f"training {cfg.methods} -> {cfg.train.output_dir}", flush=True)
    result = train(cfg, resume_from=resume, progress=True)
    print(
        f"done: {result.steps} steps in {result.wall_s:.1f}s, val_loss {result.val_loss:.4f}, "
        f"peak memory {result.peak_memory_bytes / 2**20:.0f} MiB -> {result.final_dir}"
    )
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from tokentune.merge import merge_adapter

    out = merge_adapter(args.adapter, args.output, base=args.base, dtype=args.dtype)
    print(f"merged checkpoint written to {out}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from orchestrator.api import run_sweep

    result = run_sweep(
        args.spec,
        overrides=args.set,
        name=args.name,
        resume=args.resume,
        dry_run=args.dry_run,
        address=args.address,
    )
    if args.dry_run:
        print(result.plan_text)
        return 0
    failed = [t for t in result.trials if t.status != "finished"]
    print(
        f"sweep {result.name}: {len(result.trials) - len(failed)} finished, {len(failed)} failed -> {result.sweep_dir}"
    )
    if result.best is not None:
        print(f"best trial: {result.best.trial_id} {json.dumps(result.best.metrics, default=str)[:300]}")
    return 0 if result.trials and len(failed) < len(result.trials) else 1


def cmd_methods(_: argparse.Namespace) -> int:
    import dataclasses

    from tokentune.methods import REGISTRY

    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        parts = [f"kind={cls.kind}"]
        if cls.requires_any:
            parts.append(f"requires one of {list(cls.requires_any)}")
        if cls.conflicts:
            parts.append(f"conflicts with {list(cls.conflicts)}")
        print(f"{name:10s} {', '.join(parts)}")
        for f in dataclasses.fields(cls.config_cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            print(f"    {name}.{f.name} = {default!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    from tokentune.config import ConfigError

    handlers = {"train": cmd_train, "merge": cmd_merge, "sweep": cmd_sweep, "methods": cmd_methods}
    if args.command == "eval":
        from orchestrator.cli_eval import run_eval

        handlers["eval"] = run_eval
    try:
        return int(handlers[args.command](args) or 0)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
