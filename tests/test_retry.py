"""run_in_transaction against real induced failures, SQLite and PostgreSQL.

Failures are real database errors: a second SQLite connection holding the
write lock (with ``busy_timeout`` 0, so the error comes at once), two
PostgreSQL SERIALIZABLE transactions updating one row, a real deadlock, a
backend terminated with ``pg_terminate_backend``.  To make a retry succeed
deterministically the obstacle is removed from inside ``retry_on`` after the
n-th failure; no test measures time.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Integer, String, event, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqla_cachelayer.engine import engine_from_config
from sqla_cachelayer.retry import (
    RetryStats,
    is_transient_error,
    retry_stats,
    run_in_transaction,
    run_in_transaction_async,
    transient_reason,
)

FAST: dict[str, Any] = {"base_delay": 0.0005, "max_delay": 0.002}


class Base(DeclarativeBase):
    pass


class Counter(Base):
    __tablename__ = "counter"
    id: Mapped[int] = mapped_column(primary_key=True)
    value: Mapped[int] = mapped_column(Integer)


class Note(Base):
    __tablename__ = "note"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(50), unique=True)


def bump(session: Session) -> int:
    counter = session.get(Counter, 1)
    assert counter is not None
    counter.value += 1
    return counter.value


def counter_value(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(Counter.value)).scalar_one())


def seeded(engine: Engine) -> sessionmaker[Session]:
    Base.metadata.create_all(engine)
    factory = sessionmaker(engine)
    with factory.begin() as session:
        session.add(Counter(id=1, value=0))
    return factory


# --- SQLite ----------------------------------------------------------------------------------


@pytest.fixture
def sqlite_engine(sqlite_path: Path) -> Iterator[Engine]:
    # busy_timeout 0: a held lock fails the statement at once instead of after 5 s.
    engine = engine_from_config(
        {"sqlalchemy.url": f"sqlite:///{sqlite_path}", "sqlalchemy.pragma.busy_timeout": "0"}
    )
    yield engine
    engine.dispose()


class Blocker:
    """A second connection holding the SQLite write lock until released."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
        self.conn.close()


def record(seen: list[BaseException]) -> Any:
    def retry_on(error: BaseException) -> bool:
        seen.append(error)
        return is_transient_error(error)

    return retry_on


def release_after(blocker: Blocker, failures: int, seen: list[BaseException]) -> Any:
    def retry_on(error: BaseException) -> bool:
        seen.append(error)
        if len(seen) == failures:
            blocker.release()
        return is_transient_error(error)

    return retry_on


def test_sqlite_lock_is_retried_until_released(sqlite_engine: Engine, sqlite_path: Path) -> None:
    factory = seeded(sqlite_engine)
    blocker = Blocker(sqlite_path)
    seen: list[BaseException] = []
    stats = RetryStats()
    calls: list[int] = []

    def unit(session: Session) -> int:
        calls.append(1)
        return bump(session)

    result = run_in_transaction(
        factory, unit, retry_on=release_after(blocker, 2, seen), stats=stats, **FAST
    )
    assert result == 1
    assert len(calls) == 3  # the whole function ran again each time
    assert all(transient_reason(error) == "sqlite busy" for error in seen)
    assert isinstance(seen[0], sa_exc.OperationalError)
    snapshot = stats.snapshot()
    assert snapshot == {
        "calls": 1,
        "attempts": 3,
        "retries": 2,
        "succeeded": 1,
        "gave_up": 0,
        "not_retried": 0,
        "by_reason": {"sqlite busy": 2},
    }
    assert counter_value(sqlite_engine) == 1


def test_sqlite_gives_up_after_attempts(sqlite_engine: Engine, sqlite_path: Path) -> None:
    factory = seeded(sqlite_engine)
    blocker = Blocker(sqlite_path)
    stats = RetryStats()
    try:
        with pytest.raises(sa_exc.OperationalError, match="database is locked"):
            run_in_transaction(factory, bump, attempts=3, stats=stats, **FAST)
    finally:
        blocker.release()
    snapshot = stats.snapshot()
    assert (snapshot["attempts"], snapshot["retries"], snapshot["gave_up"]) == (3, 2, 1)
    assert snapshot["succeeded"] == 0
    assert counter_value(sqlite_engine) == 0


def test_sqlite_gives_up_when_time_runs_out(sqlite_engine: Engine, sqlite_path: Path) -> None:
    factory = seeded(sqlite_engine)
    blocker = Blocker(sqlite_path)
    stats = RetryStats()
    try:
        with pytest.raises(sa_exc.OperationalError):
            # max_total=0: the time budget is spent by the first attempt.
            run_in_transaction(factory, bump, attempts=50, max_total=0, stats=stats)
    finally:
        blocker.release()
    assert stats.snapshot()["attempts"] == 1
    assert stats.snapshot()["gave_up"] == 1


