"""The command line: ``sqla-cachelayer COMMAND`` (also ``python -m sqla_cachelayer``).

Commands:

``demo``
    Build a small shop on SQLite, run a mixed read/write workload through an
    installed layer, and report per kind of query whether the cache paid off
    (see :mod:`sqla_cachelayer.demo`). Exit status 1 if a cached answer
    differed from the database's.
``stats``
    What the configured backend holds, per region: entries and bytes where
    the backend counts them, the invalidation sequence and the table stamps
    (see :mod:`sqla_cachelayer.cli.report`).
``invalidate TABLE... | --all``
    Invalidate the cached results that read these tables (or all of them) in
    every process sharing the configured backend, through
    :meth:`CacheLayer.invalidate` / :meth:`CacheLayer.invalidate_all`.
``verify --for SECONDS``
    Run the staleness verifier for that long, where this version of
    ``sqla_cachelayer`` provides one (``sqla_cachelayer.verify.run_verifier``);
    otherwise say that it is unavailable and exit with status 2.

``stats``, ``invalidate`` and ``verify`` read the application's settings file
(``--config app.ini [--section app:main]``, or a ``.toml`` file; see
:mod:`sqla_cachelayer.cli.config`). ``--json`` prints one JSON document for
scripts.

Exit status: 0 done; 1 the work failed (a backend could not be written or
read, a cached answer differed); 2 bad usage, or a missing or unreadable
file, section or key (one line on stderr naming it).
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

import click

from .config import SettingsFileError, read_settings, require_keys

__all__ = ["cli", "main"]

PROG = "sqla-cachelayer"
#: environment variable giving ``--config`` when the option is not used
CONFIG_ENVVAR = "SQLA_CACHELAYER_CONFIG"

F = TypeVar("F", bound=Callable[..., Any])


class CommandError(click.ClickException):
    """Bad usage or settings: one line (``sqla-cachelayer: ...``) on stderr, status 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"{PROG}: {self.format_message()}", err=True)


class CommandFailed(CommandError):
    """The work itself failed (a backend could not be written): status 1."""

    exit_code = 1


def _fail(message: str, exit_code: int = 2) -> NoReturn:
    raise (CommandFailed if exit_code == 1 else CommandError)(message)


def _config_options(fn: F) -> F:
    """``--config``, ``--section`` and ``--json``, shared by the commands that read settings."""
    fn = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")(fn)
    fn = click.option(
        "--section",
        metavar="NAME",
        default=None,
        help="Section of an ini file (default: app:main), or dotted table of a TOML file "
        "(default: the whole document).",
    )(fn)
    fn = click.option(
        "--config",
        "config_path",
        metavar="FILE",
        envvar=CONFIG_ENVVAR,
        show_envvar=True,
        default=None,
        help="The application's settings file: ini (Pyramid/Paste) or .toml.",
    )(fn)
    return fn


def _load(config_path: str | None, section: str | None) -> tuple[dict[str, str], str]:
    """The settings and a label naming where they came from (for messages)."""
    if config_path is None:
        _fail(f"no settings file: give --config FILE (or set {CONFIG_ENVVAR})")
    try:
        settings = read_settings(config_path, section)
    except SettingsFileError as err:
        _fail(str(err))
    if config_path.endswith(".toml"):
        where = f"{config_path} [{section}]" if section else config_path
    else:
        where = f"{config_path} [{section or 'app:main'}]"
    return settings, where


def _backends(
    settings: Mapping[str, str], where: str, prefix: str = "cachelayer."
) -> dict[str, str]:
    """Region name -> backend name, as the file gives them; at least one is required.

    Without one the layer would make an in-process region, which a separate
    process cannot share with the application: that is a missing key here.
    """
    start, end = prefix + "regions.", ".backend"
    found = {
        key[len(start) : -len(end)]: value.strip()
        for key, value in settings.items()
        if key.startswith(start) and key.endswith(end) and key.count(".") == start.count(".") + 1
    }
    if not found:
        _fail(f"{where}: missing key {start}<name>{end}")
    return found


def _layer(settings: Mapping[str, str], where: str) -> Any:
    from ..exc import ConfigurationError
    from ..layer import CacheLayer

    try:
        return CacheLayer.from_settings(settings)
    except ConfigurationError as err:
        _fail(f"{where}: {' '.join(str(err).split())}")


def _quiet_logging() -> None:
    # the layer logs backend errors itself; one plain line each, on stderr
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(message)s", stream=sys.stderr)


def _emit_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2, sort_keys=True, default=str))


# ---------------------------------------------------------------------------
# the group


def _version() -> str:
    from .. import __version__

    return str(__version__)


