"""Row-level invalidation: which rows a result can contain, which rows a write touched.

With ``cachelayer.invalidation = row`` (the default), a cached result depends,
table by table, either on the *whole table* or on *values of key columns*:

* a table's key columns are its primary key, foreign key, unique and indexed
  columns, plus ``cachelayer.tables.<table>.keys`` (:func:`key_columns`). They
  come from the ``MetaData``, so every process agrees on them without asking
  the backend;
* a result depends on values when its statement's WHERE, for that table, is a
  conjunction that includes ``column = value`` or ``column IN (values)`` on a
  key column (:func:`pins_of`); a pin carries over equi-joins
  (``employees.id = managers.id``, so joined inheritance pins both tables).
  Anything else (no pin, the table aliased or inside a subquery, an eager load
  run for the result, more than :data:`MAX_IN_VALUES` values) depends on the
  whole table.

The stamps behind this, beside the table stamps of the protocol
(:mod:`sqla_cachelayer.invalidation`):

=====================  ===================================================================
``<t>``                moved by every write to ``t``; read by results that depend on
                       the whole table
``<t>!``               moved by writes to ``t`` whose rows are not known (Core and bulk
                       DML, textual SQL, DDL, a key value never loaded); read by results
                       that depend on values of ``t``
``<t>.<col>#<n>``      moved by a known row whose ``col`` had (before or after the write)
                       a value hashing to bucket ``n``; read by results pinned on such a
                       value
=====================  ===================================================================

Values map to :data:`BUCKETS` buckets per column, alike in every process, so
the number of stamps stays bounded whatever the data; two values sharing a
bucket only invalidate each other's results. An integer goes to its remainder
modulo :data:`BUCKETS` (a prime): consecutive integers, such as the ids of a
table of fewer rows, never share a bucket, and values in a power-of-two stride
spread evenly. Other values go to a BLAKE2b hash of their normal form, modulo
the same number.

Values are compared as the database would compare them, erring towards
equality: numbers by their numeric value (``1``, ``1.0``, ``True`` and
``Decimal("1.00")`` are one value), strings case- and accent-folded with
trailing spaces dropped (so case-insensitive and padding collations are
covered), UUIDs by their 128 bits whether given as ``UUID`` or text. A value
of a type the column does not hold (``id == "5"`` on an integer column, which
SQLite's type affinity may still match) is not pinned: the result depends on
the whole table. Only integer, string and UUID key columns are pinned at all.
"""

from __future__ import annotations

import decimal
import hashlib
import threading
import unicodedata
import uuid
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, NamedTuple

from sqlalchemy import types as sqltypes
from sqlalchemy.orm.base import NEVER_SET, NO_VALUE
from sqlalchemy.sql import operators, visitors
from sqlalchemy.sql.elements import (
    BinaryExpression,
    BindParameter,
    BooleanClauseList,
    ColumnClause,
    Grouping,
)
from sqlalchemy.sql.schema import Column, Table
from sqlalchemy.sql.selectable import Join, Select

from ._fork import at_fork_in_child
from .keys import BoundedMemo

__all__ = [
    "BUCKETS",
    "MAX_IN_VALUES",
    "Pin",
    "any_rows",
    "eager_pins",
    "key_columns",
    "pins_of",
    "value_names",
]

#: buckets per key column: bounds the number of value stamps per column. A
#: prime, the largest below 2**14: integers map to their remainder, so any run
#: of consecutive integers shorter than this has a stamp per value. Every
#: process sharing a backend must use the same mapping (it is the protocol)
BUCKETS: Final = 16381
#: an ``IN`` list longer than this makes the result depend on the whole table
MAX_IN_VALUES: Final = 64
#: a write that would move more value stamps than this moves its tables' ``<t>!``
MAX_WRITE_STAMPS: Final = 2000


def any_rows(table: str) -> str:
    """The stamp moved by writes to ``table`` whose rows are not known."""
    return table + "!"


