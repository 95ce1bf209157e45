"""engine_from_config: pragmas, BEGIN control, pool defaults, bad settings.

Real SQLite files (``sqlite_path``) and a real PostgreSQL (``pg_engine_url``);
lock states are observed with a second, raw ``sqlite3`` connection whose busy
timeout is zero, so nothing here waits on a clock.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from _sqlite_locks import write_lock_free
from sqlalchemy import Integer, create_engine, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.pool import NullPool, QueuePool

from sqla_cachelayer.engine import (
    TUNED_PRAGMAS,
    async_engine_from_config,
    engine_from_config,
    pool_defaults,
)
from sqla_cachelayer.exc import ConfigurationError
from sqla_cachelayer.retry import run_in_transaction, transient_reason


class Base(DeclarativeBase):
    pass


class Counter(Base):
    __tablename__ = "counter"
    id: Mapped[int] = mapped_column(primary_key=True)
    value: Mapped[int] = mapped_column(Integer)


def make(path: Path, **settings: Any) -> Engine:
    config = {"sqlalchemy.url": f"sqlite:///{path}"}
    config.update({f"sqlalchemy.{key}": value for key, value in settings.items()})
    return engine_from_config(config)


def pragma(conn: Any, name: str) -> Any:
    return conn.exec_driver_sql(f"PRAGMA {name}").scalar()


# --- pragmas ---------------------------------------------------------------------------------

TUNED_READBACK = {
    "journal_mode": "wal",
    "synchronous": 1,
    "busy_timeout": 5000,
    "foreign_keys": 1,
    "cache_size": -16384,
    "temp_store": 2,
    "mmap_size": 268435456,
    "journal_size_limit": 67108864,
}


def test_tuned_pragmas_on_every_new_connection(sqlite_path: Path) -> None:
    assert set(TUNED_READBACK) == set(TUNED_PRAGMAS)
    engine = make(sqlite_path)
    # Two connections at once: both are new DBAPI connections.
    with engine.connect() as first, engine.connect() as second:
        for conn in (first, second):
            for name, expected in TUNED_READBACK.items():
                assert pragma(conn, name) == expected, name
    engine.dispose()


def test_memory_database_pragmas_and_single_shared_connection() -> None:
    engine = engine_from_config({"sqlalchemy.url": "sqlite://"})
    assert isinstance(engine.pool, QueuePool)
    assert engine.pool.size() == 1
    with engine.begin() as conn:
        assert pragma(conn, "journal_mode") == "memory"
        assert pragma(conn, "foreign_keys") == 1
        assert pragma(conn, "busy_timeout") == 5000
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")
    seen: list[int] = []

    def read() -> None:
        with engine.connect() as conn:
            seen.append(conn.exec_driver_sql("SELECT count(*) FROM t").scalar_one())

    thread = threading.Thread(target=read)
    thread.start()
    thread.join()
    assert seen == [1]


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("busy_timeout", "1234", 1234),
        ("synchronous", "FULL", 2),
        ("journal_mode", "delete", "delete"),
        ("foreign_keys", "off", 0),
        ("cache_size", "-100", -100),
        ("temp_store", "file", 1),
        ("mmap_size", "0", 0),
        ("wal_autocheckpoint", "500", 500),
        ("recursive_triggers", "yes", 1),
        ("mmap_size", "", 0),  # empty: SQLite's own default, nothing set
    ],
)
def test_pragma_override(sqlite_path: Path, name: str, value: str, expected: Any) -> None:
    engine = make(sqlite_path, **{f"pragma.{name}": value})
    with engine.connect() as conn:
        assert pragma(conn, name) == expected
    engine.dispose()


def test_driver_timeout_becomes_busy_timeout(sqlite_path: Path) -> None:
    engine = engine_from_config(
        {"sqlalchemy.url": f"sqlite:///{sqlite_path}"}, connect_args={"timeout": 2.5}
    )
    with engine.connect() as conn:
        assert pragma(conn, "busy_timeout") == 2500
    engine.dispose()


# --- bad settings ----------------------------------------------------------------------------

MISSING_DRIVER = next(
    (
        url
        for url, module in (
            ("mysql+mysqldb://u@h/db", "MySQLdb"),
            ("mssql+pymssql://u@h/db", "pymssql"),
            ("oracle+cx_oracle://u@h/db", "cx_Oracle"),
        )
        if importlib.util.find_spec(module) is None
    ),
    None,
)


def file_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'never.db'}"


BAD_SETTINGS: list[tuple[str, dict[str, Any], str]] = [
    ("no url", {}, "sqlalchemy.url"),
    ("malformed url", {"sqlalchemy.url": "::not a url"}, "sqlalchemy.url"),
    ("unknown dialect", {"sqlalchemy.url": "nosuchdb://h/db"}, "sqlalchemy.url"),
    ("pool_size text", {"sqlalchemy.pool_size": "five"}, "sqlalchemy.pool_size"),
    ("pool_size negative", {"sqlalchemy.pool_size": "-1"}, "sqlalchemy.pool_size"),
    ("pool_size float", {"sqlalchemy.pool_size": "2.5"}, "sqlalchemy.pool_size"),
    ("max_overflow", {"sqlalchemy.max_overflow": "-2"}, "sqlalchemy.max_overflow"),
    ("pool_timeout negative", {"sqlalchemy.pool_timeout": "-1"}, "sqlalchemy.pool_timeout"),
    ("pool_timeout text", {"sqlalchemy.pool_timeout": "soon"}, "sqlalchemy.pool_timeout"),
    ("pool_timeout nan", {"sqlalchemy.pool_timeout": "nan"}, "sqlalchemy.pool_timeout"),
    ("pool_recycle", {"sqlalchemy.pool_recycle": "hourly"}, "sqlalchemy.pool_recycle"),
    ("pool_pre_ping", {"sqlalchemy.pool_pre_ping": "maybe"}, "sqlalchemy.pool_pre_ping"),
    ("echo", {"sqlalchemy.echo": "loud"}, "sqlalchemy.echo"),
    ("unknown argument", {"sqlalchemy.bogus_arg": "1"}, "sqlalchemy.bogus_arg"),
    (
        "isolation level for sqlite",
        {"sqlalchemy.isolation_level": "READ COMMITTED"},
        "sqlalchemy.isolation_level",
    ),
    ("unknown pragma", {"sqlalchemy.pragma.no_such_pragma": "1"}, "sqlalchemy.pragma.no_such"),
    ("command pragma", {"sqlalchemy.pragma.integrity_check": "1"}, "sqlalchemy.pragma.integ"),
    ("synchronous", {"sqlalchemy.pragma.synchronous": "sometimes"}, "sqlalchemy.pragma.sync"),
    ("busy_timeout text", {"sqlalchemy.pragma.busy_timeout": "abc"}, "sqlalchemy.pragma.busy"),
    ("busy_timeout negative", {"sqlalchemy.pragma.busy_timeout": "-5"}, "sqlalchemy.pragma.bu"),
    ("journal_mode", {"sqlalchemy.pragma.journal_mode": "fast"}, "sqlalchemy.pragma.journal"),
    ("foreign_keys", {"sqlalchemy.pragma.foreign_keys": "maybe"}, "sqlalchemy.pragma.foreign"),
    ("page_size", {"sqlalchemy.pragma.page_size": "1000"}, "sqlalchemy.pragma.page_size"),
    ("temp_store", {"sqlalchemy.pragma.temp_store": "ram"}, "sqlalchemy.pragma.temp_store"),
    ("cache_size", {"sqlalchemy.pragma.cache_size": "1e3"}, "sqlalchemy.pragma.cache_size"),
    ("begin_mode", {"sqlalchemy.begin_mode": "lazy"}, "sqlalchemy.begin_mode"),
    (
        "memory pool_size",
        {"sqlalchemy.url": "sqlite://", "sqlalchemy.pool_size": "5"},
        "sqlalchemy.pool_size",
    ),
    (
        "async driver",
        {"sqlalchemy.url": "sqlite+aiosqlite:///x.db"},
        "sqlalchemy.url",
    ),
    (
        "postgresql isolation level",
        {"sqlalchemy.url": "postgresql+psycopg://u@h/db", "sqlalchemy.isolation_level": "CHAOS"},
        "sqlalchemy.isolation_level",
    ),
    (
        "postgresql pool_size",
        {"sqlalchemy.url": "postgresql+psycopg://u@h/db", "sqlalchemy.pool_size": "ten"},
        "sqlalchemy.pool_size",
    ),
]
if MISSING_DRIVER is not None:
    BAD_SETTINGS.append(("driver missing", {"sqlalchemy.url": MISSING_DRIVER}, "sqlalchemy.url"))


@pytest.mark.parametrize(
    ("settings", "key"), [case[1:] for case in BAD_SETTINGS], ids=[c[0] for c in BAD_SETTINGS]
)
def test_bad_setting_is_configuration_error_naming_key(
    tmp_path: Path, settings: dict[str, Any], key: str
) -> None:
    config: dict[str, Any] = {"sqlalchemy.url": file_url(tmp_path)}
    config.update(settings)
    if not settings:
        config = {}
    with pytest.raises(ConfigurationError) as raised:
        engine_from_config(config)
    assert str(raised.value).startswith(key)
    assert raised.value.key is not None and raised.value.key.startswith(key)
    # Raised while configuring: nothing was opened.
    assert not (tmp_path / "never.db").exists()


def test_bad_keyword_argument_names_the_argument(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as raised:
        engine_from_config({"sqlalchemy.url": file_url(tmp_path)}, pool_size="x")
    assert raised.value.key == "pool_size"


def test_other_prefix(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"^db\.pool_size: "):
        engine_from_config({"db.url": file_url(tmp_path), "db.pool_size": "x"}, prefix="db.")


def test_bad_begin_mode_execution_option(sqlite_path: Path) -> None:
    engine = make(sqlite_path)
    with pytest.raises(ConfigurationError, match="sqlite_begin_mode"):
        engine.execution_options(sqlite_begin_mode="later")
    with engine.connect() as conn, pytest.raises(ConfigurationError):
        conn.execution_options(sqlite_begin_mode="later")
    engine.dispose()


def test_string_settings_are_coerced(sqlite_path: Path) -> None:
    engine = make(sqlite_path, pool_size="3", max_overflow="4", pool_timeout="2.5", echo="false")
    pool = engine.pool
    assert isinstance(pool, QueuePool)
    assert (pool.size(), pool._max_overflow, pool._timeout) == (3, 4, 2.5)
    assert engine.echo is False
    engine.dispose()


# --- pool defaults ---------------------------------------------------------------------------


def test_file_sqlite_pool_defaults(sqlite_path: Path) -> None:
    engine = make(sqlite_path)
    pool = engine.pool
    assert isinstance(pool, QueuePool)
    assert (pool.size(), pool._max_overflow, pool._timeout) == (5, 20, 30.0)
    assert pool._pre_ping is False
    assert pool._recycle == -1
    engine.dispose()


def test_postgresql_pool_defaults_and_overrides() -> None:
    pytest.importorskip("psycopg")
    url = "postgresql+psycopg://u@127.0.0.1:1/db"  # never connected to
    engine = engine_from_config({"sqlalchemy.url": url})
    pool = engine.pool
    assert isinstance(pool, QueuePool)
    assert (pool.size(), pool._max_overflow, pool._pre_ping, pool._recycle) == (10, 10, True, 1800)
    engine = engine_from_config(
        {"sqlalchemy.url": url, "sqlalchemy.pool_size": "3", "sqlalchemy.pool_pre_ping": "no"}
    )
    assert (engine.pool.size(), engine.pool._pre_ping) == (3, False)  # type: ignore[attr-defined]
    # A pool class of the caller's own gets none of the defaults.
    engine = engine_from_config({"sqlalchemy.url": url}, poolclass=NullPool)
    assert isinstance(engine.pool, NullPool)


def test_pool_defaults_per_url_kind() -> None:
    assert pool_defaults("mysql+pymysql://u@h/db")["pool_recycle"] == 3600
    assert pool_defaults("mariadb+pymysql://u@h/db")["pool_pre_ping"] is True
    assert pool_defaults("sqlite:///:memory:")["max_overflow"] == 0
    assert (
        pool_defaults("sqlite:///file:shared?mode=memory&cache=shared&uri=true")["pool_size"] == 5
    )
    assert pool_defaults("oracle://u@h/db") == {}


# --- BEGIN control ---------------------------------------------------------------------------


def seed(engine: Engine, value: int = 0) -> None:
    Base.metadata.create_all(engine)
    with sessionmaker(engine).begin() as session:
        session.add(Counter(id=1, value=value))


def test_default_read_only_session_takes_no_write_lock(sqlite_path: Path) -> None:
    engine = make(sqlite_path)
    seed(engine)
    with sessionmaker(engine)() as session:
        session.get(Counter, 1)
        assert session.in_transaction()
        # G8: a session that only reads leaves the write lock to writers.
        assert write_lock_free(sqlite_path)
    engine.dispose()


def test_deferred_read_does_not_take_write_lock_and_keeps_snapshot(sqlite_path: Path) -> None:
    engine = make(sqlite_path, begin_mode="deferred")
    seed(engine)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT value FROM counter").scalar() == 0
        assert write_lock_free(sqlite_path)
        other = sqlite3.connect(sqlite_path, isolation_level=None)
        other.execute("UPDATE counter SET value = 5")
        other.close()
        # pysqlite's legacy mode would show 5: the SELECT ran outside any transaction.
        assert conn.exec_driver_sql("SELECT value FROM counter").scalar() == 0
    engine.dispose()


def test_immediate_mode_read_holds_write_lock(sqlite_path: Path) -> None:
    engine = make(sqlite_path, begin_mode="immediate")
    seed(engine)
    with sessionmaker(engine)() as session:
        session.get(Counter, 1)
        assert not write_lock_free(sqlite_path)
    assert write_lock_free(sqlite_path)
    engine.dispose()


def test_exclusive_blocks_readers_in_rollback_journal_mode(sqlite_path: Path) -> None:
    engine = make(sqlite_path, begin_mode="exclusive", **{"pragma.journal_mode": "delete"})
    seed(engine)
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
        reader = sqlite3.connect(sqlite_path, timeout=0)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            reader.execute("SELECT value FROM counter").fetchall()
        reader.close()
    engine.dispose()


def test_execution_option_overrides_begin_mode(sqlite_path: Path) -> None:
    engine = make(sqlite_path, begin_mode="immediate")
    seed(engine)
    readers = sessionmaker(engine.execution_options(sqlite_begin_mode="deferred"))
    with readers() as session:
        session.get(Counter, 1)
        assert write_lock_free(sqlite_path)
    writers = sessionmaker(make(sqlite_path))
    with writers() as session:
        session.connection(execution_options={"sqlite_begin_mode": "immediate"})
        session.get(Counter, 1)
        assert not write_lock_free(sqlite_path)
    engine.dispose()


def test_transaction_without_statements_takes_no_lock(sqlite_path: Path) -> None:
    engine = make(sqlite_path, begin_mode="exclusive")
    seed(engine)
    with engine.connect() as conn:
        conn.begin()
        assert write_lock_free(sqlite_path)
        conn.exec_driver_sql("SELECT 1")
        assert not write_lock_free(sqlite_path)
        conn.commit()
    assert write_lock_free(sqlite_path)
    engine.dispose()


def test_locking_read_first_takes_write_lock(sqlite_path: Path) -> None:
    engine = make(sqlite_path)
    seed(engine)
    Session = sessionmaker(engine)
    with Session() as session:
        session.get(Counter, 1, with_for_update=True)
        assert not write_lock_free(sqlite_path)
    assert write_lock_free(sqlite_path)
    with Session() as session:
        session.scalars(select(Counter).with_for_update()).all()
        assert not write_lock_free(sqlite_path)
        session.commit()
    # Only the first statement chooses: a locking read after a plain one
    # cannot move the snapshot the transaction already reads.
    with Session() as session:
        session.get(Counter, 1)
        session.scalars(select(Counter).with_for_update()).all()
        assert write_lock_free(sqlite_path)
    engine.dispose()


def test_reader_proceeds_while_writer_holds_write_lock(sqlite_path: Path) -> None:
    """G8 with real threads: a read-only session completes beside an open writer."""
    engine = make(sqlite_path)
    seed(engine, value=1)
    Session = sessionmaker(engine)
    locked, release = threading.Event(), threading.Event()
    seen_in_writer: list[bool] = []

    def bump(session: Any) -> None:
        counter = session.get(Counter, 1)
        # run_in_transaction took the write lock at its first read.
        seen_in_writer.append(write_lock_free(sqlite_path))
        counter.value += 1
        session.flush()
        locked.set()
        release.wait()

    writer = threading.Thread(target=run_in_transaction, args=(Session, bump))
    writer.start()
    try:
        assert locked.wait(30)
        # The writer holds the write lock, with an uncommitted change, until
        # release is set: this read must not wait for it.
        with Session() as session:
            assert session.scalar(select(Counter.value)) == 1
        assert writer.is_alive() and not release.is_set()
    finally:
        release.set()
        writer.join()
    assert seen_in_writer == [False]
    with Session() as session:
        assert session.scalar(select(Counter.value)) == 2
    engine.dispose()


def _hammer(
    threads: int, per_thread: int, unit: Any, readers: int = 0, read: Any = None
) -> tuple[int, list[BaseException]]:
    """Run ``unit`` per_thread times in each of ``threads`` threads; count successes."""
    successes: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def work() -> None:
        for _ in range(per_thread):
            try:
                unit()
            except Exception as error:  # reported by the caller, with the count
                errors.append(error)
            else:
                successes.append(1)

    def reader() -> None:
        while not done.is_set():
            read()

    workers = [threading.Thread(target=work) for _ in range(threads)]
    reading = [threading.Thread(target=reader) for _ in range(readers)]
    for thread in workers + reading:
        thread.start()
    for thread in workers:
        thread.join()
    done.set()
    for thread in reading:
        thread.join()
    return len(successes), errors


def test_run_in_transaction_under_contention_loses_nothing(sqlite_path: Path) -> None:
    engine = make(sqlite_path)
    seed(engine)
    Session = sessionmaker(engine)

    def bump(session: Any) -> None:
        counter = session.get(Counter, 1)
        counter.value += 1

    def read() -> None:
        with Session() as session:
            session.get(Counter, 1)

    ok, errors = _hammer(8, 40, lambda: run_in_transaction(Session, bump), readers=4, read=read)
    assert errors == []
    with Session() as session:
        assert session.scalar(select(Counter.value)) == ok == 8 * 40
    engine.dispose()


def test_locking_read_under_contention_loses_nothing(sqlite_path: Path) -> None:
    engine = make(sqlite_path)
    seed(engine)
    Session = sessionmaker(engine)

    def unit() -> None:
        with Session.begin() as session:
            counter = session.get(Counter, 1, with_for_update=True)
            assert counter is not None
            counter.value += 1

    ok, errors = _hammer(8, 40, unit)
    assert errors == []
    with Session() as session:
        assert session.scalar(select(Counter.value)) == ok == 8 * 40
    engine.dispose()


def test_plain_read_then_write_under_contention_never_loses_an_update(sqlite_path: Path) -> None:
    """Without run_in_transaction: each unit commits its increment or raises, clearly."""
    engine = make(sqlite_path)
    seed(engine)
    Session = sessionmaker(engine)

    def unit() -> None:
        with Session.begin() as session:
            counter = session.get(Counter, 1)
            assert counter is not None
            counter.value += 1

    ok, errors = _hammer(8, 40, unit)
    for error in errors:
        assert isinstance(error, sqlalchemy.exc.OperationalError), error
        assert "began DEFERRED and read before writing" in str(error)
        assert transient_reason(error) == "sqlite busy"
    with Session() as session:
        assert session.scalar(select(Counter.value)) == ok
    assert ok + len(errors) == 8 * 40
    engine.dispose()


def test_plain_read_then_write_after_a_commit_raises_clear_error(sqlite_path: Path) -> None:
    engine = make(sqlite_path)
    seed(engine, value=10)
    Session = sessionmaker(engine)
    with Session() as session:
        counter = session.get(Counter, 1)
        assert counter is not None
        other = sqlite3.connect(sqlite_path, isolation_level=None)
        other.execute("UPDATE counter SET value = 20")
        other.close()
        counter.value += 1  # computed from 10, which is no longer the value
        with pytest.raises(sqlalchemy.exc.OperationalError) as caught:
            session.commit()
        message = str(caught.value)
        assert "began DEFERRED and read before writing" in message
        assert "run_in_transaction" in message
    with Session() as session:
        assert session.scalar(select(Counter.value)) == 20
    engine.dispose()


def test_write_first_waits_for_the_lock_and_takes_no_hint(sqlite_path: Path) -> None:
    engine = make(sqlite_path, **{"pragma.busy_timeout": "0"})
    seed(engine)
    holder = sqlite3.connect(sqlite_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with engine.connect() as conn:
            with pytest.raises(sqlalchemy.exc.OperationalError) as caught:
                conn.exec_driver_sql("UPDATE counter SET value = 1")
            assert "read before writing" not in str(caught.value)
        with engine.connect() as conn:
            conn = conn.execution_options(sqlite_begin_mode="immediate")
            with pytest.raises(sqlalchemy.exc.OperationalError) as caught:
                conn.exec_driver_sql("SELECT 1")
            assert "BEGIN IMMEDIATE issued before this statement" in str(caught.value)
            conn.rollback()
            holder.execute("ROLLBACK")
            # The failed BEGIN is tried again by the next statement.
            conn.exec_driver_sql("SELECT 1")
            assert not write_lock_free(sqlite_path)
    finally:
        holder.close()
    engine.dispose()


@pytest.mark.skipif(
    tuple(int(part) for part in sqlalchemy.__version__.split(".")[:3] if part.isdigit())
    < (2, 0, 43),
    reason="skip_autocommit_rollback arrived in SQLAlchemy 2.0.43",
)
def test_skip_autocommit_rollback_cannot_leak_begin(sqlite_path: Path) -> None:
    # pysqlite reports isolation_level=None as autocommit, so with this flag
    # SQLAlchemy skips the DBAPI rollback; the BEGIN IMMEDIATE must not stay open.
    engine = make(sqlite_path, skip_autocommit_rollback="true", begin_mode="immediate")
    seed(engine)
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    assert write_lock_free(sqlite_path)
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
        assert not write_lock_free(sqlite_path)
        conn.rollback()
        assert write_lock_free(sqlite_path)
        # ...and the connection can begin again.
        conn.exec_driver_sql("UPDATE counter SET value = 1")
        conn.commit()
    with sessionmaker(engine)() as session:
        session.get(Counter, 1)
    assert write_lock_free(sqlite_path)
    engine.dispose()


def test_autocommit_isolation_issues_no_begin(sqlite_path: Path) -> None:
    engine = make(sqlite_path, begin_mode="immediate")
    seed(engine)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("UPDATE counter SET value = 7")
        assert write_lock_free(sqlite_path)  # already committed, nothing held
    # The connection went back to the pool; the next transaction is ours again.
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
        assert not write_lock_free(sqlite_path)
    auto = make(sqlite_path, isolation_level="AUTOCOMMIT")
    with auto.connect() as conn:
        conn.exec_driver_sql("UPDATE counter SET value = 8")
        assert write_lock_free(sqlite_path)
    engine.dispose()
    auto.dispose()


def test_savepoint_and_transactional_ddl(sqlite_path: Path) -> None:
    engine = make(sqlite_path)
    seed(engine, value=1)
    with engine.connect() as conn:
        conn.exec_driver_sql("CREATE TABLE scratch (x INTEGER)")
        with conn.begin_nested() as nested:
            conn.exec_driver_sql("UPDATE counter SET value = 99")
            nested.rollback()
        assert conn.exec_driver_sql("SELECT value FROM counter").scalar() == 1
        conn.rollback()
    with engine.connect() as conn:
        # The CREATE TABLE was rolled back with the transaction.
        assert (
            conn.exec_driver_sql(
                "SELECT count(*) FROM sqlite_master WHERE name = 'scratch'"
            ).scalar()
            == 0
        )
        # A savepoint as the transaction's first statement.
        with conn.begin_nested():
            conn.exec_driver_sql("UPDATE counter SET value = 2")
        conn.commit()
        assert conn.exec_driver_sql("SELECT value FROM counter").scalar() == 2
    engine.dispose()


def test_plain_create_engine_loses_updates_in_same_workload(sqlite_path: Path) -> None:
    """The workloads above are real tests: with SQLAlchemy's defaults updates get lost.

    Whether a given run loses any depends on scheduling, so this only checks
    that the defaults never do better than the count (and the tuned engine
    tests check equality).
    """
    engine = create_engine(f"sqlite:///{sqlite_path}")
    seed(engine)
    Session = sessionmaker(engine)

    def unit() -> None:
        with Session.begin() as session:
            counter = session.get(Counter, 1)
            assert counter is not None
            counter.value += 1

    ok, _ = _hammer(4, 20, unit)
    with Session() as session:
        assert (session.scalar(select(Counter.value)) or 0) <= ok
    engine.dispose()


# --- asyncio and PostgreSQL ------------------------------------------------------------------


def test_async_engine_pragmas_and_begin(sqlite_path: Path) -> None:
    pytest.importorskip("aiosqlite")
    pytest.importorskip("greenlet")

    async def main() -> None:
        engine = async_engine_from_config({"sqlalchemy.url": f"sqlite+aiosqlite:///{sqlite_path}"})
        async with engine.begin() as conn:
            assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
            assert (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar() == 5000
            await conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        async with engine.connect() as conn:
            await conn.exec_driver_sql("SELECT count(*) FROM t")
            assert write_lock_free(sqlite_path)
        async with engine.connect() as conn:
            conn = await conn.execution_options(sqlite_begin_mode="immediate")
            await conn.exec_driver_sql("SELECT count(*) FROM t")
            assert not write_lock_free(sqlite_path)
        assert write_lock_free(sqlite_path)
        await engine.dispose()

    asyncio.run(main())


def test_async_engine_rejects_sync_driver(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"^sqlalchemy\.url: "):
        async_engine_from_config({"sqlalchemy.url": file_url(tmp_path)})
    with pytest.raises(ConfigurationError, match=r"^sqlalchemy\.pool_size: "):
        async_engine_from_config(
            {"sqlalchemy.url": "sqlite+aiosqlite:///x.db", "sqlalchemy.pool_size": "many"}
        )


def test_async_memory_engine() -> None:
    pytest.importorskip("aiosqlite")
    pytest.importorskip("greenlet")

    async def main() -> None:
        engine = async_engine_from_config({"sqlalchemy.url": "sqlite+aiosqlite://"})
        async with engine.begin() as conn:
            await conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        async with engine.connect() as conn:
            assert (await conn.exec_driver_sql("SELECT count(*) FROM t")).scalar() == 0
        await engine.dispose()

    asyncio.run(main())


@pytest.mark.postgresql
def test_postgresql_engine_ignores_sqlite_keys(pg_engine_url: str) -> None:
    engine = engine_from_config(
        {
            "sqlalchemy.url": pg_engine_url,
            "sqlalchemy.begin_mode": "immediate",
            "sqlalchemy.pragma.busy_timeout": "100",
            "sqlalchemy.isolation_level": "serializable",
        }
    )
    with engine.connect() as conn:
        assert conn.execute(text("SHOW transaction_isolation")).scalar() == "serializable"
    engine.dispose()
