"""The Ray-free commands of ``tokentune``: train (in this process), merge, eval, methods, data preview.

The ``tokentune`` console script is ``orchestrator.cli:main``: it builds on these parsers and handlers
and adds ``sweep`` and the distributed ``train`` (a Ray Train job). ``python -m tokentune.cli`` runs
these commands alone. Heavy imports (torch, transformers, lm-eval) happen inside the handlers so that
``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tokentune.redact import redact_text

DESCRIPTION = "Memory-efficient LLM fine-tuning (TokenTune, IST/RST, LoRA/QLoRA/DoRA, full)."
EXAMPLES = """\
  tokentune train examples/tiny_lora.yaml                      # one run on this machine, no Ray
  tokentune train examples/tiny_lora.yaml --set lora.rank=16 --set train.lr=3e-4
  tokentune merge runs/tiny_lora/final runs/tiny_lora/merged   # adapter -> HF checkpoint
  tokentune eval runs/tiny_lora/merged --tasks tokentune_mini  # lm-eval on a checkpoint
  tokentune methods                                            # registered methods and settings
  tokentune data preview examples/chat_lora.yaml --rows 5       # rendered rows, supervised spans marked
  tokentune methods --all                                      # ... and the run config's sections
"""
KEY_NOTE = (
    "Every config key has one name in YAML, Python and --set (e.g. train.lr, lora.rank, tokentune.ratio)."
)

EVAL_DESCRIPTION = """\
Run lm-eval tasks on one checkpoint and print a table of the metrics.

CHECKPOINT is a Hugging Face model folder (a merged or fully fine-tuned model, with config.json) or a
peft adapter folder (with adapter_config.json): an adapter is merged into its base model first, in a
temporary folder (or --merged-dir). Tasks are the shipped offline tasks (default: the tokentune_mini
group) or any lm-eval task name; offline, built-in tasks need their dataset in the local cache.
"""
EVAL_EPILOG = """\
examples:
  tokentune eval runs/tiny_lora/merged
  tokentune eval runs/tiny_lora/final --tasks tt_next,tt_antonym:3 --limit 50 --output eval.json
  tokentune eval sweeps/quickstart/trials/t_0001/merged --num-fewshot 2 --batch-size 4
"""

#: ``distributed(cfg, args) -> exit status``: runs a config that asks for more than this process
Distributed = Callable[[Any, argparse.Namespace], int]


def epilog(more_examples: str = "") -> str:
    """The top-level help's examples (``more_examples``: the orchestrator's lines) and key-name note."""
    return f"examples:\n{EXAMPLES}{more_examples}\n{KEY_NOTE}\n"


# ---- parsers ----------------------------------------------------------------------------------------
def add_set(p: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` (repeatable): one config key, named as in YAML."""
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key (repeatable), e.g. --set train.lr=1e-4 --set methods=[lora,tokentune]",
    )


def add_train_parser(sub: Any) -> argparse.ArgumentParser:
    t = sub.add_parser(
        "train",
        help="fine-tune once from a run config (no Ray unless --workers > 1 or --zero)",
        description="Fine-tune one model from a run config YAML. With --workers > 1 or --zero the run is a "
        "Ray Train job (CPU+gloo or GPU+NCCL) under DeepSpeed ZeRO; otherwise it runs in this process.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The config's sections: model, data, train, compute, eval, methods, and one per method "
        "(`tokentune methods --all` lists every key with its default). See README.md 'Config reference'.",
    )
    t.add_argument("config", nargs="?", help="run config YAML (omit to train the shipped tiny default)")
    add_set(t)
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
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return t


def add_merge_parser(sub: Any) -> argparse.ArgumentParser:
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
    return m


def _limit(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--limit {text!r}: expected an integer or a fraction in (0, 1)"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--limit {text!r}: expected a number > 0")
    return value if value < 1 else int(value)


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= {minimum}")
        return value

    return parse


