"""An ASGI-style asyncio workload, uncached and cached: requests per second
and the event loop's longest pause.

100 coroutines (the requests in flight of a small async web app) each run
requests back to back for ``--seconds``, every request in an ``AsyncSession``
of its own: 90% reads (two thirds a product page, one item by primary key
from a skewed set of 2,000; one third a category page, 40 items), 10% writes
(one item's price changed and committed, which invalidates what depends on
it). A ticker coroutine sleeping 5 ms records the loop's longest pause beyond
its sleep. Cases: uncached; cached with ``sqla_cachelayer.memory``; cached
with ``sqla_cachelayer.redis`` (``redis.asyncio`` from the ORM's greenlet),
each on aiosqlite (a SQLite file) and on asyncpg (PostgreSQL); and the
ceiling, ``free reads``: the same requests with every read costing nothing,
which no cache can beat (with writes, the throughput the writes alone allow).

Columns: requests per second, and the CPU time per request of this process
(every thread) and of the servers started for the run (PostgreSQL's
processes, redis-server; not servers given with ``--pg-url``/``--redis-url``),
a figure a busy machine changes much less than the throughput; the loop's
longest pause seen by the ticker (a whole round of the
ready tasks) and its 99th percentile; the longest single step the loop ran
(one task step), the longest step during which no garbage collection ran
(the code's own), the longest collection; the longest pause during bursts of
100 simultaneous hits; the number of collections and the objects the
collector tracks at the end (thousands): what a full collection scans.
``--gc freeze`` calls ``gc.freeze()`` after the warm-up (an application's
setting), ``--gc off`` disables the collector during the measured time.

    python benchmarks/asyncio_app.py                # a few minutes
    python benchmarks/asyncio_app.py --seconds 2 --repeat 1 --gc on,freeze,off
    python benchmarks/asyncio_app.py --pg-url postgresql://... --redis-url redis://...

Redis and PostgreSQL are started privately for the run (``tests/_servers.py``)
unless ``--redis-url`` / ``--pg-url`` (or ``SCL_TEST_REDIS_URL`` /
``SCL_TEST_PG_URL``) name servers of your own; a server that cannot be started
is skipped with the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy
from _run_servers import postgres_for_run, redis_for_run
from sqlalchemy import String, delete, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sqla_cachelayer as scl

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

ITEMS = 2_000
CATEGORIES = 50
HOT = 200  # 80% of product pages ask for one of these
CONCURRENCY = 100
TICK = 0.005


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "bench_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    category_id: Mapped[int] = mapped_column(index=True)
    name: Mapped[str] = mapped_column(String(60))
    price: Mapped[int]


class Twin(Base):
    """The same rows in a table no read uses: the ``all hits`` case writes here."""

    __tablename__ = "bench_items_twin"
    id: Mapped[int] = mapped_column(primary_key=True)
    category_id: Mapped[int] = mapped_column(index=True)
    name: Mapped[str] = mapped_column(String(60))
    price: Mapped[int]


async def _seed(engine: Any) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
        rows = [
            {"id": i, "category_id": i % CATEGORIES, "name": f"item {i}", "price": i}
            for i in range(1, ITEMS + 1)
        ]
        for table in (Item, Twin):
            await conn.execute(delete(table))
            await conn.execute(sqlalchemy.insert(table), rows)


def _item_id(rng: random.Random) -> int:
    if rng.random() < 0.8:
        return rng.randint(1, HOT)
    return rng.randint(1, ITEMS)


async def _request(Session: Any, rng: random.Random, writes: float, mode: str) -> None:
    roll = rng.random()
    if roll < writes:
        key = _item_id(rng)
        written = Twin if mode == ELSEWHERE else Item

        async def reprice(s: Any) -> None:
            item = await s.get(written, key)
            item.price += 1

        # a read-modify-write: the project's retry helper, as an app would
        await scl.run_in_transaction_async(Session, reprice, attempts=20)
        return
    if mode == CEILING:
        # the ceiling: a read that costs nothing (what no cache can beat)
        if roll < writes + (1 - writes) / 3:
            rng.randrange(CATEGORIES)
        else:
            _item_id(rng)
        return
    async with Session() as s:
        if roll < writes + (1 - writes) / 3:
            rows = (
                await s.scalars(
                    select(Item)
                    .where(Item.category_id == rng.randrange(CATEGORIES))
                    .order_by(Item.id)
                )
            ).all()
            assert len(rows) == ITEMS // CATEGORIES
        else:
            key = _item_id(rng)
            item = (await s.scalars(select(Item).where(Item.id == key))).one()
            assert item.id == key


async def _burst(Session: Any, rounds: int = 20) -> float:
    """The loop's longest pause while 100 coroutines each read one hot item
    at once (cached: 100 hits back to back), over ``rounds`` bursts."""
    worst = 0.0
    for r in range(rounds):
        stop = [False]

        async def ticker(stop: list[bool] = stop) -> None:
            nonlocal worst
            while not stop[0]:
                before = time.perf_counter()
                await asyncio.sleep(0.001)
                worst = max(worst, time.perf_counter() - before - 0.001)

        async def one(key: int) -> None:
            async with Session() as s:
                item = (await s.scalars(select(Item).where(Item.id == key))).one()
                assert item.id == key

        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.002)
        await asyncio.gather(*(one(1 + (r * CONCURRENCY + i) % HOT) for i in range(CONCURRENCY)))
        stop[0] = True
        await tick
    return worst


class _StepTimer:
    """The longest single step the event loop ran (one callback or task step:
    for a coroutine, the code between two of its awaits that yield) while
    active. The ticker's pause is a whole round of the ready tasks; this is
    the longest the loop was held by any one of them, e.g. by a cache hit,
    which completes without yielding."""

    def __init__(self) -> None:
        self.worst = 0.0
        #: the most CPU time (of the loop's thread) one step used while no
        #: garbage collection ran: the code's own (the cache's, the ORM's,
        #: the driver's), without the time other processes took the CPU
        self.worst_own_cpu = 0.0
        self.worst_gc = 0.0  # the longest garbage collection meanwhile
        self.worst_gc_cpu = 0.0  # and the most CPU time one used
        self._run: Any = None
        self._gc_started = 0.0
        self._gc_started_cpu = 0.0
        self._gcs = 0

    def _gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            self._gc_started_cpu = time.thread_time()
            self._gcs += 1
        else:
            self.worst_gc = max(self.worst_gc, time.perf_counter() - self._gc_started)
            self.worst_gc_cpu = max(self.worst_gc_cpu, time.thread_time() - self._gc_started_cpu)

    def __enter__(self) -> _StepTimer:
        handle = asyncio.events.Handle
        run = self._run = handle._run

        def timed(h: Any) -> None:
            gcs = self._gcs
            cpu = time.thread_time()
            before = time.perf_counter()
            run(h)
            spent = time.perf_counter() - before
            cpu = time.thread_time() - cpu
            if spent > self.worst:
                self.worst = spent
            if cpu > self.worst_own_cpu and gcs == self._gcs:
                self.worst_own_cpu = cpu

        handle._run = timed  # type: ignore[method-assign]
        gc.callbacks.append(self._gc)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.events.Handle._run = self._run  # type: ignore[method-assign]
        gc.callbacks.remove(self._gc)


#: the servers started for the run (PostgreSQL's postmaster, redis-server):
#: their CPU time, and their children's, counts in the CPU per request
SERVER_PIDS: list[int] = []


def _servers_cpu() -> float:
    """CPU seconds used so far by the servers in :data:`SERVER_PIDS` and their
    live children (a PostgreSQL backend per connection), plus what their
    reaped children used (Linux ``/proc``; 0 elsewhere)."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid = int(entry.parent.name)
        parents[pid] = int(fields[1])
        # utime, stime, cutime, cstime
        used[pid] = sum(int(f) for f in fields[11:15]) / ticks
    total = 0.0
    for pid, cpu in used.items():
        p, depth = pid, 0
        while p and depth < 5:
            if p in SERVER_PIDS:
                total += cpu
                break
            p, depth = parents.get(p, 0), depth + 1
    return total


