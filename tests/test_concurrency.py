"""G1/G3 under real threads: writers commit while readers read through the cache.

Every read records the newest value whose commit had *returned* before the read
began; a cached answer older than that is a stale read. There must be none.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from _models import Base, Counter
from dogpile.cache import make_region
from sqlalchemy import select, update
from sqlalchemy.orm import sessionmaker

import sqla_cachelayer as scl
from sqla_cachelayer import FromCache

WRITERS = 2
READERS = 4
COMMITS_PER_WRITER = 150


def _run_workload(engine: Any, layer: Any) -> tuple[int, int, list[str]]:
    Base.metadata.create_all(engine)
    Session = layer.install(sessionmaker(engine))
    with Session() as s:
        s.add_all([Counter(id=i + 1, value=0) for i in range(WRITERS)])
        s.commit()
    acknowledged = [0] * WRITERS  # newest value whose commit returned, per row
    done = threading.Event()
    stale: list[str] = []
    reads = [0]
    errors: list[BaseException] = []

    def writer(row: int) -> None:
        try:
            for value in range(1, COMMITS_PER_WRITER + 1):
                with Session() as s:
                    s.execute(update(Counter).where(Counter.id == row + 1).values(value=value))
                    s.commit()
                acknowledged[row] = value
        except BaseException as err:
            errors.append(err)

    def reader(long_transactions: bool) -> None:
        try:
            pause = threading.Event()
            while not done.is_set():
                floors = list(acknowledged)
                with Session() as s:
                    if long_transactions:
                        # start the transaction's snapshot, let writers commit,
                        # then miss: such a fill must not be published (G3)
                        s.execute(select(Counter.id).where(Counter.id < 0)).all()
                        pause.wait(0.002)
                    got = dict(
                        s.execute(select(Counter.id, Counter.value).options(FromCache())).all()
                    )
                reads[0] += 1
                for row in range(WRITERS):
                    if got[row + 1] < floors[row]:
                        stale.append(
                            f"row {row}: read {got[row + 1]} after {floors[row]} was committed"
                        )
        except BaseException as err:
            errors.append(err)

    readers = [threading.Thread(target=reader, args=(i % 2 == 1,)) for i in range(READERS)]
    writers = [threading.Thread(target=writer, args=(i,)) for i in range(WRITERS)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join(120)
    done.set()
    for t in readers:
        t.join(120)
    assert not errors, errors[:3]
    return reads[0], layer.stats()["hits"], stale


def _sqlite_engine(path: Any) -> Any:
    # readers hold transactions open on purpose (see reader()); deferred BEGIN
    # keeps them from queueing behind writers for the write lock
    return scl.engine_from_config(
        {"sqlalchemy.url": f"sqlite:///{path}", "sqlalchemy.begin_mode": "deferred"}
    )


def test_threads_sqlite_memory_region(sqlite_path: Any) -> None:
    engine = _sqlite_engine(sqlite_path)
    layer = scl.CacheLayer({"default": make_region().configure("dogpile.cache.memory")})
    reads, hits, stale = _run_workload(engine, layer)
    assert not stale, stale[:5]
    assert hits > 0, "the workload must exercise hits, or it proves nothing"
    assert reads > hits


@pytest.mark.parametrize("backend", ["sqla_cachelayer.memory", "sqla_cachelayer.sqlite"])
def test_threads_sqlite_project_backends(sqlite_path: Any, tmp_path: Any, backend: str) -> None:
    engine = _sqlite_engine(sqlite_path)
    settings = {"cachelayer.regions.default.backend": backend}
    if backend.endswith("sqlite"):
        settings["cachelayer.regions.default.arguments.path"] = str(tmp_path / "cache.db")
    layer = scl.CacheLayer.from_settings(settings)
    _, hits, stale = _run_workload(engine, layer)
    assert not stale, stale[:5]
    assert hits > 0


def test_threads_postgresql(pg_engine_url: str) -> None:
    engine = scl.engine_from_config({"sqlalchemy.url": pg_engine_url})
    layer = scl.CacheLayer({"default": make_region().configure("dogpile.cache.memory")})
    _, hits, stale = _run_workload(engine, layer)
    assert not stale, stale[:5]
    assert hits > 0


def test_threads_postgresql_repeatable_read(pg_engine_url: str) -> None:
    """Snapshots taken at the first statement: fills from old snapshots must not publish."""
    engine = scl.engine_from_config(
        {"sqlalchemy.url": pg_engine_url, "sqlalchemy.isolation_level": "REPEATABLE READ"}
    )
    layer = scl.CacheLayer({"default": make_region().configure("dogpile.cache.memory")})
    _, _, stale = _run_workload(engine, layer)
    assert not stale, stale[:5]
