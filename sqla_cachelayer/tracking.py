"""Which tables a statement reads or writes, observed on the engine.

One mechanism covers every write path of design G4: the dialect of each engine
the layer knows is wrapped (``do_execute`` and its siblings), so every statement
that reaches the driver is seen -- ORM flushes (association and inheritance
tables included), ORM bulk DML, Core DML, textual SQL and DDL -- and the tables
written are recorded on the DBAPI connection (``connection.info``). After the
driver's COMMIT returns, the
recorded set is handed to the layers watching the engine, which bump the
tables' stamps before ``commit()`` returns to the caller. SQLAlchemy has no
after-commit event for Core (``ConnectionEvents.commit`` fires *before* the
DBAPI COMMIT), so the dialect's ``do_commit`` is wrapped too, and its
``do_rollback`` forgets what a rolled-back transaction wrote.

The same listener records the tables a cache miss actually reads: while a miss
runs, a per-context collector (a ``ContextVar``, so per thread and per
greenlet) receives the tables of every SELECT executed for it, eager loads and
inheritance joins included.

Textual SQL is parsed with regular expressions. When in doubt it invalidates
more: an unparsable write bumps every table (``*all*``); a textual read is
recorded as reading ``*any*``, which every write bumps.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import Any

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql import util as sql_util
from sqlalchemy.sql.schema import Table
from sqlalchemy.sql.selectable import TableClause

from .invalidation import ALL_TABLES, ANY_TABLE
from .keys import BoundedMemo

__all__ = ["ReadCollector", "collecting", "watch_engine"]

_WRITTEN = "_sqla_cachelayer_written"

# --------------------------------------------------------------------------
# table names


def table_name(table: Any) -> str:
    """The stamp name of a table: its bare name, lower-cased.

    Schema and case are dropped on purpose: two tables that differ only by them
    share a stamp, which can only invalidate more, never less.
    """
    return str(getattr(table, "name", table)).lower()


_cascades: weakref.WeakKeyDictionary[Table, frozenset[str]] = weakref.WeakKeyDictionary()
_cascades_lock = threading.Lock()  # guards _cascades


def written_names(table: TableClause) -> frozenset[str]:
    """A written table plus those the database changes with it (FK cascades)."""
    if not isinstance(table, Table):
        return frozenset((table_name(table),))
    found = _cascades.get(table)
    if found is None:
        names = {table_name(table)}
        todo = [table]
        seen = {table}
        while todo:
            current = todo.pop()
            for other in current.metadata.tables.values():
                if other in seen:
                    continue
                for fk in other.foreign_keys:
                    rules = {(fk.ondelete or "").upper(), (fk.onupdate or "").upper()}
                    if fk.column.table is current and rules & {
                        "CASCADE",
                        "SET NULL",
                        "SET DEFAULT",
                    }:
                        seen.add(other)
                        names.add(table_name(other))
                        todo.append(other)
                        break
        found = frozenset(names)
        with _cascades_lock:
            _cascades[table] = found
    return found


# --------------------------------------------------------------------------
# textual SQL

_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.S)
_STRINGS = re.compile(r"'(?:[^']|'')*'")
_IDENT = (
    r'((?:"[^"]+"|`[^`]+`|\[[^\]]+\]|[\w$]+)(?:\s*\.\s*(?:"[^"]+"|`[^`]+`|\[[^\]]+\]|[\w$]+))*)'
)
_WRITE_PATTERNS = [
    re.compile(r"\binsert\s+(?:or\s+\w+\s+)?(?:ignore\s+)?into\s+" + _IDENT, re.I),
    re.compile(r"\breplace\s+into\s+" + _IDENT, re.I),
    re.compile(r"\bupdate\s+(?:or\s+\w+\s+)?(?:only\s+)?" + _IDENT, re.I),
    re.compile(r"\bdelete\s+from\s+(?:only\s+)?" + _IDENT, re.I),
    re.compile(r"\bmerge\s+into\s+" + _IDENT, re.I),
    re.compile(r"\bcopy\s+" + _IDENT, re.I),
    re.compile(
        r"\b(?:create|drop|alter)\s+(?:(?:temp|temporary|unlogged|global|local)\s+)*"
        r"(?:table|view|materialized\s+view)\s+(?:if\s+(?:not\s+)?exists\s+)?" + _IDENT,
        re.I,
    ),
]
_TRUNCATE = re.compile(r"\btruncate\s+(?:table\s+)?(?:only\s+)?([^;]+)", re.I)
_LOAD_DATA = re.compile(r"\binto\s+table\s+" + _IDENT, re.I)
_FIRST_WORD = re.compile(r"^[\s(;]*([a-z_]+)", re.I)
_DML_WORD = re.compile(
    r"\b(?:insert|update|delete|replace|merge|truncate|create|drop|alter|copy|call|do|"
    r"grant|revoke|load|execute|exec|rename)\b",
    re.I,
)
# statements that neither read nor write table data: transaction control,
# session settings, maintenance (unless a DML word appears in them)
_NEUTRAL = frozenset(
    [
        "begin",
        "commit",
        "rollback",
        "savepoint",
        "release",
        "start",
        "end",
        "abort",
        "set",
        "reset",
        "discard",
        "pragma",
        "show",
        "use",
        "listen",
        "unlisten",
        "notify",
        "prepare",
        "deallocate",
        "declare",
        "fetch",
        "move",
        "close",
        "lock",
        "checkpoint",
        "vacuum",
        "analyze",
        "reindex",
        "explain",
        "describe",
        "desc",
        "cluster",
    ]
)
_READS = frozenset(("select", "values", "with", "table"))
_WRITES = frozenset(
    [
        "insert",
        "update",
        "delete",
        "replace",
        "merge",
        "truncate",
        "create",
        "drop",
        "alter",
        "copy",
        "load",
        "grant",
        "revoke",
        "comment",
        "rename",
    ]
)


def _clean_ident(raw: str) -> str:
    last = re.split(r"\s*\.\s*", raw)[-1]
    return last.strip('"`[]').lower()


def _written_by(text: str) -> frozenset[str]:
    names: set[str] = set()
    for pattern in (*_WRITE_PATTERNS, _LOAD_DATA):
        names.update(_clean_ident(m.group(1)) for m in pattern.finditer(text))
    for m in _TRUNCATE.finditer(text):
        for part in m.group(1).split(","):
            word = part.strip().split()
            if word:
                names.add(_clean_ident(word[0]))
    names.discard("")
    if not names or re.search(r"\b(?:call|do|execute|exec)\b", text, re.I):
        return frozenset((ALL_TABLES,))
    return frozenset(names)


def classify_textual(sql: str) -> tuple[frozenset[str], bool]:
    """What a textual statement does: the tables it may write (``{"*all*"}``
    when it cannot tell) and whether it reads table data.

    When in doubt it says more: an unknown statement writes everything.
    """
    text = _STRINGS.sub("''", _COMMENTS.sub(" ", sql))
    m = _FIRST_WORD.match(text)
    first = m.group(1).lower() if m else ""
    has_dml = _DML_WORD.search(text) is not None
    if first in _NEUTRAL:
        return (_written_by(text) if has_dml else frozenset()), False
    if first in _READS:
        return (_written_by(text) if has_dml else frozenset()), True
    if first in _WRITES:
        return _written_by(text), False
    return frozenset((ALL_TABLES,)), True


_text_kinds: BoundedMemo[str, tuple[frozenset[str], bool]] = BoundedMemo(5000)


def _textual(sql: str) -> tuple[frozenset[str], bool]:
    found = _text_kinds.get(sql)
    if found is None:
        found = classify_textual(sql)
        _text_kinds.put(sql, found)
    return found


# --------------------------------------------------------------------------
# compiled statements

_compiled_reads: BoundedMemo[int, tuple[Any, frozenset[str]]] = BoundedMemo(5000)
_compiled_writes: BoundedMemo[int, tuple[Any, frozenset[str]]] = BoundedMemo(5000)


def _is_textual(compiled: Any) -> bool:
    stmt = getattr(compiled, "statement", None)
    return stmt is None or getattr(stmt, "__visit_name__", "") in ("textclause", "textual_select")


def _reads_of(compiled: Any) -> frozenset[str]:
    memo = _compiled_reads.get(id(compiled))
    if memo is not None and memo[0] is compiled:
        return memo[1]
    compile_state = getattr(compiled, "compile_state", None)
    stmt = getattr(compile_state, "statement", None)
    if stmt is None:
        stmt = compiled.statement
    tables = sql_util.find_tables(
        stmt, check_columns=True, include_aliases=True, include_joins=True, include_crud=True
    )
    names = frozenset(table_name(t) for t in tables if isinstance(t, TableClause))
    if not names:
        names = frozenset((ANY_TABLE,))
    # hold a strong reference so the id cannot be reused while the memo lives
    _compiled_reads.put(id(compiled), (compiled, names))
    return names


def _writes_of(compiled: Any) -> frozenset[str]:
    memo = _compiled_writes.get(id(compiled))
    if memo is not None and memo[0] is compiled:
        return memo[1]
    stmt = compiled.statement
    names: set[str] = set()
    target = getattr(stmt, "table", None)
    if target is not None:
        for t in sql_util.find_tables(target, include_aliases=True, include_joins=True):
            if isinstance(t, TableClause):
                names |= written_names(t)
    for extra in getattr(stmt, "_extra_froms", ()) or ():
        for t in sql_util.find_tables(extra, include_aliases=True, include_joins=True):
            if isinstance(t, TableClause):
                names |= written_names(t)
    found = frozenset(names) if names else frozenset((ALL_TABLES,))
    _compiled_writes.put(id(compiled), (compiled, found))
    return found


def _ddl_writes(compiled: Any) -> frozenset[str]:
    element = getattr(compiled.statement, "element", None)
    table = getattr(element, "table", element)
    if isinstance(table, TableClause):
        return written_names(table)
    return frozenset((ALL_TABLES,))


# --------------------------------------------------------------------------
# the read collector


class ReadCollector:
    """Tables read while one cache miss runs; flags writes seen meanwhile."""

    __slots__ = ("tables", "wrote")

    def __init__(self) -> None:
        self.tables: set[str] = set()
        self.wrote = False


_collector: ContextVar[ReadCollector | None] = ContextVar("sqla_cachelayer_collector", default=None)


class collecting:
    """Context manager: collect the tables read by statements run inside it."""

    __slots__ = ("_token", "collector")

    def __init__(self) -> None:
        self.collector = ReadCollector()

    def __enter__(self) -> ReadCollector:
        self._token = _collector.set(self.collector)
        return self.collector

    def __exit__(self, *exc: object) -> None:
        _collector.reset(self._token)


#: The collector of the miss being filled in this context, or None (eager loads
#: run inside a miss see it). The ContextVar's own ``get``: no Python frame.
current_collector: Callable[[], ReadCollector | None] = _collector.get


# --------------------------------------------------------------------------
# engine watch

CommitCallback = Callable[[frozenset[str]], None]


class _EngineWatch:
    """The listeners of one engine, shared by every layer that knows it."""

    def __init__(self, engine: Engine) -> None:
        # callbacks of the layers watching this engine; guarded by _lock for
        # registration, iterated over a snapshot
        self._lock = threading.Lock()
        self._callbacks: dict[int, CommitCallback] = {}
        self._engine_ref = weakref.ref(engine)

    def add(self, key: int, callback: CommitCallback) -> None:
        with self._lock:
            self._callbacks[key] = callback

    def discard(self, key: int) -> None:
        with self._lock:
            self._callbacks.pop(key, None)

    def committed(self, tables: Iterable[str]) -> None:
        found = frozenset(tables)
        for callback in list(self._callbacks.values()):
            callback(found)

    # statement observation ------------------------------------------------
    def before_statement(self, statement: str, context: Any) -> bool:
        """Record what one statement reads (for a miss) and writes; True if it writes."""
        compiled = context.compiled
        collector = _collector.get()
        if compiled is None or _is_textual(compiled):
            written, reads = _textual(statement)
            if collector is not None and reads:
                collector.tables.add(ANY_TABLE)
        elif context.isinsert or context.isupdate or context.isdelete:
            written = _writes_of(compiled)
        elif context.isddl:
            written = _ddl_writes(compiled)
        else:
            if collector is not None:
                collector.tables.update(_reads_of(compiled))
            return False
        if not written:
            return False
        if collector is not None:
            collector.wrote = True
        info = _info_of(context.root_connection)
        if info is None:
            return False  # SQLAlchemy's own first-connect statements: nothing to track
        pending = info.get(_WRITTEN)
        if pending is None:
            info[_WRITTEN] = pending = set()
        pending.update(written)
        return True

    def after_statement(self, context: Any) -> None:
        # with AUTOCOMMIT the driver committed already: there will be no COMMIT
        conn = context.root_connection
        info = _info_of(conn)
        if info is not None and _WRITTEN in info and conn._is_autocommit_isolation():
            pending = info.pop(_WRITTEN, None)
            if pending:
                self.committed(pending)

    def after_commit(self, info: Any) -> None:
        pending = info.pop(_WRITTEN, None) if info is not None else None
        if pending:
            self.committed(pending)


_watches: weakref.WeakKeyDictionary[Engine, _EngineWatch] = weakref.WeakKeyDictionary()
_watches_lock = threading.Lock()  # guards _watches and the one-time engine setup


def _info_of(dbapi_connection: Any) -> dict[Any, Any] | None:
    """The info dict of a Connection or of the pool's proxied connection;
    ``None`` for one without it: the ad-hoc connection of SQLAlchemy's first
    connect (whose ``info`` raises ``NotImplementedError``, which the dialect's
    ``initialize`` would take as "no server version"), a detached one, or a raw
    DBAPI connection, whose own ``info`` (psycopg's ``ConnectionInfo``) is not
    ours."""
    try:
        info = dbapi_connection.info
    except (AttributeError, NotImplementedError):
        return None
    return info if isinstance(info, dict) else None


def _wrap_dialect(engine: Engine, watch: _EngineWatch) -> None:
    """Wrap the engine's dialect methods that run statements and end transactions.

    Wrapping the dialect, rather than listening to engine events, keeps the
    engine on SQLAlchemy's event-free fast path and is the only way to run code
    after the driver's COMMIT: ``ConnectionEvents.commit`` fires before it.
    Each dialect instance belongs to one engine (and its ``execution_options``
    copies), and is wrapped once.
    """
    dialect = engine.dialect
    if getattr(dialect, "_sqla_cachelayer_wrapped", False):
        return
    watch_ref = weakref.ref(watch)
    do_execute = dialect.do_execute
    do_executemany = dialect.do_executemany
    do_execute_no_params = dialect.do_execute_no_params
    do_commit = dialect.do_commit
    do_commit_twophase = dialect.do_commit_twophase
    do_rollback = dialect.do_rollback

    def wrapped_execute(cursor: Any, statement: str, parameters: Any, context: Any = None) -> None:
        current = watch_ref() if context is not None else None
        if current is None:
            do_execute(cursor, statement, parameters, context)
            return
        if current.before_statement(statement, context):
            do_execute(cursor, statement, parameters, context)
            current.after_statement(context)  # only a write can need it
        else:
            do_execute(cursor, statement, parameters, context)

    def wrapped_executemany(
        cursor: Any, statement: str, parameters: Any, context: Any = None
    ) -> None:
        current = watch_ref() if context is not None else None
        if current is None:
            do_executemany(cursor, statement, parameters, context)
            return
        if current.before_statement(statement, context):
            do_executemany(cursor, statement, parameters, context)
            current.after_statement(context)  # only a write can need it
        else:
            do_executemany(cursor, statement, parameters, context)

    def wrapped_execute_no_params(cursor: Any, statement: str, context: Any = None) -> None:
        current = watch_ref() if context is not None else None
        if current is None:
            do_execute_no_params(cursor, statement, context)
            return
        if current.before_statement(statement, context):
            do_execute_no_params(cursor, statement, context)
            current.after_statement(context)  # only a write can need it
        else:
            do_execute_no_params(cursor, statement, context)

    def wrapped_commit(dbapi_connection: Any) -> None:
        do_commit(dbapi_connection)
        current = watch_ref()
        if current is not None:
            current.after_commit(_info_of(dbapi_connection))

    def wrapped_commit_twophase(connection: Any, xid: Any, *args: Any, **kw: Any) -> None:
        do_commit_twophase(connection, xid, *args, **kw)
        current = watch_ref()
        if current is not None:
            current.after_commit(connection.info)

    def wrapped_rollback(dbapi_connection: Any) -> None:
        info = _info_of(dbapi_connection)
        if info is not None:
            info.pop(_WRITTEN, None)  # nothing written reached the database
        do_rollback(dbapi_connection)

    dialect.do_execute = wrapped_execute  # type: ignore[method-assign]
    dialect.do_executemany = wrapped_executemany  # type: ignore[method-assign]
    dialect.do_execute_no_params = wrapped_execute_no_params  # type: ignore[method-assign]
    dialect.do_commit = wrapped_commit  # type: ignore[method-assign]
    dialect.do_commit_twophase = wrapped_commit_twophase  # type: ignore[method-assign]
    dialect.do_rollback = wrapped_rollback  # type: ignore[method-assign]
    dialect._sqla_cachelayer_wrapped = True  # type: ignore[attr-defined]


def watch_engine(engine: Engine, key: int, callback: CommitCallback) -> None:
    """Make ``callback(tables)`` run after every COMMIT on ``engine`` that wrote."""
    engine = engine.engine
    with _watches_lock:
        watch = _watches.get(engine)
        if watch is None:
            watch = _EngineWatch(engine)
            _watches[engine] = watch
            _wrap_dialect(engine, watch)
    watch.add(key, callback)


def unwatch_engine(engine: Engine, key: int) -> None:
    """Stop calling the callback registered under ``key``."""
    watch = _watches.get(engine.engine)
    if watch is not None:
        watch.discard(key)


def written_on(conn: Connection) -> set[str] | None:
    """Tables written on this connection's current transaction, if any."""
    found: set[str] | None = conn.info.get(_WRITTEN)
    return found
