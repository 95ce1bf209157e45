"""Turning an ORM result into bytes and back into a session, fast.

A miss freezes the ORM result (``Result.freeze()``, which also runs the eager
loaders) and hands the user ``frozen()``, as SQLAlchemy's caching example does.
What is stored is not the objects but a compact *record*:

* the rows, where each mapped object is replaced by an index into
* the objects: class, identity key, the column attributes the query loaded (a
  tuple of values, named by one of the record's *layouts*: tuples of attribute
  names, stored once per record), and the relationships its eager loaders
  filled (as indexes again);
* the result's metadata (pickled separately and unpickled only when the layer
  has no copy of it yet) and attributes.

A hit unpickles the record and attaches its objects straight into the session's
identity map as persistent objects -- the way the ORM's own loader does, without
``Session.merge`` -- then rebuilds the rows. An object the session already holds
is the one returned, and keeps its attributes and pending changes; only its
unloaded attributes are filled in, as a database load would.

In-process backends that keep values by reference (``dogpile.cache.memory``,
``sqla_cachelayer.memory`` without ``max_bytes``) are given the record object
itself, unpickled, when every value it would hand out is immutable (numbers,
strings, dates, ...): a miss then pays no pickling and a hit no unpickling.
A record holding a mutable value (a JSON document, a list) is always pickled,
and unpickled afresh by every hit, so no two sessions share one.

``sqla_cachelayer.memory`` with ``max_bytes`` stores pickled bytes (their size
is what it counts) and hands back the very ``bytes`` object it stores: there
:func:`load_record` keeps the decoded record in the backend's memo, by the
payload's identity, while the entry lives, and reuses it when every value it
holds is immutable (numbers, strings, dates ...), so sharing it between
sessions is indistinguishable from a fresh copy. The backend counts that memo
in ``max_bytes`` (:func:`decoded_size`). A record holding any other value (a
JSON document, a list) is decoded afresh on every hit, as is every record read
from a backend that returns new bytes on each read (Redis, the SQLite file).

Only objects this query itself loaded can be recorded: if the result contains
an object the session held before (its attributes may come from an older load),
the miss is served but not stored (counted in ``not_stored``).
"""

from __future__ import annotations

import datetime
import decimal
import enum
import hmac
import pickle
import sys
import time
import uuid
from collections.abc import Callable, Container, Iterable, Sequence
from itertools import chain, repeat
from operator import attrgetter, itemgetter
from typing import Any, Final, Protocol

from sqlalchemy import util
from sqlalchemy.engine.result import IteratorResult, Result, ResultMetaData
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import Mapper, Session, attributes
from sqlalchemy.orm.base import instance_state
from sqlalchemy.orm.state import InstanceState

from .keys import BoundedMemo

__all__ = [
    "BadSignature",
    "NotRecordable",
    "PayloadMemo",
    "Record",
    "Signer",
    "decoded_size",
    "dump_record",
    "load_record",
    "record_from_frozen",
    "record_is_shareable",
]

_FORMAT: Final = 2


class NotRecordable(Exception):
    """The result holds something a record cannot reproduce faithfully."""


class Record:
    """One cached result, as stored (pickled) in the backend.

    ``objects`` holds one ``(class, identity key, layout index, values,
    relationships)`` tuple per mapped object; ``layouts[layout index]`` names
    the values.
    """

    __slots__ = (
        "_metadata",
        "_metadata_blob",
        "_prepared",
        "_result_attributes",
        "attributes",
        "created",
        "entity_positions",
        "layouts",
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
        rows: list[Any] | range,
        entity_positions: tuple[int, ...],
        layouts: Sequence[tuple[str, ...]],
        objects: list[tuple[Any, ...]],
        seq: int,
        tables: tuple[str, ...],
        created: float,
    ) -> None:
        self._metadata: ResultMetaData | None = metadata
        self._metadata_blob: bytes | None = None
        self._prepared: tuple[tuple[dict[str, Any], tuple[str, ...]], ...] | None = None
        self._result_attributes: Any = None
        self.attributes = attributes
        self.scalars_source = scalars_source
        self.rows = rows
        self.entity_positions = entity_positions
        self.layouts = layouts
        self.objects = objects
        self.seq = seq
        self.tables = tables
        self.created = created

    @property
    def metadata(self) -> ResultMetaData:
        """The result's metadata, unpickled on first use."""
        found = self._metadata
        if found is None:
            assert self._metadata_blob is not None
            found = self._metadata = pickle.loads(self._metadata_blob)
        return found

    def __getstate__(self) -> tuple[Any, ...]:
        blob = self._metadata_blob
        if blob is None:
            blob = self._metadata_blob = pickle.dumps(
                self._metadata, protocol=pickle.HIGHEST_PROTOCOL
            )
        return (
            _FORMAT,
            blob,
            self.attributes,
            self.scalars_source,
            self.rows,
            self.entity_positions,
            self.layouts,
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
            self._metadata_blob,
            self.attributes,
            self.scalars_source,
            self.rows,
            self.entity_positions,
            self.layouts,
            self.objects,
            self.seq,
            self.tables,
            self.created,
        ) = state
        self._metadata = None
        self._prepared = None
        self._result_attributes = None


