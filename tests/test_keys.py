"""Keys: an entry is found only by the same statement, values, options and database."""

from __future__ import annotations

from typing import Any

from _models import Base, User
from dogpile.cache import make_region
from sqlalchemy import Column, Integer, MetaData, String, Table, bindparam, create_engine, select
from sqlalchemy.orm import Session, joinedload, selectinload, sessionmaker

from sqla_cachelayer import CacheLayer, FromCache
from sqla_cachelayer._compat import SESSION_EXECUTION_OPTIONS


def _name(env: Any, stmt: Any, params: Any = None) -> Any:
    with env.Session() as s:
        return s.execute(stmt, params).scalar_one()


def test_params_method_values_are_in_the_key(env: Any) -> None:
    stmt = select(User.name).where(User.id == bindparam("uid")).options(FromCache())
    assert _name(env, stmt.params(uid=1)) == "user1"
    assert _name(env, stmt.params(uid=2)) == "user2"
    assert _name(env, stmt.params(uid=1)) == "user1"
    assert _name(env, stmt.params(uid=2)) == "user2"
    assert env.layer.stats()["hits"] == 2


def test_execute_time_params_are_in_the_key(env: Any) -> None:
    stmt = select(User.name).where(User.id == bindparam("uid")).options(FromCache())
    assert _name(env, stmt, {"uid": 3}) == "user3"
    assert _name(env, stmt, {"uid": 4}) == "user4"
    assert _name(env, stmt, {"uid": 3}) == "user3"
    assert env.layer.stats()["hits"] == 1


def test_literal_values_are_in_the_key(env: Any) -> None:
    for uid in (1, 2, 1, 2):
        assert (
            _name(env, select(User.name).where(User.id == uid).options(FromCache())) == f"user{uid}"
        )
    assert env.layer.stats()["hits"] == 2


def test_in_lists_and_limits(env: Any) -> None:
    def ids(values: list[int], limit: int) -> list[int]:
        stmt = select(User.id).where(User.id.in_(values)).order_by(User.id).limit(limit)
        with env.Session() as s:
            return list(s.scalars(stmt.options(FromCache())))

    assert ids([1, 2, 3], 5) == [1, 2, 3]
    assert ids([1, 2], 5) == [1, 2]
    assert ids([1, 2, 3], 1) == [1]
    assert ids([1, 2, 3], 5) == [1, 2, 3]
    assert env.layer.stats()["hits"] == 1


def test_loader_options_are_in_the_key(env: Any) -> None:
    base = select(User).where(User.id == 1).options(FromCache())
    with env.Session() as s:
        s.scalars(base.options(selectinload(User.addresses))).one()
    env.reset()
    with env.Session() as s:
        u = s.scalars(base.options(joinedload(User.keywords))).unique().one()
        assert env.layer.stats()["hits"] == 0, "other loader options must not share the entry"
        assert "keywords" in u.__dict__ and "addresses" not in u.__dict__


def test_two_databases_do_not_share_entries(tmp_path: Any) -> None:
    region = make_region().configure("dogpile.cache.memory")
    layer = CacheLayer({"default": region})
    answers = []
    for name in ("a", "b"):
        engine = create_engine(f"sqlite:///{tmp_path / name}.db")
        Base.metadata.create_all(engine)
        Session = layer.install(sessionmaker(engine))
        with Session() as s:
            s.add(User(id=1, name=f"in {name}"))
            s.commit()
        with Session() as s:
            answers.append(s.scalars(select(User.name).options(FromCache())).one())
    assert answers == ["in a", "in b"]


