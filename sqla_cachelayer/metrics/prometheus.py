"""Prometheus export through prometheus-client (the ``prometheus`` extra).

One collector per process, registered on prometheus-client's default registry
(or the ``registry`` given to the first exporter), reports every exporting
layer at scrape time, per region::

    sqla_cachelayer_hits_total{region="default"} 216.0
    sqla_cachelayer_misses_total{region="default"} 1496.0
    ...
    sqla_cachelayer_verified_nines{region="default"} 3.2
    sqla_cachelayer_hit_duration_seconds_bucket{region="default",le="0.0001"} 201.0

Counters are ``sqla_cachelayer_<counter>_total`` for each name of
:data:`sqla_cachelayer.stats.COUNTERS`, read from ``stats(by="region")`` (two
layers of one process with a region of the same name are summed).
``sqla_cachelayer_hit_duration_seconds`` and
``sqla_cachelayer_miss_duration_seconds`` are histograms fed by a listener on
each layer. Serve them as usual: ``prometheus_client.start_http_server(port)``,
or ``make_wsgi_app()`` mounted in the application.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .._fork import at_fork_in_child, renew_after_fork
from ..events import CacheEvent
from ..stats import COUNTERS, verified_nines

__all__ = ["BUCKETS", "HELP", "PrometheusExporter"]

#: latency buckets, in seconds: a hit takes tens of microseconds, a miss up to seconds
BUCKETS = (
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

HELP = {
    "hits": "Queries answered from the cache",
    "misses": "Cacheable queries that went to the database",
    "stores": "Entries written after a miss",
    "bypasses": "Cacheable queries sent to the database on purpose",
    "invalidations": "Invalidations written (one per region per commit or invalidate call)",
    "errors": "Cache backend errors caught and survived",
    "not_stored": "Miss results served but not stored",
    "stale": "Entries found but refused (invalidated or expired)",
    "replays": "Failed invalidations replayed after an outage",
    "breaker_opened": "Times a region was switched off after a backend error",
    "breaker_closed": "Times a region's pause ended and the backend was tried again",
    "listener_errors": "Exceptions raised by cache event listeners",
    "verified": "Sampled hits re-checked against the database",
    "verified_stale": "Sampled hits found stale by the verifier",
    "verify_inconclusive": "Sampled hits a commit overtook before their re-check",
    "verify_dropped": "Sampled hits dropped because the verifier was busy",
}


class _Latencies:
    """Histogram counts kept per thread, without a lock on the query path.

    Each thread adds into lists of its own (``(kind, region)`` -> one count per
    bucket, then the sum of seconds), which only it writes; a scrape sums
    them, at worst one observation behind. prometheus-client's ``Histogram``
    takes a lock per observation: this costs a third of it.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()  # guards _shards and _retired
        self._shards: list[tuple[threading.Thread, dict[tuple[str, str], list[float]]]] = []
        self._retired: dict[tuple[str, str], list[float]] = {}
        renew_after_fork(self)

    def _after_fork_in_child(self) -> None:
        # a scrape in progress at the fork would hold the lock here forever
        self._lock = threading.Lock()

    def _shard(self) -> dict[tuple[str, str], list[float]]:
        shard: dict[tuple[str, str], list[float]] = {}
        self._local.shard = shard
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
                _add_counts(self._retired, shard)
        self._shards = alive

    def observe(self, kind: str, region: str, seconds: float) -> None:
        try:
            shard = self._local.shard
        except AttributeError:
            shard = self._shard()
        counts = shard.get((kind, region))
        if counts is None:
            counts = shard[(kind, region)] = [0.0] * (len(BUCKETS) + 2)
        counts[bisect_left(BUCKETS, seconds)] += 1
        counts[-1] += seconds

    def snapshot(self) -> dict[tuple[str, str], list[float]]:
        total: dict[tuple[str, str], list[float]] = {}
        with self._lock:
            self._fold_finished()
            _add_counts(total, self._retired)
            for _, shard in self._shards:
                _add_counts(total, shard)
        return total


def _add_counts(
    into: dict[tuple[str, str], list[float]], add: dict[tuple[str, str], list[float]]
) -> None:
    for key, counts in list(add.items()):
        found = into.get(key)
        if found is None:
            into[key] = list(counts)
        else:
            for i, value in enumerate(counts):
                found[i] += value


_DURATIONS = {
    "hit": ("sqla_cachelayer_hit_duration_seconds", "Time to answer a query from the cache"),
    "miss": (
        "sqla_cachelayer_miss_duration_seconds",
        "Time of a cache miss: the database query, recording and storing its result",
    ),
}


class _LayersCollector(Collector):
    """Reads every exporting layer's counters, and the latencies, at scrape time."""

    def __init__(self) -> None:
        self.layers: weakref.WeakSet[Any] = weakref.WeakSet()
        self.latencies = _Latencies()

    def collect(self) -> Iterator[Metric]:
        per_region: dict[str, dict[str, float]] = {}
        for layer in list(self.layers):
            for region, counts in layer.stats(by="region").items():
                into = per_region.setdefault(region, dict.fromkeys(COUNTERS, 0))
                for name in COUNTERS:
                    into[name] += counts[name]
        for name in COUNTERS:
            family = CounterMetricFamily(
                f"sqla_cachelayer_{name}", HELP.get(name, name), labels=["region"]
            )
            for region, counts in sorted(per_region.items()):
                family.add_metric([region], counts[name])
            yield family
        nines = GaugeMetricFamily(
            "sqla_cachelayer_verified_nines",
            "-log10(verified_stale / verified); +Inf while none was stale",
            labels=["region"],
        )
        for region, counts in sorted(per_region.items()):
            nines.add_metric(
                [region], verified_nines(int(counts["verified"]), int(counts["verified_stale"]))
            )
        yield nines
        latencies = self.latencies.snapshot()
        for kind, (name, help_text) in _DURATIONS.items():
            histogram = HistogramMetricFamily(name, help_text, labels=["region"])
            for (k, region), counts in sorted(latencies.items()):
                if k != kind:
                    continue
                cumulative = 0.0
                buckets = []
                for bound, count in zip((*BUCKETS, float("inf")), counts, strict=False):
                    cumulative += count
                    buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
                histogram.add_metric([region], buckets, counts[-1])
            yield histogram


_collectors: dict[int, tuple[CollectorRegistry, _LayersCollector]] = {}  # guarded by _lock
_lock = threading.Lock()


@at_fork_in_child
def _renew_lock() -> None:
    global _lock
    _lock = threading.Lock()


class PrometheusExporter:
    """Exports one layer to Prometheus (see the module docstring)."""

    def __init__(self, layer: Any, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else REGISTRY
        with _lock:
            found = _collectors.get(id(registry))
            if found is None or found[0] is not registry:
                collector = _LayersCollector()
                registry.register(collector)
                _collectors[id(registry)] = (registry, collector)
            else:
                collector = found[1]
        self.registry = registry
        self.layer = weakref.ref(layer)
        collector.layers.add(layer)
        self._collector = collector
        add = collector.latencies.observe

        def observe(event: CacheEvent) -> None:
            kind = event.kind
            if kind == "hit" or kind == "miss":
                add(kind, event.region or "", event.elapsed or 0.0)

        self.listener = observe
        layer.add_listener(observe)

    def close(self) -> None:
        """Stop exporting this layer (its counters leave the next scrape)."""
        layer = self.layer()
        if layer is None:
            return
        with contextlib.suppress(ValueError):
            layer.remove_listener(self.listener)
        self._collector.layers.discard(layer)
