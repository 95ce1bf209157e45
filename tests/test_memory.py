"""Memory stays bounded for the life of a process: engines and sessions the
layer was installed on are freed with the application's last reference, and
every internal map stays at its bound (a small version of benchmarks/soak.py)."""

from __future__ import annotations

import gc
import tracemalloc
import weakref
from pathlib import Path
from typing import Any

import pytest
from _models import Base, User
from dogpile.cache import make_region
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session, sessionmaker

import sqla_cachelayer as scl
from sqla_cachelayer import invalidation


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/mem.db"
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([User(id=i, name=f"user{i}") for i in range(1, 21)])
        s.commit()
    engine.dispose()
    return url


def _layer(backend: str = "sqla_cachelayer.memory", **arguments: Any) -> scl.CacheLayer:
    return scl.CacheLayer({"default": make_region().configure(backend, arguments=arguments)})


@pytest.mark.parametrize("backend", ["sqla_cachelayer.memory", "dogpile.cache.memory"])
def test_engines_and_sessions_are_freed(db_url: str, backend: str) -> None:
    layer = _layer(backend)
    engines: list[weakref.ref[Any]] = []
    sessions: list[weakref.ref[Any]] = []
    for i in range(60):
        engine = create_engine(db_url)
        session = layer.install(Session(engine))  # per-instance install, as per request
        users = session.scalars(
            select(User).where(User.id == i % 20 + 1).options(scl.FromCache())
        ).all()
        assert [u.id for u in users] == [i % 20 + 1]
        session.close()
        engines.append(weakref.ref(engine))
        sessions.append(weakref.ref(session))
        del engine, session, users
    gc.collect()
    assert sum(r() is not None for r in engines) == 0
    assert sum(r() is not None for r in sessions) == 0
    assert len(layer._installed) == 0 and len(layer._engines) == 0
    assert layer.stats()["hits"] == 40  # the entries outlived the sessions that stored them


def test_sessionmaker_engines_are_freed(db_url: str) -> None:
    layer = _layer()
    refs = []
    for _ in range(20):
        engine = create_engine(db_url)
        factory = layer.install(sessionmaker(engine))
        with factory() as s:
            s.scalars(select(User).options(scl.FromCache())).all()
        refs.append((weakref.ref(engine), weakref.ref(factory)))
        del engine, factory, s
    gc.collect()
    assert all(e() is None and f() is None for e, f in refs)


def test_internal_maps_stay_at_their_bound(db_url: str) -> None:
    layer = _layer(max_entries=100, max_bytes="1MiB")  # bytes: the backend's decoded memo is used
    factory = layer.install(sessionmaker(create_engine(db_url)))
    backend = layer.regions["default"].backend
    with factory() as s:
        for n in range(3000):
            s.scalars(select(User.id).where(User.id == n).options(scl.FromCache())).all()
            s.scalars(select(User.id).where(User.id == n % 20).options(scl.FromCache())).all()
            if n % 100 == 0:
                s.commit()  # invalidations: stamps bumped and created
                s.add(User(id=10_000 + n, name="new"))
                s.flush()
    assert len(backend) <= 100
    assert backend.stats()["counters"] <= backend.max_counters
    assert backend.decoded.bytes <= backend.decoded.max_bytes
    assert backend.current_bytes <= backend.max_bytes
    assert len(layer._shapes) <= layer._shapes.maxsize
    assert layer.stats()["hits"] > 0


def test_memory_backend_counters_bounded_and_safe(db_url: str) -> None:
    backend = make_region().configure("sqla_cachelayer.memory", arguments={"max_entries": 10})
    actual = backend.backend
    seq = actual.bump_counters("ns:seq", ["ns:t:first"], 0)
    for i in range(5000):
        actual.add_counters([f"ns:t:row{i}"], seq)
        assert len(actual._counters) <= actual.max_counters
    # the sequence survives, a dropped stamp reads as missing: the protocol
    # counts that entry as invalid (a miss), never as fresh
    assert actual.read_counters(["ns:seq"]) == [seq]
    assert actual.read_counters(["ns:t:first"]) == [None]


