"""G7: run_in_transaction reads from the database, whatever the session's cache defaults.

Real threads on a real SQLite file, a real cache layer.  A read served from
the cache inside a read-modify-write unit of work may return a value that a
concurrent commit has already replaced (the commit and the cache's stamp bump
are not one atomic step), and writing what was computed from it loses that
commit's update.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Integer, event, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, scoped_session
from sqlalchemy.orm import sessionmaker as make_sessionmaker

import sqla_cachelayer as scl
from sqla_cachelayer._compat import SESSION_EXECUTION_OPTIONS
from sqla_cachelayer.retry import UNIT_OF_WORK_INFO_KEY, RetryStats, run_in_transaction


class Base(DeclarativeBase):
    pass


class Counter(Base):
    __tablename__ = "g7_counter"
    id: Mapped[int] = mapped_column(primary_key=True)
    value: Mapped[int] = mapped_column(Integer)


def _setup(path: Path, **cache: str) -> tuple[Engine, Any]:
    settings = {
        "sqlalchemy.url": f"sqlite:///{path}",
        "cachelayer.regions.default.backend": "sqla_cachelayer.memory",
        **{f"cachelayer.{key}": value for key, value in cache.items()},
    }
    engine = scl.engine_from_config(settings)
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        session.add(Counter(id=1, value=0))
    return engine, scl.CacheLayer.from_settings(settings)


def _increments(factory: Callable[[], Session], threads: int, per_thread: int) -> int:
    stats = RetryStats()
    errors: list[BaseException] = []

    def bump(session: Session) -> None:
        counter = session.get(Counter, 1)
        assert counter is not None
        counter.value += 1

    def work() -> None:
        for _ in range(per_thread):
            try:
                run_in_transaction(factory, bump, stats=stats)
            except Exception as error:  # counted: the final value must match successes
                errors.append(error)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == [], errors[:3]
    return int(stats.snapshot()["succeeded"])


def _final(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(Counter.value)).scalar_one())


def test_cache_all_unit_of_work_loses_no_update(tmp_path: Path) -> None:
    engine, layer = _setup(tmp_path / "db.sqlite", cache_all="true")
    Session = layer.install(make_sessionmaker(engine))
    with Session() as session:  # the row is in the cache before the race starts
        assert session.get(Counter, 1) is not None
    succeeded = _increments(Session, threads=4, per_thread=100)
    assert _final(engine) == succeeded == 400
    assert layer.stats()["bypasses"] >= 400
    engine.dispose()


@pytest.mark.skipif(
    not SESSION_EXECUTION_OPTIONS, reason="Session(execution_options=...) arrived in SQLAlchemy 2.1"
)
def test_session_wide_cache_region_unit_of_work_loses_no_update(tmp_path: Path) -> None:
    engine, layer = _setup(tmp_path / "db.sqlite")
    Session = layer.install(
        make_sessionmaker(engine, execution_options={"cache_region": "default"})
    )
    with Session() as session:
        assert session.get(Counter, 1) is not None
    succeeded = _increments(Session, threads=4, per_thread=100)
    assert _final(engine) == succeeded == 400
    engine.dispose()


def _count_selects(engine: Engine) -> list[str]:
    seen: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append(statement)

    return seen


def test_use_cache_true_reads_from_the_cache(tmp_path: Path) -> None:
    engine, layer = _setup(tmp_path / "db.sqlite", cache_all="true")
    Session = layer.install(make_sessionmaker(engine))
    selects = _count_selects(engine)

    def read(session: Session) -> int:
        return int(session.scalars(select(Counter.value)).one())

    assert run_in_transaction(Session, read) == 0
    assert run_in_transaction(Session, read) == 0
    assert len(selects) == 2  # the default: the database, each time
    del selects[:]
    assert run_in_transaction(Session, read, use_cache=True) == 0  # a miss: stored
    assert run_in_transaction(Session, read, use_cache=True) == 0  # a hit
    assert len(selects) == 1

    @run_in_transaction(Session, use_cache=True)
    def read_cached(session: Session) -> int:
        return read(session)

    assert read_cached() == 0
    assert len(selects) == 1
    engine.dispose()


def test_unit_of_work_mark_lives_only_as_long_as_the_unit(tmp_path: Path) -> None:
    engine, layer = _setup(tmp_path / "db.sqlite", cache_all="true")
    registry = scoped_session(layer.install(make_sessionmaker(engine)))
    marks: list[Any] = []

    def look(session: Session) -> None:
        marks.append(session.info.get(UNIT_OF_WORK_INFO_KEY))

    run_in_transaction(registry, look)
    run_in_transaction(registry, look, use_cache=True)
    # The same session each time (scoped_session): the mark was taken away.
    assert marks == [True, None]
    assert UNIT_OF_WORK_INFO_KEY not in registry().info
    registry.remove()
    engine.dispose()


def test_async_unit_of_work_marks_the_sync_session(tmp_path: Path) -> None:
    pytest.importorskip("aiosqlite")
    pytest.importorskip("greenlet")
    import asyncio

    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    settings = {
        "sqlalchemy.url": f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}",
        "cachelayer.regions.default.backend": "sqla_cachelayer.memory",
        "cachelayer.cache_all": "true",
    }
    sync_engine, _ = _setup(tmp_path / "db.sqlite")
    sync_engine.dispose()

    async def main() -> tuple[list[Any], int]:
        engine = scl.async_engine_from_config(settings)
        layer = scl.CacheLayer.from_settings(settings)
        Session = layer.install(async_sessionmaker(engine))
        marks: list[Any] = []

        async def bump(session: AsyncSession) -> None:
            marks.append(session.sync_session.info.get(UNIT_OF_WORK_INFO_KEY))
            counter = await session.get(Counter, 1)
            assert counter is not None
            counter.value += 1

        async with Session() as session:
            await session.get(Counter, 1)  # cached
        await asyncio.gather(*(scl.run_in_transaction_async(Session, bump) for _ in range(20)))
        await scl.run_in_transaction_async(Session, bump, use_cache=True)
        async with engine.connect() as conn:
            final = int((await conn.execute(select(Counter.value))).scalar_one())
        await engine.dispose()
        return marks, final

    marks, final = asyncio.run(main())
    # One mark per attempt (a unit may have been rerun); the last, use_cache=True, none.
    assert len(marks) >= 21 and set(marks[:-1]) == {True} and marks[-1] is None
    assert final == 21