class BadSignature(Exception):
    """A stored value whose signature does not match: never unpickled."""


class Signer:
    """HMAC-SHA256 over stored values, so a backend others can write to cannot
    make this process unpickle what they wrote (``cachelayer.signing_key``)."""

    __slots__ = ("_key",)

    SIZE: Final = 32

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("a signing key needs at least 16 bytes")
        self._key = key

    def sign(self, payload: bytes) -> bytes:
        return hmac.digest(self._key, payload, "sha256") + payload

    def verify(self, signed: bytes) -> bytes:
        mac, payload = signed[: self.SIZE], signed[self.SIZE :]
        if not hmac.compare_digest(mac, hmac.digest(self._key, payload, "sha256")):
            raise BadSignature("cached value has a bad signature (wrong key, or tampered with)")
        return payload


def dump_record(record: Record) -> bytes:
    return pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)


class PayloadMemo(Protocol):
    """Where a backend that hands out the very ``bytes`` object it stores keeps
    what was decoded from it (``sqla_cachelayer.memory`` with ``max_bytes``:
    :class:`~sqla_cachelayer.backends.memory.DecodedMemo`)."""

    def get(self, key: int, /) -> tuple[Any, Any, int] | None: ...

    def put(self, payload: bytes, decoded: Any, size: int) -> None: ...


def load_record(payload: bytes, memo: PayloadMemo | None = None) -> Record:
    """Unpickle a record; with a ``memo``, reuse the one decoded from this very
    payload object when every value it holds is immutable.

    The memo belongs to the backend, which stores the payload and counts the
    memo in its byte budget: an entry's decoded record lives no longer than the
    entry. Each memo entry holds its payload, so an ``id`` in it cannot be
    reused by another object while the entry lives. A record holding a mutable
    value is decoded afresh on every hit (the memo only remembers that).
    """
    if memo is None:
        return _decode(payload)
    found = memo.get(id(payload))
    if found is not None and found[0] is payload:
        record: Record | None = found[1]
        return record if record is not None else _decode(payload)
    record = _decode(payload)
    if type(payload) is bytes:
        if record_is_shareable(record):
            memo.put(payload, record, decoded_size(record))
        else:
            memo.put(payload, None, 0)
    return record


_getsizeof: Final = sys.getsizeof
#: per object beyond its values: its tuple, identity key and primary-key tuple
#: (with an int), the values tuple's header, and the (dict, names) pair and list
#: slots :func:`_prepare` adds on the first hit (CPython 3.11, 64-bit)
_PER_OBJECT: Final = 344
#: the record, its lists, and the immutable dict of its result attributes
_PER_RECORD: Final = 1000


def decoded_size(record: Record) -> int:
    """Bytes a decoded record takes once it has served hits (its prepared
    per-object dicts included), estimated from its shape and the sizes of its
    values; small ints and short strings that CPython shares are counted as if
    they were not, so the estimate errs high."""
    size = _PER_RECORD + _getsizeof(record._metadata_blob or b"")
    for names in record.layouts:
        size += _getsizeof(names) + sum(map(_getsizeof, names))
    objects = record.objects
    if objects:
        values = list(map(_values_of, objects))
        size += _getsizeof(objects) + len(objects) * _PER_OBJECT
        size += sum(map(len, values)) * 8 + sum(map(_getsizeof, chain.from_iterable(values)))
        dict_sizes = [_getsizeof(dict.fromkeys(names)) for names in record.layouts]
        size += sum(map(dict_sizes.__getitem__, map(_layout_of, objects)))
        size += sum(len(rels) * 120 + 232 for *_, rels in objects if rels)
    rows: Any = record.rows
    if type(rows) is not range:
        size += _getsizeof(rows)
        if not record.scalars_source:
            size += sum(map(_getsizeof, rows))
            if not record.entity_positions:
                size += sum(map(_getsizeof, chain.from_iterable(rows)))
        elif not record.entity_positions:
            size += sum(map(_getsizeof, rows))
    return size