def test_stale_snapshot_write_is_retried(sqlite_path: Path) -> None:
    """A deferred transaction whose write is refused (stale read): the whole unit reruns."""
    engine = engine_from_config(
        {
            "sqlalchemy.url": f"sqlite:///{sqlite_path}",
            "sqlalchemy.pragma.busy_timeout": "0",
            "sqlalchemy.begin_mode": "deferred",
        }
    )
    seeded_factory = seeded(engine)

    def factory() -> Session:
        # A session already in its (deferred) transaction when the helper
        # gets it: the helper cannot make that one begin IMMEDIATE.
        session = seeded_factory()
        session.connection()
        return session

    seen: list[BaseException] = []

    def unit(session: Session) -> int:
        value = bump(session)
        if not seen:
            # Another writer commits after this unit read: its snapshot is stale.
            other = sqlite3.connect(sqlite_path, isolation_level=None)
            other.execute("UPDATE counter SET value = value + 10")
            other.close()
        return value

    stats = RetryStats()
    result = run_in_transaction(factory, unit, retry_on=record(seen), stats=stats)
    assert result == 11
    assert counter_value(engine) == 11
    # SQLITE_BUSY_SNAPSHOT, an extended code of SQLITE_BUSY.
    assert getattr(getattr(seen[0], "orig", None), "sqlite_errorcode", None) == 517
    assert stats.snapshot()["by_reason"] == {"sqlite busy": 1}
    engine.dispose()


def test_non_transient_error_is_not_retried(sqlite_engine: Engine) -> None:
    factory = seeded(sqlite_engine)
    with factory.begin() as session:
        session.add(Note(id=1, text="taken"))
    stats = RetryStats()
    calls: list[int] = []

    def unit(session: Session) -> None:
        calls.append(1)
        bump(session)
        session.add(Note(id=2, text="taken"))  # unique violation at flush

    with pytest.raises(sa_exc.IntegrityError):
        run_in_transaction(factory, unit, stats=stats, **FAST)
    assert calls == [1]
    assert stats.snapshot()["not_retried"] == 1
    assert stats.snapshot()["retries"] == 0
    assert counter_value(sqlite_engine) == 0  # rolled back

    def broken(session: Session) -> None:
        calls.append(1)
        raise KeyError("application bug")

    with pytest.raises(KeyError):
        run_in_transaction(factory, broken, stats=stats)
    assert calls == [1, 1]


def test_decorator_form_and_fresh_session_each_attempt(
    sqlite_engine: Engine, sqlite_path: Path
) -> None:
    factory = seeded(sqlite_engine)
    blocker = Blocker(sqlite_path)
    seen: list[BaseException] = []
    sessions: list[Session] = []
    stats = RetryStats()

    @run_in_transaction(
        factory,
        retry_on=release_after(blocker, 1, seen),
        stats=stats,
        base_delay=0.0005,
        max_delay=0.002,
    )
    def add_note(session: Session, text_value: str, *, times: int = 1) -> str:
        sessions.append(session)
        session.add(Note(text=text_value))
        for _ in range(times):
            bump(session)
        return text_value.upper()

    assert add_note.__name__ == "add_note"
    assert add_note("hello", times=2) == "HELLO"
    assert len(sessions) == 2 and sessions[0] is not sessions[1]
    with factory() as session:
        assert session.scalars(select(Note.text)).all() == ["hello"]  # not twice
    assert counter_value(sqlite_engine) == 2


def test_retry_on_exception_classes(sqlite_engine: Engine) -> None:
    factory = seeded(sqlite_engine)
    stats = RetryStats()
    calls: list[int] = []

    class Conflict(Exception):
        pass

    def unit(session: Session) -> int:
        calls.append(1)
        bump(session)
        if len(calls) < 3:
            raise Conflict
        return len(calls)

    assert run_in_transaction(factory, unit, retry_on=Conflict, stats=stats, **FAST) == 3
    assert counter_value(sqlite_engine) == 1
    assert stats.snapshot()["by_reason"] == {"retry_on": 2}


def test_module_level_stats_count_by_default(sqlite_engine: Engine) -> None:
    factory = seeded(sqlite_engine)
    before = retry_stats.snapshot()
    run_in_transaction(factory, bump)
    after = retry_stats.snapshot()
    assert after["calls"] - before["calls"] >= 1
    assert after["succeeded"] - before["succeeded"] >= 1


