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
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from typing import Any

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql import util as sql_util
from sqlalchemy.sql import visitors
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.schema import MetaData, Table
from sqlalchemy.sql.selectable import TableClause

from ._compat import is_autocommit_isolation
from ._fork import at_fork_in_child, renew_after_fork
from .invalidation import ALL_TABLES, ANY_TABLE
from .keys import BoundedMemo
from .rows import (
    MAX_WRITE_STAMPS,
    FlushRows,
    any_rows,
    delete_keys,
    key_columns,
    value_names,
)

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


class _CascadeIndex:
    """Which tables the database changes along with a written one, by name.

    Built from every ``MetaData`` this process has seen (the tables of the
    statements it ran, and the ORM's mapped classes): a foreign key declared
    ``ON DELETE`` / ``ON UPDATE`` ``CASCADE``, ``SET NULL`` or ``SET DEFAULT``
    makes its table change with the table it references, transitively. Names
    are bare (see :func:`table_name`), so two tables of one name in different
    schemas or metadatas expand alike: more invalidation, never less.

    Cascades the ``MetaData`` does not declare (a schema made by migrations
    the models do not describe, triggers) are not seen; see
    ``docs/invalidation.md``.
    """

    def __init__(self) -> None:
        # guards _metadatas and the rebuild of _index; lookups read _index lock-free
        self._lock = threading.Lock()
        self._metadatas: weakref.WeakSet[MetaData] = weakref.WeakSet()
        self._sizes: dict[int, int] = {}
        self._index: dict[str, frozenset[str]] = {}

    def note(self, metadata: MetaData | None) -> None:
        """Take ``metadata``'s foreign keys into account (cheap when known)."""
        if metadata is None:
            return
        if self._sizes.get(id(metadata)) == len(metadata.tables) and metadata in self._metadatas:
            return
        with self._lock:
            self._metadatas.add(metadata)
            self._rebuild()

    def note_mapped(self) -> None:
        """Take the metadata of every ORM registry into account."""
        for registry in _compat_mapper_registries():
            self.note(getattr(registry, "metadata", None))

    def _rebuild(self) -> None:
        referencing: dict[str, set[str]] = {}
        sizes: dict[int, int] = {}
        for metadata in list(self._metadatas):
            sizes[id(metadata)] = len(metadata.tables)
            for table in list(metadata.tables.values()):
                for fk in table.foreign_keys:
                    rules = {(fk.ondelete or "").upper(), (fk.onupdate or "").upper()}
                    if rules & {"CASCADE", "SET NULL", "SET DEFAULT"}:
                        target = table_name(fk.column.table)
                        referencing.setdefault(target, set()).add(table_name(table))
        index: dict[str, frozenset[str]] = {}
        for name in referencing:
            found = {name}
            todo = [name]
            while todo:
                for other in referencing.get(todo.pop(), ()):
                    if other not in found:
                        found.add(other)
                        todo.append(other)
            index[name] = frozenset(found)
        self._index = index  # replaced whole: readers see the old or the new one
        self._sizes = sizes

    def expand(self, names: frozenset[str]) -> frozenset[str]:
        """``names`` plus every table that cascades from them."""
        index = self._index
        if not index or index.keys().isdisjoint(names):
            return names
        out = set(names)
        for name in names:
            for other in index.get(name, ()):
                if other != name:
                    # rows the database changed by itself: not known
                    out.add(other)
                    out.add(any_rows(other))
        return frozenset(out)


def _compat_mapper_registries() -> list[Any]:
    # sqlalchemy.orm.mapperlib._mapper_registries: every live ORM registry
    # (checked on SQLAlchemy 2.0.30 to 2.1.9); none found is only less expansion
    from sqlalchemy.orm import mapperlib

    return list(getattr(mapperlib, "_mapper_registries", {}))


cascades = _CascadeIndex()


def _noted_name(table: TableClause) -> str:
    """The table's stamp name, its ``MetaData`` noted for cascades."""
    cascades.note(getattr(table, "metadata", None))
    return table_name(table)


def written_names(table: TableClause) -> frozenset[str]:
    """A written table plus those the database changes with it (FK cascades)."""
    return cascades.expand(frozenset((_noted_name(table),)))


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


