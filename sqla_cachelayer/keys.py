"""Cache keys: which entry answers a statement.

A key covers:

* the statement's *structure*: SQLAlchemy's own ``CacheKey.key`` tuple, which
  already includes loader options and every construct of the statement, encoded
  into a stable digest once per structure per process (memoized by the layer,
  so the hit path never renders SQL);
* every bound value: the values extracted from the statement
  (``CacheKey.bindparams``), the values given with ``.params()`` (SQLAlchemy
  2.1 keeps them in ``CacheKey.params``, outside the rendered SQL), and the
  parameters given at execute time, each encoded injectively (type name and
  ``repr``, or a pickle);
* the database: a digest of the engine URL (password hidden) and of the
  ``schema_translate_map`` in effect;
* the ORM execution options that change which objects come back
  (``identity_token``).

An explicit ``cache_key=`` hint is added to all of this, as in SQLAlchemy 2.x's
dogpile_caching example: it can separate entries, never merge them.

Keys are bounded in length: ``<namespace>:<region>:q:`` followed either by the
structure digest, the database digest and the encoded values when those are
short printable text (a lookup by a few ids: the usual hit hashes nothing), or
by a BLAKE2b digest of all of it. See :func:`query_key`.

Values that cannot be encoded stably (neither a well-known scalar type nor
picklable) make the query uncacheable: it runs against the database instead of
risking two different values sharing a key.
"""

from __future__ import annotations

import contextlib
import datetime
import decimal
import enum
import hashlib
import itertools
import os
import pickle
import uuid
import weakref
from collections.abc import Mapping
from typing import Any, Final, TypeVar

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Mapper
from sqlalchemy.sql.elements import ColumnClause
from sqlalchemy.sql.selectable import TableClause

__all__ = ["Uncacheable", "database_identity", "query_key", "structure_digest"]

K = TypeVar("K")
V = TypeVar("V")


class Uncacheable(Exception):
    """The statement or one of its values has no stable key."""


class BoundedMemo(dict[K, V]):
    """A dict that never grows past ``maxsize`` through :meth:`put` (oldest
    entries go first); reads are plain (C) ``dict.get``.

    Lock-free on purpose: single ``dict`` operations are atomic under the GIL,
    and losing a memo entry under a race only costs a recomputation.
    """

    __slots__ = ("maxsize",)

    def __init__(self, maxsize: int) -> None:
        super().__init__()
        if maxsize <= 0:
            raise ValueError("maxsize must be positive")
        self.maxsize = maxsize

    def put(self, key: K, value: V) -> None:
        if len(self) >= self.maxsize:
            # another thread may change the dict meanwhile; the bound still holds loosely
            with contextlib.suppress(StopIteration, RuntimeError, KeyError):
                del self[next(iter(self))]
        self[key] = value


# Objects with no stable encoding get a label unique to this process and this
# memo entry, so they can never collide with another object's label.
_PROCESS_NONCE: Final = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
_local_labels = itertools.count()

_SCALARS = (str, int, float, bool, type(None), bytes)


def _encode_structure(obj: Any, out: list[str]) -> None:
    t = type(obj)
    if t is tuple or t is list:
        out.append("(")
        for item in obj:
            _encode_structure(item, out)
        out.append(")")
    elif t in _SCALARS:
        out.append(f"{t.__name__}:{obj!r},")
    elif isinstance(obj, type):
        out.append(f"cls:{obj.__module__}.{obj.__qualname__},")
    elif isinstance(obj, TableClause):
        out.append(f"table:{obj.fullname if hasattr(obj, 'fullname') else obj.name},")
    elif isinstance(obj, Mapper):
        cls = obj.class_
        out.append(f"mapper:{cls.__module__}.{cls.__qualname__},")
    elif isinstance(obj, ColumnClause):
        table = obj.table
        tname = getattr(table, "fullname", getattr(table, "name", "")) if table is not None else ""
        out.append(f"column:{tname}.{obj.name},")
    elif isinstance(obj, enum.Enum):
        out.append(f"enum:{t.__module__}.{t.__qualname__}.{obj.name},")
    elif callable(obj) and hasattr(obj, "__qualname__") and "<" not in obj.__qualname__:
        out.append(f"fn:{getattr(obj, '__module__', '')}.{obj.__qualname__},")
    elif isinstance(obj, (frozenset, set)):
        out.append("{")
        for item in sorted(map(repr, obj)):
            out.append(item)
        out.append("}")
    else:
        out.append(f"local:{_PROCESS_NONCE}:{next(_local_labels)},")


