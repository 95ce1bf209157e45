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
* the database: a digest of the database's name (the engine URL less its
  driver, password hidden; see :func:`database_name`) and of the
  ``schema_translate_map`` in effect, from whichever level it was set;
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
import marshal
import os
import pickle
import types
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

    A full memo drops its oldest eighth at once. Dropping one entry per
    insert would cost O(size) each time: a dict's deleted slots stay at the
    front of its entry table until it resizes, and ``next(iter(d))`` walks
    past every one of them (about 9 us per insert at 20,000 entries).
    """

    __slots__ = ("maxsize",)

    def __init__(self, maxsize: int) -> None:
        super().__init__()
        if maxsize <= 0:
            raise ValueError("maxsize must be positive")
        self.maxsize = maxsize

    def put(self, key: K, value: V) -> None:
        if len(self) >= self.maxsize:
            self._drop_oldest()
        self[key] = value

    def _drop_oldest(self) -> None:
        # another thread may change the dict meanwhile (RuntimeError while
        # iterating, KeyError on a key it dropped first): the bound then
        # holds loosely until the next put
        with contextlib.suppress(RuntimeError):
            oldest = list(itertools.islice(self, max(1, self.maxsize // 8)))
            for old in oldest:
                self.pop(old, None)


# Objects with no stable encoding get a label unique to this process and this
# memo entry, so they can never collide with another object's label. A forked
# child inherits both the nonce and the counter: it gets a nonce of its own, or
# two workers of one preloaded parent would label different statements alike.
_PROCESS_NONCE = ""
_local_labels = itertools.count()


def _new_process_nonce() -> None:
    global _PROCESS_NONCE
    _PROCESS_NONCE = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"


_new_process_nonce()
os.register_at_fork(after_in_child=_new_process_nonce)


def _code_digest(code: types.CodeType) -> str:
    # marshal's bytes are the code itself (bytecode, constants, names, nested
    # code, file and line): equal bytes mean the same function in every
    # process that runs the same source
    return hashlib.blake2b(marshal.dumps(code), digest_size=16).hexdigest()


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
    elif isinstance(obj, str):
        # quoted_name (aliased() columns and labels): its quoting changes the SQL
        out.append(f"{t.__name__}:{obj!r}:{getattr(obj, 'quote', None)!r},")
    elif t is types.CodeType:
        # a lambda's code (lambda statements, with_loader_criteria)
        out.append(f"code:{_code_digest(obj)},")
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


# id(engine) -> (a weak reference to it, its database's name, that name's tag).
# The reference tells a reused id apart; its callback drops the entry (at worst
# another engine's, which is then recomputed). Single dict operations: atomic
# under the GIL.
_db_identities: dict[int, tuple[weakref.ref[Engine], str, str]] = {}
# (database tag, schema_translate_map items) -> their tag
_translated: BoundedMemo[tuple[str, frozenset[Any]], str] = BoundedMemo(1000)
# private in-memory SQLite databases: one number each, never reused
_memory_databases = itertools.count()


def _tag(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=10).hexdigest()


def database_name(engine: Engine) -> str:
    """The database an engine reaches, named without its driver.

    ``sqlite:///app.db`` and ``sqlite+aiosqlite:///app.db`` name one database
    (the path made absolute, so processes in other directories agree), as do
    ``postgresql+psycopg://`` and ``postgresql+asyncpg://`` URLs to the same
    server, database and user. A private in-memory SQLite database is a
    database of its own for each engine, in this process only.
    """
    url = engine.url
    backend = url.get_backend_name()
    url = url.set(drivername=backend)
    if backend == "sqlite":
        database = url.database or ""
        if database in ("", ":memory:") or url.query.get("mode") == "memory":
            # one number per pool: an engine's execution_options() copies share it
            number = engine.pool.__dict__.setdefault(
                "_sqla_cachelayer_memory_db", next(_memory_databases)
            )
            return f"sqlite:memory:{_PROCESS_NONCE}:{number}"
        if not database.startswith("file:"):
            url = url.set(database=os.path.abspath(database))
    return url.render_as_string(hide_password=True)


def database_identity(bind: Engine | Connection, schema_translate_map: Any = None) -> str:
    """The part of a key that names the database, as 20 hex digits: a digest of
    :func:`database_name` and of the ``schema_translate_map`` in effect."""
    engine = bind.engine
    found = _db_identities.get(id(engine))
    if found is None or found[0]() is not engine:
        name = database_name(engine)
        key = id(engine)
        found = (weakref.ref(engine, lambda _: _db_identities.pop(key, None)), name, _tag(name))
        _db_identities[key] = found
    if not schema_translate_map:
        return found[2]
    spec = (found[2], frozenset(schema_translate_map.items()))
    tag = _translated.get(spec)
    if tag is None:
        items = sorted(schema_translate_map.items(), key=repr)
        tag = _tag(f"{found[1]}|{items!r}")
        _translated.put(spec, tag)
    return tag


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
    if len(bind_values) == 1 and not (params or exec_params or extra):
        # the commonest lookup, by one id: the short form below, built directly
        value = bind_values[0]
        t = type(value)
        if t is int and -(10**20) < value < 10**20:
            return f"{prefix}{structure}~{db_identity}~int:{value!r}|"
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