# an upsert's own UPDATE clause names columns, not tables
_UPSERT = re.compile(
    r"\bon\s+conflict\b.*?\bdo\s+(?:update\s+set|nothing)\b|\bon\s+duplicate\s+key\s+update\b",
    re.I | re.S,
)
_TRUNCATE_CASCADE = re.compile(r"\btruncate\b[^;]*\bcascade\b", re.I)


def _written_by(text: str) -> frozenset[str]:
    if _TRUNCATE_CASCADE.search(text):
        # empties every table referencing these, whatever their ON DELETE rule
        return frozenset((ALL_TABLES,))
    text = _UPSERT.sub(" ", text)
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
_compiled_deletes: BoundedMemo[int, tuple[Any, Any]] = BoundedMemo(5000)
_compiled_cte_writes: BoundedMemo[int, tuple[Any, frozenset[str]]] = BoundedMemo(5000)


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
    found = {table_name(t) for t in tables if isinstance(t, TableClause)}
    for t in tables:
        cascades.note(getattr(t, "metadata", None))
    if not found or _has_text(stmt):
        # a text() fragment reads tables it does not name: it reads every table
        found.add(ANY_TABLE)
    names = frozenset(found)
    # hold a strong reference so the id cannot be reused while the memo lives
    _compiled_reads.put(id(compiled), (compiled, names))
    return names


def _inserted_rows(compiled: Any, context: Any) -> frozenset[str] | None:
    """The value stamps of the rows a plain INSERT adds, when its parameters
    give every key column of every row (association rows, Core and bulk
    inserts with their keys); None when they do not (a key left to the
    database, ``INSERT ... SELECT``, multi-row VALUES, an upsert)."""
    stmt = compiled.statement
    table = getattr(stmt, "table", None)
    if (
        not isinstance(table, Table)
        or getattr(stmt, "select", None) is not None
        or getattr(stmt, "_post_values_clause", None) is not None
        or getattr(stmt, "_multi_values", None)
    ):
        return None
    keys = key_columns(table)
    params = context.compiled_parameters or ()
    if not keys or not params or len(params) * len(keys) > MAX_WRITE_STAMPS:
        return None
    tname = table_name(table)
    bind_of = {c.name: c.key for c in table.columns}  # parameters are named by .key
    names: set[str] = set()
    for row in params:
        for column, kind in keys.items():
            found = value_names(tname, column.lower(), kind, [row.get(bind_of[column])])
            if found is None:
                return None
            names.update(found)
    return frozenset(names)


def _deleted_rows(compiled: Any, context: Any) -> frozenset[str] | None:
    """The value stamps of the rows a DELETE removes, when its WHERE equates
    every key column to a parameter (association rows the ORM deletes, Core
    deletes by full key); None otherwise."""
    memo = _compiled_deletes.get(id(compiled))
    if memo is None or memo[0] is not compiled:
        try:
            analysis = delete_keys(compiled)
        except Exception:  # a construct the analysis does not know: the whole table
            analysis = None
        memo = (compiled, analysis)
        _compiled_deletes.put(id(compiled), memo)
    analysis = memo[1]
    params = context.compiled_parameters or ()
    if analysis is None or not params:
        return None
    tname, keys = analysis
    if len(params) * len(keys) > MAX_WRITE_STAMPS:
        return None
    names: set[str] = {tname}
    for row in params:
        for column, kind, bind in keys:
            if bind not in row:
                return None
            found = value_names(tname, column.lower(), kind, [row[bind]])
            if found is None:
                return None
            names.update(found)
    return frozenset(names)


def _has_text(stmt: Any) -> bool:
    return any(
        getattr(element, "__visit_name__", "") in ("textclause", "textual_select")
        for element in visitors.iterate(stmt)
    )


