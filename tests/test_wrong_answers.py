"""Issue-9 class of bugs: deployments where a cache could answer wrong.

Schema-per-tenant, forked workers, read-modify-write units of work, textual
fragments, engines sharing a dialect, two-phase commits, read replicas.
"""

from __future__ import annotations

from typing import Any

import pytest
from _models import User
from sqlalchemy import select

from sqla_cachelayer._compat import SESSION_EXECUTION_OPTIONS
from sqla_cachelayer.layer import UNIT_OF_WORK_INFO_KEY


def test_unit_of_work_sessions_read_the_database(make_env: Any) -> None:
    """G7: a session marked as a read-modify-write unit of work never reads
    from the cache, even with cache_all on."""
    env = make_env(cache_all=True)
    stmt = select(User).where(User.id == 1)
    with env.Session() as s:
        s.scalars(stmt).one()
    env.reset()
    with env.Session() as s:
        s.scalars(stmt).one()
    assert env.sql_count() == 0, "an ordinary session is served from the cache"
    with env.Session() as s:
        s.info[UNIT_OF_WORK_INFO_KEY] = True
        s.scalars(stmt).one()
    assert env.sql_count() == 1, "a unit of work reads the database"


# ---------------------------------------------------------------------------
# 1. schema_translate_map, from whichever level it is set


