"""Counters of what the layer did: hits, misses, stores, errors...

One :class:`Stats` per layer, shared by every thread and session using it.
The hit path takes no lock: each thread counts into a dict of its own (a
*shard*, in a ``threading.local``), which only that thread writes.
:meth:`Stats.snapshot` sums the shards. ``Stats._lock`` guards the list of
shards: it is taken once per thread, on its first count, and by ``snapshot``;
the shards of threads that have ended are folded into ``_retired`` then, so
the list stays as long as the number of live threads.
"""

from __future__ import annotations

import threading

__all__ = ["COUNTERS", "Stats"]

#: every counter :meth:`Stats.snapshot` reports, in order
COUNTERS = (
    "hits",  # answered from the cache, no SQL
    "misses",  # went to the database for a cacheable query
    "stores",  # entries written after a miss
    "bypasses",  # cacheable by hint but served from the database on purpose
    "invalidations",  # table stamps bumped (one per commit or invalidate call)
    "errors",  # backend errors swallowed (G5)
    "not_stored",  # misses whose result could not be published (G3) or recorded
    "stale",  # entries found but refused: a table moved past them, or expired
    "replays",  # invalidations that failed and were replayed later
    "breaker_opened",  # times a region was switched off after a backend error
    "breaker_closed",  # times a region's breaker wait ended and the backend was tried again
)


class Stats:
    """Integer counters, safe to increment from any thread without a lock."""

    __slots__ = ("_local", "_lock", "_retired", "_shards")

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()  # guards _shards and _retired
        self._shards: list[tuple[threading.Thread, dict[str, int]]] = []
        self._retired = dict.fromkeys(COUNTERS, 0)

    def _new_shard(self) -> dict[str, int]:
        shard = dict.fromkeys(COUNTERS, 0)
        self._local.counts = shard
        with self._lock:
            self._fold_finished()
            self._shards.append((threading.current_thread(), shard))
        return shard

    def _fold_finished(self) -> None:
        alive = []
        for thread, shard in self._shards:
            if thread.is_alive():
                alive.append((thread, shard))
            else:
                for name, value in shard.items():
                    self._retired[name] += value
        self._shards = alive

    def incr(self, name: str, amount: int = 1) -> None:
        try:
            counts: dict[str, int] = self._local.counts
        except AttributeError:
            counts = self._new_shard()
        counts[name] += amount

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            self._fold_finished()
            total = dict(self._retired)
            for _, shard in self._shards:
                for name, value in shard.items():
                    total[name] += value
        return total

    def reset(self) -> None:
        with self._lock:
            self._retired = dict.fromkeys(COUNTERS, 0)
            for _, shard in self._shards:
                for name in shard:
                    shard[name] = 0
