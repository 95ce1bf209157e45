"""Exporters: Prometheus read over real HTTP, OpenTelemetry spans and metrics in memory."""

from __future__ import annotations

import re
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _models import User
from conftest import CacheEnv
from dogpile.cache import make_region
from sqlalchemy import select

import sqla_cachelayer as scl


def _user(env: CacheEnv, uid: int, region: str) -> Any:
    with env.Session() as s:
        return s.scalars(select(User).where(User.id == uid).options(scl.FromCache(region))).one()


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the exposition text."""
    for line in text.splitlines():
        if line.startswith(name + "{"):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name) : line.index("}") + 1]))
            if found == labels:
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name}{labels} in:\n{text}")


def test_prometheus_exposition_over_http(make_env: Callable[..., CacheEnv]) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    region = f"r{uuid.uuid4().hex[:8]}"  # the default registry is shared by the process
    env = make_env(
        {region: make_region().configure("dogpile.cache.memory")},
        default_region=region,
        metrics="prometheus",
    )
    # a second exporting layer in the process shares the one registration
    other = make_env(
        {region: make_region().configure("dogpile.cache.memory")},
        default_region=region,
        metrics="prometheus",
    )
    for _ in range(3):
        _user(env, 1, region)
    _user(env, 2, region)
    with env.Session() as s:
        s.get(User, 1).score = 7
        s.commit()
    server, thread = prometheus_client.start_http_server(0, addr="127.0.0.1")
    try:
        port = server.server_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert response.status == 200
            text = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    stats = env.layer.stats(by="region")[region]
    assert other.layer.stats()["hits"] == 0
    assert _sample(text, "sqla_cachelayer_hits_total", region=region) == 2 == stats["hits"]
    assert _sample(text, "sqla_cachelayer_misses_total", region=region) == 2
    assert _sample(text, "sqla_cachelayer_stores_total", region=region) == 2
    # two layers with a region of the same name are summed
    both = stats["invalidations"] + other.layer.stats()["invalidations"]
    assert _sample(text, "sqla_cachelayer_invalidations_total", region=region) == both
    assert "# TYPE sqla_cachelayer_hits_total counter" in text
    assert "# TYPE sqla_cachelayer_hit_duration_seconds histogram" in text
    assert _sample(text, "sqla_cachelayer_hit_duration_seconds_count", region=region) == 2
    assert _sample(text, "sqla_cachelayer_miss_duration_seconds_count", region=region) == 2
    assert (
        _sample(text, "sqla_cachelayer_hit_duration_seconds_bucket", region=region, le="+Inf") == 2
    )
    assert 0 < _sample(text, "sqla_cachelayer_miss_duration_seconds_sum", region=region) < 60

    [exporter] = env.layer.exporters
    exporter.close()
    _user(env, 1, region)
    text = prometheus_client.generate_latest().decode()
    # the closed layer's counters left; the other layer's (no hits) remain
    assert _sample(text, "sqla_cachelayer_hits_total", region=region) == 0


@pytest.fixture(scope="module")
def otel() -> Iterator[tuple[Any, Any]]:
    """Global SDK providers with in-memory exporters (set once per process)."""
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    trace.set_tracer_provider(provider)
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    yield spans, reader


def test_opentelemetry_spans_and_metrics(
    make_env: Callable[..., CacheEnv], otel: tuple[Any, Any]
) -> None:
    from opentelemetry import trace

    spans, reader = otel
    region = f"r{uuid.uuid4().hex[:8]}"
    env = make_env(
        {region: make_region().configure("dogpile.cache.memory")},
        default_region=region,
        metrics="opentelemetry",
    )
    spans.clear()
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("request") as request:
        _user(env, 1, region)  # miss: a span
        _user(env, 1, region)  # hit: none
        with env.Session() as s:
            s.get(User, 1).score = 3
            s.commit()  # an invalidation: a span
    finished = {s.name: s for s in spans.get_finished_spans()}
    assert set(finished) == {"request", "sqla_cachelayer miss", "sqla_cachelayer invalidate"}
    miss = finished["sqla_cachelayer miss"]
    assert miss.attributes["sqla_cachelayer.region"] == region
    assert len(miss.attributes["sqla_cachelayer.fingerprint"]) == 40
    assert miss.parent is not None and miss.parent.span_id == request.get_span_context().span_id
    assert miss.end_time > miss.start_time
    invalidate = finished["sqla_cachelayer invalidate"]
    assert "users" in invalidate.attributes["sqla_cachelayer.tables"]
    assert invalidate.attributes["sqla_cachelayer.cause"] == "commit"

    data = reader.get_metrics_data()
    points: dict[str, Any] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    if point.attributes.get("region") == region:
                        points[metric.name] = point
    assert points["sqla_cachelayer.hits"].value == 1
    assert points["sqla_cachelayer.misses"].value == 1
    assert points["sqla_cachelayer.hit.duration"].count == 1
    assert points["sqla_cachelayer.miss.duration"].count == 1


@pytest.mark.parametrize(
    ("value", "message"),
    [("statsd", "unknown exporter 'statsd'"), ("prometheus, graphite", "unknown exporter")],
)
def test_metrics_setting_rejects_unknown_exporters(value: str, message: str) -> None:
    with pytest.raises(scl.ConfigurationError) as info:
        scl.CacheLayer.from_settings({"cachelayer.metrics": value})
    assert info.value.key == "cachelayer.metrics" and info.value.value == value
    assert message in str(info.value)


def test_metrics_setting_names_a_missing_library(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    with pytest.raises(scl.ConfigurationError) as info:
        scl.CacheLayer.from_settings({"cachelayer.metrics": "prometheus"})
    assert info.value.key == "cachelayer.metrics"
    assert "sqla_cachelayer[prometheus]" in str(info.value)
