"""The invalidation protocol: table stamps and a sequence, kept in the backend.

Every region's backend holds, beside the cached entries:

* ``seq``: a counter that only grows. A commit that wrote tables ``W`` bumps
  it, *after* the database COMMIT returned and *before* ``commit()`` returns
  to the caller: ``s = max(seq + 1, now_in_microseconds)``;
* ``stamp[t]`` for each table ``t``: set to ``max(stamp[t], s)`` by that same
  bump, atomically with it.

A reader that will fill an entry reads ``seq`` (call it ``B``) *before* its
database snapshot starts, and stores ``B`` in the entry. An entry is served
only while every table it read has ``stamp[t] <= B``: a commit to ``t`` that
``B`` did not cover has ``stamp[t] > B``. Why this closes the races:

* a commit that returned before the reader started bumped ``seq`` and
  ``stamp[t]`` before returning; either ``B`` already covers it (so the
  snapshot, taken after ``B`` was read, includes it) or ``stamp[t] > B``;
* a slow filler's entry is tagged with its old ``B`` and is refused as soon as
  any of its tables moved past ``B`` -- whenever it lands;
* a missing stamp (evicted, flushed, a fresh backend) counts as *invalid*; it
  is recreated only with ``add`` (set if absent) at the current ``seq``, which
  is at least every earlier bump;
* a missing ``seq`` restarts at the wall clock in microseconds, above every
  value handed out before (as long as fewer than a million commits a second
  were counted, and clocks are not set back).

``invalidate_all`` is a bump of the pseudo-table ``*all*`` that every entry
lists among its tables; textual SQL whose tables cannot be told reads
``*any*``, which every bump moves.

Implementations differ only in where the counters live and how the bump is
made atomic:

=========================  ===========================================================
:class:`LocalStampStore`   per-process backends (``dogpile.cache.memory``): a dict and
                           a lock in this process
:class:`CounterStampStore` this project's backends, which offer atomic counter methods
                           (``sqla_cachelayer.memory``, ``sqla_cachelayer.sqlite``)
:class:`RedisStampStore`   dogpile's Redis backends: one ``MGET`` per lookup, one Lua
                           script per bump (``sqla_cachelayer.redis``: the same, awaited
                           through ``redis.asyncio`` from an ``AsyncSession``)
:class:`MutexStampStore`   any other backend: counters stored as entries, the bump
                           made under the backend's mutex (atomic across processes
                           only where the backend's mutex is distributed)
=========================  ===========================================================
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

from dogpile.cache.api import NO_VALUE, CachedValue
from dogpile.cache.region import CacheRegion
from sqlalchemy.util.concurrency import await_only, in_greenlet

from ._fork import at_fork_in_child, renew_after_fork
from .keys import BoundedMemo

if TYPE_CHECKING:
    from .records import PayloadMemo

__all__ = [
    "ALL_TABLES",
    "ANY_TABLE",
    "CounterStampStore",
    "Lookup",
    "MutexStampStore",
    "RedisStampStore",
    "StampStore",
    "store_for_region",
]

#: pseudo-table bumped by ``invalidate_all()``; every entry lists it
ALL_TABLES = "*all*"
#: pseudo-table bumped by every write; read by entries whose tables are unknown
ANY_TABLE = "*any*"


log = logging.getLogger("sqla_cachelayer")


#: in-process single-flight locks per store (see StampStore.mutex)
#: stamp keys are memoized for the table sets queries read, of at most this
#: many names (an ``IN`` list pins up to 64 values)
_MEMO_TABLES = 66


def wall_clock_seq() -> int:
    """The wall clock in microseconds: every bump sets ``seq`` at least this high."""
    return time.time_ns() // 1000


_floor = wall_clock_seq


class Lookup(NamedTuple):
    """What one read of the backend returns.

    ``payload`` is the stored bytes, or, for stores that keep objects
    (:attr:`StampStore.stores_objects`), possibly the record object itself.
    """

    payload: Any
    seq: int | None
    stamps: list[int | None]


#: ``Lookup((payload, seq, stamps))`` without NamedTuple's Python-level ``__new__``
_new_lookup: Callable[[tuple[Any, int | None, list[int | None]]], Lookup] = partial(
    tuple.__new__, Lookup
)


class StampStore(ABC):
    """Entries plus the counters of the protocol, for one region's backend."""

    #: True when the backend keeps Python objects by reference in this process
    #: (no serialization, no size accounting by bytes): a record whose values
    #: are all immutable may then be stored as the object itself, unpickled
    stores_objects = False
    #: where a hit keeps the record it decoded from stored bytes: the backend's
    #: own memo (counted in its ``max_bytes``) where the backend hands back the
    #: very bytes object it stores; ``None`` elsewhere (each hit decodes)
    decoded: PayloadMemo | None = None

    def __init__(self, region: CacheRegion, namespace: str) -> None:
        self.region = region
        self.namespace = namespace
        self.seq_key = self.mangle(f"{namespace}:seq")
        self._stamp_keys: BoundedMemo[tuple[str, ...], tuple[str, ...]] = BoundedMemo(10_000)
        backend = region.backend
        self._backend = backend
        self._serialized = bool(region.serializer)
        self._get_raw = backend.get_serialized if self._serialized else backend.get
        actual = region.actual_backend
        try:
            probe = actual.get_mutex(f"{namespace}:probe")
        except Exception:  # a backend that cannot answer now: keep dogpile's behaviour
            probe = True
        self._distributed_mutex = probe is not None

    @property
    def shared_fills(self) -> bool:
        """Do other processes fill entries under the same single-flight locks?"""
        return self._distributed_mutex

    def mangle(self, key: str) -> str:
        mangler = self.region.key_mangler
        return mangler(key) if mangler else key

    def stamp_key(self, table: str) -> str:
        return self.mangle(f"{self.namespace}:t:{table}")

    def stamp_keys(self, tables: Sequence[str], keep: bool = True) -> tuple[str, ...]:
        """The backend keys of these tables' stamps (memoized per table set read
        by a query; ``keep=False`` for a commit's write set, which is seldom seen
        twice and may name thousands of row stamps)."""
        if type(tables) is not tuple:
            tables = tuple(tables)
        keys = self._stamp_keys.get(tables)
        if keys is None:
            keys = tuple(self.stamp_key(t) for t in tables)
            if keep and len(tables) <= _MEMO_TABLES:
                self._stamp_keys.put(tables, keys)
        return keys

    # entries ---------------------------------------------------------------
    def _decode_entry(self, raw: Any) -> Any:
        if isinstance(raw, CachedValue):  # what this layer writes
            raw = raw.payload
        if isinstance(raw, bytes) or (
            self.stores_objects and raw is not None and raw is not NO_VALUE
        ):
            return raw
        return None

    def write_entry(self, key: str, payload: Any) -> None:
        if self._serialized:
            self._backend.set_serialized(key, payload)
        else:
            self._backend.set(key, CachedValue(payload, {"ct": time.time(), "v": 2}))

    def mutex(self, key: str) -> Any:
        """The backend's per-key lock across processes, asked for only when
        :attr:`shared_fills` (Redis with ``distributed_lock``, the SQLite
        file). Inside one process, single flight is the layer's own
        (:mod:`sqla_cachelayer._flight`): no further lock is needed there.
        """
        return self.region._mutex(key)  # type: ignore[no-untyped-call]

    def mutex_wait_limit(self) -> float | None:
        """How long a miss may wait for :meth:`mutex` before it runs its query
        without it, as a blocking ``acquire()`` of the backend's lock would
        (seconds; ``None``: until it is free). A coroutine, which polls the
        lock instead of blocking, keeps to the same limit."""
        return None

    # protocol ----------------------------------------------------------------
    @abstractmethod
    def lookup(self, entry_key: str | None, tables: Sequence[str]) -> Lookup:
        """Read an entry (if a key is given), ``seq`` and the tables' stamps."""

    @abstractmethod
    def bump(self, tables: Sequence[str]) -> int:
        """Atomically move ``seq`` and the tables' stamps past every earlier value."""

    @abstractmethod
    def ensure(self, tables: Sequence[str], value: int) -> None:
        """Create the missing stamps at ``value``; never overwrite one."""

    def settle(self, tables: Sequence[str], value: int) -> list[int | None]:
        """The tables' stamps after :meth:`ensure`: what a miss checks just
        before it stores (one round trip where the backend allows it)."""
        stamps = self.lookup(None, tables).stamps
        if None in stamps:
            self.ensure([t for t, s in zip(tables, stamps, strict=True) if s is None], value)
            stamps = self.lookup(None, tables).stamps
        return stamps


