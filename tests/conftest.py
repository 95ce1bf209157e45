"""Shared test configuration.

Server fixtures (see ``tests/_servers.py`` for the details):

- ``pg_url``: the run's PostgreSQL ``scl_test`` database (shared; skips when
  there is no PostgreSQL, with the reason).
- ``pg_engine_url``: a fresh PostgreSQL database for this test alone, dropped
  afterwards.  Use this one by default.
- ``redis_url``: the run's Redis, database 0, shared by every worker.
- ``redis_db_url``: a Redis database number owned by this xdist worker,
  flushed before and after the test.
- ``redis_prefix``: a key/channel prefix unique to this test.  Tests run in
  parallel (``-n auto``): keys written through ``redis_url`` and every
  pub/sub channel MUST start with it.
- ``redis_server_factory``: private Redis servers a test may kill, pause and
  restart.
- ``sqlite_path``: a SQLite file path (not yet created) under ``tmp_path``.

Environment: ``SCL_TEST_PG_URL`` / ``SCL_TEST_REDIS_URL`` (set them to use
servers of your own), ``SCL_TEST_REDIS_SERVER`` (redis-server binary),
``SCL_TEST_PG_SKIP`` / ``SCL_TEST_REDIS_SKIP`` (why a server is unavailable).
"""

from __future__ import annotations

# The server plugin: its hooks and fixtures (names in ``_servers.__all__``).
if __package__:  # tests/ made a package
    from ._servers import *  # noqa: F403
else:  # the default: tests/ is put on sys.path by pytest
    from _servers import *  # type: ignore[no-redef]  # noqa: F403

# ===========================================================================
# Project fixtures: append below this line.
# ===========================================================================

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from dogpile.cache import make_region
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import sessionmaker


@dataclasses.dataclass
class CacheEnv:
    """An engine on its own SQLite file, a layer, an installed sessionmaker, SQL counters."""

    engine: Engine
    layer: Any
    Session: sessionmaker[Any]
    statements: list[str]
    checkouts: list[int]

    def sql_count(self) -> int:
        return len(self.statements)

    def reset(self) -> None:
        self.statements.clear()
        self.checkouts.clear()


def count_sql(engine: Engine, statements: list[str], checkouts: list[int]) -> None:
    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if not statement.lstrip().upper().startswith(("BEGIN", "PRAGMA", "COMMIT", "ROLLBACK")):
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine.pool, "checkout", lambda *a: checkouts.append(1))


def sqlite_real_transactions(engine: Engine) -> None:
    """pysqlite's documented recipe: our BEGIN, so a transaction keeps its snapshot."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA journal_mode=WAL")

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")


@pytest.fixture
def make_env(tmp_path: Any) -> Iterator[Callable[..., CacheEnv]]:
    """Factory: ``make_env(region=None, url=None, **layer_kw)`` with the test schema seeded."""
    from _models import Base, seed

    import sqla_cachelayer as scl

    engines: list[Engine] = []

    def factory(
        region: Any = None,
        url: str | None = None,
        seed_data: bool = True,
        real_transactions: bool = False,
        tuned: bool = False,
        **kw: Any,
    ) -> CacheEnv:
        url = url or f"sqlite:///{tmp_path / f'db{len(engines)}.sqlite'}"
        engine = scl.engine_from_config({"sqlalchemy.url": url}) if tuned else create_engine(url)
        if real_transactions:
            sqlite_real_transactions(engine)
        engines.append(engine)
        Base.metadata.create_all(engine)
        if region is None:
            region = make_region().configure("dogpile.cache.memory")
        layer = scl.CacheLayer(
            {"default": region} if not isinstance(region, dict) else region, **kw
        )
        Session = layer.install(sessionmaker(engine))
        statements: list[str] = []
        checkouts: list[int] = []
        if seed_data:
            seed(Session)
        count_sql(engine, statements, checkouts)
        return CacheEnv(engine, layer, Session, statements, checkouts)

    yield factory
    for engine in engines:
        engine.dispose()


BACKENDS = [
    "dogpile.cache.memory",
    "sqla_cachelayer.memory",
    "sqla_cachelayer.sqlite",
    "dogpile.cache.redis",
]


def region_for(backend: str, request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    """A configured region on ``backend``; Redis uses this worker's own database."""
    arguments: dict[str, Any] = {}
    if backend == "sqla_cachelayer.sqlite":
        arguments["path"] = str(tmp_path / "cache.sqlite")
    elif backend == "dogpile.cache.redis":
        arguments["url"] = request.getfixturevalue("redis_db_url")
        arguments["socket_timeout"] = 2
    return make_region().configure(backend, arguments=arguments)


@pytest.fixture(params=BACKENDS)
def env(
    request: pytest.FixtureRequest, make_env: Callable[..., CacheEnv], tmp_path: Any
) -> CacheEnv:
    """The behaviour suite's environment, once per backend.

    The project's own backends run on ``engine_from_config`` engines (BEGIN
    IMMEDIATE, WAL), dogpile's on plain ``create_engine`` ones: both kinds of
    engine go through the whole suite.
    """
    tuned = request.param.startswith("sqla_cachelayer.")
    return make_env(region=region_for(request.param, request, tmp_path), tuned=tuned)


@pytest.fixture
def memory_env(make_env: Callable[..., CacheEnv]) -> CacheEnv:
    """For tests that look inside ``dogpile.cache.memory``'s dict."""
    return make_env()