def _cte_writes_of(compiled: Any) -> frozenset[str]:
    """Tables written by the data-modifying CTEs of a SELECT (PostgreSQL's
    ``WITH x AS (UPDATE ... RETURNING ...) SELECT ...``)."""
    memo = _compiled_cte_writes.get(id(compiled))
    if memo is not None and memo[0] is compiled:
        return memo[1]
    names: set[str] = set()
    for cte in list(compiled.ctes or ()):
        element = getattr(cte, "element", None)
        target = getattr(element, "table", None) if isinstance(element, UpdateBase) else None
        if target is not None:
            for t in sql_util.find_tables(target, include_aliases=True, include_joins=True):
                if isinstance(t, TableClause):
                    names.add(_noted_name(t))
    found = frozenset(names)
    _compiled_cte_writes.put(id(compiled), (compiled, found))
    return found


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
                names.add(_noted_name(t))
    # UPDATE ... FROM / DELETE ... USING and MySQL's multi-table UPDATE: the
    # other tables are on the compile state (the statement has no such field)
    compile_state = getattr(compiled, "compile_state", None)
    for extra in getattr(compile_state, "_extra_froms", ()) or ():
        for t in sql_util.find_tables(extra, include_aliases=True, include_joins=True):
            if isinstance(t, TableClause):
                names.add(_noted_name(t))
    found = frozenset(names) if names else frozenset((ALL_TABLES,))
    _compiled_writes.put(id(compiled), (compiled, found))
    return found


def _ddl_writes(compiled: Any) -> frozenset[str]:
    element = getattr(compiled.statement, "element", None)
    table = getattr(element, "table", element)
    if isinstance(table, TableClause):
        return frozenset((_noted_name(table),))
    return frozenset((ALL_TABLES,))


# --------------------------------------------------------------------------
# the read collector


class ReadCollector:
    """Tables read while one cache miss runs; flags writes seen meanwhile.

    ``main`` is the compiled form of the miss's own statement (the first SELECT
    it runs) and ``main_params`` its parameters; ``others`` the tables read by
    the rest (eager loads), and ``other_reads`` each of those statements as
    ``(compiled, parameters, tables)``: row-level invalidation pins a table an
    eager load reads only where the load's ``IN`` values are among the values
    the main statement pins (see :func:`sqla_cachelayer.rows.eager_pins`).
    """

    __slots__ = ("main", "main_params", "on_abort", "other_reads", "others", "tables", "wrote")

    def __init__(self) -> None:
        self.tables: set[str] = set()
        self.wrote = False
        self.main: Any = None
        self.main_params: Mapping[str, Any] | None = None
        self.others: set[str] = set()
        self.other_reads: list[tuple[Any, Mapping[str, Any] | None, frozenset[str]]] = []
        #: called once if a statement of the miss is stopped by a
        #: ``BaseException`` that is not an ``Exception`` (a cancelled
        #: coroutine), before SQLAlchemy's own cleanup of the connection
        self.on_abort: Callable[[], None] | None = None


def _aborted(err: BaseException) -> None:
    """A statement was stopped by ``err``: tell the miss running it, if any.

    SQLAlchemy answers a cancelled statement by discarding its connection,
    which may wait for the driver (aiosqlite closes a connection only after
    its running statement ends); the miss's waiters need not wait for that.
    """
    if isinstance(err, Exception):
        return
    collector = _collector.get()
    if collector is not None and collector.on_abort is not None:
        callback, collector.on_abort = collector.on_abort, None
        callback()


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


#: The rows of the installed session's flush running in this context (row-level
#: invalidation), or None; set and reset by the layer's flush hooks.
_flush_rows: ContextVar[FlushRows | None] = ContextVar("sqla_cachelayer_flush", default=None)
_COUNTED = "_sqla_cachelayer_counted"

_any_rows_memo: BoundedMemo[frozenset[str], frozenset[str]] = BoundedMemo(5000)


def _with_any_rows(names: frozenset[str]) -> frozenset[str]:
    """Written tables whose rows are not known: each one's ``<t>!`` stamp too."""
    if not names:
        return names
    found = _any_rows_memo.get(names)
    if found is None:
        found = names | {any_rows(n) for n in names if not n.startswith("*")}
        _any_rows_memo.put(names, found)
    return found


def add_written(conn: Connection, names: Iterable[str]) -> None:
    """Add stamp names to what this connection's transaction wrote."""
    info = _info_of(conn)
    if info is None:
        return
    pending = info.get(_WRITTEN)
    if pending is None:
        info[_WRITTEN] = pending = set()
    pending.update(names)


