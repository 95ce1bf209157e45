"""Redis from asyncio: the event loop's longest pause, and the cost of a hit.

Part 1. 100 coroutines each read one cached row (five distinct keys) in an
``AsyncSession`` of their own on aiosqlite, all at once, while a ticker
coroutine waking every 5 ms records the loop's longest pause. Cases: uncached;
``sqla_cachelayer.redis`` with the server healthy and hung (SIGSTOP); and
``dogpile.cache.redis``, whose synchronous client runs in the loop's thread,
hung. Each case runs ``--repeat`` times in a fresh process state (new server,
new layer, new engine).

Part 2. One coroutine (and one thread, for comparison) reading one cached row
repeatedly: median microseconds per hit through each backend.

    python benchmarks/redis_async.py            # about half a minute
    python benchmarks/redis_async.py --repeat 1 --hits 200

A private redis-server is started per case (``tests/_servers.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from _models import Base, User, seed  # noqa: E402
from _servers import RedisServer, find_redis_server  # noqa: E402
from sqlalchemy import select  # noqa: E402
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine  # noqa: E402
from sqlalchemy.orm import sessionmaker  # noqa: E402

import sqla_cachelayer as scl  # noqa: E402

COROUTINES = 100


def _db(workdir: Path) -> Path:
    db = workdir / "app.db"
    if db.exists():
        db.unlink()
    engine = scl.engine_from_config({"sqlalchemy.url": f"sqlite:///{db}"})
    Base.metadata.create_all(engine)
    seed(sessionmaker(engine))
    engine.dispose()
    return db


def _layer(backend: str | None, url: str) -> scl.CacheLayer | None:
    if backend is None:
        return None
    return scl.CacheLayer.from_settings(
        {
            "cachelayer.regions.default.backend": backend,
            "cachelayer.regions.default.arguments.url": url,
            "cachelayer.breaker_reset_seconds": "0.2",
        }
    )


def _stmt(user_id: int, cached: bool) -> Any:
    stmt = select(User.name).where(User.id == user_id)
    return stmt.options(scl.FromCache()) if cached else stmt


async def _burst(db: Path, layer: scl.CacheLayer | None, server: RedisServer, hang: bool) -> Any:
    engine = create_async_engine(f"sqlite+aiosqlite:///{db}")
    factory = async_sessionmaker(engine, expire_on_commit=False)
    Session = layer.install(factory) if layer is not None else factory
    cached = layer is not None

    async def read(user_id: int) -> str:
        async with Session() as s:
            return str((await s.execute(_stmt(user_id, cached))).scalar_one())

    for _ in range(20):  # fill every key; retry past a slow first connect
        for i in range(1, 6):
            await read(i)
        if layer is None or layer.stats()["hits"] >= 5:
            break
        await asyncio.sleep(0.25)
    errors_before = layer.stats()["errors"] if layer is not None else 0
    longest = 0.0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal longest
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            longest = max(longest, now - last)
            last = now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    if hang:
        server.pause()
    start = time.monotonic()
    try:
        names = await asyncio.gather(*(read(i % 5 + 1) for i in range(COROUTINES)))
    finally:
        took = time.monotonic() - start
        if hang:
            server.resume()
        stop.set()
        await tick
        await engine.dispose()
    right = names == [f"user{i % 5 + 1}" for i in range(COROUTINES)]
    errors = (layer.stats()["errors"] - errors_before) if layer is not None else 0
    return longest, took, right, errors


async def _async_hits(db: Path, layer: scl.CacheLayer, n: int) -> list[float]:
    engine = create_async_engine(f"sqlite+aiosqlite:///{db}")
    Session = layer.install(async_sessionmaker(engine, expire_on_commit=False))
    times = []
    for _ in range(n + 20):
        start = time.perf_counter()
        async with Session() as s:
            (await s.execute(_stmt(1, True))).scalar_one()
        times.append(time.perf_counter() - start)
    await engine.dispose()
    return times[20:]


def _sync_hits(db: Path, layer: scl.CacheLayer, n: int) -> list[float]:
    engine = scl.engine_from_config({"sqlalchemy.url": f"sqlite:///{db}"})
    Session = layer.install(sessionmaker(engine))
    times = []
    for _ in range(n + 20):
        start = time.perf_counter()
        with Session() as s:
            s.execute(_stmt(1, True)).scalar_one()
        times.append(time.perf_counter() - start)
    engine.dispose()
    return times[20:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--hits", type=int, default=1000)
    args = parser.parse_args(argv)
    binary = find_redis_server()
    if not binary:
        print("no redis-server binary: nothing to measure")
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="scl-bench-"))
    db = _db(workdir)
    print(f"Python {sys.version.split()[0]}, load average at start {os.getloadavg()}")
    print(f"Part 1: {COROUTINES} coroutines at once, longest event-loop pause")
    cases = [
        ("uncached", None, False),
        ("sqla_cachelayer.redis, healthy", "sqla_cachelayer.redis", False),
        ("sqla_cachelayer.redis, hung", "sqla_cachelayer.redis", True),
        ("dogpile.cache.redis, hung", "dogpile.cache.redis", True),
    ]
    for label, backend, hang in cases:
        for _ in range(args.repeat):
            server = RedisServer(binary).start()
            try:
                layer = _layer(backend, server.url)
                longest, took, right, errors = asyncio.run(_burst(db, layer, server, hang))
            finally:
                server.cleanup()
            print(
                f"  {label:<32} pause {longest * 1000:7.1f} ms   reads {took:5.2f} s   "
                f"answers right: {right}   backend errors: {errors}   load {os.getloadavg()[0]:.1f}"
            )
    print(f"Part 2: one caller, median us per cache hit ({args.hits} hits)")
    server = RedisServer(binary).start()
    try:
        for backend in ("dogpile.cache.redis", "sqla_cachelayer.redis"):
            layer = _layer(backend, server.url)
            assert layer is not None
            sync = statistics.median(_sync_hits(db, layer, args.hits)) * 1e6
            aio = statistics.median(asyncio.run(_async_hits(db, layer, args.hits))) * 1e6
            print(
                f"  {backend:<22} Session {sync:7.1f} us   AsyncSession {aio:7.1f} us   "
                f"load {os.getloadavg()[0]:.1f}"
            )
    finally:
        server.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