@click.group(
    name=PROG,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(_version(), "--version", prog_name="sqla_cachelayer")
def cli() -> None:
    """sqla_cachelayer: a query-result cache for SQLAlchemy ORM sessions."""


# ---------------------------------------------------------------------------
# demo


@cli.command()
@click.option(
    "--operations",
    "-n",
    type=click.IntRange(min=1),
    default=2000,
    show_default=True,
    metavar="N",
    help="Reads plus writes to run.",
)
@click.option(
    "--seed", type=int, default=1, show_default=True, help="Seed of the data and the workload."
)
@click.option(
    "--db",
    metavar="PATH",
    default=None,
    help="SQLite file to use and keep; it must be new, empty or made by an earlier run of "
    "the demo, and is rebuilt (default: a temporary file, removed).",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON document.")
@click.option(
    "--plots",
    metavar="DIR",
    default=None,
    help="Also draw the latency distributions and the hit ratio over the run as SVG files "
    "in DIR (needs matplotlib: the plots extra).",
)
def demo(
    operations: int, seed: int, db: str | None, quiet: bool, as_json: bool, plots: str | None
) -> int:
    """Run a mixed read/write workload on a SQLite shop and check every cached answer.

    Builds a shop (categories, products, customers, orders, order items) on a
    SQLite file, installs a cache layer from flat settings, runs a mixed
    read/write workload, runs every cached read uncached too, and reports per
    kind of query the hit ratio, the latencies and whether the cache paid off.
    Exit status 1 if a cached answer differed from the database's.
    """
    from ..demo import DemoConfig, DemoError, format_report, report_as_dict, run_demo, write_plots

    if plots is not None:
        try:
            importlib.import_module("matplotlib")
        except ImportError:
            _fail(
                'demo --plots: matplotlib is not installed (pip install "sqla_cachelayer[plots]")'
            )
    try:
        report = run_demo(
            DemoConfig(operations=operations, seed=seed, db_path=db, progress=not quiet)
        )
    except DemoError as err:
        _fail(f"demo: {err}")
    written = write_plots(report, plots) if plots is not None else []
    if as_json:
        _emit_json({**report_as_dict(report), "plots": written})
    else:
        click.echo(format_report(report))
        for path in written:
            click.echo(f"wrote {path}")
    return 0 if report.all_matched else 1


# ---------------------------------------------------------------------------
# stats


@cli.command()
@_config_options
@click.option(
    "--table",
    "tables",
    multiple=True,
    metavar="NAME",
    help="Also show this table's stamp (repeatable); the SQLite file and Redis list "
    "every stamp anyway.",
)
def stats(
    config_path: str | None, section: str | None, as_json: bool, tables: tuple[str, ...]
) -> int:
    """What the configured cache backend holds, per region.

    Shows the backend, entries and bytes where the backend counts them, and
    the invalidation protocol's sequence and table stamps. Hit and miss
    counters live in each application process (``layer.stats()``) and are not
    shown. Exit status 1 if a backend could not be read.
    """
    from .report import describe_layer

    _quiet_logging()
    settings, where = _load(config_path, section)
    backends = _backends(settings, where)
    layer = _layer(settings, where)
    regions = describe_layer(layer, backends, tables)
    failed = any(info["error"] for info in regions.values())
    if as_json:
        _emit_json({"config": where, "namespace": layer.namespace, "regions": regions})
    else:
        click.echo(_format_stats(where, regions))
    return 1 if failed else 0


def _count(value: Any) -> str:
    return "-" if value is None else f"{value:,}"


_MISSING = "results reading it are refused until a miss recreates it"


def _format_stats(where: str, regions: Mapping[str, Mapping[str, Any]]) -> str:
    from .report import seq_time

    lines = [f"settings: {where}"]
    for name, info in regions.items():
        expiry = info["expiration_time"]
        lines.append("")
        lines.append(
            f"region {name!r}: {info['backend']}"
            + (f", expiration {expiry:g} s" if expiry else ", no expiration")
        )
        if not info["shared"]:
            lines.append(
                "  per-process backend: its entries and stamps live inside each application "
                "process; a separate process cannot see them"
            )
            continue
        if info["error"]:
            lines.append(f"  cannot read the backend: {info['error']}")
            continue
        figures = info["backend_stats"]
        if figures:
            lines.append(
                "  entries "
                + _count(info["entries"])
                + ", bytes "
                + _count(info["bytes"])
                + "".join(
                    f", {k} {_count(v)}"
                    for k, v in sorted(figures.items())
                    if k not in ("entries", "bytes")
                )
            )
        else:
            lines.append("  entries and bytes: not counted by this backend")
        when = info["seq_time"]
        lines.append(
            f"  invalidation seq {_count(info['seq'])}"
            + (f" (last invalidation about {when})" if when else "")
        )
        stamps = info["stamps"]
        lines.append(
            "  table stamps"
            + ("" if info["stamps_complete"] else " (of the tables asked for with --table)")
            + ":"
        )
        width = max((len(t) for t in stamps), default=0)
        for table, value in stamps.items():
            if value is None:
                lines.append(f"    {table:<{width}}  missing: {_MISSING}")
            else:
                at = seq_time(value)
                lines.append(f"    {table:<{width}}  {value:,}" + (f"  ({at})" if at else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# invalidate


@cli.command()
@_config_options
@click.argument("tables", nargs=-1, metavar="TABLE...")
@click.option("--all", "everything", is_flag=True, help="Invalidate every cached result.")
def invalidate(
    config_path: str | None,
    section: str | None,
    as_json: bool,
    tables: tuple[str, ...],
    everything: bool,
) -> int:
    """Invalidate the cached results that read TABLE... (or --all of them).

    The invalidation is written to the backend, so every process sharing it
    stops serving those results at once. Exit status 1 if a region's backend
    could not be written (the results may still be served).
    """
    from .report import is_per_process

    if everything == bool(tables):
        _fail("invalidate: give table names, or --all (not both)")
    _quiet_logging()
    settings, where = _load(config_path, section)
    backends = _backends(settings, where)
    layer = _layer(settings, where)
    local = sorted(n for n, r in layer.regions.items() if is_per_process(r))
    if len(local) == len(layer.regions):
        _fail(
            f"{where}: every region uses a per-process backend ("
            + ", ".join(f"{n}: {backends.get(n, '?')}" for n in local)
            + "); a separate process cannot invalidate it"
        )
    for name in local:
        click.echo(
            f"{PROG}: region {name!r} ({backends.get(name, '?')}) lives inside each "
            "application process: not invalidated",
            err=True,
        )
    before = layer.stats().get("errors", 0)
    if everything:
        layer.invalidate_all()
    else:
        layer.invalidate(*tables)
    errors = layer.stats().get("errors", 0) - before
    shared = [n for n in layer.regions if n not in local]
    if as_json:
        _emit_json(
            {
                "config": where,
                "all": everything,
                "tables": sorted(tables),
                "regions": shared,
                "skipped_regions": local,
                "errors": errors,
            }
        )
    elif not errors:
        what = "every cached result" if everything else "results reading " + ", ".join(tables)
        click.echo(
            f"invalidated {what} in region{'s' if len(shared) > 1 else ''} "
            + ", ".join(repr(n) for n in shared)
        )
    if errors:
        _fail(
            f"{errors} region backend(s) could not record the invalidation "
            "(see the lines above); cached results may still be served",
            exit_code=1,
        )
    return 0


# ---------------------------------------------------------------------------
# verify

#: where the command looks for the verifier: a module and a callable
#: ``run_verifier(settings, seconds=...) -> Mapping[str, Any]`` returning at
#: least ``verified``, ``verified_stale`` and ``verified_nines``
VERIFIER = ("sqla_cachelayer.verify", "run_verifier")


def _find_verifier() -> Callable[..., Mapping[str, Any]] | None:
    module_name, attribute = VERIFIER
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        return None
    found = getattr(module, attribute, None)
    return found if callable(found) else None


@cli.command()
@_config_options
@click.option(
    "--for",
    "seconds",
    type=click.FloatRange(min=0, min_open=True),
    required=True,
    metavar="SECONDS",
    help="How long to verify.",
)
def verify(config_path: str | None, section: str | None, as_json: bool, seconds: float) -> int:
    """Re-check cached results against the database for SECONDS.

    Reports how many were checked (``verified``), how many differed
    (``verified_stale``) and ``verified_nines`` (-log10 of their ratio).
    Exit status 1 if a stale result was found; 2 if this version of
    sqla_cachelayer has no verifier.
    """
    _quiet_logging()
    settings, where = _load(config_path, section)
    require_keys_or_fail(settings, where, "sqlalchemy.url")
    _backends(settings, where)
    _layer(settings, where)  # bad settings are reported before anything runs
    verifier = _find_verifier()
    if verifier is None:
        from .. import __version__

        _fail(
            f"verify: the staleness verifier is not available in sqla_cachelayer "
            f"{__version__} ({'.'.join(VERIFIER)} not found); nothing was verified"
        )
    from ..exc import ConfigurationError

    try:
        result = dict(verifier(settings, seconds=seconds))
    except ConfigurationError as err:
        _fail(f"{where}: verify: {' '.join(str(err).split())}")
    if as_json:
        _emit_json({"config": where, "seconds": seconds, **result})
    else:
        click.echo(
            f"verified {_count(result.get('verified'))}, stale "
            f"{_count(result.get('verified_stale'))}, nines {result.get('verified_nines')}"
        )
    return 1 if result.get("verified_stale") else 0


def require_keys_or_fail(settings: Mapping[str, str], where: str, *keys: str) -> None:
    """:func:`~sqla_cachelayer.cli.config.require_keys`, as a one-line error."""
    try:
        require_keys(settings, where, *keys)
    except SettingsFileError as err:
        _fail(str(err))


# ---------------------------------------------------------------------------
# entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 done, 1 failed, 2 bad usage)."""
    try:
        status = cli.main(
            args=list(argv) if argv is not None else None, prog_name=PROG, standalone_mode=False
        )
    except click.ClickException as err:
        err.show()
        return err.exit_code
    except click.Abort:
        click.echo("Aborted!", err=True)
        return 1
    return status if isinstance(status, int) else 0
