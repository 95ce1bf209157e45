"""Counters of what the layer did: hits, misses, stores, errors...

One :class:`Stats` per layer, shared by every thread and session using it.
The hit path takes no lock: each thread counts into a shard of its own (in a
``threading.local``), which only that thread writes. A shard holds one dict of
counters per region and one small list of figures per statement structure
(hits, misses, stale, seconds spent in hits and in misses).
:meth:`Stats.snapshot`, :meth:`Stats.by_region` and :meth:`Stats.by_query`
sum the shards. ``Stats._lock`` guards the list of shards: it is taken once
per thread, on its first count, and by the readers; the shards of threads that
have ended are folded into ``_retired`` then, so the list stays as long as the
number of live threads.

A reader may sum a shard while its thread counts into it: each counter it
reads is a value the thread wrote (a single store of a small int), so a
reading is at worst one increment behind.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Sequence
from typing import Any

__all__ = ["COUNTERS", "MAX_QUERIES", "Stats", "verified_nines"]

#: every counter :meth:`Stats.snapshot` reports, in order (``verified_nines``,
#: computed from two of them, follows)
COUNTERS = (
    "hits",  # answered from the cache, no SQL
    "misses",  # went to the database for a cacheable query
    "stores",  # entries written after a miss
    "bypasses",  # cacheable by hint but served from the database on purpose
    "invalidations",  # table stamps bumped (one per region per commit or invalidate call)
    "errors",  # backend errors swallowed (G5)
    "not_stored",  # misses whose result could not be published (G3) or recorded
    "stale",  # entries found but refused: a table moved past them, or expired
    "replays",  # invalidations that failed and were replayed later
    "breaker_opened",  # times a region was switched off after a backend error
    "breaker_closed",  # times a region's breaker wait ended and the backend was tried again
    "listener_errors",  # exceptions raised by listeners (logged, never propagated)
    "verified",  # sampled hits re-checked against the database, with a conclusion
    "verified_stale",  # of those, hits that served something the database no longer held
    "verify_inconclusive",  # sampled hits a legitimate commit overtook before the re-check
    "verify_dropped",  # sampled hits dropped because the verifier's queue was full
)

#: at most this many statement structures are listed by ``stats(by="query")``
MAX_QUERIES = 1000
#: structures tracked per thread; counts of structures beyond it go to one
#: ``other`` entry (fingerprint ``None``)
_TRACKED_QUERIES = 5000
#: longest SQL preview, in characters
_PREVIEW = 200

# figures kept per statement structure, by position
_HITS, _MISSES, _STALE, _HIT_SECONDS, _MISS_SECONDS = range(5)


def verified_nines(verified: int, stale: int) -> float:
    """``-log10(stale / verified)``: how many nines of fresh hits were verified.

    ``inf`` while no checked hit was stale (the formula's value: no stale hit
    in ``verified`` checks); ``0.0`` when nothing was verified.
    """
    if verified <= 0:
        return 0.0
    if stale <= 0:
        return math.inf
    return -math.log10(stale / verified) + 0.0  # never -0.0


class _Shard:
    """One thread's counters; written by that thread only."""

    __slots__ = ("counts", "queries", "thread")

    def __init__(self, regions: int) -> None:
        self.thread = threading.current_thread()
        self.counts = [dict.fromkeys(COUNTERS, 0) for _ in range(regions)]
        # fingerprint (None: the "other" entry) -> [hits, misses, stale, hit s, miss s]
        self.queries: dict[str | None, list[Any]] = {}