def _decode(payload: bytes) -> Record:
    record = pickle.loads(payload)
    if not isinstance(record, Record):
        raise NotRecordable("payload is not a record")
    return record


_IMMUTABLE_TYPES: Final = frozenset(
    (
        int,
        float,
        str,
        bytes,
        bool,
        type(None),
        decimal.Decimal,
        datetime.date,
        datetime.timedelta,
        uuid.UUID,
    )
)


def _immutable(value: Any) -> bool:
    """Can this value be shared between sessions without anyone telling?"""
    t = type(value)
    if t in _IMMUTABLE_TYPES:
        return True
    if t is datetime.datetime or t is datetime.time:
        tz = value.tzinfo
        return tz is None or type(tz) is datetime.timezone
    if t is tuple or t is frozenset:
        return all(_immutable(v) for v in value)
    return isinstance(value, enum.Enum)  # members are singletons, pickled by name


def record_is_shareable(record: Record) -> bool:
    """True when every value a hit hands out from ``record`` is immutable, so
    one record object may serve many sessions at once."""
    objects = record.objects
    if objects:
        if len(objects) <= _FEW or len(set(map(_layout_of, objects))) > 1:
            if not _values_immutable(chain.from_iterable(map(_values_of, objects))):
                return False
        # one layout: every values tuple has the same columns
        elif not _rows_immutable(list(map(_values_of, objects))):
            return False
    rows: Any = record.rows
    if record.scalars_source:
        # entity rows hold object positions (ints); plain rows hold the values
        return bool(record.entity_positions) or (
            _values_immutable(rows) if len(rows) <= _FEW else _column_immutable(rows)
        )
    if len(rows) <= _FEW:
        return _values_immutable(chain.from_iterable(rows))
    return _rows_immutable(rows)


#: up to this many rows, values are checked one by one (cheaper than by column)
_FEW: Final = 8
_layout_of: Final = itemgetter(2)
_values_of: Final = itemgetter(3)


def _values_immutable(values: Iterable[Any]) -> bool:
    immutable_types = _IMMUTABLE_TYPES
    for value in values:
        if type(value) not in immutable_types and not _immutable(value):
            return False
    return True


def _rows_immutable(rows: list[Any]) -> bool:
    """Are all values of these equal-width tuples immutable? Column by column,
    so that the per-value work runs in C (``zip``, ``map``, ``set``)."""
    return all(_column_immutable(column) for column in zip(*rows, strict=True))


def _column_immutable(column: Any) -> bool:
    types = set(map(type, column))
    if types <= _IMMUTABLE_TYPES:
        return True
    if types <= _DATETIME_TYPES:
        # immutable when their tzinfo is (None and fixed offsets are)
        zones = set(map(_tzinfo, filter(None, column)))
        return all(tz is None or type(tz) is datetime.timezone for tz in zones)
    return all(map(_immutable, column))


_DATETIME_TYPES: Final = frozenset((datetime.datetime, datetime.time, type(None)))
_tzinfo: Final = attrgetter("tzinfo")


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


