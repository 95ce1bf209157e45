"""Memory soak: a process's memory stays bounded however long it runs.

One process, one SQLite file in a temporary directory, one layer on a
``sqla_cachelayer.memory`` region (``max_entries``, default 10,000). It runs
``--queries`` distinct queries (default 1,000,000: ``select(Item.id).where(Item.id
== n)`` for a new ``n`` each time, so every one is a miss that stores an entry
and a row stamp), and creates and drops ``--engines`` engines (default 10,000),
each with a ``Session`` installed on it by instance, used for one cached query
and dropped. The first ``--warmup`` share of the work fills every bounded
structure; the figures compare the end with the end of the warm-up::

    python benchmarks/soak.py                       # the full run (a few minutes)
    python benchmarks/soak.py --queries 100000 --engines 1000   # a quick one
    python benchmarks/soak.py --max-bytes 16MiB     # the region also bounded in bytes

It prints the resident set size (``/proc/self/statm``) every tenth of the
run; with ``--tracemalloc``, the growth of the Python heap traced between 85%
and 100% of the run (tracing starts at 70%, so that every object alive at both
points was allocated under tracing: the cache's entries turn over in between;
tracing's own bookkeeping then adds to the RSS, so the RSS verdict is only
meaningful without it), the engines and sessions still alive
(weak references) and the sizes of the layer's internal maps, and exits 1 if
the RSS grew by more than ``--max-growth-mib`` (default 16) after warm-up or an
engine or session outlived its use.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import tempfile
import time
import tracemalloc
import weakref
from typing import Any

import sqlalchemy
from dogpile.cache import make_region
from sqlalchemy import Integer, String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import sqla_cachelayer as scl
from sqla_cachelayer import rows


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "item"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def maps(layer: scl.CacheLayer) -> dict[str, int]:
    backend = layer.regions["default"].backend
    return {
        "entries": len(backend),
        "counters": backend.stats()["counters"],
        "installed": len(layer._installed),
        "engines": len(layer._engines),
        "shapes": len(layer._shapes),
        "decoded": backend.stats()["decoded"],
        "counter_bytes": backend.stats()["counter_bytes"],
        "counted_bytes": backend.stats()["bytes"],
        "row_buckets": len(rows._buckets),
        "row_names": len(rows._names),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=1_000_000)
    parser.add_argument("--engines", type=int, default=10_000)
    parser.add_argument("--max-entries", type=int, default=10_000)
    parser.add_argument(
        "--max-bytes", help="also bound the region in bytes (e.g. 16MiB): entries, counters, memo"
    )
    parser.add_argument("--warmup", type=float, default=0.2, help="share of the work (0-1)")
    parser.add_argument("--max-growth-mib", type=float, default=16.0)
    parser.add_argument("--tracemalloc", action="store_true")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="scl-soak-")
    url = f"sqlite:///{tmp}/soak.db"
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([Item(id=i, name=f"item{i}") for i in range(1, 1001)])
        s.commit()
    arguments: dict[str, Any] = {"max_entries": args.max_entries}
    if args.max_bytes:
        arguments["max_bytes"] = args.max_bytes
    region = make_region().configure("sqla_cachelayer.memory", arguments=arguments)
    layer = scl.CacheLayer({"default": region})
    factory = layer.install(sessionmaker(engine))
    hint = scl.FromCache()

    steps = 100
    per_step_q = max(1, args.queries // steps)
    per_step_e = max(0, args.engines // steps)
    warm_steps = max(1, int(steps * args.warmup))
    trace_from, heap_at = 70, 85  # steps: tracing starts, first heap reading
    alive_engines: list[weakref.ref[Any]] = []
    alive_sessions: list[weakref.ref[Any]] = []
    n = 0
    start = time.perf_counter()
    rss_warm = heap_warm = 0.0
    print(f"SQLAlchemy {sqlalchemy.__version__}, Python {sys.version.split()[0]}")
    print(
        f"queries {args.queries:,}, engines {args.engines:,}, max_entries {args.max_entries:,}"
        f", max_bytes {args.max_bytes or 'none'}"
    )
    for step in range(steps):
        with factory() as s:
            for _ in range(per_step_q):
                n += 1
                s.scalars(select(Item.id).where(Item.id == n).options(hint)).all()
        for _ in range(per_step_e):
            e = create_engine(url)
            sess = layer.install(Session(e))
            sess.scalars(select(Item.name).where(Item.id == 1).options(hint)).all()
            sess.close()
            alive_engines.append(weakref.ref(e))
            alive_sessions.append(weakref.ref(sess))
            e.dispose()
            del e, sess
        if (step + 1) % 10 == 0:
            print(f"  {step + 1:3d}%: {n:,} queries, RSS {rss_mib():.1f} MiB", flush=True)
        if step + 1 == warm_steps:
            gc.collect()
            rss_warm = rss_mib()
            print(f"after warm-up ({n:,} queries): RSS {rss_warm:.1f} MiB, maps {maps(layer)}")
        if step + 1 == trace_from and args.tracemalloc:
            tracemalloc.start()
        if step + 1 == heap_at and tracemalloc.is_tracing():
            gc.collect()
            heap_warm = tracemalloc.get_traced_memory()[0] / 2**20
    gc.collect()
    rss_end = rss_mib()
    heap_end = tracemalloc.get_traced_memory()[0] / 2**20 if tracemalloc.is_tracing() else 0.0
    elapsed = time.perf_counter() - start
    engines_alive = sum(r() is not None for r in alive_engines)
    sessions_alive = sum(r() is not None for r in alive_sessions)
    growth = rss_end - rss_warm
    print(f"end ({n:,} queries, {len(alive_engines):,} engines): RSS {rss_end:.1f} MiB")
    print(f"maps at the end: {maps(layer)}")
    print(f"RSS growth after warm-up: {growth:+.1f} MiB (bound {args.max_growth_mib} MiB)")
    if tracemalloc.is_tracing():
        heap = heap_end - heap_warm
        print(f"Python heap growth from 85% to 100% of the run (tracemalloc): {heap:+.2f} MiB")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS (ru_maxrss): {peak:.1f} MiB")
    print(f"engines alive {engines_alive}, sessions alive {sessions_alive}")
    print(f"stats {layer.stats()}")
    print(f"{elapsed:.0f} s, {n / elapsed:,.0f} queries/s, load {os.getloadavg()}")
    ok = growth <= args.max_growth_mib and engines_alive == 0 and sessions_alive == 0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
