"""Guarantees across processes sharing one backend: G1 with real processes, G6 with a
distributed lock. Real processes (``spawn``), a real SQLite file and a real Redis."""

from __future__ import annotations

import multiprocessing
from typing import Any

import _mp_workers as workers
import pytest

COMMITS = 2000
READERS = 3

ctx = multiprocessing.get_context("spawn")


def _cache_settings(kind: str, request: pytest.FixtureRequest, tmp_path: Any) -> dict[str, str]:
    if kind == "redis":
        url = request.getfixturevalue("redis_db_url")
        return {
            "cachelayer.regions.default.backend": "dogpile.cache.redis",
            "cachelayer.regions.default.arguments.url": url,
            "cachelayer.regions.default.arguments.distributed_lock": "true",
            "cachelayer.regions.default.arguments.lock_timeout": "30",
            "cachelayer.regions.default.arguments.lock_sleep": "0.01",
        }
    return {
        "cachelayer.regions.default.backend": "sqla_cachelayer.sqlite",
        "cachelayer.regions.default.arguments.path": str(tmp_path / "cache.sqlite"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite_file", "redis"])
def test_cross_process_fresh_after_commit(
    kind: str, request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    db_url = f"sqlite:///{tmp_path / 'data.sqlite'}"
    settings = _cache_settings(kind, request, tmp_path)
    workers.create_schema(db_url)
    acknowledged = ctx.Value("q", 0, lock=False)
    done = ctx.Event()
    ready = ctx.Barrier(READERS + 1)
    results = ctx.Queue()
    readers = [
        ctx.Process(
            target=workers.reader, args=(db_url, settings, acknowledged, done, ready, results)
        )
        for _ in range(READERS)
    ]
    writer_results = ctx.Queue()
    writer = ctx.Process(
        target=workers.writer, args=(db_url, settings, COMMITS, acknowledged, ready, writer_results)
    )
    for p in [*readers, writer]:
        p.start()
    writer_stats = writer_results.get(timeout=300)[1]
    writer.join(300)
    done.set()
    reports = [results.get(timeout=120) for _ in readers]
    for p in readers:
        p.join(60)
    assert writer.exitcode == 0 and all(p.exitcode == 0 for p in readers)
    assert acknowledged.value == COMMITS
    stale = [s for _, _, sample, n, _ in reports if n for s in sample]
    assert not stale, (stale, writer_stats, [r[4] for r in reports])
    assert sum(r[1] for r in reports) > 0, "readers must have been served hits"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite_file", "redis"])
def test_cross_process_one_miss_one_query(
    kind: str, request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    db_url = f"sqlite:///{tmp_path / 'data.sqlite'}"
    settings = _cache_settings(kind, request, tmp_path)
    workers.create_schema(db_url)
    n = 4
    barrier = ctx.Barrier(n)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=workers.slow_misser, args=(db_url, settings, barrier, results))
        for _ in range(n)
    ]
    for p in procs:
        p.start()
    reports = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    assert all(value == 0 for _, value, _ in reports)
    queries = sum(ran for ran, _, _ in reports)
    assert queries == 1, f"{queries} processes ran the query for one key"
