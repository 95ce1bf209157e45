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
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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


class _LayersCollector(Collector):
    """Reads every exporting layer's counters at scrape time."""

    def __init__(self) -> None:
        self.layers: weakref.WeakSet[Any] = weakref.WeakSet()

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
            "-log10(verified_stale / verified); log10(verified) while none was stale",
            labels=["region"],
        )
        for region, counts in sorted(per_region.items()):
            nines.add_metric(
                [region], verified_nines(int(counts["verified"]), int(counts["verified_stale"]))
            )
        yield nines


class _Process:
    """What one process registers once: the collector and the two histograms."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.collector = _LayersCollector()
        registry.register(self.collector)
        self.hit_seconds = Histogram(
            "sqla_cachelayer_hit_duration_seconds",
            "Time to answer a query from the cache",
            ["region"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.miss_seconds = Histogram(
            "sqla_cachelayer_miss_duration_seconds",
            "Time of a cache miss: the database query, recording and storing its result",
            ["region"],
            buckets=BUCKETS,
            registry=registry,
        )


_processes: dict[int, _Process] = {}  # id(registry) -> its registration; guarded by _lock
_lock = threading.Lock()


class PrometheusExporter:
    """Exports one layer to Prometheus (see the module docstring)."""

    def __init__(self, layer: Any, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else REGISTRY
        with _lock:
            process = _processes.get(id(registry))
            if process is None or process.registry is not registry:
                process = _processes[id(registry)] = _Process(registry)
        self.registry = registry
        self.layer = weakref.ref(layer)
        process.collector.layers.add(layer)
        # region -> its histogram child, so a hit pays no labels() lookup
        hits: dict[str, Any] = {}
        misses: dict[str, Any] = {}
        hit_family, miss_family = process.hit_seconds, process.miss_seconds

        def observe(event: CacheEvent) -> None:
            kind = event.kind
            if kind == "hit":
                child = hits.get(event.region)  # type: ignore[arg-type]
                if child is None:
                    child = hits[event.region] = hit_family.labels(event.region)  # type: ignore[index]
                child.observe(event.elapsed or 0.0)
            elif kind == "miss":
                child = misses.get(event.region)  # type: ignore[arg-type]
                if child is None:
                    child = misses[event.region] = miss_family.labels(event.region)  # type: ignore[index]
                child.observe(event.elapsed or 0.0)

        self.listener = observe
        layer.add_listener(observe)

    def close(self) -> None:
        """Stop exporting this layer (its counters leave the next scrape)."""
        layer = self.layer()
        if layer is None:
            return
        with contextlib.suppress(ValueError):
            layer.remove_listener(self.listener)
        process = _processes.get(id(self.registry))
        if process is not None:
            process.collector.layers.discard(layer)
