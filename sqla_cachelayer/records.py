"""Turning an ORM result into bytes and back into a session, fast.

A miss freezes the ORM result (``Result.freeze()``, which also runs the eager
loaders) and hands the user ``frozen()``, as SQLAlchemy's caching example does.
What is stored is not the objects but a compact *record*:

* the rows, where each mapped object is replaced by an index into
* the objects: class, identity key, the column attributes the query loaded, and
  the relationships its eager loaders filled (as indexes again);
* the result's metadata and attributes.

A hit unpickles the record and attaches its objects straight into the session's
identity map as persistent objects -- the way the ORM's own loader does, without
``Session.merge`` -- then rebuilds the rows. An object the session already holds
is the one returned, and keeps its attributes and pending changes; only its
unloaded attributes are filled in, as a database load would.

Only objects this query itself loaded can be recorded: if the result contains
an object the session held before (its attributes may come from an older load),
the miss is served but not stored (``MissOnly``).
"""

from __future__ import annotations

import pickle
import time
from typing import Any, Final

from sqlalchemy import util
from sqlalchemy.engine.result import IteratorResult, Result, ResultMetaData
from sqlalchemy.orm import Mapper, Session, attributes
from sqlalchemy.orm.base import instance_state
from sqlalchemy.orm.state import InstanceState

from .keys import BoundedMemo

__all__ = ["NotRecordable", "Record", "dump_record", "load_record", "record_from_frozen"]

_FORMAT: Final = 1


class NotRecordable(Exception):
    """The result holds something a record cannot reproduce faithfully."""


class Record:
    """One cached result, as stored (pickled) in the backend."""

    __slots__ = (
        "attributes",
        "created",
        "entity_positions",
        "metadata",
        "objects",
        "rows",
        "scalars_source",
        "seq",
        "tables",
    )

    def __init__(
        self,
        metadata: ResultMetaData,
        attributes: dict[str, Any],
        scalars_source: bool,
        rows: list[Any],
        entity_positions: tuple[int, ...],
        objects: list[tuple[Any, ...]],
        seq: int,
        tables: tuple[str, ...],
        created: float,
    ) -> None:
        self.metadata = metadata
        self.attributes = attributes
        self.scalars_source = scalars_source
        self.rows = rows
        self.entity_positions = entity_positions
        self.objects = objects
        self.seq = seq
        self.tables = tables
        self.created = created

    def __getstate__(self) -> tuple[Any, ...]:
        return (
            _FORMAT,
            self.metadata,
            self.attributes,
            self.scalars_source,
            self.rows,
            self.entity_positions,
            self.objects,
            self.seq,
            self.tables,
            self.created,
        )

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        if state[0] != _FORMAT:
            raise NotRecordable("record format changed")
        (
            _,
            self.metadata,
            self.attributes,
            self.scalars_source,
            self.rows,
            self.entity_positions,
            self.objects,
            self.seq,
            self.tables,
            self.created,
        ) = state


def dump_record(record: Record) -> bytes:
    return pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)


def load_record(payload: bytes) -> Record:
    record = pickle.loads(payload)
    if not isinstance(record, Record):
        raise NotRecordable("payload is not a record")
    return record


# --------------------------------------------------------------------------
# per-mapper layout, memoized

_layouts: BoundedMemo[type, tuple[tuple[str, ...], tuple[str, ...], Mapper[Any]]] = BoundedMemo(
    5000
)


def _layout(cls: type) -> tuple[tuple[str, ...], tuple[str, ...], Mapper[Any]]:
    found = _layouts.get(cls)
    if found is None:
        state_mapper: Mapper[Any] = attributes.manager_of_class(cls).mapper
        columns = tuple(p.key for p in state_mapper.column_attrs)
        rels = tuple(r.key for r in state_mapper.relationships)
        found = (columns, rels, state_mapper)
        _layouts.put(cls, found)
    return found


def _state_of(value: Any) -> InstanceState[Any] | None:
    return getattr(value, "_sa_instance_state", None)


# --------------------------------------------------------------------------
# capture (miss path)


