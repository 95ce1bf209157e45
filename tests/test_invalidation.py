"""G1-G4: every write path invalidates, commits make entries unreachable, uncommitted
or old results are never published."""

from __future__ import annotations

from typing import Any

import pytest
from _models import Address, Counter, Employee, Keyword, Manager, User, user_keywords
from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.orm import selectinload, sessionmaker

from sqla_cachelayer import FromCache, NoCache

# the core behaviour: with Session and with AsyncSession alike (conftest.py)
pytestmark = pytest.mark.both_sessions


def _names(env: Any, stmt: Any) -> list[Any]:
    with env.Session() as s:
        return [tuple(r) for r in s.execute(stmt).all()]


def _cached_then_hit(env: Any, stmt: Any) -> list[Any]:
    first = _names(env, stmt)
    hits = env.layer.stats()["hits"]
    assert _names(env, stmt) == first
    assert env.layer.stats()["hits"] == hits + 1, "the second read must be a hit"
    return first


USERS = select(User.id, User.name).order_by(User.id).options(FromCache())
ADDRESSES = select(Address.id, Address.email).order_by(Address.id).options(FromCache())
KEYWORDS_OF_1 = (
    select(Keyword.word)
    .join(user_keywords, user_keywords.c.keyword_id == Keyword.id)
    .where(user_keywords.c.user_id == 1)
    .order_by(Keyword.word)
    .options(FromCache())
)
MANAGERS = select(Manager.id, Manager.budget).options(FromCache())


def _orm_update(env: Any) -> None:
    with env.Session() as s:
        s.get(User, 1).name = "changed"
        s.commit()


def _orm_insert(env: Any) -> None:
    with env.Session() as s:
        s.add(User(id=50, name="new"))
        s.commit()


def _orm_delete(env: Any) -> None:
    with env.Session() as s:
        s.delete(s.get(User, 5))
        s.commit()


def _association(env: Any) -> None:
    with env.Session() as s:
        u = s.get(User, 1)
        u.keywords.append(s.get(Keyword, 3))
        s.commit()


def _inheritance(env: Any) -> None:
    with env.Session() as s:
        s.get(Manager, 2).budget = 999
        s.commit()


def _bulk_update(env: Any) -> None:
    with env.Session() as s:
        s.execute(update(User).where(User.id == 2).values(name="bulk"))
        s.commit()


def _bulk_delete(env: Any) -> None:
    with env.Session() as s:
        s.execute(delete(Address).where(Address.id == 10))
        s.commit()


def _bulk_insert(env: Any) -> None:
    with env.Session() as s:
        s.execute(insert(User), [{"id": 60, "name": "b1"}, {"id": 61, "name": "b2"}])
        s.commit()


def _core_dml(env: Any) -> None:
    with env.engine.begin() as conn:
        conn.execute(User.__table__.update().where(User.__table__.c.id == 3).values(name="core"))


def _textual(env: Any) -> None:
    with env.Session() as s:
        s.execute(text("UPDATE users SET name = 'text' WHERE id = 4"))
        s.commit()


def _driver_sql(env: Any) -> None:
    with env.engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO \"addresses\" (id, email, user_id) VALUES (70, 'd@x', 1)")


def _ddl(env: Any) -> None:
    with env.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE addresses")
        conn.exec_driver_sql(
            "CREATE TABLE addresses (id INTEGER PRIMARY KEY, email TEXT, user_id INT)"
        )


def _cascade(env: Any) -> None:
    # ON DELETE CASCADE on user_keywords.user_id: the database deletes rows the
    # application never names
    with env.engine.begin() as conn:
        conn.exec_driver_sql("PRAGMA foreign_keys=ON")
    with env.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA foreign_keys=ON")
        conn.execute(delete(Address).where(Address.user_id == 1))
        conn.execute(delete(User.__table__).where(User.__table__.c.id == 1))
        conn.commit()


WRITE_PATHS = {
    "orm_update": (_orm_update, USERS),
    "orm_insert": (_orm_insert, USERS),
    "orm_delete": (_orm_delete, ADDRESSES),  # delete-orphan cascade deletes addresses
    "association_table": (_association, KEYWORDS_OF_1),
    "inheritance_table": (_inheritance, MANAGERS),
    "bulk_update": (_bulk_update, USERS),
    "bulk_delete": (_bulk_delete, ADDRESSES),
    "bulk_insert": (_bulk_insert, USERS),
    "core_dml": (_core_dml, USERS),
    "textual_dml": (_textual, USERS),
    "driver_sql": (_driver_sql, ADDRESSES),
    "ddl": (_ddl, ADDRESSES),
    "fk_cascade": (_cascade, KEYWORDS_OF_1),
}


