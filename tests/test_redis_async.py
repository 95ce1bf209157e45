"""``sqla_cachelayer.redis``: one cache for sync and async processes, and an
event loop that keeps running while Redis answers, or hangs."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from _models import Base, User, seed
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker

import sqla_cachelayer as scl
from sqla_cachelayer import FromCache

pytest.importorskip("redis")

STMT = select(User.name).where(User.id == 1).options(FromCache())
TESTS = Path(__file__).parent

# A separate, synchronous process: reads user 1's name through a layer whose
# region is ``backend`` (dogpile's or ours) and prints it with the layer's stats.
SYNC_READER = """
import json, sys
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker
import sqla_cachelayer as scl
from _models import User

db, url, backend = sys.argv[1:4]
engine = scl.engine_from_config({"sqlalchemy.url": f"sqlite:///{db}"})
layer = scl.CacheLayer.from_settings({
    "cachelayer.regions.default.backend": backend,
    "cachelayer.regions.default.arguments.url": url,
})
Session = layer.install(sessionmaker(engine))
stmt = select(User.name).where(User.id == 1).options(scl.FromCache())
names = []
for _ in range(2):
    with Session() as s:
        names.append(s.execute(stmt).scalar_one())
print(json.dumps({"names": names, "stats": layer.stats()}))
"""


def _sync_process(db: Path, url: str, backend: str) -> dict[str, Any]:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    )
    out = subprocess.run(
        [sys.executable, "-c", SYNC_READER, str(db), url, backend],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _async_layer(url: str, **arguments: Any) -> scl.CacheLayer:
    settings = {
        "cachelayer.regions.default.backend": "sqla_cachelayer.redis",
        "cachelayer.regions.default.arguments.url": url,
    }
    for name, value in arguments.items():
        settings[f"cachelayer.regions.default.arguments.{name}"] = value
    return scl.CacheLayer.from_settings(settings)


def _name_reader(Session: Any) -> Callable[[int], Awaitable[str]]:
    """A coroutine function: user ``user_id``'s name, ``FromCache()``, in a session of its own."""

    async def read(user_id: int) -> str:
        stmt = select(User.name).where(User.id == user_id).options(FromCache())
        async with Session() as s:
            return str((await s.execute(stmt)).scalar_one())

    return read


def _seed_db(db: Path) -> None:
    engine = scl.engine_from_config({"sqlalchemy.url": f"sqlite:///{db}"})
    Base.metadata.create_all(engine)
    seed(sessionmaker(engine))
    engine.dispose()


@pytest.mark.parametrize("sync_backend", ["dogpile.cache.redis", "sqla_cachelayer.redis"])
def test_sync_and_async_processes_share_one_cache(
    tmp_path: Path, redis_db_url: str, sync_backend: str
) -> None:
    db = tmp_path / "app.db"
    _seed_db(db)
    first = _sync_process(db, redis_db_url, sync_backend)
    assert first["names"] == ["user1", "user1"]
    assert first["stats"]["stores"] == 1 and first["stats"]["hits"] == 1

    layer = _async_layer(redis_db_url)

    async def main() -> None:
        engine = create_async_engine(f"sqlite+aiosqlite:///{db}")
        statements: list[str] = []
        from sqlalchemy import event

        event.listen(
            engine.sync_engine, "before_cursor_execute", lambda *a: statements.append(a[2])
        )
        Session = layer.install(async_sessionmaker(engine, expire_on_commit=False))
        async with Session() as s:
            assert (await s.execute(STMT)).scalar_one() == "user1"
        assert layer.stats()["hits"] == 1, "the sync process's entry must be a hit"
        assert not any("FROM users" in sql for sql in statements)
        async with Session() as s:
            await s.execute(update(User).where(User.id == 1).values(name="async-renamed"))
            await s.commit()
        await engine.dispose()

    asyncio.run(main())
    after = _sync_process(db, redis_db_url, sync_backend)
    assert after["names"] == ["async-renamed", "async-renamed"]
    assert after["stats"]["hits"] == 1 and after["stats"]["misses"] == 1


def test_async_reads_use_redis_asyncio(tmp_path: Path, redis_db_url: str) -> None:
    """Hits, misses and the commit's invalidation go through the loop's client."""
    db = tmp_path / "app.db"
    _seed_db(db)
    layer = _async_layer(redis_db_url)
    backend = layer.regions["default"].backend
    sync_calls: list[str] = []
    real = backend.writer_client.execute_command

    def spy(*args: Any, **kwargs: Any) -> Any:
        sync_calls.append(str(args[0]))
        return real(*args, **kwargs)

    backend.writer_client.execute_command = spy

    async def main() -> None:
        engine = create_async_engine(f"sqlite+aiosqlite:///{db}")
        Session = layer.install(async_sessionmaker(engine, expire_on_commit=False))
        for expected in ("user1", "user1"):
            async with Session() as s:
                assert (await s.execute(STMT)).scalar_one() == expected
        async with Session() as s:
            (await s.get(User, 1)).name = "x"  # type: ignore[union-attr]
            await s.commit()
        async with Session() as s:
            assert (await s.execute(STMT)).scalar_one() == "x"
        await engine.dispose()

    asyncio.run(main())
    stats = layer.stats()
    assert stats["hits"] == 1 and stats["misses"] == 2 and stats["stores"] == 2
    assert sync_calls == [], f"the sync client was used from the event loop: {sync_calls}"