def add_eval_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval",
        help="lm-eval on a checkpoint (an adapter is merged first)",
        description=EVAL_DESCRIPTION,
        epilog=EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="HF model folder (merged or full fine-tune) or peft adapter folder (merged to a temp folder first)",
    )
    p.add_argument(
        "--tasks",
        default=None,
        metavar="T1,T2:K",
        help="comma-separated task names; 'name:K' sets K few-shot examples for that task "
        "(default: the shipped tokentune_mini group: tt_category, tt_antonym, tt_next, tt_largest)",
    )
    p.add_argument(
        "--limit",
        type=_limit,
        default=None,
        metavar="N",
        help="evaluate at most N documents per task (a number < 1 is a fraction of each task; default: all)",
    )
    p.add_argument(
        "--num-fewshot",
        type=_int_at_least(0),
        default=None,
        metavar="K",
        help="few-shot examples for tasks without a ':K' suffix (default: each task's own setting)",
    )
    p.add_argument(
        "--batch-size", type=_int_at_least(1), default=8, metavar="B", help="lm-eval batch size (default: 8)"
    )
    p.add_argument(
        "--device",
        default="auto",
        help="device to evaluate on: auto (cuda when available, else cpu), cpu, cuda, cuda:1 (default: auto)",
    )
    p.add_argument(
        "--base",
        default=None,
        metavar="MODEL",
        help="base model (folder or cached hub name) for an adapter CHECKPOINT "
        "(default: base_model_name_or_path from its adapter_config.json)",
    )
    p.add_argument(
        "--merged-dir",
        default=None,
        metavar="DIR",
        help="keep the merged model of an adapter CHECKPOINT in DIR (default: a temporary folder, deleted)",
    )
    p.add_argument(
        "--output",
        default=None,
        metavar="FILE.json",
        help="also write the metrics, per-task results and lm-eval's raw output to this JSON file",
    )
    return p


def add_methods_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "methods",
        help="list the registered methods, what they combine with and their settings (--all: every config key)",
        description="List the registered methods (kind, requirements, conflicts) and each one's settings with "
        "default and help. With --all, also the run config's sections (model, data, train, compute, eval).",
    )
    p.add_argument(
        "--all",
        action="store_true",
        help="also list the run config's sections (model, data, train, compute, eval) with defaults and help",
    )
    return p


