"""What any ``do_orm_execute`` cache must pay, next to what this layer pays.

The targets of ``query_cache.py`` are ratios to the uncached query. This script
measures, in the same run and the same way (median microseconds, a fresh
session per query, variants interleaved in shuffled order over several rounds,
a SQLite file), the *floors* a cache built on SQLAlchemy's ``do_orm_execute``
hook cannot go below, so the layer's own cost can be told apart from the
hook's::

    python benchmarks/floors.py            # about 40 s
    python benchmarks/floors.py --quick    # a few seconds, indicative only

Variants, for (a) one row by primary key and (b) 100 entity rows:

uncached            a plain ``sessionmaker``
noop hook           a ``do_orm_execute`` listener that returns None
layer, no hint      this layer installed, the query without a hint (what the
                    layer costs the queries it does not cache)
miss floor          the listener runs the query and buffers its rows
                    (``invoke_statement().freeze()``) and returns them: the
                    least a cache does on a miss, before any key, lock, check
                    or store
miss floor + key    the same plus SQLAlchemy's cache key and its hash (what a
                    cache keyed by statement structure needs at the least)
miss floor + keep   the same, and the rows' values kept in a dict by that key,
                    as any in-process cache keeps a result: what memory that
                    grows with every miss costs the query (fresh memory for
                    the next objects the ORM builds)
layer miss          this layer, a new key each query
hit floor           the listener returns a ready record of the row(s), attached
                    to the session as the layer attaches them: no key, no
                    lookup, no check
hit floor + key     the same plus SQLAlchemy's cache key and its hash
layer hit           this layer, the entry in a ``dogpile.cache.memory`` region
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from dogpile.cache import make_region
from sqlalchemy import create_engine, event, select
from sqlalchemy.orm import sessionmaker

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import query_cache as qc

import sqla_cachelayer as scl
from sqla_cachelayer import _execute as layer_mod
from sqla_cachelayer import records

Item = qc.Item


def _stmt(case: str, x: int) -> Any:
    if case == "a":
        return select(Item).where(Item.id == x)
    return select(Item).where(Item.id >= x).order_by(Item.id).limit(100)


_PLAIN = object()  # marks the variant that queries without a hint


def _query(Session: Any, case: str, x: int) -> Any:
    if type(Session) is tuple:
        Session = Session[0]
        stmt = _stmt(case, x)
    else:
        stmt = _stmt(case, x).options(scl.FromCache())
    with Session() as s:
        result = s.scalars(stmt)
        return result.one() if case == "a" else result.all()


def _captured_record(url: str, case: str, x: int) -> tuple[Any, Any]:
    """A record of the query's result, as the layer stores it."""
    layer = scl.CacheLayer({"default": make_region().configure("dogpile.cache.memory")})
    Session = layer.install(sessionmaker(create_engine(url)))
    found: list[tuple[Any, Any]] = []
    real = layer_mod._result_from_record

    def spy(session: Any, record: Any, metadata: Any, load_options: Any) -> Any:
        found.append((record, metadata))
        return real(session, record, metadata, load_options)

    _query(Session, case, x)  # the miss stores it
    layer_mod._result_from_record = spy
    try:
        _query(Session, case, x)  # the hit hands it out
    finally:
        layer_mod._result_from_record = real
    return found[0]


def make_variants(url: str, case: str, hit_x: int) -> dict[str, Any]:
    def plain(hook: Callable[[Any], Any] | None = None) -> Any:
        Session = sessionmaker(create_engine(url))
        if hook is not None:
            event.listen(Session, "do_orm_execute", hook, retval=True)
        return Session

    def noop(ctx: Any) -> Any:
        return None

    def miss_floor(ctx: Any) -> Any:
        return ctx.invoke_statement().freeze()()

    def miss_floor_key(ctx: Any) -> Any:
        hash(ctx.statement._generate_cache_key().key)
        return ctx.invoke_statement().freeze()()

    kept: dict[Any, Any] = {}

    def miss_floor_keep(ctx: Any) -> Any:
        ck = ctx.statement._generate_cache_key()
        frozen = ctx.invoke_statement().freeze()
        kept[ck.key, tuple(bp.value for bp in ck.bindparams)] = [
            tuple(o.__dict__.values()) for o in frozen.data
        ]
        return frozen()

    record, metadata = _captured_record(url, case, hit_x)

    def hit_floor(ctx: Any) -> Any:
        return records.result_from_record(ctx.session, record, metadata, ())

    def hit_floor_key(ctx: Any) -> Any:
        hash(ctx.statement._generate_cache_key().key)
        return records.result_from_record(ctx.session, record, metadata, ())

    layer = scl.CacheLayer({"default": make_region().configure("dogpile.cache.memory")})
    cached = layer.install(sessionmaker(create_engine(url)))
    return {
        "uncached": plain(),
        "noop hook": plain(noop),
        "layer, no hint": (cached, _PLAIN),
        "miss floor": plain(miss_floor),
        "miss floor + key": plain(miss_floor_key),
        "miss floor + keep": plain(miss_floor_keep),
        "layer miss": cached,
        "hit floor": plain(hit_floor),
        "hit floor + key": plain(hit_floor_key),
        "layer hit": cached,
    }


def measure(
    variants: dict[str, Any], case: str, hit_x: int, reps: int, rounds: int
) -> dict[str, float]:
    clock = time.perf_counter_ns
    samples: dict[str, list[float]] = {name: [] for name in variants}
    # the misses that keep their results: a new key each
    never_asked = {name: iter(range(1, 19_000)) for name in ("layer miss", "miss floor + keep")}
    rng = random.Random(7)
    for _ in range(rounds):
        order = list(variants.items())
        rng.shuffle(order)
        for name, Session in order:
            warm = max(20, reps // 10)
            if name == "layer hit":
                values = [hit_x] * (warm + reps)
            elif name in ("layer miss", "miss floor + keep"):
                # never asked before: each miss keeps a new result
                values = [next(never_asked[name]) for _ in range(warm + reps)]
            else:
                values = [rng.randrange(1, 19_000) for _ in range(warm + reps)]
            for v in values[:warm]:
                _query(Session, case, v)
            times = []
            for v in values[warm:]:
                t0 = clock()
                _query(Session, case, v)
                times.append(clock() - t0)
            samples[name].append(statistics.median(times) / 1000)
    return {name: statistics.median(found) for name, found in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, indicative only")
    parser.add_argument("--case", choices=("a", "b"), help="run one case only")
    args = parser.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="scl-floors-")
    path = os.path.join(tmp, "bench.db")
    try:
        qc.build_database(path, 20_000, 1_000)
        url = f"sqlite:///{path}"
        for line in qc.machine_facts(path):
            print(line)
        rounds = 2 if args.quick else 4
        for case, title, reps in (
            ("a", "(a) one row by primary key", 300 if args.quick else 3000),
            ("b", "(b) 100 entity rows", 100 if args.quick else 800),
        ):
            if args.case and case != args.case:
                continue
            variants = make_variants(url, case, 10_000)
            found = measure(variants, case, 10_000, reps, rounds)
            base = found["uncached"]
            print(f"\n{title}: median us per query, {rounds} rounds of {reps}")
            for name, us in found.items():
                if name.startswith("layer hit") or name.startswith("hit"):
                    note = f"{base / us:5.2f}x faster"
                else:
                    note = f"{100 * (us / base - 1):+6.1f}%"
                print(f"  {name:18s} {us:9.1f}  {note}")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
