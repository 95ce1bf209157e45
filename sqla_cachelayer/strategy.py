"""What a cached result depends on, and what an invalidation moves.

The protocol of :mod:`sqla_cachelayer.invalidation` compares *stamps*: an
entry is served while none of the stamps it depends on moved past the point
its result was read. Which stamps a result depends on, and which a write or
``layer.invalidate()`` moves, is this module's: one interface,
:class:`InvalidationStrategy`, and two implementations chosen by
``cachelayer.invalidation``:

* :class:`TableInvalidation` (``table``): a result depends on the tables it
  read; a write moves the tables it wrote.
* :class:`RowInvalidation` (``row``, the default): a result depends on the
  key-column values its SELECT pins, table by table, or on the whole table;
  a flush moves the values of the rows it wrote (see :mod:`sqla_cachelayer.rows`).

A strategy of your own subclasses the interface; the layer takes it as
``CacheLayer(..., invalidation=MyStrategy())``. For instance, one that treats a
``tenant_id`` column as the only key of every table (tenants never see each
other's writes)::

    from sqla_cachelayer.rows import any_rows, value_names
    from sqla_cachelayer.strategy import InvalidationStrategy

    class PerTenant(InvalidationStrategy):
        name = "tenant"

        def spec(self, shape, collector):
            tenant = shape.tenant            # known from the statement
            return tuple(sorted(collector.tables)) + (f"tenant#{tenant}",)

        def stamp_names(self, spec, ck, execute_params):
            return spec

        def flush_events(self):
            return {"after_flush": record_tenants_written}

Every name a strategy returns is a stamp in the backend; the pseudo-stamps
``*all*`` (moved by ``invalidate_all()``, read by every entry) and ``*any*``
(moved by every write) are added by the layer. A strategy must err towards
more invalidation: a result may depend on more stamps than it needs, a write
may move more, never fewer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import Table
from sqlalchemy.orm import Session

from ._compat import cache_key_params
from .exc import ConfigurationError
from .rows import (
    MAX_WRITE_STAMPS,
    FlushRows,
    any_rows,
    eager_pins,
    flushed_names,
    key_columns,
    pins_of,
    spec_of,
    stamp_names,
    value_names,
)
from .tracking import _flush_rows, add_written, table_name

__all__ = ["InvalidationStrategy", "RowInvalidation", "TableInvalidation", "strategy_for"]


class InvalidationStrategy(ABC):
    """Which stamps a result depends on and which stamps a write moves."""

    #: the ``cachelayer.invalidation`` value that selects it
    name: str = ""

    @abstractmethod
    def spec(self, shape: Any, collector: Any) -> tuple[str, ...]:
        """A result's dependency spec, from what its miss read (``collector``:
        :class:`~sqla_cachelayer.tracking.ReadCollector`); the same for every
        execution of one statement structure (``shape``), stored with the
        entry, and containing the name of every table read (G2 compares it
        with the tables a transaction wrote)."""

    @abstractmethod
    def stamp_names(self, spec: tuple[str, ...], ck: Any, execute_params: Any) -> tuple[str, ...]:
        """The stamps one execution of a statement reads, from its spec and
        its values (``ck``: SQLAlchemy's ``CacheKey``). Runs on every hit:
        return ``spec`` itself when it holds no values."""

    def table_stamps(self, table: str) -> tuple[str, ...]:
        """The stamps ``layer.invalidate(table)`` moves."""
        return (table, any_rows(table))

    def row_stamps(self, target: Any, values: Mapping[str, Any]) -> set[str]:
        """The stamps ``layer.invalidate(target, column=value, ...)`` moves."""
        return {n for t in _tables_of(target, values) for n in self.table_stamps(table_name(t))}

    def flush_events(self) -> dict[str, Callable[..., None]]:
        """Session events to hook while installed (name -> listener)."""
        return {}


def _tables_of(target: Any, values: Mapping[str, Any]) -> list[Table]:
    """The tables of ``target`` holding the columns named in ``values``."""
    from sqlalchemy import inspect

    if isinstance(target, Table):
        tables = [target]
    else:
        try:
            tables = [t for t in inspect(target).mapper.tables if isinstance(t, Table)]
        except Exception:
            raise TypeError(
                f"invalidate(target, column=value) takes a mapped class or a Table; got {target!r}"
            ) from None
    found = []
    for column, value in values.items():
        table = next((t for t in tables if column in t.columns), None)
        if table is None:
            raise ConfigurationError(
                f"invalidate(): {target!r} has no column {column!r}", key=column, value=value
            )
        found.append(table)
    return found


class TableInvalidation(InvalidationStrategy):
    """``cachelayer.invalidation = table``: a result depends on every table it read."""

    name = "table"

    def spec(self, shape: Any, collector: Any) -> tuple[str, ...]:
        return tuple(sorted(collector.tables))

    def stamp_names(self, spec: tuple[str, ...], ck: Any, execute_params: Any) -> tuple[str, ...]:
        return spec


class RowInvalidation(InvalidationStrategy):
    """``cachelayer.invalidation = row``: a result depends on the key-column
    values its SELECT pins, or on the whole table (:mod:`sqla_cachelayer.rows`)."""

    name = "row"

    def spec(self, shape: Any, collector: Any) -> tuple[str, ...]:
        if collector.main is None:
            return tuple(sorted(collector.tables))
        pins = shape.pins
        if pins is None:
            try:
                pins = pins_of(collector.main)
            except Exception:  # a construct the analysis does not know: whole tables
                pins = {}
            shape.pins = pins
        if not collector.others:
            return spec_of(collector.tables, pins.values())
        # a table an eager load (or any other statement of the miss) reads is
        # pinned where the load's values are among a main pin's, else whole
        derived, whole = eager_pins(
            pins, collector.main, collector.main_params, collector.other_reads
        )
        return spec_of(
            collector.tables,
            [p for t, p in pins.items() if t not in whole]
            + [p for p in derived if p.table not in whole],
        )

    def stamp_names(self, spec: tuple[str, ...], ck: Any, execute_params: Any) -> tuple[str, ...]:
        return stamp_names(spec, ck.bindparams, cache_key_params(ck), execute_params)

    def row_stamps(self, target: Any, values: Mapping[str, Any]) -> set[str]:
        names: set[str] = set()
        for table, (column, value) in zip(_tables_of(target, values), values.items(), strict=True):
            tname = table_name(table)
            names.add(tname)  # the results that depend on the whole table
            name = table.columns[column].name
            kind = key_columns(table).get(name)
            many = value if isinstance(value, (list, tuple, set, frozenset)) else [value]
            found = None if kind is None else value_names(tname, name.lower(), kind, many)
            if found is None:
                names.add(any_rows(tname))  # not a key column: every result of the table
            else:
                names.update(found)
        return names

    def flush_events(self) -> dict[str, Callable[..., None]]:
        return {"before_flush": _before_flush, "after_flush": _after_flush}


def _before_flush(session: Session, flush_context: Any, instances: Any) -> None:
    _flush_rows.set(FlushRows(session))


def _after_flush(session: Session, flush_context: Any) -> None:
    """Add the value stamps of the rows this flush wrote to the write set of
    the session's transaction; ``<t>!`` for a table whose rows it cannot all
    tell (an old key value never loaded, statements the ORM's own accounting
    does not explain)."""
    record = _flush_rows.get()
    if record is None or record.session is not session:
        return  # another layer's hook on this session did it already
    _flush_rows.set(None)
    expected, names, unknown = flushed_names(
        list(session._new), list(session.identity_map._modified), list(session._deleted)
    )
    for table, count in record.rows.items():
        if expected.get(table) != count:
            unknown.add(table)
    if len(names) > MAX_WRITE_STAMPS:
        # a large flush: its tables' <t>! is one stamp where the values are thousands
        unknown.update(name.rsplit(".", 1)[0] for name in names)
        names = set()
    names.update(any_rows(t) for t in unknown)
    tx = session.get_transaction()
    if tx is None or not names:
        return
    for entry in list(tx._connections.values()):
        add_written(entry[0], names)


_STRATEGIES: dict[str, type[InvalidationStrategy]] = {
    "row": RowInvalidation,
    "table": TableInvalidation,
}


def strategy_for(value: str | InvalidationStrategy) -> InvalidationStrategy:
    """The strategy ``cachelayer.invalidation`` names, or ``value`` itself."""
    if isinstance(value, InvalidationStrategy):
        return value
    cls = _STRATEGIES.get(value) if isinstance(value, str) else None
    if cls is None:
        raise ConfigurationError(
            f"invalidation: expected 'row', 'table' or an InvalidationStrategy, got {value!r}",
            key="invalidation",
            value=value,
        )
    return cls()
