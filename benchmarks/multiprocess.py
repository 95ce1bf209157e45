"""Cache hits shared by several processes: Redis and the SQLite-file backend.

Each worker process runs a product-page query (one row by primary key out of
1,000 hot keys, a fresh session per query, ``FromCache()``) and times every
query; the figures are medians and tails over all processes, and the aggregate
throughput of the measured phase. The cache is warmed first, so the measured
phase is (nearly) all hits: the hit ratio printed comes from ``layer.stats()``
summed over the workers. A last line runs a mixed workload (5% of operations
commit a price change, which invalidates the table) through each shared
backend.

    python benchmarks/multiprocess.py                 # full run, about 2 minutes
    python benchmarks/multiprocess.py --quick         # smoke run, a few seconds
    python benchmarks/multiprocess.py --processes 8 --pg-url postgresql+psycopg://...

Redis and PostgreSQL are started privately for the run (``tests/_servers.py``)
unless ``--redis-url`` / ``--pg-url`` (or ``SCL_TEST_REDIS_URL`` /
``SCL_TEST_PG_URL``) name servers of your own; a server that cannot be started
is skipped with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import platform
import queue
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy
from _run_servers import postgres_for_run, redis_for_run
from sqlalchemy import ForeignKey, String, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

HOT_KEYS = 1000


class Base(DeclarativeBase):
    pass


class Category(Base):
    __tablename__ = "mp_category"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class Product(Base):
    __tablename__ = "mp_product"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80))
    price_cents: Mapped[int]
    category_id: Mapped[int] = mapped_column(ForeignKey("mp_category.id"))


def build(db_url: str) -> None:
    import sqla_cachelayer as scl

    engine = scl.engine_from_config({"sqlalchemy.url": db_url})
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with sessionmaker(engine)() as s:
        s.add_all([Category(id=i, name=f"category {i}") for i in range(1, 21)])
        s.add_all(
            [
                Product(id=i, name=f"product {i}", price_cents=100 + i, category_id=1 + i % 20)
                for i in range(1, HOT_KEYS + 1)
            ]
        )
        s.commit()
    engine.dispose()


def worker(
    db_url: str,
    cache: dict[str, str] | None,
    queries: int,
    write_share: float,
    seed: int,
    barrier: Any,
    out: Any,
) -> None:
    import sqla_cachelayer as scl
    from sqla_cachelayer import FromCache

    engine = scl.engine_from_config({"sqlalchemy.url": db_url})
    layer = scl.CacheLayer.from_settings(cache) if cache is not None else None
    Session = sessionmaker(engine)
    if layer is not None:
        layer.install(Session)
    hint = (FromCache(),) if layer is not None else ()
    rng = random.Random(seed)

    def page(pid: int) -> Any:
        with Session() as s:
            return s.scalars(select(Product).where(Product.id == pid).options(*hint)).one()

    for pid in range(1, HOT_KEYS + 1):  # warm the cache (and the connections)
        page(pid)
    before = layer.stats() if layer is not None else {}
    barrier.wait()
    latencies: list[int] = []
    started = time.perf_counter()
    writes = 0
    for _ in range(queries):
        pid = rng.randint(1, HOT_KEYS)
        if write_share and rng.random() < write_share:
            with Session() as s:
                s.execute(
                    update(Product)
                    .where(Product.id == pid)
                    .values(price_cents=rng.randint(1, 10**6))
                )
                s.commit()
            writes += 1
            continue
        t = time.perf_counter_ns()
        page(pid)
        latencies.append(time.perf_counter_ns() - t)
    elapsed = time.perf_counter() - started
    after = layer.stats() if layer is not None else {}
    delta = {k: after[k] - before.get(k, 0) for k in after}
    out.put((latencies, elapsed, writes, delta))
    engine.dispose()


def run(
    label: str,
    db_url: str,
    cache: dict[str, str] | None,
    processes: int,
    queries: int,
    write_share: float = 0.0,
) -> dict[str, Any]:
    build(db_url)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=worker, args=(db_url, cache, queries, write_share, i, barrier, out))
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    reports: list[Any] = []
    while len(reports) < processes:
        try:
            reports.append(out.get(timeout=2))
        except queue.Empty:
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if failed:
                for p in procs:
                    p.kill()
                raise RuntimeError(
                    f"{label}: a worker process failed (exit codes {failed})"
                ) from None
    for p in procs:
        p.join(60)
    latencies = sorted(x for r in reports for x in r[0])
    elapsed = max(r[1] for r in reports)
    ops = sum(len(r[0]) + r[2] for r in reports)
    stats: dict[str, int] = {}
    for r in reports:
        for k, v in r[3].items():
            stats[k] = stats.get(k, 0) + v

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] / 1000

    looked = stats.get("hits", 0) + stats.get("misses", 0)
    return {
        "label": label,
        "median": statistics.median(latencies) / 1000,
        "p95": pct(0.95),
        "p99": pct(0.99),
        "qps": ops / elapsed,
        "hit_ratio": (stats.get("hits", 0) / looked) if looked else None,
        "errors": stats.get("errors", 0),
        "writes": sum(r[2] for r in reports),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument(
        "--queries", type=int, default=0, help="per process (default 4000; 400 with --quick)"
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--redis-url")
    parser.add_argument("--pg-url")
    args = parser.parse_args(argv)
    queries = args.queries or (400 if args.quick else 4000)
    cleanups: list[Any] = []
    tmp = Path(tempfile.mkdtemp(prefix="scl-mp-"))
    sqlite_url = f"sqlite:///{tmp / 'data.sqlite'}"
    print(
        f"python {platform.python_version()}, sqlalchemy {sqlalchemy.__version__}, "
        f"nproc {os.cpu_count()}, {args.processes} processes x {queries} queries, "
        f"{HOT_KEYS} hot keys, fresh session per query"
    )
    try:
        redis_url, _ = redis_for_run(args.redis_url, cleanups)
        pg_url, _ = postgres_for_run(args.pg_url, cleanups)
        n = 0

        def redis_cache() -> dict[str, str]:
            nonlocal n
            n += 1
            assert redis_url is not None
            base = redis_url.rsplit("/", 1)[0]
            return {
                "cachelayer.regions.default.backend": "dogpile.cache.redis",
                "cachelayer.regions.default.arguments.url": f"{base}/{n % 16}",
                "cachelayer.regions.default.arguments.distributed_lock": "true",
                "cachelayer.namespace": f"mp{n}",
            }

        def file_cache() -> dict[str, str]:
            nonlocal n
            n += 1
            return {
                "cachelayer.regions.default.backend": "sqla_cachelayer.sqlite",
                "cachelayer.regions.default.arguments.path": str(tmp / f"cache{n}.sqlite"),
            }

        memory = {"cachelayer.regions.default.backend": "sqla_cachelayer.memory"}
        rows = [run("uncached, SQLite file", sqlite_url, None, args.processes, queries)]
        if pg_url:
            rows.append(run("uncached, PostgreSQL", pg_url, None, args.processes, queries))
        if redis_url:
            rows.append(
                run("hits via Redis, SQLite db", sqlite_url, redis_cache(), args.processes, queries)
            )
            if pg_url:
                rows.append(
                    run(
                        "hits via Redis, PostgreSQL db",
                        pg_url,
                        redis_cache(),
                        args.processes,
                        queries,
                    )
                )
        rows.append(
            run(
                "hits via SQLite-file cache, SQLite db",
                sqlite_url,
                file_cache(),
                args.processes,
                queries,
            )
        )
        if pg_url:
            rows.append(
                run(
                    "hits via SQLite-file cache, PostgreSQL db",
                    pg_url,
                    file_cache(),
                    args.processes,
                    queries,
                )
            )
        rows.append(
            run(
                "hits via sqla_cachelayer.memory (per process)",
                sqlite_url,
                memory,
                args.processes,
                queries,
            )
        )
        mixed = []
        if redis_url:
            mixed.append(
                run(
                    "mixed 5% writes, Redis",
                    sqlite_url,
                    redis_cache(),
                    args.processes,
                    queries,
                    0.05,
                )
            )
        mixed.append(
            run(
                "mixed 5% writes, SQLite-file cache",
                sqlite_url,
                file_cache(),
                args.processes,
                queries,
                0.05,
            )
        )
    finally:
        for cleanup in reversed(cleanups):
            with contextlib.suppress(Exception):
                cleanup()

    width = max(len(r["label"]) for r in rows + mixed) + 2
    print()
    print(
        f"{'variant':<{width}} {'median us':>10} {'p95 us':>9} {'p99 us':>9} "
        f"{'queries/s':>10} {'hit ratio':>9} {'errors':>6}"
    )
    for r in rows + mixed:
        ratio = f"{r['hit_ratio']:.1%}" if r["hit_ratio"] is not None else "-"
        print(
            f"{r['label']:<{width}} {r['median']:>10.1f} {r['p95']:>9.1f} {r['p99']:>9.1f} "
            f"{r['qps']:>10,.0f} {ratio:>9} {r['errors']:>6}"
        )
    print("\nmixed rows: queries/s counts reads and writes; latency columns are reads only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