#: cache column of the ceiling case: the same requests, reads costing nothing
CEILING = "free reads"
#: cache column of the case whose writes change a table no read uses: every
#: read can hit (the in-process backend), the writes cost what they cost
ELSEWHERE = "all hits"


async def _run_case(
    url: str, region: dict[str, str] | None, seconds: float, writes: float, gc_mode: str
) -> dict[str, float]:
    engine = scl.async_engine_from_config({"sqlalchemy.url": url})
    await _seed(engine)
    region = dict(region) if region is not None else None
    mode = region.pop("mode", "") if region is not None else ""
    if mode == CEILING:
        region = None
    options = {"cache_region": "default"} if region is not None else {}
    Session = async_sessionmaker(engine, expire_on_commit=False, execution_options=options)
    layer = None
    if region is not None:
        settings = {f"cachelayer.regions.default.{k}": v for k, v in region.items()}
        layer = scl.CacheLayer.from_settings(settings)
        layer.install(Session)
        layer.invalidate_all()
    done = 0
    gaps: list[float] = []
    stop = False
    longest = _StepTimer()

    async def ticker() -> None:
        while not stop:
            before = time.perf_counter()
            await asyncio.sleep(TICK)
            gaps.append(time.perf_counter() - before - TICK)

    async def client(seed: int, until: float) -> None:
        nonlocal done
        rng = random.Random(seed)
        while time.perf_counter() < until:
            await _request(Session, rng, writes, mode)
            done += 1
            # an ASGI server writes the response to its socket: the loop runs
            # other tasks there (a cache hit itself never yields)
            await asyncio.sleep(0)

    # warm-up: connections opened, statements compiled, hot entries filled
    warm_until = time.perf_counter() + min(1.0, seconds / 2)
    await asyncio.gather(*(client(-i - 1, warm_until) for i in range(CONCURRENCY)))
    done = 0
    gc.collect()
    if gc_mode == "freeze":
        # an application's setting: what start-up and warm-up made is never
        # scanned again by the collector
        gc.freeze()
    elif gc_mode == "off":
        gc.disable()
    collections = sum(s["collections"] for s in gc.get_stats())
    tick = asyncio.create_task(ticker())
    cpu = time.process_time() + _servers_cpu()
    started = time.perf_counter()
    until = started + seconds
    try:
        with longest:
            await asyncio.gather(*(client(i, until) for i in range(CONCURRENCY)))
        elapsed = time.perf_counter() - started
        cpu = time.process_time() + _servers_cpu() - cpu
        stop = True
        await tick
    finally:
        collections = sum(s["collections"] for s in gc.get_stats()) - collections
        # what a full collection scans (a frozen heap is left out of it)
        tracked = len(gc.get_objects())
        gc.enable()
        gc.unfreeze()
    burst = await _burst(Session)
    stats = layer.stats() if layer is not None else {}
    await engine.dispose()
    return {
        "rps": done / elapsed,
        # the CPU of this process (every thread: aiosqlite's SQLite work too)
        # and of the servers started for the run, per request: what a busy
        # machine changes little
        "cpu_ms": cpu / max(1, done) * 1000,
        "gap_ms": max(gaps) * 1000,
        "step_ms": longest.worst * 1000,
        "own_cpu_ms": longest.worst_own_cpu * 1000,
        "gc_cpu_ms": longest.worst_gc_cpu * 1000,
        "gc_ms": longest.worst_gc * 1000,
        "burst_ms": burst * 1000,
        "gap_p99_ms": statistics.quantiles(gaps, n=100)[98] * 1000 if len(gaps) > 1 else 0.0,
        "hit_ratio": stats.get("hits", 0) / max(1, stats.get("hits", 0) + stats.get("misses", 0)),
        "bypasses": stats.get("bypasses", 0),
        "errors": stats.get("errors", 0),
        "collections": collections,
        "tracked": tracked,
    }