def add_data_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("data", help="look at a run config's training data (data preview)")
    actions = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    pv = actions.add_parser(
        "preview", help="print rendered rows (supervised tokens between [[ and ]]), per-row and total counts"
    )
    pv.add_argument("config", nargs="?", help="run config YAML (omit for the shipped default)")
    pv.add_argument("--rows", type=_int_at_least(0), default=3, help="rows to print (default 3)")
    add_set(pv)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The Ray-free command (``python -m tokentune.cli``): train, merge, eval, methods."""
    parser = argparse.ArgumentParser(
        prog="tokentune",
        description=DESCRIPTION,
        epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (add_train_parser, add_merge_parser, add_eval_parser, add_methods_parser, add_data_parser):
        add(sub)
    return parser


# ---- handlers ---------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace, distributed: Distributed | None = None) -> int:
    """Train in this process; a config with ``compute.workers > 1`` or a ZeRO stage goes to
    ``distributed`` (the orchestrator's Ray Train job), or is an error without one."""
    from tokentune.config import load_config
    from tokentune.errors import ConfigError

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
    if cfg.compute.workers > 1 or cfg.compute.zero_stage is not None:
        if distributed is None:
            raise ConfigError(
                f"compute.workers={cfg.compute.workers}, compute.zero_stage={cfg.compute.zero_stage} needs a "
                "Ray Train job: run it with the `tokentune` command (orchestrator), not tokentune.cli"
            )
        return distributed(cfg, args)

    from tokentune.checkpoint import latest_checkpoint
    from tokentune.train import train

    resume = args.resume
    if resume == "latest":
        resume = latest_checkpoint(cfg.train.output_dir)
        if resume is None:
            print(f"no checkpoint in {cfg.train.output_dir}; starting from scratch", file=sys.stderr)
    print(f"training {cfg.methods} -> {cfg.train.output_dir}", flush=True)
    result = train(cfg, resume_from=resume, progress=True)
    print(
        f"done: {result.steps} steps in {result.wall_s:.1f}s, val_loss {result.val_loss:.4f}, "
        f"{_memory_line(result.memory)} -> {result.final_dir}"
    )
    return 0


def _memory_line(memory: dict[str, float]) -> str:
    """``train memory 12.3 MiB (weights .. + grads .. + optimizer .. + activations ..)`` from ``memory/*``."""
    mib = {k.removeprefix("memory/").removesuffix("_gb"): v * 1024 for k, v in memory.items()}
    if "train" not in mib:
        return f"process RSS {mib.get('process_rss', 0):.0f} MiB"
    parts = " + ".join(f"{k} {mib[k]:.1f}" for k in ("weights", "grads", "optimizer", "activations"))
    return f"train memory {mib['train']:.1f} MiB ({parts})"


def cmd_merge(args: argparse.Namespace) -> int:
    from tokentune.merge import merge_adapter

    out = merge_adapter(args.adapter, args.output, base=args.base, dtype=args.dtype)
    print(f"merged checkpoint written to {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """``tokentune eval``: exit status 2 on a user error (unknown task, missing checkpoint)."""
    from tokentune.evaluate import evaluate_checkpoint, metrics_table

    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        summary = evaluate_checkpoint(
            args.checkpoint,
            tasks=args.tasks,
            num_fewshot=args.num_fewshot,
            limit=args.limit,
            batch_size=args.batch_size,
            device=device,
            base=args.base,
            merged_dir=args.merged_dir,
        )
    except (ValueError, RuntimeError, FileNotFoundError, OSError) as err:
        print(f"error: {redact_text(str(err))}", file=sys.stderr)
        return 2
    print(metrics_table(summary["results"], summary["score"]))
    if args.output:
        from lm_eval.utils import handle_non_serializable

        from tokentune.files import write_json_atomic

        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "checkpoint": str(Path(args.checkpoint).resolve()),
            "tasks": args.tasks,
            "num_fewshot": args.num_fewshot,
            "limit": args.limit,
            "metrics": summary["metrics"],
            "results": summary["results"],
            "raw": summary["raw"],
        }
        write_json_atomic(out, record, default=handle_non_serializable)
        print(f"wrote {out}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """``tokentune data preview``: a data error (a bad row, a missing column) is a ``ConfigError`` (exit 2)."""
    from tokentune.config import load_config
    from tokentune.preview import preview_text

    print(redact_text(preview_text(load_config(args.config, args.set), rows=args.rows)))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """Each method: kind, requirements, conflicts, then its settings (default and help)."""
    from tokentune import reference
    from tokentune.methods import REGISTRY

    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        parts = [f"kind={cls.kind}"]
        if cls.requires_any:
            parts.append(f"requires one of {list(cls.requires_any)}")
        if cls.conflicts:
            parts.append(f"conflicts with {list(cls.conflicts)}")
        print(f"{name:10s} {', '.join(parts)}")
        for line in reference.console_lines(name):
            print(line)
    if args.all:
        print("\nrun config:")
        for name in [reference.METHODS_KEY, *reference.run_config_sections()]:
            print(f"{name:10s} {'the method list' if name == reference.METHODS_KEY else 'section'}")
            for line in reference.console_lines(name):
                print(line)
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": cmd_train,
    "merge": cmd_merge,
    "eval": cmd_eval,
    "methods": cmd_methods,
    "data": cmd_data,
}


def run(
    parser: argparse.ArgumentParser,
    handlers: Mapping[str, Callable[[argparse.Namespace], int]],
    argv: list[str] | None = None,
) -> int:
    """Parse ``argv`` and run its command: no command prints the help (exit 2); a ``ConfigError``
    (a bad or missing config, an unknown key or value) prints ``error: ...`` (exit 2), redacted
    (``tokentune.redact``: a token or password in a URI or value never reaches the console)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    from tokentune.errors import ConfigError

    try:
        return int(handlers[args.command](args) or 0)
    except ConfigError as e:
        print(f"error: {redact_text(str(e))}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), HANDLERS, argv)


if __name__ == "__main__":
    sys.exit(main())
