"""Listeners, events, stats(by=...) and the DEBUG bypass log, on real SQLite files."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest
from _models import User
from conftest import CacheEnv
from dogpile.cache import make_region
from sqlalchemy import select, update

import sqla_cachelayer as scl
from sqla_cachelayer.events import CacheEvent
from sqla_cachelayer.stats import COUNTERS


def _user(env: CacheEnv, uid: int, **hint: Any) -> Any:
    with env.Session() as s:
        return s.scalars(select(User).where(User.id == uid).options(scl.FromCache(**hint))).one()


def _record(layer: Any) -> list[CacheEvent]:
    events: list[CacheEvent] = []
    layer.add_listener(events.append)
    return events


def test_event_order_and_payloads_for_miss_hit_and_commit(
    make_env: Callable[..., CacheEnv],
) -> None:
    env = make_env()
    events = _record(env.layer)
    _user(env, 1)
    assert [e.kind for e in events] == ["miss", "store"]
    miss, store = events
    assert miss.region == "default" and store.region == "default"
    assert miss.fingerprint is not None and len(miss.fingerprint) <= 64
    assert store.fingerprint == miss.fingerprint
    assert miss.elapsed is not None and miss.elapsed > 0 and store.elapsed is None
    events.clear()

    _user(env, 1)
    [hit] = events
    assert hit.kind == "hit" and hit.fingerprint == miss.fingerprint
    assert hit.elapsed is not None and 0 < hit.elapsed < miss.elapsed * 10
    events.clear()

    _user(env, 2)  # same structure, another value: same fingerprint
    assert [e.kind for e in events] == ["miss", "store"]
    assert events[0].fingerprint == miss.fingerprint
    events.clear()
    with env.Session() as s:  # another statement: another fingerprint
        s.scalars(select(User).where(User.name == "x").options(scl.FromCache())).all()
    assert events[0].kind == "miss" and events[0].fingerprint != miss.fingerprint
    events.clear()

    with env.Session() as s:
        s.get(User, 1).name = "renamed"
        s.commit()
    invalidations = [e for e in events if e.kind == "invalidate"]
    assert len(invalidations) == 1
    [inv] = invalidations
    assert inv.cause == "commit" and inv.region == "default" and "users" in inv.tables
    assert inv.fingerprint is None and inv.elapsed is not None
    events.clear()

    assert _user(env, 1).name == "renamed"
    assert [e.kind for e in events] == ["miss", "store"]  # the entry was refused
    events.clear()
    env.layer.invalidate(User)
    env.layer.invalidate_all()
    env.layer.invalidate(User, id=[1, 2])
    assert [(e.kind, e.cause, e.tables, e.values) for e in events] == [
        ("invalidate", "manual", ("users",), None),
        ("invalidate", "manual", ("*all*",), None),
        ("invalidate", "manual", ("users",), {"id": [1, 2]}),
    ]


def test_bypass_events_carry_a_reason(make_env: Callable[..., CacheEnv]) -> None:
    env = make_env()
    events = _record(env.layer)
    with env.Session() as s:
        s.scalars(select(User).where(User.id == 1).options(scl.NoCache())).all()
        s.scalars(select(User).options(scl.FromCache()).with_for_update()).all()
        s.scalars(
            select(User).options(scl.FromCache()).execution_options(populate_existing=True)
        ).all()
        s.scalars(select(User).options(scl.FromCache("nowhere"))).all()
        s.get(User, 1).name = "pending"
        s.flush()
        s.scalars(select(User).options(scl.FromCache())).all()
    reasons = [(e.kind, e.reason) for e in events]
    assert reasons == [
        ("bypass", "opt_out"),
        ("bypass", "for_update"),
        ("bypass", "populate_existing"),
        ("bypass", "unknown_region"),
        ("bypass", "own_writes"),
    ]
    assert events[0].fingerprint is not None and events[3].fingerprint is None
    assert env.layer.stats()["bypasses"] == 5


def test_a_raising_listener_is_contained_logged_and_counted(
    make_env: Callable[..., CacheEnv], caplog: pytest.LogCaptureFixture
) -> None:
    env = make_env()
    seen: list[str] = []

    def broken(event: CacheEvent) -> None:
        raise RuntimeError("listener bug")

    env.layer.add_listener(broken)
    env.layer.add_listener(lambda e: seen.append(e.kind))
    with caplog.at_level(logging.ERROR, logger="sqla_cachelayer.events"):
        assert _user(env, 1).id == 1  # the query is not failed by the listener
        assert _user(env, 1).id == 1
    assert seen == ["miss", "store", "hit"], "the other listener still gets every event"
    assert env.layer.stats()["listener_errors"] == 3
    assert sum("listener bug" in r.exc_text for r in caplog.records if r.exc_text) == 3

    env.layer.remove_listener(broken)
    _user(env, 1)
    assert env.layer.stats()["listener_errors"] == 3 and seen[-1] == "hit"
    with pytest.raises(ValueError):
        env.layer.remove_listener(broken)
    with pytest.raises(TypeError):
        env.layer.add_listener("not callable")  # type: ignore[arg-type]


def test_breaker_and_error_events(make_env: Callable[..., CacheEnv]) -> None:
    region = make_region().configure("dogpile.cache.memory")
    env = make_env(region, breaker_reset_seconds=0.0)
    events = _record(env.layer)
    failing = {"on": True}
    store = env.layer._states["default"].store
    real_lookup = store.lookup

    def lookup(*args: Any) -> Any:
        if failing["on"]:
            raise ConnectionError("backend down")
        return real_lookup(*args)

    store.lookup = lookup
    assert _user(env, 1).id == 1
    kinds = [(e.kind, e.operation or e.state or e.reason) for e in events]
    assert kinds == [("error", "lookup"), ("breaker", "opened"), ("bypass", "backend_error")]
    assert isinstance(events[0].error, ConnectionError)
    events.clear()
    failing["on"] = False
    _user(env, 1)
    assert [e.kind for e in events][:1] == ["breaker"] and events[0].state == "closed"


def test_stats_by_region_sums_to_stats(make_env: Callable[..., CacheEnv]) -> None:
    regions = {
        "default": make_region().configure("dogpile.cache.memory"),
        "long": make_region().configure("dogpile.cache.memory"),
    }
    env = make_env(regions)
    seeded = env.layer.stats()["invalidations"]
    _user(env, 1)
    _user(env, 1)
    _user(env, 1, region="long")
    with env.Session() as s:
        s.scalars(select(User).options(scl.NoCache())).all()
        s.execute(update(User).where(User.id == 2).values(score=5))
        s.commit()
    by_region = env.layer.stats(by="region")
    assert set(by_region) == {"default", "long"}
    assert by_region["default"]["hits"] == 1 and by_region["default"]["misses"] == 1
    assert by_region["long"]["hits"] == 0 and by_region["long"]["misses"] == 1
    assert by_region["default"]["bypasses"] == 1, "a NoCache opt-out counts in the default region"
    total = env.layer.stats()
    for name in COUNTERS:
        assert total[name] == sum(r[name] for r in by_region.values()), name
    assert total["invalidations"] - seeded == 2, "one commit bumps both regions"
    with pytest.raises(ValueError):
        env.layer.stats(by="table")  # type: ignore[call-overload]


def test_stats_by_query(make_env: Callable[..., CacheEnv]) -> None:
    env = make_env()
    for _ in range(3):
        _user(env, 1)
        _user(env, 2)
    with env.Session() as s:
        s.scalars(select(User).where(User.name == "nobody").options(scl.FromCache())).all()
        s.get(User, 1).score = 9
        s.commit()
    _user(env, 1)  # refused (stale), then a miss
    rows = env.layer.stats(by="query")
    assert len(rows) == 2
    busiest, other = rows
    assert busiest["hits"] == 4 and busiest["misses"] == 3 and busiest["stale"] == 1
    assert other["hits"] == 0 and other["misses"] == 1
    assert "users.id = " in busiest["sql"] and "users.name = " in other["sql"]
    assert busiest["mean_hit_seconds"] > 0 and busiest["mean_miss_seconds"] > 0
    assert other["mean_hit_seconds"] is None
    assert busiest["fingerprint"] != other["fingerprint"]
    assert busiest["hit_ratio"] == pytest.approx(4 / 7)


def test_stats_by_query_counts_from_many_threads(make_env: Callable[..., CacheEnv]) -> None:
    env = make_env()
    _user(env, 1)
    n, per = 4, 50
    barrier = threading.Barrier(n)

    def work() -> None:
        barrier.wait()
        for _ in range(per):
            _user(env, 1)

    threads = [threading.Thread(target=work) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    [row] = env.layer.stats(by="query")
    assert row["hits"] == n * per and row["misses"] == 1
    assert env.layer.stats()["hits"] == n * per


def test_debug_log_says_why_a_query_was_not_cached(
    make_env: Callable[..., CacheEnv], caplog: pytest.LogCaptureFixture
) -> None:
    env = make_env()
    with caplog.at_level(logging.DEBUG, logger="sqla_cachelayer.bypass"), env.Session() as s:
        s.scalars(select(User).options(scl.FromCache()).with_for_update()).all()
        s.get(User, 1).name = "pending"
        s.flush()
        s.scalars(select(User).options(scl.FromCache()).execution_options()).all()
    messages = [r.getMessage() for r in caplog.records if r.name == "sqla_cachelayer.bypass"]
    assert any("not cached (for_update)" in m for m in messages), messages
    assert any("not cached (own_writes)" in m for m in messages), messages


def test_debug_log_says_why_a_result_was_not_stored(
    make_env: Callable[..., CacheEnv], caplog: pytest.LogCaptureFixture
) -> None:
    env = make_env(real_transactions=True)
    with caplog.at_level(logging.DEBUG, logger="sqla_cachelayer.bypass"), env.Session() as s1:
        s1.get(User, 3)  # the transaction (and its snapshot) starts here
        with env.Session() as s2:
            s2.get(User, 1).score = 11
            s2.commit()
        # a miss from a snapshot older than that commit: served, not published (G3)
        s1.scalars(select(User).where(User.id == 1).options(scl.FromCache())).all()
    messages = [r.getMessage() for r in caplog.records if r.name == "sqla_cachelayer.bypass"]
    assert any("result not stored (overtaken_by_commit)" in m for m in messages), messages
    assert env.layer.stats()["not_stored"] == 1