def _redis(args: argparse.Namespace, cleanups: list[Any]) -> str | None:
    url, pid = redis_for_run(args.redis_url, cleanups)
    if pid is not None:
        SERVER_PIDS.append(pid)
    return url


def _postgres(args: argparse.Namespace, cleanups: list[Any]) -> str | None:
    url, pid = postgres_for_run(args.pg_url, cleanups)
    if url is None:
        return None
    if pid is not None:
        SERVER_PIDS.append(pid)
    return make_url(url).set(drivername="postgresql+asyncpg").render_as_string(False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="measured time per case")
    parser.add_argument("--repeat", type=int, default=2, help="runs per case (median shown)")
    parser.add_argument(
        "--writes",
        default="0.10,0",
        help="shares of requests that write, comma-separated (one table each)",
    )
    parser.add_argument(
        "--gc",
        default="on",
        help="garbage collector during the measured time, comma-separated: on, "
        "freeze (gc.freeze() after warm-up), off (gc.disable())",
    )
    parser.add_argument(
        "--databases", default="aiosqlite,asyncpg", help="comma-separated: aiosqlite, asyncpg"
    )
    parser.add_argument(
        "--caches",
        default=f"uncached,memory,redis,{ELSEWHERE},{CEILING}",
        help=f"comma-separated: uncached, memory, redis, '{ELSEWHERE}', '{CEILING}'",
    )
    parser.add_argument("--pg-url")
    parser.add_argument("--redis-url")
    args = parser.parse_args(argv)

    cleanups: list[Any] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            wanted_dbs = args.databases.split(",")
            wanted = args.caches.split(",")
            databases = {}
            if "aiosqlite" in wanted_dbs:
                databases["aiosqlite"] = f"sqlite+aiosqlite:///{tmp}/app.db"
            pg = _postgres(args, cleanups) if "asyncpg" in wanted_dbs else None
            if pg is not None:
                databases["asyncpg"] = pg
            caches: dict[str, dict[str, str] | None] = {"uncached": None}
            if "memory" in wanted:
                caches["memory"] = {"backend": "sqla_cachelayer.memory"}
            redis_url = _redis(args, cleanups) if "redis" in wanted else None
            if redis_url is not None:
                caches["redis"] = {"backend": "sqla_cachelayer.redis", "arguments.url": redis_url}
            if ELSEWHERE in wanted:
                caches[ELSEWHERE] = {"backend": "sqla_cachelayer.memory", "mode": ELSEWHERE}
            if CEILING in wanted:
                caches[CEILING] = {"mode": CEILING}
            print(
                f"Python {platform.python_version()}, SQLAlchemy {sqlalchemy.__version__}, "
                f"{os.cpu_count()} CPUs; {CONCURRENCY} coroutines, "
                f"{args.seconds:g} s per run, median of {args.repeat} runs"
            )
            print(f"load average before: {os.getloadavg()}")
            for writes, gc_mode in [
                (float(w), g) for w in args.writes.split(",") for g in args.gc.split(",")
            ]:
                print(f"\n{1 - writes:.0%} reads, {writes:.0%} writes; gc {gc_mode}")
                print(
                    f"{'database':<10} {'cache':<10} {'req/s':>8} {'x uncached':>10} "
                    f"{'cpu ms/req':>10} {'x':>5} "
                    f"{'max gap ms':>10} {'p99 gap ms':>10} {'step ms':>7} {'gc ms':>6} "
                    f"{'own cpu':>7} {'gc cpu':>6} {'burst ms':>8} {'hit ratio':>9} "
                    f"{'errors':>6} {'gcs':>5} {'heap k':>6}"
                    "  load (1 min)"
                )
                for db, url in databases.items():
                    base = None
                    cases = {
                        name: region
                        for name, region in caches.items()
                        # nothing but free reads: no bound to show
                        if writes or name not in (CEILING, ELSEWHERE)
                    }
                    # the cases take turns, so that a change of the machine's
                    # load falls on all of them
                    every: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
                    for _ in range(args.repeat):
                        for name, region in cases.items():
                            every[name].append(
                                asyncio.run(_run_case(url, region, args.seconds, writes, gc_mode))
                            )
                    for name, runs in every.items():
                        rps = statistics.median(r["rps"] for r in runs)
                        cpu = statistics.median(r["cpu_ms"] for r in runs)
                        gap = statistics.median(r["gap_ms"] for r in runs)
                        p99 = statistics.median(r["gap_p99_ms"] for r in runs)
                        step = statistics.median(r["step_ms"] for r in runs)
                        own = statistics.median(r["own_cpu_ms"] for r in runs)
                        gc_cpu = statistics.median(r["gc_cpu_ms"] for r in runs)
                        gcp = statistics.median(r["gc_ms"] for r in runs)
                        burst = statistics.median(r["burst_ms"] for r in runs)
                        ratio = statistics.median(r["hit_ratio"] for r in runs)
                        errors = max(r["errors"] for r in runs)
                        gcs = statistics.median(r["collections"] for r in runs)
                        heap = statistics.median(r["tracked"] for r in runs) / 1000
                        if base is None:
                            base, base_cpu = rps, cpu
                        print(
                            f"{db:<10} {name:<10} {rps:>8.0f} {rps / base:>9.2f}x "
                            f"{cpu:>10.3f} {base_cpu / cpu:>4.2f}x "
                            f"{gap:>10.1f} {p99:>10.1f} {step:>7.1f} {gcp:>6.1f} {own:>7.1f}"
                            f" {gc_cpu:>6.1f} {burst:>8.1f} {ratio:>9.2f} {errors:>6.0f}"
                            f" {gcs:>5.0f} {heap:>6.0f}"
                            f"  {os.getloadavg()[0]:.1f}",
                            flush=True,
                        )
            print(f"load average after: {os.getloadavg()}")
    finally:
        for cleanup in reversed(cleanups):
            try:
                cleanup()
            except Exception as err:
                print(f"cleanup failed: {err}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
