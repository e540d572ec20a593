"""``tokentune eval CHECKPOINT``: lm-eval on a merged/full checkpoint or an adapter (merged first).

Registered by ``orchestrator/cli.py``; also runs alone: ``python -m orchestrator.cli_eval --help``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Run lm-eval tasks on one checkpoint and print a table of the metrics.

CHECKPOINT is a Hugging Face model folder (a merged or fully fine-tuned model, with config.json) or a
peft adapter folder (with adapter_config.json): an adapter is merged into its base model first, in a
temporary folder (or --merged-dir). Tasks are the shipped offline tasks (default: the tokentune_mini
group) or any lm-eval task name; offline, built-in tasks need their dataset in the local cache.
"""

EPILOG = """\
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


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= {minimum}")
        return value

    return parse


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
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


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``eval`` on the ``tokentune`` command's subparsers."""
    p = subparsers.add_parser(
        "eval",
        help="lm-eval on a checkpoint (an adapter is merged first)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return configure_parser(p)


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def metrics_table(results: dict[str, dict[str, float]], score: float | None = None) -> str:
    """``task  metric  value`` lines, fixed width."""
    rows = [(task, metric, f"{value:.4f}") for task, ms in results.items() for metric, value in ms.items()]
    if score is not None:
        rows.append(("(mean acc)", "eval/score", f"{score:.4f}"))
    if not rows:
        return "(no metrics)"
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(("task", "metric", "value"))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(("task", "metric", "value"), widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def evaluate_checkpoint(
    checkpoint: str | Path,
    tasks: list[str] | str | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    base: str | None = None,
    merged_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a full checkpoint, or merge an adapter (into ``merged_dir`` or a temp dir) and evaluate."""
    from orchestrator.post_trial import score_of
    from tokentune.evaluate import evaluate

    ckpt = Path(checkpoint)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint {str(ckpt)!r} is not a folder")
    kwargs = dict(tasks=tasks, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, device=device)
    if (ckpt / "adapter_config.json").is_file():
        from tokentune.merge import merge_adapter

        if merged_dir is not None:
            summary = evaluate(str(merge_adapter(ckpt, merged_dir, base=base)), **kwargs)
        else:
            with tempfile.TemporaryDirectory(prefix="tokentune-merged-") as tmp:
                summary = evaluate(str(merge_adapter(ckpt, tmp, base=base)), **kwargs)
    elif (ckpt / "config.json").is_file():
        summary = evaluate(str(ckpt), **kwargs)
    else:
        raise FileNotFoundError(
            f"checkpoint {str(ckpt)!r} has neither config.json (HF model) nor adapter_config.json (peft adapter)"
        )
    score = score_of(summary)
    if score is not None:
        summary["metrics"]["eval/score"] = score
    summary["score"] = score
    return summary


def run_eval(args: argparse.Namespace) -> int:
    """The ``tokentune eval`` command; returns the exit status (2 on a user error)."""
    try:
        summary = evaluate_checkpoint(
            args.checkpoint,
            tasks=args.tasks,
            num_fewshot=args.num_fewshot,
            limit=args.limit,
            batch_size=args.batch_size,
            device=_device(args.device),
            base=args.base,
            merged_dir=args.merged_dir,
        )
    except (ValueError, RuntimeError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(metrics_table(summary["results"], summary["score"]))
    if args.output:
        from lm_eval.utils import handle_non_serializable

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
        out.write_text(json.dumps(record, indent=2, default=handle_non_serializable) + "\n")
        print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = configure_parser(
        argparse.ArgumentParser(
            prog="tokentune eval",
            description=DESCRIPTION,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    return run_eval(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
