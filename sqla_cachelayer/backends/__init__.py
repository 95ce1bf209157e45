"""The project's own dogpile.cache backends.

Importing this package registers them with dogpile under the names used in
settings (the ``dogpile.cache`` entry points of ``pyproject.toml`` declare
the same names for installed copies):

==========================  ======================================  ==========================
backend name                class                                   arguments
==========================  ======================================  ==========================
``sqla_cachelayer.memory``  :class:`~.memory.BoundedMemoryBackend`  ``max_entries``,
                                                                    ``max_bytes``
``sqla_cachelayer.sqlite``  :class:`~.sqlite.SQLiteFileBackend`     ``path`` (required),
                                                                    ``max_bytes``, ...
``sqla_cachelayer.redis``   :class:`~.redis.RedisBackend`           dogpile's Redis
                                                                    arguments, bounded
==========================  ======================================  ==========================

All implement dogpile's backend contract (``dogpile/cache/api.py``) and
nothing of SQLAlchemy.  Beside it the first two share four *counter* methods, described
by :class:`CounterBackend`, that the cache layer's invalidation protocol uses
when a backend offers them::

    >>> import sqla_cachelayer.backends as backends
    >>> from dogpile.cache import make_region
    >>> region = make_region().configure("sqla_cachelayer.memory", arguments={"max_entries": "100"})
    >>> isinstance(region.backend, backends.CounterBackend)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from dogpile.cache import register_backend

from sqla_cachelayer.backends.memory import BoundedMemoryBackend
from sqla_cachelayer.backends.sqlite import SQLiteFileBackend, SQLiteFileMutex

__all__ = ["BoundedMemoryBackend", "CounterBackend", "SQLiteFileBackend", "SQLiteFileMutex"]

# dogpile's PluginLoader.register is untyped.
register_backend(  # type: ignore[no-untyped-call]
    "sqla_cachelayer.memory", "sqla_cachelayer.backends.memory", "BoundedMemoryBackend"
)
register_backend(  # type: ignore[no-untyped-call]
    "sqla_cachelayer.sqlite", "sqla_cachelayer.backends.sqlite", "SQLiteFileBackend"
)
# loaded on first use: redis-py is an optional extra
register_backend(  # type: ignore[no-untyped-call]
    "sqla_cachelayer.redis", "sqla_cachelayer.backends.redis", "RedisBackend"
)


@runtime_checkable
class CounterBackend(Protocol):
    """Atomic integer counters kept beside a backend's entries, never evicted.

    The cache layer's invalidation protocol keeps a sequence number and one
    stamp per table in them.  The backend uses counter keys as given; the
    layer passes them through the region's ``key_mangler`` first, if it has
    one, as dogpile does with entry keys.  Values returned by
    :meth:`get_with_counters` are in the backend's own stored form:
    ``CachedValue`` for :class:`BoundedMemoryBackend`, serialized ``bytes``
    for :class:`SQLiteFileBackend` (turn them into a ``CachedValue`` with
    ``region._parse_serialized_from_backend``, as ``CacheRegion.get`` does).

    Example, with either backend::

        >>> backend = BoundedMemoryBackend({})
        >>> backend.add_counters(["stamp:users"], 0)
        >>> seq = backend.bump_counters("seq", ["stamp:users"], floor=0)
        >>> backend.get_with_counters("entry", ["seq", "stamp:users"])[1] == [seq, seq]
        True
    """

    def get_with_counters(
        self, key: str, counter_keys: Sequence[str]
    ) -> tuple[Any, list[int | None]]:
        """The entry under ``key`` (or ``NO_VALUE``) and the counters, one snapshot."""
        ...

    def bump_counters(self, seq_key: str, stamp_keys: Sequence[str], floor: int) -> int:
        """``seq = max(seq + 1, floor)``; each stamp ``= max(stamp, seq)``; return seq."""
        ...

    def add_counters(self, keys: Sequence[str], value: int) -> None:
        """Create each counter with ``value`` where absent; never overwrite."""
        ...

    def read_counters(self, keys: Sequence[str]) -> list[int | None]:
        """Current values, ``None`` for absent counters."""
        ...
