"""What observability costs on the hit path: no listener, one listener, exporters.

One process, one SQLite file, one layer on a ``dogpile.cache.memory`` region.
For each variant, the median microseconds of a cache hit, each in a fresh
session, statement built inside the timed region; variants interleaved in
rounds so that drift hits them all alike::

    python benchmarks/observability.py            # ~1 min
    python benchmarks/observability.py --quick    # a few seconds

Variants: ``none`` (no listener), ``listener`` (one listener that does
nothing), ``prometheus`` (the Prometheus exporter: its listener feeds two
histograms), ``verify 0.01`` (the staleness verifier sampling 1% of hits).

Queries: (a) one row by primary key, (b) 100 entity rows.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from dogpile.cache import make_region
from sqlalchemy import String, create_engine, insert, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import sqla_cachelayer as scl


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "item"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))
    price: Mapped[int]
    category: Mapped[int] = mapped_column(index=True)


def _noop(event: Any) -> None:
    pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    calls = 300 if args.quick else 2000
    rounds = 2 if args.quick else args.rounds

    folder = tempfile.mkdtemp()
    engine = create_engine(f"sqlite:///{folder}/bench.db")
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(Item),
            [
                {"id": i, "name": f"item {i}", "price": i % 97, "category": i % 10}
                for i in range(1, 1001)
            ],
        )
    layer = scl.CacheLayer({"default": make_region().configure("dogpile.cache.memory")})
    Session = layer.install(sessionmaker(engine))

    def one_row() -> None:
        with Session() as s:
            s.scalars(select(Item).where(Item.id == 7).options(scl.FromCache())).all()

    def hundred_rows() -> None:
        with Session() as s:
            s.scalars(
                select(Item)
                .where(Item.id >= 100)
                .order_by(Item.id)
                .limit(100)
                .options(scl.FromCache())
            ).all()

    queries: dict[str, Callable[[], None]] = {"(a) 1 row": one_row, "(b) 100 rows": hundred_rows}
    for run in queries.values():
        run()  # fill

    from prometheus_client import CollectorRegistry

    from sqla_cachelayer.metrics.prometheus import PrometheusExporter
    from sqla_cachelayer.verify import Verifier

    registry = CollectorRegistry()
    exporter = PrometheusExporter(layer, registry=registry)
    exporter.close()

    def set_variant(name: str) -> None:
        layer._listeners = ()
        layer._verifier = None
        if name == "listener":
            layer.add_listener(_noop)
        elif name == "prometheus":
            layer.add_listener(exporter.listener)
        elif name == "verify 0.01":
            layer._verifier = verifier

    verifier = Verifier(layer, 0.01)
    variants = ["none", "listener", "prometheus", "verify 0.01"]
    samples: dict[tuple[str, str], list[float]] = {(q, v): [] for q in queries for v in variants}
    load_before = os.getloadavg()
    for _ in range(rounds):
        for qname, run in queries.items():
            for variant in variants:
                set_variant(variant)
                for _ in range(50):
                    run()
                gc.collect()
                out = samples[(qname, variant)]
                for _ in range(calls):
                    t0 = time.perf_counter_ns()
                    run()
                    out.append((time.perf_counter_ns() - t0) / 1000)
    set_variant("none")
    verifier.wait_idle(30)

    print(f"Python {sys.version.split()[0]}, {calls} calls x {rounds} rounds per variant")
    print(f"load average before: {load_before}")
    for qname in queries:
        base = statistics.median(samples[(qname, "none")])
        print(f"{qname}")
        for variant in variants:
            median = statistics.median(samples[(qname, variant)])
            print(f"  {variant:<12} {median:8.1f} us  {100 * (median / base - 1):+5.1f}%")
    print(f"load average after: {os.getloadavg()}")
    stats = layer.stats()
    print(f"verified {stats['verified']}, stale {stats['verified_stale']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
