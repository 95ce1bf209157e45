"""G5: the cache is never required. A broken backend fails no query and no commit,
errors are counted, and a write whose invalidation failed never lets an older entry
be served once the backend is back."""

from __future__ import annotations

import threading
from typing import Any

from _models import User
from dogpile.cache import make_region
from dogpile.cache.proxy import ProxyBackend
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from sqla_cachelayer import CacheLayer, FromCache, NoCache


class Outage(ProxyBackend):
    """Every call fails while ``down`` is set, as a dead server's client would."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.calls = 0
        self.fail_next = 0

    def _check(self) -> None:
        self.calls += 1
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("cache backend hiccup")
        if self.down:
            raise ConnectionError("cache backend unreachable")

    def get(self, key: Any) -> Any:
        self._check()
        return self.proxied.get(key)

    def get_multi(self, keys: Any) -> Any:
        self._check()
        return self.proxied.get_multi(keys)

    def set(self, key: Any, value: Any) -> None:
        self._check()
        self.proxied.set(key, value)

    def set_multi(self, mapping: Any) -> None:
        self._check()
        self.proxied.set_multi(mapping)

    def delete(self, key: Any) -> None:
        self._check()
        self.proxied.delete(key)

    def get_mutex(self, key: Any) -> Any:
        self._check()
        return self.proxied.get_mutex(key)


def _env_with_outage(make_env: Any, **kw: Any) -> tuple[Any, Outage]:
    proxy = Outage()
    region = make_region().configure("dogpile.cache.memory", wrap=[proxy])
    env = make_env(region=region, breaker_reset_seconds=kw.pop("breaker_reset_seconds", 0), **kw)
    return env, proxy


STMT = select(User.id, User.name).order_by(User.id).options(FromCache())


def _names(env: Any) -> list[Any]:
    with env.Session() as s:
        return [tuple(r) for r in s.execute(STMT)]


def test_queries_and_commits_work_while_backend_is_down(make_env: Any) -> None:
    env, proxy = _env_with_outage(make_env)
    proxy.down = True
    assert _names(env)[0] == (1, "user1")
    with env.Session() as s:
        s.get(User, 1).name = "during outage"
        s.commit()
    assert _names(env)[0] == (1, "during outage")
    stats = env.layer.stats()
    assert stats["errors"] >= 2 and stats["hits"] == 0


def test_failed_invalidation_never_lets_old_entry_be_served(make_env: Any) -> None:
    env, proxy = _env_with_outage(make_env)
    assert _names(env)[0] == (1, "user1")
    assert _names(env)[0] == (1, "user1")
    assert env.layer.stats()["hits"] == 1
    proxy.down = True
    with env.Session() as s:  # this commit's invalidation cannot be written
        s.get(User, 1).name = "written during outage"
        s.commit()
    proxy.down = False  # the backend comes back with the old entry still in it
    assert _names(env)[0] == (1, "written during outage")
    assert _names(env)[0] == (1, "written during outage")
    stats = env.layer.stats()
    assert stats["replays"] >= 1 and stats["errors"] >= 1


def test_circuit_breaker_stops_paying_for_a_dead_backend(make_env: Any) -> None:
    env, proxy = _env_with_outage(make_env, breaker_reset_seconds=3600)
    _names(env)
    proxy.down = True
    calls = proxy.calls
    for _ in range(20):
        _names(env)
    assert proxy.calls - calls <= 2, "an open breaker must not touch the backend on every query"
    assert env.layer.stats()["breaker_opened"] == 1


def test_concurrent_misses_run_one_query(env: Any) -> None:
    """G6 across threads: N sessions miss one key at once; the database runs it once."""
    stmt = select(User.id, User.name).where(User.score > 0).options(FromCache())
    n = 8
    barrier = threading.Barrier(n)
    release = threading.Event()
    entered: list[int] = []

    from sqlalchemy import event

    @event.listens_for(env.engine, "before_cursor_execute")
    def slow(*args: Any) -> None:
        if "score" in args[2]:
            entered.append(1)
            # hold the first query until every other thread is waiting on it
            release.wait(10)

    results: list[Any] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            with env.Session() as s:
                results.append(s.execute(stmt).all())
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    # wait until the first query is inside the database call, then let it go
    while not entered:
        threading.Event().wait(0.01)
    threading.Event().wait(0.2)  # not an assertion: gives the others time to queue up
    release.set()
    for t in threads:
        t.join(30)
    assert not errors
    assert len(results) == n and all(r == results[0] for r in results)
    assert len(entered) == 1, f"{len(entered)} queries ran for one key"
    with env.Session() as s:
        assert s.execute(stmt.options(NoCache())).all() == results[0]


def test_invalidation_hiccup_is_retried_for_other_readers(make_env: Any) -> None:
    """Another process (here: another layer on the same backend) must see the
    commit at once, even if the first attempt to write the invalidation failed."""
    env, proxy = _env_with_outage(make_env, breaker_reset_seconds=3600)
    region = env.layer.regions["default"]
    other = CacheLayer({"default": region})
    OtherSession = other.install(sessionmaker(env.engine))

    def other_names() -> list[Any]:
        with OtherSession() as s:
            return [tuple(r) for r in s.execute(STMT)]

    assert other_names()[0] == (1, "user1")
    assert other_names()[0] == (1, "user1")
    assert other.stats()["hits"] == 1
    proxy.fail_next = 1
    with env.Session() as s:
        s.get(User, 1).name = "after hiccup"
        s.commit()
    assert other_names()[0] == (1, "after hiccup")
    assert env.layer.stats()["errors"] == 0, "one hiccup is retried, not reported"
