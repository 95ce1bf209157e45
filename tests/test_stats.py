"""Stats: exact counts from many threads, with no lock on the counting path."""

from __future__ import annotations

import threading

from sqla_cachelayer.stats import COUNTERS, Stats


def test_counts_from_many_threads_are_exact() -> None:
    stats = Stats()
    n, per = 8, 20_000
    barrier = threading.Barrier(n)

    def work() -> None:
        barrier.wait()
        for _ in range(per):
            stats.incr("hits")
        stats.incr("errors", 2)

    threads = [threading.Thread(target=work) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = stats.snapshot()
    assert snap["hits"] == n * per and snap["errors"] == 2 * n
    assert set(snap) == {*COUNTERS, "verified_nines"}
    assert len(stats._shards) == 0, "finished threads' counts are folded and dropped"
    stats.incr("hits")
    assert stats.snapshot()["hits"] == n * per + 1
