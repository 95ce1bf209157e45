"""Single flight for coroutines (G6) and cancellation mid-miss, on aiosqlite.

The slow query calls a SQL function ``slow(x)`` that blocks (in aiosqlite's
worker thread) until the test opens a gate, so "slow" is a state the test
controls, not a duration it hopes for.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from _models import Base, User, seed
from dogpile.cache import make_region
from sqlalchemy import Float, cast, event, func, select, text, update
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import sessionmaker

from sqla_cachelayer import CacheLayer, FromCache, async_engine_from_config, engine_from_config
from sqla_cachelayer._flight import Flight


class Gate:
    """``slow(x)``: the first ``blocked`` calls wait until ``open()``."""

    def __init__(self, blocked: int = 1 << 30) -> None:
        self.opened = threading.Event()
        self.entered = threading.Event()
        self.blocked = blocked
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, x: Any) -> Any:
        with self._lock:
            self.calls += 1
            block = self.calls <= self.blocked
        self.entered.set()
        if block:
            self.opened.wait(60)
        return x

    def open(self) -> None:
        self.opened.set()


def _attach(sync_engine: Any, gate: Gate, statements: list[str]) -> None:
    @event.listens_for(sync_engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.create_function("slow", 1, gate)

    @event.listens_for(sync_engine, "before_cursor_execute")
    def _count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "slow(" in statement:
            statements.append(statement)


def _layer() -> CacheLayer:
    return CacheLayer({"default": make_region().configure("dogpile.cache.memory")})


async def _prepare(url: str, gate: Gate, statements: list[str]) -> Any:
    engine = async_engine_from_config({"sqlalchemy.url": url})
    _attach(engine.sync_engine, gate, statements)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    async with engine.connect() as conn:
        await conn.run_sync(lambda c: seed(sessionmaker(c)))
        await conn.commit()
    return engine


STMT = select(func.slow(User.id), User.name).order_by(User.id).options(FromCache())


async def _until(cond: Callable[[], bool], limit: float = 20.0) -> bool:
    """Poll ``cond`` on the loop (never a timing assert: False only means the
    state never came, and the assertions after it say what is wrong)."""
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


def _flight(layer: CacheLayer) -> Flight | None:
    flights = layer._states["default"].flights
    return next(iter(flights._by_key.values()), None)


def test_200_coroutines_one_slow_miss_one_select(tmp_path: Any) -> None:
    gate = Gate()
    statements: list[str] = []

    async def main() -> None:
        engine = await _prepare(f"sqlite+aiosqlite:///{tmp_path}/flight.db", gate, statements)
        layer = _layer()
        Session = layer.install(async_sessionmaker(engine))

        async def read() -> list[Any]:
            async with Session() as s:
                return [tuple(r) for r in (await s.execute(STMT)).all()]

        tasks = [asyncio.create_task(read()) for _ in range(200)]
        # every coroutine but the filling one waits for its flight
        await _until(lambda: (f := _flight(layer)) is not None and f.waiting == 199)
        gate.open()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        assert results[0] == [(i, f"user{i}") for i in range(1, 6)]
        assert all(r == results[0] for r in results)
        assert len(statements) == 1, len(statements)
        stats = layer.stats()
        assert stats["misses"] == 1 and stats["hits"] == 199 and stats["stores"] == 1
        assert len(layer._states["default"].flights) == 0
        await engine.dispose()

    try:
        asyncio.run(main())
    finally:
        gate.open()


def test_threads_and_loops_share_one_flight(tmp_path: Any) -> None:
    """Two event loops (each in its own thread, 20 coroutines each) and four
    plain threads with sync sessions, on one layer and one database file
    (sync and aiosqlite URLs share keys), miss one key: one SELECT."""
    gate = Gate()
    statements: list[str] = []
    layer = _layer()
    path = f"{tmp_path}/mix.db"
    engine0 = asyncio.run(_prepare(f"sqlite+aiosqlite:///{path}", gate, []))
    asyncio.run(engine0.dispose())
    sync_engine = engine_from_config({"sqlalchemy.url": f"sqlite:///{path}"})
    _attach(sync_engine, gate, statements)
    SyncSession = layer.install(sessionmaker(sync_engine))
    results: list[Any] = []
    errors: list[BaseException] = []
    ready = threading.Barrier(7)

    def sync_reader() -> None:
        try:
            ready.wait(30)
            with SyncSession() as s:
                results.append([tuple(r) for r in s.execute(STMT).all()])
        except BaseException as err:  # reported below
            errors.append(err)

    def loop_reader() -> None:
        async def main() -> None:
            engine = async_engine_from_config({"sqlalchemy.url": f"sqlite+aiosqlite:///{path}"})
            _attach(engine.sync_engine, gate, statements)
            Session = layer.install(async_sessionmaker(engine))

            async def read() -> list[Any]:
                async with Session() as s:
                    return [tuple(r) for r in (await s.execute(STMT)).all()]

            await asyncio.to_thread(ready.wait, 30)
            results.extend(await asyncio.gather(*(read() for _ in range(20))))
            await engine.dispose()

        try:
            asyncio.run(main())
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=sync_reader) for _ in range(4)]
    threads += [threading.Thread(target=loop_reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        ready.wait(30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            f = _flight(layer)
            if f is not None and f.waiting == 43:
                break
            time.sleep(0.005)
    finally:
        gate.open()
        for t in threads:
            t.join(60)
    assert not errors, errors
    assert len(results) == 44
    assert all(r == [(i, f"user{i}") for i in range(1, 6)] for r in results)
    assert len(statements) == 1, len(statements)
    assert len(layer._states["default"].flights) == 0


def test_cancelled_miss_holds_nothing_writes_nothing(tmp_path: Any) -> None:
    gate = Gate(blocked=1)  # only the first query is slow
    statements: list[str] = []

    async def main() -> None:
        engine = await _prepare(f"sqlite+aiosqlite:///{tmp_path}/cancel.db", gate, statements)
        layer = _layer()
        Session = layer.install(async_sessionmaker(engine, expire_on_commit=False))
        rs = layer._states["default"]

        async def read() -> list[Any]:
            async with Session() as s:
                return [tuple(r) for r in (await s.execute(STMT)).all()]

        filler = asyncio.create_task(read())
        assert await asyncio.to_thread(gate.entered.wait, 30)
        waiters = [asyncio.create_task(read()) for _ in range(5)]
        await _until(lambda: (f := _flight(layer)) is not None and f.waiting == 5)
        filler.cancel()
        # the waiters wake at once (the slow query is still blocked): one runs
        # the query, the others are served its entry
        results = await asyncio.wait_for(asyncio.gather(*waiters), 30)
        assert not gate.opened.is_set()
        assert all(r == [(i, f"user{i}") for i in range(1, 6)] for r in results)
        assert len(statements) == 2  # the cancelled one and one waiter's
        stats = layer.stats()
        assert stats["stores"] == 1 and stats["hits"] == 4
        assert len(rs.flights) == 0

        # let the cancelled query's thread finish: the task ends cancelled,
        # and still nothing more is written
        gate.open()
        with pytest.raises(asyncio.CancelledError):
            await filler
        assert layer.stats()["stores"] == 1

        # freshness: a later commit invalidates the waiter's entry
        async with Session() as s:
            await s.execute(update(User).where(User.id == 1).values(name="renamed"))
            await s.commit()
        fresh = await read()
        assert fresh[0] == (1, "renamed")
        await engine.dispose()

    try:
        asyncio.run(main())
    finally:
        gate.open()


def test_cancelled_alone_leaves_no_entry_and_next_caller_proceeds(tmp_path: Any) -> None:
    gate = Gate(blocked=1)
    statements: list[str] = []

    async def main() -> None:
        engine = await _prepare(f"sqlite+aiosqlite:///{tmp_path}/alone.db", gate, statements)
        layer = _layer()
        Session = layer.install(async_sessionmaker(engine))
        rs = layer._states["default"]

        async def read() -> list[Any]:
            async with Session() as s:
                return [tuple(r) for r in (await s.execute(STMT)).all()]

        filler = asyncio.create_task(read())
        assert await asyncio.to_thread(gate.entered.wait, 30)
        assert len(rs.flights) == 1
        filler.cancel()
        await _until(lambda: len(rs.flights) == 0)
        assert len(rs.flights) == 0
        stats = layer.stats()
        assert stats["stores"] == 0 and stats["misses"] == 1
        # the next caller of the key proceeds while the cancelled query is
        # still blocked in the database thread
        assert await asyncio.wait_for(read(), 30) == [(i, f"user{i}") for i in range(1, 6)]
        assert not gate.opened.is_set()
        assert layer.stats()["stores"] == 1
        gate.open()
        with pytest.raises(asyncio.CancelledError):
            await filler
        await engine.dispose()

    try:
        asyncio.run(main())
    finally:
        gate.open()


def test_sync_session_in_the_loops_thread_does_not_wait_for_its_coroutines(
    tmp_path: Any,
) -> None:
    """A synchronous session used inside a coroutine (in the loop's thread)
    misses a key that another coroutine of that loop is filling: waiting for
    it would block the loop that must finish the fill, so it runs its own
    query instead."""
    gate = Gate(blocked=1)
    statements: list[str] = []
    path = f"{tmp_path}/same.db"
    layer = _layer()
    outcome: list[Any] = []

    async def main() -> None:
        engine = await _prepare(f"sqlite+aiosqlite:///{path}", gate, statements)
        Session = layer.install(async_sessionmaker(engine))
        sync_engine = engine_from_config({"sqlalchemy.url": f"sqlite:///{path}"})
        _attach(sync_engine, gate, statements)
        SyncSession = layer.install(sessionmaker(sync_engine))

        async def read() -> list[Any]:
            async with Session() as s:
                return [tuple(r) for r in (await s.execute(STMT)).all()]

        filler = asyncio.create_task(read())
        assert await asyncio.to_thread(gate.entered.wait, 30)
        with SyncSession() as s:  # blocks this loop's thread while it runs
            outcome.append([tuple(r) for r in s.execute(STMT).all()])
        gate.open()
        outcome.append(await filler)
        sync_engine.dispose()
        await engine.dispose()

    runner = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    runner.start()
    runner.join(30)
    gate.open()
    assert not runner.is_alive(), "the loop's thread waited for its own coroutine"
    expected = [(i, f"user{i}") for i in range(1, 6)]
    assert outcome == [expected, expected]
    assert len(statements) == 2


@pytest.mark.postgresql
def test_cancelled_miss_on_asyncpg(pg_engine_url: str) -> None:
    """The same on PostgreSQL through asyncpg: the filling coroutine sleeps in
    the server (``pg_sleep``, long only in its own transaction) and is
    cancelled; its waiters wake at once, one queries, nothing of the cancelled
    one is stored, and a later commit still invalidates."""
    pytest.importorskip("asyncpg")
    url = pg_engine_url.replace("postgresql+psycopg://", "postgresql+asyncpg://", 1)
    url = url.replace("postgresql://", "postgresql+asyncpg://", 1)
    delay = func.coalesce(func.nullif(func.current_setting("scl.slow", True), ""), "0")
    stmt = (
        select(User.name, func.pg_sleep(cast(delay, Float)))
        .where(User.id == 1)
        .options(FromCache())
    )
    statements: list[str] = []

    async def main() -> None:
        engine = async_engine_from_config({"sqlalchemy.url": url})
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        async with engine.connect() as conn:
            await conn.run_sync(lambda c: seed(sessionmaker(c)))
            await conn.commit()

        @event.listens_for(engine.sync_engine, "before_cursor_execute")
        def _count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if "pg_sleep" in statement:
                statements.append(statement)

        layer = _layer()
        Session = layer.install(async_sessionmaker(engine, expire_on_commit=False))
        rs = layer._states["default"]

        async def slow_read() -> Any:
            async with Session() as s:
                await s.execute(text("SELECT set_config('scl.slow', '60', true)"))
                return (await s.execute(stmt)).one()

        async def read() -> Any:
            async with Session() as s:
                return tuple((await s.execute(stmt)).one())

        filler = asyncio.create_task(slow_read())
        await _until(lambda: len(statements) == 1 and len(rs.flights) == 1)
        waiters = [asyncio.create_task(read()) for _ in range(5)]
        await _until(lambda: (f := _flight(layer)) is not None and f.waiting == 5)
        filler.cancel()
        results = await asyncio.wait_for(asyncio.gather(*waiters), 30)
        assert results == [("user1", None)] * 5
        assert len(statements) == 2  # the cancelled one and one waiter's
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(filler, 30)
        stats = layer.stats()
        assert stats["stores"] == 1 and stats["hits"] == 4
        assert len(rs.flights) == 0
        async with Session() as s:
            await s.execute(update(User).where(User.id == 1).values(name="renamed"))
            await s.commit()
        assert await read() == ("renamed", None)
        await engine.dispose()

    asyncio.run(main())