#: The collector of the miss being filled in this context, or None (eager loads
#: run inside a miss see it). The ContextVar's own ``get``: no Python frame.
current_collector: Callable[[], ReadCollector | None] = _collector.get


# --------------------------------------------------------------------------
# engine watch

CommitCallback = Callable[[frozenset[str]], None]


class _EngineWatch:
    """The listeners of one dialect, shared by every layer that knows it.

    One per dialect, not per ``Engine``: an engine's ``execution_options()``
    copies share its dialect, and a write through any of them must reach every
    layer watching any of them. The watch lives as long as its dialect (which
    holds it); it holds the layers' callbacks weakly.
    """

    def __init__(self) -> None:
        # the layers' callbacks, weakly; guarded by _lock for registration,
        # iterated over a snapshot
        self._lock = threading.Lock()
        self._callbacks: dict[int, weakref.WeakMethod[CommitCallback]] = {}
        renew_after_fork(self)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()

    def add(self, key: int, callback: CommitCallback) -> None:
        callbacks = self._callbacks

        def forget(ref: Any) -> None:
            # runs inside garbage collection, maybe while this thread holds
            # _lock: single dict operations only, no lock
            if callbacks.get(key) is ref:
                callbacks.pop(key, None)

        with self._lock:
            callbacks[key] = weakref.WeakMethod(callback, forget)

    def discard(self, key: int) -> None:
        with self._lock:
            self._callbacks.pop(key, None)

    def committed(self, tables: Iterable[str]) -> None:
        found = cascades.expand(frozenset(tables))
        for ref in list(self._callbacks.values()):
            callback = ref()
            if callback is not None:
                callback(found)

    # statement observation ------------------------------------------------
    def before_statement(self, statement: str, context: Any) -> bool:
        """Record what one statement reads (for a miss) and writes; True if it writes."""
        compiled = context.compiled
        collector = _collector.get()
        if compiled is None or _is_textual(compiled):
            written, reads = _textual(statement)
            written = _with_any_rows(written)
            if collector is not None and reads:
                collector.tables.add(ANY_TABLE)
                collector.others.add(ANY_TABLE)
        elif context.isinsert or context.isupdate or context.isdelete:
            written = _writes_of(compiled)
            flush = _flush_rows.get()
            if (
                flush is None
                or not flush.active()
                or context.execution_options.get("compiled_cache") is None
                or is_autocommit_isolation(context.root_connection)
            ):
                if context.isinsert:
                    rows = _inserted_rows(compiled, context)
                else:
                    rows = _deleted_rows(compiled, context) if context.isdelete else None
                written = _with_any_rows(written) if rows is None else written | rows
            elif not getattr(context, _COUNTED, False):
                # a statement of an installed session's flush: the ORM knows its
                # rows; count them, so the layer can check it knows them all
                setattr(context, _COUNTED, True)  # insertmanyvalues: one context, many calls
                count = len(context.compiled_parameters or ()) or 1
                for name in written:
                    flush.rows[name] = flush.rows.get(name, 0) + count
        elif context.isddl:
            written = _with_any_rows(_ddl_writes(compiled))
        else:
            if collector is not None:
                read = _reads_of(compiled)
                collector.tables.update(read)
                params = context.compiled_parameters
                one = params[0] if params and len(params) == 1 else None
                if collector.main is None:
                    collector.main = compiled
                    collector.main_params = one
                else:
                    collector.others.update(read)
                    collector.other_reads.append((compiled, one, read))
            if not compiled.ctes:
                return False
            written = _with_any_rows(_cte_writes_of(compiled))
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
        if info is not None and _WRITTEN in info and is_autocommit_isolation(conn):
            pending = info.pop(_WRITTEN, None)
            if pending:
                self.committed(pending)

    def after_commit(self, info: Any) -> None:
        pending = info.pop(_WRITTEN, None) if info is not None else None
        if pending:
            self.committed(pending)


_watches_lock = threading.Lock()  # guards the one-time wrapping of each dialect


@at_fork_in_child
def _renew_locks() -> None:
    global _watches_lock
    _watches_lock = threading.Lock()
    cascades._lock = threading.Lock()


