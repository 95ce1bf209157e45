"""The contract, as a new user reads it: every item of ``design.md``, tested as written.

Each test uses only what ``design.md`` names: the public package
``sqla_cachelayer``, its settings keys, its documented events and counters, its
command line. Tests are grouped by the section of ``design.md`` they check,
and each docstring names the line or row it reads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dogpile.cache import make_region
from dogpile.cache.api import NO_VALUE
from dogpile.cache.region import CacheRegion
from sqlalchemy import (
    Column,
    ForeignKey,
    String,
    Table,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    lazyload,
    mapped_column,
    relationship,
    scoped_session,
    selectinload,
    sessionmaker,
)

import sqla_cachelayer as scl
from sqla_cachelayer._compat import SESSION_EXECUTION_OPTIONS

# ---------------------------------------------------------------------------
# An application's models, as a user would write them
# ---------------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


item_tags = Table(
    "item_tags",
    Base.metadata,
    Column("item_id", ForeignKey("items.id"), primary_key=True),
    Column("tag_id", ForeignKey("tags.id"), primary_key=True),
)


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class Category(Base):
    __tablename__ = "categories"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    items: Mapped[list[Item]] = relationship(back_populates="category")


class Tag(Base):
    __tablename__ = "tags"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    category_id: Mapped[int] = mapped_column(ForeignKey("categories.id"))
    price: Mapped[int] = mapped_column(default=0)
    color: Mapped[str] = mapped_column(String(20), default="red")  # not indexed
    category: Mapped[Category] = relationship(back_populates="items")
    tags: Mapped[list[Tag]] = relationship(secondary=item_tags)


class Employee(Base):
    __tablename__ = "employees"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    type: Mapped[str] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_on": "type", "polymorphic_identity": "employee"}


class Manager(Employee):
    __tablename__ = "managers"
    id: Mapped[int] = mapped_column(ForeignKey("employees.id"), primary_key=True)
    level: Mapped[int] = mapped_column(default=1)
    __mapper_args__ = {"polymorphic_identity": "manager"}


def seed(engine: Engine) -> None:
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([User(id=1, name="ann"), User(id=2, name="bob")])
        s.add_all([Category(id=3, name="three"), Category(id=4, name="four")])
        s.add_all(
            [
                Item(id=1, name="a", category_id=3, price=5, color="red"),
                Item(id=2, name="b", category_id=3, price=15, color="blue"),
                Item(id=3, name="c", category_id=4, price=25, color="red"),
            ]
        )
        s.add_all([Tag(id=1, name="t1"), Tag(id=2, name="t2")])
        s.add(Manager(id=1, name="boss", level=1))
        s.commit()


def _selects(engine: Engine) -> list[str]:
    """Every SELECT the engine sends to the database, in order."""
    seen: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append(statement)

    return seen


@dataclass
class App:
    settings: dict[str, str]
    engine: Engine
    layer: scl.CacheLayer
    Session: sessionmaker[Session]
    selects: list[str] = field(default_factory=list)
    path: Path = Path()


def make_app(tmp_path: Path, name: str = "app.db", **extra: str) -> App:
    path = tmp_path / name
    settings = {
        "sqlalchemy.url": f"sqlite:///{path}",
        "cachelayer.regions.default.backend": "dogpile.cache.memory",
        "cachelayer.regions.default.expiration_time": "300",
        **{k.replace("__", "."): v for k, v in extra.items()},
    }
    engine = scl.engine_from_config(settings)
    seed(engine)
    layer = scl.CacheLayer.from_settings(settings)
    Session = sessionmaker(engine)
    layer.install(Session)
    return App(settings, engine, layer, Session, _selects(engine), path)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    a = make_app(tmp_path)
    yield a
    a.engine.dispose()


def by_cat(cat: int, region: str = "default") -> Any:
    return (
        select(Item).where(Item.category_id == cat).order_by(Item.id).options(scl.FromCache(region))
    )


def names(app: App, stmt: Any) -> list[str]:
    with app.Session() as s:
        return [i.name for i in s.scalars(stmt)]


def external_write(path: Path, sql: str, *params: Any) -> None:
    """A write the layer cannot see: another program on the same database file."""
    con = sqlite3.connect(path)
    with con:
        con.execute(sql, params)
    con.close()


# ---------------------------------------------------------------------------
# Section 1: Public API
# ---------------------------------------------------------------------------


def test_s1_quick_start_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """design.md section 1, the code block (same as the README's quick start): it runs as
    written on sqlite:///app.db, and the second identical query is served from the cache."""
    monkeypatch.chdir(tmp_path)
    settings = {
        "sqlalchemy.url": "sqlite:///app.db",
        "cachelayer.regions.default.backend": "dogpile.cache.memory",
        "cachelayer.regions.default.expiration_time": "300",
    }
    engine = scl.engine_from_config(settings)
    layer = scl.CacheLayer.from_settings(settings)
    Session = sessionmaker(engine)
    assert layer.install(Session) is Session
    seed(engine)
    for _ in range(2):
        with Session() as s:
            users = s.scalars(
                select(User).options(scl.FromCache("default", expiration_time=60))
            ).all()
            assert sorted(u.name for u in users) == ["ann", "bob"]
    stats = layer.stats()
    assert stats["hits"] == 1 and stats["misses"] == 1 and stats["stores"] == 1
    assert (tmp_path / "app.db").exists()
    engine.dispose()


def test_s1_public_names_importable() -> None:
    """design.md section 1 table: every public name is importable from the package."""
    for name in (
        "CacheLayer",
        "FromCache",
        "RelationshipCache",
        "NoCache",
        "engine_from_config",
        "ConfigurationError",
        "run_in_transaction",
    ):
        assert hasattr(scl, name), name
    assert issubclass(scl.ConfigurationError, Exception)


def test_s1_from_settings_coerces_strings_and_builds_regions(app: App) -> None:
    """section 1 row `CacheLayer.from_settings`: string values are coerced; `layer.regions`
    maps region names to dogpile `CacheRegion`s."""
    assert set(app.layer.regions) == {"default"}
    region = app.layer.regions["default"]
    assert isinstance(region, CacheRegion)
    assert region.expiration_time == 300


def test_s1_from_settings_custom_prefix(tmp_path: Path) -> None:
    """section 1 row `from_settings(settings, prefix="cachelayer.")`: another prefix reads
    the keys under it and ignores the default prefix's."""
    settings = {
        "cache.regions.short.backend": "dogpile.cache.memory",
        "cache.regions.short.expiration_time": "7",
        "cache.default_region": "short",
    }
    layer = scl.CacheLayer.from_settings(settings, prefix="cache.")
    assert set(layer.regions) == {"short"}
    assert layer.regions["short"].expiration_time == 7


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("cachelayer.regions.default.expiration_time", "five minutes"),
        ("cachelayer.regions.default.backend", "no.such.backend"),
        ("cachelayer.invalidation", "column"),
        ("cachelayer.cache_all", "perhaps"),
        ("cachelayer.verify.sample_rate", "1.5"),
        ("cachelayer.verify.sample_rate", "often"),
        ("cachelayer.metrics", "statsd"),
        ("cachelayer.default_region", "nowhere"),
    ],
)
def test_s1_bad_settings_raise_configuration_error_naming_key_and_value(
    key: str, value: str
) -> None:
    """section 1 row `from_settings`: bad input raises `ConfigurationError` naming the key
    and the value; row `ConfigurationError`: at configuration time."""
    settings = {
        "cachelayer.regions.default.backend": "dogpile.cache.memory",
        "cachelayer.regions.default.expiration_time": "300",
        key: value,
    }
    with pytest.raises(scl.ConfigurationError) as info:
        scl.CacheLayer.from_settings(settings)
    message = str(info.value)
    assert key in message or key.removeprefix("cachelayer.") in message, message
    assert value in message, message


def test_s1_sqlite_backend_without_path_is_a_configuration_error() -> None:
    """section 2: `sqla_cachelayer.sqlite` argument `path` is required: its absence is a
    `ConfigurationError` at configuration, naming the key."""
    with pytest.raises(scl.ConfigurationError) as info:
        scl.CacheLayer.from_settings(
            {"cachelayer.regions.default.backend": "sqla_cachelayer.sqlite"}
        )
    assert "path" in str(info.value)


def test_s1_programmatic_cache_layer_from_ready_regions(tmp_path: Path) -> None:
    """section 1 row `CacheLayer(regions=None, *, default_region="default", ...)`: the same,
    from ready dogpile regions; `FromCache()` with no name uses `default_region`."""
    engine = scl.engine_from_config({"sqlalchemy.url": f"sqlite:///{tmp_path / 'p.db'}"})
    seed(engine)
    selects = _selects(engine)
    main = make_region().configure("dogpile.cache.memory", expiration_time=100)
    layer = scl.CacheLayer({"main": main}, default_region="main")
    assert layer.regions["main"] is main
    Session = layer.install(sessionmaker(engine))
    for _ in range(2):
        with Session() as s:
            assert len(s.scalars(select(User).options(scl.FromCache())).all()) == 2
    assert len(selects) == 1
    assert layer.stats()["hits"] == 1
    engine.dispose()


def test_s1_programmatic_cache_layer_without_regions() -> None:
    """section 1 row `CacheLayer(regions=None, ...)`: regions may be omitted."""
    layer = scl.CacheLayer()
    assert "default" in layer.regions


class AppSession(Session):
    pass


@pytest.mark.parametrize("kind", ["sessionmaker", "subclass", "scoped", "instance"])
def test_s1_install_targets_and_uninstall(tmp_path: Path, kind: str) -> None:
    """section 1 row `layer.install(target)`: a sessionmaker, a Session subclass, a
    scoped_session, a Session; returns its argument; idempotent; `uninstall` undoes it."""
    engine = scl.engine_from_config({"sqlalchemy.url": f"sqlite:///{tmp_path / 'i.db'}"})
    seed(engine)
    selects = _selects(engine)
    layer = scl.CacheLayer({"default": make_region().configure("dogpile.cache.memory")})
    cls = type("S", (Session,), {})

    def new_session() -> Any:
        if kind == "sessionmaker":
            return target()
        if kind == "subclass":
            return target(engine)
        if kind == "scoped":
            target.remove()
            return target()
        return target

    if kind == "sessionmaker":
        target: Any = sessionmaker(engine)
    elif kind == "subclass":
        target = cls
    elif kind == "scoped":
        target = scoped_session(sessionmaker(engine))
    else:
        target = Session(engine)
    assert layer.install(target) is target
    assert layer.install(target) is target  # idempotent

    def query() -> None:
        s = new_session()
        s.scalars(select(User).options(scl.FromCache("default"))).all()
        if kind != "instance":
            s.close()
        else:
            s.rollback()
            s.expunge_all()

    query()
    query()
    assert len(selects) == 1
    assert layer.stats()["hits"] == 1 and layer.stats()["misses"] == 1  # not counted twice
    layer.uninstall(target)
    query()
    query()
    assert len(selects) == 3
    assert layer.stats()["hits"] == 1
    engine.dispose()


def test_s1_install_async_targets(tmp_path: Path) -> None:
    """section 1 row `layer.install(target)`: `async_sessionmaker` and `AsyncSession`."""
    path = tmp_path / "a.db"
    seed(scl.engine_from_config({"sqlalchemy.url": f"sqlite:///{path}"}))
    layer = scl.CacheLayer({"default": make_region().configure("dogpile.cache.memory")})

    async def main() -> None:
        engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
        factory = async_sessionmaker(engine)
        assert layer.install(factory) is factory
        for _ in range(2):
            async with factory() as s:
                assert len((await s.scalars(select(User).options(scl.FromCache()))).all()) == 2
        assert layer.stats()["hits"] == 1
        single = AsyncSession(engine)
        assert layer.install(single) is single
        async with single:
            await single.scalars(select(Category).options(scl.FromCache()))
        async with AsyncSession(engine) as other:
            layer.install(other)
            await other.scalars(select(Category).options(scl.FromCache()))
        assert layer.stats()["hits"] == 2
        layer.uninstall(factory)
        async with factory() as s:
            await s.scalars(select(User).options(scl.FromCache()))
        assert layer.stats()["hits"] == 2
        await engine.dispose()

    asyncio.run(main())


def test_s1_invalidate_by_class_table_and_name(app: App) -> None:
    """section 1 row `layer.invalidate(*targets)`: mapped classes, `Table`s or table names
    make every cached result reading them unreachable."""
    stmt = select(User).order_by(User.id).options(scl.FromCache())
    for n, target in enumerate((User, User.__table__, "users")):
        names(app, stmt)
        external_write(app.path, "UPDATE users SET name = ? WHERE id = 1", f"via-{n}")
        assert names(app, stmt)[0] != f"via-{n}"  # served from the cache
        app.layer.invalidate(target)
        assert names(app, stmt)[0] == f"via-{n}"