def _tenant_engine(tmp_path: Any) -> Any:
    """A SQLite file with a ``tenant2`` schema (an ATTACHed file): the same
    tables twice, users named apart."""
    from _models import Base
    from sqlalchemy import create_engine, event

    engine = create_engine(f"sqlite:///{tmp_path / 'main.sqlite'}")
    attached = str(tmp_path / "tenant2.sqlite")

    @event.listens_for(engine, "connect")
    def _attach(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.execute(f"ATTACH DATABASE '{attached}' AS tenant2")

    for schema, prefix in ((None, "main"), ("tenant2", "t2")):
        bound = engine.execution_options(schema_translate_map={None: schema})
        Base.metadata.create_all(bound)
        with bound.begin() as conn:
            conn.execute(User.__table__.insert(), [{"id": 1, "name": f"{prefix}-1", "score": 0}])
    return engine


def test_schema_translate_map_at_every_level_is_in_the_key(tmp_path: Any) -> None:
    from sqlalchemy.orm import Session, sessionmaker

    import sqla_cachelayer as scl

    engine = _tenant_engine(tmp_path)
    tenant = {"schema_translate_map": {None: "tenant2"}}
    layer = scl.CacheLayer(cache_all=True)
    stmt = select(User.name).where(User.id == 1)

    def read(factory: Any, **kw: Any) -> str:
        with factory() as s:
            return str(s.scalars(stmt, **kw).one())

    Plain = layer.install(sessionmaker(engine))
    assert read(Plain) == "main-1"
    assert read(Plain) == "main-1"
    assert layer.stats()["hits"] == 1
    # Engine.execution_options()
    assert read(layer.install(sessionmaker(engine.execution_options(**tenant)))) == "t2-1"
    # sessionmaker / Session execution options (SQLAlchemy 2.1)
    if SESSION_EXECUTION_OPTIONS:
        assert read(layer.install(sessionmaker(engine, execution_options=tenant))) == "t2-1"
    # execute()-time
    assert read(Plain, execution_options=tenant) == "t2-1"
    # the statement's own
    with Plain() as s:
        assert s.scalars(stmt.execution_options(**tenant)).one() == "t2-1"
    # a Connection bound to the session, with its own options
    with (
        engine.connect() as conn,
        layer.install(Session(bind=conn.execution_options(**tenant))) as s,
    ):
        assert s.scalars(stmt).one() == "t2-1"
    # Session.connection(execution_options=...) for the transaction
    with Plain() as s:
        s.connection(execution_options=tenant)
        assert s.scalars(stmt).one() == "t2-1"
    # and the plain tenant still reads its own rows from the cache
    hits = layer.stats()["hits"]
    assert read(Plain) == "main-1"
    assert layer.stats()["hits"] == hits + 1
    engine.dispose()


def test_database_named_without_its_driver(tmp_path: Any) -> None:
    from sqlalchemy import create_engine

    from sqla_cachelayer.keys import database_identity

    path = tmp_path / "app.db"
    sync = create_engine(f"sqlite:///{path}")
    aio = create_engine(f"sqlite+aiosqlite:///{path}")
    other = create_engine(f"sqlite:///{tmp_path / 'other.db'}")
    assert database_identity(sync) == database_identity(aio)
    assert database_identity(sync) != database_identity(other)
    # private in-memory databases are never one another's, copies of an engine share one
    m1, m2 = create_engine("sqlite://"), create_engine("sqlite://")
    assert database_identity(m1) != database_identity(m2)
    assert database_identity(m1) == database_identity(m1.execution_options(x=1))
    pg1 = create_engine("postgresql+psycopg://u:secret@h:5432/db")
    pytest.importorskip("asyncpg")
    pg2 = create_engine("postgresql+asyncpg://u:other@h:5432/db")
    assert database_identity(pg1) == database_identity(pg2)
    assert database_identity(pg1) != database_identity(
        create_engine("postgresql+psycopg://u@h:5432/db2")
    )


# ---------------------------------------------------------------------------
# 2. workers forked from one parent share a backend: a key means one statement


def _forked_worker(Session: Any, which: int, go: Any, out: Any) -> None:
    from sqlalchemy.orm import with_loader_criteria

    go.wait(30)
    criteria = (
        with_loader_criteria(User, lambda cls: cls.name == "user1")
        if which == 1
        else with_loader_criteria(User, lambda cls: cls.name != "user1")
    )
    with Session() as s:
        rows = s.scalars(select(User).options(criteria).order_by(User.id)).all()
        out.put((which, [u.id for u in rows]))


@pytest.mark.parametrize("backend", ["sqla_cachelayer.sqlite", "dogpile.cache.redis"])
def test_forked_workers_never_share_a_key_for_different_statements(
    backend: str, request: pytest.FixtureRequest, tmp_path: Any, make_env: Any
) -> None:
    import multiprocessing

    from conftest import region_for

    env = make_env(region=region_for(backend, request, tmp_path), cache_all=True)
    ctx = multiprocessing.get_context("fork")  # as gunicorn --preload and Celery prefork do
    out = ctx.Queue()
    answers = {}
    for which in (1, 2):
        go = ctx.Event()
        worker = ctx.Process(target=_forked_worker, args=(env.Session, which, go, out))
        worker.start()
        go.set()
        number, ids = out.get(timeout=60)
        worker.join(30)
        assert worker.exitcode == 0
        answers[number] = ids
    assert answers == {1: [1], 2: [2, 3, 4, 5]}


def test_lambda_criteria_keyed_alike_in_every_process() -> None:
    """The same code (a lambda in with_loader_criteria) keys alike across
    processes; other code keys apart."""
    import subprocess
    import sys

    from sqla_cachelayer.keys import structure_digest

    script = (
        "import sys; sys.path.insert(0, 'tests');"
        "import test_wrong_answers as t; print(t._criteria_digest())"
    )
    runs = {
        subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(2)
    }
    assert runs == {_criteria_digest()}
    other = select(User).options(_other_criteria())
    assert structure_digest(other._generate_cache_key().key) != _criteria_digest()


def _criteria() -> Any:
    from sqlalchemy.orm import with_loader_criteria

    return with_loader_criteria(User, lambda cls: cls.name == "user1")


def _other_criteria() -> Any:
    from sqlalchemy.orm import with_loader_criteria

    return with_loader_criteria(User, lambda cls: cls.name != "user1")


def _criteria_digest() -> str:
    from sqla_cachelayer.keys import structure_digest

    return structure_digest(select(User).options(_criteria())._generate_cache_key().key)


# ---------------------------------------------------------------------------
# 4. and 5. textual SQL: fragments read every table; writes cascade, upserts


BACKENDS = ["dogpile.cache.memory", "sqla_cachelayer.sqlite", "dogpile.cache.redis"]


def _cached_env(backend: str, request: pytest.FixtureRequest, tmp_path: Any, make_env: Any) -> Any:
    from conftest import region_for

    # tuned: foreign_keys=ON, so the database itself runs the declared cascades
    return make_env(region=region_for(backend, request, tmp_path), cache_all=True, tuned=True)


def _fresh(env: Any, stmt: Any) -> list[Any]:
    """The same query, uncached."""
    from sqla_cachelayer import NoCache

    with env.Session() as s:
        return [tuple(r) for r in s.execute(stmt.options(NoCache())).all()]


def _cached(env: Any, stmt: Any) -> list[Any]:
    with env.Session() as s:
        return [tuple(r) for r in s.execute(stmt).all()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_text_fragment_in_an_orm_select_reads_every_table(
    backend: str, request: pytest.FixtureRequest, tmp_path: Any, make_env: Any
) -> None:
    from _models import Address
    from sqlalchemy import text

    env = _cached_env(backend, request, tmp_path, make_env)
    stmt = (
        select(User.id)
        .where(text("users.id IN (SELECT user_id FROM addresses WHERE email LIKE 'z%')"))
        .order_by(User.id)
    )
    assert _cached(env, stmt) == []
    assert _cached(env, stmt) == []
    assert env.layer.stats()["hits"] == 1
    with env.Session() as s:
        s.add(Address(id=99, email="z@x.org", user_id=3))
        s.commit()
    assert _cached(env, stmt) == _fresh(env, stmt) == [(3,)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_textual_delete_invalidates_declared_cascades(
    backend: str, request: pytest.FixtureRequest, tmp_path: Any, make_env: Any
) -> None:
    from _models import user_keywords
    from sqlalchemy import text

    env = _cached_env(backend, request, tmp_path, make_env)
    stmt = select(user_keywords.c.user_id, user_keywords.c.keyword_id).order_by(
        user_keywords.c.user_id, user_keywords.c.keyword_id
    )
    before = _cached(env, stmt)
    assert (1, 1) in before
    with env.Session() as s:
        s.execute(text("DELETE FROM addresses WHERE user_id = 1"))
        s.execute(text("DELETE FROM users WHERE id = 1"))  # ON DELETE CASCADE: user_keywords
        s.commit()
    after = _cached(env, stmt)
    assert after == _fresh(env, stmt)
    assert (1, 1) not in after


def test_textual_classification_of_upserts_truncate_and_dml_ctes() -> None:
    from sqla_cachelayer.tracking import classify_textual

    upsert = (
        "INSERT INTO users (id, name) VALUES (1, 'x') "
        "ON CONFLICT (id) DO UPDATE SET name = excluded.name"
    )
    assert classify_textual(upsert) == (frozenset({"users"}), False)
    assert classify_textual("INSERT INTO users (id) VALUES (1) ON CONFLICT DO NOTHING")[0] == {
        "users"
    }
    mysql = "INSERT INTO users (id, name) VALUES (1, 'x') ON DUPLICATE KEY UPDATE name = 'x'"
    assert classify_textual(mysql)[0] == {"users"}
    assert classify_textual("TRUNCATE users CASCADE")[0] == {"*all*"}
    assert classify_textual("TRUNCATE users")[0] == {"users"}
    cte = "WITH moved AS (UPDATE users SET score = 0 RETURNING id) SELECT id FROM moved"
    assert classify_textual(cte) == (frozenset({"users"}), True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_textual_upsert_invalidates_its_table_only(
    backend: str, request: pytest.FixtureRequest, tmp_path: Any, make_env: Any
) -> None:
    from _models import Address
    from sqlalchemy import text

    env = _cached_env(backend, request, tmp_path, make_env)
    users = select(User.id, User.name).order_by(User.id)
    addresses = select(Address.id).order_by(Address.id)
    _cached(env, users)
    _cached(env, addresses)
    with env.Session() as s:
        s.execute(
            text(
                "INSERT INTO users (id, name, score) VALUES (1, 'upserted', 0) "
                "ON CONFLICT (id) DO UPDATE SET name = excluded.name"
            )
        )
        s.commit()
    hits = env.layer.stats()["hits"]
    _cached(env, addresses)
    assert env.layer.stats()["hits"] == hits + 1, "an upsert of users leaves addresses cached"
    assert _cached(env, users) == _fresh(env, users)
    assert (1, "upserted") in _cached(env, users)


def test_select_with_a_data_modifying_cte_is_a_write(pg_engine_url: str) -> None:
    from _models import Base, seed
    from sqlalchemy import create_engine, update
    from sqlalchemy.orm import sessionmaker

    import sqla_cachelayer as scl

    engine = create_engine(pg_engine_url)
    Base.metadata.create_all(engine)
    layer = scl.CacheLayer(cache_all=True)
    Session = layer.install(sessionmaker(engine))
    seed(Session)
    names = select(User.name).where(User.id == 1)
    with Session() as s:
        assert s.scalars(names).one() == "user1"
    moved = update(User).where(User.id == 1).values(name="via-cte").returning(User.id).cte()
    with Session() as s:
        assert s.execute(select(moved.c.id)).scalars().all() == [1]
        s.commit()
    with Session() as s:
        assert s.scalars(names).one() == "via-cte"
    engine.dispose()


# ---------------------------------------------------------------------------
# 6. engines that share a dialect


def test_writes_through_any_engine_on_a_dialect_reach_every_layer(tmp_path: Any) -> None:
    from _models import Base, seed
    from sqlalchemy import create_engine, update
    from sqlalchemy.orm import sessionmaker

    import sqla_cachelayer as scl

    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    Base.metadata.create_all(engine)
    first, second = scl.CacheLayer(cache_all=True), scl.CacheLayer(cache_all=True)
    One = first.install(sessionmaker(engine.execution_options(logging_token="one")))
    Two = second.install(sessionmaker(engine.execution_options(logging_token="two")))
    seed(sessionmaker(engine))
    names = select(User.name).where(User.id == 1)

    def read(factory: Any) -> str:
        with factory() as s:
            return str(s.scalars(names).one())

    for value, writer in (("base", engine), ("one", One), ("two", Two)):
        assert read(One) == read(Two)  # both cached now
        if isinstance(writer, sessionmaker):
            with writer() as s:
                s.execute(update(User).where(User.id == 1).values(name=value))
                s.commit()
        else:
            with writer.begin() as conn:  # Core, on an engine no layer was given
                conn.execute(update(User).where(User.id == 1).values(name=value))
        assert read(One) == value
        assert read(Two) == value
    engine.dispose()


# ---------------------------------------------------------------------------
# 7. two-phase commit on PostgreSQL


def test_two_phase_commit_invalidates(pg_engine_url: str) -> None:
    from _models import Base, seed
    from sqlalchemy import create_engine, update
    from sqlalchemy.orm import sessionmaker

    import sqla_cachelayer as scl

    engine = create_engine(pg_engine_url)
    Base.metadata.create_all(engine)
    layer = scl.CacheLayer(cache_all=True)
    Session = layer.install(sessionmaker(engine, twophase=True))
    seed(sessionmaker(engine))
    names = select(User.name).where(User.id == 1)
    with Session() as s:
        assert s.scalars(names).one() == "user1"
    with Session() as s:
        s.execute(update(User).where(User.id == 1).values(name="two-phase"))
        s.commit()  # PREPARE TRANSACTION, then COMMIT PREPARED
    with Session() as s:
        assert s.scalars(names).one() == "two-phase"
    engine.dispose()


def test_two_phase_commit_through_asyncpg_invalidates(pg_engine_url: str) -> None:
    """asyncpg commits a prepared transaction with PostgreSQL's base
    do_commit_twophase, which rolls back (forgetting the write set) inside."""
    import asyncio

    pytest.importorskip("asyncpg")
    from _models import Base, seed
    from sqlalchemy import create_engine, update
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
    from sqlalchemy.orm import sessionmaker

    import sqla_cachelayer as scl

    sync_engine = create_engine(pg_engine_url)
    Base.metadata.create_all(sync_engine)
    seed(sessionmaker(sync_engine))
    sync_engine.dispose()
    url = pg_engine_url.replace("postgresql+psycopg://", "postgresql+asyncpg://").replace(
        "postgresql://", "postgresql+asyncpg://"
    )
    names = select(User.name).where(User.id == 1)

    async def run() -> list[str]:
        engine = create_async_engine(url)
        layer = scl.CacheLayer(cache_all=True)
        Session = layer.install(async_sessionmaker(engine, twophase=True))
        seen = []
        async with Session() as s:
            seen.append((await s.scalars(names)).one())
        async with Session() as s:
            await s.execute(update(User).where(User.id == 1).values(name="two-phase"))
            await s.commit()
        async with Session() as s:
            seen.append((await s.scalars(names)).one())
        await engine.dispose()
        return seen

    assert asyncio.run(run()) == ["user1", "two-phase"]


# ---------------------------------------------------------------------------
# 8. read replicas


def _replicated(tmp_path: Any, lag: float | None) -> tuple[Any, Any, Any, Any]:
    """A primary and a "replica" (its own SQLite file, updated behind every
    engine's back as replication does), and a session that reads from the
    replica and flushes to the primary, as SQLAlchemy's documented routing
    session does."""
    import shutil

    from _models import Base, seed
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session, sessionmaker

    import sqla_cachelayer as scl

    primary = create_engine(f"sqlite:///{tmp_path / 'primary.sqlite'}")
    Base.metadata.create_all(primary)
    seed(sessionmaker(primary))
    primary.dispose()
    shutil.copy(tmp_path / "primary.sqlite", tmp_path / "replica.sqlite")
    replica = create_engine(f"sqlite:///{tmp_path / 'replica.sqlite'}")
    if lag is not None:
        replica = replica.execution_options(cache_replica_lag=lag)

    class RoutingSession(Session):
        def get_bind(self, mapper: Any = None, clause: Any = None, **kw: Any) -> Any:
            return primary if self._flushing or not getattr(clause, "is_select", False) else replica

    layer = scl.CacheLayer(cache_all=True)
    Routed = layer.install(sessionmaker(class_=RoutingSession))

    def replicate() -> None:
        import sqlite3

        with sqlite3.connect(tmp_path / "replica.sqlite") as raw:
            raw.execute("UPDATE users SET name = (SELECT 'renamed') WHERE id = 1")

    return Routed, layer, replicate, (primary, replica)


def test_a_declared_replica_lag_keeps_lagging_reads_out_of_the_cache(tmp_path: Any) -> None:
    Routed, _layer, replicate, engines = _replicated(tmp_path, lag=3600)
    names = select(User.name).where(User.id == 1)
    with Routed() as s:
        assert s.scalars(names).one() == "user1"
    with Routed() as s:
        s.get(User, 1).name = "renamed"
        s.commit()  # on the primary; the replica has not caught up
    with Routed() as s:
        assert s.scalars(names).one() == "user1"  # the replica's answer, lagging
    replicate()
    with Routed() as s:
        assert s.scalars(names).one() == "renamed", "the lagging answer was not kept"
    for engine in engines:
        engine.dispose()