@pytest.mark.parametrize("path", sorted(WRITE_PATHS))
def test_every_write_path_invalidates(env: Any, path: str) -> None:
    write, stmt = WRITE_PATHS[path]
    before = _cached_then_hit(env, stmt)
    write(env)
    truth = _names(env, stmt.options(NoCache()))
    assert truth != before, "the write must change the answer, or the test proves nothing"
    assert _names(env, stmt) == truth


def test_rollback_keeps_entries(env: Any) -> None:
    before = _cached_then_hit(env, USERS)
    with env.Session() as s:
        s.get(User, 1).name = "rolled back"
        s.flush()
        s.rollback()
    hits = env.layer.stats()["hits"]
    assert _names(env, USERS) == before
    assert env.layer.stats()["hits"] == hits + 1


def test_savepoint_writes_invalidate_on_commit(env: Any) -> None:
    _cached_then_hit(env, USERS)
    with env.Session() as s:
        with s.begin_nested():
            s.get(User, 1).name = "in savepoint"
        s.commit()
    assert "in savepoint" in [n for _, n in _names(env, USERS)]


def test_read_your_writes_inside_transaction(env: Any) -> None:
    _cached_then_hit(env, USERS)
    with env.Session() as s:
        s.get(User, 1).name = "mine"
        s.flush()
        names = [n for _, n in s.execute(USERS)]
        assert "mine" in names, "G2: a transaction that wrote users must see its write"
        s.rollback()
    assert "mine" not in [n for _, n in _names(env, USERS)]


def test_read_your_writes_inside_a_savepoint(env: Any) -> None:
    """G2 holds for the whole transaction: a savepoint begun after a write, or
    a write made inside one, never makes a cached answer hide it."""
    _cached_then_hit(env, USERS)
    with env.Session() as s:
        s.get(User, 1).name = "before the savepoint"
        s.flush()
        with s.begin_nested():
            names = [n for _, n in s.execute(USERS)]
            assert "before the savepoint" in names
            s.get(User, 2).name = "inside it"
            s.flush()
            names = [n for _, n in s.execute(USERS)]
            assert "inside it" in names and "before the savepoint" in names
        s.rollback()
    assert {"before the savepoint", "inside it"}.isdisjoint(n for _, n in _names(env, USERS))


def test_uncommitted_results_are_never_published(env: Any) -> None:
    with env.Session() as s:
        s.add(User(id=77, name="uncommitted"))
        s.flush()
        assert 77 in [i for i, _ in s.execute(USERS)]
        # another session, meanwhile, must not be served the uncommitted row
        assert 77 not in [i for i, _ in _names(env, USERS)]
        s.rollback()
    assert 77 not in [i for i, _ in _names(env, USERS)]
    assert env.layer.stats()["stores"] >= 1


def test_old_snapshot_is_not_published(make_env: Any) -> None:
    """A transaction whose snapshot predates a returned commit must not store."""
    env = make_env(real_transactions=True)
    stmt = select(Counter.value).options(FromCache())
    with env.Session() as reader:
        # start a read snapshot (SQLite: the first SELECT of the transaction)
        reader.execute(select(User.id).options(NoCache())).all()
        with env.Session() as writer:
            writer.get(Counter, 1).value = 42
            writer.commit()
        # the reader's snapshot still says 0 (SQLite WAL/rollback journal keeps it)
        seen = reader.execute(stmt).scalar()
        assert seen == 0, "the reader must still be on its old snapshot, or the test proves nothing"
    latest = _names(env, stmt)
    assert latest == [(42,)], f"served {latest} after the commit returned (reader saw {seen})"


def test_invalidate_targets(env: Any) -> None:
    _cached_then_hit(env, USERS)
    _cached_then_hit(env, ADDRESSES)
    # a write behind the layer's back, then an explicit invalidation
    import sqlite3

    raw = sqlite3.connect(env.engine.url.database)
    raw.execute("UPDATE users SET name = 'behind' WHERE id = 1")
    raw.execute("UPDATE addresses SET email = 'behind' WHERE id = 10")
    raw.commit()
    raw.close()
    assert "behind" not in [n for _, n in _names(env, USERS)]  # still cached: not our write
    env.layer.invalidate(User)
    assert "behind" in [n for _, n in _names(env, USERS)]
    assert "behind" not in [e for _, e in _names(env, ADDRESSES)]
    env.layer.invalidate("addresses")
    assert "behind" in [e for _, e in _names(env, ADDRESSES)]