def test_s1_invalidate_row_form(app: App) -> None:
    """section 1 row `layer.invalidate(Item, category_id=3)`: results that could contain a
    row with those values go; a list of another category stays; whole-table results go."""
    cheap = select(Item).where(Item.price < 100).order_by(Item.id).options(scl.FromCache())
    names(app, by_cat(3))
    names(app, by_cat(4))
    names(app, cheap)
    external_write(app.path, "UPDATE items SET name = 'A' WHERE id = 1")
    external_write(app.path, "UPDATE items SET name = 'C' WHERE id = 3")
    app.layer.invalidate(Item, category_id=3)
    assert names(app, by_cat(3)) == ["A", "b"]
    assert names(app, by_cat(4)) == ["c"]  # still the cached one
    assert names(app, cheap) == ["A", "b", "C"]


def test_s1_invalidate_all(app: App) -> None:
    """section 1 row `layer.invalidate_all()`: every cached result of this layer."""
    names(app, by_cat(3))
    names(app, select(User).order_by(User.id).options(scl.FromCache()))
    external_write(app.path, "UPDATE items SET name = 'A' WHERE id = 1")
    external_write(app.path, "UPDATE users SET name = 'ANN' WHERE id = 1")
    app.layer.invalidate_all()
    assert names(app, by_cat(3))[0] == "A"
    assert names(app, select(User).order_by(User.id).options(scl.FromCache()))[0] == "ANN"