def test_distributed_lock_from_an_async_session(tmp_path: Path, redis_db_url: str) -> None:
    db = tmp_path / "app.db"
    _seed_db(db)
    layer = _async_layer(redis_db_url, distributed_lock="true")

    async def main() -> None:
        engine = create_async_engine(f"sqlite+aiosqlite:///{db}")
        Session = layer.install(async_sessionmaker(engine, expire_on_commit=False))
        for _ in range(2):
            async with Session() as s:
                assert (await s.execute(STMT)).scalar_one() == "user1"
        await engine.dispose()

    asyncio.run(main())
    assert layer.stats()["hits"] == 1 and layer.stats()["errors"] == 0


def test_hung_redis_never_stalls_the_loop(
    tmp_path: Path, redis_server_factory: Callable[..., Any]
) -> None:
    """100 coroutines read through a region whose server is hung (SIGSTOP): a
    ticker sees the loop's longest gap under 0.5 s, every answer is right."""
    server = redis_server_factory()
    db = tmp_path / "app.db"
    _seed_db(db)
    layer = scl.CacheLayer.from_settings(
        {
            "cachelayer.regions.default.backend": "sqla_cachelayer.redis",
            "cachelayer.regions.default.arguments.url": server.url,
            # a short pause after an error: a connect slowed past its timeout
            # by a loaded machine must not keep the fill below from Redis long
            "cachelayer.breaker_reset_seconds": "0.2",
        }
    )
    longest = 0.0

    async def ticker(stop: asyncio.Event) -> None:
        nonlocal longest
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            longest = max(longest, now - last)
            last = now

    async def main() -> list[str]:
        engine = create_async_engine(f"sqlite+aiosqlite:///{db}")
        Session = layer.install(async_sessionmaker(engine, expire_on_commit=False))

        read = _name_reader(Session)

        for _ in range(20):  # fill: every key cached, a connection open
            for i in range(1, 6):
                await read(i)
            if layer.stats()["hits"] >= 5:
                break
            await asyncio.sleep(0.2)
        assert layer.stats()["hits"] >= 5
        errors = layer.stats()["errors"]
        stop = asyncio.Event()
        tick = asyncio.create_task(ticker(stop))
        await asyncio.sleep(0.05)
        server.pause()
        try:
            names = await asyncio.gather(*(read(i % 5 + 1) for i in range(100)))
        finally:
            server.resume()
            stop.set()
            await tick
            await engine.dispose()
        assert layer.stats()["errors"] > errors, "the hang must have been met"
        return names

    names = asyncio.run(main())
    assert names == [f"user{i % 5 + 1}" for i in range(100)]
    assert longest < 0.5, f"the event loop stalled {longest:.2f}s"