def test_invalidate_all(env: Any) -> None:
    _cached_then_hit(env, USERS)
    _cached_then_hit(env, MANAGERS)
    stores = env.layer.stats()["stores"]
    env.layer.invalidate_all()
    _names(env, USERS)
    _names(env, MANAGERS)
    assert env.layer.stats()["stores"] == stores + 2


def test_eager_loaded_tables_are_tracked(env: Any) -> None:
    stmt = select(User).where(User.id == 1).options(FromCache(), selectinload(User.addresses))

    def emails() -> list[str]:
        with env.Session() as s:
            return [a.email for a in s.scalars(stmt).one().addresses]

    assert emails() == ["u1-0@x.org", "u1-1@x.org"]
    assert emails() == ["u1-0@x.org", "u1-1@x.org"]
    with env.Session() as s:
        s.get(Address, 10).email = "eager@x"
        s.commit()
    assert emails() == ["eager@x", "u1-1@x.org"]


def test_inheritance_base_query_tracks_subclass_table(env: Any) -> None:
    from sqlalchemy.orm import with_polymorphic

    poly = with_polymorphic(Employee, "*")
    stmt = select(poly).order_by(poly.id).options(FromCache())

    def budgets() -> list[Any]:
        with env.Session() as s:
            return [getattr(e, "budget", None) for e in s.scalars(stmt)]

    assert budgets() == [None, 100]
    assert budgets() == [None, 100]
    _inheritance(env)
    assert budgets() == [None, 999]


def test_expiration_time_bounds_life(env: Any) -> None:
    stmt = select(User.id).options(FromCache(expiration_time=0))
    _names(env, stmt)
    misses = env.layer.stats()["misses"]
    _names(env, stmt)
    assert env.layer.stats()["misses"] == misses + 1


def test_unrelated_write_keeps_entries(env: Any) -> None:
    before = _cached_then_hit(env, USERS)
    with env.Session() as s:
        s.get(Address, 10).email = "elsewhere@x"
        s.commit()
    hits = env.layer.stats()["hits"]
    assert _names(env, USERS) == before
    assert env.layer.stats()["hits"] == hits + 1, (
        "a write to addresses must not drop users' entries"
    )


def test_textual_statement_classification() -> None:
    from sqla_cachelayer.tracking import classify_textual

    assert classify_textual("BEGIN IMMEDIATE") == (frozenset(), False)
    assert classify_textual("SAVEPOINT sa_1") == (frozenset(), False)
    assert classify_textual("select * from users") == (frozenset(), True)
    assert classify_textual('UPDATE "main"."Users" SET a = 1')[0] == {"users"}
    assert classify_textual("with d as (delete from a returning *) select * from d")[0] == {"a"}
    assert classify_textual("TRUNCATE a, b")[0] == {"a", "b"}
    assert classify_textual("LOAD DATA INFILE 'f' INTO TABLE t")[0] == {"t"}
    assert classify_textual("select 1 where 'delete from x' = ''") == (frozenset(), True)
    for unknown in ("CALL refresh()", "EXECUTE plan(1)", "DO $$ begin end $$"):
        assert classify_textual(unknown)[0] == {"*all*"}


def test_two_phase_commit_invalidates(make_env: Any, pg_engine_url: str) -> None:
    env = make_env(url=pg_engine_url)
    before = _cached_then_hit(env, USERS)
    Session = env.layer.install(sessionmaker(env.engine, twophase=True))
    with Session() as s:
        s.get(User, 1).name = "two-phase"
        s.commit()
    truth = _names(env, USERS.options(NoCache()))
    assert truth != before
    assert _names(env, USERS) == truth


def test_engine_watched_before_its_first_connection(pg_engine_url: str) -> None:
    """The dialect is wrapped before SQLAlchemy's first connect initializes it
    (psycopg's raw connections carry an ``info`` of their own)."""
    from _models import Base, seed
    from dogpile.cache import make_region

    import sqla_cachelayer as scl

    engine = scl.engine_from_config({"sqlalchemy.url": pg_engine_url})
    layer = scl.CacheLayer({"default": make_region().configure("dogpile.cache.memory")})
    Session = layer.install(sessionmaker(engine))  # watches the engine: no connection yet
    Base.metadata.create_all(engine)
    seed(Session)
    stmt = select(User.name).where(User.id == 1).options(FromCache())
    for expected in ("user1", "user1"):
        with Session() as s:
            assert s.execute(stmt).scalar_one() == expected
    with Session() as s:
        s.get(User, 1).name = "pg"
        s.commit()
    with Session() as s:
        assert s.execute(stmt).scalar_one() == "pg"
    assert layer.stats()["hits"] == 1
    engine.dispose()