class LocalStampStore(StampStore):
    """Counters in this process, for backends that are themselves per-process."""

    # one counter dict per backend object, shared by every layer using it;
    # _shared_lock guards this registry only
    _shared: weakref.WeakKeyDictionary[Any, tuple[threading.Lock, dict[str, int]]] = (
        weakref.WeakKeyDictionary()
    )
    _shared_lock = threading.Lock()

    def __init__(self, region: CacheRegion, namespace: str) -> None:
        super().__init__(region, namespace)
        backend = region.actual_backend
        with LocalStampStore._shared_lock:
            found = LocalStampStore._shared.get(backend)
            if found is None:
                found = (threading.Lock(), {})
                LocalStampStore._shared[backend] = found
        # _lock guards _counters for bumps and adds; reads are single dict lookups
        self._lock, self._counters = found
        # dogpile.cache.memory keeps values by reference (memory_pickle does not)
        self.stores_objects = type(backend).__name__ == "MemoryBackend"
        renew_after_fork(self)

    def _after_fork_in_child(self) -> None:
        # the shared (lock, counters) pair was renewed by _renew_shared_locks
        found = LocalStampStore._shared.get(self.region.actual_backend)
        if found is not None:
            self._lock, self._counters = found

    def lookup(self, entry_key: str | None, tables: Sequence[str]) -> Lookup:
        counters = self._counters
        seq = counters.get(self.seq_key)
        if seq is None:
            with self._lock:
                seq = counters.setdefault(self.seq_key, _floor())
        get = counters.get
        stamps = [get(key) for key in self.stamp_keys(tables)]
        if entry_key is None:
            return _new_lookup((None, seq, stamps))
        return _new_lookup((self._decode_entry(self._get_raw(entry_key)), seq, stamps))

    def bump(self, tables: Sequence[str]) -> int:
        keys = self.stamp_keys(tables, keep=False)
        with self._lock:
            counters = self._counters
            s = max(counters.get(self.seq_key, 0) + 1, _floor())
            counters[self.seq_key] = s
            for key in keys:
                current = counters.pop(key, 0)  # re-inserted: now the newest
                counters[key] = current if current > s else s
            if len(counters) > _MAX_LOCAL_COUNTERS:
                _drop_oldest_stamps(counters)
        return s

    def ensure(self, tables: Sequence[str], value: int) -> None:
        self.settle(tables, value)

    def settle(self, tables: Sequence[str], value: int) -> list[int | None]:
        keys = self.stamp_keys(tables)
        counters = self._counters
        get = counters.get
        stamps: list[int | None] = [get(key) for key in keys]
        if None not in stamps:
            return stamps
        with self._lock:
            stamps = [counters.setdefault(key, value) for key in keys]
            if len(counters) > _MAX_LOCAL_COUNTERS:
                _drop_oldest_stamps(counters)
        return stamps


