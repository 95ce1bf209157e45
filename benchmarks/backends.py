"""Latency of the cache backends, single process: median microseconds per call.

Measures what the cache layer pays through a dogpile region (so the SQLite
figures include dogpile's serialization of the ``CachedValue``), for
``dogpile.cache.memory``, ``sqla_cachelayer.memory`` and
``sqla_cachelayer.sqlite``, at several payload sizes::

    python benchmarks/backends.py                 # default sizes 200 B, 2 KB, 20 KB
    python benchmarks/backends.py --sizes 100 --rounds 20000

Operations: ``get`` (hit), ``get miss``, ``set`` (overwrite of an existing
key), ``get_multi`` of 10 hits, and for the project's backends
``get_with_counters`` (an entry and 3 counters) and ``bump_counters``
(sequence and 2 stamps).  The SQLite file lives in a temporary directory;
put it on the disk you deploy on with ``--dir``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dogpile.cache import CacheRegion, make_region

import sqla_cachelayer.backends  # noqa: F401  (registers the backend names)

KEYS = 1000


def median_us(fn: Callable[[int], object], rounds: int) -> float:
    for i in range(min(rounds // 10, 500)):  # warm up caches and statements
        fn(i)
    samples = []
    clock = time.perf_counter_ns
    for i in range(rounds):
        start = clock()
        fn(i)
        samples.append(clock() - start)
    return statistics.median(samples) / 1000


def bench_region(region: CacheRegion, size: int, rounds: int) -> dict[str, float]:
    payload = os.urandom(size)
    keys = [f"bench:{size}:{i}" for i in range(KEYS)]
    for key in keys:
        region.set(key, payload)
    get_multi: Any = region.get_multi  # untyped in dogpile
    results = {
        "get": median_us(lambda i: region.get(keys[(i * 7) % KEYS]), rounds),
        "get miss": median_us(lambda i: region.get(f"missing:{i}"), rounds),
        "set": median_us(lambda i: region.set(keys[(i * 13) % KEYS], payload), rounds),
        "get_multi(10)": median_us(
            lambda i: get_multi([keys[(i * 7 + j) % KEYS] for j in range(10)]), rounds // 2
        ),
    }
    backend = region.actual_backend
    if hasattr(backend, "bump_counters"):
        backend.add_counters(["bench:stamp:a", "bench:stamp:b"], 0)
        results["get_with_counters"] = median_us(
            lambda i: backend.get_with_counters(
                keys[(i * 7) % KEYS], ["bench:seq", "bench:stamp:a", "bench:stamp:b"]
            ),
            rounds,
        )
        results["bump_counters"] = median_us(
            lambda i: backend.bump_counters("bench:seq", ["bench:stamp:a", "bench:stamp:b"], 0),
            rounds // 2,
        )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 2000, 20000])
    parser.add_argument("--rounds", type=int, default=10000)
    parser.add_argument("--dir", default=None, help="directory for the SQLite file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        configs: list[tuple[str, Callable[[], CacheRegion]]] = [
            ("dogpile.cache.memory", lambda: make_region().configure("dogpile.cache.memory")),
            (
                "sqla_cachelayer.memory",
                lambda: make_region().configure(
                    "sqla_cachelayer.memory", arguments={"max_entries": 10_000}
                ),
            ),
            (
                "sqla_cachelayer.memory+max_bytes",
                lambda: make_region().configure(
                    "sqla_cachelayer.memory",
                    arguments={"max_entries": 10_000, "max_bytes": "256MiB"},
                ),
            ),
            (
                "sqla_cachelayer.sqlite",
                lambda: make_region().configure(
                    "sqla_cachelayer.sqlite",
                    arguments={"path": os.path.join(tmp, "bench.db"), "max_bytes": "256MiB"},
                ),
            ),
            (
                "sqla_cachelayer.sqlite touch_interval=0",
                lambda: make_region().configure(
                    "sqla_cachelayer.sqlite",
                    arguments={
                        "path": os.path.join(tmp, "bench-touch.db"),
                        "max_bytes": "256MiB",
                        "touch_interval": 0,
                    },
                ),
            ),
        ]
        print(f"Python {sys.version.split()[0]}, {args.rounds} rounds, median us per call")
        for size in args.sizes:
            print(f"\npayload {size} bytes")
            rows = [(name, bench_region(factory(), size, args.rounds)) for name, factory in configs]
            columns = list(dict.fromkeys(c for _, r in rows for c in r))
            width = max(len(name) for name, _ in rows)
            print(f"{'backend':<{width}}  " + "  ".join(f"{c:>17}" for c in columns))
            for name, result in rows:
                cells = [f"{result[c]:17.1f}" if c in result else f"{'-':>17}" for c in columns]
                print(f"{name:<{width}}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
