"""The ``mentor`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

import mentor

console = Console()
err = Console(stderr=True)


def _cmd_version(_args: argparse.Namespace) -> int:
    console.print(f"mentor {mentor.__version__}")
    return 0


def _cmd_losses(_args: argparse.Namespace) -> int:
    from mentor.losses import LOSSES, list_losses

    table = Table("loss", "inputs", "description", title="registered losses")
    for name in list_losses():
        table.add_row(name, LOSSES.get(name).inputs, LOSSES.describe(name))
    console.print(table)
    return 0


def _cmd_recipes(_args: argparse.Namespace) -> int:
    from mentor.recipes import list_recipes

    table = Table("recipe", "description", title="shipped recipes (mentor distill NAME)")
    for name, desc in list_recipes():
        table.add_row(name, desc)
    console.print(table)
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from mentor.config import load_config
    from mentor.run import distill

    cfg = load_config(args.recipe, args.overrides)
    result = distill(cfg, resume=args.resume)
    m = result.metrics
    if "student_accuracy" in m:
        if "teacher_accuracy" in m:
            console.print(f"teacher accuracy: {m['teacher_accuracy']:.4f}")
        console.print(f"student accuracy: {m['student_accuracy']:.4f}")
        if "agreement" in m:
            console.print(f"agreement with teacher: {m['agreement']:.4f}")
    console.print(f"run directory: {result.run_dir}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mentor.demo import DEMOS, run_demo

    if args.list:
        for name, (_, desc) in DEMOS.items():
            console.print(f"{name:12s} {desc}")
        return 0
    run_demo(args.name, out=args.out, smoke=args.smoke)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands: version, losses, recipes, distill, demo)."""
    p = argparse.ArgumentParser(
        prog="mentor",
        description="Knowledge distillation: train a small student to imitate a large teacher.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("version", help="print the mentor version")
    s.set_defaults(fn=_cmd_version)
    s = sub.add_parser("losses", help="list every registered distillation loss")
    s.set_defaults(fn=_cmd_losses)
    s = sub.add_parser("recipes", help="list the shipped recipes")
    s.set_defaults(fn=_cmd_recipes)
    s = sub.add_parser(
        "distill",
        help="run a recipe: mentor distill RECIPE [key=value ...]",
        description="Run a recipe (shipped name or YAML path) with dotted overrides, "
        "e.g. mentor distill digits train.lr=3e-4 objective.kd.temperature=2",
    )
    s.add_argument("recipe", help="shipped recipe name (see `mentor recipes`) or a YAML file")
    s.add_argument("overrides", nargs="*", help="dotted overrides such as train.lr=3e-4")
    s.add_argument("--resume", action="store_true", help="continue the run in output.dir")
    s.set_defaults(fn=_cmd_distill)
    s = sub.add_parser("demo", help="the end-to-end demo (teacher, baseline, distilled student)")
    s.add_argument("name", nargs="?", default=None, help="which demo (default: the main one)")
    s.add_argument("--list", action="store_true", help="list the available demos")
    s.add_argument("--out", default="runs/demo", help="where the demo writes its runs")
    s.add_argument("--smoke", action="store_true", help="a few steps only (for tests)")
    s.set_defaults(fn=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mentor`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 0
    try:
        return args.fn(args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, TypeError) as e:
        if os.environ.get("MENTOR_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
        err.print("(set MENTOR_DEBUG=1 for the full traceback)", style="dim")
        return 2


if __name__ == "__main__":
    sys.exit(main())