@at_fork_in_child
def _renew_shared_locks() -> None:
    LocalStampStore._shared_lock = threading.Lock()
    for backend, (lock, counters) in list(LocalStampStore._shared.items()):
        if lock.locked():
            # a parent thread was inside a bump: this copy of the counters may
            # have some of its stamps moved and not others; move them all
            # (this process's copy of the cache loses its entries, never
            # serves one the bump was meant to hide)
            top = max(counters.values(), default=0) + 1
            for key in counters:
                counters[key] = top
        LocalStampStore._shared[backend] = (threading.Lock(), counters)


#: Bound of a per-process backend's stamp dict (row-level invalidation keeps a
#: stamp per key value). A dropped stamp reads as missing, which the protocol
#: counts as invalid: it costs a miss, never a stale answer.
_MAX_LOCAL_COUNTERS = 100_000


def _drop_oldest_stamps(counters: dict[str, int]) -> None:
    # under the store's lock; the oldest eighth at once (amortized); sequences
    # (":seq" keys) are kept
    target = _MAX_LOCAL_COUNTERS - _MAX_LOCAL_COUNTERS // 8
    drop: list[str] = []
    excess = len(counters) - target
    for key in counters:
        if len(drop) >= excess:
            break
        if not key.endswith(":seq"):
            drop.append(key)
    for key in drop:
        counters.pop(key, None)