def _values_getter(columns: tuple[str, ...]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """``dict_ -> tuple of the columns' values``; raises ``KeyError`` if one is unloaded."""
    if len(columns) == 1:
        only = columns[0]
        return lambda dict_: (dict_[only],)
    getter: Callable[[dict[str, Any]], tuple[Any, ...]] = itemgetter(*columns)
    return getter


# --------------------------------------------------------------------------
# capture (miss path)


_instance_state_of: Final = attrgetter("_sa_instance_state")
_dict_of: Final = attrgetter("__dict__")
_key_of: Final = attrgetter("key")
_runid_of: Final = attrgetter("runid")
# class -> a getter of all its column values from an instance dict
_getters: BoundedMemo[type, Callable[[dict[str, Any]], tuple[Any, ...]]] = BoundedMemo(5000)


def _getter(cls: type, columns: tuple[str, ...]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    getter = _values_getter(columns)
    _getters.put(cls, getter)
    return getter


def _capture_uniform(
    data: list[Any], fresh_after: int
) -> tuple[list[tuple[Any, ...]], list[tuple[str, ...]]] | None:
    """Objects and layouts for the most common result, captured in bulk.

    That result is a list of distinct objects of one class, each with all its
    columns loaded and none of its relationships, all loaded by this query.
    Every per-object step then runs inside C (``map``, ``zip``, ``set``,
    ``attrgetter``/``itemgetter``). ``None`` when the result is anything else:
    the general capture handles it (and raises what is wrong).
    """
    classes = set(map(type, data))
    if len(classes) != 1:
        return None
    cls = classes.pop()
    columns, rels, _ = _layouts.get(cls) or _layout(cls)
    getter = _getters.get(cls) or _getter(cls, columns)
    try:
        states = list(map(_instance_state_of, data))
    except AttributeError:
        return None
    runids = list(map(_runid_of, states))
    if None in runids or min(runids) <= fresh_after:
        return None
    keys = list(map(_key_of, states))
    if None in keys or len(set(map(id, states))) != len(states):
        return None  # a pending object, or one object twice
    dicts = list(map(_dict_of, data))
    if rels and not all(map(frozenset(rels).isdisjoint, dicts)):
        return None
    try:
        values = list(map(getter, dicts))
    except KeyError:
        return None  # an unloaded column
    return list(zip(repeat(cls), keys, repeat(0), values, repeat(None))), [columns]


def record_from_frozen(
    frozen: Any,
    fresh_after: int,
    seq: int,
    tables: tuple[str, ...],
    metadata: ResultMetaData | None = None,
) -> Record:
    """Build a record from a frozen ORM result.

    ``fresh_after`` is a loader run id taken before the query ran: every
    object recorded must have been populated by this query (``runid`` above it).
    ``metadata`` is the detached result metadata of an earlier result of the
    same statement structure, if there was one (the same columns and
    entities); without it the result's own is detached.
    """
    index: dict[int, int] = {}
    objects: list[tuple[Any, ...]] = []
    pending: list[tuple[int, InstanceState[Any], tuple[str, ...]]] = []
    layouts: list[tuple[str, ...]] = []
    layout_ids: dict[tuple[str, ...], int] = {}
    # class -> (all its columns, their getter, the layout index of all of them, relationships)
    per_class: dict[
        type,
        tuple[tuple[str, ...], Callable[[dict[str, Any]], tuple[Any, ...]], int, tuple[str, ...]],
    ] = {}

    def layout_id(names: tuple[str, ...]) -> int:
        found = layout_ids.get(names)
        if found is None:
            found = layout_ids[names] = len(layouts)
            layouts.append(names)
        return found

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
        known = per_class.get(cls)
        if known is None:
            columns, rels, _ = _layouts.get(cls) or _layout(cls)
            getter = _getters.get(cls) or _getter(cls, columns)
            known = per_class[cls] = (columns, getter, layout_id(columns), rels)
        columns, getter, lid, rels = known
        dict_ = value.__dict__  # what state.dict returns, without its call
        try:
            values = getter(dict_)
        except KeyError:
            # some columns not loaded (deferred, a subclass's table): record those that are
            names = tuple(k for k in columns if k in dict_)
            lid = layout_id(names)
            values = tuple(dict_[k] for k in names)
        position = len(objects)
        index[id(state)] = position
        objects.append((cls, state.key, lid, values, None))
        if rels:
            loaded_rels = tuple(k for k in rels if k in dict_)
            if loaded_rels:
                pending.append((position, state, loaded_rels))
        return position

    data = frozen.data
    if frozen._source_supports_scalars:
        first = data[0] if data else None
        if first is not None and _state_of(first) is not None:
            positions: tuple[int, ...] = (0,)
            # in bulk when there are enough rows to pay for its setup
            uniform = _capture_uniform(data, fresh_after) if len(data) > _FEW else None
            rows: list[Any] | range
            if uniform is not None:
                objects, layouts = uniform
                rows = range(len(data))
            else:
                rows = [ref(v) for v in data]
                if len(objects) == len(rows) and None not in rows:
                    rows = range(len(rows))  # row i is object i: a hit hands the objects out as is
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
        cls, key, lid, values, _ = objects[position]
        objects[position] = (cls, key, lid, values, rel_values)

    return Record(
        metadata if metadata is not None else detached_metadata(frozen.metadata),
        dict(frozen._attributes),
        bool(frozen._source_supports_scalars),
        rows,
        positions,
        # a tuple of tuples of strings: the garbage collector stops tracking
        # it, and a cache holding many records is collected faster
        tuple(layouts),
        objects,
        seq,
        tables,
        time.time(),
    )


class _NoYieldPer:
    _yield_per = None


def detached_metadata(metadata: ResultMetaData) -> ResultMetaData:
    """``metadata`` without the ORM's closure over the query's context.

    SQLAlchemy 2.1 gives an ORM result's metadata a ``_create_unique_filters``
    function that closes over the query's context, and so over its session,
    the session's engine and everything they hold: a record kept as an object,
    or a memo of metadata, would keep all of them alive. The copy returned
    computes the filters once and keeps only those (per-column hash functions).
    """
    create = getattr(metadata, "_create_unique_filters", None)
    if create is None:
        return metadata  # SQLAlchemy 2.0: the filters are a plain list already
    try:
        filters: list[Any] | None = list(create(_NoYieldPer))
    except Exception:
        filters = None
    copy = metadata.__class__.__new__(metadata.__class__)
    for cls in type(metadata).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if hasattr(metadata, name):
                setattr(copy, name, getattr(metadata, name))
    copy._create_unique_filters = None if filters is None else _unique_filters(filters)  # type: ignore[misc]
    return copy


def _unique_filters(filters: list[Any]) -> Callable[[Any], list[Any]]:
    def create_unique_filters(result: Any) -> list[Any]:
        if result._yield_per:
            raise InvalidRequestError(
                "Can't use the ORM yield_per feature in conjunction with unique()"
            )
        return filters

    return create_unique_filters


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
    objs = _attach(session, record, load_options) if record.objects else []
    rows: Any = record.rows
    positions = record.entity_positions
    if positions:
        if record.scalars_source:
            if type(rows) is range:
                data: list[Any] = objs if len(objs) == len(rows) else objs[: len(rows)]
            else:
                data = [objs[i] if i is not None else None for i in rows]
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
    attributes = record._result_attributes
    if attributes is None:
        # built once per record: a record kept by an in-process backend serves
        # many hits, and the ORM never mutates a result's attributes
        attributes = record._result_attributes = _shared_attributes(record.attributes)
    result._attributes = attributes
    result._source_supports_scalars = record.scalars_source
    if REQUIRES_UNIQUE in attributes:
        return restore_unique_requirement(result)
    return result


#: marks, in a result's attributes, the ORM's "call unique() first" rule
REQUIRES_UNIQUE: Final = "_sqla_cachelayer_requires_unique"


def _require_unique(obj: Any) -> Any:
    raise InvalidRequestError(
        "The unique() method must be invoked on this Result, as it contains results "
        "that include joined eager loads against collections"
    )


def restore_unique_requirement(result: Result[Any]) -> Result[Any]:
    """Give a cached result the ORM's rule for joined eager loads of collections:
    rows may only be read after ``unique()`` (frozen results lose it)."""
    attributes = result._attributes
    if attributes.get(REQUIRES_UNIQUE):
        result._attributes = util.immutabledict(
            {k: v for k, v in attributes.items() if k != REQUIRES_UNIQUE}
        )
        result._unique_filter_state = (set(), _require_unique)
    return result


# (class, names of the columns a record holds) -> the class's columns it lacks
_unloaded: BoundedMemo[tuple[type, tuple[str, ...]], tuple[str, ...]] = BoundedMemo(5000)


def _shared_attributes(attributes: dict[str, Any]) -> Any:
    """An immutable copy of a result's attributes, one per distinct content:
    every record of a statement has the same few flags, and one shared copy
    is one object less per cached entry for the garbage collector to scan."""
    try:
        spec = tuple(attributes.items())
        found = _attribute_sets.get(spec)
    except TypeError:  # an unhashable value: a copy of its own
        return util.immutabledict(attributes)
    if found is None:
        found = util.immutabledict(attributes)
        _attribute_sets.put(spec, found)
    return found


_attribute_sets: BoundedMemo[tuple[Any, ...], Any] = BoundedMemo(1000)


def _prepare(record: Record) -> tuple[tuple[dict[str, Any], tuple[str, ...]], ...]:
    """Per object: its column values by name, and the columns it did not load.

    Kept on the record, so a record reused by :func:`load_record` builds them
    once; the dicts are only ever read (copied into new instances).
    """
    found = record._prepared
    if found is None:
        layouts = record.layouts
        per_layout: dict[tuple[type, int], tuple[str, ...]] = {}
        prepared = []
        for cls, _key, lid, values, _rels in record.objects:
            names = layouts[lid]
            expire = per_layout.get((cls, lid))
            if expire is None:
                expire = _unloaded.get((cls, names))
                if expire is None:
                    expire = tuple(k for k in _layout(cls)[0] if k not in names)
                    _unloaded.put((cls, names), expire)
                per_layout[(cls, lid)] = expire
            prepared.append((dict(zip(names, values, strict=True)), expire))
        # a tuple: with only untracked members the collector stops tracking it
        found = record._prepared = tuple(prepared)
    return found


def _attach(session: Session, record: Record, load_options: tuple[Any, ...]) -> list[Any]:
    """Put the record's objects into ``session``'s identity map, as a load would.

    An object already in the session is the one returned (its loaded values
    win; attributes it lacks are filled in); the others are new instances with
    their committed state set from the record, as the ORM's own loader makes
    them (``ClassManager.new_instance``, ``IdentityMap._add_unpresent``).
    """
    records = record.objects
    identity_map = session.identity_map
    # an empty identity map (a fresh session, the usual case) holds nothing to reuse
    in_map = identity_map.get if identity_map._dict else None
    add_unpresent = identity_map._add_unpresent
    session_id = session.hash_key
    objs: list[Any] = []
    reused: list[int] = []  # positions of objects the session already had
    load_events: list[InstanceState[Any]] = []
    prepared = record._prepared or _prepare(record)
    has_rels = False
    last_cls: type | None = None
    mapper: Any = None
    new_instance: Any = None
    has_load = False
    for (cls, key, lid, _values, rels), (named, expire) in zip(records, prepared, strict=True):
        if rels:
            has_rels = True
        existing = in_map(key) if in_map is not None else None
        if existing is not None:
            state = instance_state(existing)
            dict_ = state.dict
            missing = [k for k in record.layouts[lid] if k not in dict_]
            if missing:
                # an expired or unloaded attribute: a database load would fill it
                for k in missing:
                    dict_[k] = named[k]
                state._commit(dict_, missing)
            reused.append(len(objs))
            objs.append(existing)
            continue
        if cls is not last_cls:
            mapper = (_layouts.get(cls) or _layout(cls))[2]
            manager = mapper.class_manager
            new_instance = manager.new_instance
            has_load = bool(manager.dispatch.load)
            last_cls = cls
        obj = new_instance()
        state = obj._sa_instance_state
        obj.__dict__.update(named)
        if expire:
            # columns this query did not load (a subclass's table, deferred
            # ones): as after a database load, they load on first access
            state.expired_attributes.update(expire)
        state.key = key
        state.identity_token = key[2]
        state.session_id = session_id
        if load_options:
            state.load_options = load_options
            state.load_path = mapper._path_registry
        add_unpresent(state, key)
        objs.append(obj)
        if has_load:
            load_events.append(state)
    reused_at: Container[int] = set(reused) if len(reused) > 8 else reused
    for position, (_, _, _, _, rel_values) in enumerate(records if has_rels else ()):
        if not rel_values:
            continue
        obj = objs[position]
        state = instance_state(obj)
        for key, value in rel_values.items():
            if key in state.dict and position in reused_at:
                continue
            if value is None or isinstance(value, int):
                target = objs[value] if value is not None else None
                attributes.set_committed_value(obj, key, target)
            else:
                attributes.set_committed_value(obj, key, [objs[i] for i in value])
    for state in load_events:
        state.manager.dispatch.load(state, None)
    session_dispatch = session.dispatch
    if session_dispatch.loaded_as_persistent:
        for position, obj in enumerate(objs):
            if position not in reused_at:
                session_dispatch.loaded_as_persistent(session, instance_state(obj))
    return objs
