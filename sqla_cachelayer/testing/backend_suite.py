"""A behaviour suite for dogpile.cache backends used under sqla_cachelayer.

In the spirit of dogpile's own ``_GenericBackendTestSuite``: one class of
tests, subclassed once per backend.  Subclass :class:`BackendSuite` in a
module pytest collects, name the backend and its arguments, and every test
below runs against it::

    # tests/test_my_backend.py
    from sqla_cachelayer.testing import BackendSuite

    class TestMyBackend(BackendSuite):
        backend = "myproject.cache"           # a registered dogpile backend name
        config_args = {"arguments": {"url": "..."}}

A backend that needs a fresh resource per test (a file, a database number)
overrides :meth:`BackendSuite.make_region` instead; ``self.tmp_path`` is the
test's temporary directory::

    class TestSQLiteFile(BackendSuite):
        backend = "sqla_cachelayer.sqlite"

        def make_region(self) -> CacheRegion:
            return make_region().configure(
                self.backend, arguments={"path": str(self.tmp_path / "cache.db")}
            )

What is checked: get/set/delete and their ``_multi`` forms, ``NO_VALUE``
for misses, values stored as :class:`~dogpile.cache.api.CachedValue` with
``bytes`` payloads (what the cache layer stores) coming back intact, dogpile's
one-creator-per-key under threads, and, when ``get_mutex`` returns a mutex,
that it excludes threads.  When the backend has the counter methods of
:class:`sqla_cachelayer.backends.CounterBackend`, their semantics too:
monotonic bumps, ``max`` (never overwrite) under concurrent bumpers, ``add``
never overwriting, and the one-snapshot read of ``get_with_counters``.

Requires pytest.  Tests use unique keys and build their region per test, so
they are independent and can run in parallel (``pytest -n auto``).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from dogpile.cache import CacheRegion, make_region
from dogpile.cache.api import NO_VALUE, CachedValue

__all__ = ["BackendSuite"]


def _key(label: str = "k") -> str:
    return f"scl-suite:{label}:{uuid.uuid4().hex}"


def _get_multi(region: CacheRegion, keys: list[str]) -> list[Any]:
    result: list[Any] = region.get_multi(keys)  # type: ignore[no-untyped-call]  # untyped in dogpile
    return result


def _run_threads(count: int, target: Callable[[int], None]) -> None:
    """Run ``target(i)`` in ``count`` threads started together; re-raise the first error."""
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            target(i)
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


class BackendSuite:
    """Generic tests for a dogpile backend; subclass with ``backend`` set.

    Class attributes:

    ``backend``
        The dogpile backend name (``"sqla_cachelayer.memory"``).
    ``config_args``
        Keyword arguments for ``CacheRegion.configure`` (``arguments``,
        ``expiration_time``...).
    ``threads``
        How many threads the concurrency tests use (default 8).
    """

    backend: ClassVar[str]
    config_args: ClassVar[dict[str, Any]] = {}
    threads: ClassVar[int] = 8

    tmp_path: Path

    @pytest.fixture(autouse=True)
    def _suite_tmp_path(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path

    @pytest.fixture
    def region(self) -> Iterator[CacheRegion]:
        region = self.make_region()
        yield region
        close = getattr(region.actual_backend, "close", None)
        if callable(close):
            close()

    def make_region(self) -> CacheRegion:
        """Build the region under test; override for per-test resources."""
        return make_region().configure(self.backend, **self.config_args)

    # -- helpers -----------------------------------------------------------------

    @staticmethod
    def raw_get(region: CacheRegion, key: str) -> Any:
        """What the backend itself returns for ``key``, serialized or not."""
        if region.serializer is not None:
            return region.backend.get_serialized(key)
        return region.backend.get(key)

    @staticmethod
    def has_counters(region: CacheRegion) -> bool:
        backend = region.actual_backend
        return all(
            callable(getattr(backend, name, None))
            for name in ("get_with_counters", "bump_counters", "add_counters", "read_counters")
        )

    def counters_backend(self, region: CacheRegion) -> Any:
        if not self.has_counters(region):
            pytest.skip(f"{self.backend} has no counter methods")
        return region.actual_backend

    # -- entries -------------------------------------------------------------------

    def test_miss_is_no_value(self, region: CacheRegion) -> None:
        key = _key()
        assert region.get(key) is NO_VALUE
        assert self.raw_get(region, key) is NO_VALUE

    def test_set_get(self, region: CacheRegion) -> None:
        key = _key()
        region.set(key, b"some value")
        assert region.get(key) == b"some value"

    def test_cached_value_with_bytes_payload_round_trips(self, region: CacheRegion) -> None:
        key = _key()
        payload = bytes(range(256)) * 64 + b"\x00tail"  # NULs, every byte, 16 KiB
        region.set(key, payload)
        stored = region.get_value_metadata(key)
        assert isinstance(stored, CachedValue)
        assert isinstance(stored.payload, bytes)
        assert stored.payload == payload
        assert isinstance(stored.cached_time, float)
        assert self.raw_get(region, key) is not NO_VALUE

    def test_set_overwrites(self, region: CacheRegion) -> None:
        key = _key()
        region.set(key, b"one")
        region.set(key, b"two")
        assert region.get(key) == b"two"

    def test_delete(self, region: CacheRegion) -> None:
        key = _key()
        region.set(key, b"value")
        region.delete(key)
        assert region.get(key) is NO_VALUE
        region.delete(key)  # idempotent
        region.delete(_key())  # never stored
        assert region.get(key) is NO_VALUE

    def test_unusual_keys(self, region: CacheRegion) -> None:
        keys = [_key("é ü ∑ \t"), _key("x" * 200), _key("quote ' and \" and ;")]
        for i, key in enumerate(keys):
            region.set(key, b"%d" % i)
        assert [region.get(k) for k in keys] == [b"0", b"1", b"2"]

    def test_large_value(self, region: CacheRegion) -> None:
        key = _key()
        payload = uuid.uuid4().bytes * 65536  # 1 MiB
        region.set(key, payload)
        assert region.get(key) == payload

    def test_set_multi_get_multi(self, region: CacheRegion) -> None:
        keys = [_key(str(i)) for i in range(5)]
        region.set_multi({k: k.encode() for k in keys[:3]})
        missing = _key("missing")
        got = _get_multi(region, [keys[0], missing, keys[2], keys[0], keys[1]])
        assert got == [keys[0].encode(), NO_VALUE, keys[2].encode(), keys[0].encode(),
                       keys[1].encode()]  # fmt: skip

    def test_multi_empty(self, region: CacheRegion) -> None:
        assert _get_multi(region, []) == []
        region.set_multi({})
        region.delete_multi([])

    def test_delete_multi(self, region: CacheRegion) -> None:
        keys = [_key(str(i)) for i in range(4)]
        region.set_multi({k: b"v" for k in keys})
        region.delete_multi([keys[1], keys[3], _key("never")])
        assert _get_multi(region, keys) == [b"v", NO_VALUE, b"v", NO_VALUE]

    def test_many_keys_multi(self, region: CacheRegion) -> None:
        keys = [_key(str(i)) for i in range(1200)]
        region.set_multi({k: k.encode() for k in keys})
        assert _get_multi(region, keys) == [k.encode() for k in keys]
        region.delete_multi(keys)
        assert set(_get_multi(region, keys)) == {NO_VALUE}

    def test_values_visible_to_other_threads(self, region: CacheRegion) -> None:
        key = _key()
        region.set(key, b"from main")
        seen: list[Any] = []
        _run_threads(4, lambda i: seen.append(region.get(key)))
        assert seen == [b"from main"] * 4

    def test_concurrent_writers(self, region: CacheRegion) -> None:
        keys = [_key(str(i)) for i in range(self.threads)]

        def write(i: int) -> None:
            for n in range(50):
                region.set(keys[i], b"%d:%d" % (i, n))

        _run_threads(self.threads, write)
        assert _get_multi(region, keys) == [b"%d:49" % i for i in range(self.threads)]

    # -- dogpile lock / mutex --------------------------------------------------------

    def test_get_or_create_runs_one_creator(self, region: CacheRegion) -> None:
        key = _key()
        calls: list[int] = []
        gate = threading.Event()

        def creator() -> bytes:
            calls.append(1)
            # Hold the lock until every thread has had the chance to miss:
            # the others must wait for us, not run creators of their own.
            gate.wait(0.2)
            return b"created"

        def worker(i: int) -> None:
            assert region.get_or_create(key, creator) == b"created"

        _run_threads(self.threads, worker)
        gate.set()
        assert calls == [1]

    def test_mutex_is_a_cache_mutex(self, region: CacheRegion) -> None:
        mutex = region.backend.get_mutex(_key())
        if mutex is None:
            pytest.skip(f"{self.backend} uses dogpile's per-process lock")
        for name in ("acquire", "release", "locked"):
            assert callable(getattr(mutex, name))

    def test_mutex_acquire_release_locked(self, region: CacheRegion) -> None:
        key = _key()
        mutex = region.backend.get_mutex(key)
        if mutex is None:
            pytest.skip(f"{self.backend} uses dogpile's per-process lock")
        assert not mutex.locked()
        assert mutex.acquire()
        assert mutex.locked()
        assert region.key_is_locked(key)
        other = region.backend.get_mutex(key)  # a second object, same key
        assert not other.acquire(wait=False)
        mutex.release()
        assert not mutex.locked()
        assert other.acquire(wait=False)
        other.release()

    def test_mutex_keys_independent(self, region: CacheRegion) -> None:
        outer = region.backend.get_mutex(_key("outer"))
        if outer is None:
            pytest.skip(f"{self.backend} uses dogpile's per-process lock")
        inner_key = _key("inner")
        assert outer.acquire()
        try:
            # A creator may ask for another key while holding its own.
            inner = region.backend.get_mutex(inner_key)
            assert inner.acquire(wait=False)
            assert not region.backend.get_mutex(inner_key).acquire(wait=False)
            inner.release()
        finally:
            outer.release()

    def test_mutex_excludes_threads(self, region: CacheRegion) -> None:
        key = _key()
        if region.backend.get_mutex(key) is None:
            pytest.skip(f"{self.backend} uses dogpile's per-process lock")
        inside = threading.Lock()
        overlaps: list[int] = []
        total = [0]

        def worker(i: int) -> None:
            for _ in range(25):
                mutex = region.backend.get_mutex(key)
                mutex.acquire()
                try:
                    if not inside.acquire(blocking=False):
                        overlaps.append(i)  # someone else is inside too
                        continue
                    try:
                        value = total[0]
                        time.sleep(0.0001)  # widen the window for a lost update
                        total[0] = value + 1
                    finally:
                        inside.release()
                finally:
                    mutex.release()

        _run_threads(self.threads, worker)
        assert overlaps == []
        assert total[0] == 25 * self.threads

    def test_mutex_released_by_another_thread(self, region: CacheRegion) -> None:
        # dogpile's async creators release the lock in a worker thread.
        key = _key()
        mutex = region.backend.get_mutex(key)
        if mutex is None:
            pytest.skip(f"{self.backend} uses dogpile's per-process lock")
        assert mutex.acquire()
        releaser = threading.Thread(target=mutex.release)
        releaser.start()
        releaser.join()
        assert not mutex.locked()
        assert mutex.acquire(wait=False)
        mutex.release()

    # -- counters ------------------------------------------------------------------------

    def test_counters_absent_are_none(self, region: CacheRegion) -> None:
        backend = self.counters_backend(region)
        assert backend.read_counters([_key("a"), _key("b")]) == [None, None]
        assert backend.read_counters([]) == []

    def test_add_counters_never_overwrites(self, region: CacheRegion) -> None:
        backend = self.counters_backend(region)
        a, b = _key("a"), _key("b")
        backend.add_counters([a], 5)
        backend.add_counters([a, b], 9)
        backend.add_counters([a, b], 1)
        assert backend.read_counters([a, b]) == [5, 9]

    def test_bump_is_monotonic_and_honours_floor(self, region: CacheRegion) -> None:
        backend = self.counters_backend(region)
        seq, stamp = _key("seq"), _key("stamp")
        assert backend.bump_counters(seq, [stamp], 0) == 1  # missing seq counts as 0
        assert backend.bump_counters(seq, [], 0) == 2
        assert backend.bump_counters(seq, [stamp], 100) == 100  # floor wins
        assert backend.bump_counters(seq, [], 50) == 101  # seq + 1 wins
        assert backend.read_counters([seq, stamp]) == [101, 100]

    def test_bump_raises_stamps_to_seq_but_never_lowers(self, region: CacheRegion) -> None:
        backend = self.counters_backend(region)
        seq, low, high, new = _key("seq"), _key("low"), _key("high"), _key("new")
        backend.add_counters([low], 0)
        backend.add_counters([high], 1000)
        got = backend.bump_counters(seq, [low, high, new], 0)
        assert backend.read_counters([low, high, new]) == [got, 1000, got]

    def test_get_with_counters(self, region: CacheRegion) -> None:
        backend = self.counters_backend(region)
        key, seq, stamp, absent = _key(), _key("seq"), _key("stamp"), _key("absent")
        value, counters = backend.get_with_counters(key, [seq, stamp, absent])
        assert value is NO_VALUE
        assert counters == [None, None, None]
        region.set(key, b"payload")
        s = backend.bump_counters(seq, [stamp], 0)
        value, counters = backend.get_with_counters(key, [seq, stamp, absent])
        assert counters == [s, s, None]
        assert value == self.raw_get(region, key)
        assert backend.get_with_counters(key, []) == (value, [])

    def test_concurrent_bumps_are_distinct_and_stamps_end_at_max(self, region: CacheRegion) -> None:
        backend = self.counters_backend(region)
        seq = _key("seq")
        stamps = [_key("s0"), _key("s1"), _key("s2")]
        per_thread = 40
        results: list[list[int]] = [[] for _ in range(self.threads)]

        def bump(i: int) -> None:
            for n in range(per_thread):
                # every thread names a different subset of the stamps
                names = [s for j, s in enumerate(stamps) if (i + n + j) % 2 == 0] or stamps
                results[i].append(backend.bump_counters(seq, names, 0))

        _run_threads(self.threads, bump)
        everything = [v for r in results for v in r]
        total = per_thread * self.threads
        assert sorted(everything) == list(range(1, total + 1))  # distinct, none lost
        for r in results:
            assert r == sorted(r) and len(set(r)) == len(r)  # increasing per caller
        final = backend.read_counters([seq, *stamps])
        assert final[0] == total
        assert all(v is not None and v <= total for v in final[1:])
        assert max(v for v in final[1:] if v is not None) == total

    def test_get_with_counters_is_one_snapshot(self, region: CacheRegion) -> None:
        backend = self.counters_backend(region)
        key, seq, a, b = _key(), _key("seq"), _key("a"), _key("b")
        region.set(key, b"v")
        backend.bump_counters(seq, [a, b], 0)
        stop = threading.Event()
        torn: list[list[int | None]] = []

        def bumper() -> None:
            while not stop.is_set():
                backend.bump_counters(seq, [a, b], 0)

        thread = threading.Thread(target=bumper)
        thread.start()
        try:
            for _ in range(300):
                value, counters = backend.get_with_counters(key, [seq, a, b])
                # each bump moves all three together: a torn read shows a gap
                if not counters[0] == counters[1] == counters[2]:
                    torn.append(counters)
                assert value is not NO_VALUE
        finally:
            stop.set()
            thread.join()
        assert torn == []

    def test_counters_are_not_entries(self, region: CacheRegion) -> None:
        backend = self.counters_backend(region)
        key = _key()
        backend.add_counters([key], 7)
        assert region.get(key) is NO_VALUE
        region.set(key, b"entry")
        region.delete(key)
        assert backend.read_counters([key]) == [7]