def test_bad_arguments() -> None:
    factory = sessionmaker()
    with pytest.raises(ValueError, match="attempts"):
        run_in_transaction(factory, bump, attempts=0)
    with pytest.raises(ValueError, match="base_delay"):
        run_in_transaction(factory, bump, base_delay=-1)
    with pytest.raises(TypeError, match="retry_on"):
        run_in_transaction(factory, bump, retry_on=42)  # type: ignore[call-overload]


def test_transient_reason_on_raw_errors() -> None:
    assert transient_reason(sqlite3.OperationalError("database is locked")) == "sqlite busy"
    assert transient_reason(sqlite3.IntegrityError("UNIQUE constraint failed")) is None
    assert transient_reason(ValueError("no")) is None


def test_threaded_deferred_read_modify_write_with_retry_loses_nothing(sqlite_path: Path) -> None:
    """Deferred BEGIN makes RMW fail with SQLITE_BUSY_SNAPSHOT; rerunning fixes it."""
    engine = engine_from_config(
        {"sqlalchemy.url": f"sqlite:///{sqlite_path}", "sqlalchemy.begin_mode": "deferred"}
    )
    factory = seeded(engine)
    stats = RetryStats()
    threads, per_thread = 8, 25
    errors: list[BaseException] = []

    def work() -> None:
        for _ in range(per_thread):
            try:
                run_in_transaction(factory, bump, attempts=200, max_total=120, stats=stats)
            except BaseException as error:
                errors.append(error)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    assert counter_value(engine) == threads * per_thread == stats.snapshot()["succeeded"]
    engine.dispose()


# --- asyncio ---------------------------------------------------------------------------------


def test_async_retry_on_sqlite_lock(sqlite_path: Path) -> None:
    pytest.importorskip("aiosqlite")
    pytest.importorskip("greenlet")
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from sqla_cachelayer.engine import async_engine_from_config

    sync_engine = engine_from_config({"sqlalchemy.url": f"sqlite:///{sqlite_path}"})
    seeded(sync_engine)
    sync_engine.dispose()

    async def abump(session: AsyncSession) -> int:
        counter = await session.get(Counter, 1)
        assert counter is not None
        counter.value += 1
        return counter.value

    async def main() -> tuple[int, int, int]:
        engine = async_engine_from_config(
            {
                "sqlalchemy.url": f"sqlite+aiosqlite:///{sqlite_path}",
                "sqlalchemy.pragma.busy_timeout": "0",
            }
        )
        factory = async_sessionmaker(engine)
        stats = RetryStats()
        blocker = Blocker(sqlite_path)
        seen: list[BaseException] = []
        first = await run_in_transaction(
            factory, abump, retry_on=release_after(blocker, 1, seen), stats=stats, **FAST
        )
        assert stats.snapshot()["retries"] == 1

        blocker = Blocker(sqlite_path)
        seen = []

        @run_in_transaction_async(
            factory, retry_on=release_after(blocker, 2, seen), base_delay=0.0005, max_delay=0.002
        )
        async def add(session: AsyncSession, amount: int) -> int:
            counter = await session.get(Counter, 1)
            assert counter is not None
            counter.value += amount
            return counter.value

        second = await add(10)
        assert len(seen) == 2

        @run_in_transaction(factory)
        async def read(session: AsyncSession) -> int:
            return int((await session.execute(select(Counter.value))).scalar_one())

        third = await read()
        await engine.dispose()
        return first, second, third

    assert asyncio.run(main()) == (1, 11, 11)


# --- PostgreSQL ------------------------------------------------------------------------------


@pytest.fixture
def pg(pg_engine_url: str) -> Iterator[tuple[Engine, sessionmaker[Session]]]:
    engine = engine_from_config({"sqlalchemy.url": pg_engine_url})
    factory = seeded(engine)
    yield engine, factory
    engine.dispose()


@pytest.mark.postgresql
def test_pg_serialization_failure_is_retried(pg: tuple[Engine, sessionmaker[Session]]) -> None:
    engine, factory = pg
    stats = RetryStats()
    attempts: list[str] = []

    def unit_read_first(session: Session) -> int:
        level = session.execute(text("SHOW transaction_isolation")).scalar()
        attempts.append(str(level))
        counter = session.get(Counter, 1)  # snapshot taken here
        assert counter is not None
        if len(attempts) == 1:
            with engine.connect() as other:
                other.execute(text("UPDATE counter SET value = value + 100 WHERE id = 1"))
                other.commit()
        counter.value += 1  # flushed at commit: 40001, concurrent update
        return counter.value

    result = run_in_transaction(
        factory, unit_read_first, isolation_level="SERIALIZABLE", stats=stats, **FAST
    )
    assert attempts == ["serializable", "serializable"]
    assert result == 101
    assert counter_value(engine) == 101
    assert stats.snapshot()["by_reason"] == {"serialization failure": 1}
    assert stats.snapshot()["succeeded"] == 1


