"""The one place that knows which SQLAlchemy the package runs on.

Supported: SQLAlchemy 2.0 from 2.0.30 (the long-term-support line) and 2.1.
CI runs the whole suite on the lowest version ``pyproject.toml`` allows and on
the newest release.

A cache built on ``do_orm_execute`` has to read a few of SQLAlchemy's private
attributes: there is no public way to ask for a statement's cache key, a
session's pending objects without a flush, or to attach rows to an identity
map as persistent objects. Every private name the package uses is listed in
:data:`PRIVATE_NAMES`, with what it is used for; ``tests/test_compat.py``
finds each of them on real objects, so an upgrade that renames one fails
there, by name, rather than as an ``AttributeError`` at query time. All of
them were checked on the versions in :data:`CHECKED_ON`.

The ones off the hit path are reached through this module (the functions and
aliases below). The hit path (``QueryPath._do_orm_execute`` in
:mod:`sqla_cachelayer._execute` and the record materializer in
:mod:`sqla_cachelayer.records`) reads its few inline: a
function call there costs more than the read itself, on every cached query.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Mapping
from typing import Any, Final

from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session
from sqlalchemy.orm import loading as _orm_loading
from sqlalchemy.sql.cache_key import CacheKey

__all__ = [
    "CHECKED_ON",
    "PRIVATE_NAMES",
    "SESSION_EXECUTION_OPTIONS",
    "cache_key_params",
    "is_autocommit_isolation",
    "new_runid",
    "root_transaction",
]

#: The SQLAlchemy releases every name below was checked on (by
#: ``tests/test_compat.py``, which runs on whichever version is installed).
CHECKED_ON: Final = ("2.0.30", "2.0.58", "2.1.9")

#: ``(owner, attribute, what the package uses it for)``, one per private name.
#: ``owner`` is what ``tests/test_compat.py`` builds to look the name up on.
PRIVATE_NAMES: Final[tuple[tuple[str, str, str], ...]] = (
    # statements (the hit path)
    ("Select", "_generate_cache_key", "SQLAlchemy's cache key: the structure of the key"),
    ("Select", "_with_options", "the statement's own options, where the cache hints are"),
    ("Select", "_memoized_select_entities", "legacy with_entities(): options read elsewhere"),
    ("Select", "_for_update_arg", "a locking read is never served from the cache (G7)"),
    ("CacheKey", "params", "2.1 only: the values given with Select.params()"),
    ("load_options", "_refresh_state", "a refresh or expired-attribute load bypasses"),
    ("load_options", "_autoflush", "autoflush before a hit, as the ORM does before a query"),
    ("execution_options", "_sa_orm_load_options", "the ORM's load options of one execution"),
    # sessions and transactions
    ("Session", "_new", "autoflush before a hit: pending objects"),
    ("Session", "_deleted", "autoflush before a hit: deleted objects"),
    ("IdentityMap", "_modified", "autoflush before a hit: changed objects"),
    ("Session", "_autoflush", "autoflush before a hit"),
    ("Session", "_transaction", "the root transaction, where per-transaction state lives"),
    ("SessionTransaction", "_parent", "the root transaction of a savepoint"),
    ("SessionTransaction", "_connections", "the connections a transaction holds (G2, snapshot)"),
    # connections and engines
    ("Connection", "_execution_options", "isolation level of the transaction's connection"),
    ("Engine", "_execution_options", "cache_replica_lag set on a replica's engine"),
    ("Connection", "_is_autocommit_isolation", "AUTOCOMMIT: a write is committed already"),
    ("UpdateDMLState", "_extra_froms", "UPDATE ... FROM, MySQL's multi-table UPDATE"),
    ("orm.mapperlib", "_mapper_registries", "every registry's MetaData (cascade tables)"),
    # results and loading (the miss and the hit)
    ("orm.loading", "_new_runid", "a miss marks the objects its query loads"),
    ("Result", "_unique_filter_state", "joined eager loads of collections require unique()"),
    ("Result", "_attributes", "a result's ORM attributes, restored on a hit"),
    ("Result", "_source_supports_scalars", "scalars() on a result served from the cache"),
    ("FrozenResult", "_attributes", "a frozen result's ORM attributes, stored"),
    ("FrozenResult", "_source_supports_scalars", "stored with the rows"),
    ("IdentityMap", "_dict", "a hit into an empty identity map skips the lookups"),
    ("IdentityMap", "_add_unpresent", "a hit attaches rows as persistent objects"),
    ("InstanceState", "_commit", "a hit merges loaded values into an object already present"),
    ("Mapper", "_path_registry", "load_path of an object a hit attaches"),
)


#: ``CacheKey.params``: SQLAlchemy 2.1 keeps the values given with
#: ``Select.params()`` there, outside ``bindparams``; 2.0 has no such field
#: (its ``params()`` copies the statement with the new values bound, so they
#: are in ``bindparams`` already). C-level attrgetter on 2.1: the hit path calls it.
cache_key_params: Callable[[Any], Mapping[str, Any] | None]
if "params" in CacheKey._fields:
    cache_key_params = operator.attrgetter("params")
else:

    def cache_key_params(ck: Any) -> Mapping[str, Any] | None:
        return None


#: ``Session(execution_options=...)`` (and so ``sessionmaker(engine,
#: execution_options={"cache_region": ...})``) arrived in SQLAlchemy 2.1.
SESSION_EXECUTION_OPTIONS: Final[bool] = (
    "execution_options" in inspect.signature(Session).parameters
)

#: ``sqlalchemy.orm.loading._new_runid()``: the run id the ORM stamps on the
#: states one load populates.
new_runid: Final[Callable[[], int]] = _orm_loading._new_runid

#: ``Connection._is_autocommit_isolation()``: whether the connection runs in
#: the driver's AUTOCOMMIT mode.
is_autocommit_isolation: Final[Callable[[Connection], bool]] = Connection._is_autocommit_isolation


def root_transaction(session: Session) -> Any:
    """The session's outermost ``SessionTransaction`` (``None`` when none is
    begun): a savepoint's ``_parent`` chain ends there."""
    root = session._transaction
    while root is not None and root._parent is not None:
        root = root._parent
    return root