class Stats:
    """Integer counters per region and per statement structure, safe to
    increment from any thread without a lock."""

    __slots__ = ("_local", "_lock", "_retired", "_shards", "_sources", "regions")

    def __init__(self, regions: Sequence[str] = ("default",)) -> None:
        #: region names, by index
        self.regions = tuple(regions)
        self._local = threading.local()
        self._lock = threading.Lock()  # guards _shards and _retired
        self._shards: list[_Shard] = []
        self._retired = _Shard(len(self.regions))
        # fingerprint -> its statement, rendered into a preview when first read
        # (plain dict operations, atomic under the GIL; bounded by _TRACKED_QUERIES)
        self._sources: dict[str, Any] = {}

    def _shard(self) -> _Shard:
        try:
            shard: _Shard = self._local.shard
        except AttributeError:
            shard = _Shard(len(self.regions))
            self._local.shard = shard
            with self._lock:
                self._fold_finished()
                self._shards.append(shard)
        return shard

    def _fold_finished(self) -> None:
        alive = []
        retired = self._retired
        for shard in self._shards:
            if shard.thread.is_alive():
                alive.append(shard)
                continue
            for into, counts in zip(retired.counts, shard.counts, strict=True):
                for name, value in counts.items():
                    into[name] += value
            for fingerprint, figures in shard.queries.items():
                _add_figures(retired.queries, fingerprint, figures)
        self._shards = alive

    # -- counting ---------------------------------------------------------

    def incr(self, name: str, amount: int = 1, region: int = 0) -> None:
        """Add ``amount`` to counter ``name`` of the region numbered ``region``."""
        try:
            shard: _Shard = self._local.shard
        except AttributeError:
            shard = self._shard()
        shard.counts[region][name] += amount

    def _figures(self, shard: _Shard, fingerprint: str, statement: Any) -> list[Any]:
        queries = shard.queries
        if len(queries) >= _TRACKED_QUERIES:
            other = queries.get(None)
            if other is None:
                other = queries[None] = [0, 0, 0, 0.0, 0.0]
            return other
        figures = queries[fingerprint] = [0, 0, 0, 0.0, 0.0]
        if fingerprint not in self._sources and len(self._sources) < _TRACKED_QUERIES:
            self._sources[fingerprint] = statement  # rendered when read, off the hit path
        return figures

    def hit(self, region: int, fingerprint: str, statement: Any, elapsed: float) -> None:
        """Count a hit of one statement structure, which took ``elapsed`` seconds."""
        try:
            shard: _Shard = self._local.shard
        except AttributeError:
            shard = self._shard()
        shard.counts[region]["hits"] += 1
        figures = shard.queries.get(fingerprint)
        if figures is None:
            figures = self._figures(shard, fingerprint, statement)
        figures[_HITS] += 1
        figures[_HIT_SECONDS] += elapsed

    def miss(
        self, region: int, fingerprint: str, statement: Any, elapsed: float, stored: bool
    ) -> None:
        """Count the time of a miss (counted in ``misses`` when it was decided)
        and, if its result was ``stored``, the store."""
        shard = self._shard()
        if stored:
            shard.counts[region]["stores"] += 1
        figures = shard.queries.get(fingerprint)
        if figures is None:
            figures = self._figures(shard, fingerprint, statement)
        figures[_MISSES] += 1
        figures[_MISS_SECONDS] += elapsed

    def stale(self, region: int, fingerprint: str, statement: Any) -> None:
        """Count an entry of this structure found but refused."""
        shard = self._shard()
        shard.counts[region]["stale"] += 1
        figures = shard.queries.get(fingerprint)
        if figures is None:
            figures = self._figures(shard, fingerprint, statement)
        figures[_STALE] += 1

    # -- reading ----------------------------------------------------------

    def by_region(self) -> dict[str, dict[str, float]]:
        """Region name -> its counters (with ``verified_nines``)."""
        with self._lock:
            self._fold_finished()
            totals = [dict(c) for c in self._retired.counts]
            for shard in self._shards:
                for into, counts in zip(totals, shard.counts, strict=True):
                    for name, value in counts.items():
                        into[name] += value
        out: dict[str, dict[str, float]] = {}
        for name, counts in zip(self.regions, totals, strict=True):
            region: dict[str, float] = dict(counts)
            region["verified_nines"] = verified_nines(counts["verified"], counts["verified_stale"])
            out[name] = region
        return out

    def snapshot(self) -> dict[str, float]:
        """Every counter, summed over regions (with ``verified_nines``)."""
        total = dict.fromkeys(COUNTERS, 0)
        for counts in self.by_region().values():
            for name in COUNTERS:
                total[name] += int(counts[name])
        out: dict[str, float] = dict(total)
        out["verified_nines"] = verified_nines(total["verified"], total["verified_stale"])
        return out

    def by_query(self, limit: int = MAX_QUERIES) -> list[dict[str, Any]]:
        """One dict per statement structure, busiest (hits + misses) first."""
        merged: dict[str | None, list[Any]] = {}
        with self._lock:
            self._fold_finished()
            shards = [self._retired, *self._shards]
            for shard in shards:
                for fingerprint, figures in list(shard.queries.items()):
                    _add_figures(merged, fingerprint, figures)
        busiest = sorted(
            merged.items(), key=lambda item: item[1][_HITS] + item[1][_MISSES], reverse=True
        )[:limit]
        out = []
        for fingerprint, figures in busiest:
            hits, misses = figures[_HITS], figures[_MISSES]
            out.append(
                {
                    "fingerprint": fingerprint,
                    "sql": self._preview(fingerprint),
                    "hits": hits,
                    "misses": misses,
                    "stale": figures[_STALE],
                    "hit_ratio": hits / (hits + misses) if hits + misses else 0.0,
                    "mean_hit_seconds": figures[_HIT_SECONDS] / hits if hits else None,
                    "mean_miss_seconds": figures[_MISS_SECONDS] / misses if misses else None,
                }
            )
        return out

    def _preview(self, fingerprint: str | None) -> str | None:
        if fingerprint is None:
            return None
        source = self._sources.get(fingerprint)
        if source is None or isinstance(source, str):
            return source
        preview = sql_preview(source)
        self._sources[fingerprint] = preview
        return preview

    def reset(self) -> None:
        with self._lock:
            self._retired = _Shard(len(self.regions))
            for shard in self._shards:
                for counts in shard.counts:
                    for name in counts:
                        counts[name] = 0
                shard.queries.clear()


def _add_figures(
    into: dict[str | None, list[Any]], fingerprint: str | None, add: list[Any]
) -> None:
    figures = into.get(fingerprint)
    if figures is None:
        into[fingerprint] = list(add)
    else:
        for i, value in enumerate(add):
            figures[i] += value


_SPACES = re.compile(r"\s+")


def sql_preview(statement: Any, length: int = _PREVIEW) -> str:
    """A statement's SQL on one line, cut to ``length`` characters."""
    try:
        text = str(statement)
    except Exception as err:  # a construct the default dialect cannot render
        text = f"<{type(statement).__name__}: not renderable ({type(err).__name__})>"
    text = _SPACES.sub(" ", text).strip()
    return text if len(text) <= length else text[: length - 3] + "..."
