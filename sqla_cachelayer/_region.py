"""What one process keeps for one region of a layer: the region, its
stamp store, its breaker and its in-flight misses.

Concurrency: ``lock`` guards ``pending`` and ``down_until`` and is never held
across backend I/O; ``last_seen`` and ``fills`` are plain attributes written
without it (a lost update only makes a lower bound lower or a change detector
change); ``flights`` has its own lock (:mod:`sqla_cachelayer._flight`).
"""

from __future__ import annotations

import threading

from dogpile.cache.region import CacheRegion

from ._flight import Flights
from .invalidation import StampStore, store_for_region

__all__ = ["_RegionState"]


class _RegionState:
    """One region and the protocol state this process keeps for it."""

    def __init__(self, name: str, region: CacheRegion, namespace: str, index: int) -> None:
        self.name = name
        self.region = region
        self.index = index
        self.store: StampStore = store_for_region(region, f"{namespace}:{name}")
        self.prefix = f"{namespace}:{name}:"
        self.query_prefix = self.prefix + "q:"
        self.expiration_time: float | None = region.expiration_time or None
        # lock guards: pending, down_until (never held across I/O)
        self.lock = threading.Lock()
        # tables whose invalidation could not be written; replayed before trust
        self.pending: set[str] = set()
        self.down_until = 0.0
        # highest seq this process has read: a lower bound for snapshot starts
        self.last_seen = 0
        # CacheLayer._first_seen: a begin is reading seq for the first time
        # (racy by design: at worst a few concurrent first begins read it too),
        # and the monotonic time before which a failed first read is not retried
        self.first_read = False
        self.first_read_after = 0.0
        # entries this process has written (see CacheLayer._miss)
        self.fills = 0
        # misses in the air in this process, by key (single flight, G6)
        self.flights = Flights()
