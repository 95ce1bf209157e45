"""OpenTelemetry export through its metrics and tracing API (the ``opentelemetry`` extra).

Instruments, from the global meter provider (``metrics.get_meter("sqla_cachelayer")``):

* ``sqla_cachelayer.<counter>``: an observable counter per name of
  :data:`sqla_cachelayer.stats.COUNTERS`, attribute ``region``, read from
  ``stats(by="region")`` when the metric reader collects;
* ``sqla_cachelayer.hit.duration`` and ``sqla_cachelayer.miss.duration``:
  histograms in seconds, fed by a listener.

Spans, from the global tracer provider: one ``sqla_cachelayer miss`` span
per miss and one ``sqla_cachelayer invalidate`` span per invalidation of a
region, in the context current when they happened (so under the request's
span), timed from the event's ``elapsed``. The layer makes no other calls:
configure the SDK (providers, exporters) as for any instrumented library.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Any

from opentelemetry import metrics, trace

from .._fork import at_fork_in_child
from ..events import CacheEvent
from ..stats import COUNTERS

__all__ = ["OpenTelemetryExporter"]

_layers: weakref.WeakSet[Any] = weakref.WeakSet()
_instruments: dict[str, Any] = {}  # created once per process; guarded by _lock
_lock = threading.Lock()


@at_fork_in_child
def _renew_lock() -> None:
    global _lock
    _lock = threading.Lock()


def _observer(name: str) -> Any:
    def observe(options: Any) -> Iterable[metrics.Observation]:
        totals: dict[str, float] = {}
        for layer in list(_layers):
            for region, counts in layer.stats(by="region").items():
                totals[region] = totals.get(region, 0) + counts[name]
        return [metrics.Observation(v, {"region": r}) for r, v in sorted(totals.items())]

    return observe


def _setup() -> dict[str, Any]:
    with _lock:
        if not _instruments:
            meter = metrics.get_meter("sqla_cachelayer")
            for name in COUNTERS:
                meter.create_observable_counter(
                    f"sqla_cachelayer.{name}", callbacks=[_observer(name)], unit="1"
                )
            _instruments["hit"] = meter.create_histogram(
                "sqla_cachelayer.hit.duration", unit="s", description="Cache hit latency"
            )
            _instruments["miss"] = meter.create_histogram(
                "sqla_cachelayer.miss.duration", unit="s", description="Cache miss latency"
            )
        return _instruments


class OpenTelemetryExporter:
    """Exports one layer through OpenTelemetry (see the module docstring)."""

    def __init__(self, layer: Any) -> None:
        instruments = _setup()
        _layers.add(layer)
        self.layer = weakref.ref(layer)
        hit_histogram, miss_histogram = instruments["hit"], instruments["miss"]
        tracer = trace.get_tracer("sqla_cachelayer")
        attributes: dict[str | None, dict[str, str]] = {}

        def span(name: str, event: CacheEvent, extra: dict[str, Any]) -> None:
            end = time.time_ns()
            start = end - int((event.elapsed or 0.0) * 1e9)
            span = tracer.start_span(name, start_time=start, attributes=extra)
            span.end(end_time=end)

        def observe(event: CacheEvent) -> None:
            kind = event.kind
            if kind == "hit":
                labels = attributes.get(event.region)
                if labels is None:
                    labels = attributes[event.region] = {"region": str(event.region)}
                hit_histogram.record(event.elapsed, labels)
            elif kind == "miss":
                labels = attributes.get(event.region)
                if labels is None:
                    labels = attributes[event.region] = {"region": str(event.region)}
                miss_histogram.record(event.elapsed, labels)
                span(
                    "sqla_cachelayer miss",
                    event,
                    {
                        "sqla_cachelayer.region": str(event.region),
                        "sqla_cachelayer.fingerprint": event.fingerprint or "",
                    },
                )
            elif kind == "invalidate":
                span(
                    "sqla_cachelayer invalidate",
                    event,
                    {
                        "sqla_cachelayer.region": str(event.region),
                        "sqla_cachelayer.tables": list(event.tables or ()),
                        "sqla_cachelayer.cause": str(event.cause),
                    },
                )

        self.listener = observe
        layer.add_listener(observe)

    def close(self) -> None:
        """Stop exporting this layer."""
        layer = self.layer()
        if layer is None:
            return
        with contextlib.suppress(ValueError):
            layer.remove_listener(self.listener)
        _layers.discard(layer)