_WATCH_ATTR = "_sqla_cachelayer_watch"


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


def _wrap_dialect(dialect: Any) -> _EngineWatch:
    """Wrap a dialect's methods that run statements and end transactions, once;
    return its watch.

    Wrapping the dialect, rather than listening to engine events, keeps the
    engine on SQLAlchemy's event-free fast path and is the only way to run code
    after the driver's COMMIT: ``ConnectionEvents.commit`` fires before it.
    """
    watch: _EngineWatch | None = getattr(dialect, _WATCH_ATTR, None)
    if watch is not None:
        return watch
    watch = _EngineWatch()
    do_execute = dialect.do_execute
    do_executemany = dialect.do_executemany
    do_execute_no_params = dialect.do_execute_no_params
    do_commit = dialect.do_commit
    do_commit_twophase = dialect.do_commit_twophase
    do_rollback = dialect.do_rollback
    before_statement = watch.before_statement
    after_statement = watch.after_statement

    def wrapped_execute(cursor: Any, statement: str, parameters: Any, context: Any = None) -> None:
        if context is not None and before_statement(statement, context):
            do_execute(cursor, statement, parameters, context)
            after_statement(context)  # only a write can need it
        else:
            try:
                do_execute(cursor, statement, parameters, context)
            except BaseException as err:
                _aborted(err)
                raise

    def wrapped_executemany(
        cursor: Any, statement: str, parameters: Any, context: Any = None
    ) -> None:
        if context is not None and before_statement(statement, context):
            do_executemany(cursor, statement, parameters, context)
            after_statement(context)  # only a write can need it
        else:
            do_executemany(cursor, statement, parameters, context)

    def wrapped_execute_no_params(cursor: Any, statement: str, context: Any = None) -> None:
        if context is not None and before_statement(statement, context):
            do_execute_no_params(cursor, statement, context)
            after_statement(context)  # only a write can need it
        else:
            try:
                do_execute_no_params(cursor, statement, context)
            except BaseException as err:
                _aborted(err)
                raise

    def wrapped_commit(dbapi_connection: Any) -> None:
        do_commit(dbapi_connection)
        watch.after_commit(_info_of(dbapi_connection))

    def wrapped_commit_twophase(connection: Any, xid: Any, *args: Any, **kw: Any) -> None:
        # taken first: PostgreSQL's COMMIT PREPARED path calls do_rollback
        # (which forgets the write set) before it returns
        info = _info_of(connection)
        pending = info.pop(_WRITTEN, None) if info is not None else None
        try:
            do_commit_twophase(connection, xid, *args, **kw)
        finally:
            # a failure may still have committed: invalidating is always safe
            if pending:
                watch.committed(pending)

    def wrapped_rollback(dbapi_connection: Any) -> None:
        info = _info_of(dbapi_connection)
        if info is not None:
            info.pop(_WRITTEN, None)  # nothing written reached the database
        do_rollback(dbapi_connection)

    dialect.do_execute = wrapped_execute
    dialect.do_executemany = wrapped_executemany
    dialect.do_execute_no_params = wrapped_execute_no_params
    dialect.do_commit = wrapped_commit
    dialect.do_commit_twophase = wrapped_commit_twophase
    dialect.do_rollback = wrapped_rollback
    setattr(dialect, _WATCH_ATTR, watch)
    return watch


def watch_engine(engine: Engine, key: int, callback: CommitCallback) -> None:
    """Make ``callback(tables)`` run after every COMMIT that wrote, through any
    engine sharing ``engine``'s dialect (its ``execution_options()`` copies)."""
    with _watches_lock:
        watch = _wrap_dialect(engine.dialect)
    cascades.note_mapped()
    watch.add(key, callback)


def unwatch_engine(engine: Engine, key: int) -> None:
    """Stop calling the callback registered under ``key``."""
    watch: _EngineWatch | None = getattr(engine.dialect, _WATCH_ATTR, None)
    if watch is not None:
        watch.discard(key)


def written_on(conn: Connection) -> set[str] | None:
    """Tables written on this connection's current transaction, if any."""
    found: set[str] | None = conn.info.get(_WRITTEN)
    return found