def test_s1_listeners_raising_one_is_logged_counted_not_propagated(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    """section 1 row `add_listener` / `remove_listener`; section 7: a listener that raises
    is logged and counted, never propagated; other listeners still get the event."""
    seen: list[str] = []

    def bad(event: Any) -> None:
        raise RuntimeError("listener bug")

    def good(event: Any) -> None:
        seen.append(event.kind)

    app.layer.add_listener(bad)
    app.layer.add_listener(good)
    before = app.layer.stats()["errors"]
    with caplog.at_level(logging.DEBUG):
        assert names(app, by_cat(3)) == ["a", "b"]
        assert names(app, by_cat(3)) == ["a", "b"]
    assert "miss" in seen and "hit" in seen
    assert app.layer.stats()["errors"] > before
    assert "listener bug" in caplog.text
    app.layer.remove_listener(good)
    app.layer.remove_listener(bad)
    count = len(seen)
    names(app, by_cat(3))
    assert len(seen) == count


def test_s1_stats_counters(app: App) -> None:
    """section 1 row `layer.stats()`: integers `hits`, `misses`, `stores`, `bypasses`,
    `invalidations`, `errors`, since creation."""
    names(app, by_cat(3))
    names(app, by_cat(3))
    with app.Session() as s:
        s.scalars(select(Item).options(scl.NoCache())).all()
        s.get(Item, 1).name = "z"  # type: ignore[union-attr]
        s.commit()
    stats = app.layer.stats()
    for key in ("hits", "misses", "stores", "bypasses", "invalidations", "errors"):
        assert isinstance(stats[key], int), key
    assert stats["hits"] == 1 and stats["misses"] == 1 and stats["stores"] == 1
    assert stats["invalidations"] >= 1
    assert stats["errors"] == 0


def test_s1_from_cache_signature_defaults() -> None:
    """section 1 row `FromCache(region="default", expiration_time=None, cache_key=None,
    ignore_expiration=False)`: the recipe's signature, positional and keyword."""
    scl.FromCache()
    scl.FromCache("default", 60)
    scl.FromCache("default", 60, "my-key", True)
    scl.FromCache(region="default", expiration_time=None, cache_key=None, ignore_expiration=False)


def test_s1_from_cache_cache_key_and_expiration(app: App) -> None:
    """section 1 row `FromCache`: `cache_key` names the entry (two statements given the same
    cache_key share it, as in the recipe); `expiration_time` per query."""
    q1 = select(User).where(User.id == 1).options(scl.FromCache(cache_key="the-user"))
    q2 = select(User).where(User.id == 1).options(scl.FromCache(cache_key="the-user"))
    names(app, q1)
    names(app, q2)
    assert app.layer.stats()["hits"] == 1


def test_s1_from_cache_expiration_time_bounds_life(app: App) -> None:
    """section 1 `FromCache(expiration_time=...)`, section 4 Expiry: an entry older than its
    expiration time is not served; with `ignore_expiration=True` it is."""
    import time

    stmt = select(User).where(User.id == 1)
    names(app, stmt.options(scl.FromCache(expiration_time=1)))
    external_write(app.path, "UPDATE users SET name = 'late' WHERE id = 1")
    time.sleep(1.2)
    assert names(app, stmt.options(scl.FromCache(ignore_expiration=True))) == ["ann"]
    assert names(app, stmt.options(scl.FromCache(expiration_time=1))) == ["late"]


def test_s1_relationship_cache_serves_lazy_loads(app: App) -> None:
    """section 1 row `RelationshipCache(attribute, ...)`: lazy loads of `attribute` come
    from the cache; `.and_(other)` chains."""
    opt = scl.RelationshipCache(Category.items).and_(scl.RelationshipCache(Item.category))
    for _ in range(2):
        with app.Session() as s:
            cat = s.scalars(select(Category).where(Category.id == 3).options(opt)).one()
            assert sorted(i.name for i in cat.items) == ["a", "b"]
            item = s.scalars(select(Item).where(Item.id == 3).options(opt)).one()
            assert item.category.name == "four"
    count = len(app.selects)
    with app.Session() as s:
        cat = s.scalars(select(Category).where(Category.id == 3).options(opt)).one()
        assert sorted(i.name for i in cat.items) == ["a", "b"]
    assert len(app.selects) == count + 1  # the parent query only; the lazy load was a hit
    assert app.layer.stats()["hits"] >= 3


def test_s1_relationship_cache_invalidated_on_commit(app: App) -> None:
    """section 1 `RelationshipCache` + G1: a commit to the related table refreshes it."""
    opt = scl.RelationshipCache(Category.items)
    with app.Session() as s:
        cat = s.scalars(select(Category).where(Category.id == 3).options(opt)).one()
        assert len(cat.items) == 2
    with app.Session() as s:
        s.add(Item(id=9, name="new", category_id=3))
        s.commit()
    with app.Session() as s:
        cat = s.scalars(select(Category).where(Category.id == 3).options(opt)).one()
        assert sorted(i.name for i in cat.items) == ["a", "b", "new"]


@pytest.mark.skipif(
    not SESSION_EXECUTION_OPTIONS, reason="Session(execution_options=...) arrived in SQLAlchemy 2.1"
)
def test_s1_no_cache_wins_over_every_default(tmp_path: Path) -> None:
    """section 1 row `NoCache()`: wins over `cache_all` and a session-wide `cache_region`."""
    a = make_app(tmp_path, cachelayer__cache_all="true")
    Session2 = sessionmaker(a.engine, execution_options={"cache_region": "default"})
    a.layer.install(Session2)
    for factory in (a.Session, Session2):
        for _ in range(2):
            with factory() as s:
                s.scalars(select(User).options(scl.NoCache())).all()
                s.scalars(select(User).options(scl.NoCache(), scl.FromCache())).all()
    assert a.layer.stats()["hits"] == 0
    assert a.layer.stats()["stores"] == 0
    assert a.layer.stats()["bypasses"] >= 1
    a.engine.dispose()


def test_s1_execution_options_per_statement(app: App) -> None:
    """section 1 row execution options `cache_region` and `cache_expiration_time`, per
    statement; `cache_region=None` opts out."""
    stmt = (
        select(User)
        .order_by(User.id)
        .execution_options(cache_region="default", cache_expiration_time=30)
    )
    names(app, stmt)
    names(app, stmt)
    assert app.layer.stats()["hits"] == 1
    with app.Session() as s:
        s.execute(stmt, execution_options={"cache_region": None}).all()
    assert app.layer.stats()["hits"] == 1


@pytest.mark.skipif(
    not SESSION_EXECUTION_OPTIONS, reason="Session(execution_options=...) arrived in SQLAlchemy 2.1"
)
def test_s1_session_wide_cache_region(app: App) -> None:
    """section 1 row execution options: `sessionmaker(engine, execution_options=
    {"cache_region": "default"})` caches every query of those sessions (drop-in option)."""
    Cached = sessionmaker(app.engine, execution_options={"cache_region": "default"})
    app.layer.install(Cached)
    for _ in range(2):
        with Cached() as s:
            assert len(s.scalars(select(User)).all()) == 2
    assert app.layer.stats()["hits"] == 1
    with Cached() as s:
        s.scalars(select(User), execution_options={"cache_region": None}).all()
    assert app.layer.stats()["hits"] == 1


def test_s1_engine_from_config_signature(tmp_path: Path) -> None:
    """section 1 row `engine_from_config(settings, prefix="sqlalchemy.", **kwargs)`."""
    settings = {"db.url": f"sqlite:///{tmp_path / 'e.db'}", "db.echo": "false"}
    engine = scl.engine_from_config(settings, prefix="db.", pool_pre_ping=True)
    assert engine.url.database == str(tmp_path / "e.db")
    assert engine.pool._pre_ping
    engine.dispose()


def test_s1_run_in_transaction_commits_and_returns(app: App) -> None:
    """section 1 row `run_in_transaction(session_factory, fn, *, attempts=5, ...)`: runs
    `fn(session)` in a transaction and commits."""

    def rename(s: Session) -> str:
        s.get(User, 1).name = "renamed"  # type: ignore[union-attr]
        return "ok"

    assert scl.run_in_transaction(app.Session, rename) == "ok"
    assert scl.run_in_transaction(app.Session, rename, attempts=2) == "ok"
    with Session(app.engine) as s:
        assert s.get(User, 1).name == "renamed"  # type: ignore[union-attr]


def test_s1_run_in_transaction_decorator(app: App) -> None:
    """section 1 row `run_in_transaction`: also a decorator."""

    @scl.run_in_transaction(app.Session)
    def add_user(s: Session) -> int:
        s.add(User(id=7, name="g"))
        return 7

    assert add_user == 7 or add_user() == 7  # either reading of "a decorator"
    with Session(app.engine) as s:
        assert s.get(User, 7) is not None


def test_s1_run_in_transaction_retries_transient_sqlite_busy(tmp_path: Path) -> None:
    """section 1 row `run_in_transaction` + section 3: a transient failure (SQLite busy)
    rolls back and reruns the whole of `fn`."""
    a = make_app(tmp_path, sqlalchemy__pragma__busy_timeout="10")
    blocker = sqlite3.connect(a.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    calls = []

    def work(s: Session) -> None:
        calls.append(1)
        if len(calls) == 2:
            blocker.execute("ROLLBACK")  # the other writer finishes
        s.add(User(id=8, name="h"))
        s.flush()

    scl.run_in_transaction(a.Session, work)
    assert len(calls) >= 2
    blocker.close()
    with Session(a.engine) as s:
        assert s.get(User, 8) is not None
    a.engine.dispose()


def test_s1_run_in_transaction_async_twin(tmp_path: Path) -> None:
    """section 1 row `run_in_transaction`: an async twin for `AsyncSession`."""
    path = tmp_path / "r.db"
    seed(scl.engine_from_config({"sqlalchemy.url": f"sqlite:///{path}"}))
    twin = getattr(scl, "run_in_transaction_async", None)
    assert twin is not None

    async def main() -> None:
        engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
        factory = async_sessionmaker(engine)

        async def work(s: AsyncSession) -> str:
            (await s.get(User, 1)).name = "async"  # type: ignore[union-attr]
            return "done"

        assert await twin(factory, work) == "done"
        async with factory() as s:
            assert (await s.get(User, 1)).name == "async"  # type: ignore[union-attr]
        await engine.dispose()

    asyncio.run(main())


# ---------------------------------------------------------------------------
# Section 2: Settings keys
# ---------------------------------------------------------------------------


def test_s2_backend_dogpile_names_and_arguments(tmp_path: Path) -> None:
    """section 2 rows `regions.<name>.backend` (a dogpile backend name) and
    `regions.<name>.arguments.<arg>` (as dogpile's `configure_from_config` reads them)."""
    layer = scl.CacheLayer.from_settings(
        {
            "cachelayer.regions.default.backend": "dogpile.cache.memory",
            "cachelayer.regions.files.backend": "dogpile.cache.dbm",
            "cachelayer.regions.files.arguments.filename": str(tmp_path / "cache.dbm"),
            "cachelayer.regions.files.expiration_time": "60",
        }
    )
    assert set(layer.regions) == {"default", "files"}
    assert layer.regions["files"].backend.filename == str(tmp_path / "cache.dbm")
    assert layer.regions["files"].expiration_time == 60


def test_s2_sqlite_backend_shared_between_processes(tmp_path: Path) -> None:
    """section 2 row `sqla_cachelayer.sqlite`: one SQLite file shared by every process on a
    host; arguments `path` and `max_bytes`. An entry stored by this process is a hit in
    another process (a fresh interpreter)."""
    db = tmp_path / "app.db"
    settings = {
        "sqlalchemy.url": f"sqlite:///{db}",
        "cachelayer.regions.default.backend": "sqla_cachelayer.sqlite",
        "cachelayer.regions.default.arguments.path": str(tmp_path / "cache.db"),
        "cachelayer.regions.default.arguments.max_bytes": "10485760",
    }
    engine = scl.engine_from_config(settings)
    seed(engine)
    layer = scl.CacheLayer.from_settings(settings)
    Session = layer.install(sessionmaker(engine))
    with Session() as s:
        assert [
            u.name for u in s.scalars(select(User).order_by(User.id).options(scl.FromCache()))
        ] == ["ann", "bob"]
    assert layer.stats()["stores"] == 1
    out = run_child(
        f"""
        settings = {settings!r}
        engine = scl.engine_from_config(settings)
        layer = scl.CacheLayer.from_settings(settings)
        Session = layer.install(sessionmaker(engine))
        with Session() as s:
            stmt = select(User).order_by(User.id).options(scl.FromCache())
            got = [u.name for u in s.scalars(stmt)]
        print(json.dumps({{"got": got, "hits": layer.stats()["hits"]}}))
        """
    )
    assert out == {"got": ["ann", "bob"], "hits": 1}
    engine.dispose()


def run_child(body: str, env: dict[str, str] | None = None) -> Any:
    """Run ``body`` in a fresh interpreter that imports this module's models; returns the
    JSON its last line prints."""
    script = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from sqlalchemy import select\n"
        "from sqlalchemy.orm import sessionmaker\n"
        "import sqla_cachelayer as scl\n"
        "from test_contract import User, Item, Category\n" + textwrap.dedent(body)
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_s2_memory_backend_bounded_lru() -> None:
    """section 2 row `sqla_cachelayer.memory`: the bounded in-process backend (LRU);
    argument `max_entries`."""
    layer = scl.CacheLayer.from_settings(
        {
            "cachelayer.regions.default.backend": "sqla_cachelayer.memory",
            "cachelayer.regions.default.arguments.max_entries": "3",
        }
    )
    region = layer.regions["default"]
    for i in range(5):
        region.set(f"k{i}", i)
    region.get("k2")  # recently used
    region.set("k5", 5)
    present = [k for k in ("k0", "k1", "k2", "k3", "k4", "k5") if region.get(k) is not NO_VALUE]
    assert len(present) <= 3
    assert "k5" in present and "k0" not in present and "k1" not in present


def test_s2_memory_backend_bad_max_entries() -> None:
    """section 2 row `sqla_cachelayer.memory` + section 1: a bad `max_entries` is a
    ConfigurationError at configuration naming the key and value."""
    with pytest.raises(scl.ConfigurationError) as info:
        scl.CacheLayer.from_settings(
            {
                "cachelayer.regions.default.backend": "sqla_cachelayer.memory",
                "cachelayer.regions.default.arguments.max_entries": "lots",
            }
        )
    assert "max_entries" in str(info.value) and "lots" in str(info.value)


def test_s2_expiration_time_seconds(tmp_path: Path) -> None:
    """section 2 row `regions.<name>.expiration_time`: seconds, a string or a number."""
    for value in ("90", 90, "90.0"):
        layer = scl.CacheLayer.from_settings(
            {
                "cachelayer.regions.default.backend": "dogpile.cache.memory",
                "cachelayer.regions.default.expiration_time": value,
            }
        )
        assert layer.regions["default"].expiration_time == 90


def test_s2_default_region_used_by_from_cache_and_cache_all(tmp_path: Path) -> None:
    """section 2 row `cachelayer.default_region`: used by `FromCache()` with no name and by
    `cache_all`."""
    a = make_app(
        tmp_path,
        cachelayer__regions__other__backend="dogpile.cache.memory",
        cachelayer__default_region="other",
        cachelayer__cache_all="true",
    )
    regions: list[str | None] = []
    a.layer.add_listener(lambda e: regions.append(e.region) if e.kind == "hit" else None)
    for _ in range(2):
        names(a, select(User).options(scl.FromCache()))
        names(a, select(Item))
    assert regions == ["other", "other"]
    assert a.layer.stats(by="region")["other"]["hits"] == 2
    assert a.layer.stats(by="region")["default"]["hits"] == 0
    a.engine.dispose()


@pytest.mark.parametrize("value", ["true", "True", "yes", "on", "1", True])
def test_s2_cache_all_true(tmp_path: Path, value: Any) -> None:
    """section 2 row `cachelayer.cache_all`: `true`: every ORM SELECT not marked `NoCache`
    goes through the default region (string forms coerced)."""
    a = make_app(tmp_path)
    layer = scl.CacheLayer.from_settings({**a.settings, "cachelayer.cache_all": value})
    Session = layer.install(sessionmaker(a.engine))
    for _ in range(2):
        with Session() as s:
            s.scalars(select(User)).all()
            s.scalars(select(Item).where(Item.id == 1)).all()
            s.get(Category, 3)
    assert layer.stats()["hits"] == 3
    a.engine.dispose()


@pytest.mark.parametrize("value", ["false", "no", "off", "0", False])
def test_s2_cache_all_false(tmp_path: Path, value: Any) -> None:
    """section 2 row `cachelayer.cache_all`: false forms: nothing cached without a hint."""
    a = make_app(tmp_path)
    layer = scl.CacheLayer.from_settings({**a.settings, "cachelayer.cache_all": value})
    Session = layer.install(sessionmaker(a.engine))
    for _ in range(2):
        with Session() as s:
            s.scalars(select(User)).all()
    assert layer.stats()["hits"] == 0 and layer.stats()["misses"] == 0
    a.engine.dispose()


def test_s2_invalidation_table_throws_away_every_result_of_the_table(tmp_path: Path) -> None:
    """section 2 row `cachelayer.invalidation`: `table`: a write invalidates every result
    that read the table (section 6: `table` gives today's behaviour exactly)."""
    a = make_app(tmp_path, cachelayer__invalidation="table")
    names(a, by_cat(4))
    external_write(a.path, "UPDATE items SET name = 'C' WHERE id = 3")  # unseen
    with a.Session() as s:
        s.get(Item, 1).name = "A"  # type: ignore[union-attr]
        s.commit()
    assert names(a, by_cat(4)) == ["C"]  # category 4 was thrown away too
    a.engine.dispose()


def test_s2_invalidation_row_is_the_default(app: App) -> None:
    """section 2 row `cachelayer.invalidation`: `row` (default): a write invalidates only the
    results that could contain the rows it touched."""
    names(app, by_cat(4))
    external_write(app.path, "UPDATE items SET name = 'C' WHERE id = 3")  # unseen
    with app.Session() as s:
        s.get(Item, 1).name = "A"  # type: ignore[union-attr]
        s.commit()
    assert names(app, by_cat(4)) == ["c"]  # still the cached list
    assert names(app, by_cat(3)) == ["A", "b"]


def test_s2_tables_keys_extra_columns(tmp_path: Path) -> None:
    """section 2 row `cachelayer.tables.<table>.keys`: extra columns (comma-separated) that
    row-level invalidation tracks for that table; an equality on a column that is not a
    key makes the result depend on the whole table (section 6)."""
    a = make_app(tmp_path, cachelayer__tables__items__keys="color, price")
    by_color = select(Item).where(Item.color == "red").order_by(Item.id).options(scl.FromCache())
    by_name = select(Item).where(Item.name == "a").options(scl.FromCache())
    assert names(a, by_color) == ["a", "c"]
    assert names(a, by_name) == ["a"]
    external_write(a.path, "UPDATE items SET price = 99 WHERE id = 1")  # unseen
    with a.Session() as s:
        s.get(Item, 2).name = "B"  # type: ignore[union-attr]  # a blue one
        s.commit()
    with a.Session() as s:
        assert [i.price for i in s.scalars(by_color)] == [5, 25]  # kept: the write was blue
        assert [i.price for i in s.scalars(by_name)] == [99]  # name is no key: invalidated
    a.engine.dispose()


def test_s2_verify_sample_rate_values() -> None:
    """section 2 row `cachelayer.verify.sample_rate`: 0 to 1 (default 0)."""
    base = {"cachelayer.regions.default.backend": "dogpile.cache.memory"}
    for value in ("0", "0.5", "1", 0.25, 1):
        scl.CacheLayer.from_settings({**base, "cachelayer.verify.sample_rate": value})
    for value in ("-0.1", "2"):
        with pytest.raises(scl.ConfigurationError):
            scl.CacheLayer.from_settings({**base, "cachelayer.verify.sample_rate": value})


def test_s2_metrics_values() -> None:
    """section 2 row `cachelayer.metrics`: `prometheus` and/or `opentelemetry`
    (comma-separated)."""
    base = {"cachelayer.regions.default.backend": "dogpile.cache.memory"}
    for value in (
        "prometheus",
        "opentelemetry",
        "prometheus,opentelemetry",
        "prometheus, opentelemetry",
    ):
        scl.CacheLayer.from_settings({**base, "cachelayer.metrics": value})


def test_s2_sqlalchemy_keys_reach_create_engine(tmp_path: Path) -> None:
    """section 2 row `sqlalchemy.*`: SQLAlchemy's own `create_engine` arguments."""
    engine = scl.engine_from_config(
        {
            "sqlalchemy.url": f"sqlite:///{tmp_path / 'k.db'}",
            "sqlalchemy.pool_size": "3",
            "sqlalchemy.max_overflow": "1",
            "sqlalchemy.pool_recycle": "120",
            "sqlalchemy.echo": "false",
        }
    )
    assert engine.pool.size() == 3  # type: ignore[attr-defined]
    assert engine.pool._max_overflow == 1  # type: ignore[attr-defined]
    assert engine.pool._recycle == 120
    engine.dispose()


def pragma(engine: Engine, name: str) -> Any:
    with engine.connect() as conn:
        return conn.exec_driver_sql(f"PRAGMA {name}").scalar()


def test_s2_pragma_override(tmp_path: Path) -> None:
    """section 2 row `sqlalchemy.pragma.<name>`: a SQLite pragma set on every new connection,
    overriding the tuned default."""
    engine = scl.engine_from_config(
        {
            "sqlalchemy.url": f"sqlite:///{tmp_path / 'p.db'}",
            "sqlalchemy.pragma.busy_timeout": "2500",
            "sqlalchemy.pragma.synchronous": "FULL",
            "sqlalchemy.pragma.journal_mode": "DELETE",
        }
    )
    assert pragma(engine, "busy_timeout") == 2500
    assert pragma(engine, "synchronous") == 2
    assert pragma(engine, "journal_mode") == "delete"
    engine.dispose()


@pytest.mark.parametrize("mode", ["deferred", "immediate", "exclusive"])
def test_s2_begin_mode(tmp_path: Path, mode: str) -> None:
    """section 2 row `sqlalchemy.begin_mode`: the BEGIN the engine issues for each
    transaction."""
    engine = scl.engine_from_config(
        {"sqlalchemy.url": f"sqlite:///{tmp_path / 'b.db'}", "sqlalchemy.begin_mode": mode}
    )
    seed(engine)
    sent: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda c, cur, st, *a: sent.append(st))
    begins: list[str] = []

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        begins.append("begin")

    with Session(engine) as s:
        s.get(User, 1)
    raw = sqlite3.connect(tmp_path / "b.db", isolation_level=None, timeout=0)
    with Session(engine) as s:
        s.get(User, 1)
        if mode == "deferred":
            raw.execute("BEGIN IMMEDIATE")  # a reader holds no write lock
            raw.execute("ROLLBACK")
        else:
            with pytest.raises(sqlite3.OperationalError):
                raw.execute("BEGIN IMMEDIATE")
    raw.close()
    engine.dispose()


def test_s2_begin_mode_bad_value(tmp_path: Path) -> None:
    """section 2 row `sqlalchemy.begin_mode` + section 1: a bad value is a
    ConfigurationError from `engine_from_config` naming the key and value."""
    with pytest.raises(scl.ConfigurationError) as info:
        scl.engine_from_config(
            {"sqlalchemy.url": f"sqlite:///{tmp_path / 'b.db'}", "sqlalchemy.begin_mode": "later"}
        )
    assert "begin_mode" in str(info.value) and "later" in str(info.value)


def test_s2_bad_sqlalchemy_value(tmp_path: Path) -> None:
    """section 1 `ConfigurationError` for bad settings at configuration: a bad pool size."""
    with pytest.raises(scl.ConfigurationError) as info:
        scl.engine_from_config(
            {"sqlalchemy.url": f"sqlite:///{tmp_path / 'b.db'}", "sqlalchemy.pool_size": "many"}
        )
    assert "pool_size" in str(info.value) and "many" in str(info.value)


# ---------------------------------------------------------------------------
# Section 3: Engine tuning
# ---------------------------------------------------------------------------


def test_s3_sqlite_tuned_pragmas(tmp_path: Path) -> None:
    """section 3: on every new DBAPI connection: journal_mode=WAL (file databases),
    synchronous=NORMAL, busy_timeout >= 1000 ms, foreign_keys=ON, cache_size, temp_store,
    mmap_size set."""
    engine = scl.engine_from_config({"sqlalchemy.url": f"sqlite:///{tmp_path / 't.db'}"})
    for _ in range(2):  # a second, new connection too
        assert pragma(engine, "journal_mode") == "wal"
        assert pragma(engine, "synchronous") == 1
        assert pragma(engine, "busy_timeout") >= 1000
        assert pragma(engine, "foreign_keys") == 1
        assert pragma(engine, "cache_size") != -2000  # not SQLite's own default
        assert pragma(engine, "temp_store") == 2
        assert pragma(engine, "mmap_size") > 0
        engine.dispose()


def test_s3_memory_sqlite_works(tmp_path: Path) -> None:
    """section 3 Pool: `:memory:` gets its own defaults and works (one database)."""
    engine = scl.engine_from_config({"sqlalchemy.url": "sqlite://"})
    seed(engine)
    with Session(engine) as s:
        assert s.get(User, 1) is not None
    assert pragma(engine, "foreign_keys") == 1
    engine.dispose()


def test_s3_pool_defaults_and_overrides_file_sqlite(tmp_path: Path) -> None:
    """section 3 Pool: sensible defaults per URL, every one overridable by `sqlalchemy.*`."""
    engine = scl.engine_from_config({"sqlalchemy.url": f"sqlite:///{tmp_path / 'q.db'}"})
    assert engine.pool.size() >= 1  # type: ignore[attr-defined]
    engine.dispose()
    engine = scl.engine_from_config(
        {
            "sqlalchemy.url": f"sqlite:///{tmp_path / 'q.db'}",
            "sqlalchemy.pool_size": "2",
            "sqlalchemy.pool_timeout": "7",
            "sqlalchemy.pool_pre_ping": "true",
        }
    )
    assert engine.pool.size() == 2  # type: ignore[attr-defined]
    assert engine.pool.timeout() == 7  # type: ignore[attr-defined]
    assert engine.pool._pre_ping
    engine.dispose()


def test_s3_pool_defaults_postgresql(pg_engine_url: str) -> None:
    """section 3 Pool: PostgreSQL gets pre-ping and a recycle by default; overridable."""
    engine = scl.engine_from_config({"sqlalchemy.url": pg_engine_url})
    assert engine.pool._pre_ping
    assert engine.pool._recycle > 0
    with engine.connect() as conn:
        assert conn.exec_driver_sql("select 1").scalar() == 1
    engine.dispose()
    engine = scl.engine_from_config(
        {
            "sqlalchemy.url": pg_engine_url,
            "sqlalchemy.pool_size": "4",
            "sqlalchemy.pool_recycle": "-1",
        }
    )
    assert engine.pool.size() == 4  # type: ignore[attr-defined]
    assert engine.pool._recycle == -1
    engine.dispose()


def test_s3_read_modify_write_under_contention_loses_nothing(tmp_path: Path) -> None:
    """section 3 SQLite transactions: a read-modify-write unit of work under contention does
    not fail with "database is locked" (through `run_in_transaction`) and loses nothing."""
    a = make_app(tmp_path)
    errors: list[BaseException] = []

    def bump(s: Session) -> None:
        user = s.get(User, 1)
        assert user is not None
        user.name = str(int(user.name) + 1) if user.name.isdigit() else "1"

    def worker() -> None:
        try:
            for _ in range(25):
                scl.run_in_transaction(a.Session, bump)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with Session(a.engine) as s:
        assert s.get(User, 1).name == "100"  # type: ignore[union-attr]
    a.engine.dispose()


def test_s3_postgres_serialization_failure_retried(pg_engine_url: str) -> None:
    """section 3: PostgreSQL serialization failures are retried by `run_in_transaction`,
    rerunning the whole unit of work."""
    engine = scl.engine_from_config(
        {"sqlalchemy.url": pg_engine_url, "sqlalchemy.isolation_level": "SERIALIZABLE"}
    )
    seed(engine)
    layer = scl.CacheLayer()
    Factory = layer.install(sessionmaker(engine))
    barrier = threading.Barrier(2)
    calls: list[int] = []
    errors: list[BaseException] = []

    def bump(s: Session) -> None:
        calls.append(1)
        item = s.get(Item, 1)
        assert item is not None
        if len(calls) <= 2:
            barrier.wait(timeout=10)  # both read before either writes
        item.price += 1

    def worker() -> None:
        try:
            scl.run_in_transaction(Factory, bump)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(calls) >= 3  # one of them ran again
    with Session(engine) as s:
        assert s.get(Item, 1).price == 7  # type: ignore[union-attr]
    engine.dispose()


# ---------------------------------------------------------------------------
# Section 4: Guarantees of the cache
# ---------------------------------------------------------------------------


def test_g1_fresh_after_commit_same_process(app: App) -> None:
    """G1: once `commit()` returns, no query started later returns older data."""
    assert names(app, by_cat(3)) == ["a", "b"]
    with app.Session() as s:
        s.add(Item(id=10, name="z", category_id=3))
        s.commit()
    assert names(app, by_cat(3)) == ["a", "b", "z"]
    with app.Session() as s:
        s.delete(s.get(Item, 10))
        s.commit()
    assert names(app, by_cat(3)) == ["a", "b"]


def test_g1_fresh_after_commit_in_another_process(tmp_path: Path) -> None:
    """G1: in any process sharing the cache backend: a commit made in another process
    (a fresh interpreter, same SQLite-file backend) is seen by this one's next query."""
    db = tmp_path / "app.db"
    settings = {
        "sqlalchemy.url": f"sqlite:///{db}",
        "cachelayer.regions.default.backend": "sqla_cachelayer.sqlite",
        "cachelayer.regions.default.arguments.path": str(tmp_path / "cache.db"),
    }
    engine = scl.engine_from_config(settings)
    seed(engine)
    layer = scl.CacheLayer.from_settings(settings)
    Session = layer.install(sessionmaker(engine))
    stmt = select(User).where(User.id == 1).options(scl.FromCache())
    for _ in range(2):
        with Session() as s:
            assert s.scalars(stmt).one().name == "ann"
    assert layer.stats()["hits"] == 1
    run_child(
        f"""
        settings = {settings!r}
        engine = scl.engine_from_config(settings)
        layer = scl.CacheLayer.from_settings(settings)
        Session = layer.install(sessionmaker(engine))
        with Session() as s:
            s.get(User, 1).name = "ANN"
            s.commit()
        print("{{}}")
        """
    )
    with Session() as s:
        assert s.scalars(stmt).one().name == "ANN"
    engine.dispose()


def test_g1_fresh_after_commit_redis_across_processes(tmp_path: Path, redis_db_url: str) -> None:
    """G1 with the `sqla_cachelayer.redis` backend shared by two processes."""
    db = tmp_path / "app.db"
    settings = {
        "sqlalchemy.url": f"sqlite:///{db}",
        "cachelayer.regions.default.backend": "sqla_cachelayer.redis",
        "cachelayer.regions.default.arguments.url": redis_db_url,
    }
    engine = scl.engine_from_config(settings)
    seed(engine)
    layer = scl.CacheLayer.from_settings(settings)
    Session = layer.install(sessionmaker(engine))
    stmt = select(User).where(User.id == 1).options(scl.FromCache())
    for _ in range(2):
        with Session() as s:
            assert s.scalars(stmt).one().name == "ann"
    assert layer.stats()["hits"] == 1
    out = run_child(
        f"""
        settings = {settings!r}
        engine = scl.engine_from_config(settings)
        layer = scl.CacheLayer.from_settings(settings)
        Session = layer.install(sessionmaker(engine))
        stmt = select(User).where(User.id == 1).options(scl.FromCache())
        with Session() as s:
            name = s.scalars(stmt).one().name
        with Session() as s:
            s.get(User, 1).name = "ANN"
            s.commit()
        print(json.dumps({{"name": name, "hits": layer.stats()["hits"]}}))
        """
    )
    assert out == {"name": "ann", "hits": 1}  # the child hit this process's entry
    with Session() as s:
        assert s.scalars(stmt).one().name == "ANN"
    engine.dispose()


def test_g1_first_session_of_a_process_fills_the_cache(tmp_path: Path) -> None:
    """section 1 / section 4: a process's first session that reads something uncached and
    then misses a cached query stores it: the next session hits (no warm-up needed)."""
    a = make_app(tmp_path)
    with a.Session() as s:
        assert s.get(User, 1) is not None  # the transaction begins uncached
        assert names_in(s, by_cat(3)) == ["a", "b"]
    count = len(a.selects)
    assert names(a, by_cat(3)) == ["a", "b"]
    assert len(a.selects) == count
    assert a.layer.stats()["hits"] == 1
    a.engine.dispose()


def test_g2_read_your_writes(app: App) -> None:
    """G2: inside a transaction that has written to a table, a query reading that table
    sees the transaction's own writes (even with the result cached before)."""
    assert names(app, by_cat(3)) == ["a", "b"]
    with app.Session() as s:
        s.add(Item(id=11, name="mine", category_id=3))
        s.flush()
        assert [i.name for i in s.scalars(by_cat(3))] == ["a", "b", "mine"]
        s.execute(update(Item).where(Item.id == 1).values(name="upd"))
        assert [i.name for i in s.scalars(by_cat(3))] == ["upd", "b", "mine"]
        s.rollback()


def test_g3_nothing_uncommitted_is_published(app: App) -> None:
    """G3: results computed from uncommitted writes are never stored where other sessions
    read them."""
    with app.Session() as writer:
        writer.add(Item(id=12, name="draft", category_id=4))
        writer.flush()
        assert names_in(writer, by_cat(4)) == ["c", "draft"]
        assert names(app, by_cat(4)) == ["c"]  # another session
        writer.rollback()
    assert names(app, by_cat(4)) == ["c"]
    assert names(app, by_cat(4)) == ["c"]


def names_in(s: Session, stmt: Any) -> list[str]:
    return [i.name for i in s.scalars(stmt)]


def test_g3_old_snapshot_not_published(tmp_path: Path) -> None:
    """G3: a result computed from a snapshot older than an acknowledged commit is not
    stored where later sessions read it."""
    a = make_app(tmp_path)
    names(a, select(User).options(scl.FromCache()))  # warm the stamps
    with a.Session() as old:
        old.scalars(select(Category)).all()  # the snapshot starts (SQLite WAL)
        with a.Session() as w:
            w.get(Item, 3).name = "new"  # type: ignore[union-attr]
            w.commit()
        assert names_in(old, by_cat(4)) == ["c"]  # the old snapshot's answer
    assert names(a, by_cat(4)) == ["new"]
    a.engine.dispose()


def test_g4_orm_flush_association_and_inheritance(app: App) -> None:
    """G4: ORM flush writes, including association tables and inheritance tables,
    invalidate."""
    tags_of = (
        select(Tag)
        .join(item_tags)
        .where(item_tags.c.item_id == 1)
        .order_by(Tag.id)
        .options(scl.FromCache())
    )
    assert names(app, tags_of) == []
    with app.Session() as s:
        item = s.get(Item, 1)
        assert item is not None
        item.tags.append(s.get(Tag, 1))  # type: ignore[arg-type]
        s.commit()
    assert names(app, tags_of) == ["t1"]
    with app.Session() as s:
        item = s.get(Item, 1)
        assert item is not None
        item.tags.clear()
        s.commit()
    assert names(app, tags_of) == []

    managers = select(Manager).where(Manager.level >= 1).options(scl.FromCache())
    assert names(app, managers) == ["boss"]
    with app.Session() as s:
        s.get(Manager, 1).level = 0  # type: ignore[union-attr]  # the subclass table only
        s.commit()
    assert names(app, managers) == []
    everyone = select(Employee).order_by(Employee.id).options(scl.FromCache())
    assert names(app, everyone) == ["boss"]
    with app.Session() as s:
        s.add(Manager(id=2, name="vp", level=2))
        s.commit()
    assert names(app, everyone) == ["boss", "vp"]


def test_g4_bulk_dml(app: App) -> None:
    """G4: ORM bulk UPDATE / DELETE / INSERT invalidate."""
    assert names(app, by_cat(4)) == ["c"]
    with app.Session() as s:
        s.execute(update(Item).where(Item.id == 3).values(name="u"))
        s.commit()
    assert names(app, by_cat(4)) == ["u"]
    with app.Session() as s:
        s.execute(insert(Item), [{"id": 20, "name": "i", "category_id": 4}])
        s.commit()
    assert names(app, by_cat(4)) == ["u", "i"]
    with app.Session() as s:
        s.execute(delete(Item).where(Item.id == 20))
        s.commit()
    assert names(app, by_cat(4)) == ["u"]


def test_g4_core_dml_on_a_known_engine(app: App) -> None:
    """G4: Core DML on an engine the layer knows invalidates."""
    assert names(app, by_cat(4)) == ["c"]
    with app.engine.begin() as conn:
        conn.execute(update(Item.__table__).where(Item.__table__.c.id == 3).values(name="core"))
    assert names(app, by_cat(4)) == ["core"]
    with app.engine.connect() as conn:
        conn.execute(Item.__table__.insert().values(id=21, name="c2", category_id=4))
        conn.commit()
    assert names(app, by_cat(4)) == ["core", "c2"]


def test_g4_core_dml_on_an_engine_never_used_by_a_session(tmp_path: Path) -> None:
    """G4: "an engine the layer knows": the engine of an installed sessionmaker, even before
    any session has used it."""
    a = make_app(tmp_path)
    Other = sessionmaker(a.engine)
    layer = scl.CacheLayer({"default": make_region().configure("dogpile.cache.memory")})
    layer.install(Other)
    with Other() as s:
        assert names_in(s, by_cat(4)) == ["c"]
    with a.engine.begin() as conn:
        conn.execute(text("UPDATE items SET name = 'x' WHERE id = 3"))
    with Other() as s:
        assert names_in(s, by_cat(4)) == ["x"]
    a.engine.dispose()


def test_g4_textual_dml(app: App) -> None:
    """G4: textual DML (parsed; when in doubt, invalidate more)."""
    assert names(app, by_cat(4)) == ["c"]
    with app.Session() as s:
        s.execute(text("UPDATE items SET name = :n WHERE id = 3"), {"n": "txt"})
        s.commit()
    assert names(app, by_cat(4)) == ["txt"]
    with app.Session() as s:
        s.execute(
            text(
                "insert into ITEMS (id, name, category_id, price, color)"
                " values (30, 't2', 4, 0, 'red')"
            )
        )
        s.commit()
    assert names(app, by_cat(4)) == ["txt", "t2"]
    with app.engine.begin() as conn:
        conn.exec_driver_sql('DELETE FROM "items" WHERE id = 30')
    assert names(app, by_cat(4)) == ["txt"]


def test_g4_ddl(app: App) -> None:
    """G4: DDL invalidates."""
    users = select(User).order_by(User.id).options(scl.FromCache())
    assert names(app, users) == ["ann", "bob"]
    with app.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE users")
        conn.exec_driver_sql("CREATE TABLE users (id INTEGER PRIMARY KEY, name VARCHAR(50))")
    assert names(app, users) == []


def test_g5_backend_down_never_fails_a_query_or_commit(tmp_path: Path) -> None:
    """G5: a backend error never fails a query or a commit; reads fall through to the
    database; errors are counted."""
    with socket_closed() as port:
        a = make_app(
            tmp_path,
            cachelayer__regions__default__backend="sqla_cachelayer.redis",
            cachelayer__regions__default__arguments__url=f"redis://127.0.0.1:{port}/0",
        )
        for _ in range(2):
            assert names(a, by_cat(3)) == ["a", "b"]
        with a.Session() as s:
            s.get(Item, 1).name = "A"  # type: ignore[union-attr]
            s.commit()
        assert names(a, by_cat(3)) == ["A", "b"]
        assert a.layer.stats()["errors"] >= 1
        assert a.layer.stats()["hits"] == 0
        a.engine.dispose()


class socket_closed:
    """A local port nothing listens on."""

    def __enter__(self) -> int:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
        s.close()
        return port

    def __exit__(self, *exc: object) -> None:
        pass


def test_g5_failed_invalidation_never_serves_old_entry_after_recovery(
    tmp_path: Path, redis_server_factory: Any
) -> None:
    """G5: a write whose invalidation could not be recorded never lets an older entry be
    served after the backend comes back."""
    server = redis_server_factory()
    a = make_app(
        tmp_path,
        cachelayer__regions__default__backend="sqla_cachelayer.redis",
        cachelayer__regions__default__arguments__url=server.url,
        cachelayer__regions__default__arguments__socket_timeout="0.5",
    )
    for _ in range(2):
        assert names(a, by_cat(3)) == ["a", "b"]
    assert a.layer.stats()["hits"] == 1
    server.pause()
    try:
        with a.Session() as s:
            s.get(Item, 1).name = "A"  # type: ignore[union-attr]
            s.commit()  # the bump cannot reach Redis
    finally:
        server.resume()
    assert names(a, by_cat(3)) == ["A", "b"]
    assert names(a, by_cat(3)) == ["A", "b"]
    a.engine.dispose()


def _slow_query_engine(path: Path, gate: threading.Event, entered: threading.Event) -> Engine:
    engine = scl.engine_from_config({"sqlalchemy.url": f"sqlite:///{path}"})

    @event.listens_for(engine, "connect")
    def _fn(dbapi_conn: Any, record: Any) -> None:
        def slow(x: Any) -> Any:
            entered.set()
            gate.wait(10)
            return x

        dbapi_conn.create_function("slow", 1, slow)

    return engine


def test_g6_one_miss_one_query_threads(tmp_path: Path) -> None:
    """G6: concurrent misses of the same key wait for a single database query."""
    gate, entered = threading.Event(), threading.Event()
    engine = _slow_query_engine(tmp_path / "g6.db", gate, entered)
    seed(engine)
    selects = _selects(engine)
    layer = scl.CacheLayer({"default": make_region().configure("dogpile.cache.memory")})
    Session = layer.install(sessionmaker(engine))
    stmt = select(User).where(func.slow(User.id) == 1).options(scl.FromCache())
    got: list[str] = []
    waiting = threading.Barrier(9)

    def reader() -> None:
        waiting.wait()
        with Session() as s:
            got.append(s.scalars(stmt).one().name)

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    waiting.wait()
    assert entered.wait(10)
    # the first query is running and holds the key; let the others pile up behind it
    for _ in range(200):
        if layer.stats()["misses"] + layer.stats()["hits"] >= 1:
            break
        threading.Event().wait(0.01)
    gate.set()
    for t in threads:
        t.join()
    assert got == ["ann"] * 8
    assert len(selects) == 1
    engine.dispose()


@pytest.mark.parametrize("backend", ["sqla_cachelayer.sqlite", "sqla_cachelayer.redis"])
def test_g6_one_miss_one_query_across_processes(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """G6: across processes where the backend has a distributed lock (the SQLite-file
    backend; Redis with `distributed_lock`): 4 processes missing one key run one query."""
    db = tmp_path / "app.db"
    seed(scl.engine_from_config({"sqlalchemy.url": f"sqlite:///{db}"}))
    external_write(db, "CREATE TABLE runs (n INTEGER)")
    settings = {
        "sqlalchemy.url": f"sqlite:///{db}",
        "cachelayer.regions.default.backend": backend,
    }
    if backend == "sqla_cachelayer.sqlite":
        settings["cachelayer.regions.default.arguments.path"] = str(tmp_path / "cache.db")
    else:
        settings["cachelayer.regions.default.arguments.url"] = request.getfixturevalue(
            "redis_db_url"
        )
        settings["cachelayer.regions.default.arguments.distributed_lock"] = "true"
    start = tmp_path / "go"
    body = f"""
        import os, sqlite3, time
        from sqlalchemy import event, func
        settings = {settings!r}
        engine = scl.engine_from_config(settings)

        @event.listens_for(engine, "connect")
        def _fn(dbapi_conn, record):
            def slow(x):
                c = sqlite3.connect({str(db)!r}, timeout=30)
                with c:
                    c.execute("INSERT INTO runs VALUES (?)", (os.getpid(),))
                c.close()
                time.sleep(0.5)
                return x
            dbapi_conn.create_function("slow", 1, slow)

        layer = scl.CacheLayer.from_settings(settings)
        Session = layer.install(sessionmaker(engine))
        with Session() as s:
            s.scalars(select(User)).all()  # warm the stamps (a different key)
        while not os.path.exists({str(start)!r}):
            time.sleep(0.01)
        with Session() as s:
            stmt = select(User).where(func.slow(User.id) == 1).options(scl.FromCache())
            name = s.scalars(stmt).one().name
        print(json.dumps(name))
    """
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", child_script(body)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    start.touch()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert [json.loads(o.strip().splitlines()[-1]) for o in outs] == ["ann"] * 4
    con = sqlite3.connect(db)
    assert con.execute("SELECT count(DISTINCT n) FROM runs").fetchone()[0] == 1
    con.close()


def child_script(body: str) -> str:
    return (
        "import json, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from sqlalchemy import select\n"
        "from sqlalchemy.orm import sessionmaker\n"
        "import sqla_cachelayer as scl\n"
        "from test_contract import User, Item, Category\n" + textwrap.dedent(body)
    )


def test_keys_bound_values_params_and_loader_options(app: App) -> None:
    """section 4 Keys: an entry is found only by the same statement with the same bound
    values (including `.params()` and values given at execute time) and the same loader
    options."""
    from sqlalchemy import bindparam

    assert names(app, by_cat(3)) == ["a", "b"]
    assert names(app, by_cat(4)) == ["c"]
    p = (
        select(Item)
        .where(Item.category_id == bindparam("c"))
        .order_by(Item.id)
        .options(scl.FromCache())
    )
    assert names(app, p.params(c=3)) == ["a", "b"]
    assert names(app, p.params(c=4)) == ["c"]
    with app.Session() as s:
        assert [i.name for i in s.scalars(p, {"c": 4})] == ["c"]
        assert [i.name for i in s.scalars(p, {"c": 3})] == ["a", "b"]
    with app.Session() as s:
        plain = s.scalars(by_cat(3)).all()
        assert "category" not in plain[0].__dict__
    with app.Session() as s:
        eager = s.scalars(by_cat(3).options(selectinload(Item.category))).all()
        assert "category" in eager[0].__dict__
    with app.Session() as s:
        lazy = s.scalars(by_cat(3).options(lazyload(Item.category))).all()
        assert "category" not in lazy[0].__dict__


def test_keys_same_database_only(tmp_path: Path) -> None:
    """section 4 Keys: the same database (engine URL less its driver): one layer and region
    over two database files keeps their entries apart."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    a = make_app(tmp_path / "one")
    b = make_app(tmp_path / "two")
    external_write(b.path, "UPDATE users SET name = 'other' WHERE id = 1")
    SessionB = a.layer.install(sessionmaker(b.engine))
    stmt = select(User).where(User.id == 1).options(scl.FromCache())
    assert names(a, stmt) == ["ann"]
    with SessionB() as s:
        assert names_in(s, stmt) == ["other"]
    a.engine.dispose()
    b.engine.dispose()


def test_keys_schema_translate_map_at_every_level(tmp_path: Path) -> None:
    """section 4 Keys: `schema_translate_map` is part of the key, from whichever level it is
    set: statement, session, `engine.execution_options()`, connection."""
    db = tmp_path / "main.db"
    engine = scl.engine_from_config({"sqlalchemy.url": f"sqlite:///{db}"})
    seed(engine)
    other = tmp_path / "other.db"
    seed(scl.engine_from_config({"sqlalchemy.url": f"sqlite:///{other}"}))
    external_write(other, "UPDATE users SET name = 'aux' WHERE id = 1")

    @event.listens_for(engine, "connect")
    def _attach(dbapi_conn: Any, record: Any) -> None:
        dbapi_conn.execute(f"ATTACH DATABASE '{other}' AS aux")

    engine.dispose()  # connections made from now on attach it
    layer = scl.CacheLayer({"default": make_region().configure("dogpile.cache.memory")})
    Session = layer.install(sessionmaker(engine))
    stmt = select(User).where(User.id == 1).options(scl.FromCache())
    smap = {None: "aux"}
    with Session() as s:
        assert names_in(s, stmt) == ["ann"]
        assert names_in(s, stmt.execution_options(schema_translate_map=smap)) == ["aux"]
    with Session() as s:
        assert [
            u.name for u in s.scalars(stmt, execution_options={"schema_translate_map": smap})
        ] == ["aux"]
    with Session(bind=engine.execution_options(schema_translate_map=smap)) as s:
        layer.install(s)
        assert names_in(s, stmt) == ["aux"]
    with (
        engine.connect() as conn,
        Session(bind=conn.execution_options(schema_translate_map=smap)) as s,
    ):
        layer.install(s)
        assert names_in(s, stmt) == ["aux"]
    with Session() as s:
        assert names_in(s, stmt) == ["ann"]
    assert layer.stats()["hits"] >= 3
    engine.dispose()


def test_keys_bounded_length(tmp_path: Path) -> None:
    """section 4 Keys: keys have a bounded length whatever the query."""
    a = make_app(tmp_path)
    seen: dict[str, Any] = {}
    region = make_region().configure("dogpile.cache.memory", arguments={"cache_dict": seen})
    layer = scl.CacheLayer({"default": region})
    Session = layer.install(sessionmaker(a.engine))
    long_in = (
        select(Item).where(Item.id.in_(list(range(5000)))).options(scl.FromCache(cache_key=None))
    )
    with Session() as s:
        s.scalars(long_in).all()
        s.scalars(select(Item).where(Item.name == "x" * 10000).options(scl.FromCache())).all()
    assert seen
    assert max(len(str(k)) for k in seen) <= 250
    a.engine.dispose()


def test_keys_mean_the_same_in_every_process(tmp_path: Path) -> None:
    """section 4 Keys: keys mean the same in every process that shares the backend (another
    interpreter, another hash seed) and in workers forked from one parent."""
    db = tmp_path / "app.db"
    settings = {
        "sqlalchemy.url": f"sqlite:///{db}",
        "cachelayer.regions.default.backend": "sqla_cachelayer.sqlite",
        "cachelayer.regions.default.arguments.path": str(tmp_path / "cache.db"),
    }
    engine = scl.engine_from_config(settings)
    seed(engine)
    body = f"""
        settings = {settings!r}
        engine = scl.engine_from_config(settings)
        layer = scl.CacheLayer.from_settings(settings)
        Session = layer.install(sessionmaker(engine))
        stmt = select(Item).where(Item.category_id == 3, Item.name.in_(["a", "b"]))
        stmt = stmt.order_by(Item.id)
        with Session() as s:
            got = [i.name for i in s.scalars(stmt.options(scl.FromCache()))]
        print(json.dumps({{"got": got, "hits": layer.stats()["hits"]}}))
    """
    assert run_child(body, {"PYTHONHASHSEED": "1"}) == {"got": ["a", "b"], "hits": 0}
    assert run_child(body, {"PYTHONHASHSEED": "2"}) == {"got": ["a", "b"], "hits": 1}

    # forked workers from one parent
    layer = scl.CacheLayer.from_settings(settings)
    Session = layer.install(sessionmaker(engine))
    stmt = select(User).where(User.id.in_([1, 2])).order_by(User.id).options(scl.FromCache())
    names(App(settings, engine, layer, Session), stmt)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            with Session() as s:
                s.scalars(stmt).all()
            os.write(w, str(layer.stats()["hits"]).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    assert os.read(r, 10) == b"1"
    os.close(r)
    engine.dispose()


@pytest.mark.skipif(
    not SESSION_EXECUTION_OPTIONS, reason="Session(execution_options=...) arrived in SQLAlchemy 2.1"
)
def test_g7_run_in_transaction_reads_the_database(tmp_path: Path) -> None:
    """G7: `run_in_transaction` reads from the database, never from the cache, whatever the
    session's defaults (`cache_all`, a session-wide `cache_region`)."""
    a = make_app(tmp_path, cachelayer__cache_all="true")
    Regioned = a.layer.install(
        sessionmaker(a.engine, execution_options={"cache_region": "default"})
    )
    for factory in (a.Session, Regioned):
        with factory() as s:
            s.scalars(select(User).where(User.id == 1)).all()
            s.scalars(select(User).where(User.id == 1).options(scl.FromCache())).all()
    external_write(a.path, "UPDATE users SET name = 'db' WHERE id = 1")
    for factory in (a.Session, Regioned):
        with factory() as s:  # the cache still answers outside a unit of work
            assert s.scalars(select(User).where(User.id == 1)).one().name == "ann"

        def read(s: Session) -> tuple[str, str]:
            one = s.scalars(select(User).where(User.id == 1)).one().name
            s.expire_all()
            two = s.scalars(select(User).where(User.id == 1).options(scl.FromCache())).one().name
            return one, two

        assert scl.run_in_transaction(factory, read) == ("db", "db")
    a.engine.dispose()


def test_g7_with_for_update_never_from_cache(tmp_path: Path) -> None:
    """G7: a read that takes a lock (`with_for_update`) never comes from the cache."""
    a = make_app(tmp_path, cachelayer__cache_all="true")
    stmt = select(User).where(User.id == 1)
    names(a, stmt)
    names(a, stmt.options(scl.FromCache()))
    external_write(a.path, "UPDATE users SET name = 'db' WHERE id = 1")
    assert names(a, stmt) == ["ann"]
    assert names(a, stmt.with_for_update()) == ["db"]
    assert names(a, stmt.options(scl.FromCache()).with_for_update()) == ["db"]
    a.engine.dispose()


def test_g8_readers_never_wait_for_writers(tmp_path: Path) -> None:
    """G8: on SQLite (WAL), a session that only reads never takes the write lock: it reads
    while another connection holds the write lock, with a short busy timeout."""
    a = make_app(tmp_path, sqlalchemy__pragma__busy_timeout="50", cachelayer__cache_all="true")
    writer = sqlite3.connect(a.path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("UPDATE users SET name = 'w' WHERE id = 2")
    try:
        for _ in range(2):
            with a.Session() as s:
                assert s.get(User, 1).name == "ann"  # type: ignore[union-attr]
                assert len(s.scalars(select(Item)).all()) == 3
                assert names_in(s, by_cat(3)) == ["a", "b"]
                s.commit()  # a read-only commit does not wait either
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    a.engine.dispose()


def test_hit_leaves_the_session_as_a_miss_would(app: App) -> None:
    """section 4: a hit keeps objects already in the session and their pending unflushed
    changes (autoflush runs first)."""
    stmt = select(User).order_by(User.id).options(scl.FromCache())
    names(app, stmt)
    with app.Session() as s:
        ann = s.get(User, 1)
        assert ann is not None
        ann.name = "pending"
        users = s.scalars(stmt).all()
        assert users[0] is ann
        assert ann.name == "pending"
    with app.Session() as s:
        bob = s.get(User, 2)
        assert bob is not None
        bob.name = "changed"
        s.add(User(id=5, name="new"))
        got = s.scalars(stmt).all()
        assert [u.name for u in got] == ["ann", "changed", "new"]  # autoflushed, then read
        assert got[1] is bob
        s.rollback()
    with app.Session() as s, s.no_autoflush:
        bob = s.get(User, 2)
        bob.name = "unflushed"  # type: ignore[union-attr]
        got = s.scalars(stmt).all()
        assert got[1] is bob and bob.name == "unflushed"  # type: ignore[union-attr]


# ---------------------------------------------------------------------------
# Section 6: Row-level invalidation
# ---------------------------------------------------------------------------


def test_s6_orm_flush_invalidates_old_and_new_values(app: App) -> None:
    """section 6: a write whose rows are known (ORM flush) invalidates the results depending
    on the old *and* new value of each key column; others stay."""
    names(app, by_cat(3))
    names(app, by_cat(4))
    with app.Session() as s:
        s.get(Item, 1).category_id = 4  # type: ignore[union-attr]
        s.commit()
    assert names(app, by_cat(3)) == ["b"]
    assert names(app, by_cat(4)) == ["a", "c"]


def test_s6_value_dependent_results_survive_unrelated_rows(app: App) -> None:
    """section 6: results depending on values (`column = value`, `column IN (...)` on a key
    column, `Session.get`, lazy loads, `selectinload`) stay cached when a row with other
    values is written; a result depending on the whole table does not."""
    in_stmt = select(Item).where(Item.id.in_([3])).options(scl.FromCache())
    whole = select(Item).where(Item.price > 20).options(scl.FromCache())
    with app.Session() as s:
        assert s.get(Item, 3, options=[scl.FromCache()]).name == "c"  # type: ignore[union-attr]
    names(app, in_stmt)
    names(app, whole)
    external_write(app.path, "UPDATE items SET name = 'C' WHERE id = 3")  # unseen
    with app.Session() as s:
        s.get(Item, 1).name = "A"  # type: ignore[union-attr]
        s.commit()
    with app.Session() as s:
        assert s.get(Item, 3, options=[scl.FromCache()]).name == "c"  # type: ignore[union-attr]
    assert names(app, in_stmt) == ["c"]
    assert names(app, whole) == ["C"]  # price > 20: not an equality: the whole table


def test_s6_joins_apply_the_rule_table_by_table(app: App) -> None:
    """section 6: joins apply the rule table by table: a join on categories filtered by
    category id depends on those category values and on the whole items table."""
    joined = (
        select(Item)
        .join(Item.category)
        .where(Category.id == 4)
        .order_by(Item.id)
        .options(scl.FromCache())
    )
    assert names(app, joined) == ["c"]
    with app.Session() as s:
        s.get(Category, 3).name = "THREE"  # type: ignore[union-attr]
        s.commit()
    external_write(app.path, "UPDATE items SET price = 26 WHERE id = 3")  # unseen
    with app.Session() as s:
        assert [i.price for i in s.scalars(joined)] == [25]  # category 3 is not category 4
    with app.Session() as s:
        s.get(Item, 3).name = "C"  # type: ignore[union-attr]
        s.commit()
    assert names(app, joined) == ["C"]
    whole = select(Item).join(Item.category).where(Category.name == "four").options(scl.FromCache())
    assert names(app, whole) == ["C"]
    with app.Session() as s:
        s.get(Category, 3).name = "four"  # type: ignore[union-attr]  # not a key: whole table
        s.commit()
    assert sorted(names(app, whole)) == ["C", "a", "b"]


def test_s6_unknown_rows_invalidate_the_table(app: App) -> None:
    """section 6: a write whose rows are not known (Core or bulk DML, textual SQL) is never
    missed: every affected result is fresh after it."""
    names(app, by_cat(3))
    names(app, by_cat(4))
    with app.Session() as s:
        s.execute(update(Item).where(Item.price > 10).values(name="bulk"))
        s.commit()
    assert names(app, by_cat(3)) == ["a", "bulk"]
    assert names(app, by_cat(4)) == ["bulk"]
    with app.engine.begin() as conn:
        conn.execute(text("UPDATE items SET name = 'raw' WHERE price > 10"))
    assert names(app, by_cat(3)) == ["a", "raw"]
    assert names(app, by_cat(4)) == ["raw"]


def test_s6_key_old_value_not_loaded(app: App) -> None:
    """section 6: a key column's old value not loaded falls back to the table."""
    names(app, by_cat(3))
    names(app, by_cat(4))
    with app.Session() as s:
        item = s.get(Item, 1)
        assert item is not None
        s.expire(item, ["category_id"])  # the old value is unknown
        item.category_id = 4
        s.commit()
    assert names(app, by_cat(3)) == ["b"]
    assert names(app, by_cat(4)) == ["a", "c"]


def test_s6_relationship_and_selectin_loads(app: App) -> None:
    """section 6: relationship lazy loads and `selectinload` depend on values."""
    opt = scl.RelationshipCache(Category.items)
    stmt = (
        select(Category)
        .order_by(Category.id)
        .options(selectinload(Category.items), scl.FromCache())
    )
    for _ in range(2):
        with app.Session() as s:
            cats = s.scalars(stmt).all()
            assert [[i.name for i in c.items] for c in cats] == [["a", "b"], ["c"]]
            assert len(s.scalars(select(Category).where(Category.id == 4).options(opt)).one().items)
    with app.Session() as s:
        s.add(Item(id=40, name="d", category_id=3))
        s.commit()
    with app.Session() as s:
        cats = s.scalars(stmt).all()
        assert [sorted(i.name for i in c.items) for c in cats] == [["a", "b", "d"], ["c"]]
        four = s.scalars(select(Category).where(Category.id == 4).options(opt)).one()
        assert [i.name for i in four.items] == ["c"]


# ---------------------------------------------------------------------------
# Section 7: Observability
# ---------------------------------------------------------------------------


def test_s7_event_attributes(app: App) -> None:
    """section 7: one event per cache event with `kind`, `region`, `fingerprint` (at most 64
    characters, equal for the same structure whatever its values, different for different
    statements, `None` where no statement is involved), `elapsed`, and per kind `reason`,
    `tables` / `values` / `cause`."""
    events: list[Any] = []
    app.layer.add_listener(events.append)
    names(app, by_cat(3))
    names(app, by_cat(3))
    names(app, by_cat(4))
    names(app, select(User).options(scl.FromCache()))
    with app.Session() as s:
        s.scalars(select(User).options(scl.NoCache())).all()
        s.execute(select(User).execution_options(cache_region=None)).all()
    with app.Session() as s:
        s.get(Item, 1).name = "A"  # type: ignore[union-attr]
        s.commit()
    app.layer.invalidate(User)
    kinds = [e.kind for e in events]
    assert kinds[:5] == ["miss", "store", "hit", "miss", "store"]
    for e in events:
        assert e.kind in {
            "hit",
            "miss",
            "store",
            "bypass",
            "invalidate",
            "error",
            "breaker",
            "stale_found",
        }
        assert e.elapsed is None or (isinstance(e.elapsed, float) and e.elapsed >= 0)
    miss3, hit3, miss4 = events[0], events[2], events[3]
    assert miss3.region == "default" and isinstance(miss3.elapsed, float)
    assert isinstance(miss3.fingerprint, str) and len(miss3.fingerprint) <= 64
    assert miss3.fingerprint == hit3.fingerprint == miss4.fingerprint
    users_fp = next(
        e for e in events if e.kind == "miss" and e is not miss3 and e is not miss4
    ).fingerprint
    assert users_fp != miss3.fingerprint
    bypasses = [e for e in events if e.kind == "bypass"]
    assert bypasses and all(isinstance(e.reason, str) and e.reason for e in bypasses)
    inval = [e for e in events if e.kind == "invalidate"]
    commit_ev = next(e for e in inval if e.cause == "commit")
    assert "items" in commit_ev.tables
    manual = next(e for e in inval if e.cause == "manual")
    assert "users" in manual.tables and manual.fingerprint is None


def test_s7_error_and_breaker_events(tmp_path: Path) -> None:
    """section 7: `error` events carry `operation` and `error`; `breaker` events carry
    `state` (`opened`, `closed`)."""
    with socket_closed() as port:
        a = make_app(
            tmp_path,
            cachelayer__regions__default__backend="sqla_cachelayer.redis",
            cachelayer__regions__default__arguments__url=f"redis://127.0.0.1:{port}/0",
        )
        events: list[Any] = []
        a.layer.add_listener(events.append)
        for _ in range(5):
            names(a, by_cat(3))
        errors = [e for e in events if e.kind == "error"]
        assert errors
        assert all(
            isinstance(e.operation, str) and isinstance(e.error, BaseException) for e in errors
        )
        breakers = [e for e in events if e.kind == "breaker"]
        assert breakers and breakers[0].state == "opened"
        assert all(e.state in ("opened", "closed") for e in breakers)
        assert a.layer.stats()["errors"] >= 1
        a.engine.dispose()


def test_s7_stats_by_region_sums_to_stats(tmp_path: Path) -> None:
    """section 7: `stats(by="region")` is a dict of region name to a dict of the same
    counters, summing to `stats()`."""
    a = make_app(tmp_path, cachelayer__regions__other__backend="sqla_cachelayer.memory")
    for _ in range(2):
        names(a, by_cat(3))
        names(a, by_cat(4, region="other"))
        names(a, by_cat(3, region="other"))
    by_region = a.layer.stats(by="region")
    assert set(by_region) == {"default", "other"}
    total = a.layer.stats()
    for key in ("hits", "misses", "stores", "bypasses", "invalidations", "errors"):
        assert sum(r[key] for r in by_region.values()) == total[key], key
    assert by_region["other"]["hits"] == 2 and by_region["default"]["hits"] == 1
    a.engine.dispose()


def test_s7_stats_by_query(app: App) -> None:
    """section 7: `stats(by="query")` is a list of dicts, one per statement structure
    (`fingerprint`, `sql` preview, `hits`, `misses`), the busiest first."""
    for _ in range(3):
        names(app, by_cat(3))
    names(app, by_cat(4))
    names(app, select(User).options(scl.FromCache()))
    rows = app.layer.stats(by="query")
    assert isinstance(rows, list) and len(rows) == 2
    first = rows[0]
    assert first["hits"] == 2 and first["misses"] == 2
    assert "items" in first["sql"].lower()
    assert isinstance(first["fingerprint"], str) and len(first["fingerprint"]) <= 64
    assert rows[1]["misses"] == 1 and "users" in rows[1]["sql"].lower()


def test_s7_stats_by_query_at_most_1000(app: App) -> None:
    """section 7: `stats(by="query")`: at most 1,000 of them."""
    with app.Session() as s:
        for n in range(1005):
            s.scalars(select(User).where(User.id == n).limit(n + 1).options(scl.FromCache())).all()
            s.execute(
                select(User.id, *([User.name] * (1 + n % 3)))
                .where(User.id > n)
                .options(scl.FromCache())
            ).all()
    rows = app.layer.stats(by="query")
    assert len(rows) <= 1000


def test_s7_prometheus(tmp_path: Path) -> None:
    """section 7: Prometheus names follow its conventions (`sqla_cachelayer_hits_total`,
    labels `region`; latency histograms in seconds)."""
    prometheus_client = pytest.importorskip("prometheus_client")
    a = make_app(tmp_path, cachelayer__metrics="prometheus")
    names(a, by_cat(3))
    names(a, by_cat(3))
    text_out = prometheus_client.generate_latest().decode()
    hits = [ln for ln in text_out.splitlines() if ln.startswith("sqla_cachelayer_hits_total{")]
    assert any('region="default"' in ln for ln in hits)
    assert "_seconds_bucket" in text_out
    value = prometheus_client.REGISTRY.get_sample_value(
        "sqla_cachelayer_hits_total", {"region": "default"}
    )
    assert value is not None and value >= 1
    a.engine.dispose()


def test_s7_opentelemetry(tmp_path: Path) -> None:
    """section 7: OpenTelemetry through its metrics API (a fresh process: the global
    provider is set once)."""
    pytest.importorskip("opentelemetry.sdk")
    out = run_child(
        f"""
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from test_contract import seed
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        settings = {{
            "sqlalchemy.url": "sqlite:///{tmp_path / "otel.db"}",
            "cachelayer.metrics": "opentelemetry",
            "cachelayer.regions.default.backend": "dogpile.cache.memory",
        }}
        engine = scl.engine_from_config(settings)
        seed(engine)
        layer = scl.CacheLayer.from_settings(settings)
        Session = layer.install(sessionmaker(engine))
        for _ in range(2):
            with Session() as s:
                s.scalars(select(User).options(scl.FromCache())).all()
        data = reader.get_metrics_data()
        names = sorted({{
            m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
        }})
        print(json.dumps(names))
        """
    )
    assert any("hit" in n for n in out), out
    assert all(n.startswith("sqla_cachelayer") for n in out), out


def _wait_for(predicate: Any, timeout: float = 20.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def test_s7_verifier(tmp_path: Path) -> None:
    """section 7 + section 2 `cachelayer.verify.sample_rate`: the verifier re-runs a sample of
    hits on a background worker and reports `verified`, `verified_stale` and
    `verified_nines` (`-log10(verified_stale/verified)`) in `stats()`."""
    a = make_app(tmp_path, cachelayer__verify__sample_rate="1")
    stmt = select(User).where(User.id == 1).options(scl.FromCache())
    names(a, stmt)
    for _ in range(3):
        assert names(a, stmt) == ["ann"]
    assert _wait_for(lambda: a.layer.stats()["verified"] >= 3)
    stats = a.layer.stats()
    assert stats["verified_stale"] == 0
    assert stats["verified_nines"] >= 0
    found: list[Any] = []
    a.layer.add_listener(lambda e: found.append(e) if e.kind == "stale_found" else None)
    external_write(a.path, "UPDATE users SET name = 'behind' WHERE id = 1")  # unseen
    assert names(a, stmt) == ["ann"]  # a stale hit
    assert _wait_for(lambda: a.layer.stats()["verified_stale"] >= 1)
    stats = a.layer.stats()
    assert stats["verified_nines"] == pytest.approx(
        -math.log10(stats["verified_stale"] / stats["verified"])
    )
    assert _wait_for(lambda: bool(found))
    a.engine.dispose()


def test_s7_verifier_off_by_default(app: App) -> None:
    """section 2: `verify.sample_rate` 0 (default): nothing verified."""
    names(app, by_cat(3))
    names(app, by_cat(3))
    assert app.layer.stats()["verified"] == 0
    assert app.layer.stats()["hits"] == 1


# ---------------------------------------------------------------------------
# Section 8: asyncio
# ---------------------------------------------------------------------------


def test_s8_async_session_hits_and_invalidation(tmp_path: Path) -> None:
    """section 8: sections 1-7 work with `AsyncSession` / `async_sessionmaker`: hits,
    invalidation on commit, stats, events."""
    path = tmp_path / "a.db"
    seed(scl.engine_from_config({"sqlalchemy.url": f"sqlite:///{path}"}))
    layer = scl.CacheLayer.from_settings(
        {"cachelayer.regions.default.backend": "sqla_cachelayer.memory"}
    )
    events: list[str] = []
    layer.add_listener(lambda e: events.append(e.kind))

    async def main() -> None:
        engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
        factory = layer.install(async_sessionmaker(engine))
        stmt = select(Item).where(Item.category_id == 3).order_by(Item.id).options(scl.FromCache())
        for _ in range(2):
            async with factory() as s:
                assert [i.name for i in await s.scalars(stmt)] == ["a", "b"]
        async with factory() as s:
            (await s.get(Item, 2)).name = "B"  # type: ignore[union-attr]
            await s.commit()
        async with factory() as s:
            assert [i.name for i in await s.scalars(stmt)] == ["a", "B"]
        await engine.dispose()

    asyncio.run(main())
    assert layer.stats()["hits"] == 1
    assert "invalidate" in events


def test_s8_single_flight_across_coroutines(tmp_path: Path) -> None:
    """section 8: concurrent misses of one key from many coroutines run one query (G6)."""
    import time

    path = tmp_path / "f.db"
    seed(scl.engine_from_config({"sqlalchemy.url": f"sqlite:///{path}"}))
    layer = scl.CacheLayer({"default": make_region().configure("dogpile.cache.memory")})
    ran: list[int] = []

    async def main() -> None:
        engine = create_async_engine(f"sqlite+aiosqlite:///{path}")

        @event.listens_for(engine.sync_engine, "connect")
        def _fn(dbapi_conn: Any, record: Any) -> None:
            def slow(x: Any) -> Any:
                ran.append(1)
                time.sleep(0.2)
                return x

            dbapi_conn.create_function("slow", 1, slow, deterministic=False)

        factory = layer.install(async_sessionmaker(engine))
        stmt = select(User).where(func.slow(User.id) == 1).options(scl.FromCache())

        async def one() -> str:
            async with factory() as s:
                return (await s.scalars(stmt)).one().name

        got = await asyncio.gather(*(one() for _ in range(10)))
        assert got == ["ann"] * 10
        await engine.dispose()

    asyncio.run(main())
    assert len(ran) == 2  # slow() runs once per row of ONE query (2 users)
    assert layer.stats()["misses"] == 1


def test_s8_sync_and_async_share_entries_and_invalidations(
    tmp_path: Path, redis_db_url: str
) -> None:
    """section 8: the `sqla_cachelayer.redis` backend serves sync and async sessions with the
    same keys; `sqlite:///app.db` and `sqlite+aiosqlite:///app.db` share entries and
    invalidations."""
    path = tmp_path / "app.db"
    settings = {
        "sqlalchemy.url": f"sqlite:///{path}",
        "cachelayer.regions.default.backend": "sqla_cachelayer.redis",
        "cachelayer.regions.default.arguments.url": redis_db_url,
    }
    engine = scl.engine_from_config(settings)
    seed(engine)
    sync_layer = scl.CacheLayer.from_settings(settings)
    Sync = sync_layer.install(sessionmaker(engine))
    stmt = select(User).where(User.id == 1).options(scl.FromCache())
    with Sync() as s:
        assert s.scalars(stmt).one().name == "ann"
    async_layer = scl.CacheLayer.from_settings(settings)

    async def main() -> None:
        aengine = create_async_engine(f"sqlite+aiosqlite:///{path}")
        factory = async_layer.install(async_sessionmaker(aengine))
        async with factory() as s:
            assert (await s.scalars(stmt)).one().name == "ann"
        assert async_layer.stats()["hits"] == 1  # the sync session's entry
        async with factory() as s:
            (await s.get(User, 1)).name = "ASYNC"  # type: ignore[union-attr]
            await s.commit()
        await aengine.dispose()

    asyncio.run(main())
    with Sync() as s:
        assert s.scalars(stmt).one().name == "ASYNC"
    engine.dispose()


def test_s8_psycopg_and_asyncpg_share_entries(pg_engine_url: str, redis_db_url: str) -> None:
    """section 8: `postgresql+psycopg://...` and `postgresql+asyncpg://...` to the same
    server and database share entries and invalidations."""
    settings = {
        "sqlalchemy.url": pg_engine_url,
        "cachelayer.regions.default.backend": "sqla_cachelayer.redis",
        "cachelayer.regions.default.arguments.url": redis_db_url,
    }
    engine = scl.engine_from_config(settings)
    seed(engine)
    layer = scl.CacheLayer.from_settings(settings)
    Sync = layer.install(sessionmaker(engine))
    stmt = select(User).where(User.id == 1).options(scl.FromCache())
    with Sync() as s:
        assert s.scalars(stmt).one().name == "ann"
    async_url = pg_engine_url.replace("postgresql+psycopg://", "postgresql+asyncpg://")
    async_layer = scl.CacheLayer.from_settings(settings)

    async def main() -> None:
        aengine = create_async_engine(async_url)
        factory = async_layer.install(async_sessionmaker(aengine))
        async with factory() as s:
            assert (await s.scalars(stmt)).one().name == "ann"
        assert async_layer.stats()["hits"] == 1
        async with factory() as s:
            (await s.get(User, 1)).name = "PG"  # type: ignore[union-attr]
            await s.commit()
        await aengine.dispose()

    asyncio.run(main())
    with Sync() as s:
        assert s.scalars(stmt).one().name == "PG"
    engine.dispose()


def test_s8_cancelled_miss_leaves_no_lock_and_no_entry(tmp_path: Path) -> None:
    """section 8: a coroutine cancelled mid-miss leaves no lock held and no entry written."""
    path = tmp_path / "c.db"
    seed(scl.engine_from_config({"sqlalchemy.url": f"sqlite:///{path}"}))
    layer = scl.CacheLayer({"default": make_region().configure("dogpile.cache.memory")})
    gate, entered = threading.Event(), threading.Event()
    calls: list[int] = []

    async def main() -> None:
        engine = create_async_engine(f"sqlite+aiosqlite:///{path}")

        @event.listens_for(engine.sync_engine, "connect")
        def _fn(dbapi_conn: Any, record: Any) -> None:
            def slow(x: Any) -> Any:
                calls.append(1)
                entered.set()
                gate.wait(10)
                return x

            dbapi_conn.create_function("slow", 1, slow, deterministic=False)

        factory = layer.install(async_sessionmaker(engine))
        stmt = select(User).where(func.slow(User.id) == 1).options(scl.FromCache())

        async def one() -> str:
            async with factory() as s:
                return (await s.scalars(stmt)).one().name

        task = asyncio.create_task(one())
        assert await asyncio.to_thread(entered.wait, 10)
        task.cancel()
        await asyncio.sleep(0)
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert layer.stats()["stores"] == 0
        # no lock held: the next miss runs at once, and stores
        assert await asyncio.wait_for(one(), 10) == "ann"
        assert layer.stats()["stores"] == 1
        assert await asyncio.wait_for(one(), 10) == "ann"
        assert layer.stats()["hits"] == 1
        await engine.dispose()

    asyncio.run(main())


# ---------------------------------------------------------------------------
# Section 7: command line
# ---------------------------------------------------------------------------


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sqla_cachelayer", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def cli_script(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "sqla-cachelayer"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def _ini(tmp_path: Path, section: str = "app:main") -> Path:
    ini = tmp_path / "app.ini"
    ini.write_text(
        textwrap.dedent(
            f"""\
            [{section}]
            sqlalchemy.url = sqlite:///{tmp_path / "app.db"}
            cachelayer.regions.default.backend = sqla_cachelayer.sqlite
            cachelayer.regions.default.arguments.path = {tmp_path / "cache.db"}
            cachelayer.regions.default.expiration_time = 600
            cachelayer.verify.sample_rate = 1
            """
        )
    )
    return ini


def test_s7_cli_invalidate_tables_and_all(tmp_path: Path) -> None:
    """section 7 CLI: `invalidate TABLE... | --all` with `--config app.ini`: an application
    process sharing the backend stops serving those results."""
    ini = _ini(tmp_path)
    settings = {
        "sqlalchemy.url": f"sqlite:///{tmp_path / 'app.db'}",
        "cachelayer.regions.default.backend": "sqla_cachelayer.sqlite",
        "cachelayer.regions.default.arguments.path": str(tmp_path / "cache.db"),
    }
    engine = scl.engine_from_config(settings)
    seed(engine)
    layer = scl.CacheLayer.from_settings(settings)
    Session = layer.install(sessionmaker(engine))
    a = App(settings, engine, layer, Session, path=tmp_path / "app.db")
    users = select(User).order_by(User.id).options(scl.FromCache())
    assert names(a, users) == ["ann", "bob"]
    external_write(a.path, "UPDATE users SET name = 'cli' WHERE id = 1")
    assert names(a, users) == ["ann", "bob"]
    done = cli("invalidate", "users", "--config", str(ini))
    assert done.returncode == 0, done.stderr
    assert names(a, users) == ["cli", "bob"]
    assert names(a, by_cat(3)) == ["a", "b"]
    external_write(a.path, "UPDATE items SET name = 'all' WHERE id = 1")
    done = cli_script("invalidate", "--all", "--config", str(ini), "--json")
    assert done.returncode == 0, done.stderr
    json.loads(done.stdout)
    assert names(a, by_cat(3)) == ["all", "b"]
    engine.dispose()


def test_s7_cli_stats_json_and_text(tmp_path: Path) -> None:
    """section 7 CLI: `stats`, with `--json` for scripts."""
    ini = _ini(tmp_path)
    seed(scl.engine_from_config({"sqlalchemy.url": f"sqlite:///{tmp_path / 'app.db'}"}))
    done = cli("stats", "--config", str(ini))
    assert done.returncode == 0, done.stderr
    assert "default" in done.stdout
    done = cli("stats", "--config", str(ini), "--json")
    assert done.returncode == 0, done.stderr
    assert isinstance(json.loads(done.stdout), (dict, list))


def test_s7_cli_toml_and_section(tmp_path: Path) -> None:
    """section 7 CLI: `--config app.ini --section app:main`, or TOML."""
    ini = _ini(tmp_path, section="app:shop")
    done = cli("stats", "--config", str(ini), "--section", "app:shop", "--json")
    assert done.returncode == 0, done.stderr
    toml = tmp_path / "app.toml"
    toml.write_text(
        textwrap.dedent(
            f"""\
            "sqlalchemy.url" = "sqlite:///{tmp_path / "app.db"}"
            "cachelayer.regions.default.backend" = "sqla_cachelayer.sqlite"
            "cachelayer.regions.default.arguments.path" = "{tmp_path / "cache.db"}"
            """
        )
    )
    done = cli("stats", "--config", str(toml), "--json")
    assert done.returncode == 0, done.stderr
    done = cli("invalidate", "users", "--config", str(toml))
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("case", ["file", "section", "key"])
def test_s7_cli_missing_file_section_key(tmp_path: Path, case: str) -> None:
    """section 7 CLI: a missing file, section or key is a one-line error naming it, exit
    status 2."""
    ini = _ini(tmp_path)
    if case == "file":
        args, named = ["--config", str(tmp_path / "nope.ini")], "nope.ini"
    elif case == "section":
        args, named = ["--config", str(ini), "--section", "app:absent"], "app:absent"
    else:
        ini.write_text("[app:main]\nsqlalchemy.url = sqlite:///x.db\n")
        args, named = ["--config", str(ini)], "cachelayer.regions"
    for command in (["stats"], ["invalidate", "users"], ["verify", "--for", "1"]):
        done = cli(*command, *args)
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert named in lines[0], lines[0]


def test_s7_cli_verify(tmp_path: Path) -> None:
    """section 7 CLI: `verify --for SECONDS` reports what the application processes'
    verifier found in that time."""
    ini = _ini(tmp_path)
    seed(scl.engine_from_config({"sqlalchemy.url": f"sqlite:///{tmp_path / 'app.db'}"}))
    done = cli("verify", "--for", "1", "--config", str(ini), "--json")
    assert done.returncode in (0, 1), done.stderr
    report = json.loads(done.stdout)
    assert "verified" in json.dumps(report)


def test_s7_cli_demo_runs(tmp_path: Path) -> None:
    """section 7 CLI: `demo` (also `python -m sqla_cachelayer`)."""
    done = cli("demo", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip()


# ---------------------------------------------------------------------------
# Section 9: facts a cache built on SQLAlchemy must account for
# ---------------------------------------------------------------------------


def test_s9_memory_backend_by_reference_does_not_leak_mutations(app: App) -> None:
    """section 9: `dogpile.cache.memory` stores values by reference: changing an object a
    hit returned (without committing) never changes what the next session is served."""
    stmt = select(User).where(User.id == 1).options(scl.FromCache())
    names(app, stmt)
    with app.Session() as s:
        user = s.scalars(stmt).one()
        user.name = "mutated"
        s.rollback()
    with app.Session() as s:
        user = s.scalars(stmt).one()
        user.name = "again"
        # no flush, no commit
    assert names(app, stmt) == ["ann"]
    assert app.layer.stats()["hits"] >= 2


@pytest.mark.parametrize("mode", ["deferred", "immediate", "exclusive"])
def test_s9_no_begin_leaks_into_the_pool(tmp_path: Path, mode: str) -> None:
    """section 9: with BEGIN taken over, a session or connection closed without commit
    leaves no transaction open in the pool (another writer gets the lock at once)."""
    a = make_app(tmp_path, sqlalchemy__begin_mode=mode)
    with a.Session() as s:
        s.get(User, 1)
    with a.Session() as s:
        s.scalars(select(Item).options(scl.FromCache())).all()
    with a.engine.connect() as conn:
        conn.execute(select(User.__table__)).all()
    with a.Session() as s:
        s.add(User(id=50, name="x"))
        s.flush()  # rolled back on close
    raw = sqlite3.connect(a.path, isolation_level=None, timeout=0)
    raw.execute("BEGIN IMMEDIATE")  # would fail with "database is locked" on a leak
    raw.execute("ROLLBACK")
    raw.close()
    a.engine.dispose()


def test_s9_read_modify_write_with_cache_all_loses_nothing(tmp_path: Path) -> None:
    """section 9 (4 threads x 100 increments with `cache_all` kept 123 of 400) + G7: through
    `run_in_transaction`, a read-modify-write unit of work on sessions that cache every
    query loses no increment."""
    a = make_app(tmp_path, cachelayer__cache_all="true")
    errors: list[BaseException] = []

    def bump(s: Session) -> None:
        item = s.scalars(select(Item).where(Item.id == 1)).one()
        item.price += 1

    def worker() -> None:
        try:
            for _ in range(25):
                scl.run_in_transaction(a.Session, bump)
                with a.Session() as s:  # cached reads between units of work
                    s.scalars(select(Item).where(Item.id == 1)).one()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with Session(a.engine) as s:
        assert s.get(Item, 1).price == 5 + 100  # type: ignore[union-attr]
    with a.Session() as s:
        assert s.scalars(select(Item).where(Item.id == 1)).one().price == 105
    a.engine.dispose()


def test_s1_unknown_region_at_query_time_never_raises(app: App) -> None:
    """section 1 `ConfigurationError`: never at query time: a hint naming a region the layer
    does not have runs the query uncached."""
    assert names(app, select(User).order_by(User.id).options(scl.FromCache("nowhere"))) == [
        "ann",
        "bob",
    ]
    assert app.layer.stats()["hits"] == 0


def test_s1_config_error_is_raised_by_from_settings_not_install(tmp_path: Path) -> None:
    """section 1: bad settings fail `from_settings` itself, before anything is installed."""
    bad = {
        "cachelayer.regions.default.backend": "sqla_cachelayer.sqlite",
        "cachelayer.regions.default.arguments.path": str(tmp_path / "no" / "such" / "c.db"),
    }
    with pytest.raises(scl.ConfigurationError):
        scl.CacheLayer.from_settings(bad)


def test_s1_relationship_cache_signature() -> None:
    """section 1 row `RelationshipCache(attribute, region="default", expiration_time=None,
    cache_key=None)`."""
    scl.RelationshipCache(Category.items)
    scl.RelationshipCache(Category.items, "default", 60, None)
    scl.RelationshipCache(
        attribute=Item.category, region="default", expiration_time=None, cache_key=None
    )


def test_s1_cache_expiration_time_execution_option(app: App) -> None:
    """section 1 execution option `cache_expiration_time` (seconds)."""
    import time

    stmt = (
        select(User)
        .where(User.id == 2)
        .execution_options(cache_region="default", cache_expiration_time=1)
    )
    assert names(app, stmt) == ["bob"]
    external_write(app.path, "UPDATE users SET name = 'later' WHERE id = 2")
    assert names(app, stmt) == ["bob"]
    time.sleep(1.2)
    assert names(app, stmt) == ["later"]


def test_s7_manual_row_invalidate_event(app: App) -> None:
    """section 7: an `invalidate` event of the row form carries `tables`, `values` and
    `cause="manual"`."""
    events: list[Any] = []
    app.layer.add_listener(events.append)
    app.layer.invalidate(Item, category_id=3)
    (ev,) = [e for e in events if e.kind == "invalidate"]
    assert ev.cause == "manual" and ev.fingerprint is None
    assert "items" in ev.tables
    assert ev.values and "category_id" in str(ev.values) and "3" in str(ev.values)


def test_s8_async_relationships_run_in_transaction_and_verifier(tmp_path: Path) -> None:
    """section 8: RelationshipCache lazy loads, selectinload, `run_in_transaction` (G7) and
    the verifier work with `AsyncSession`."""
    path = tmp_path / "r.db"
    seed(scl.engine_from_config({"sqlalchemy.url": f"sqlite:///{path}"}))
    layer = scl.CacheLayer.from_settings(
        {
            "cachelayer.regions.default.backend": "sqla_cachelayer.memory",
            "cachelayer.verify.sample_rate": "1",
        }
    )

    async def main() -> None:
        engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
        factory = layer.install(async_sessionmaker(engine, expire_on_commit=False))
        opt = scl.RelationshipCache(Category.items)
        eager = (
            select(Category)
            .order_by(Category.id)
            .options(selectinload(Category.items), scl.FromCache())
        )
        for _ in range(3):
            async with factory() as s:
                cat = (await s.scalars(select(Category).where(Category.id == 3).options(opt))).one()
                items = await s.run_sync(lambda _s: list(cat.items))  # noqa: B023
                assert sorted(i.name for i in items) == ["a", "b"]
                cats = (await s.scalars(eager)).all()
                assert [len(c.items) for c in cats] == [2, 1]
        assert layer.stats()["hits"] >= 2

        async def read(s: AsyncSession) -> int:
            stmt = select(Item).where(Item.id == 1).options(scl.FromCache())
            return (await s.scalars(stmt)).one().price

        async with factory() as s:
            assert await read(s) == 5  # the cached row (first miss stores it)
        external_write(path, "UPDATE items SET price = 77 WHERE id = 1")  # unseen
        async with factory() as s:
            assert await read(s) == 5  # a hit
        assert await scl.run_in_transaction(factory, read) == 77
        await engine.dispose()

    asyncio.run(main())
    assert _wait_for(lambda: layer.stats()["verified"] >= 1)
    assert _wait_for(lambda: layer.stats()["verified_stale"] >= 1)


@pytest.mark.parametrize("invalidation", ["row", "table"])
def test_g1_threaded_readers_never_see_a_value_older_than_a_returned_commit(
    tmp_path: Path, invalidation: str
) -> None:
    """G1 with threads: a writer commits increments; readers read through the cache. Each
    read returns at least the value whose `commit()` had returned before the read began."""
    a = make_app(tmp_path, cachelayer__invalidation=invalidation)
    committed = [5]  # the price after the last commit() that returned
    done = threading.Event()
    violations: list[tuple[int, int]] = []
    stmt = select(Item).where(Item.id == 1).options(scl.FromCache())
    by_list = by_cat(3)

    def writer() -> None:
        try:
            for _ in range(60):
                with a.Session() as s:
                    item = s.get(Item, 1)
                    assert item is not None
                    item.price += 1
                    value = item.price
                    s.commit()
                committed[0] = value
        finally:
            done.set()

    def reader() -> None:
        while not done.is_set():
            floor = committed[0]
            with a.Session() as s:
                got = s.scalars(stmt).one().price
                listed = next(i.price for i in s.scalars(by_list) if i.id == 1)
            if got < floor or listed < floor:
                violations.append((floor, min(got, listed)))

    threads = [threading.Thread(target=reader) for _ in range(3)]
    threads.append(threading.Thread(target=writer))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert violations == []
    assert a.layer.stats()["hits"] > 0
    a.engine.dispose()
