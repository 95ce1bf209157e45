"""``sqla_cachelayer.memory``: a bounded, thread-safe, in-process LRU backend.

``dogpile.cache.memory`` keeps every value forever in a plain dict; a query
cache fed by arbitrary statements and parameters needs a bound.  This backend
is a :class:`cachetools.LRUCache` behind one lock, bounded by a number of
entries and, optionally, by the approximate size of the stored values::

    from dogpile.cache import make_region
    import sqla_cachelayer.backends  # registers the backend names

    region = make_region().configure(
        "sqla_cachelayer.memory",
        expiration_time=300,
        arguments={"max_entries": 10_000, "max_bytes": "64MiB"},
    )

or from settings::

    cachelayer.regions.local.backend = sqla_cachelayer.memory
    cachelayer.regions.local.arguments.max_entries = 10000
    cachelayer.regions.local.arguments.max_bytes = 64MiB

Like ``dogpile.cache.memory`` it stores values by reference (no pickling).
The cache layer stores :class:`~dogpile.cache.api.CachedValue` objects whose
payload is either pickled ``bytes`` or, without ``max_bytes``, the result
record object itself when every value in it is immutable; every reader then
shares that one object, which the layer never mutates.

Beside the cache entries the backend keeps *counters*, plain integers that
the cache layer's invalidation protocol reads and bumps (see
:meth:`BoundedMemoryBackend.bump_counters`).  They live in a separate dict that
evicting entries never touches, with a bound of its own: at most
``4 * max_entries`` counters (at least 1,024; row-level invalidation keeps one
per key value written or read) and, with ``max_bytes``, at most a quarter of
it.  Past it the counters least recently created or bumped are dropped, never
a sequence: the protocol counts a missing stamp as *invalid* and recreates it
at the current sequence, so a dropped counter costs a miss of the entries that
read it, never a stale answer.

With ``max_bytes`` everything the backend holds is counted in it, so that the
figure is what the process spends on this cache: each entry as its payload's
length plus a fixed allowance for its key, its ``CachedValue`` and the LRU's
bookkeeping (:data:`ENTRY_OVERHEAD`); each counter as its key's length plus
:data:`COUNTER_OVERHEAD`; and the *decoded memo* (:class:`DecodedMemo`), where
the cache layer keeps the unpickled form of entries that are hit, at most a
quarter of ``max_bytes``, at the size its user estimates.  Entries are evicted,
least recently used first, until the three together fit.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

from cachetools import Cache, LRUCache
from dogpile.cache.api import (
    NO_VALUE,
    BackendFormatted,
    BackendSetType,
    CacheBackend,
    CachedValue,
)

from sqla_cachelayer._fork import renew_after_fork
from sqla_cachelayer.backends._args import check_known, coerce_byte_size, coerce_int

__all__ = ["BoundedMemoryBackend"]

_NAME = "sqla_cachelayer.memory"
_ARGUMENTS = ("max_entries", "max_bytes")

#: Bytes charged per entry beyond its payload and key (with ``max_bytes``): the
#: ``CachedValue`` and its metadata dict, the ``bytes`` header and the LRU's
#: three dict slots and order link, measured with ``tracemalloc`` on CPython 3.11
ENTRY_OVERHEAD: Final = 576
#: Bytes charged per counter beyond its key's length: the key's ``str`` header,
#: the ``int`` and the dict slot (``tracemalloc``, CPython 3.11)
COUNTER_OVERHEAD: Final = 128
#: With ``max_bytes``: the share of it counters may take, and the decoded memo
_COUNTER_SHARE: Final = 4
_MEMO_SHARE: Final = 4


def _value_size(value: Any) -> int:
    """Approximate size of one stored value, for ``max_bytes``.

    With ``max_bytes`` the layer's values are ``CachedValue(payload=bytes,
    metadata)``; the payload dominates, so only it is counted.  Anything else
    is charged ``sys.getsizeof`` (shallow, hence approximate).
    """
    if isinstance(value, CachedValue):
        payload = value.payload
        if isinstance(payload, bytes | bytearray | memoryview):
            return len(payload)
        return sys.getsizeof(payload)
    if isinstance(value, bytes | bytearray | memoryview):
        return len(value)
    return sys.getsizeof(value)


class _CountingLRU(LRUCache[str, BackendSetType]):
    """An :class:`LRUCache` that counts the entries it evicts.

    ``cachetools`` evicts by calling :meth:`popitem` from ``__setitem__``;
    overriding it is the documented extension point.
    """

    def __init__(
        self, maxsize: int, getsizeof: Callable[[BackendSetType], float] | None = None
    ) -> None:
        super().__init__(maxsize, getsizeof)
        self.evictions = 0

    def popitem(self) -> tuple[str, BackendSetType]:
        item = super().popitem()
        self.evictions += 1
        return item


class _SizedLRU(_CountingLRU):
    """The LRU of a backend with ``max_bytes``: each entry weighs its value, its
    key and :data:`ENTRY_OVERHEAD`; an entry leaving it (evicted, deleted,
    replaced) takes its decoded form out of ``memo``.

    cachetools hands ``getsizeof`` the value only: ``__setitem__`` notes the key's
    length for it (always under the backend's lock).
    """

    def __init__(self, maxsize: int, memo: DecodedMemo) -> None:
        self._key_size = 0
        super().__init__(maxsize, getsizeof=self._weigh)
        self.memo = memo

    def _weigh(self, value: BackendSetType) -> float:
        return _value_size(value) + self._key_size + ENTRY_OVERHEAD

    def __setitem__(self, key: str, value: BackendSetType) -> None:
        self._key_size = len(key)
        if key in self:
            self.memo.discard(Cache.__getitem__(self, key))
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        value = Cache.__getitem__(self, key)
        super().__delitem__(key)
        self.memo.discard(value)


class DecodedMemo:
    """What a reader decoded from this backend's stored ``bytes``, kept while the
    entry lives, by the payload's identity, charged to ``max_bytes``.

    The backend hands out the very ``bytes`` object it stores, so a reader that
    unpickles it (the cache layer's hit) can keep the result here and skip the
    work on the next read of the same entry. ``get(id(payload))`` is a plain dict
    read: ``(payload, decoded)`` or ``None``; compare ``payload`` by identity.
    :meth:`put` takes the backend's lock; the entry's eviction, deletion or
    replacement drops its decoded form. The memo holds at most a quarter of
    ``max_bytes``, its oldest entries going first; each is charged the size its
    reader gives plus the payload's length (an entry evicted while its reader was
    decoding it is then still counted until the memo drops it).
    """

    __slots__ = ("_backend", "bytes", "entries", "get", "max_bytes")

    def __init__(self, backend: BoundedMemoryBackend, max_bytes: int) -> None:
        self._backend = backend
        self.entries: dict[int, tuple[Any, Any, int]] = {}
        self.get = self.entries.get
        self.max_bytes = max_bytes
        self.bytes = 0

    def put(self, payload: bytes, decoded: Any, size: int) -> None:
        """Keep ``decoded``, the reader's form of ``payload``, estimated ``size`` bytes."""
        size += len(payload)
        if size > self.max_bytes // 8:
            return  # never kept: a few large ones would push out every small one
        backend = self._backend
        with backend._lock:
            entries = self.entries
            old = entries.pop(id(payload), None)
            if old is not None:
                self.bytes -= old[2]
            while entries and self.bytes + size > self.max_bytes:
                dropped = entries.pop(next(iter(entries)))
                self.bytes -= dropped[2]
            entries[id(payload)] = (payload, decoded, size)
            self.bytes += size
            backend._fit()

    def discard(self, value: Any) -> None:
        # under the backend's lock: ``value`` left the LRU
        payload = value.payload if isinstance(value, CachedValue) else value
        found = self.entries.get(id(payload))
        if found is not None and found[0] is payload:
            del self.entries[id(payload)]
            self.bytes -= found[2]

    def clear(self) -> None:
        # under the backend's lock
        self.entries.clear()
        self.bytes = 0


class BoundedMemoryBackend(CacheBackend):
    """In-process LRU cache backend, bounded by entries and optionally bytes.

    Arguments (strings from ini files are coerced; a bad value raises
    :class:`~sqla_cachelayer.exc.ConfigurationError` naming it):

    ``max_entries``
        Most entries kept (default 10 000); the least recently used entry
        is evicted first.
    ``max_bytes``
        Optional bound on the memory the backend holds: each stored value
        (``len()`` of a ``bytes`` payload, ``sys.getsizeof`` of anything else)
        with its key and :data:`ENTRY_OVERHEAD`, the counters, and the decoded
        memo (see the module's docstring).  Accepts units: ``"64MiB"``.  A
        single value larger than ``max_bytes`` is not stored (and any older
        value under its key is dropped), counted in :attr:`rejections`.

    Example::

        >>> from dogpile.cache.api import CachedValue, NO_VALUE
        >>> backend = BoundedMemoryBackend({"max_entries": "2"})
        >>> for key in ("a", "b", "c"):
        ...     backend.set(key, CachedValue(b"x", {"ct": 0.0, "v": 2}))
        >>> backend.get("a") is NO_VALUE, len(backend), backend.evictions
        (True, 2, 1)
        >>> backend.bump_counters("seq", ["stamp:users"], floor=0)
        1
        >>> backend.read_counters(["seq", "stamp:users", "nope"])
        [1, 1, None]
    """

    def __init__(self, arguments: Mapping[str, Any]) -> None:
        check_known(_NAME, arguments, _ARGUMENTS)
        max_entries = coerce_int(_NAME, arguments, "max_entries", 10_000)
        assert max_entries is not None  # it has a default
        self.max_entries: int = max_entries
        self.max_bytes: int | None = coerce_byte_size(_NAME, arguments, "max_bytes", None)
        # One lock guards ``_lru``, ``_counters`` and ``rejections``.  It is
        # held only across dict operations (plus cachetools' own bookkeeping
        # and ``len()`` of a payload), never across I/O, pickling or a
        # callback, so contention stays at the level of a dict lookup.  Reads
        # need it too: an LRU hit reorders the recency list.
        self._lock = threading.Lock()
        #: decoded forms of stored bytes (only with ``max_bytes``: without it the
        #: cache layer stores its results as objects, nothing to decode)
        self.decoded: DecodedMemo | None = None
        self._lru: _CountingLRU
        if self.max_bytes is None:
            self._lru = _CountingLRU(self.max_entries)
        else:
            # cachetools bounds one measure; bytes are the LRU's own bound,
            # entries and the bytes of counters and memo are enforced after
            # each insert (see _store and _fit).
            self.decoded = DecodedMemo(self, self.max_bytes // _MEMO_SHARE)
            self._lru = _SizedLRU(self.max_bytes, self.decoded)
        # Counters of the invalidation protocol: bounded apart from the
        # entries, sequences never dropped (see module doc).
        self._counters: dict[str, int] = {}
        self._seq_keys: set[str] = set()
        self.max_counters = max(4 * self.max_entries, 1024)
        #: bytes charged for the counters (with ``max_bytes``), and their bound
        self.counter_bytes = 0
        self._max_counter_bytes = (
            self.max_bytes // _COUNTER_SHARE if self.max_bytes is not None else None
        )
        self.rejections = 0
        renew_after_fork(self)

    def _after_fork_in_child(self) -> None:
        if self._lock.locked():
            # a parent thread was inside a bump: move every stamp past it
            # (this process's copy loses its entries, never serves a stale one)
            counters = self._counters
            top = max(counters.values(), default=0) + 1
            for key in counters:
                counters[key] = top
        self._lock = threading.Lock()

    # -- introspection -----------------------------------------------------

    @property
    def evictions(self) -> int:
        """Entries evicted to respect ``max_entries``/``max_bytes`` since creation."""
        return self._lru.evictions

    @property
    def current_bytes(self) -> int:
        """Bytes counted against ``max_bytes``: entries, counters and decoded memo
        (0 when ``max_bytes`` is not set)."""
        if self.decoded is None:
            return 0
        return int(self._lru.currsize) + self.counter_bytes + self.decoded.bytes

    def _fit(self) -> None:
        # under _lock: evict entries until entries, counters and memo fit max_bytes
        if self.decoded is None:
            return
        lru = self._lru
        assert self.max_bytes is not None
        room = self.max_bytes - self.counter_bytes - self.decoded.bytes
        while lru.currsize > room and len(lru):
            lru.popitem()
            room = self.max_bytes - self.counter_bytes - self.decoded.bytes

    def __len__(self) -> int:
        return len(self._lru)

    def stats(self) -> dict[str, int]:
        """A snapshot of sizes and counters, e.g. for a metrics endpoint.

        >>> BoundedMemoryBackend({}).stats()["entries"]
        0
        """
        with self._lock:
            decoded = self.decoded
            return {
                "entries": len(self._lru),
                "bytes": self.current_bytes,
                "entry_bytes": int(self._lru.currsize) if decoded is not None else 0,
                "counter_bytes": self.counter_bytes,
                "decoded": len(decoded.entries) if decoded is not None else 0,
                "decoded_bytes": decoded.bytes if decoded is not None else 0,
                "evictions": self._lru.evictions,
                "rejections": self.rejections,
                "counters": len(self._counters),
            }

    # -- dogpile backend contract -------------------------------------------

    def get(self, key: str) -> BackendFormatted:
        """Return the value stored under ``key``, or ``NO_VALUE``."""
        with self._lock:
            # try/except rather than Cache.get(): get() costs an extra Python
            # call on a hit, the case a useful cache optimises for.
            try:
                return self._lru[key]
            except KeyError:
                return NO_VALUE

    def get_multi(self, keys: Iterable[str]) -> list[BackendFormatted]:
        """Values for ``keys``, in order, ``NO_VALUE`` for misses."""
        result: list[BackendFormatted] = []
        with self._lock:
            lru = self._lru
            for key in keys:
                try:
                    result.append(lru[key])
                except KeyError:
                    result.append(NO_VALUE)
        return result

    def set(self, key: str, value: BackendSetType) -> None:
        """Store ``value`` under ``key``, evicting least recently used entries."""
        with self._lock:
            self._store(key, value)

    def set_multi(self, mapping: Mapping[str, BackendSetType]) -> None:
        """Store every item of ``mapping``."""
        with self._lock:
            for key, value in mapping.items():
                self._store(key, value)

    def delete(self, key: str) -> None:
        """Remove ``key``; no error when absent."""
        with self._lock:
            self._lru.pop(key, None)

    def delete_multi(self, keys: Iterable[str]) -> None:
        """Remove every key of ``keys``; no error for absent ones."""
        with self._lock:
            for key in keys:
                self._lru.pop(key, None)

    def _store(self, key: str, value: BackendSetType) -> None:
        # Caller holds self._lock.
        lru = self._lru
        try:
            lru[key] = value
        except ValueError:
            # Larger than max_bytes on its own.  Drop the previous value too:
            # the caller asked for it to be replaced, so it must not be served.
            lru.pop(key, None)
            self.rejections += 1
            return
        if self.max_bytes is not None:
            while len(lru) > self.max_entries:
                lru.popitem()
            self._fit()

    # -- counters of the invalidation protocol ------------------------------

    def get_with_counters(
        self, key: str, counter_keys: Sequence[str]
    ) -> tuple[BackendFormatted, list[int | None]]:
        """The value under ``key`` (or ``NO_VALUE``) and counters, read atomically.

        Both are read under the one lock, so no :meth:`bump_counters` can fall
        between them.

        >>> backend = BoundedMemoryBackend({})
        >>> backend.get_with_counters("k", ["seq"])
        (<dogpile.cache.api.NoValue object>, [None])
        """
        with self._lock:
            value: BackendFormatted
            try:
                value = self._lru[key]
            except KeyError:
                value = NO_VALUE
            counters = self._counters
            return value, [counters.get(k) for k in counter_keys]

    def bump_counters(self, seq_key: str, stamp_keys: Sequence[str], floor: int) -> int:
        """Atomically advance a sequence and raise stamps to it; return the sequence.

        ``seq = max(seq + 1, floor)`` (a missing ``seq`` counts as 0), then
        every stamp becomes ``max(stamp, seq)`` (created when missing).

        >>> backend = BoundedMemoryBackend({})
        >>> backend.bump_counters("seq", ["a"], floor=10), backend.bump_counters("seq", [], 0)
        (10, 11)
        >>> backend.read_counters(["a"])
        [10]
        """
        with self._lock:
            counters = self._counters
            current = counters.get(seq_key)
            if current is None:
                self.counter_bytes += len(seq_key) + COUNTER_OVERHEAD
                self._seq_keys.add(seq_key)
                current = 0
            seq = max(current + 1, floor)
            counters[seq_key] = seq
            added = 0
            for stamp_key in stamp_keys:
                current = counters.pop(stamp_key, None)  # re-inserted: now the newest
                if current is None:
                    added += len(stamp_key) + COUNTER_OVERHEAD
                counters[stamp_key] = seq if current is None or current < seq else current
            self.counter_bytes += added
            self._bound_counters()
            return seq

    def add_counters(self, keys: Sequence[str], value: int) -> None:
        """Create each counter of ``keys`` with ``value`` where absent; never overwrite.

        >>> backend = BoundedMemoryBackend({})
        >>> backend.add_counters(["a"], 5); backend.add_counters(["a", "b"], 7)
        >>> backend.read_counters(["a", "b"])
        [5, 7]
        """
        with self._lock:
            counters = self._counters
            added = 0
            for key in keys:
                if key not in counters:
                    counters[key] = value
                    added += len(key) + COUNTER_OVERHEAD
            self.counter_bytes += added
            self._bound_counters()

    def _bound_counters(self) -> None:
        # under _lock, after counters were added
        limit = self._max_counter_bytes
        if len(self._counters) > self.max_counters or (
            limit is not None and self.counter_bytes > limit
        ):
            self._drop_counters()
        if limit is not None:
            self._fit()

    def _drop_counters(self) -> None:
        # under _lock; the oldest eighth at once (by count and by bytes), so
        # the cost is amortized
        counters = self._counters
        target = self.max_counters - self.max_counters // 8
        limit = self._max_counter_bytes
        target_bytes = limit - limit // 8 if limit is not None else None
        seq_keys = self._seq_keys
        drop: list[str] = []
        left = len(counters)
        bytes_left = self.counter_bytes
        for key in counters:
            if left <= target and (target_bytes is None or bytes_left <= target_bytes):
                break
            if key not in seq_keys:
                drop.append(key)
                left -= 1
                bytes_left -= len(key) + COUNTER_OVERHEAD
        for key in drop:
            del counters[key]
        self.counter_bytes = bytes_left

    def read_counters(self, keys: Sequence[str]) -> list[int | None]:
        """Current values of ``keys``, ``None`` for counters that do not exist."""
        with self._lock:
            counters = self._counters
            return [counters.get(k) for k in keys]