class CounterStampStore(StampStore):
    """This project's backends, which keep never-evicted atomic counters."""

    def __init__(self, region: CacheRegion, namespace: str) -> None:
        super().__init__(region, namespace)
        # the counter methods live on the real backend, under any proxies
        self._backend = region.actual_backend
        # the bounded in-process backend keeps objects, unless it counts bytes:
        # then it stores bytes and keeps their decoded records in its own memo
        self.stores_objects = (
            not self._serialized and getattr(self._backend, "max_bytes", 0) is None
        )
        if not self._serialized:
            self.decoded = getattr(self._backend, "decoded", None)

    def lookup(self, entry_key: str | None, tables: Sequence[str]) -> Lookup:
        keys = [self.seq_key, *self.stamp_keys(tables)]
        if entry_key is None:
            counters = self._backend.read_counters(keys)
            payload = None
        else:
            raw, counters = self._backend.get_with_counters(entry_key, keys)
            payload = self._decode_entry(raw)
        return Lookup(payload, counters[0], list(counters[1:]))

    def bump(self, tables: Sequence[str]) -> int:
        keys = list(self.stamp_keys(tables, keep=False))
        return int(self._backend.bump_counters(self.seq_key, keys, _floor()))

    def ensure(self, tables: Sequence[str], value: int) -> None:
        self._backend.add_counters(list(self.stamp_keys(tables)), value)


_BUMP_LUA = """
local s = redis.call('INCR', KEYS[1])
local floor = tonumber(ARGV[1])
if s < floor then
  redis.call('SET', KEYS[1], floor)
  s = floor
end
for i = 2, #KEYS do
  local v = tonumber(redis.call('GET', KEYS[i]) or '0') or 0
  if v < s then redis.call('SET', KEYS[i], s) end
end
return s
"""


def _int_or_none(raw: Any) -> int | None:
    if raw is None:
        return None
    try:
        return int(raw)
    except (TypeError, ValueError):
        return None


