"""Engines built by engine_from_config across os.fork().

A forked child must never use a DBAPI connection that its parent's pool
opened: the two processes would share a socket (PostgreSQL) or a SQLite
handle and its locks.  Children are started with multiprocessing's ``fork``
method after the parent built the engine and used it, as preloading servers
(gunicorn ``--preload``, Celery prefork) do.
"""

from __future__ import annotations

import multiprocessing
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Integer, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sqla_cachelayer.engine import engine_from_config

pytestmark = pytest.mark.skipif(
    sys.platform == "win32" or "fork" not in multiprocessing.get_all_start_methods(),
    reason="needs the fork start method",
)


class Base(DeclarativeBase):
    pass


class Counter(Base):
    __tablename__ = "fork_counter"
    id: Mapped[int] = mapped_column(primary_key=True)
    value: Mapped[int] = mapped_column(Integer)


def _pooled_ids(engine: Engine, n: int) -> set[int]:
    """Check out n connections at once, so the pool keeps n idle; their ids."""
    conns = [engine.connect() for _ in range(n)]
    ids = set()
    for conn in conns:
        conn.exec_driver_sql("SELECT 1")
        ids.add(id(conn.connection.driver_connection))
    for conn in conns:
        conn.close()
    return ids


def _child_increment(engine: Engine, results: Any) -> None:
    try:
        Session = sessionmaker(engine)
        with Session.begin() as session:
            used = id(session.connection().connection.driver_connection)
            session.execute(update(Counter).values(value=Counter.value + 100))
        results.put(("ok", used))
    except BaseException as error:  # reported to the parent, which asserts
        results.put(("error", repr(error)))


def test_forked_child_opens_its_own_sqlite_connections(sqlite_path: Path) -> None:
    engine = engine_from_config({"sqlalchemy.url": f"sqlite:///{sqlite_path}"})
    Base.metadata.create_all(engine)
    Session = sessionmaker(engine)
    with Session.begin() as session:
        session.add(Counter(id=1, value=1))
    parents = _pooled_ids(engine, 3)

    # A parent thread keeps a transaction open (it has read) across the fork.
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with Session() as session:
            session.get(Counter, 1)
            holding.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    ctx = multiprocessing.get_context("fork")
    results: Any = ctx.Queue()
    try:
        assert holding.wait(30)
        child = ctx.Process(target=_child_increment, args=(engine, results))
        child.start()
        outcome, detail = results.get(timeout=60)
        child.join(60)
    finally:
        release.set()
        holder.join()
    assert outcome == "ok", detail
    assert detail not in parents, "the child used a connection its parent's pool opened"
    assert child.exitcode == 0
    # The parent's connections still work, and the child's commit is there.
    assert _pooled_ids(engine, 3) == parents
    with Session() as session:
        assert session.scalar(select(Counter.value)) == 101
    engine.dispose()


def test_forked_child_with_parent_write_lock_is_told(
    sqlite_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite keeps per-process lock records that fork copies: say so in the child."""
    engine = engine_from_config({"sqlalchemy.url": f"sqlite:///{sqlite_path}"})
    Base.metadata.create_all(engine)
    ctx = multiprocessing.get_context("fork")
    results: Any = ctx.Queue()

    def child() -> None:
        results.put([r.getMessage() for r in caplog.records if r.name == "sqla_cachelayer.engine"])

    with engine.connect() as conn:
        conn = conn.execution_options(sqlite_begin_mode="immediate")
        conn.exec_driver_sql("SELECT 1")
        process = ctx.Process(target=child)
        process.start()
        messages = results.get(timeout=60)
        process.join(60)
    assert any("held the SQLite write lock" in m for m in messages), messages
    engine.dispose()


def _child_backend_pid(engine: Engine, results: Any) -> None:
    try:
        with engine.connect() as conn:
            results.put(("ok", conn.execute(text("SELECT pg_backend_pid()")).scalar()))
    except BaseException as error:  # reported to the parent, which asserts
        results.put(("error", repr(error)))


@pytest.mark.postgresql
def test_forked_child_opens_its_own_postgresql_connections(pg_engine_url: str) -> None:
    engine = engine_from_config({"sqlalchemy.url": pg_engine_url})
    with engine.connect() as conn:
        parent_pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
    ctx = multiprocessing.get_context("fork")
    results: Any = ctx.Queue()
    child = ctx.Process(target=_child_backend_pid, args=(engine, results))
    child.start()
    outcome, pid = results.get(timeout=60)
    child.join(60)
    assert outcome == "ok", pid
    assert pid != parent_pid, "the child used its parent's server connection"
    # The parent's pooled connection was left alone by the child.
    with engine.connect() as conn:
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar() == parent_pid
    engine.dispose()
