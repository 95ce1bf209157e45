"""Process entry points for the multi-process tests (importable, for ``spawn``)."""

from __future__ import annotations

import time
from typing import Any

from _models import Base, Counter
from sqlalchemy import event, func, select, update
from sqlalchemy.orm import sessionmaker

import sqla_cachelayer as scl
from sqla_cachelayer import FromCache


def _setup(db_url: str, cache_settings: dict[str, str]) -> tuple[Any, Any, Any]:
    engine = scl.engine_from_config({"sqlalchemy.url": db_url, "sqlalchemy.begin_mode": "deferred"})
    layer = scl.CacheLayer.from_settings(cache_settings)
    Session = layer.install(sessionmaker(engine))
    return engine, layer, Session


def create_schema(db_url: str) -> None:
    engine = scl.engine_from_config({"sqlalchemy.url": db_url})
    Base.metadata.create_all(engine)
    with sessionmaker(engine)() as s:
        s.add(Counter(id=1, value=0))
        s.commit()
    engine.dispose()


def writer(
    db_url: str,
    cache_settings: dict[str, str],
    commits: int,
    acknowledged: Any,
    ready: Any,
    results: Any = None,
) -> None:
    """Commit ``commits`` increments; publish each value once its commit returned."""
    engine, layer, Session = _setup(db_url, cache_settings)
    ready.wait()
    for value in range(1, commits + 1):
        with Session() as s:
            s.execute(update(Counter).where(Counter.id == 1).values(value=value))
            s.commit()
        acknowledged.value = value
    if results is not None:
        results.put(("writer", layer.stats()))
    engine.dispose()


def reader(
    db_url: str,
    cache_settings: dict[str, str],
    acknowledged: Any,
    done: Any,
    ready: Any,
    results: Any,
) -> None:
    """Read through the cache until ``done``; report reads, hits and stale reads."""
    engine, layer, Session = _setup(db_url, cache_settings)
    stmt = select(Counter.value).where(Counter.id == 1).options(FromCache())
    stale: list[str] = []
    reads = 0
    ready.wait()
    while not done.is_set():
        floor = acknowledged.value
        with Session() as s:
            got = s.execute(stmt).scalar_one()
        reads += 1
        if got < floor:
            stale.append(f"read {got} after {floor} was acknowledged")
    results.put((reads, layer.stats()["hits"], stale[:5], len(stale), layer.stats()))
    engine.dispose()


def slow_misser(db_url: str, cache_settings: dict[str, str], barrier: Any, results: Any) -> None:
    """Miss one key at the same moment as the other processes; report queries run."""
    engine, layer, Session = _setup(db_url, cache_settings)

    @event.listens_for(engine, "connect")
    def _slow(dbapi_connection: Any, record: Any) -> None:
        def slow_value(x: int) -> int:
            time.sleep(0.5)  # the query is slow, so the misses overlap
            return x

        dbapi_connection.create_function("slow_value", 1, slow_value)

    ran: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "slow_value" in statement:
            ran.append(statement)

    stmt = select(func.slow_value(Counter.value)).where(Counter.id == 1).options(FromCache())
    barrier.wait()
    with Session() as s:
        value = s.execute(stmt).scalar_one()
    results.put((len(ran), value, layer.stats()))
    engine.dispose()
