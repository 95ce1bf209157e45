"""Row-level against table-level invalidation on a workload that writes.

10,000 items in 100 categories; skewed keys (Zipf, exponent 1.3 by default:
a few items and categories are asked for far more than the rest). 95% reads -- 70% of them one
item by primary key, 30% a category's list ordered by id -- and 5% single-row
ORM updates, half of which move the item to another category. A fresh session
per operation; the same seeded sequence for each runner:

* ``uncached``: the layer not installed;
* ``table``: ``cachelayer.invalidation = table``;
* ``row``: ``cachelayer.invalidation = row`` (the default);
* ``no-writes``: ``row`` on the same sequence with each write replaced by a
  read of the same item: the ceiling any invalidation can reach.

Each runner starts from the same database file (copied) and a cold cache,
runs a warm-up share of the sequence, then the measured part. Printed: hit
ratio (hits / cached reads), queries per second over the measured part, and
the ratio to uncached; and, as a check, that every runner ended with the same
data.

    python benchmarks/rows.py            # full run (~1 minute)
    python benchmarks/rows.py --quick    # smoke run, a few seconds
    python benchmarks/rows.py --backend sqla_cachelayer.memory
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import ForeignKey, String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import sqla_cachelayer as scl  # noqa: E402

ITEMS = 10_000
CATEGORIES = 100


class Base(DeclarativeBase):
    pass


class Category(Base):
    __tablename__ = "bench_category"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


class Item(Base):
    __tablename__ = "bench_item"
    id: Mapped[int] = mapped_column(primary_key=True)
    category_id: Mapped[int] = mapped_column(ForeignKey("bench_category.id"), index=True)
    name: Mapped[str] = mapped_column(String(40))
    price: Mapped[int]


def _zipf_sampler(n: int, s: float, rng: random.Random) -> Any:
    weights = [1.0 / (k**s) for k in range(1, n + 1)]
    cumulative = list(itertools.accumulate(weights))
    total = cumulative[-1]
    order = list(range(1, n + 1))
    rng.shuffle(order)  # hot keys spread over the id range

    def sample() -> int:
        return order[bisect.bisect_left(cumulative, rng.random() * total)]

    return sample


def build_sequence(
    operations: int, seed: int, writes: float = 0.05, skew: float = 1.1
) -> list[tuple[str, int, int]]:
    rng = random.Random(seed)
    item = _zipf_sampler(ITEMS, skew, rng)
    category = _zipf_sampler(CATEGORIES, skew, rng)
    ops: list[tuple[str, int, int]] = []
    for _ in range(operations):
        r = rng.random()
        if r < writes:
            if rng.random() < 0.5:
                ops.append(("move", item(), rng.randint(1, CATEGORIES)))
            else:
                ops.append(("price", item(), rng.randint(1, 1000)))
        elif r < writes + (1 - writes) * 0.70:
            ops.append(("get", item(), 0))
        else:
            ops.append(("list", category(), 0))
    return ops


def make_database(path: Path) -> None:
    engine = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(engine)
    with sessionmaker(engine)() as s:
        s.add_all(Category(id=c, name=f"c{c}") for c in range(1, CATEGORIES + 1))
        rng = random.Random(1)
        s.add_all(
            Item(
                id=i,
                category_id=rng.randint(1, CATEGORIES),
                name=f"item {i}",
                price=rng.randint(1, 1000),
            )
            for i in range(1, ITEMS + 1)
        )
        s.commit()
    engine.dispose()


def run(
    mode: str, db: Path, ops: list[tuple[str, int, int]], warm: int, backend: str
) -> dict[str, Any]:
    label = mode
    if mode == "no-writes":
        # the ceiling: the same sequence with every write replaced by a read of
        # the same item, through the row-level layer
        ops = [("get", a, 0) if kind in ("move", "price") else (kind, a, b) for kind, a, b in ops]
        mode = "row"
    engine = scl.engine_from_config({"sqlalchemy.url": f"sqlite:///{db}"})
    Session = sessionmaker(engine)
    layer = None
    if mode != "uncached":
        layer = scl.CacheLayer.from_settings(
            {
                "cachelayer.regions.default.backend": backend,
                "cachelayer.cache_all": "true",
                "cachelayer.invalidation": mode,
            }
        )
        layer.install(Session)
    by_id = select(Item).where(Item.id == 0).compile  # noqa: F841 (warms imports)

    def one(op: tuple[str, int, int]) -> None:
        kind, a, b = op
        with Session() as s:
            if kind == "get":
                s.scalars(select(Item).where(Item.id == a)).one_or_none()
            elif kind == "list":
                s.scalars(select(Item).where(Item.category_id == a).order_by(Item.id)).all()
            else:
                item = s.get(Item, a)
                if kind == "move":
                    item.category_id = b
                else:
                    item.price = b
                s.commit()

    for op in ops[:warm]:
        one(op)
    before = layer.stats() if layer is not None else None
    read_hits = reads = 0
    spent: dict[str, float] = {}
    started = time.perf_counter()
    for op in ops[warm:]:
        hits_before = layer.stats()["hits"] if layer is not None else 0
        t0 = time.perf_counter()
        one(op)
        spent[op[0]] = spent.get(op[0], 0.0) + time.perf_counter() - t0
        if op[0] in ("get", "list"):
            reads += 1
            if layer is not None:
                read_hits += layer.stats()["hits"] - hits_before
    elapsed = time.perf_counter() - started
    measured = len(ops) - warm
    result: dict[str, Any] = {"mode": label, "ops_per_s": measured / elapsed, "elapsed": elapsed}
    counts = {k: sum(1 for op in ops[warm:] if op[0] == k) for k in spent}
    result["mean_ms"] = {k: 1000 * spent[k] / counts[k] for k in spent}
    if layer is not None and before is not None:
        after = layer.stats()
        hits = after["hits"] - before["hits"]
        misses = after["misses"] - before["misses"]
        # hits over the workload's reads; and over every cached query, the
        # read that each write unit does first (session.get) included
        result["hit_ratio"] = read_hits / max(1, reads)
        result["all_queries_hit_ratio"] = hits / max(1, hits + misses)
    with Session() as s:
        rows = s.execute(
            select(Item.id, Item.category_id, Item.price)
            .order_by(Item.id)
            .execution_options(cache_region=None)
        ).all()
    result["digest"] = hash(tuple(map(tuple, rows)))
    engine.dispose()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--operations", type=int, default=60_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--backend", default="dogpile.cache.memory")
    parser.add_argument("--writes", type=float, default=0.05, help="share of operations")
    parser.add_argument("--skew", type=float, default=1.3, help="Zipf exponent of the keys")
    parser.add_argument(
        "--modes",
        default="uncached,table,row,no-writes",
        help="runners, comma-separated (no-writes: row-level on the sequence without its writes)",
    )
    args = parser.parse_args()
    operations = 6_000 if args.quick else args.operations
    warm = operations // 3
    ops = build_sequence(operations, args.seed, args.writes, args.skew)
    writes = sum(op[0] in ("move", "price") for op in ops)
    print(
        f"{operations} operations ({writes / operations:.1%} writes), warm-up {warm}, "
        f"Zipf exponent {args.skew}, backend {args.backend}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        seed_db = Path(tmp) / "seed.sqlite"
        make_database(seed_db)
        results = []
        for mode in args.modes.split(","):
            db = Path(tmp) / f"{mode}.sqlite"
            shutil.copy(seed_db, db)
            results.append(run(mode, db, ops, warm, args.backend))
    base = next((r["ops_per_s"] for r in results if r["mode"] == "uncached"), 0) or 1.0
    print(
        f"{'runner':<10} {'hit ratio':>10} {'(all)':>7} {'ops/s':>8} {'vs uncached':>12}"
        "   mean ms per op: get / list / price / move"
    )
    for r in results:
        ratio = f"{r['hit_ratio']:.1%}" if "hit_ratio" in r else "-"
        every = f"{r['all_queries_hit_ratio']:.1%}" if "hit_ratio" in r else "-"
        speed = r["ops_per_s"] / base
        means = " / ".join(
            f"{r['mean_ms'][k]:.2f}" if k in r["mean_ms"] else "-"
            for k in ("get", "list", "price", "move")
        )
        print(
            f"{r['mode']:<10} {ratio:>10} {every:>7} {r['ops_per_s']:>8,.0f} {speed:>11.2f}x"
            f"   {means}"
        )
    print(
        "hit ratio: hits over the workload's reads; (all): over every cached query, "
        "the session.get each write does first included"
    )
    same = len({r["digest"] for r in results if r["mode"] != "no-writes"}) == 1
    print(f"every runner with writes ended with the same data: {same}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