def describe(names: Iterable[str]) -> tuple[list[str], list[str] | None]:
    """The tables an invalidation moved, and its value stamps (None if none),
    for people: ``(["items"], ["items.category_id#1234"])``."""
    tables: set[str] = set()
    values: list[str] = []
    for name in names:
        if "#" in name:
            values.append(name)
            tables.add(name.rsplit(".", 1)[0])
        else:
            tables.add(name.removesuffix("!"))
    return sorted(tables), sorted(values) or None


# --------------------------------------------------------------------------
# key columns


# table name -> extra key column names (cachelayer.tables.<table>.keys), the
# union over every layer of the process: a write must move every stamp any
# layer's results may read. Replaced whole under _extra_lock, read lock-free.
_extra_keys: dict[str, frozenset[str]] = {}
_extra_lock = threading.Lock()


@at_fork_in_child
def _renew_extra_lock() -> None:
    global _extra_lock
    _extra_lock = threading.Lock()


_key_columns: weakref.WeakKeyDictionary[Table, tuple[int, dict[str, str]]] = (
    weakref.WeakKeyDictionary()
)


def add_extra_keys(extra: Mapping[str, Iterable[str]]) -> None:
    """Declare more key columns (``cachelayer.tables.<table>.keys``)."""
    global _extra_keys
    with _extra_lock:
        merged = dict(_extra_keys)
        for table, columns in extra.items():
            merged[table.lower()] = merged.get(table.lower(), frozenset()) | {
                c.lower() for c in columns
            }
        _extra_keys = merged
        _key_columns.clear()


def _kind(column: Any) -> str | None:
    """How values of ``column`` are compared: ``int``, ``str``, ``uuid``, or
    None for types that are not pinned."""
    type_ = getattr(column, "type", None)
    if isinstance(type_, sqltypes.Integer):
        return "int"
    if isinstance(type_, sqltypes.Uuid):
        return "uuid"
    if isinstance(type_, sqltypes.String) and not isinstance(type_, sqltypes.Enum):
        return "str"
    return None


def key_columns(table: Table) -> dict[str, str]:
    """The key columns of ``table`` that can be pinned: name -> kind."""
    found = _key_columns.get(table)
    generation = id(_extra_keys)
    if found is not None and found[0] == generation:
        return found[1]
    extra = _extra_keys.get(table.name.lower(), frozenset())
    keyed: set[str] = {c.name for c in table.primary_key.columns}
    keyed.update(fk.parent.name for fk in table.foreign_keys)
    for column in table.columns:
        if column.unique or column.index or column.name.lower() in extra:
            keyed.add(column.name)
    for constraint in table.constraints:
        if constraint.__visit_name__ in ("unique_constraint", "primary_key_constraint"):
            keyed.update(c.name for c in getattr(constraint, "columns", ()))
    for index in table.indexes:
        keyed.update(c.name for c in index.columns if isinstance(c, Column))
    by_name = {c.name: c for c in table.columns}  # table.columns is keyed by .key
    kinds = {}
    for name in sorted(keyed):
        kind = _kind(by_name[name]) if name in by_name else None
        if kind is not None:
            kinds[name] = kind
    _key_columns[table] = (generation, kinds)
    return kinds


# --------------------------------------------------------------------------
# values


