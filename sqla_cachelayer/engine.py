"""Engines tuned for concurrency: SQLite pragmas, BEGIN control, pool defaults.

:func:`engine_from_config` is SQLAlchemy's :func:`sqlalchemy.engine_from_config`
(same signature, same ``sqlalchemy.*`` keys, same meaning) with three things
added:

* **SQLite pragmas** on every new DBAPI connection: WAL for file databases,
  ``synchronous=NORMAL``, ``busy_timeout``, ``foreign_keys=ON`` and a few cache
  settings (:data:`TUNED_PRAGMAS`).  Each one is overridden by a
  ``sqlalchemy.pragma.<name>`` key; the name and the value are checked when the
  engine is built.
* **SQLite transactions**: pysqlite's legacy transaction control (which runs a
  ``SELECT`` outside any transaction, so read-modify-write units of work lose
  updates) is switched off and the engine issues its own ``BEGIN`` for each
  transaction, just before its first statement.  ``sqlalchemy.begin_mode``
  chooses ``deferred`` (the default: a transaction that only reads never
  takes the write lock), ``immediate`` or ``exclusive``; the execution option
  ``sqlite_begin_mode`` overrides it for one connection, session or engine
  copy.  Under ``deferred``, a transaction declared as writing
  (``sqlite_write_intent``, set by ``run_in_transaction``) or whose first
  statement is a locking read (``with_for_update()``) begins ``IMMEDIATE``.
* **Forks**: a process forked from one that built the engine gets a new, empty
  pool (``engine.dispose(close=False)`` in the child), never its parent's
  connections.
* **Pool defaults** per kind of URL (file SQLite, private ``:memory:``,
  PostgreSQL, MySQL/MariaDB), each overridden by the usual ``sqlalchemy.pool_*``
  keys.

Bad settings raise :class:`~sqla_cachelayer.exc.ConfigurationError` naming the
key, from :func:`engine_from_config` itself, never at the first query.

This module knows nothing of the cache; ``docs/engine.md`` gives the reasons
for each default and the measurements behind them.

Example::

    >>> from sqla_cachelayer.engine import engine_from_config
    >>> engine = engine_from_config({"sqlalchemy.url": "sqlite:///app.db"})
    >>> with engine.connect() as conn:
    ...     conn.exec_driver_sql("PRAGMA journal_mode").scalar()
    'wal'
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

import sqlalchemy
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy import pool as sa_pool
from sqlalchemy.engine import URL, Connection, Engine, ExceptionContext, make_url

from sqla_cachelayer._coerce import parse_bool
from sqla_cachelayer._fork import at_fork_in_child, renew_after_fork
from sqla_cachelayer.exc import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine
    from sqlalchemy.pool import ConnectionPoolEntry, PoolResetState

__all__ = [
    "BEGIN_MODES",
    "BEGIN_MODE_OPTION",
    "DEFAULT_BEGIN_MODE",
    "TUNED_PRAGMAS",
    "WRITE_INTENT_OPTION",
    "async_engine_from_config",
    "engine_from_config",
    "pool_defaults",
]

log = logging.getLogger(__name__)

BeginMode = Literal["deferred", "immediate", "exclusive"]

#: The values of ``sqlalchemy.begin_mode`` and of the ``sqlite_begin_mode``
#: execution option.
BEGIN_MODES: Final[tuple[BeginMode, ...]] = ("deferred", "immediate", "exclusive")

#: A transaction that only reads must never take the write lock: in WAL mode it
#: then reads beside the writer instead of queueing behind it.  Units of work
#: that read in order to write take the lock up front instead: those run by
#: ``run_in_transaction`` (:data:`WRITE_INTENT_OPTION`) and those whose first
#: statement is a locking read (``with_for_update()``).  docs/engine.md has the
#: measurements behind the choice.
DEFAULT_BEGIN_MODE: Final[BeginMode] = "deferred"

#: Execution option choosing the BEGIN of one connection, session or engine copy,
#: e.g. ``session.connection(execution_options={"sqlite_begin_mode": "immediate"})``
#: for a unit of work that reads, then writes what it computed.
BEGIN_MODE_OPTION: Final = "sqlite_begin_mode"

#: Execution option saying that a connection's transactions read in order to
#: write (``True``): they begin at least ``IMMEDIATE``, whatever the begin mode
#: (``exclusive`` stays exclusive).  :func:`~sqla_cachelayer.run_in_transaction`
#: sets it on the session's connection.
WRITE_INTENT_OPTION: Final = "sqlite_write_intent"

# Keys in a pool record's info, each about the transaction open on that DBAPI
# connection and dropped when it ends:
# - the thread whose write-lock transaction is open on it;
_WRITE_LOCK_KEY: Final = "sqla_cachelayer.write_lock_thread"
# - that its first statement must issue BEGIN first;
_PENDING_BEGIN_KEY: Final = "sqla_cachelayer.pending_begin"
# - the mode of the BEGIN issued, and a weak reference to the execution
#   context of the statement it preceded;
_OPEN_MODE_KEY: Final = "sqla_cachelayer.begin_mode"
_FIRST_STATEMENT_KEY: Final = "sqla_cachelayer.first_statement"
# - the mode of a BEGIN that just failed, for the error's message;
_FAILED_BEGIN_KEY: Final = "sqla_cachelayer.failed_begin"
# - the engine's writer gate, when this transaction holds it.
_GATE_KEY: Final = "sqla_cachelayer.gate"
_TRANSACTION_KEYS: Final = (
    _PENDING_BEGIN_KEY,
    _OPEN_MODE_KEY,
    _FIRST_STATEMENT_KEY,
    _FAILED_BEGIN_KEY,
)

_SQLITE_BUSY_SNAPSHOT: Final = 517  # SQLITE_BUSY | (2 << 8)

_BEGIN_SQL: Final[Mapping[str, str]] = {
    "deferred": "BEGIN DEFERRED",
    "immediate": "BEGIN IMMEDIATE",
    "exclusive": "BEGIN EXCLUSIVE",
}

#: Pragmas set on every new SQLite connection, in this order, unless overridden
#: by ``sqlalchemy.pragma.<name>`` (an empty value leaves SQLite's own default).
#: ``busy_timeout`` comes first so that switching to WAL waits for a lock held
#: by another process instead of failing.
TUNED_PRAGMAS: Final[Mapping[str, str]] = {
    # pysqlite's own default timeout, as milliseconds: what a writer waits for
    # the write lock before "database is locked".
    "busy_timeout": "5000",
    # Readers never block the writer, and the writer never blocks readers.
    "journal_mode": "WAL",
    # In WAL mode NORMAL is durable against application crashes and keeps the
    # database consistent on power loss, without an fsync per commit.
    "synchronous": "NORMAL",
    "foreign_keys": "ON",
    # 16 MiB of page cache per connection (negative means KiB).
    "cache_size": "-16384",
    "temp_store": "MEMORY",
    # Reads through a 256 MiB memory map are shared by every connection of the
    # host through the OS page cache instead of copied into each one.
    "mmap_size": "268435456",
    # Without a limit the WAL file keeps the size of the largest transaction.
    "journal_size_limit": "67108864",
}

# Pragmas that mean nothing for a private in-memory database.
_FILE_ONLY_PRAGMAS: Final = frozenset({"journal_mode", "mmap_size", "journal_size_limit"})


# --- value checking --------------------------------------------------------------------------


def _as_int(value: object, *, minimum: int | None = None) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
        number = int(value)
    else:
        raise ValueError(f"expected an integer, got {value!r}")
    if minimum is not None and number < minimum:
        raise ValueError(f"expected an integer >= {minimum}, got {value!r}")
    return number


def _as_float(value: object, *, minimum: float | None = None) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(f"expected a finite number, got {value!r}")
    if minimum is not None and number < minimum:
        raise ValueError(f"expected a number >= {minimum}, got {value!r}")
    return number


def _as_bool(value: object) -> bool:
    if isinstance(value, (bool, str)) or (isinstance(value, int) and value in (0, 1)):
        parsed = parse_bool(value)
        if parsed is not None:
            return parsed
    raise ValueError(f"expected true or false, got {value!r}")


def _as_bool_or_debug(value: object) -> bool | str:
    if isinstance(value, str) and value.strip().lower() == "debug":
        return "debug"
    return _as_bool(value)


def _as_choice(value: object, choices: tuple[str, ...]) -> str:
    if isinstance(value, str) and value.strip().lower() in choices:
        return value.strip().lower()
    raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")


# Each checker turns a setting into the literal written after "PRAGMA name =",
# or raises ValueError saying what it expected.
_PragmaChecker = Callable[[object], str]


def _pragma_int(minimum: int | None = None) -> _PragmaChecker:
    return lambda value: str(_as_int(value, minimum=minimum))


def _pragma_bool(value: object) -> str:
    return "ON" if _as_bool(value) else "OFF"


def _pragma_choice(*choices: str) -> _PragmaChecker:
    return lambda value: _as_choice(value, choices).upper()


def _pragma_page_size(value: object) -> str:
    number = _as_int(value)
    if number < 512 or number > 65536 or number & (number - 1):
        raise ValueError(f"expected a power of two from 512 to 65536, got {value!r}")
    return str(number)


def _pragma_cache_spill(value: object) -> str:
    try:
        return _pragma_bool(value)
    except ValueError:
        return str(_as_int(value, minimum=0))


def _pragma_secure_delete(value: object) -> str:
    if isinstance(value, str) and value.strip().lower() == "fast":
        return "FAST"
    return _pragma_bool(value)


# The pragmas a connection may be given.  Only per-connection settings are
# listed: pragmas that run a command (optimize, integrity_check, wal_checkpoint)
# or that only report have no place in a connect hook.
_PRAGMAS: Final[Mapping[str, _PragmaChecker]] = {
    "analysis_limit": _pragma_int(0),
    "application_id": _pragma_int(),
    "auto_vacuum": _pragma_choice("none", "full", "incremental", "0", "1", "2"),
    "automatic_index": _pragma_bool,
    "busy_timeout": _pragma_int(0),
    "cache_size": _pragma_int(),
    "cache_spill": _pragma_cache_spill,
    "cell_size_check": _pragma_bool,
    "checkpoint_fullfsync": _pragma_bool,
    "defer_foreign_keys": _pragma_bool,
    "foreign_keys": _pragma_bool,
    "fullfsync": _pragma_bool,
    "hard_heap_limit": _pragma_int(0),
    "ignore_check_constraints": _pragma_bool,
    "journal_mode": _pragma_choice("delete", "truncate", "persist", "memory", "wal", "off"),
    "journal_size_limit": _pragma_int(-1),
    "locking_mode": _pragma_choice("normal", "exclusive"),
    "max_page_count": _pragma_int(1),
    "mmap_size": _pragma_int(0),
    "page_size": _pragma_page_size,
    "query_only": _pragma_bool,
    "read_uncommitted": _pragma_bool,
    "recursive_triggers": _pragma_bool,
    "reverse_unordered_selects": _pragma_bool,
    "secure_delete": _pragma_secure_delete,
    "soft_heap_limit": _pragma_int(0),
    "synchronous": _pragma_choice("off", "normal", "full", "extra", "0", "1", "2", "3"),
    "temp_store": _pragma_choice("default", "file", "memory", "0", "1", "2"),
    "threads": _pragma_int(0),
    "trusted_schema": _pragma_bool,
    "user_version": _pragma_int(),
    "wal_autocheckpoint": _pragma_int(0),
}

# create_engine() arguments that ini files give as strings, with their checkers.
# SQLAlchemy's own coercion (engine_config_types) covers fewer keys, turns a
# float pool_timeout into an int and reports a bad value without its key.
_ENGINE_ARGS: Final[Mapping[str, Callable[[object], object]]] = {
    "pool_size": lambda v: _as_int(v, minimum=0),
    "max_overflow": lambda v: _as_int(v, minimum=-1),
    "pool_timeout": lambda v: _as_float(v, minimum=0),
    "pool_recycle": lambda v: _as_int(v, minimum=-1),
    "pool_pre_ping": _as_bool,
    "pool_use_lifo": _as_bool,
    "echo": _as_bool_or_debug,
    "echo_pool": _as_bool_or_debug,
    "hide_parameters": _as_bool,
    "future": _as_bool,
    "query_cache_size": lambda v: _as_int(v, minimum=0),
    "insertmanyvalues_page_size": lambda v: _as_int(v, minimum=1),
    "use_insertmanyvalues": _as_bool,
    "skip_autocommit_rollback": _as_bool,
    "label_length": lambda v: _as_int(v, minimum=1),
    "max_identifier_length": lambda v: _as_int(v, minimum=1),
    "pool_reset_on_return": lambda v: (
        None if v is None else _as_choice(v, ("rollback", "commit", "none"))
    ),
}

_ISOLATION_LEVELS: Final[Mapping[str, frozenset[str]]] = {
    "sqlite": frozenset({"SERIALIZABLE", "READ UNCOMMITTED", "AUTOCOMMIT"}),
    "postgresql": frozenset(
        {"SERIALIZABLE", "REPEATABLE READ", "READ COMMITTED", "READ UNCOMMITTED", "AUTOCOMMIT"}
    ),
    "mysql": frozenset(
        {"SERIALIZABLE", "REPEATABLE READ", "READ COMMITTED", "READ UNCOMMITTED", "AUTOCOMMIT"}
    ),
    "mariadb": frozenset(
        {"SERIALIZABLE", "REPEATABLE READ", "READ COMMITTED", "READ UNCOMMITTED", "AUTOCOMMIT"}
    ),
}


# --- pool defaults ---------------------------------------------------------------------------


def _is_private_memory(url: URL) -> bool:
    # A named shared-cache memory database (mode=memory) is reachable from many
    # connections and pools like a file; ":memory:" and "" are private to one.
    database = url.database or ""
    if database in ("", ":memory:"):
        return True
    return (
        database.startswith("file::memory:")
        and url.query.get("mode") != "memory"
        and ("cache" not in url.query)
    )


def pool_defaults(url: str | URL) -> dict[str, Any]:
    """The pool arguments :func:`engine_from_config` adds for ``url``.

    Settings and keyword arguments override each of them; a ``poolclass``
    given by the caller switches all of them off.  ``docs/engine.md`` gives
    the reasons.

    Example::

        >>> pool_defaults("postgresql+psycopg://app@db/app")["pool_pre_ping"]
        True
        >>> pool_defaults("sqlite:///:memory:")["pool_size"]
        1
    """
    url = make_url(url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        if _is_private_memory(url):
            # One connection is the whole database: every thread must get that
            # same connection, one at a time, so that transactions do not mix.
            return {"pool_size": 1, "max_overflow": 0, "pool_timeout": 30.0, "pool_recycle": -1}
        # A local file never drops a connection, so no ping and no recycling.
        # Writers queued for the write lock each hold a connection while they
        # wait: the overflow leaves room for readers beside them (a connection
        # costs a file handle and its page cache, filled only as it reads).
        return {
            "pool_size": 5,
            "max_overflow": 20,
            "pool_timeout": 30.0,
            "pool_pre_ping": False,
            "pool_recycle": -1,
        }
    if backend == "postgresql":
        # Server restarts, failovers and proxies that drop idle connections
        # make a checked-in connection go stale; the ping turns that into a
        # silent reconnect, and recycling stays under common idle limits.
        return {
            "pool_size": 10,
            "max_overflow": 10,
            "pool_timeout": 30.0,
            "pool_pre_ping": True,
            "pool_recycle": 1800,
        }
    if backend in ("mysql", "mariadb"):
        # MySQL closes connections idle longer than wait_timeout (8 h by
        # default, far less on hosted servers): recycle hourly and ping.
        return {
            "pool_size": 10,
            "max_overflow": 10,
            "pool_timeout": 30.0,
            "pool_pre_ping": True,
            "pool_recycle": 3600,
        }
    return {}


# --- settings -------------------------------------------------------------------------------


@dataclass
class _Plan:
    """What engine_from_config will build, checked and coerced."""

    url: URL
    options: dict[str, Any]
    is_sqlite: bool = False
    pragmas: dict[str, str] = field(default_factory=dict)
    begin_mode: BeginMode = DEFAULT_BEGIN_MODE
    autocommit: bool = False


def _plan(
    settings: Mapping[str, Any], prefix: str, kwargs: Mapping[str, Any], *, is_async: bool
) -> _Plan:
    # Key as the user wrote it, for error messages.
    origin: dict[str, str] = {}
    raw: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(key, str) and key.startswith(prefix):
            name = key[len(prefix) :]
            raw[name] = value
            origin[name] = key
    for name, value in kwargs.items():
        raw[name] = value
        origin[name] = name

    given = dict(raw)  # every value as given, for the errors (raw is consumed below)

    def fail(name: str, message: str) -> ConfigurationError:
        key = origin.get(name, prefix + name)
        return ConfigurationError(f"{key}: {message}", key=key, value=given.get(name))

    if "url" not in raw or raw["url"] in (None, ""):
        key = prefix + "url"
        raise ConfigurationError(f"{key}: required, the database URL", key=key, value=None)
    try:
        url = make_url(raw.pop("url"))
    except (sa_exc.ArgumentError, ValueError, TypeError) as error:
        raise fail("url", f"not a database URL ({error})") from None
    try:
        dialect_cls = url.get_dialect(_is_async=is_async)
    except sa_exc.NoSuchModuleError as error:
        raise fail("url", f"unknown database dialect or driver ({error})") from None
    backend = url.get_backend_name()
    is_sqlite = backend == "sqlite"

    pragma_raw = {name: raw.pop(name) for name in list(raw) if name.startswith("pragma.")}
    begin_raw = raw.pop("begin_mode", None)

    options: dict[str, Any] = {}
    for name, value in raw.items():
        checker = _ENGINE_ARGS.get(name)
        if name == "pool_reset_on_return" and not isinstance(value, str):
            # None and SQLAlchemy's reset constants are already what it wants.
            options[name] = value
        elif checker is not None:
            try:
                options[name] = checker(value)
            except ValueError as error:
                raise fail(name, str(error)) from None
        elif isinstance(value, str) and name in dialect_cls.engine_config_types:
            try:
                options[name] = dialect_cls.engine_config_types[name](value)
            except (TypeError, ValueError) as error:
                raise fail(name, str(error)) from None
        else:
            options[name] = value

    autocommit = False
    if options.get("isolation_level") is not None:
        level = options["isolation_level"]
        if not isinstance(level, str):
            raise fail("isolation_level", f"expected an isolation level name, got {level!r}")
        level = " ".join(level.replace("_", " ").upper().split())
        allowed = _ISOLATION_LEVELS.get(backend)
        if allowed is not None and level not in allowed:
            raise fail(
                "isolation_level",
                f"expected one of {', '.join(sorted(allowed))} for {backend}, got {level!r}",
            )
        options["isolation_level"] = level
        autocommit = level == "AUTOCOMMIT"

    plan = _Plan(url=url, options=options, is_sqlite=is_sqlite, autocommit=autocommit)

    if begin_raw is not None:
        try:
            plan.begin_mode = _as_choice(begin_raw, BEGIN_MODES)  # type: ignore[assignment]
        except ValueError as error:
            raise fail("begin_mode", str(error)) from None

    overrides: dict[str, str | None] = {}
    for name, value in pragma_raw.items():
        pragma = name[len("pragma.") :].strip().lower()
        checker = _PRAGMAS.get(pragma)
        if checker is None:
            raise fail(
                name,
                f"unknown or unsupported SQLite pragma {pragma!r}; "
                f"known: {', '.join(sorted(_PRAGMAS))}",
            )
        if value is None or (isinstance(value, str) and not value.strip()):
            overrides[pragma] = None
            continue
        try:
            overrides[pragma] = checker(value)
        except ValueError as error:
            raise fail(name, str(error)) from None

    if not is_sqlite:
        if pragma_raw or begin_raw is not None:
            # One ini file often serves a SQLite development setup and a
            # server database in production: the SQLite keys are checked above
            # and then have nothing to act on.
            log.debug("SQLite pragma and begin_mode settings ignored for %s", backend)
        _add_pool_defaults(plan, origin, prefix)
        return plan

    memory = _is_private_memory(url)
    pragmas: dict[str, str] = {}
    for pragma, value in TUNED_PRAGMAS.items():
        if memory and pragma in _FILE_ONLY_PRAGMAS:
            continue
        pragmas[pragma] = value
    timeout = _driver_timeout(url, options)
    if timeout is not None:
        # The caller chose pysqlite's own timeout: keep it as the busy timeout.
        pragmas["busy_timeout"] = str(int(timeout * 1000))
    for pragma, override in overrides.items():
        if override is None:
            pragmas.pop(pragma, None)
        else:
            pragmas[pragma] = override
    plan.pragmas = pragmas
    _add_pool_defaults(plan, origin, prefix)
    return plan


def _driver_timeout(url: URL, options: Mapping[str, Any]) -> float | None:
    connect_args = options.get("connect_args") or {}
    value = connect_args.get("timeout", url.query.get("timeout"))
    if value is None or isinstance(value, tuple):
        return None
    try:
        return _as_float(value, minimum=0)
    except ValueError:
        return None


def _add_pool_defaults(plan: _Plan, origin: Mapping[str, str], prefix: str) -> None:
    options = plan.options
    if "poolclass" in options or "pool" in options:
        return
    defaults = pool_defaults(plan.url)
    if plan.is_sqlite and _is_private_memory(plan.url):
        for name, wanted in (("pool_size", 1), ("max_overflow", 0)):
            if name in options and options[name] != wanted:
                key = origin.get(name, prefix + name)
                raise ConfigurationError(
                    f"{key}: a private SQLite memory database lives in one connection, "
                    f"so {name} must be {wanted}; got {options[name]!r} (use a file, or "
                    "a named 'file:NAME?mode=memory&cache=shared&uri=true' database)",
                    key=key,
                    value=options[name],
                )
        options["poolclass"] = sa_pool.QueuePool
        connect_args = dict(options.get("connect_args") or {})
        # The one connection is handed from thread to thread by the pool.
        connect_args.setdefault("check_same_thread", False)
        options["connect_args"] = connect_args
    for name, value in defaults.items():
        options.setdefault(name, value)


# --- SQLite hooks ---------------------------------------------------------------------------


def _in_transaction(driver_connection: Any) -> bool:
    return bool(getattr(driver_connection, "in_transaction", False))


def _is_locking_read(context: Any) -> bool:
    # SQLite has no FOR UPDATE (its compiler drops the clause); a statement
    # that asked for one is a read made in order to write.  The layer reads
    # the same attribute to keep such reads out of the cache.
    compiled = getattr(context, "compiled", None)
    statement = getattr(compiled, "statement", None)
    return getattr(statement, "_for_update_arg", None) is not None


def _sqlite_busy(error: BaseException | None) -> int | None:
    """The SQLite result code of a busy/locked error, else None."""
    if not isinstance(error, sqlite3.Error):
        # aiosqlite's adapted errors keep the sqlite3 one as their cause.
        error = getattr(error, "__cause__", None)
        if not isinstance(error, sqlite3.Error):
            return None
    code = getattr(error, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF in (5, 6):
        return code
    return None


def _is_first(info: Mapping[str, Any], context: Any) -> bool:
    """Whether ``context`` is the statement that began the open transaction."""
    first = info.get(_FIRST_STATEMENT_KEY)
    return context is not None and first is not None and first() is context


def _stop_cancelled_statement(connection: Connection) -> None:
    """Interrupt and roll back the statement of a cancelled coroutine, now.

    SQLAlchemy answers a cancelled query by discarding the connection, but
    aiosqlite runs the statement on a thread of its own, and closes the
    connection only after the statement has finished: until then its
    transaction, and the write lock it may hold, stay in force, and the next
    query waits for them.  ``interrupt()`` stops the statement at once and the
    rollback, queued behind it on that thread, is awaited before the
    ``CancelledError`` goes on, so the lock is free when it reaches the caller.
    """
    try:
        driver_connection = connection.connection.driver_connection
        interrupt = getattr(driver_connection, "interrupt", None)
        rollback = getattr(driver_connection, "rollback", None)
        if interrupt is None or rollback is None:
            return
        from sqlalchemy.util import await_only

        await_only(interrupt())
        await_only(rollback())
    except BaseException:
        # Best effort: the error that matters is the cancellation being raised,
        # and the connection is discarded (closed) after this in any case.
        log.debug("could not stop a cancelled SQLite statement", exc_info=True)


class _WriteLockHolders:
    """Thread ident -> write-lock transactions open on one engine.

    Owned by that engine's hooks; every access holds ``lock``.  Emptied in a
    forked child, whose only thread holds nothing.
    """

    def __init__(self, database: str, gate_timeout: float) -> None:
        self.database = database
        self.lock = threading.Lock()
        self.counts: dict[int, int] = {}
        # Taken before BEGIN IMMEDIATE/EXCLUSIVE and released when that
        # transaction ends, by whichever thread ends it.
        self.gate = threading.Lock()
        self.gate_timeout = gate_timeout
        renew_after_fork(self)

    def holds(self, ident: int) -> bool:
        with self.lock:
            return bool(self.counts.get(ident))

    def add(self, ident: int) -> None:
        with self.lock:
            self.counts[ident] = self.counts.get(ident, 0) + 1

    def remove(self, ident: int) -> None:
        with self.lock:
            left = self.counts.get(ident, 0) - 1
            if left > 0:
                self.counts[ident] = left
            else:
                self.counts.pop(ident, None)

    def _after_fork_in_child(self) -> None:
        # The child's only thread holds no transaction; the inherited lock may
        # have been held by a thread that does not exist there.
        if self.counts:
            # SQLite records its locks per process, and fork copies the record
            # of a lock that only the parent holds: SQLite in this process will
            # see that database as locked for as long as the process lives.
            log.warning(
                "process %d was forked while a thread of its parent held the SQLite "
                "write lock on %s: this process cannot write that database; fork "
                "before opening transactions (e.g. preload, then fork, then serve)",
                os.getpid(),
                self.database,
            )
        self.lock = threading.Lock()
        self.counts = {}
        self.gate = threading.Lock()


# What a forked child must not inherit: the parent's pooled connections (a
# connection is a socket or a SQLite handle whose locks belong to the parent).
# Weak: an engine dropped by the application is dropped here too.
_fork_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


@at_fork_in_child
def _new_pools_in_child() -> None:
    for engine in list(_fork_engines):
        # SQLAlchemy's recipe for engines that cross a fork: a new, empty pool,
        # the parent's connections left alone (closing them would send the
        # parent's server a goodbye, or roll back the parent's SQLite
        # transaction under it).
        engine.dispose(close=False)


_UPGRADE_HINT: Final = (
    "this SQLite transaction began DEFERRED and read before writing; another "
    "connection took the write lock or committed since its first read, so this "
    "write could lose an update and SQLite refused it. Nothing was written: rerun "
    "the whole unit of work, for example with sqla_cachelayer.run_in_transaction() "
    "(which begins IMMEDIATE and retries), or make a with_for_update() read its first "
    "statement (see docs/engine.md)"
)


def _install_sqlite_hooks(engine: Engine, plan: _Plan) -> None:
    """Every SQLite event listener, in one place (see docs/engine.md)."""
    pragma_sql = [f"PRAGMA {name} = {value}" for name, value in plan.pragmas.items()]
    take_over_begin = not plan.autocommit
    default_mode: BeginMode = plan.begin_mode
    # A second write-lock transaction opened by a thread that already holds the
    # write lock through another connection would wait for itself until
    # busy_timeout; it begins DEFERRED instead, so that it can at least read.
    # An asyncio engine runs every transaction on one thread, so the rule is
    # for threads only.
    is_async = engine.dialect.is_async
    track_threads = not is_async
    busy_ms = plan.pragmas.get("busy_timeout")
    holders = _WriteLockHolders(
        engine.url.render_as_string(hide_password=True),
        gate_timeout=int(busy_ms) / 1000 if busy_ms is not None else 5.0,
    )

    def note_released(info: dict[Any, Any]) -> None:
        for key in _TRANSACTION_KEYS:
            info.pop(key, None)
        ident = info.pop(_WRITE_LOCK_KEY, None)
        if ident is not None:
            holders.remove(ident)
        if info.pop(_GATE_KEY, None) is holders.gate:
            holders.gate.release()

    def on_connect(dbapi_connection: Any, connection_record: ConnectionPoolEntry) -> None:
        if take_over_begin:
            # Stop pysqlite from issuing BEGIN itself (and from running SELECTs
            # outside the transaction); the hooks below issue it instead.
            dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            for statement in pragma_sql:
                cursor.execute(statement)
        finally:
            cursor.close()

    def on_begin(conn: Connection) -> None:
        # BEGIN itself waits for the transaction's first statement, which
        # decides between DEFERRED and IMMEDIATE (a locking read), and a
        # transaction that never runs a statement takes no lock at all.
        options = conn.get_execution_options()
        level = options.get("isolation_level")
        if level == "AUTOCOMMIT" or (level is None and plan.autocommit):
            return
        proxied = conn.connection
        dbapi_connection = proxied.dbapi_connection
        if dbapi_connection is not None and dbapi_connection.isolation_level is not None:
            # An isolation_level execution option was reset on check-in, which
            # gives pysqlite its BEGIN back; no transaction is open here, so
            # taking it away again commits nothing.
            dbapi_connection.isolation_level = None
        proxied.info[_PENDING_BEGIN_KEY] = True

    def begin_first(cursor: Any, context: Any) -> None:
        # A dialect-level hook: SQLAlchemy reports what it raises as the
        # failure of the statement (a before_cursor_execute listener's errors
        # escape unwrapped on SQLAlchemy 2.0).
        conn = getattr(context, "root_connection", None)
        if conn is None:
            return
        info = conn.connection.info
        if _PENDING_BEGIN_KEY not in info:
            return
        # Options are read now rather than at begin, so that a session's
        # after_begin hook can still declare the transaction a writer.
        options = conn.get_execution_options()
        mode: BeginMode = options.get(BEGIN_MODE_OPTION) or default_mode
        if mode == "deferred" and (options.get(WRITE_INTENT_OPTION) or _is_locking_read(context)):
            mode = "immediate"
        ident = threading.get_ident()
        if mode != "deferred" and track_threads and holders.holds(ident):
            mode = "deferred"
        gate = None
        if mode != "deferred" and track_threads:
            gate = holders.gate
            if not gate.acquire(timeout=holders.gate_timeout):
                gate = None  # SQLite's busy handler decides, as without the gate
        try:
            # On the raw cursor: a BEGIN that fails (busy_timeout ran out) is
            # reported by SQLAlchemy as the failure of the statement it
            # preceded, and the next statement tries BEGIN again.
            cursor.execute(_BEGIN_SQL[mode])
        except Exception:
            info[_FAILED_BEGIN_KEY] = mode
            if gate is not None:
                gate.release()
            raise
        if gate is not None:
            info[_GATE_KEY] = gate
        del info[_PENDING_BEGIN_KEY]
        info[_OPEN_MODE_KEY] = mode
        info[_FIRST_STATEMENT_KEY] = weakref.ref(context) if context is not None else None
        if mode != "deferred" and track_threads:
            info[_WRITE_LOCK_KEY] = ident
            holders.add(ident)

    def on_do_execute(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        begin_first(cursor, context)
        return False  # the statement itself runs as usual

    def on_do_execute_no_params(cursor: Any, statement: str, context: Any) -> bool:
        begin_first(cursor, context)
        return False

    def on_error(ctx: ExceptionContext) -> None:
        connection = ctx.connection
        if connection is None:
            return
        if is_async and not isinstance(ctx.original_exception, Exception):
            _stop_cancelled_statement(connection)
            return
        error = ctx.sqlalchemy_exception
        if not isinstance(error, sa_exc.StatementError):
            return
        code = _sqlite_busy(ctx.original_exception)
        if code is None or connection.invalidated:
            return
        info = connection.connection.info
        failed_begin = info.pop(_FAILED_BEGIN_KEY, None)
        if failed_begin is not None:
            error.add_detail(
                f"raised by the BEGIN {failed_begin.upper()} issued before this statement: "
                "another connection held the write lock for longer than busy_timeout"
            )
        elif info.get(_OPEN_MODE_KEY) == "deferred" and (
            code == _SQLITE_BUSY_SNAPSHOT or not _is_first(info, ctx.execution_context)
        ):
            error.add_detail(_UPGRADE_HINT)

    def on_commit(conn: Connection) -> None:
        note_released(conn.connection.info)

    def on_rollback(conn: Connection) -> None:
        if conn.invalidated:
            # Its DBAPI connection is gone (the invalidate event released what
            # it held); asking for it would raise PendingRollbackError.
            return
        note_released(conn.connection.info)
        # pysqlite reports isolation_level=None as autocommit, so with
        # skip_autocommit_rollback SQLAlchemy would skip the DBAPI rollback and
        # leave our BEGIN (and with it the write lock) open.
        if _in_transaction(conn.connection.driver_connection):
            dbapi_connection = conn.connection.dbapi_connection
            if dbapi_connection is not None:
                dbapi_connection.rollback()

    def on_reset(
        dbapi_connection: Any, connection_record: ConnectionPoolEntry, reset_state: PoolResetState
    ) -> None:
        note_released(connection_record.info)
        # The pool's own rollback is skipped when the Connection says it has
        # already reset the transaction; make sure nothing stays open.
        if reset_state.asyncio_safe and _in_transaction(connection_record.driver_connection):
            dbapi_connection.rollback()

    def on_gone(dbapi_connection: Any, connection_record: ConnectionPoolEntry, *args: Any) -> None:
        # A closed or invalidated DBAPI connection holds no lock any more.
        note_released(connection_record.info)

    def check_options(target: Any, opts: dict[str, Any]) -> None:
        mode = opts.get(BEGIN_MODE_OPTION)
        if mode is not None and mode not in _BEGIN_SQL:
            raise ConfigurationError(
                f"{BEGIN_MODE_OPTION}: expected one of {', '.join(BEGIN_MODES)}, got {mode!r}",
                key=BEGIN_MODE_OPTION,
                value=mode,
            )
        intent = opts.get(WRITE_INTENT_OPTION)
        if intent is not None and not isinstance(intent, bool):
            raise ConfigurationError(
                f"{WRITE_INTENT_OPTION}: expected True or False, got {intent!r}",
                key=WRITE_INTENT_OPTION,
                value=intent,
            )

    event.listen(engine, "connect", on_connect)
    event.listen(engine, "reset", on_reset)
    event.listen(engine, "invalidate", on_gone)
    event.listen(engine, "close", on_gone)
    event.listen(engine, "set_connection_execution_options", check_options)
    event.listen(engine, "set_engine_execution_options", check_options)
    if take_over_begin:
        event.listen(engine, "begin", on_begin)
        event.listen(engine, "do_execute", on_do_execute)
        event.listen(engine, "do_executemany", on_do_execute)
        event.listen(engine, "do_execute_no_params", on_do_execute_no_params)
        event.listen(engine, "handle_error", on_error)
        event.listen(engine, "commit", on_commit)
        event.listen(engine, "rollback", on_rollback)


# --- public API ------------------------------------------------------------------------------


def _create(plan: _Plan, settings_prefix: str, factory: Callable[..., Any]) -> Any:
    try:
        return factory(plan.url, **plan.options)
    except TypeError as error:
        message = str(error)
        names = re.findall(r"'([^']+)'", message) if "Invalid argument" in message else []
        key = settings_prefix + names[0] if names else None
        raise ConfigurationError(
            f"{key or settings_prefix + '*'}: {message}", key=key, value=None
        ) from None
    except sa_exc.ArgumentError as error:
        key = settings_prefix + "url"
        raise ConfigurationError(f"{key}: {error}", key=key, value=str(plan.url)) from None
    except ImportError as error:
        key = settings_prefix + "url"
        raise ConfigurationError(
            f"{key}: the driver for {plan.url.drivername!r} is not installed ({error})",
            key=key,
            value=str(plan.url),
        ) from None


def engine_from_config(
    settings: Mapping[str, Any], prefix: str = "sqlalchemy.", **kwargs: Any
) -> Engine:
    """Build an :class:`~sqlalchemy.engine.Engine` from flat settings, tuned.

    Keys starting with ``prefix`` (stripped) are :func:`sqlalchemy.create_engine`
    arguments, as for :func:`sqlalchemy.engine_from_config`; ``kwargs`` override
    them.  Added on top (docs/engine.md):

    * ``pragma.<name>``: a SQLite pragma for every new connection, replacing the
      tuned one in :data:`TUNED_PRAGMAS` (an empty value leaves SQLite's default);
    * ``begin_mode``: ``deferred`` (default), ``immediate`` or ``exclusive``,
      the BEGIN issued for each SQLite transaction;
    * pool defaults per URL kind (:func:`pool_defaults`).

    :raises ConfigurationError: a missing or malformed URL, an unknown dialect or
        driver, an unknown pragma, a value of the wrong type or out of range;
        the message starts with the settings key.

    Example::

        >>> engine = engine_from_config(
        ...     {
        ...         "sqlalchemy.url": "sqlite:///app.db",
        ...         "sqlalchemy.pool_size": "8",
        ...         "sqlalchemy.pragma.busy_timeout": "10000",
        ...         "sqlalchemy.begin_mode": "immediate",
        ...     }
        ... )
        >>> engine_from_config({"sqlalchemy.url": "sqlite:///app.db", "sqlalchemy.pool_size": "x"})
        Traceback (most recent call last):
        ...
        sqla_cachelayer.exc.ConfigurationError: sqlalchemy.pool_size: expected an integer, got 'x'
    """
    plan = _plan(settings, prefix, kwargs, is_async=False)
    if plan.url.get_dialect().is_async:
        key = prefix + "url"
        raise ConfigurationError(
            f"{key}: {plan.url.drivername!r} is an asyncio driver; use async_engine_from_config()",
            key=key,
            value=str(plan.url),
        )
    engine: Engine = _create(plan, prefix, sqlalchemy.create_engine)
    if plan.is_sqlite:
        _install_sqlite_hooks(engine, plan)
    _fork_engines.add(engine)
    return engine


def async_engine_from_config(
    settings: Mapping[str, Any], prefix: str = "sqlalchemy.", **kwargs: Any
) -> AsyncEngine:
    """The asyncio twin of :func:`engine_from_config` (e.g. ``sqlite+aiosqlite``).

    Same keys, same checks, same SQLite tuning, applied to the engine's
    ``sync_engine``.

    Example::

        >>> engine = async_engine_from_config({"sqlalchemy.url": "sqlite+aiosqlite:///app.db"})
        >>> async with engine.connect() as conn:
        ...     await conn.exec_driver_sql("PRAGMA busy_timeout")
    """
    from sqlalchemy.ext.asyncio import create_async_engine

    plan = _plan(settings, prefix, kwargs, is_async=True)
    if not plan.url.get_dialect(_is_async=True).is_async:
        key = prefix + "url"
        raise ConfigurationError(
            f"{key}: {plan.url.drivername!r} has no asyncio driver; "
            "use engine_from_config() or an async driver such as sqlite+aiosqlite",
            key=key,
            value=str(plan.url),
        )
    if plan.is_sqlite and "pool" not in plan.options:
        poolclass = plan.options.get("poolclass")
        if poolclass is sa_pool.QueuePool or (poolclass is None and "pool_size" in plan.options):
            # aiosqlite's own default for a file was NullPool in early
            # SQLAlchemy 2.0 releases, which takes no pool_size
            plan.options["poolclass"] = sa_pool.AsyncAdaptedQueuePool
    engine: AsyncEngine = _create(plan, prefix, create_async_engine)
    if plan.is_sqlite:
        _install_sqlite_hooks(engine.sync_engine, plan)
    _fork_engines.add(engine.sync_engine)
    return engine