class RedisStampStore(StampStore):
    """dogpile's Redis backends: counters are plain Redis integers.

    A lookup is one ``MGET`` of the entry, ``seq`` and the stamps; a bump is one
    Lua script, atomic on the server. The region's ``key_mangler``, if any, is
    applied to entry and lock keys (they carry short bound values in clear) and
    to counter keys, keeping their hash tag.
    """

    def __init__(self, region: CacheRegion, namespace: str) -> None:
        # a hash tag puts seq and every stamp of the region in one cluster slot,
        # so the Lua bump (several keys) also runs on Redis Cluster
        self._key_mangler = region.key_mangler
        super().__init__(region, "{" + namespace + "}")
        actual = region.actual_backend
        self._writer = getattr(actual, "writer_client", None) or actual.client
        from .backends.redis import retry_problem

        problem = retry_problem(self._writer)
        if problem:
            # a region built by the application: its client is its own to set
            log.warning(
                "sqla_cachelayer: Redis region %r: %s; a hung server stalls each cache call "
                "that long. Build the region with backend 'sqla_cachelayer.redis' or with "
                "sqla_cachelayer.backends.redis.bounded_arguments(...), or set "
                "socket_timeout and connection_kwargs={'retry': no_retry()} yourself.",
                region.name,
                problem,
            )
        self._reader = getattr(actual, "reader_client", None) or self._writer
        self._script = self._writer.register_script(_BUMP_LUA)
        # entries live in other slots: a cluster client splits the read by node
        self._mget = getattr(self._reader, "mget_nonatomic", None) or self._reader.mget

    def mangle(self, key: str) -> str:
        mangler = self._key_mangler
        if mangler is None:
            return key
        # keep the hash tag in front: the counters must stay in one cluster slot
        tag = key[: key.index("}") + 1] if key.startswith("{") and "}" in key else ""
        return tag + mangler(key)

    def write_entry(self, key: str, payload: Any) -> None:
        if self._key_mangler is not None:
            key = self._key_mangler(key)
        super().write_entry(key, payload)

    def mutex_wait_limit(self) -> float | None:
        # dogpile's lock_blocking / lock_blocking_timeout, as redis-py's
        # blocking acquire() honours them
        backend = self.region.actual_backend
        if not getattr(backend, "lock_blocking", True):
            return 0.0
        limit = getattr(backend, "lock_blocking_timeout", None)
        return None if limit is None else float(limit)

    def mutex(self, key: str) -> Any:
        if self._key_mangler is not None:
            key = self._key_mangler(key)
        return super().mutex(key)

    def lookup(self, entry_key: str | None, tables: Sequence[str]) -> Lookup:
        keys = [self.seq_key, *self.stamp_keys(tables)]
        if entry_key is not None:
            if self._key_mangler is not None:
                entry_key = self._key_mangler(entry_key)
            keys.append(entry_key)
        values = self._read(keys)
        payload = None
        if entry_key is not None:
            raw = values.pop()
            payload = raw if isinstance(raw, bytes) else None
        return Lookup(payload, _int_or_none(values[0]), [_int_or_none(v) for v in values[1:]])

    def _read(self, keys: list[str]) -> list[Any]:
        """One MGET of ``keys`` (the async store awaits it in an ``AsyncSession``)."""
        return list(self._mget(keys))

    def bump(self, tables: Sequence[str]) -> int:
        keys = [self.seq_key, *self.stamp_keys(tables, keep=False)]
        return int(self._script(keys=keys, args=[_floor()]))

    def ensure(self, tables: Sequence[str], value: int) -> None:
        pipe = self._writer.pipeline(transaction=False)
        for key in self.stamp_keys(tables):
            pipe.set(key, value, nx=True)
        pipe.execute()

    def settle(self, tables: Sequence[str], value: int) -> list[int | None]:
        # one round trip: SET NX leaves an existing stamp as it is; the MGET
        # after it, on the same connection, reads what is there now
        keys = list(self.stamp_keys(tables))
        pipe = self._writer.pipeline(transaction=False)
        for key in keys:
            pipe.set(key, value, nx=True)
        pipe.mget(keys)
        return [_int_or_none(v) for v in pipe.execute()[-1]]


