"""Smoke tests of the test infrastructure (tests/_servers.py): the servers the
run starts, and the per-test isolation of the fixtures."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url


def _worker() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


# -- PostgreSQL ---------------------------------------------------------------


def test_pg_select_1(pg_url: str) -> None:
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
            assert conn.execute(text("SELECT current_database()")).scalar_one() == "scl_test"
    finally:
        engine.dispose()


@pytest.mark.parametrize("n", range(4))
def test_pg_engine_url_is_a_database_of_its_own(pg_engine_url: str, n: int) -> None:
    # Every parametrization creates the same table: it would clash if the
    # databases were shared (in parallel or one after another).
    name = make_url(pg_engine_url).database
    assert name and name != "scl_test" and _worker().lower() in name
    engine = create_engine(pg_engine_url)
    try:
        with engine.begin() as conn:
            assert conn.execute(text("SELECT current_database()")).scalar_one() == name
            conn.execute(text("CREATE TABLE infra_probe (id integer PRIMARY KEY)"))
            conn.execute(text("INSERT INTO infra_probe VALUES (:n)"), {"n": n})
            # the databases of this worker's earlier tests were dropped
            mine = (
                conn.execute(
                    text("SELECT datname FROM pg_database WHERE datname LIKE :pat"),
                    {"pat": f"scl_t_{_worker().lower()}_%"},
                )
                .scalars()
                .all()
            )
            assert mine == [name]
    finally:
        engine.dispose()  # the fixture drops the database even with connections open


# -- Redis --------------------------------------------------------------------


def test_redis_ping(redis_url: str, redis_prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        assert client.ping() is True
        key = f"{redis_prefix}k"
        client.set(key, b"v")
        assert client.get(key) == b"v"
    finally:
        client.close()


@pytest.mark.parametrize("n", range(3))
def test_redis_db_url_is_empty_and_private(redis_db_url: str, n: int) -> None:
    import redis

    assert not redis_db_url.endswith("/0")
    client = redis.Redis.from_url(redis_db_url)
    try:
        assert client.dbsize() == 0  # the previous parametrization's key is gone
        client.set("shared-name", n)
    finally:
        client.close()


def test_redis_prefixes_are_unique(redis_prefix: str) -> None:
    assert redis_prefix.startswith(f"scl-test:{_worker()}:")
    assert redis_prefix.endswith(":")


def test_redis_server_factory_kill_and_restart(
    redis_server_factory: Callable[..., Any],
) -> None:
    import redis

    server = redis_server_factory()
    client = redis.Redis.from_url(server.url, socket_timeout=1, socket_connect_timeout=1)
    try:
        assert client.ping()
        server.kill()
        with pytest.raises(redis.ConnectionError):
            client.ping()
        server.restart()
        assert client.ping()  # same port, reconnects
        server.pause()
        with pytest.raises((redis.TimeoutError, redis.ConnectionError)):
            client.ping()
        server.resume()
    finally:
        client.close()


# -- SQLite -------------------------------------------------------------------


def test_sqlite_path(sqlite_path: Path, tmp_path: Path) -> None:
    assert sqlite_path.parent == tmp_path
    assert not sqlite_path.exists()
    with sqlite3.connect(sqlite_path) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert sqlite_path.exists()
