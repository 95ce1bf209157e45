"""Query-cache benchmark: uncached vs this layer's hit and miss vs the recipe.

One run, one process, one SQLite file in a temporary directory. For each query
it prints the median microseconds per query (``time.perf_counter_ns``, warm-up
first, variants interleaved in rounds so that drift hits them all alike), each
query in a fresh session (``with Session() as s:``), statement built inside the
timed region as an application would::

    python benchmarks/query_cache.py             # full run (~1 min)
    python benchmarks/query_cache.py --quick     # smoke run (a few seconds)
    python benchmarks/query_cache.py --profile b-hit [--variant layer]
    python benchmarks/query_cache.py --plots docs/img   # also draw the distributions (SVG)

Queries:

(a)   ``select(Item).where(Item.id == x)``, one row by primary key
(a')  ``session.get(Item, x)``, the same load through ``Session.get``
(b)   ``select(Item).where(Item.id >= k).order_by(Item.id).limit(100)``, 100 entities
(c)   revenue per category over the 200k-row ``sale`` table (join, group by)

Variants (each on an engine of its own, all on the same file):

uncached  a plain ``sessionmaker``, no layer installed anywhere on its engine
layer     ``CacheLayer({"default": make_region().configure("dogpile.cache.memory")})``
layer/scl the layer on the project's ``sqla_cachelayer.memory`` backend
layer/bytes the same backend with ``max_bytes`` (results stored pickled, decoded once)
recipe    SQLAlchemy's dogpile_caching example (``benchmarks/recipe.py``), memory region

Modes: *hit* (the key is in the cache), *miss* (a bound value never asked
before, statement shape already known), *cold* (a statement shape never seen,
compared with the uncached query of a never-seen shape), *pass* (the layer
installed, the query without a hint: the hook's overhead on uncached queries).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import functools
import gc
import itertools
import os
import platform
import pstats
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import dogpile
import sqlalchemy
from dogpile.cache import make_region
from sqlalchemy import (
    DateTime,
    ForeignKey,
    Integer,
    String,
    bindparam,
    create_engine,
    func,
    insert,
    literal_column,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import recipe

import sqla_cachelayer as scl

try:
    import sqla_cachelayer.backends  # registers sqla_cachelayer.memory

    make_region().configure("sqla_cachelayer.memory")
    HAVE_SCL_MEMORY = True
except Exception:  # pragma: no cover - backend not available
    HAVE_SCL_MEMORY = False


# --------------------------------------------------------------------------
# schema


class Base(DeclarativeBase):
    pass


class Category(Base):
    __tablename__ = "category"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class Item(Base):
    __tablename__ = "item"

    id: Mapped[int] = mapped_column(primary_key=True)
    sku: Mapped[str] = mapped_column(String(20), unique=True)
    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str] = mapped_column(String(400))
    price_cents: Mapped[int] = mapped_column(Integer)
    stock: Mapped[int] = mapped_column(Integer)
    category_id: Mapped[int] = mapped_column(ForeignKey("category.id"), index=True)
    created_at: Mapped[datetime.datetime] = mapped_column(DateTime)


class Sale(Base):
    __tablename__ = "sale"

    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("item.id"), index=True)
    quantity: Mapped[int] = mapped_column(Integer)
    amount_cents: Mapped[int] = mapped_column(Integer)
    sold_at: Mapped[datetime.datetime] = mapped_column(DateTime)


N_CATEGORIES = 20


def build_database(path: str, n_items: int, n_sales: int) -> float:
    """Create and fill the file; returns seconds taken."""
    t0 = time.perf_counter()
    engine = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(engine)
    rnd = random.Random(42)
    base_time = datetime.datetime(2024, 1, 1)
    with engine.begin() as conn:
        conn.execute(
            insert(Category),
            [{"id": i, "name": f"category {i}"} for i in range(1, N_CATEGORIES + 1)],
        )
        conn.execute(
            insert(Item),
            [
                {
                    "id": i,
                    "sku": f"SKU-{i:07d}",
                    "name": f"item number {i}",
                    "description": "a fairly ordinary item, " * rnd.randint(1, 6),
                    "price_cents": rnd.randint(100, 100_000),
                    "stock": rnd.randint(0, 500),
                    "category_id": rnd.randint(1, N_CATEGORIES),
                    "created_at": base_time + datetime.timedelta(minutes=i),
                }
                for i in range(1, n_items + 1)
            ],
        )
        conn.execute(
            insert(Sale),
            [
                {
                    "item_id": rnd.randint(1, n_items),
                    "quantity": rnd.randint(1, 10),
                    "amount_cents": rnd.randint(100, 1_000_000),
                    "sold_at": base_time + datetime.timedelta(seconds=i * 7),
                }
                for i in range(n_sales)
            ],
        )
    with engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE")
    engine.dispose()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------
# variants


@dataclass
class Variant:
    name: str
    label: str
    Session: Any
    option: Callable[[], Any] | None  # makes the per-query hint; None: no hint
    engine: Any
    layer: Any = None


def make_variants(path: str) -> dict[str, Variant]:
    url = f"sqlite:///{path}"
    variants: dict[str, Variant] = {}

    engine = create_engine(url)
    variants["uncached"] = Variant("uncached", "uncached", sessionmaker(engine), None, engine)

    engine = create_engine(url)
    layer = scl.CacheLayer({"default": make_region().configure("dogpile.cache.memory")})
    Session = layer.install(sessionmaker(engine))
    variants["layer"] = Variant(
        "layer", "layer [dogpile.cache.memory]", Session, scl.FromCache, engine, layer
    )
    variants["pass"] = Variant("pass", "layer installed, no hint", Session, None, engine, layer)

    if HAVE_SCL_MEMORY:
        engine = create_engine(url)
        region = make_region().configure(
            "sqla_cachelayer.memory", arguments={"max_entries": 200_000}
        )
        layer = scl.CacheLayer({"default": region})
        Session = layer.install(sessionmaker(engine))
        variants["layer-scl"] = Variant(
            "layer-scl", "layer [sqla_cachelayer.memory]", Session, scl.FromCache, engine, layer
        )
        engine = create_engine(url)
        region = make_region().configure(
            "sqla_cachelayer.memory", arguments={"max_entries": 200_000, "max_bytes": "512MiB"}
        )
        layer = scl.CacheLayer({"default": region})
        Session = layer.install(sessionmaker(engine))
        variants["layer-bytes"] = Variant(
            "layer-bytes",
            "layer [scl.memory, max_bytes]",
            Session,
            scl.FromCache,
            engine,
            layer,
        )

    engine = create_engine(url)
    cache = recipe.ORMCache({"default": make_region().configure("dogpile.cache.memory")})
    Session = sessionmaker(engine)
    cache.listen_on_session(Session)
    variants["recipe"] = Variant(
        "recipe", "recipe [dogpile.cache.memory]", Session, recipe.FromCache, engine
    )
    return variants


# --------------------------------------------------------------------------
# queries: each takes (variant, value, shape) and runs one query in a fresh session
# shape is None for the usual statement, or an int making a never-seen shape


def _opts(v: Variant) -> tuple[Any, ...]:
    return (v.option(),) if v.option is not None else ()


def _shape(stmt: Any, shape: int | None) -> Any:
    if shape is None:
        return stmt
    # a literal (not a bound value) changes the statement's structure: a new
    # compilation for SQLAlchemy, a new structure digest for the layer
    return stmt.where(Item.stock > literal_column(str(-1 - shape)))


def q_a(v: Variant, x: int, shape: int | None = None) -> Any:
    with v.Session() as s:
        return s.scalars(_shape(select(Item).where(Item.id == x), shape).options(*_opts(v))).one()


def q_a_get(v: Variant, x: int, shape: int | None = None) -> Any:
    with v.Session() as s:
        return s.get(Item, x, options=_opts(v))


_prebuilt: dict[str, Any] = {}


def q_a_pre(v: Variant, x: int, shape: int | None = None) -> Any:
    stmt = _prebuilt.get(v.name)
    if stmt is None:
        # built once, values given at execute time: SQLAlchemy memoizes the
        # statement's cache key on the object, for the layer and the database alike
        stmt = _prebuilt[v.name] = select(Item).where(Item.id == bindparam("id")).options(*_opts(v))
    with v.Session() as s:
        return s.scalars(stmt, {"id": x}).one()


def q_b(v: Variant, k: int, shape: int | None = None) -> Any:
    with v.Session() as s:
        stmt = select(Item).where(Item.id >= k).order_by(Item.id).limit(100)
        return s.scalars(_shape(stmt, shape).options(*_opts(v))).all()


def q_c(v: Variant, q: int, shape: int | None = None) -> Any:
    with v.Session() as s:
        stmt = (
            select(
                Item.category_id,
                func.count(Sale.id),
                func.sum(Sale.quantity),
                func.sum(Sale.amount_cents),
            )
            .join(Sale, Sale.item_id == Item.id)
            .where(Sale.quantity > q)
            .group_by(Item.category_id)
            .order_by(Item.category_id)
        )
        return s.execute(stmt.options(*_opts(v))).all()


def plain(value: Any) -> Any:
    """A comparable form of a query's result."""
    if isinstance(value, list):
        return [plain(x) for x in value]
    if isinstance(value, Item):
        return (
            value.id,
            value.sku,
            value.name,
            value.description,
            value.price_cents,
            value.stock,
            value.category_id,
            value.created_at,
        )
    if hasattr(value, "_mapping"):
        return tuple(value)
    return value


