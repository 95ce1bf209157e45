"""Command line: ``python -m sqla_cachelayer <command>`` (also ``sqla-cachelayer``).

Commands:

``demo``
    Build a small shop on SQLite, run a mixed read/write workload through an
    installed cache layer, and print the hit ratio, the latency of cached and
    uncached reads, and whether every cached answer equalled the database's
    (exit status 1 if one did not). See :mod:`sqla_cachelayer.demo`.

::

    python -m sqla_cachelayer demo --operations 5000 --seed 7 --quiet
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the command line, one subparser per command."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="python -m sqla_cachelayer",
        description="sqla_cachelayer: a query-result cache for SQLAlchemy ORM sessions.",
    )
    parser.add_argument("--version", action="version", version=f"sqla_cachelayer {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    demo = commands.add_parser(
        "demo",
        help="run a mixed read/write workload on a SQLite shop and check every cached answer",
        description=(
            "Build a shop (categories, products, customers, orders, order items) on a "
            "SQLite file, install a cache layer from flat settings, run a mixed "
            "read/write workload, run every cached read uncached too, and report hit "
            "ratio, latencies and whether every cached answer equalled the database's. "
            "Exit status 1 if one did not."
        ),
    )
    demo.add_argument(
        "--operations",
        "-n",
        type=_positive_int,
        default=2000,
        metavar="N",
        help="reads plus writes to run (default: %(default)s)",
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=1,
        help="seed of the data and of the workload's random choices (default: %(default)s)",
    )
    demo.add_argument(
        "--db",
        metavar="PATH",
        default=None,
        help=(
            "SQLite file to use and keep; it must be new, empty or made by an earlier run "
            "of the demo, and is rebuilt (default: a file in a temporary directory, removed)"
        ),
    )
    demo.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    demo.set_defaults(handler=_run_demo)
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, DemoError, format_report, run_demo

    try:
        config = DemoConfig(
            operations=args.operations, seed=args.seed, db_path=args.db, progress=not args.quiet
        )
        report = run_demo(config)
    except DemoError as err:
        print(f"sqla_cachelayer demo: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0 if report.all_matched else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m sqla_cachelayer`` and the ``sqla-cachelayer`` script.

    Returns the exit status (0 success, 1 a cached answer differed from the
    database's, 2 bad usage).
    """
    args = build_parser().parse_args(argv)
    status: int = args.handler(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