def _fold(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    bare = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return bare.casefold().rstrip(" ")


def normal(kind: str, value: Any) -> str | None:
    """``value`` as the database would compare it in a column of ``kind``;
    None when it cannot be told (the caller falls back to the whole table)."""
    t = type(value)
    if kind == "int":
        if t is int or t is bool:
            return f"i{int(value)}"
        finite = (t is float or t is decimal.Decimal) and value - value == 0  # not NaN, inf
        if finite:
            if value == int(value):
                return f"i{int(value)}"
            return "n" + str(decimal.Decimal(str(value)).normalize())
        return None
    if kind == "str":
        if t is str:
            return "s" + _fold(value)
        return None
    if kind == "uuid":
        if t is uuid.UUID:
            return "u" + str(value.hex)
        if t is str:
            try:
                return "u" + uuid.UUID(value).hex
            except ValueError:
                return None
        return None
    return None


_buckets: BoundedMemo[str, int] = BoundedMemo(50_000)


def _bucket(normalized: str) -> int:
    found = _buckets.get(normalized)
    if found is None:
        if normalized[0] == "i":  # an integer (see normal): exact below BUCKETS
            found = int(normalized[1:]) % BUCKETS
        else:
            digest = hashlib.blake2b(normalized.encode(), digest_size=8).digest()
            found = int.from_bytes(digest, "big") % BUCKETS
        _buckets.put(normalized, found)
    return found


def value_name(table: str, column: str, normalized: str) -> str:
    """The stamp of one (bucketed) value of a key column."""
    return f"{table}.{column}#{_bucket(normalized)}"


def value_names(table: str, column: str, kind: str, values: Iterable[Any]) -> list[str] | None:
    """The stamps of these values of ``table.column``; None if one cannot be told."""
    names = []
    for value in values:
        # None included: a NULL pin finds no row, but a value missing from the
        # parameters also reads as None; the whole table is the safe answer
        normalized = normal(kind, value)
        if normalized is None:
            return None
        names.append(value_name(table, column, normalized))
    return names


# --------------------------------------------------------------------------
# reads: which values a statement pins


class Pin(NamedTuple):
    """``table.column`` is pinned to the value(s) of one bound parameter.

    The value is found as SQLAlchemy's ``construct_params`` finds it: by the
    parameter's key or compiled ``name`` among the parameters given with
    ``.params()`` or at execute time, else from the bound parameter at
    ``position`` among the statement's extracted ones (``CacheKey.bindparams``).
    """

    table: str
    column: str
    kind: str
    name: str
    position: int | None
    expanding: bool

    def values(self, binds: Sequence[Any], params: Mapping[str, Any] | None) -> list[Any] | None:
        """The pinned value(s) for one execution, from the statement's
        extracted bound parameters (``CacheKey.bindparams``) and the
        ``.params()`` / execute-time parameters; None if they cannot be told."""
        position = self.position
        bind = binds[position] if position is not None and position < len(binds) else None
        if params and bind is not None and bind.key in params:
            value = params[bind.key]
        elif params and self.name in params:
            value = params[self.name]
        elif bind is not None:
            value = bind.effective_value
        else:
            return None
        if self.expanding:
            if not isinstance(value, (list, tuple)) or len(value) > MAX_IN_VALUES:
                return None
            return list(value)
        return [value]

    def spec(self) -> str:
        """This pin as an item of a dependency spec (the same in every process)."""
        position = "" if self.position is None else str(self.position)
        flag = int(self.expanding)
        return f"{PIN}{self.table}.{self.column}:{self.kind}:{self.name}:{position}:{flag}"

    @classmethod
    def from_spec(cls, item: str) -> Pin:
        target, kind, name, position, expanding = item[len(PIN) :].split(":")
        table, column = target.rsplit(".", 1)
        return cls(table, column, kind, name, int(position) if position else None, expanding == "1")


#: marks a pin in a dependency spec
PIN: Final = "="


def spec_of(tables: Iterable[str], pins: Iterable[Pin]) -> tuple[str, ...]:
    """A result's dependency spec: the tables it read (all of them: G2 reads
    them) and, for pinned tables, ``<t>!`` and the pin. The same for every
    execution of one statement structure; :func:`stamp_names` turns it into
    the stamps of one execution."""
    items = set(tables)
    for pin in pins:
        items.add(any_rows(pin.table))
        items.add(pin.spec())
    return tuple(sorted(items))


# spec -> (its items that are stamps as they are, its pins)
_split: BoundedMemo[tuple[str, ...], tuple[tuple[str, ...], tuple[Pin, ...]]] = BoundedMemo(5000)


def _split_spec(spec: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[Pin, ...]]:
    found = _split.get(spec)
    if found is None:
        pins = tuple(Pin.from_spec(i) for i in spec if i.startswith(PIN))
        pinned = {p.table for p in pins}
        base = tuple(i for i in spec if not i.startswith(PIN) and i not in pinned)
        found = (base, pins) if pins else (spec, ())
        _split.put(spec, found)
    return found


def stamp_names(
    spec: tuple[str, ...],
    binds: Sequence[Any],
    statement_params: Mapping[str, Any] | None,
    execute_params: Any,
) -> tuple[str, ...]:
    """The stamps one execution of a statement depends on: ``spec`` itself
    when nothing is pinned (the same object: the hit path compares by
    identity first), else its pinned tables' value stamps in their place (the
    whole table where a value cannot be told)."""
    base, pins = _split_spec(spec)
    if not pins:
        return spec
    params: Mapping[str, Any] | None
    if not isinstance(execute_params, dict) and not isinstance(execute_params, Mapping):
        execute_params = None  # executemany-style lists never reach a cached SELECT
    if statement_params and execute_params:
        params = {**statement_params, **execute_params}  # as construct_params merges them
    else:
        params = statement_params or execute_params
    if len(pins) == 1:
        # the usual case (a lookup by id, a list by foreign key), memoized by
        # value: values equal in Python normalize alike (1, 1.0, True: "i1")
        pin = pins[0]
        values = pin.values(binds, params)
        if values is None:
            return (*base, pin.table)
        memo_key = (spec, *values)
        try:
            found = _names.get(memo_key)
        except TypeError:  # an unhashable value: not memoized
            return (*base, *(value_names(pin.table, pin.column, pin.kind, values) or [pin.table]))
        if found is None:
            names = value_names(pin.table, pin.column, pin.kind, values)
            found = (*base, *(names if names is not None else [pin.table]))
            _names.put(memo_key, found)
        return found
    collected = list(base)
    for pin in pins:
        values = pin.values(binds, params)
        names = None if values is None else value_names(pin.table, pin.column, pin.kind, values)
        if names is None:
            collected.append(pin.table)
        else:
            collected.extend(names)
    return tuple(collected)


# (spec, value...) -> the stamps of that execution (single-pin specs)
_names: BoundedMemo[tuple[Any, ...], tuple[str, ...]] = BoundedMemo(20_000)


def _conjuncts(clause: Any) -> list[Any]:
    if clause is None:
        return []
    while isinstance(clause, Grouping):
        clause = clause.element
    if isinstance(clause, BooleanClauseList) and clause.operator is operators.and_:
        out: list[Any] = []
        for part in clause.clauses:
            out.extend(_conjuncts(part))
        return out
    return [clause]


def _direct_tables(froms: Iterable[Any], out: list[Table], onclauses: list[Any]) -> None:
    for element in froms:
        if isinstance(element, Table):
            out.append(element)
        elif isinstance(element, Join):
            _direct_tables((element.left, element.right), out, onclauses)
            onclauses.append(element.onclause)


def _nested_tables(stmt: Select[Any]) -> set[Table]:
    """Tables that appear inside a subquery, alias, CTE or nested SELECT."""
    nested: set[Table] = set()
    for element in visitors.iterate(stmt):
        if element is stmt:
            continue
        visit = getattr(element, "__visit_name__", "")
        if visit in ("alias", "subquery", "cte", "select", "lateral", "tablesample", "values"):
            nested.update(t for t in visitors.iterate(element) if isinstance(t, Table))
    return nested


def _column_of(element: Any, direct: set[Table]) -> Column[Any] | None:
    while isinstance(element, Grouping):
        element = element.element
    if isinstance(element, ColumnClause) and getattr(element, "table", None) in direct:
        return element  # type: ignore[return-value]
    return None


def _bind_positions(compiled: Any) -> dict[Any, int]:
    """Compiled bind parameter -> its position in the statement's extracted
    values (``CacheKey.bindparams``), as ``construct_params`` relates them.

    Reads ``compiled.cache_key`` and ``compiled._cache_key_bind_match`` (a
    ``(dict, ...)`` tuple in SQLAlchemy 2.1, a dict in 2.0; checked on 2.0.30
    to 2.1.9); without them, values come only from named parameters.
    """
    cache_key = getattr(compiled, "cache_key", None)
    match = getattr(compiled, "_cache_key_bind_match", None)
    if cache_key is None or match is None:
        return {}
    if isinstance(match, tuple):
        match = match[0]
    positions: dict[Any, int] = {}
    for index, original in enumerate(cache_key[1]):
        for bind in match.get(original, ()):
            positions.setdefault(bind, index)
    return positions


def pins_of(compiled: Any) -> dict[str, Pin]:
    """Tables a compiled SELECT pins, each to one bound parameter (primary key
    columns preferred); computed once per statement structure."""
    stmt = getattr(getattr(compiled, "compile_state", None), "statement", None)
    if not isinstance(stmt, Select):
        return {}
    direct_list: list[Table] = []
    onclauses: list[Any] = []
    _direct_tables(stmt.get_final_froms(), direct_list, onclauses)
    nested = _nested_tables(stmt)
    direct = {t for t in direct_list if t not in nested}
    if not direct:
        return {}
    positions = _bind_positions(compiled)
    bind_names = compiled.bind_names
    # (table, column) -> the bind parameter it equals or is IN
    bound: dict[tuple[Table, str], BindParameter[Any]] = {}
    equal: list[tuple[Column[Any], Column[Any]]] = []
    conjuncts = _conjuncts(stmt.whereclause)
    for onclause in onclauses:
        conjuncts.extend(_conjuncts(onclause))
    for crit in conjuncts:
        if not isinstance(crit, BinaryExpression):
            continue
        op = crit.operator
        left, right = crit.left, crit.right
        if op is operators.eq:
            lcol, rcol = _column_of(left, direct), _column_of(right, direct)
            if lcol is not None and rcol is not None:
                equal.append((lcol, rcol))
            elif lcol is not None and isinstance(right, BindParameter):
                bound.setdefault((lcol.table, lcol.name), right)
            elif rcol is not None and isinstance(left, BindParameter):
                bound.setdefault((rcol.table, rcol.name), left)
        elif op is operators.in_op:
            lcol = _column_of(left, direct)
            if lcol is not None and isinstance(right, BindParameter) and right.expanding:
                bound.setdefault((lcol.table, lcol.name), right)
    # a pin carries over equalities between columns (joins, inheritance)
    changed = True
    while changed and equal:
        changed = False
        for a, b in equal:
            for x, y in ((a, b), (b, a)):
                source = bound.get((x.table, x.name))
                if source is not None and (y.table, y.name) not in bound:
                    bound[(y.table, y.name)] = source
                    changed = True
    pins: dict[str, Pin] = {}
    for table in sorted(direct, key=lambda t: t.name):
        keys = key_columns(table)
        primary = [c.name for c in table.primary_key.columns]
        candidates = [c for c in primary if c in keys] + sorted(c for c in keys if c not in primary)
        for column in candidates:
            bind = bound.get((table, column))
            if bind is None:
                continue
            name = bind_names.get(bind)
            if name is None:
                continue
            tname = table.name.lower()
            pins[tname] = Pin(
                tname, column.lower(), keys[column], name, positions.get(bind), bool(bind.expanding)
            )
            break
    # a table read twice at the top level (a self-join without alias cannot
    # be written) is in direct once; a name shared by two schemas is not pinned
    names = [t.name.lower() for t in direct]
    return {n: p for n, p in pins.items() if names.count(n) == 1}


def executed_values(
    params: Mapping[str, Any], name: str, expanding: bool, compiled: Any
) -> list[Any] | None:
    """The value(s) of bind parameter ``name`` of ``compiled`` in the
    parameters it was executed with (``compiled_parameters``); None if they
    cannot be told. An expanding ``IN`` parameter ``n`` is executed as
    ``n_1``, ``n_2``, ...; a statement with a parameter of its own named like
    one of those is not read (its values could not be told apart)."""
    if not expanding:
        return [params[name]] if name in params else None
    own = set(compiled.bind_names.values())
    values: list[Any] = []
    while (key := f"{name}_{len(values) + 1}") in params:
        if key in own:
            return None
        values.append(params[key])
    if not values and name in params:  # not expanded (an empty IN, a dialect that does not)
        found = params[name]
        return list(found) if isinstance(found, (list, tuple)) else None
    return values


def _normalized(kind: str, values: Iterable[Any]) -> set[str] | None:
    found = set()
    for value in values:
        normalized = normal(kind, value)
        if normalized is None:
            return None
        found.add(normalized)
    return found


# compiled statement -> its pins (eager loads; the main statement's live on its shape)
_compiled_pins: BoundedMemo[int, tuple[Any, dict[str, Pin]]] = BoundedMemo(2000)


def _pins_of_compiled(compiled: Any) -> dict[str, Pin]:
    memo = _compiled_pins.get(id(compiled))
    if memo is None or memo[0] is not compiled:
        try:
            found = pins_of(compiled)
        except Exception:  # a construct the analysis does not know: whole tables
            found = {}
        memo = (compiled, found)  # holds the compiled: its id is not reused meanwhile
        _compiled_pins.put(id(compiled), memo)
    return memo[1]


def eager_pins(
    main: Mapping[str, Pin],
    main_compiled: Any,
    main_params: Mapping[str, Any] | None,
    others: Iterable[tuple[Any, Mapping[str, Any] | None, frozenset[str]]],
) -> tuple[list[Pin], set[str]]:
    """Pins for the tables read by the other statements of a miss (eager
    loads such as ``selectinload``), and the tables that stay whole.

    A table an eager load reads is pinned when the load pins it (``IN`` or
    ``=`` on a key column) to values that are all among the values of one of
    the main statement's pins in this execution: a ``selectinload`` of the
    items of ``categories.id = 3`` reads ``items.category_id IN (3)``. The pin
    recorded takes its values from the main statement's parameter, so every
    execution reads the stamps of the main pin's values (a superset of the
    load's), computed before the lookup as for any pin. This holds for the
    entry it is stored with, whose key carries these same values: the load's
    values come from rows the entry's other dependencies already cover.
    """
    derived: list[Pin] = []
    whole: set[str] = set()
    if main_params is None:
        main = {}
    parents: list[tuple[Pin, list[Any]]] = []
    for pin in main.values():
        values = executed_values(main_params or {}, pin.name, pin.expanding, main_compiled)
        if values is not None and len(values) <= MAX_IN_VALUES:
            parents.append((pin, values))
    for compiled, params, tables in others:
        pins = _pins_of_compiled(compiled) if params is not None and parents else {}
        for table in tables:
            loaded = pins.get(table)
            if loaded is None or params is None:
                whole.add(table)
                continue
            values = executed_values(params, loaded.name, loaded.expanding, compiled)
            wanted = None if values is None else _normalized(loaded.kind, values)
            source = None
            if wanted is not None:
                for parent, parent_values in parents:
                    offered = _normalized(loaded.kind, parent_values)
                    if offered is not None and wanted <= offered:
                        source = parent
                        break
            if source is None:
                whole.add(table)
            else:
                derived.append(
                    loaded._replace(
                        name=source.name, position=source.position, expanding=source.expanding
                    )
                )
    return derived, whole


# --------------------------------------------------------------------------
# writes: which values a DELETE by its keys removes


def delete_keys(compiled: Any) -> tuple[str, tuple[tuple[str, str, str], ...]] | None:
    """For a compiled single-table DELETE whose WHERE, as a conjunction,
    equates *every* key column of the table to a bound parameter (as the ORM
    deletes association rows: ``user_id = ? AND keyword_id = ?``): the table's
    stamp name and ``(column, kind, parameter name)`` per key column. Every
    row it deletes then has those values, whatever the rest of the WHERE.
    None for anything else (a key column not pinned, ``IN``, ``DELETE ...
    USING``, a table with no key columns)."""
    stmt = getattr(compiled, "statement", None)
    table = getattr(stmt, "table", None)
    if not isinstance(table, Table) or getattr(stmt, "__visit_name__", "") != "delete":
        return None
    if getattr(getattr(compiled, "compile_state", None), "_extra_froms", None):
        return None
    keys = key_columns(table)
    if not keys:
        return None
    bind_names = compiled.bind_names
    found: dict[str, str] = {}
    for crit in _conjuncts(getattr(stmt, "whereclause", None)):
        if not isinstance(crit, BinaryExpression) or crit.operator is not operators.eq:
            continue
        for col, bind in ((crit.left, crit.right), (crit.right, crit.left)):
            column = _column_of(col, {table})
            if (
                column is not None
                and column.name in keys
                and isinstance(bind, BindParameter)
                and not bind.expanding
                and bind in bind_names
            ):
                found.setdefault(column.name, bind_names[bind])
    if found.keys() != keys.keys():
        return None
    return table.name.lower(), tuple((c, keys[c], found[c]) for c in sorted(found))


# --------------------------------------------------------------------------
# writes: which values an ORM flush touched


class FlushRows:
    """What one flush of an installed session wrote, as the engine saw it and
    as the ORM knows it; kept in a ContextVar while the flush runs."""

    __slots__ = ("rows", "session")

    def __init__(self, session: Any) -> None:
        self.session = session
        #: rows written per table, counted by the engine's statements
        self.rows: dict[str, int] = {}

    def active(self) -> bool:
        return bool(self.session._flushing)


def _loaded(state: Any, key: str, old: bool) -> tuple[bool, Any]:
    """(known, value) of an attribute before (``old``) or after the flush."""
    if old and key in state.committed_state:
        value = state.committed_state[key]
        # NO_VALUE / NEVER_SET: the value before the change was never loaded
        return (value is not NO_VALUE and value is not NEVER_SET, value)
    if key in state.dict:
        return True, state.dict[key]
    return False, None


def flushed_names(
    new: Iterable[Any], dirty: Iterable[Any], deleted: Iterable[Any]
) -> tuple[dict[str, int], set[str], set[str]]:
    """For the states of one flush: rows expected per table, value stamps of
    the old and new values of every key column, and tables whose rows cannot
    all be told (their ``<t>!`` stamp must move)."""
    expected: dict[str, int] = {}
    names: set[str] = set()
    unknown: set[str] = set()
    work = [(s, "new") for s in new] + [(s, "dirty") for s in dirty]
    work += [(s, "deleted") for s in deleted]
    for state, how in work:
        mapper = state.mapper
        for table in mapper.tables:
            if not isinstance(table, Table):
                continue
            tname = table.name.lower()
            columns = [(c, mapper._columntoproperty.get(c)) for c in table.columns]
            if how == "dirty":
                changed = False
                for _column, prop in columns:
                    if prop is None or prop.key not in state.committed_state:
                        continue
                    before = state.committed_state[prop.key]
                    if before is NO_VALUE or before is NEVER_SET:
                        changed = True  # set without the old value loaded
                        unknown.add(tname)
                    elif before != state.dict.get(prop.key, NO_VALUE):
                        changed = True
                if not changed:
                    continue  # no UPDATE of this table for this object
            expected[tname] = expected.get(tname, 0) + 1
            by_name = {c.name: c for c in table.columns}
            for cname, kind in key_columns(table).items():
                prop = mapper._columntoproperty.get(by_name[cname])
                if prop is None:
                    unknown.add(tname)
                    continue
                values = []
                for old in (True, False) if how == "dirty" else ((how == "deleted"),):
                    known, value = _loaded(state, prop.key, old)
                    if not known:
                        unknown.add(tname)
                        break
                    values.append(value)
                found = value_names(tname, cname.lower(), kind, values)
                if found is None:
                    unknown.add(tname)
                else:
                    names.update(found)
    return expected, names, unknown
