"""The staleness verifier: hidden writes found, none reported without them.

Real SQLite files; the hidden write goes through a separate ``sqlite3``
connection that the layer cannot see.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _models import User
from conftest import CacheEnv
from dogpile.cache import make_region
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

import sqla_cachelayer as scl
from sqla_cachelayer.events import CacheEvent
from sqla_cachelayer.stats import verified_nines


def _name(env: CacheEnv, uid: int) -> str:
    with env.Session() as s:
        user = s.scalars(select(User).where(User.id == uid).options(scl.FromCache())).one()
        return str(user.name)


def _names(env: CacheEnv) -> list[str]:
    with env.Session() as s:
        return [u.name for u in s.scalars(select(User).order_by(User.id).options(scl.FromCache()))]


def _hidden_write(env: CacheEnv, sql: str) -> None:
    conn = sqlite3.connect(str(env.engine.url.database))
    with conn:
        conn.execute(sql)
    conn.close()


def _idle(layer: Any) -> None:
    assert layer._verifier.wait_idle(30), "the verifier did not finish its queue"


def test_finds_a_write_made_behind_the_layers_back(
    make_env: Callable[..., CacheEnv], caplog: pytest.LogCaptureFixture
) -> None:
    env = make_env(verify_sample_rate=1.0)
    events: list[CacheEvent] = []
    env.layer.add_listener(events.append)
    original = _name(env, 1)  # miss: stored
    assert _name(env, 1) == original  # hit: verified, fresh
    assert _names(env)[0] == original  # miss, then a hit of another statement
    _names(env)
    _idle(env.layer)
    stats = env.layer.stats()
    assert (stats["verified"], stats["verified_stale"]) == (2, 0)

    _hidden_write(env, "UPDATE users SET name = 'changed behind' WHERE id = 1")
    with caplog.at_level(logging.WARNING, logger="sqla_cachelayer.verify"):
        assert _name(env, 1) == original  # served stale: the layer cannot know
        _idle(env.layer)
    stats = env.layer.stats()
    assert stats["verified"] == 3 and stats["verified_stale"] == 1
    assert stats["verified_nines"] == pytest.approx(verified_nines(3, 1))
    [found] = [e for e in events if e.kind == "stale_found"]
    hit = next(e for e in events if e.kind == "hit")
    assert found.fingerprint == hit.fingerprint and found.region == "default"
    assert found.tables == ("users",)
    assert "name was" in (found.reason or "") and "changed behind" in (found.reason or "")
    [record] = [r for r in caplog.records if "STALE" in r.getMessage()]
    assert hit.fingerprint in record.getMessage() and "users" in record.getMessage()
    assert env.layer.stats(by="region")["default"]["verified_stale"] == 1

    # a row deleted behind the layer's back: the list query is stale too
    _hidden_write(env, "DELETE FROM addresses")
    _hidden_write(env, "DELETE FROM user_keywords")
    _hidden_write(env, "DELETE FROM users WHERE id = 2")
    _names(env)
    _idle(env.layer)
    assert env.layer.stats()["verified_stale"] == 2


def test_reports_zero_without_hidden_writes_despite_concurrent_commits(
    make_env: Callable[..., CacheEnv],
) -> None:
    """Commits through the layer race the re-checks: never a false alarm."""
    env = make_env(verify_sample_rate=1.0)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            n = 0
            while not stop.is_set():
                n += 1
                with env.Session() as s:
                    s.get(User, 1 + n % 2).score = n
                    s.commit()
                # pauses let some hits be re-checked before the next commit
                # (each commit makes every entry of the table inconclusive)
                stop.wait(0.02)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    def reader() -> None:
        try:
            for _ in range(100):
                _name(env, 1)
                _name(env, 2)
                _name(env, 3)
                _names(env)
                # keep the queue short: a sample checked long after its hit
                # is overtaken by the next commit (inconclusive)
                _idle(env.layer)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=reader) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join()
    stop.set()
    threads[0].join()
    _idle(env.layer)
    assert not errors, errors
    stats = env.layer.stats()
    assert stats["verified"] > 20, json.dumps(stats)
    assert stats["verify_inconclusive"] > 0, "some checks raced a commit"
    assert stats["verified_stale"] == 0, stats
    assert stats["verified_nines"] == math.inf  # none stale


def test_off_by_default_and_bounded(make_env: Callable[..., CacheEnv]) -> None:
    env = make_env()
    assert env.layer._verifier is None
    _name(env, 1)
    _name(env, 1)
    assert env.layer.stats()["verified"] == 0

    env = make_env(verify_sample_rate=1.0)
    verifier = env.layer._verifier
    gate = threading.Event()
    real_check = verifier._check

    def slow_check(item: Any) -> None:
        gate.wait(30)
        real_check(item)

    verifier._check = slow_check
    verifier._queue.maxsize = 2
    _name(env, 1)
    for _ in range(10):
        _name(env, 1)  # one being checked, two queued, the rest dropped
    gate.set()
    _idle(env.layer)
    stats = env.layer.stats()
    assert stats["hits"] == 10
    assert stats["verify_dropped"] >= 7 and stats["verified"] + stats["verify_dropped"] == 10


@pytest.mark.parametrize(
    ("value", "ok"),
    [("0", 0.0), ("0.25", 0.25), ("1", 1.0), ("", 0.0), ("1.5", None), ("-0.1", None), ("x", None)],
)
def test_sample_rate_setting(value: str, ok: float | None) -> None:
    settings = {"cachelayer.verify.sample_rate": value}
    if ok is None:
        with pytest.raises(scl.ConfigurationError) as info:
            scl.CacheLayer.from_settings(settings)
        assert info.value.key == "cachelayer.verify.sample_rate" and info.value.value == value
        assert "cachelayer.verify.sample_rate" in str(info.value)
    else:
        layer = scl.CacheLayer.from_settings(settings)
        assert (layer._verifier.sample_rate if layer._verifier else 0.0) == ok


def test_verified_nines() -> None:
    assert verified_nines(0, 0) == 0.0
    assert verified_nines(1000, 1) == pytest.approx(3.0)
    assert verified_nines(1000, 0) == math.inf, "none stale: the formula's value"
    assert verified_nines(10, 10) == 0.0


INI = """\
[app:main]
sqlalchemy.url = sqlite:///%(here)s/app.db
cachelayer.regions.default.backend = sqla_cachelayer.sqlite
cachelayer.regions.default.arguments.path = %(here)s/cache.db
cachelayer.verify.sample_rate = 1
"""


def test_command_line_verify_collects_what_the_application_finds(tmp_path: Path) -> None:
    """``verify --for`` in another process, while this one (the application) serves hits."""
    from _models import Base, seed

    from sqla_cachelayer.cli.config import read_settings

    ini = tmp_path / "app.ini"
    ini.write_text(INI)
    settings = read_settings(str(ini))
    engine = scl.engine_from_config(settings)
    Base.metadata.create_all(engine)
    layer = scl.CacheLayer.from_settings(settings)
    factory = layer.install(sessionmaker(engine))
    seed(factory)
    env = CacheEnv(engine, layer, factory, [], [])

    def serve(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            _name(env, 1)
            _idle(layer)

    command = [sys.executable, "-m", "sqla_cachelayer", "verify", "--for", "3"]
    command += ["--config", str(ini), "--json"]
    clean = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    serve(4.5)
    out, err = clean.communicate(timeout=60)
    assert clean.returncode == 0, err
    report = json.loads(out)
    assert report["verified"] > 0 and report["verified_stale"] == 0 and report["processes"] == 1

    _hidden_write(env, "UPDATE users SET name = 'behind' WHERE id = 1")
    stale = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    serve(4.5)
    out, err = stale.communicate(timeout=60)
    assert stale.returncode == 1, err
    report = json.loads(out)
    assert report["verified_stale"] > 0 and report["verified"] >= report["verified_stale"]
    engine.dispose()


def test_command_line_verify_refuses_when_the_settings_leave_it_off(tmp_path: Path) -> None:
    ini = tmp_path / "app.ini"
    ini.write_text(INI.replace("sample_rate = 1", "sample_rate = 0"))
    done = subprocess.run(
        [sys.executable, "-m", "sqla_cachelayer", "verify", "--for", "1", "--config", str(ini)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "cachelayer.verify.sample_rate" in done.stderr and len(done.stderr.splitlines()) == 1


def test_relationship_lazy_loads_are_verified_too(make_env: Callable[..., CacheEnv]) -> None:
    """A lazy load served by RelationshipCache: its statement re-runs with its parent's key."""
    env = make_env(verify_sample_rate=1.0)
    opt = scl.RelationshipCache(User.addresses)

    def emails() -> list[str]:
        with env.Session() as s:
            user = s.scalars(select(User).where(User.id == 3).options(scl.FromCache(), opt)).one()
            return [a.email for a in user.addresses]

    first = emails()
    assert emails() == first  # parent and lazy load both hits
    _idle(env.layer)
    stats = env.layer.stats()
    assert stats["hits"] == 2
    assert (stats["verified"], stats["verified_stale"], stats["verify_inconclusive"]) == (2, 0, 0)
    _hidden_write(env, "UPDATE addresses SET email = 'behind@x' WHERE user_id = 3")
    emails()
    _idle(env.layer)
    assert env.layer.stats()["verified_stale"] == 1, "the lazy load's hit, not the parent's"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_async_sessions_are_verified(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """AsyncSession hits are re-run on the verifier's own loop and connection."""
    import asyncio

    from _models import Base, seed
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path}/async.db"
    else:
        url = request.getfixturevalue("pg_engine_url")
        url = url.replace("postgresql+psycopg://", "postgresql+asyncpg://").replace(
            "postgresql://", "postgresql+asyncpg://"
        )
    raw_url = url.replace("+aiosqlite", "").replace("+asyncpg", "+psycopg")
    layer = scl.CacheLayer(
        {"default": make_region().configure("dogpile.cache.memory")}, verify_sample_rate=1.0
    )

    async def main() -> None:
        engine = create_async_engine(url)
        factory = layer.install(async_sessionmaker(engine, expire_on_commit=False))
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        async with engine.connect() as conn:
            await conn.run_sync(lambda c: seed(sessionmaker(c)))
            await conn.commit()
        stmt = select(User).where(User.id == 1).options(scl.FromCache())
        for _ in range(3):
            async with factory() as s:
                (await s.execute(stmt)).scalar_one()
        assert layer._verifier.wait_idle(30)
        stats = layer.stats()
        assert (stats["verified"], stats["verified_stale"]) == (2, 0), stats
        # behind the layer's back: a synchronous engine of its own
        from sqlalchemy import create_engine, text

        hidden = create_engine(raw_url)
        with hidden.begin() as conn:
            conn.execute(text("UPDATE users SET name = 'behind' WHERE id = 1"))
        hidden.dispose()
        async with factory() as s:
            assert (await s.execute(stmt)).scalar_one().name != "behind"
        assert layer._verifier.wait_idle(30)
        assert layer.stats()["verified_stale"] == 1
        await engine.dispose()

    asyncio.run(main())
