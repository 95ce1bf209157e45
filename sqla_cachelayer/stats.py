"""Counters of what the layer did: hits, misses, stores, errors...

One :class:`Stats` per layer, shared by every thread and session using it.
Its lock guards the counters and is held only for an increment or a copy.
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
    """Thread-safe integer counters."""

    __slots__ = ("_counts", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards _counts
        self._counts = dict.fromkeys(COUNTERS, 0)

    def incr(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def reset(self) -> None:
        with self._lock:
            for name in self._counts:
                self._counts[name] = 0
