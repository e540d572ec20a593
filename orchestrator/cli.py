"""The ``tokentune`` command: ``tokentune.cli``'s Ray-free train, merge, eval and methods, plus the
commands that need Ray: ``sweep``, and ``train`` with ``--workers > 1`` or ``--zero`` (a Ray Train job).

Ray and MLflow are imported inside the handlers, so ``--help`` never imports them.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from orchestrator.results.summary import EXIT_STATUS_HELP, sweep_summary
from tokentune import cli as base
from tokentune.cli_eval import add_eval_parser
from tokentune.redact import redact_text

DESCRIPTION = (
    base.DESCRIPTION.rstrip(".")
    + " and Ray Tune sweeps over them, with merge + lm-eval + MLflow after each trial."
)
MORE_EXAMPLES = """\
  tokentune train examples/tiny_lora.yaml --workers 2 --zero 2 # a Ray Train job, DeepSpeed ZeRO-2
  tokentune sweep search_spaces/quickstart.yaml --dry-run      # show the trials, resources, memory
  tokentune sweep search_spaces/quickstart.yaml                # run the sweep (local Ray + MLflow)
  tokentune sweep search_spaces/quickstart.yaml --resume       # finish a killed sweep
"""


SPEC_KEYS = (
    "Spec keys: include, name, description, base (a run config: `tokentune methods --all`), search (key: "
    "{grid|choice|uniform|quniform|loguniform|randint|fixed: ...}), objective, tune, after_trial, tracking, "
    "storage."
)


def help_spec_lines() -> list[str]:
    """``tokentune sweep --help-spec``: each settings section of a spec, every key with default and help."""
    from orchestrator.spec.sections import SECTIONS, section_docs
    from tokentune.reference import format_lines

    lines = [SPEC_KEYS, ""]
    for name, cls in SECTIONS.items():
        lines.append(f"{name}: {(cls.__doc__ or '').strip().split(': ', 1)[-1]}")
        lines += format_lines(section_docs(name), width=44)
    return lines


class HelpSpec(argparse.Action):
    """``--help-spec``: print the spec's settings and exit, like ``--help`` (no spec file needed)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print("\n".join(help_spec_lines()))
        parser.exit()


def add_sweep_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = sub.add_parser(
        "sweep",
        help="run a Ray Tune sweep from a search-space YAML",
        description="Search over run-config keys (method settings, learning rate, ...). Each trial is a Ray "
        "Train job; completed trials are merged and evaluated with lm-eval; everything is logged to MLflow "
        "(a parent run per sweep, a child per trial).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"{SPEC_KEYS} `--help-spec` lists every setting of the sections with its default. See "
        f"README.md 'Sweep reference'.\n\n{EXIT_STATUS_HELP}",
    )
    s.add_argument("spec", help="sweep YAML, e.g. search_spaces/quickstart.yaml")
    s.add_argument(
        "--help-spec",
        action=HelpSpec,
        help="list the spec's settings sections (objective, tune, after_trial, tracking) and exit",
    )
    base.add_set(s)
    s.add_argument("--name", help="sweep name (folder under storage; default: the spec's name)")
    s.add_argument(
        "--resume", action="store_true", help="finish an interrupted sweep; finished trials are kept"
    )
    s.add_argument(
        "--dry-run", action="store_true", help="validate and print the trials, resources and memory"
    )
    s.add_argument(
        "--no-input-checks",
        action="store_true",
        help="do not check that the model, data and eval tasks exist here (a spec meant for another machine; "
        "the plan names what was not checked)",
    )
    s.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    s.add_argument("--quiet", action="store_true", help="print only the progress lines and the results table")
    s.add_argument(
        "--verbose",
        action="store_true",
        help="also stream Ray's worker logs and Tune's status tables (default: they stay in Ray's log folder)",
    )
    return s


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokentune",
        description=DESCRIPTION,
        epilog=base.epilog(MORE_EXAMPLES),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = base.add_train_parser(sub)
    train.add_argument(
        "--address", help="Ray cluster address for --workers/--zero runs (default: start a local Ray)"
    )
    base.add_merge_parser(sub)
    add_eval_parser(sub)
    add_sweep_parser(sub)
    base.add_methods_parser(sub)
    base.add_data_parser(sub)
    return parser


def train_job(cfg, args: argparse.Namespace) -> int:
    """``tokentune train`` with ``compute.workers > 1`` or a ZeRO stage: a Ray Train job."""
    from orchestrator.run.ray_cluster import init_ray
    from orchestrator.run.train_driver import run_train_job

    init_ray(args.address)
    res = run_train_job(
        cfg,
        name=Path(cfg.train.output_dir).name,
        storage_path=str(Path(cfg.train.output_dir).parent / "ray"),
    )
    if getattr(res, "error", None):
        print(f"error: training failed: {redact_text(str(res.error))}", file=sys.stderr)
        return 1
    print(json.dumps({"final_dir": res.final_dir, **res.metrics}, default=str))
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
        quiet=args.quiet,
        verbose=args.verbose,
        check_inputs=not args.no_input_checks,
    )
    if args.dry_run:
        print(result.plan_text)
        return 0
    # after the results table and the best trial (printed by the sweep itself): where to look, then,
    # when a trial failed or did not run, a last line saying so; the exit status says it too
    lines, code = sweep_summary(result, quiet=args.quiet)
    for line in lines:
        print(line)
    return code


HANDLERS = {
    **base.HANDLERS,
    "train": functools.partial(base.cmd_train, distributed=train_job),
    "sweep": cmd_sweep,
}


def main(argv: list[str] | None = None) -> int:
    """The ``tokentune`` console script. A sweep stopped by SIGTERM/SIGINT says so in one line and exits
    with the shell's ``128 + signal``."""
    from orchestrator.run.interrupt import SweepInterrupted

    try:
        return base.run(build_parser(), HANDLERS, argv)
    except SweepInterrupted as e:
        print(f"sweep {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