def _connections_received(url: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return int(client.info("stats")["total_connections_received"])
    finally:
        client.close()


@pytest.mark.parametrize(
    ("arguments", "cap"),
    [({}, None), ({"max_connections": "4"}, 4), ({"connection_kwargs": {"max_connections": 3}}, 3)],
    ids=["default", "argument", "connection_kwargs"],
)
def test_async_connections_are_capped(
    tmp_path: Path,
    redis_server_factory: Callable[..., Any],
    arguments: dict[str, Any],
    cap: int | None,
) -> None:
    """150 coroutines reading at once through one loop use at most the cap of
    connections to Redis, and every answer is right."""
    from sqla_cachelayer.backends.redis import ASYNC_MAX_CONNECTIONS

    cap = cap or ASYNC_MAX_CONNECTIONS
    server = redis_server_factory()
    db = tmp_path / "app.db"
    _seed_db(db)
    # a long connect timeout: on a busy machine a connect that outlasts it is
    # dropped and made again, which the server would count twice
    layer = _async_layer(server.url, socket_connect_timeout="5", **arguments)
    backend = layer.regions["default"].backend
    opened: list[int] = []
    pooled: list[int] = []

    async def main() -> list[str]:
        engine = create_async_engine(f"sqlite+aiosqlite:///{db}")
        Session = layer.install(async_sessionmaker(engine, expire_on_commit=False))

        read = _name_reader(Session)

        before = _connections_received(server.url)
        names: list[str] = []
        for _ in range(3):  # misses, then hits, all at once
            names += await asyncio.gather(*(read(i % 5 + 1) for i in range(150)))
        # the probe's own connection counts once
        opened.append(_connections_received(server.url) - before - 1)
        pool: Any = backend.async_client().connection_pool
        pooled.append(len(pool._available_connections) + len(pool._in_use_connections))
        await engine.dispose()
        return names

    names = asyncio.run(main())
    assert names == [f"user{i % 5 + 1}" for i in range(150)] * 3
    stats = layer.stats()
    assert stats["hits"] >= 1
    # the pool's connection objects (each one socket at most, reconnected in
    # place after an error): 100 before, then redis-py refused the 101st
    assert 1 <= pooled[0] <= cap, f"{pooled[0]} connections in the pool, cap {cap}"
    if stats["errors"] == 0:
        # and as the server counted them, when none had to be made again
        assert 1 <= opened[0] <= cap, f"{opened[0]} connections opened, cap {cap}"


def test_the_applications_pool_bound_wins() -> None:
    """A ``connection_pool`` with its own ``max_connections`` bounds the asyncio
    pool too; one without keeps the default; the argument wins over both."""
    import redis

    from sqla_cachelayer.backends.redis import ASYNC_MAX_CONNECTIONS, RedisBackend

    def cap(**arguments: Any) -> tuple[int, float]:
        backend = RedisBackend(arguments)

        async def made() -> tuple[int, float]:
            pool = backend.async_client().connection_pool
            return pool.max_connections, pool.timeout  # type: ignore[attr-defined]

        return asyncio.run(made())

    bounded = redis.ConnectionPool(host="127.0.0.1", port=1, max_connections=2)
    assert cap(connection_pool=bounded) == (2, 0.5)
    assert cap(connection_pool=redis.ConnectionPool(host="127.0.0.1", port=1)) == (
        ASYNC_MAX_CONNECTIONS,
        0.5,
    )
    assert cap(connection_pool=bounded, max_connections=7) == (7, 0.5)
    assert cap(url="redis://127.0.0.1:1/0", socket_connect_timeout="0.25") == (
        ASYNC_MAX_CONNECTIONS,
        0.25,
    )


def test_invalidation_retries_pause_on_the_loop(
    tmp_path: Path, redis_server_factory: Callable[..., Any]
) -> None:
    """A commit whose invalidation fails is retried twice after short pauses;
    from an AsyncSession those pauses let the loop run (a coroutine ticks
    between every two attempts) instead of stopping it with time.sleep."""
    server = redis_server_factory()
    url = server.url
    server.stop()  # a dead server: every call is refused at once
    db = tmp_path / "app.db"
    _seed_db(db)
    layer = _async_layer(url)
    layer.BUMP_RETRY_SLOW = 60.0  # a refused connect slowed by a busy machine is retried too
    (state,) = layer._state_list
    ticks = 0
    attempts: list[tuple[int, int]] = []  # ticks seen when each attempt started, ended
    real_bump = state.store.bump

    def bump(tables: Any) -> int:
        started = ticks
        try:
            return int(real_bump(tables))
        finally:
            attempts.append((started, ticks))

    state.store.bump = bump  # type: ignore[method-assign]

    async def ticker(stop: asyncio.Event) -> None:
        nonlocal ticks
        while not stop.is_set():
            await asyncio.sleep(0)
            ticks += 1

    async def main() -> None:
        engine = create_async_engine(f"sqlite+aiosqlite:///{db}")
        Session = layer.install(async_sessionmaker(engine, expire_on_commit=False))
        stop = asyncio.Event()
        tick = asyncio.create_task(ticker(stop))
        try:
            async with Session() as s:
                await s.execute(update(User).where(User.id == 1).values(name="renamed"))
                await s.commit()
        finally:
            stop.set()
            await tick
            await engine.dispose()

    asyncio.run(main())
    assert len(attempts) == 3, attempts
    for (_, ended), (started, _) in itertools.pairwise(attempts):
        assert started > ended, f"the loop stood still between two attempts: {attempts}"
    assert layer.stats()["errors"] >= 1


def test_coroutines_get_connections_in_turn(redis_db_url: str) -> None:
    """100 coroutines reading in a loop through 4 connections are served in
    turn: when the first has made its 50 calls, every other has made nearly
    as many. (redis-py's BlockingConnectionPool lets a coroutine that asks
    again take back the connection it just released ahead of the waiting
    ones: some had made 0 calls, and, with the pool's usual timeout, failed
    with "No connection available".)"""
    from sqla_cachelayer.backends.redis import RedisBackend

    backend = RedisBackend(
        # a long wait: the order of service is measured here, not the time
        {"url": redis_db_url, "max_connections": "4", "socket_connect_timeout": "30"}
    )
    calls = [0] * 100
    when_first_done: list[list[int]] = []

    async def reader(i: int) -> None:
        client = backend.async_client()
        for _ in range(50):
            assert await client.mget(["a", "b"]) == [None, None]
            calls[i] += 1
        if not when_first_done:
            when_first_done.append(list(calls))

    async def main() -> None:
        await asyncio.gather(*(reader(i) for i in range(100)))
        await backend.async_client().aclose()

    asyncio.run(main())
    assert calls == [50] * 100
    assert min(when_first_done[0]) >= 45, sorted(when_first_done[0])[:10]


def test_a_coroutine_waits_for_another_process_fill(tmp_path: Path, redis_db_url: str) -> None:
    """A coroutine missing a key whose distributed lock another process holds
    runs no query while the lock is held, other coroutines keep running
    meanwhile, and once the lock is released it runs its one query."""
    import redis

    db = tmp_path / "app.db"
    _seed_db(db)
    layer = _async_layer(redis_db_url, distributed_lock="true")
    backend = layer.regions["default"].backend
    other = redis.Redis.from_url(redis_db_url)  # the other process's client
    statements: list[str] = []
    ticks = 0

    async def main() -> tuple[str, int, int]:
        nonlocal ticks
        engine = create_async_engine(f"sqlite+aiosqlite:///{db}")
        from sqlalchemy import event

        event.listen(
            engine.sync_engine, "before_cursor_execute", lambda *a: statements.append(a[2])
        )
        Session = layer.install(async_sessionmaker(engine, expire_on_commit=False))
        async with Session() as s:  # stored: its key is now known
            assert (await s.execute(STMT)).scalar_one() == "user1"
        (entry,) = [k for k in other.scan_iter() if not k.startswith((b"{", b"_lock"))]
        lock_name = backend.lock_template.format(entry.decode())
        async with Session() as s:  # invalidated: the next read misses
            await s.execute(update(User).where(User.id == 1).values(name="renamed"))
            await s.commit()
        assert other.set(lock_name, b"other-process", nx=True)
        statements.clear()
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                await asyncio.sleep(0.001)
                ticks += 1

        async def read() -> str:
            async with Session() as s:
                return str((await s.execute(STMT)).scalar_one())

        tick = asyncio.create_task(ticker())
        reader = asyncio.create_task(read())
        while ticks < 30:  # the loop runs while the reader waits for the lock
            await asyncio.sleep(0.001)
        assert not reader.done()
        waited_ticks, selects_while_locked = ticks, sum("FROM users" in q for q in statements)
        other.delete(lock_name)
        name = await asyncio.wait_for(reader, 30)
        stop.set()
        await tick
        await engine.dispose()
        return name, waited_ticks, selects_while_locked

    try:
        name, waited_ticks, selects_while_locked = asyncio.run(main())
    finally:
        other.close()
    assert name == "renamed"
    assert waited_ticks >= 30 and selects_while_locked == 0
    assert sum("FROM users" in q for q in statements) == 1


def test_a_coroutine_waits_no_longer_than_lock_blocking_timeout(
    tmp_path: Path, redis_db_url: str
) -> None:
    """With ``lock_blocking_timeout``, a coroutine whose key's distributed lock
    another process keeps gives up waiting as a thread's blocking acquire()
    would, and answers from the database (the lock still held)."""
    import redis

    db = tmp_path / "app.db"
    _seed_db(db)
    layer = _async_layer(redis_db_url, distributed_lock="true", lock_blocking_timeout="0.2")
    backend = layer.regions["default"].backend
    other = redis.Redis.from_url(redis_db_url)  # the other process's client

    async def main() -> str:
        engine = create_async_engine(f"sqlite+aiosqlite:///{db}")
        Session = layer.install(async_sessionmaker(engine, expire_on_commit=False))
        async with Session() as s:  # stored: its key is now known
            assert (await s.execute(STMT)).scalar_one() == "user1"
        (entry,) = [k for k in other.scan_iter() if not k.startswith((b"{", b"_lock"))]
        lock_name = backend.lock_template.format(entry.decode())
        async with Session() as s:  # invalidated: the next read misses
            await s.execute(update(User).where(User.id == 1).values(name="renamed"))
            await s.commit()
        assert other.set(lock_name, b"other-process", nx=True)  # and never released

        async def read() -> str:
            async with Session() as s:
                return str((await s.execute(STMT)).scalar_one())

        try:
            return await asyncio.wait_for(read(), 10)
        finally:
            assert other.get(lock_name) == b"other-process"
            other.delete(lock_name)
            await engine.dispose()

    try:
        assert asyncio.run(main()) == "renamed"
    finally:
        other.close()
