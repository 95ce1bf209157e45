"""Exporters of the layer's counters and latencies (optional extras).

Enabled by the setting ``cachelayer.metrics`` (``prometheus`` and/or
``opentelemetry``, comma-separated), or ``CacheLayer(metrics=...)``:

``prometheus`` (``pip install 'sqla_cachelayer[prometheus]'``)
    :class:`~sqla_cachelayer.metrics.prometheus.PrometheusExporter`: the
    counters of every such layer, per region, read at scrape time from
    ``stats(by="region")``, and latency histograms fed by listener events,
    on prometheus-client's default registry.
``opentelemetry`` (``pip install 'sqla_cachelayer[opentelemetry]'``)
    :class:`~sqla_cachelayer.metrics.opentelemetry.OpenTelemetryExporter`:
    the same through the OpenTelemetry metrics API, and a span for each miss
    and each invalidation through its tracing API.

The libraries are imported only when an exporter is enabled.
"""

from __future__ import annotations

from typing import Any

__all__ = ["enable_exporter"]


def enable_exporter(layer: Any, name: str) -> Any:
    """Attach the exporter called ``name`` to ``layer``; returns it."""
    if name == "prometheus":
        from .prometheus import PrometheusExporter

        return PrometheusExporter(layer)
    if name == "opentelemetry":
        from .opentelemetry import OpenTelemetryExporter

        return OpenTelemetryExporter(layer)
    raise ValueError(f"unknown exporter {name!r} (known: prometheus, opentelemetry)")
