"""Memory stays bounded for the life of a process: engines and sessions the
layer was installed on are freed with the application's last reference, and
every internal map stays at its bound (a small version of benchmarks/soak.py)."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
from _models import Base, User
from dogpile.cache import make_region
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session, sessionmaker

import sqla_cachelayer as scl
from sqla_cachelayer import invalidation, records


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
    layer = _layer(max_entries=100, max_bytes="1MiB")  # bytes: the decoded memo is used
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
    assert records._decoded.bytes <= records._decoded.max_bytes
    assert len(records._decoded.entries) <= records._decoded.max_entries
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