def test_schema_translate_map_is_in_the_key(tmp_path: Any) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/main.db")
    with engine.begin() as conn:
        conn.exec_driver_sql(f"ATTACH DATABASE '{tmp_path}/other.db' AS other")
        conn.exec_driver_sql("CREATE TABLE main.things (id INTEGER PRIMARY KEY, label TEXT)")
        conn.exec_driver_sql("CREATE TABLE other.things (id INTEGER PRIMARY KEY, label TEXT)")
        conn.exec_driver_sql("INSERT INTO main.things VALUES (1, 'main')")
        conn.exec_driver_sql("INSERT INTO other.things VALUES (1, 'other')")
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def attach(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.execute(f"ATTACH DATABASE '{tmp_path}/other.db' AS other")

    engine.dispose()
    things = Table(
        "things", MetaData(), Column("id", Integer, primary_key=True), Column("label", String)
    )
    layer = CacheLayer({"default": make_region().configure("dogpile.cache.memory")})
    layer.install(Session)  # the plain Session class in this test only
    try:
        got = []
        for schema in ("main", "other", "main", "other"):
            translate = {"schema_translate_map": {None: schema}}
            stmt = select(things.c.label).options(FromCache())
            if SESSION_EXECUTION_OPTIONS:
                session = Session(engine, execution_options=translate)
            else:  # SQLAlchemy 2.0: no session-wide execution options
                session, stmt = Session(engine), stmt.execution_options(**translate)
            with session as s:
                got.append(s.execute(stmt).scalar_one())
        assert got == ["main", "other", "main", "other"]
        assert layer.stats()["hits"] == 2
    finally:
        layer.uninstall(Session)


def test_keys_have_bounded_length(memory_env: Any) -> None:
    env = memory_env
    region = env.layer.regions["default"]
    huge = select(User.id).where(User.id.in_(list(range(5000)))).options(FromCache())
    with env.Session() as s:
        s.scalars(huge).all()
    keys = list(region.backend._cache)
    assert keys and max(len(k) for k in keys) < 120


def test_explicit_cache_key_is_added_to_the_key(env: Any) -> None:
    stmt = select(User.name).where(User.id == bindparam("uid"))
    a = stmt.options(FromCache(cache_key="tenant-a"))
    b = stmt.options(FromCache(cache_key="tenant-b"))
    assert _name(env, a, {"uid": 1}) == "user1"
    assert _name(env, a, {"uid": 2}) == "user2", "different values never share an entry"
    assert _name(env, b, {"uid": 1}) == "user1"
    assert env.layer.stats()["hits"] == 0, "a different cache_key is a different entry"
    assert _name(env, a, {"uid": 1}) == "user1"
    assert env.layer.stats()["hits"] == 1


# --------------------------------------------------------------------------
# query_key itself: injective across values, types, forms and databases

import datetime  # noqa: E402
import decimal  # noqa: E402
import uuid  # noqa: E402

import pytest  # noqa: E402

from sqla_cachelayer.keys import SHORT_VALUES, query_key  # noqa: E402

_DIGEST = "ab" * 20
_DB = "0123456789abcdef0123"

VALUE_LISTS: list[list[Any]] = [
    [],
    [1],
    [True],
    [1.0],
    [decimal.Decimal("1")],
    [decimal.Decimal("1.0")],
    ["1"],
    [b"1"],
    [None],
    [1, 2],
    [12],
    [[1, 2]],
    [(1, 2)],
    ["a b"],
    ["a|str:'b"],
    ["a", "str:'b"],
    ["é"],
    ["x" * (SHORT_VALUES + 1)],
    ["x" * (SHORT_VALUES - 10)],
    [datetime.date(2026, 1, 1)],
    [datetime.datetime(2026, 1, 1)],
    [datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)],
    [uuid.UUID(int=1)],
    [frozenset({1})],
]


def _key(values: list[Any], **kw: Any) -> str:
    args: dict[str, Any] = {"params": None, "exec_params": None, "db_identity": _DB, "extra": ""}
    args.update(kw)
    return query_key("scl:default:q:", _DIGEST, values, **args)


def test_distinct_values_give_distinct_keys() -> None:
    keys = [_key(v) for v in VALUE_LISTS]
    assert len(set(keys)) == len(keys)
    # both forms are in use, and none is longer than the bound
    assert any("~" in k for k in keys) and any("~" not in k for k in keys)
    assert max(len(k) for k in keys) <= len("scl:default:q:") + 40 + 2 + 20 + SHORT_VALUES


@pytest.mark.parametrize("values", VALUE_LISTS, ids=repr)
def test_every_part_of_the_key_separates_entries(values: list[Any]) -> None:
    base = _key(values)
    assert _key(values) == base  # stable
    assert _key(values, db_identity="f" * 20) != base
    assert _key(values, extra="tenant-1") != base
    assert _key(values, extra="tenant-1") != _key(values, extra="tenant-2")
    assert _key(values, params={"p": 1}) != base
    assert _key(values, exec_params={"p": 1}) != base
    assert _key(values, params={"p": 1}) != _key(values, exec_params={"p": 1})
    assert query_key("scl:default:q:", "cd" * 20, values, None, None, _DB, "") != base


def test_long_and_odd_values_are_hashed_into_a_fixed_length() -> None:
    for values in (["x" * 500], ["a b"], ["é"], [1], list(range(100))):
        key = _key(values, extra="k")
        assert len(key) == len("scl:default:q:") + 40
