"""A hung Redis (SIGSTOP) costs the same whatever form its connection settings take.

Each test builds a region with ``CacheLayer.from_settings`` in one of the forms
dogpile accepts, fills and hits an entry, hangs the server, then times ten
queries and a commit: the layer's bounds (1 s socket timeout, no retry by
redis-py itself, the breaker) must hold them under BOUND_SECONDS, where
redis-py's defaults took about 15 s for the first call alone. After the server
resumes, the old entry (still in Redis, its stamp never bumped by the commit
made during the hang) must never be served.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from _models import Base, User, seed
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

import sqla_cachelayer as scl
from sqla_cachelayer import FromCache

redis = pytest.importorskip("redis")

STMT = select(User.name).where(User.id == 1).options(FromCache())
BOUND_SECONDS = 3.0
# the breaker stays open this long after the first failure: longer than the
# hang's ten queries and commit take, short enough to see the region come back
BREAKER = "2"


def _layer(tmp_path: Any, backend: str, arguments: dict[str, Any]) -> tuple[Any, Any]:
    engine = scl.engine_from_config({"sqlalchemy.url": f"sqlite:///{tmp_path}/db.sqlite"})
    Base.metadata.create_all(engine)
    settings: dict[str, Any] = {
        "cachelayer.regions.default.backend": backend,
        "cachelayer.breaker_reset_seconds": BREAKER,
    }
    for name, value in arguments.items():
        settings[f"cachelayer.regions.default.arguments.{name}"] = value
    layer = scl.CacheLayer.from_settings(settings)
    Session = layer.install(sessionmaker(engine))
    seed(Session)
    return layer, Session


def _name(Session: Any) -> str:
    with Session() as s:
        return str(s.execute(STMT).scalar_one())


def _rename(Session: Any, name: str) -> None:
    with Session() as s:
        s.get(User, 1).name = name
        s.commit()


def check_hung_server(layer: Any, Session: Any, server: Any) -> float:
    """Ten queries and a commit on a hung server; then freshness once it is back."""
    assert _name(Session) == "user1"
    assert _name(Session) == "user1"
    assert layer.stats()["hits"] == 1, "the entry must be cached before the hang"
    server.pause()
    try:
        start = time.monotonic()
        for _ in range(5):
            assert _name(Session) == "user1"
        _rename(Session, "renamed")
        for _ in range(5):
            assert _name(Session) == "renamed"
        took = time.monotonic() - start
    finally:
        server.resume()
    assert layer.stats()["errors"] >= 1
    assert took < BOUND_SECONDS, f"10 queries and a commit took {took:.2f}s on a hung Redis"
    # back: every answer fresh, through the breaker's wait, the replay of the
    # commit's invalidation and the first hits of the region again
    hits = layer.stats()["hits"]
    deadline = time.monotonic() + 20
    while layer.stats()["hits"] < hits + 2:
        assert _name(Session) == "renamed"
        assert time.monotonic() < deadline, "the region never served hits again"
        time.sleep(0.05)
    assert layer.stats()["replays"] >= 1
    return took


def test_url(tmp_path: Any, redis_server_factory: Callable[..., Any]) -> None:
    server = redis_server_factory()
    layer, Session = _layer(tmp_path, "dogpile.cache.redis", {"url": server.url})
    check_hung_server(layer, Session, server)


def test_host_and_port(tmp_path: Any, redis_server_factory: Callable[..., Any]) -> None:
    server = redis_server_factory()
    layer, Session = _layer(
        tmp_path,
        "dogpile.cache.redis",
        {"host": "127.0.0.1", "port": str(server.port), "db": "0"},
    )
    check_hung_server(layer, Session, server)


def test_unix_socket_path(tmp_path: Any, redis_server_factory: Callable[..., Any]) -> None:
    server = redis_server_factory(unix_socket=True)
    layer, Session = _layer(
        tmp_path, "dogpile.cache.redis", {"unix_socket_path": server.unix_socket_path}
    )
    client = layer.regions["default"].backend.writer_client
    assert client.connection_pool.connection_kwargs["path"] == server.unix_socket_path
    check_hung_server(layer, Session, server)


def test_connection_pool(tmp_path: Any, redis_server_factory: Callable[..., Any]) -> None:
    server = redis_server_factory()
    pool = redis.ConnectionPool(host="127.0.0.1", port=server.port)
    layer, Session = _layer(tmp_path, "dogpile.cache.redis", {"connection_pool": pool})
    assert layer.regions["default"].backend.writer_client.connection_pool is pool
    check_hung_server(layer, Session, server)


def test_connection_pool_keeps_its_own_timeout(redis_server_factory: Callable[..., Any]) -> None:
    server = redis_server_factory()
    pool = redis.ConnectionPool(host="127.0.0.1", port=server.port, socket_timeout=7)
    scl.CacheLayer.from_settings(
        {
            "cachelayer.regions.default.backend": "dogpile.cache.redis",
            "cachelayer.regions.default.arguments.connection_pool": pool,
        }
    )
    assert pool.connection_kwargs["socket_timeout"] == 7
    assert pool.connection_kwargs["socket_connect_timeout"] == 0.5


def test_sentinel(tmp_path: Any, redis_server_factory: Callable[..., Any]) -> None:
    server = redis_server_factory()
    sentinel = redis_server_factory(sentinel_of=server.port)
    layer, Session = _layer(
        tmp_path,
        "dogpile.cache.redis_sentinel",
        {
            "sentinels": f"127.0.0.1:{sentinel.port}",  # the ini form
            "service_name": sentinel.SENTINEL_SERVICE,
            "distributed_lock": "false",
        },
    )
    check_hung_server(layer, Session, server)


def test_hung_sentinel(tmp_path: Any, redis_server_factory: Callable[..., Any]) -> None:
    """The sentinel itself hung: a new connection asks it for the master first."""
    server = redis_server_factory()
    sentinel = redis_server_factory(sentinel_of=server.port)
    layer, Session = _layer(
        tmp_path,
        "dogpile.cache.redis_sentinel",
        {
            "sentinels": [["127.0.0.1", sentinel.port]],
            "service_name": sentinel.SENTINEL_SERVICE,
            "distributed_lock": "false",
        },
    )
    assert _name(Session) == "user1"
    backend = layer.regions["default"].backend
    # drop the pooled connections: the next ones must ask the (hung) sentinel
    backend.writer_client.connection_pool.disconnect()
    backend.reader_client.connection_pool.disconnect()
    sentinel.pause()
    try:
        start = time.monotonic()
        for _ in range(5):
            assert _name(Session) == "user1"
        _rename(Session, "renamed")
        for _ in range(5):
            assert _name(Session) == "renamed"
        took = time.monotonic() - start
    finally:
        sentinel.resume()
    assert took < BOUND_SECONDS, f"10 queries and a commit took {took:.2f}s"


def test_programmatic_region_with_library_retries_warns(
    redis_server_factory: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A region the application built keeps its client; the layer says what it costs."""
    from dogpile.cache import make_region

    from sqla_cachelayer.backends.redis import bounded_arguments

    server = redis_server_factory()
    plain = make_region().configure(
        "dogpile.cache.redis", arguments={"host": "127.0.0.1", "port": server.port}
    )
    with caplog.at_level(logging.WARNING, logger="sqla_cachelayer"):
        scl.CacheLayer({"default": plain})
    assert "retries a timed-out call 10 times" in caplog.text
    caplog.clear()
    bounded = make_region().configure(
        "dogpile.cache.redis",
        arguments=bounded_arguments(
            "dogpile.cache.redis", {"host": "127.0.0.1", "port": server.port}
        ),
    )
    with caplog.at_level(logging.WARNING, logger="sqla_cachelayer"):
        scl.CacheLayer({"default": bounded})
    assert "Redis region" not in caplog.text


def test_bad_sentinels_setting_names_the_key() -> None:
    with pytest.raises(scl.ConfigurationError) as info:
        scl.CacheLayer.from_settings(
            {
                "cachelayer.regions.default.backend": "dogpile.cache.redis_sentinel",
                "cachelayer.regions.default.arguments.sentinels": "nohostport",
            }
        )
    assert info.value.key == "cachelayer.regions.default.arguments.sentinels"
    assert info.value.value == "nohostport"