def record_from_frozen(frozen: Any, fresh_after: int, seq: int, tables: tuple[str, ...]) -> Record:
    """Build a record from a frozen ORM result.

    ``fresh_after`` is a loader run id taken before the query ran: every
    object recorded must have been populated by this query (``runid`` above it).
    """
    index: dict[int, int] = {}
    objects: list[tuple[Any, ...]] = []
    pending: list[tuple[int, InstanceState[Any], tuple[str, ...]]] = []

    def ref(value: Any) -> int | None:
        if value is None:
            return None
        state = _state_of(value)
        if state is None:
            raise NotRecordable("relationship value is not a mapped object")
        found = index.get(id(state))
        if found is not None:
            return found
        runid = state.runid
        if state.key is None or runid is None or runid <= fresh_after:
            raise NotRecordable("result holds an object loaded before this query")
        cls = type(value)
        columns, rels, _ = _layout(cls)
        dict_ = state.dict
        values = {k: dict_[k] for k in columns if k in dict_}
        position = len(objects)
        index[id(state)] = position
        objects.append((cls, state.key, values, None))
        loaded_rels = tuple(k for k in rels if k in dict_)
        if loaded_rels:
            pending.append((position, state, loaded_rels))
        return position

    data = frozen.data
    if frozen._source_supports_scalars:
        first = data[0] if data else None
        if first is not None and _state_of(first) is not None:
            rows: list[Any] = [ref(v) for v in data]
            positions: tuple[int, ...] = (0,)
        else:
            rows = list(data)
            positions = ()
    else:
        width = len(data[0]) if data else 0
        entity_cols = set()
        for row in data:
            for i in range(width):
                if i not in entity_cols and _state_of(row[i]) is not None:
                    entity_cols.add(i)
        positions = tuple(sorted(entity_cols))
        if positions:
            rows = []
            for row in data:
                values = list(row)
                for i in positions:
                    if values[i] is not None and _state_of(values[i]) is None:
                        raise NotRecordable("mixed entity and plain values in one column")
                    values[i] = ref(values[i])
                rows.append(tuple(values))
        else:
            rows = [tuple(row) for row in data]

    # relationships filled by this query's eager loaders
    while pending:
        position, state, loaded_rels = pending.pop()
        dict_ = state.dict
        rel_values: dict[str, Any] = {}
        for key in loaded_rels:
            value = dict_[key]
            if value is None or _state_of(value) is not None:
                rel_values[key] = ref(value)
            else:
                try:
                    rel_values[key] = [ref(v) for v in _members(value)]
                except TypeError as err:
                    raise NotRecordable(f"cannot record relationship {key}") from err
        cls, key, values, _ = objects[position]
        objects[position] = (cls, key, values, rel_values)

    return Record(
        metadata=frozen.metadata,
        attributes=dict(frozen._attributes),
        scalars_source=bool(frozen._source_supports_scalars),
        rows=rows,
        entity_positions=positions,
        objects=objects,
        seq=seq,
        tables=tables,
        created=time.time(),
    )


def _members(collection: Any) -> list[Any]:
    if isinstance(collection, dict):
        return list(collection.values())
    return list(collection)


# --------------------------------------------------------------------------
# attach (hit path)


def result_from_record(
    session: Session,
    record: Record,
    metadata: ResultMetaData,
    load_options: tuple[Any, ...],
) -> Result[Any]:
    """Attach the record's objects to ``session`` and return a result of its rows."""
    objs = _attach(session, record.objects, load_options) if record.objects else []
    rows = record.rows
    positions = record.entity_positions
    if positions:
        if record.scalars_source:
            data: list[Any] = [objs[i] if i is not None else None for i in rows]
        elif positions == (0,) and len(metadata.keys) == 1:
            data = [(objs[r[0]] if r[0] is not None else None,) for r in rows]
        else:
            data = []
            for row in rows:
                values = list(row)
                for i in positions:
                    j = values[i]
                    if j is not None:
                        values[i] = objs[j]
                data.append(tuple(values))
    else:
        data = rows
    result: IteratorResult[Any] = IteratorResult(metadata, iter(data))
    result._attributes = util.immutabledict(record.attributes)
    result._source_supports_scalars = record.scalars_source
    return result


def _attach(
    session: Session, records: list[tuple[Any, ...]], load_options: tuple[Any, ...]
) -> list[Any]:
    identity_map = session.identity_map
    session_id = session.hash_key
    objs: list[Any] = []
    fresh: list[bool] = []
    load_events: list[InstanceState[Any]] = []
    session_dispatch = session.dispatch
    persistent_evt = bool(session_dispatch.loaded_as_persistent)
    append = objs.append
    for cls, key, values, _ in records:
        existing = identity_map.get(key)
        if existing is not None:
            state = instance_state(existing)
            missing = [k for k in values if k not in state.dict]
            if missing:
                # an expired or unloaded attribute: a database load would fill it
                dict_ = state.dict
                for k in missing:
                    dict_[k] = values[k]
                state._commit(dict_, missing)
            append(existing)
            fresh.append(False)
            continue
        columns, _rels, mapper = _layout(cls)
        manager = mapper.class_manager
        obj = manager.new_instance()
        state = obj._sa_instance_state
        obj.__dict__.update(values)
        if len(values) != len(columns):
            # columns this query did not load (a subclass's table, deferred
            # ones): as after a database load, they load on first access
            state.expired_attributes.update(k for k in columns if k not in values)
        state.key = key
        state.identity_token = key[2]
        state.session_id = session_id
        if load_options:
            state.load_options = load_options
            state.load_path = mapper._path_registry
        identity_map._add_unpresent(state, key)
        append(obj)
        fresh.append(True)
        if manager.dispatch.load:
            load_events.append(state)
    for position, (_, _, _, rel_values) in enumerate(records):
        if not rel_values:
            continue
        obj = objs[position]
        state = instance_state(obj)
        for key, value in rel_values.items():
            if not fresh[position] and key in state.dict:
                continue
            if value is None or isinstance(value, int):
                target = objs[value] if value is not None else None
                attributes.set_committed_value(obj, key, target)
            else:
                attributes.set_committed_value(obj, key, [objs[i] for i in value])
    for state in load_events:
        state.manager.dispatch.load(state, None)
    if persistent_evt:
        for position, obj in enumerate(objs):
            if fresh[position]:
                session_dispatch.loaded_as_persistent(session, instance_state(obj))
    return objs