class AsyncRedisStampStore(RedisStampStore):
    """``sqla_cachelayer.redis``: :class:`RedisStampStore` over ``redis.asyncio``
    when called from an ``AsyncSession`` (the ORM's greenlet context).

    There each operation awaits the backend's asyncio client of the running
    event loop through SQLAlchemy's ``await_only``, so the loop keeps running
    while Redis answers (or times out); anywhere else it is the synchronous
    store. Same keys, values, script and errors (redis-py's exception classes):
    sync and async processes share one cache, and the layer's breaker sees the
    same failures.
    """

    def __init__(self, region: CacheRegion, namespace: str) -> None:
        super().__init__(region, namespace)
        actual = region.actual_backend
        self._async_client = actual.async_client
        self._expire = int(getattr(actual, "redis_expiration_time", 0) or 0) or None
        self._lock_args = actual
        self._lua_sha: str = self._script.sha

    async def _bump(self, client: Any, keys: list[str], floor: int) -> Any:
        from redis.exceptions import NoScriptError

        try:
            return await client.evalsha(self._lua_sha, len(keys), *keys, floor)
        except NoScriptError:  # a restarted or flushed server: EVAL loads it again
            return await client.eval(_BUMP_LUA, len(keys), *keys, floor)

    async def _ensure(self, client: Any, keys: Sequence[str], value: int) -> None:
        async with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.set(key, value, nx=True)
            await pipe.execute()

    async def _settle(self, client: Any, keys: list[str], value: int) -> list[Any]:
        async with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.set(key, value, nx=True)
            pipe.mget(keys)
            found: list[Any] = (await pipe.execute())[-1]
            return found

    def _read(self, keys: list[str]) -> list[Any]:
        if not in_greenlet():
            return super()._read(keys)
        found: list[Any] = await_only(self._async_client().mget(keys))
        return found

    def bump(self, tables: Sequence[str]) -> int:
        if not in_greenlet():
            return super().bump(tables)
        keys = [self.seq_key, *self.stamp_keys(tables, keep=False)]
        return int(await_only(self._bump(self._async_client(), keys, _floor())))

    def ensure(self, tables: Sequence[str], value: int) -> None:
        if not in_greenlet():
            super().ensure(tables, value)
            return
        await_only(self._ensure(self._async_client(), self.stamp_keys(tables), value))

    def settle(self, tables: Sequence[str], value: int) -> list[int | None]:
        if not in_greenlet():
            return super().settle(tables, value)
        found = await_only(self._settle(self._async_client(), list(self.stamp_keys(tables)), value))
        return [_int_or_none(v) for v in found]

    def write_entry(self, key: str, payload: Any) -> None:
        if not in_greenlet():
            super().write_entry(key, payload)
            return
        if self._key_mangler is not None:
            key = self._key_mangler(key)
        # the bytes dogpile's set_serialized would write (the layer's own record)
        await_only(self._async_client().set(key, payload, ex=self._expire))

    def mutex(self, key: str) -> Any:
        if not in_greenlet():
            return super().mutex(key)
        if self._key_mangler is not None:
            key = self._key_mangler(key)
        backend = self._lock_args
        # dogpile's lock name and arguments, so sync processes exclude the same key
        lock = self._async_client().lock(
            backend.lock_template.format(key),
            timeout=backend.lock_timeout,
            sleep=backend.lock_sleep,
            blocking=backend.lock_blocking,
            blocking_timeout=backend.lock_blocking_timeout,
            thread_local=False,  # coroutines share the thread: the token is the lock's
        )
        return _AwaitedLock(lock)


class _AwaitedLock:
    """A ``redis.asyncio`` lock behind dogpile's mutex interface, awaited
    from the ORM's greenlet."""

    __slots__ = ("_lock",)

    def __init__(self, lock: Any) -> None:
        self._lock = lock

    def acquire(self, wait: bool = True) -> bool:
        return bool(await_only(self._lock.acquire(blocking=wait)))

    def release(self) -> None:
        await_only(self._lock.release())

    def locked(self) -> bool:
        return bool(await_only(self._lock.locked()))


