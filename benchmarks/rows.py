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

Beside the runners, two hit ratios are computed on the same sequence without
a database (:func:`simulate`):

* ``oracle``: a result is invalidated only when a write changes a row it
  contains or could contain (the item itself; the lists of its old and new
  category), value by value: the best any correct row-level cache can do on
  this workload;
* ``row, simulated``: the same with the value stamps of
  ``sqla_cachelayer.rows`` (values sharing a bucket invalidate each other).
  Its gap to the oracle is what bucket sharing costs; the gap between it and
  the measured ``row`` is everything else (fallbacks to the whole table,
  stamps dropped or recreated, entries refused).

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
from collections.abc import Callable
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


def initial_items() -> list[tuple[int, int, int]]:
    """(id, category_id, price) of every item the database starts with."""
    rng = random.Random(1)
    return [(i, rng.randint(1, CATEGORIES), rng.randint(1, 1000)) for i in range(1, ITEMS + 1)]


def make_database(path: Path) -> None:
    engine = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(engine)
    with sessionmaker(engine)() as s:
        s.add_all(Category(id=c, name=f"c{c}") for c in range(1, CATEGORIES + 1))
        s.add_all(
            Item(id=i, category_id=c, name=f"item {i}", price=p) for i, c, p in initial_items()
        )
        s.commit()
    engine.dispose()


def simulate(ops: list[tuple[str, int, int]], warm: int, stamp: Callable[[str, int], Any]) -> float:
    """The read hit ratio of a cache on ``ops`` (measured after ``warm``) whose
    results of one item (``stamp("id", id)``) or one category's list
    (``stamp("category_id", category)``) are invalidated when a write moves
    their stamp; a write moves the stamps of its item and of every category
    the item was or is in, if it changes the row (an update to the value the
    row already has issues no UPDATE, as the ORM does)."""
    category = {i: c for i, c, _p in initial_items()}
    price = {i: p for i, _c, p in initial_items()}
    valid: set[tuple[str, int]] = set()
    by_stamp: dict[Any, set[tuple[str, int]]] = {}
    hits = reads = 0

    def read(entry: tuple[str, int], name: Any) -> bool:
        if entry in valid:
            return True
        valid.add(entry)
        by_stamp.setdefault(name, set()).add(entry)
        return False

    for n, (kind, a, b) in enumerate(ops):
        if kind in ("get", "list"):
            column = "id" if kind == "get" else "category_id"
            hit = read((kind, a), stamp(column, a))
            if n >= warm:
                reads += 1
                hits += hit
            continue
        read(("session.get", a), stamp("id", a))  # the write's own read, not counted
        moved = [stamp("id", a), stamp("category_id", category[a])]
        if kind == "move":
            if b == category[a]:
                continue
            category[a] = b
            moved.append(stamp("category_id", b))
        else:
            if b == price[a]:
                continue
            price[a] = b
        for name in moved:
            valid.difference_update(by_stamp.pop(name, ()))
    return hits / max(1, reads)


def _exact(column: str, value: int) -> Any:
    return (column, value)


def _as_row_level(column: str, value: int) -> Any:
    from sqla_cachelayer.rows import value_name

    return value_name(Item.__tablename__, column, f"i{value}")


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
    results.insert(
        0, {"mode": "oracle", "hit_ratio": simulate(ops, warm, _exact), "computed": True}
    )
    simulated = simulate(ops, warm, _as_row_level)
    base = next((r["ops_per_s"] for r in results if r["mode"] == "uncached"), None)
    print(
        f"{'runner':<10} {'hit ratio':>10} {'(all)':>7} {'ops/s':>8} {'vs uncached':>12}"
        "   mean ms per op: get / list / price / move"
    )
    for r in results:
        if r.get("computed"):
            print(
                f"{r['mode']:<10} {r['hit_ratio']:>10.1%}   (computed on the sequence, no database)"
            )
            continue
        ratio = f"{r['hit_ratio']:.1%}" if "hit_ratio" in r else "-"
        every = f"{r['all_queries_hit_ratio']:.1%}" if "all_queries_hit_ratio" in r else "-"
        speed = f"{r['ops_per_s'] / base:.2f}x" if base else "-"
        means = " / ".join(
            f"{r['mean_ms'][k]:.2f}" if k in r["mean_ms"] else "-"
            for k in ("get", "list", "price", "move")
        )
        print(
            f"{r['mode']:<10} {ratio:>10} {every:>7} {r['ops_per_s']:>8,.0f} {speed:>12}   {means}"
        )
    print(
        "hit ratio: hits over the workload's reads; (all): over every cached query, "
        "the session.get each write does first included"
    )
    oracle = results[0]["hit_ratio"]
    row = next((r["hit_ratio"] for r in results if r["mode"] == "row"), None)
    if row is not None:
        print(
            f"row loses {100 * (oracle - row):.2f} points to the oracle: "
            f"{100 * (oracle - simulated):.2f} to values sharing a bucket (row simulated with "
            f"its value stamps: {simulated:.2%}), {100 * (simulated - row):.2f} to the rest"
        )
    same = len({r["digest"] for r in results if "digest" in r and r["mode"] != "no-writes"}) == 1
    print(f"every runner with writes ended with the same data: {same}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
