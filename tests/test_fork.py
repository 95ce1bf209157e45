"""A process forked while another thread is inside a slow miss (holding that
key's single-flight lock) can query the same key: every lock of the layer is
fresh in the child."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _models import Base, User
from dogpile.cache import make_region
from sqlalchemy import create_engine, event, func, select
from sqlalchemy.orm import Session, sessionmaker

import sqla_cachelayer as scl

_PARENT = os.getpid()
entered = threading.Event()
release = threading.Event()


def _gate(value: int) -> int:
    # inside the parent's miss: hold it there until the test lets go; a forked
    # child runs the same SQL and passes straight through
    if os.getpid() == _PARENT:
        entered.set()
        release.wait(60)
    return value


def _child(factory: Any, engine: Any, stmt: Any, out: Any) -> None:
    engine.dispose(close=False)  # the parent's pooled connections stay the parent's
    with factory() as s:
        out.put(s.execute(stmt).all())


@pytest.mark.parametrize("backend", ["dogpile.cache.memory", "sqla_cachelayer.memory"])
def test_child_forked_during_a_slow_miss_queries_the_same_key(tmp_path: Path, backend: str) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/fork.db")

    @event.listens_for(engine, "connect")
    def _register(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.create_function("gate", 1, _gate)

    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(User(id=1, name="one"))
        s.commit()
    layer = scl.CacheLayer({"default": make_region().configure(backend)})
    factory = layer.install(sessionmaker(engine))
    stmt = select(User.id, func.gate(User.id)).where(User.id == 1).options(scl.FromCache())
    entered.clear()
    release.clear()
    results: list[Any] = []
    miss = threading.Thread(target=lambda: results.append(_run(factory, stmt)))
    miss.start()
    try:
        assert entered.wait(30), "the parent's miss never reached the database"
        alive, exitcode, got = _run_forked(_child, factory, engine, stmt)
        assert not alive, "the child blocked on a lock the parent's thread held at the fork"
        assert exitcode == 0
        assert got == [(1, 1)]
    finally:
        release.set()
        miss.join(30)
    assert results == [[(1, 1)]]
    assert _run(factory, stmt) == [(1, 1)]
    assert layer.stats()["hits"] == 1


def _run(factory: Any, stmt: Any) -> Any:
    with factory() as s:
        return s.execute(stmt).all()


def _run_forked(target: Any, *args: Any) -> tuple[bool, int | None, Any]:
    """Fork a child running ``target(*args, out)``: whether it was still alive
    after 30 s (then killed), its exit code, and what it put on ``out`` (None if
    nothing came)."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=target, args=(*args, out))
    child.start()
    child.join(30)
    alive = child.is_alive()
    if alive:
        child.kill()
        child.join()
    try:
        got = out.get(timeout=5)
    except queue.Empty:
        got = None
    return alive, child.exitcode, got


@contextlib.contextmanager
def _held_by_a_thread(lock: Any) -> Iterator[None]:
    """While the block runs, another thread of this process holds ``lock``."""
    holding = threading.Event()
    done = threading.Event()

    def hold() -> None:
        with lock:
            holding.set()
            done.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(30)
        yield
    finally:
        done.set()
        holder.join(30)


def _count_in_child(stats: Any, out: Any) -> None:
    stats._add("calls")  # blocks forever if the child inherited a held lock
    out.put(stats.snapshot()["calls"])


def test_retry_stats_usable_in_a_child_forked_while_a_thread_counts() -> None:
    from sqla_cachelayer.retry import RetryStats

    stats = RetryStats()
    stats._add("calls")
    # a thread of the parent inside an increment at the moment of the fork
    with _held_by_a_thread(stats._lock):
        alive, exitcode, got = _run_forked(_count_in_child, stats)
        assert not alive, "the child blocked on RetryStats' lock, held by a parent thread"
        assert exitcode == 0
        assert got == 2
    assert stats.snapshot()["calls"] == 1  # the child's count stayed the child's


def _lock_holders() -> dict[str, Any]:
    """Each remaining lock of the package's own, as ``name -> (owner, attribute)``."""
    from sqla_cachelayer.backends.redis import RedisBackend
    from sqla_cachelayer.metrics import opentelemetry as otel_mod
    from sqla_cachelayer.metrics import prometheus as prom_mod

    layer = scl.CacheLayer(
        {"default": make_region().configure("dogpile.cache.memory")}, verify_sample_rate=0.5
    )
    backend = RedisBackend({"url": "redis://127.0.0.1:1/0"})
    return {
        "verifier lock": (layer._verifier, "_lock"),
        "verifier idle condition": (layer._verifier, "_idle"),
        "prometheus collector lock": (prom_mod._Latencies(), "_lock"),
        "prometheus registry lock": (prom_mod, "_lock"),
        "opentelemetry lock": (otel_mod, "_lock"),
        "redis async client lock": (backend, "_async_lock"),
    }


def _acquire_in_child(owner: Any, attribute: str, out: Any) -> None:
    lock = getattr(owner, attribute)
    got = lock.acquire(timeout=10)
    out.put(got)


@pytest.mark.parametrize(
    "name",
    [
        "verifier lock",
        "verifier idle condition",
        "prometheus collector lock",
        "prometheus registry lock",
        "opentelemetry lock",
        "redis async client lock",
    ],
)
def test_locks_are_fresh_in_a_child_forked_while_a_thread_holds_them(name: str) -> None:
    owner, attribute = _lock_holders()[name]
    with _held_by_a_thread(getattr(owner, attribute)):
        _, _, got = _run_forked(_acquire_in_child, owner, attribute)
        assert got is True, f"{name}: still held in the child"


def _verifier_state(layer: Any, out: Any) -> None:
    verifier = layer._verifier
    out.put((verifier._token, dict(verifier._totals), dict(verifier._unpublished)))


def test_a_forked_worker_reports_its_own_verifier_totals() -> None:
    """Workers forked from one parent publish their verifier totals under a
    token of their own, starting from zero: the parent's checks are the
    parent's, and no two workers overwrite each other's report."""
    layer = scl.CacheLayer(
        {"default": make_region().configure("dogpile.cache.memory")}, verify_sample_rate=0.5
    )
    verifier = layer._verifier
    verifier._totals[0] = [7, 1]  # checks the parent made before the fork
    ctx = multiprocessing.get_context("fork")
    tokens = set()
    for _ in range(2):
        out = ctx.Queue()
        child = ctx.Process(target=_verifier_state, args=(layer, out))
        child.start()
        token, totals, unpublished = out.get(timeout=30)
        child.join(30)
        assert totals == {} and unpublished == {}
        tokens.add(token)
    assert verifier._token not in tokens and len(tokens) == 2
    assert verifier._totals == {0: [7, 1]}
