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

import asyncio
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
    #: ``sync``, or ``async``: an aiosqlite engine (``engine`` is its
    #: ``sync_engine``) and ``Session`` making the sessions an ``AsyncSession``
    #: wraps; the test body then runs in a greenlet on an event loop, as
    #: ``AsyncSession`` runs the ORM (``greenlet_spawn``), so every statement
    #: goes through ``await_only``
    kind: str = "sync"
    #: ``run(fn, *args)``: call ``fn`` the way this kind runs ORM code
    run: Callable[..., Any] = dataclasses.field(default=lambda fn, *args: fn(*args))

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
def session_kind(request: pytest.FixtureRequest) -> str:
    """``sync`` unless the test is marked ``both_sessions`` (then both)."""
    return str(getattr(request, "param", "sync"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "env" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_sessions"):
        metafunc.parametrize("session_kind", ["sync", "async"], indirect=True)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run the body of an ``async`` env's test in a greenlet on its loop."""
    env = pyfuncitem.funcargs.get("env")
    if not isinstance(env, CacheEnv) or env.kind == "sync":
        return None
    names = pyfuncitem._fixtureinfo.argnames
    kwargs = {name: pyfuncitem.funcargs[name] for name in names}
    env.run(lambda: pyfuncitem.obj(**kwargs))
    return True


@pytest.fixture
def make_env(tmp_path: Any) -> Iterator[Callable[..., CacheEnv]]:
    """Factory: ``make_env(region=None, url=None, kind="sync", **layer_kw)`` with the
    test schema seeded."""
    from _models import Base, seed

    import sqla_cachelayer as scl

    engines: list[Engine] = []
    closers: list[Callable[[], None]] = []

    def factory(
        region: Any = None,
        url: str | None = None,
        seed_data: bool = True,
        real_transactions: bool = False,
        tuned: bool = False,
        kind: str = "sync",
        **kw: Any,
    ) -> CacheEnv:
        url = url or f"sqlite:///{tmp_path / f'db{len(engines)}.sqlite'}"
        if region is None:
            region = make_region().configure("dogpile.cache.memory")
        layer = scl.CacheLayer(
            {"default": region} if not isinstance(region, dict) else region, **kw
        )
        run: Callable[..., Any]
        if kind == "async":
            from sqlalchemy.ext.asyncio import create_async_engine
            from sqlalchemy.util import greenlet_spawn

            url = url.replace("sqlite://", "sqlite+aiosqlite://", 1)
            settings = {"sqlalchemy.url": url}
            aengine = scl.async_engine_from_config(settings) if tuned else create_async_engine(url)
            engine = aengine.sync_engine
            loop = asyncio.new_event_loop()

            def run(fn: Callable[..., Any], *args: Any) -> Any:
                return loop.run_until_complete(greenlet_spawn(fn, *args))

            def close() -> None:
                loop.run_until_complete(aengine.dispose())
                loop.close()

            closers.append(close)
            # the sessions an AsyncSession wraps; installed on directly so that
            # tests may uninstall and reinstall ``env.Session`` as they do
            Session = layer.install(sessionmaker(engine))
        else:
            settings = {"sqlalchemy.url": url}
            engine = scl.engine_from_config(settings) if tuned else create_engine(url)
            closers.append(engine.dispose)

            def run(fn: Callable[..., Any], *args: Any) -> Any:
                return fn(*args)

            Session = layer.install(sessionmaker(engine))
        if real_transactions:
            sqlite_real_transactions(engine)
        engines.append(engine)
        run(Base.metadata.create_all, engine)
        statements: list[str] = []
        checkouts: list[int] = []
        if seed_data:
            run(seed, Session)
        count_sql(engine, statements, checkouts)
        return CacheEnv(engine, layer, Session, statements, checkouts, kind, run)

    yield factory
    for close in closers:
        close()


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
    request: pytest.FixtureRequest,
    make_env: Callable[..., CacheEnv],
    tmp_path: Any,
    session_kind: str,
) -> CacheEnv:
    """The behaviour suite's environment, once per backend.

    The project's own backends run on ``engine_from_config`` engines (BEGIN
    IMMEDIATE, WAL), dogpile's on plain ``create_engine`` ones: both kinds of
    engine go through the whole suite. Tests marked ``both_sessions`` run once
    more per backend with ``AsyncSession`` on aiosqlite (``CacheEnv.kind``).
    """
    tuned = request.param.startswith("sqla_cachelayer.")
    region = region_for(request.param, request, tmp_path)
    return make_env(region=region, tuned=tuned, kind=session_kind)


@pytest.fixture
def memory_env(make_env: Callable[..., CacheEnv]) -> CacheEnv:
    """For tests that look inside ``dogpile.cache.memory``'s dict."""
    return make_env()