@pytest.mark.postgresql
def test_pg_serialization_failure_gives_up(pg: tuple[Engine, sessionmaker[Session]]) -> None:
    engine, factory = pg
    stats = RetryStats()

    def always_conflicting(session: Session) -> None:
        counter = session.get(Counter, 1)
        assert counter is not None
        with engine.connect() as other:
            other.execute(text("UPDATE counter SET value = value + 100 WHERE id = 1"))
            other.commit()
        counter.value += 1

    with pytest.raises(sa_exc.OperationalError) as raised:
        run_in_transaction(
            factory,
            always_conflicting,
            attempts=3,
            isolation_level="SERIALIZABLE",
            stats=stats,
            **FAST,
        )
    assert getattr(raised.value.orig, "sqlstate", None) == "40001"
    snapshot = stats.snapshot()
    assert (snapshot["attempts"], snapshot["retries"], snapshot["gave_up"]) == (3, 2, 1)
    assert counter_value(engine) == 300  # only the other transactions' updates


@pytest.mark.postgresql
def test_pg_deadlock_is_retried(pg: tuple[Engine, sessionmaker[Session]]) -> None:
    engine, factory = pg
    with factory.begin() as session:
        session.add(Counter(id=2, value=0))
    stats = RetryStats()
    barrier = threading.Barrier(2, timeout=30)
    errors: list[BaseException] = []

    def lock_in_order(first: int, second: int) -> Any:
        tries: list[int] = []

        def unit(session: Session) -> None:
            tries.append(1)
            session.execute(
                text("UPDATE counter SET value = value + 1 WHERE id = :i"), {"i": first}
            )
            if len(tries) == 1:
                barrier.wait()  # both hold their first row now
            session.execute(
                text("UPDATE counter SET value = value + 1 WHERE id = :i"), {"i": second}
            )

        def run() -> None:
            try:
                run_in_transaction(factory, unit, stats=stats, **FAST)
            except BaseException as error:
                errors.append(error)

        return run

    workers = [
        threading.Thread(target=lock_in_order(1, 2)),
        threading.Thread(target=lock_in_order(2, 1)),
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    snapshot = stats.snapshot()
    # Usually once; under load the victim's quick rerun can take its first row
    # again before the survivor, woken by the victim's rollback, has locked it,
    # and the two deadlock once more.
    assert set(snapshot["by_reason"]) == {"deadlock"}
    assert snapshot["by_reason"]["deadlock"] >= 1
    assert snapshot["succeeded"] == 2
    with engine.connect() as conn:
        assert conn.execute(text("SELECT sum(value) FROM counter")).scalar() == 4


def _terminate_own_backend(engine: Engine, session: Session) -> None:
    pid = session.execute(text("SELECT pg_backend_pid()")).scalar()
    with engine.connect() as admin:
        admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        admin.commit()


@pytest.mark.postgresql
def test_pg_disconnect_is_retried(pg: tuple[Engine, sessionmaker[Session]]) -> None:
    engine, factory = pg
    stats = RetryStats()
    tries: list[int] = []

    def unit(session: Session) -> int:
        tries.append(1)
        if len(tries) == 1:
            _terminate_own_backend(engine, session)
        return bump(session)

    assert run_in_transaction(factory, unit, stats=stats, **FAST) == 1
    assert stats.snapshot()["by_reason"] == {"disconnect": 1}
    assert counter_value(engine) == 1


@pytest.mark.postgresql
def test_pg_disconnect_during_commit_is_not_retried(
    pg: tuple[Engine, sessionmaker[Session]],
) -> None:
    engine, _ = pg
    stats = RetryStats()
    tries: list[int] = []
    factory = sessionmaker(engine)  # of its own: the listener below stays on it

    @event.listens_for(factory, "before_commit")
    def kill(session: Session) -> None:
        _terminate_own_backend(engine, session)

    def unit(session: Session) -> None:
        tries.append(1)
        bump(session)

    with pytest.raises(sa_exc.DBAPIError) as raised:
        run_in_transaction(factory, unit, stats=stats, **FAST)
    assert raised.value.connection_invalidated
    # The COMMIT may or may not have happened: running the unit again could
    # apply it twice.
    assert tries == [1]
    assert stats.snapshot()["not_retried"] == 1
