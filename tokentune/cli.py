"""The Ray-free commands of ``tokentune``: train (in this process), merge, eval, methods, data preview.

The ``tokentune`` console script is ``orchestrator.cli:main``: it builds on these parsers and handlers
and adds ``sweep`` and the distributed ``train`` (a Ray Train job). ``python -m tokentune.cli`` runs
these commands alone. Heavy imports (torch, transformers, lm-eval) happen inside the handlers so that
``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tokentune.cli_eval import add_eval_parser, cmd_eval, int_at_least
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
    m.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an output folder that is not empty (after the merge succeeded; refused without it)",
    )
    return m


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
    pv.add_argument("--rows", type=int_at_least(0), default=3, help="rows to print (default 3)")
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
    try:
        result = train(cfg, resume_from=resume, progress=True)
    except FloatingPointError as e:  # a NaN/inf loss: the run stopped, nothing to debug in a traceback
        print(f"error: training stopped: {redact_text(str(e))}", file=sys.stderr)
        return 1
    except pickle.UnpicklingError as e:  # torch.load(weights_only=True) refused a file of the checkpoint
        print(f"error: {refused_load(resume, e)}", file=sys.stderr)
        return 1
    print(
        f"done: {result.steps} steps in {result.wall_s:.1f}s, val_loss {result.val_loss:.4f}, "
        f"{_memory_line(result.memory)} -> {result.final_dir}"
    )
    return 0


def refused_load(checkpoint: Any, e: Exception) -> str:
    """One line for a checkpoint file that ``torch.load(weights_only=True)`` refused (torch's own message
    is a paragraph): which checkpoint, what the unpickler found, and that nothing of it was run."""
    text = " ".join(str(e).split())
    detail = text.split("WeightsUnpickler error:", 1)[-1].split(" Check the documentation", 1)[0].strip()
    return (
        f"refused to load checkpoint {str(checkpoint)!r}: a file holds more than tensors ({detail[:160]}); "
        "weights_only loading runs no code from it: resume only from checkpoints this tool wrote"
    )


def _memory_line(memory: dict[str, float]) -> str:
    """``train memory 12.3 MiB (weights .. + grads .. + optimizer .. + activations ..)`` from ``memory/*``."""
    mib = {k.removeprefix("memory/").removesuffix("_gb"): v * 1024 for k, v in memory.items()}
    if "train" not in mib:
        return f"process RSS {mib.get('process_rss', 0):.0f} MiB"
    parts = " + ".join(f"{k} {mib[k]:.1f}" for k in ("weights", "grads", "optimizer", "activations"))
    return f"train memory {mib['train']:.1f} MiB ({parts})"


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge into a new or empty folder; a folder that holds anything is refused unless ``--overwrite``,
    which merges beside it first and replaces it only once the merge succeeded."""
    from tokentune.merge import merge_adapter

    out = Path(args.output)
    check_merge_output(Path(args.adapter), out, args.overwrite)
    if not (out.exists() or out.is_symlink()):
        out = merge_adapter(args.adapter, out, base=args.base, dtype=args.dtype)
    else:
        tmp = out.with_name(f".{out.name}.merging-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        merge_adapter(args.adapter, tmp, base=args.base, dtype=args.dtype)
        if out.is_symlink() or not out.is_dir():
            out.unlink()  # the link itself, never what it points to
        else:
            shutil.rmtree(out)
        os.replace(tmp, out)
    print(f"merged checkpoint written to {out}")
    return 0


def check_merge_output(adapter: Path, out: Path, overwrite: bool) -> None:
    """``tokentune merge``'s output must be new or empty, or ``overwrite`` given; never the adapter's own
    folder or one holding it (replacing it would delete the adapter). A ``ConfigError`` naming the folder."""
    from tokentune.errors import ConfigError

    if not (out.exists() or out.is_symlink()):
        return
    if out.resolve() == adapter.resolve() or out.resolve() in adapter.resolve().parents:
        raise ConfigError(
            f"merge: output {str(out)!r} is (or holds) the adapter folder {str(adapter)!r}: choose another folder"
        )
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() and not out.is_symlink() else [out.name]
    if entries and not overwrite:
        raise ConfigError(
            f"merge: output {str(out)!r} is not empty ({len(entries)} entries, e.g. {entries[0]!r}): give a new "
            "or empty folder, or --overwrite to replace it (once the merge succeeded)"
        )


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
