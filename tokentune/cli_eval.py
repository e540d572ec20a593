"""``tokentune eval``: lm-eval on one checkpoint (an adapter is merged first), its parser and handler.

Part of the Ray-free CLI (``tokentune.cli``); heavy imports happen inside the handler.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokentune.redact import redact_text

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


def int_at_least(minimum: int) -> Callable[[str], int]:
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
        type=int_at_least(0),
        default=None,
        metavar="K",
        help="few-shot examples for tasks without a ':K' suffix (default: each task's own setting)",
    )
    p.add_argument(
        "--batch-size", type=int_at_least(1), default=8, metavar="B", help="lm-eval batch size (default: 8)"
    )
    p.add_argument(
        "--device",
        default="auto",
        help="device to evaluate on: auto (cuda when available, else cpu), cpu, cuda, cuda:1 (default: auto)",
    )
    _add_eval_files(p)
    return p


def _add_eval_files(p: argparse.ArgumentParser) -> None:
    """``tokentune eval``'s options for where the base model, the merged model and the results are."""
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