def test_local_stamp_store_bounded(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(invalidation, "_MAX_LOCAL_COUNTERS", 200)
    layer = _layer("dogpile.cache.memory")
    store = layer._states["default"].store
    assert isinstance(store, invalidation.LocalStampStore)
    for i in range(2000):
        store.ensure([f"users:{i}"], 1)
    assert len(store._counters) <= 200
    assert store.lookup(None, ()).seq is not None


def _traced_after_gc() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def _empty(backend: Any) -> None:
    # everything the backend holds for the layer: entries, counters, decoded memo
    with backend._lock:
        backend._lru.clear()
        backend._counters.clear()
        decoded = getattr(backend, "decoded", None)
        if decoded is not None:
            decoded.clear()


#: what the layer keeps beside its backend in this workload (statement and
#: row-level memos, stats): about 0.1 MiB measured, bounded by count elsewhere
_LAYER_OVERHEAD = 256 * 1024


def test_max_bytes_bounds_entries_decoded_memo_and_counters(tmp_path: Path) -> None:
    """With ``max_bytes``, the memory the process spends on the region (stored
    results, the records decoded for hits, the invalidation counters) stays
    within it, checked against what tracemalloc sees."""
    max_bytes = 1024 * 1024
    engine = create_engine(f"sqlite:///{tmp_path}/big.db")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([User(id=i, name=f"user number {i:08d} " + "x" * 24) for i in range(1, 3001)])
        s.commit()
    layer = _layer(max_bytes=max_bytes)
    backend = layer.regions["default"].backend
    factory = layer.install(sessionmaker(engine))

    def page(k: int) -> list[Any]:  # 20 users: a result of about 2 KiB pickled
        with factory() as s:
            stmt = select(User).where(User.id >= k).order_by(User.id).limit(20)
            return list(s.scalars(stmt.options(scl.FromCache())).all())

    def one(k: int) -> Any:  # pinned by value: a row stamp per id
        with factory() as s:
            return s.scalars(select(User).where(User.id == k).options(scl.FromCache())).one()

    for k in (1, 2):  # warm-up: statement shapes, SQLAlchemy's compiled cache
        page(k), page(k), one(k), one(k)
    tracemalloc.start()
    try:
        baseline = _traced_after_gc()
        for k in range(3, 403):
            page(k)  # miss: a new entry
            page(k)  # hit: decoded, kept in the memo
            page(k)  # hit from the memo
            one(k % 50 + 1)
        for i in range(0, 20_000, 100):  # many distinct written tables: 20,000 stamps
            layer.invalidate(*(f"table_{j}" for j in range(i, i + 100)))
        for k in range(403, 503):  # entries and memo filled again after the counters
            page(k), page(k)
        stats = backend.stats()
        full = _traced_after_gc()
        _empty(backend)
        emptied = _traced_after_gc()
    finally:
        tracemalloc.stop()
    held = full - emptied  # what the backend held: entries, memo, counters
    grown = full - baseline  # what the whole layer grew by
    assert held <= max_bytes, f"the backend held {held:,} bytes for max_bytes {max_bytes:,}"
    assert held >= max_bytes // 2  # the bound is used, not merely respected
    assert grown <= max_bytes + _LAYER_OVERHEAD, f"the layer grew by {grown:,} bytes"
    assert stats["decoded_bytes"] > 0 and stats["counter_bytes"] > 0  # both are counted
    assert stats["bytes"] <= max_bytes
    assert page(502)[0].id == 502  # and it still serves


def test_backend_returning_new_bytes_keeps_no_decoded_records(tmp_path: Path) -> None:
    """A backend that returns new bytes on every read (the SQLite file, Redis)
    gives a memo nothing to reuse: hits keep nothing decoded in the process."""
    engine = create_engine(f"sqlite:///{tmp_path}/app.db")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([User(id=i, name=f"user number {i:08d} " + "x" * 24) for i in range(1, 1001)])
        s.commit()
    layer = _layer("sqla_cachelayer.sqlite", path=str(tmp_path / "cache.db"))
    factory = layer.install(sessionmaker(engine))

    def page(k: int) -> list[Any]:
        with factory() as s:
            stmt = select(User).where(User.id >= k).order_by(User.id).limit(20)
            return list(s.scalars(stmt.options(scl.FromCache())).all())

    for k in (1, 2):
        page(k), page(k)
    tracemalloc.start()
    try:
        baseline = _traced_after_gc()
        for k in range(3, 303):
            page(k), page(k)
        grown = _traced_after_gc() - baseline
    finally:
        tracemalloc.stop()
    assert layer.stats()["hits"] >= 300
    assert grown <= _LAYER_OVERHEAD, f"the process grew by {grown:,} bytes"


def test_decoded_memo_entry_leaves_with_its_entry() -> None:
    from dogpile.cache.api import CachedValue

    backend = (
        make_region()
        .configure("sqla_cachelayer.memory", arguments={"max_entries": 2, "max_bytes": "1MiB"})
        .backend
    )
    memo = backend.decoded
    payloads = {key: key.encode() * 100 for key in ("a", "b", "c", "d")}
    for key in ("a", "b"):
        backend.set(key, CachedValue(payloads[key], {}))
        memo.put(payloads[key], object(), 1000)
    assert len(memo.entries) == 2 and backend.stats()["decoded_bytes"] == 2 * 1100
    backend.delete("a")  # deleted
    backend.set("b", CachedValue(payloads["c"], {}))  # replaced
    assert memo.entries == {} and memo.bytes == 0
    backend.set("d", CachedValue(payloads["d"], {}))
    memo.put(payloads["d"], object(), 1000)
    backend.set("e", CachedValue(b"e", {}))
    backend.set("f", CachedValue(b"f", {}))  # d evicted (max_entries)
    assert memo.entries == {} and backend.current_bytes == backend.stats()["entry_bytes"]