# values keyed by their repr (exact types: a subclass may repr differently)
_REPR_VALUE_TYPES: Final = frozenset(
    (
        *_SCALARS,
        decimal.Decimal,
        datetime.datetime,
        datetime.date,
        datetime.time,
        datetime.timedelta,
        uuid.UUID,
    )
)


def _encode_value(value: Any, out: list[str]) -> None:
    """Append an injective text encoding of ``value`` (type name and repr, or a
    pickle in hex); raise :class:`Uncacheable` when there is none."""
    t = type(value)
    if t in _REPR_VALUE_TYPES:
        out.append(f"{t.__name__}:{value!r}|")
    elif t is tuple or t is list:
        # a driver may adapt the two differently (PostgreSQL: a row vs an array)
        out.append("(" if t is tuple else "[")
        for item in value:
            _encode_value(item, out)
        out.append(")" if t is tuple else "]")
    elif isinstance(value, enum.Enum):
        out.append(f"enum:{t.__module__}.{t.__qualname__}.{value.name}|")
    else:
        try:
            out.append("p:" + pickle.dumps(value, protocol=5).hex() + "|")
        except Exception as err:
            raise Uncacheable(f"bound value of type {t.__name__} cannot be keyed") from err


def structure_digest(structure: tuple[Any, ...]) -> str:
    """A stable digest, 40 hex digits, of a statement's structure (SQLAlchemy's
    ``CacheKey.key``).

    Stable across processes for everything that has a stable encoding; an
    object without one gets a label unique to this call, so it can never share
    a digest with another statement (the caller memoizes per structure).
    """
    out: list[str] = []
    _encode_structure(structure, out)
    return hashlib.blake2b("".join(out).encode(), digest_size=20).hexdigest()


# id(engine) -> (a weak reference to it, its URL, the URL's tag). The reference
# tells a reused id apart; its callback drops the entry (at worst another
# engine's, which is then recomputed). Single dict operations: atomic under the GIL.
_db_identities: dict[int, tuple[weakref.ref[Engine], str, str]] = {}


def _tag(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=10).hexdigest()


def database_identity(bind: Engine | Connection, schema_translate_map: Any = None) -> str:
    """The part of a key that names the database, as 20 hex digits: a digest of
    the engine URL (password hidden) and of the ``schema_translate_map``."""
    engine = bind.engine
    found = _db_identities.get(id(engine))
    if found is None or found[0]() is not engine:
        url = engine.url.render_as_string(hide_password=True)
        key = id(engine)
        found = (weakref.ref(engine, lambda _: _db_identities.pop(key, None)), url, _tag(url))
        _db_identities[key] = found
    if schema_translate_map:
        return _tag(found[1] + "|" + repr(sorted(schema_translate_map.items(), key=repr)))
    return found[2]


#: bound values whose encoding is at most this long stay readable in the key
SHORT_VALUES: Final = 40


def query_key(
    prefix: str,
    structure: str,
    bind_values: list[Any],
    params: Mapping[str, Any] | None,
    exec_params: Any,
    db_identity: str,
    extra: str = "",
) -> str:
    """The key of one statement structure (its hex digest), values and database.

    Two forms, which can never be equal: ``<prefix><structure>~<database>~<values>``
    when there is no ``extra`` and the values encode to at most
    :data:`SHORT_VALUES` printable ASCII characters (the usual lookup by a few
    ids: no hashing on the hit path); otherwise ``<prefix>`` and 40 hex digits
    of a BLAKE2b digest of all of it. Both are bounded in length.
    """
    out: list[str] = []
    for value in bind_values:
        t = type(value)
        if t in _REPR_VALUE_TYPES:  # the usual case, without a call
            out.append(f"{t.__name__}:{value!r}|")
        else:
            _encode_value(value, out)
    if params:
        out.append("#p")
        for name in sorted(params):
            out.append(f"{name!r}=")
            _encode_value(params[name], out)
    if exec_params:
        out.append("#e")
        if isinstance(exec_params, Mapping):
            for name in sorted(exec_params):
                out.append(f"{name!r}=")
                _encode_value(exec_params[name], out)
        else:
            _encode_value(list(exec_params), out)
    values = "".join(out)
    if (
        not extra
        and len(values) <= SHORT_VALUES
        and values.isascii()
        and values.isprintable()
        and " " not in values
    ):
        return f"{prefix}{structure}~{db_identity}~{values}"
    payload = f"{structure}\x00{db_identity}\x00{extra!r}\x00{values}"
    return prefix + hashlib.blake2b(payload.encode(), digest_size=20).hexdigest()