# --------------------------------------------------------------------------
# cases


@dataclass
class Case:
    key: str
    title: str
    run: Callable[..., Any]
    hit_values: list[int]  # warmed, then cycled for hits
    miss_values: Callable[[], Iterable[int]]  # an endless supply of never-asked values
    warm_values: Callable[[], Iterable[int]]  # values used by warm-up misses only
    reps: dict[str, int]  # mode -> repetitions
    cold: bool = True


@dataclass
class Result:
    samples: dict[tuple[str, str], list[int]] = field(default_factory=dict)

    def add(self, variant: str, mode: str, ns: list[int]) -> None:
        self.samples.setdefault((variant, mode), []).extend(ns)

    def median_us(self, variant: str, mode: str) -> float | None:
        found = self.samples.get((variant, mode))
        return statistics.median(found) / 1000 if found else None


_shapes = itertools.count(1)


def time_calls(fn: Callable[[Any], Any], values: Iterable[Any]) -> list[int]:
    clock = time.perf_counter_ns
    out = []
    for value in values:
        t0 = clock()
        fn(value)
        out.append(clock() - t0)
    return out


def plan_cases(quick: bool, n_items: int) -> list[Case]:
    scale = 0.1 if quick else 1.0

    def r(n: int, least: int = 3) -> int:
        return max(least, int(n * scale))

    def counter(start: int) -> Callable[[], Iterable[int]]:
        return lambda: itertools.count(start)

    return [
        Case(
            "a",
            "(a) one row by primary key: select(Item).where(Item.id == x)",
            q_a,
            hit_values=list(range(n_items // 2, n_items // 2 + 50)),
            miss_values=counter(1),
            warm_values=counter(n_items * 3 // 4),
            reps={
                "hit": r(3000),
                "miss": r(2000),
                "cold": r(400),
                "uncached": r(3000),
                "pass": r(1500),
            },
        ),
        Case(
            "a-get",
            "(a') one row by primary key: session.get(Item, x)",
            q_a_get,
            hit_values=list(range(n_items // 2, n_items // 2 + 50)),
            miss_values=counter(1),
            warm_values=counter(n_items * 3 // 4),
            reps={"hit": r(3000), "miss": r(2000), "uncached": r(3000), "pass": r(1500)},
            cold=False,
        ),
        Case(
            "a-pre",
            "(a'') one row by primary key, statement built once, id given at execute time",
            q_a_pre,
            hit_values=list(range(n_items // 2, n_items // 2 + 50)),
            miss_values=counter(1),
            warm_values=counter(n_items * 3 // 4),
            reps={"hit": r(3000), "miss": r(2000), "uncached": r(3000), "pass": r(1500)},
            cold=False,
        ),
        Case(
            "b",
            "(b) 100 entity rows: select(Item).where(Item.id >= k).order_by(Item.id).limit(100)",
            q_b,
            hit_values=list(range(n_items // 2, n_items // 2 + 10)),
            miss_values=counter(1),
            warm_values=counter(n_items * 3 // 4),
            reps={
                "hit": r(1500),
                "miss": r(800),
                "cold": r(300),
                "uncached": r(1000),
                "pass": r(600),
            },
        ),
        Case(
            "c",
            "(c) aggregate over the sale table: revenue per category (join, group by)",
            q_c,
            hit_values=[0],
            # quantity is 1..10: every negative threshold reads every row
            miss_values=lambda: itertools.count(-1, -1),
            warm_values=lambda: itertools.count(-100_000, -1),
            reps={
                "hit": r(2000, 30),
                "miss": 9 if not quick else 2,
                "uncached": 9 if not quick else 2,
            },
            cold=False,
        ),
    ]


def run_case(case: Case, variants: dict[str, Variant], result: Result, rounds: int) -> None:
    cached = [n for n in ("layer", "layer-scl", "layer-bytes", "recipe") if n in variants]
    hits = itertools.cycle(case.hit_values)
    miss_supply = {name: iter(case.miss_values()) for name in cached}
    warm_supply = {name: iter(case.warm_values()) for name in cached}
    uncached_supply = iter(case.miss_values())

    # correctness first: every cached variant answers as the database does
    expected = {x: plain(case.run(variants["uncached"], x)) for x in case.hit_values}
    for name in cached:
        for x in case.hit_values:
            first = plain(case.run(variants[name], x))  # miss (fills)
            second = plain(case.run(variants[name], x))  # hit
            if first != expected[x] or second != expected[x]:
                raise SystemExit(f"{case.key}: {name} returned a different result for {x!r}")

    # warm-up: every path once or more before timing
    n_warm = max(3, min(200, case.reps["hit"] // 10))
    n_warm_slow = 1 if case.key == "c" else n_warm
    time_calls(
        lambda x: case.run(variants["uncached"], x),
        itertools.islice(itertools.cycle(case.hit_values), n_warm_slow),
    )
    if "pass" in variants and "pass" in case.reps:
        time_calls(
            lambda x: case.run(variants["pass"], x),
            itertools.islice(case.hit_values * n_warm, n_warm),
        )
    for name in cached:
        v = variants[name]
        time_calls(functools.partial(case.run, v), itertools.islice(hits, n_warm))
        time_calls(functools.partial(case.run, v), itertools.islice(warm_supply[name], n_warm_slow))

    for _ in range(rounds):
        for mode, reps in case.reps.items():
            per_round = max(1, reps // rounds)
            if mode == "uncached":
                v = variants["uncached"]
                result.add(
                    "uncached",
                    "uncached",
                    time_calls(
                        functools.partial(case.run, v), itertools.islice(uncached_supply, per_round)
                    ),
                )
            elif mode == "pass":
                if "pass" in variants:
                    v = variants["pass"]
                    result.add(
                        "pass",
                        "pass",
                        time_calls(
                            functools.partial(case.run, v),
                            itertools.islice(uncached_supply, per_round),
                        ),
                    )
            elif mode == "cold":
                v = variants["uncached"]
                result.add(
                    "uncached",
                    "cold",
                    time_calls(
                        lambda x, v=v: case.run(v, x, next(_shapes)),
                        itertools.islice(itertools.cycle(case.hit_values), per_round),
                    ),
                )
                for name in cached:
                    v = variants[name]
                    result.add(
                        name,
                        "cold",
                        time_calls(
                            lambda x, v=v: case.run(v, x, next(_shapes)),
                            itertools.islice(itertools.cycle(case.hit_values), per_round),
                        ),
                    )
            else:
                for name in cached:
                    v = variants[name]
                    values = itertools.islice(
                        hits if mode == "hit" else miss_supply[name], per_round
                    )
                    result.add(name, mode, time_calls(functools.partial(case.run, v), values))
        gc.collect()


# --------------------------------------------------------------------------
# report

TARGETS = {"a": 2.5, "a-get": 2.5, "b": 1.5, "c": 500.0}
#: a miss at most this much slower than uncached: 25% for one row, 15% otherwise
MISS_LIMITS = {"a": 1.25, "a-get": 1.25}
MISS_LIMIT = 1.15


def fmt_us(us: float | None) -> str:
    if us is None:
        return "-"
    return f"{us:,.1f}" if us < 10_000 else f"{us:,.0f}"


def report(
    cases: list[Case], variants: dict[str, Variant], results: dict[str, Result]
) -> list[tuple[str, bool]]:
    verdicts: list[tuple[str, bool]] = []
    cached = [n for n in ("layer", "layer-scl", "layer-bytes", "recipe") if n in variants]
    width = 46
    print()
    print(f"{'query / variant':<{width}} {'median us':>11}  vs uncached")
    for case in cases:
        result = results[case.key]
        print()
        print(case.title)
        base = result.median_us("uncached", "uncached")
        cold_base = result.median_us("uncached", "cold")
        print(f"  {'uncached':<{width - 2}} {fmt_us(base):>11}")
        if cold_base is not None:
            print(f"  {'uncached, new statement shape':<{width - 2}} {fmt_us(cold_base):>11}")
        passed = result.median_us("pass", "pass")
        if passed is not None and base:
            print(
                f"  {'layer installed, query without hint':<{width - 2}} {fmt_us(passed):>11}  "
                f"{(passed / base - 1) * 100:+.1f}%"
            )
        for name in cached:
            label = variants[name].label
            for mode, text in (("hit", "hit"), ("miss", "miss"), ("cold", "miss, new shape")):
                us = result.median_us(name, mode)
                if us is None or not base:
                    continue
                if mode == "hit":
                    rel = f"{base / us:,.2f}x faster" if us < base else f"{us / base:,.2f}x slower"
                else:
                    ref = cold_base if mode == "cold" else base
                    rel = f"{(us / ref - 1) * 100:+.1f}%"
                print(f"  {label + ' ' + text:<{width - 2}} {fmt_us(us):>11}  {rel}")

    print()
    print("Targets (docs/performance.md; ratios to uncached in this run)")
    print(f"  {'target':<58} {'measured':>10}  {'goal':>8}  result")
    for name in [n for n in ("layer", "layer-scl") if n in variants]:
        label = variants[name].label
        for case in cases:
            result = results[case.key]
            base = result.median_us("uncached", "uncached")
            hit = result.median_us(name, "hit")
            miss = result.median_us(name, "miss")
            goal = TARGETS.get(case.key)
            if base is None or hit is None or miss is None or goal is None:
                continue
            ok = base / hit >= goal
            what = f"{case.key} hit {label}"
            verdicts.append((what, ok))
            print(
                f"  {what:<58} {base / hit:>9.2f}x  {'>=' + format(goal, 'g') + 'x':>8}  "
                f"{'PASS' if ok else 'FAIL'}"
            )
            limit = MISS_LIMITS.get(case.key, MISS_LIMIT)
            ok = miss / base <= limit
            what = f"{case.key} miss {label}"
            verdicts.append((what, ok))
            print(
                f"  {what:<58} {(miss / base - 1) * 100:>+9.1f}%  "
                f"{f'<=+{round((limit - 1) * 100)}%':>8}  "
                f"{'PASS' if ok else 'FAIL'}"
            )
    return verdicts


def draw_latency(cases: list[Case], results: dict[str, Result], directory: str, quick: bool) -> str:
    """The latency distributions of uncached, layer hit and layer miss, one panel per query."""
    from sqla_cachelayer.plots import latency_distributions

    panels = {}
    for case in cases:
        result = results.get(case.key)
        if result is None:
            continue
        panels[case.title.split(":")[0]] = {
            "uncached": result.samples.get(("uncached", "uncached"), []),
            "hit": result.samples.get(("layer", "hit"), []),
            "miss": result.samples.get(("layer", "miss"), []),
        }
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return latency_distributions(
        panels,
        os.path.join(directory, "query-cache-latency.svg"),
        f"benchmarks/query_cache.py{' --quick' if quick else ''}: SQLite file, memory region, "
        f"fresh session per query (load average {load})",
    )


def machine_facts(path: str) -> list[str]:
    return [
        f"python {platform.python_version()} ({platform.python_implementation()}), "
        f"sqlalchemy {sqlalchemy.__version__}, dogpile.cache {dogpile.__version__}, "
        f"sqlite {sqlite3.sqlite_version}",
        f"{platform.platform()}, nproc {os.cpu_count()}, sqlalchemy C extensions: {_has_cext()}",
        f"database file: {path}",
        f"load average at start: {', '.join(f'{x:.2f}' for x in os.getloadavg())}",
    ]


def _has_cext() -> str:
    try:
        from sqlalchemy.util import has_compiled_ext

        return "yes" if has_compiled_ext() else "no"
    except Exception:
        return "unknown"


# --------------------------------------------------------------------------
# profile


def profile(case: Case, variants: dict[str, Variant], variant: str, mode: str, reps: int) -> None:
    v = variants[variant]
    if mode not in ("hit", "miss"):
        raise SystemExit("--profile takes {a,a-get,b,c}-{hit,miss}")
    n_timed = max(1, reps // 4)
    if mode == "hit":
        for x in case.hit_values:
            case.run(v, x)
        timed = list(itertools.islice(itertools.cycle(case.hit_values), n_timed))
        values = list(itertools.islice(itertools.cycle(case.hit_values), reps))
    else:
        # misses: never the same value twice, timed run and profiled run included
        supply = iter(case.miss_values())
        timed = list(itertools.islice(supply, n_timed))
        values = list(itertools.islice(supply, reps))
    warm = list(itertools.islice(case.warm_values(), 50 if case.key != "c" else 1))
    time_calls(functools.partial(case.run, v), warm)
    samples = time_calls(functools.partial(case.run, v), timed)
    print(
        f"{case.title}\n{v.label} {mode}: median {statistics.median(samples) / 1000:.1f} us "
        f"unprofiled, {len(samples)} calls"
    )
    prof = cProfile.Profile()
    prof.enable()
    for x in values:
        case.run(v, x)
    prof.disable()
    n = len(values)
    print(f"profiled {n} calls; figures are us per query (total time / {n})")
    table = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    for title, column in (("by own time (tottime)", 2), ("by cumulative time", 3)):
        print()
        print(f"{title}:")
        print(f"{'ncalls':>9} {'own us/q':>10} {'cum us/q':>10}  function")
        rows = sorted(table.items(), key=lambda kv: kv[1][column], reverse=True)[:25]
        for (filename, line, name), (_cc, nc, tt, ct, _callers) in rows:
            where = f"{_short(filename)}:{line}({name})"
            print(f"{nc:>9} {tt / n * 1e6:>10.2f} {ct / n * 1e6:>10.2f}  {where[:90]}")


_MISSING = object()


class _Breakdown:
    """Inclusive wall time of chosen functions, by wrapping them (no profiler).

    Each wrapper adds about 0.1-0.2 us to the call it measures; figures are
    inclusive (a function's time contains that of the wrapped functions it calls).
    """

    def __init__(self) -> None:
        self.samples: dict[str, list[int]] = {}
        self._undo: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, name: str, label: str) -> None:
        saved = owner.__dict__.get(name, _MISSING)  # own attribute, or inherited
        target = getattr(owner, name)
        record = self.samples.setdefault(label, []).append
        clock = time.perf_counter_ns

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = clock()
            try:
                return target(*args, **kwargs)
            finally:
                record(clock() - t0)

        setattr(owner, name, timed)
        self._undo.append((owner, name, saved))

    def restore(self) -> None:
        for owner, name, saved in reversed(self._undo):
            if saved is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, saved)
        self._undo.clear()

    def reset(self) -> None:
        for found in self.samples.values():
            found.clear()


def breakdown(case: Case, path: str, mode: str, reps: int) -> None:
    """Where the layer's time goes on one case, per query, without a profiler."""
    from sqlalchemy.engine.result import FrozenResult, Result
    from sqlalchemy.orm import ORMExecuteState, Session

    import sqla_cachelayer._execute as layer_mod
    import sqla_cachelayer.keys as keys_mod
    import sqla_cachelayer.records as records_mod

    engine = create_engine(f"sqlite:///{path}")
    layer = scl.CacheLayer({"default": make_region().configure("dogpile.cache.memory")})
    rs = layer._states["default"]
    bd = _Breakdown()
    # the layer's own steps (instance attributes, so install() picks up the hook)
    for name in ("_do_orm_execute", "_hint", "_try_hit", "_miss", "_store", "_snapshot_seq"):
        bd.wrap(layer, name, f"layer.{name}")
    bd.wrap(keys_mod, "structure_digest", "keys.structure_digest (first sight only)")
    for name in ("lookup", "settle", "mutex", "write_entry", "bump", "ensure"):
        bd.wrap(rs.store, name, f"store.{name}")
    for name in (
        "load_record",
        "record_from_frozen",
        "record_is_shareable",
        "dump_record",
        "_result_from_record",
    ):
        bd.wrap(layer_mod, name, f"records.{name.lstrip('_')}")
    bd.wrap(records_mod, "_attach", "records._attach")
    bd.wrap(keys_mod, "query_key", "keys.query_key")
    bd.wrap(keys_mod, "database_identity", "keys.database_identity")
    # SQLAlchemy steps the layer calls
    bd.wrap(Session, "_autoflush", "Session._autoflush")
    bd.wrap(Session, "get_bind", "Session.get_bind")
    bd.wrap(ORMExecuteState, "invoke_statement", "ORMExecuteState.invoke_statement")
    bd.wrap(Result, "freeze", "Result.freeze (runs the ORM loading)")
    bd.wrap(FrozenResult, "__call__", "FrozenResult.__call__")
    select_cls = type(select(Item))
    bd.wrap(select_cls, "_generate_cache_key", "Select._generate_cache_key")
    try:
        v = Variant("layer", "layer [dogpile.cache.memory]", None, scl.FromCache, engine, layer)
        v.Session = layer.install(sessionmaker(engine))
        if mode == "hit":
            for x in case.hit_values:
                case.run(v, x)
            values = list(itertools.islice(itertools.cycle(case.hit_values), reps))
        else:
            values = list(itertools.islice(case.miss_values(), reps))
        time_calls(
            functools.partial(case.run, v),
            itertools.islice(case.warm_values(), 50 if case.key != "c" else 1),
        )
        bd.reset()
        samples = time_calls(functools.partial(case.run, v), values)
        n = len(values)
        print(f"{case.title}\n{v.label} {mode}: {n} queries")
        print(
            f"with the timing wrappers: median {statistics.median(samples) / 1000:.1f} us "
            f"per query (mean {statistics.mean(samples) / 1000:.1f})"
        )
        print(f"{'calls/q':>8} {'median us/call':>15} {'mean':>8}  function (inclusive)")
        rows = [(label, found) for label, found in bd.samples.items() if found]
        rows.sort(key=lambda item: -statistics.median(item[1]) * len(item[1]))
        for label, found in rows:
            median = statistics.median(found) / 1000
            mean = statistics.mean(found) / 1000
            print(f"{len(found) / n:>8.2f} {median:>15.2f} {mean:>8.2f}  {label}")
    finally:
        bd.restore()
        engine.dispose()


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (seconds)")
    parser.add_argument(
        "--profile",
        metavar="CASE-MODE",
        help="cProfile one case: {a,a-get,b,c}-{hit,miss}, e.g. b-hit",
    )
    parser.add_argument(
        "--variant",
        default="layer",
        help="variant to profile: layer, layer-scl, recipe, uncached (default layer)",
    )
    parser.add_argument(
        "--breakdown",
        metavar="CASE-MODE",
        help="time the layer's steps (no profiler) on one case, e.g. a-hit",
    )
    parser.add_argument("--reps", type=int, default=2000, help="calls profiled (default 2000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target fails")
    parser.add_argument("--keep", action="store_true", help="keep the database file")
    parser.add_argument(
        "--case", action="append", help="run only this case (a, a-get, a-pre, b, c); repeatable"
    )
    parser.add_argument(
        "--plots",
        metavar="DIR",
        help="draw the latency distributions of uncached, hit and miss per query as "
        "DIR/query-cache-latency.svg (needs matplotlib: the plots extra)",
    )
    args = parser.parse_args(argv)

    n_items = 20_000
    n_sales = 20_000 if args.quick else 200_000
    tmp = tempfile.mkdtemp(prefix="scl-bench-")
    path = os.path.join(tmp, "bench.db")
    try:
        started = time.perf_counter()
        built = build_database(path, n_items, n_sales)
        variants = make_variants(path)
        cases = plan_cases(args.quick, n_items)
        for line in machine_facts(path):
            print(line)
        print(
            f"data: {N_CATEGORIES} categories, {n_items:,} items, {n_sales:,} sales "
            f"(built in {built:.1f}s); each query in a fresh session; median of "
            f"{'--quick ' if args.quick else ''}repetitions after warm-up"
        )

        if args.breakdown:
            case_key, _, mode = args.breakdown.rpartition("-")
            by_key = {c.key: c for c in cases}
            if case_key not in by_key or mode not in ("hit", "miss"):
                parser.error(f"unknown case: {args.breakdown}")
            breakdown(by_key[case_key], path, mode, args.reps if case_key != "c" else 5)
            return 0

        if args.profile:
            case_key, _, mode = args.profile.rpartition("-")
            by_key = {c.key: c for c in cases}
            if case_key not in by_key or args.variant not in variants:
                parser.error(f"unknown case or variant: {args.profile} / {args.variant}")
            profile(
                by_key[case_key],
                variants,
                args.variant,
                mode,
                max(1, args.reps if case_key != "c" or mode == "hit" else 5),
            )
            return 0

        results: dict[str, Result] = {}
        if args.case:
            cases = [c for c in cases if c.key in args.case]
        for case in cases:
            t0 = time.perf_counter()
            results[case.key] = Result()
            run_case(case, variants, results[case.key], 1 if args.quick else args.rounds)
            print(f"  ran {case.key} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        verdicts = report(cases, variants, results)
        failed = [w for w, ok in verdicts if not ok]
        print()
        print(
            f"{len(verdicts) - len(failed)} of {len(verdicts)} targets met"
            + (f"; FAIL: {', '.join(failed)}" if failed else "")
        )
        print(f"total run time {time.perf_counter() - started:.1f}s")
        print(f"load average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if args.quick:
            print(
                "(--quick: few repetitions and a 20k-row sale table; figures are indicative only)"
            )
        for v in variants.values():
            if v.layer is not None and v.name != "pass":
                print(f"stats {v.name}: {v.layer.stats()}")
        if args.plots:
            print(f"wrote {draw_latency(cases, results, args.plots, args.quick)}")
        return 1 if (failed and args.strict) else 0
    finally:
        for v in list(locals().get("variants", {}).values()):
            v.engine.dispose()
        if args.keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
