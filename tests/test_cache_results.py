"""A hit returns what the database would, emits no SQL and takes no connection."""

from __future__ import annotations

from typing import Any

import pytest
from _models import Address, Employee, Keyword, Manager, User
from sqlalchemy import func, inspect, select
from sqlalchemy.orm import joinedload, selectinload, subqueryload

from sqla_cachelayer import FromCache, NoCache

# the core behaviour: with Session and with AsyncSession alike (conftest.py)
pytestmark = pytest.mark.both_sessions


def _plain(value: Any) -> Any:
    """Objects as comparable plain values (attributes, nested relationships)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, User):
        return ("User", value.id, value.name, value.score)
    if isinstance(value, Address):
        return ("Address", value.id, value.email, value.user_id)
    if isinstance(value, Manager):
        return ("Manager", value.id, value.name, value.budget)
    if isinstance(value, Employee):
        return ("Employee", value.id, value.name)
    if isinstance(value, Keyword):
        return ("Keyword", value.id, value.word)
    if hasattr(value, "_mapping"):
        return [_plain(v) for v in value]
    return value


QUERIES = {
    "entities": lambda s, o: s.scalars(select(User).order_by(User.id).options(o)).all(),
    "one_by_pk": lambda s, o: s.scalars(select(User).where(User.id == 3).options(o)).one(),
    "columns": lambda s, o: s.execute(
        select(User.id, User.name).order_by(User.id).options(o)
    ).all(),
    "scalar": lambda s, o: s.scalar(select(User.name).where(User.id == 2).options(o)),
    "aggregate": lambda s, o: s.execute(
        select(Address.user_id, func.count(Address.id)).group_by(Address.user_id).options(o)
    ).all(),
    "join_entities": lambda s, o: s.execute(
        select(User, Address).join(User.addresses).order_by(Address.id).options(o)
    ).all(),
    "subquery": lambda s, o: s.scalars(
        select(User)
        .where(User.id.in_(select(Address.user_id).where(Address.email.like("u2%"))))
        .options(o)
    ).all(),
    "selectinload": lambda s, o: [
        (u, list(u.addresses), list(u.keywords))
        for u in s.scalars(
            select(User)
            .order_by(User.id)
            .options(o, selectinload(User.addresses), selectinload(User.keywords))
        )
    ],
    "joinedload": lambda s, o: [
        (u, list(u.addresses))
        for u in s.scalars(
            select(User).order_by(User.id).options(o, joinedload(User.addresses))
        ).unique()
    ],
    "subqueryload": lambda s, o: [
        (u, list(u.addresses))
        for u in s.scalars(select(User).order_by(User.id).options(o, subqueryload(User.addresses)))
    ],
    "inheritance": lambda s, o: s.scalars(select(Employee).order_by(Employee.id).options(o)).all(),
    "subclass": lambda s, o: s.scalars(select(Manager).options(o)).all(),
    "many_to_one_joined": lambda s, o: [
        (a, a.user)
        for a in s.scalars(
            select(Address).order_by(Address.id).options(o, joinedload(Address.user))
        )
    ],
}


@pytest.mark.parametrize("name", sorted(QUERIES))
def test_hit_equals_database_and_emits_no_sql(env: Any, name: str) -> None:
    query = QUERIES[name]
    with env.Session() as s:
        expected = _plain(query(s, NoCache()))
    with env.Session() as s:
        miss = _plain(query(s, FromCache()))
    assert miss == expected
    assert env.layer.stats()["stores"] == 1
    env.reset()
    with env.Session() as s:
        raw = query(s, FromCache())
        assert env.statements == [], "a hit must not emit SQL"
        assert env.checkouts == [], "a hit must not acquire a database connection"
        hit = _plain(raw)
    assert hit == expected
    if name != "inheritance":
        # everything the query loaded eagerly is there; only the subclass
        # columns of a plain select(Employee) load on access, as uncached
        assert env.statements == [], "eagerly loaded attributes must come from the cache"
    assert env.layer.stats()["hits"] == 1


def test_hit_objects_are_persistent_in_identity_map(env: Any) -> None:
    stmt = select(User).order_by(User.id).options(FromCache())
    with env.Session() as s:
        s.scalars(stmt).all()
    with env.Session() as s:
        users = s.scalars(stmt).all()
        assert env.layer.stats()["hits"] == 1
        for u in users:
            assert u in s
            assert s.get(User, u.id) is u  # identity map, no SQL
            assert getattr(u, "loaded_by_orm", False), "reconstructor / load event must run"
        env.reset()
        first_id = users[0].id
        users[0].name = "renamed"
        s.commit()
        assert any(st.lstrip().upper().startswith("UPDATE") for st in env.statements)
    with env.Session() as s:
        assert (
            s.scalars(select(User).where(User.id == first_id).options(NoCache())).one().name
            == "renamed"
        )


@pytest.mark.parametrize("limit", [3, 10], ids=["few rows", "many rows"])
@pytest.mark.parametrize("eager", [False, True], ids=["plain", "with eager relationship"])
def test_hit_objects_have_their_own_identity_and_values(env: Any, limit: int, eager: bool) -> None:
    """Each object of a hit is the row it was recorded from: identity key,
    column values, identity map; whatever the size of the result (small and
    large results are recorded by different code)."""
    stmt = select(Address).order_by(Address.id.desc()).limit(limit)
    if eager:
        stmt = stmt.options(selectinload(Address.user))
    with env.Session() as s:
        expected = [(a.id, a.email, a.user_id) for a in s.scalars(stmt.options(NoCache()))]
    assert len(expected) == limit
    with env.Session() as s:
        s.scalars(stmt.options(FromCache())).all()
    with env.Session() as s:
        already = s.get(Address, expected[1][0])
        env.reset()
        found = s.scalars(stmt.options(FromCache())).all()
        assert env.statements == []
        assert [(a.id, a.email, a.user_id) for a in found] == expected
        assert found[1] is already
        for a in found:
            assert inspect(a).identity == (a.id,)
            assert s.get(Address, a.id) is a
            if eager:
                assert a.user.id == a.user_id
        assert env.statements == []
    assert env.layer.stats()["hits"] == 1


def test_object_already_in_session_is_the_one_returned(env: Any) -> None:
    stmt = select(User).where(User.id == 2).options(FromCache())
    with env.Session() as s:
        s.scalars(stmt).one()
    with env.Session() as s:
        mine = s.get(User, 2)
        assert s.scalars(stmt).one() is mine


def test_hit_keeps_pending_unflushed_changes(env: Any) -> None:
    stmt = select(User).where(User.id == 2).options(FromCache())
    with env.Session() as s:
        s.scalars(stmt).one()
    with env.Session() as s, s.no_autoflush:
        mine = s.get(User, 2)
        mine.name = "pending"
        got = s.scalars(stmt).one()
        assert got is mine and got.name == "pending"
        s.commit()
    with env.Session() as s:
        assert s.get(User, 2).name == "pending", "the pending change must reach the database"


def test_autoflush_runs_before_a_hit(env: Any) -> None:
    stmt = select(User).where(User.name == "flushed").options(FromCache())
    with env.Session() as s:
        assert s.scalars(stmt).all() == []
    with env.Session() as s:
        s.add(User(id=99, name="flushed"))
        # autoflush writes users: the transaction must read its own write (G2)
        assert [u.id for u in s.scalars(stmt)] == [99]
        s.rollback()
    with env.Session() as s:
        assert s.scalars(stmt).all() == []


def test_expired_object_in_session_is_refreshed_by_hit(env: Any) -> None:
    stmt = select(User).where(User.id == 4).options(FromCache())
    with env.Session() as s:
        s.scalars(stmt).one()
    with env.Session() as s:
        u = s.get(User, 4)
        s.expire(u)
        env.reset()
        got = s.scalars(stmt).one()
        assert got is u
        assert u.name == "user4"
        assert env.statements == []


def test_result_api_one_first_unique_mappings(env: Any) -> None:
    stmt = select(User.id, User.name).where(User.id <= 2).order_by(User.id).options(FromCache())
    with env.Session() as s:
        first = s.execute(stmt).mappings().all()
    with env.Session() as s:
        result = s.execute(stmt)
        assert result.keys() == ["id", "name"]
        rows = result.mappings().all()
        assert rows == first
        assert s.execute(stmt).first() == (1, "user1")
        assert s.execute(stmt).scalars().all() == [1, 2]
    assert env.layer.stats()["hits"] == 3


def test_session_get_cached(env: Any) -> None:
    with env.Session() as s:
        assert s.get(User, 5, options=[FromCache()]).name == "user5"
    env.reset()
    with env.Session() as s:
        assert s.get(User, 5, options=[FromCache()]).name == "user5"
    assert env.statements == []


def test_column_types_survive(env: Any) -> None:
    stmt = (
        select(User.score, func.avg(User.score), func.max(User.name))
        .group_by(User.score)
        .options(FromCache())
    )
    with env.Session() as s:
        expected = s.execute(stmt.options(NoCache())).all()
    with env.Session() as s:
        s.execute(stmt).all()
    with env.Session() as s:
        got = s.execute(stmt).all()
    assert got == expected
    assert [type(v) for v in got[0]] == [type(v) for v in expected[0]]


def test_joined_collection_requires_unique_like_uncached(env: Any) -> None:
    from sqlalchemy.exc import InvalidRequestError

    stmt = select(User).options(joinedload(User.addresses))
    with env.Session() as s, pytest.raises(InvalidRequestError, match="unique"):
        s.scalars(stmt.options(NoCache())).all()
    for _ in range(2):  # a miss, then a hit
        with env.Session() as s:
            with pytest.raises(InvalidRequestError, match="unique"):
                s.scalars(stmt.options(FromCache())).all()
            assert len(s.scalars(stmt.options(FromCache())).unique().all()) == 5
    assert env.layer.stats()["hits"] >= 2


def test_legacy_query_api(env: Any) -> None:
    for _ in range(2):
        with env.Session() as s:
            users = s.query(User).options(FromCache()).filter(User.id < 3).order_by(User.id).all()
            assert [u.name for u in users] == ["user1", "user2"]
    assert env.layer.stats()["hits"] == 1


def test_mutable_values_are_never_shared_between_hits(env: Any) -> None:
    from _models import Doc

    stmt = select(Doc).where(Doc.id == 1).options(FromCache())
    for _ in range(3):
        with env.Session() as s:
            doc = s.scalars(stmt).one()
            assert doc.data == {"tags": ["a"], "n": 1}
            doc.data["tags"].append("mutated in place")  # never flushed
            doc.data["n"] = 99
            s.rollback()
    assert env.layer.stats()["hits"] == 2