class MutexStampStore(StampStore):
    """Any other dogpile backend: counters stored as entries of their own.

    The read-modify-write of a bump runs under the backend's mutex for the
    ``seq`` key. For a backend shared between processes this is atomic only if
    that mutex is distributed (dogpile's ``distributed_lock`` for memcached);
    the layer logs a warning at configuration otherwise.
    """

    def __init__(self, region: CacheRegion, namespace: str) -> None:
        super().__init__(region, namespace)
        self._local_lock = threading.Lock()  # used when the backend has no mutex
        renew_after_fork(self)

    def _after_fork_in_child(self) -> None:
        self._local_lock = threading.Lock()

    def _read_counter(self, raw: Any) -> int | None:
        payload = self._decode_entry(raw)
        return _int_or_none(payload)

    def _get_multi(self, keys: list[str]) -> list[Any]:
        if self._serialized:
            return list(self._backend.get_serialized_multi(keys))
        return list(self._backend.get_multi(keys))

    def lookup(self, entry_key: str | None, tables: Sequence[str]) -> Lookup:
        keys = [self.seq_key, *self.stamp_keys(tables)]
        if entry_key is not None:
            keys.append(entry_key)
        values = self._get_multi(keys)
        payload = self._decode_entry(values.pop()) if entry_key is not None else None
        counters = [self._read_counter(v) for v in values]
        return Lookup(payload, counters[0], counters[1:])

    def _write_counter(self, key: str, value: int) -> None:
        self.write_entry(key, b"%d" % value)

    def _locked(self) -> Any:
        mutex = self._backend.get_mutex(self.seq_key)
        return mutex if mutex is not None else self._local_lock

    def bump(self, tables: Sequence[str]) -> int:
        keys = self.stamp_keys(tables, keep=False)
        lock = self._locked()
        lock.acquire()
        try:
            current = self._get_multi([self.seq_key, *keys])
            seq = self._read_counter(current[0]) or 0
            s = max(seq + 1, _floor())
            self._write_counter(self.seq_key, s)
            for key, raw in zip(keys, current[1:], strict=True):
                if (self._read_counter(raw) or 0) < s:
                    self._write_counter(key, s)
            return s
        finally:
            lock.release()

    def ensure(self, tables: Sequence[str], value: int) -> None:
        keys = self.stamp_keys(tables)
        lock = self._locked()
        lock.acquire()
        try:
            current = self._get_multi(list(keys))
            for key, raw in zip(keys, current, strict=True):
                if self._read_counter(raw) is None:
                    self._write_counter(key, value)
        finally:
            lock.release()


_PER_PROCESS_BACKENDS = ("MemoryBackend", "MemoryPickleBackend", "NullBackend")


def store_for_region(region: CacheRegion, namespace: str) -> StampStore:
    """Pick the implementation that makes the protocol atomic for this backend."""
    actual = region.actual_backend
    if hasattr(actual, "bump_counters") and hasattr(actual, "get_with_counters"):
        # proxies may wrap the data methods, but counters live on the real backend
        return CounterStampStore(region, namespace)
    if region.backend is not actual:
        # proxies in front of the backend: every operation goes through them
        return MutexStampStore(region, namespace)
    cls_name = type(actual).__name__
    module = type(actual).__module__
    if module.startswith("dogpile.cache.backends.memory") and cls_name in _PER_PROCESS_BACKENDS:
        return LocalStampStore(region, namespace)
    if hasattr(actual, "async_client") and hasattr(actual, "writer_client"):
        return AsyncRedisStampStore(region, namespace)  # sqla_cachelayer.redis
    if module.startswith("dogpile.cache.backends.redis") and hasattr(actual, "writer_client"):
        return RedisStampStore(region, namespace)
    if actual.get_mutex(f"{namespace}:seq") is None:
        log.warning(
            "sqla_cachelayer: backend %s has no distributed lock; invalidation is atomic "
            "within this process only. If other processes share this backend, enable its "
            "distributed lock (e.g. arguments.distributed_lock = true).",
            type(actual).__name__,
        )
    return MutexStampStore(region, namespace)
