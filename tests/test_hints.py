"""FromCache, RelationshipCache, NoCache, execution options and cache_all."""

from __future__ import annotations

from typing import Any

import pytest
from _models import Address, User
from dogpile.cache import make_region
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from sqla_cachelayer import FromCache, NoCache, RelationshipCache
from sqla_cachelayer._compat import SESSION_EXECUTION_OPTIONS

# the core behaviour: with Session and with AsyncSession alike (conftest.py)
pytestmark = pytest.mark.both_sessions


def _run_twice(Session: Any, stmt: Any) -> None:
    for _ in range(2):
        with Session() as s:
            s.execute(stmt).all()


def test_from_cache_named_region(make_env: Any) -> None:
    regions = {
        "default": make_region().configure("dogpile.cache.memory"),
        "long": make_region().configure("dogpile.cache.memory"),
    }
    env = make_env(region=regions)
    _run_twice(env.Session, select(User.id).options(FromCache("long")))
    assert len(regions["long"].backend._cache) == 1
    assert len(regions["default"].backend._cache) == 0
    assert env.layer.stats()["hits"] == 1


def test_no_hint_no_cache(env: Any) -> None:
    _run_twice(env.Session, select(User.id))
    assert env.layer.stats()["hits"] == 0 and env.layer.stats()["misses"] == 0


@pytest.mark.skipif(
    not SESSION_EXECUTION_OPTIONS, reason="Session(execution_options=...) arrived in SQLAlchemy 2.1"
)
def test_session_wide_execution_option(env: Any) -> None:
    Session = env.layer.install(
        sessionmaker(env.engine, execution_options={"cache_region": "default"})
    )
    _run_twice(Session, select(User.id))
    assert env.layer.stats()["hits"] == 1
    _run_twice(Session, select(User.name).options(NoCache()))
    assert env.layer.stats()["hits"] == 1, "NoCache wins over the session default"
    _run_twice(Session, select(User.score).execution_options(cache_region=None))
    assert env.layer.stats()["hits"] == 1, "cache_region=None switches the default off"


def test_statement_execution_options(env: Any) -> None:
    stmt = select(User.id).execution_options(cache_region="default", cache_expiration_time=0)
    _run_twice(env.Session, stmt)
    assert env.layer.stats()["hits"] == 0, "cache_expiration_time=0 serves nothing twice"
    stmt = select(User.id).execution_options(cache_region="default", cache_expiration_time=60)
    _run_twice(env.Session, stmt)
    # the entry the second run above stored is young enough for a 60 s reader
    assert env.layer.stats()["hits"] == 2


def test_expiration_as_a_timedelta(env: Any) -> None:
    import datetime

    minute = datetime.timedelta(minutes=1)
    assert FromCache("default", minute).expiration_time == 60
    stmt = select(User.id).execution_options(cache_region="default", cache_expiration_time=minute)
    _run_twice(env.Session, stmt)
    assert env.layer.stats()["hits"] == 1
    stmt = select(User.id).execution_options(
        cache_region="default", cache_expiration_time=datetime.timedelta(0)
    )
    _run_twice(env.Session, stmt)
    assert env.layer.stats()["hits"] == 1, "a zero timedelta serves nothing"


def test_a_bad_expiration_execution_option_names_itself(env: Any) -> None:
    import pytest

    stmt = select(User.id).execution_options(cache_region="default", cache_expiration_time="soon")
    with env.Session() as s, pytest.raises(TypeError, match="cache_expiration_time"):
        s.execute(stmt)


def test_cache_all(make_env: Any) -> None:
    env = make_env(cache_all=True)
    _run_twice(env.Session, select(User.id))
    assert env.layer.stats()["hits"] == 1
    _run_twice(env.Session, select(User.name).options(NoCache()))
    assert env.layer.stats()["hits"] == 1
    with env.Session() as s:
        s.get(User, 1)
    env.reset()
    with env.Session() as s:
        assert s.get(User, 1).name == "user1"
    assert env.statements == []


def test_no_cache_wins_over_from_cache(env: Any) -> None:
    _run_twice(env.Session, select(User.id).options(FromCache(), NoCache()))
    assert env.layer.stats()["hits"] == 0


def test_for_update_and_populate_existing_bypass(env: Any) -> None:
    _run_twice(env.Session, select(User.id).with_for_update().options(FromCache()))
    _run_twice(
        env.Session, select(User).options(FromCache()).execution_options(populate_existing=True)
    )
    stats = env.layer.stats()
    assert stats["hits"] == 0 and stats["bypasses"] == 4


def test_relationship_cache_serves_lazy_loads(env: Any) -> None:
    opt = RelationshipCache(User.addresses).and_(RelationshipCache(Address.user))

    def emails() -> list[str]:
        with env.Session() as s:
            user = s.scalars(select(User).where(User.id == 2).options(opt)).one()
            return [a.email for a in user.addresses]

    assert emails() == ["u2-0@x.org", "u2-1@x.org"]
    env.reset()
    assert emails() == ["u2-0@x.org", "u2-1@x.org"]
    # the parent query ran; the lazy load did not
    assert len(env.statements) == 1 and "addresses" not in env.statements[0]
    with env.Session() as s:
        s.get(Address, 20).email = "lazy@x"
        s.commit()
    assert emails() == ["lazy@x", "u2-1@x.org"]


def test_relationship_cache_on_cached_parent(env: Any) -> None:
    opt = RelationshipCache(User.addresses)

    def emails() -> list[str]:
        with env.Session() as s:
            user = s.scalars(select(User).where(User.id == 3).options(FromCache(), opt)).one()
            return [a.email for a in user.addresses]

    assert emails() == ["u3-0@x.org", "u3-1@x.org"]
    env.reset()
    assert emails() == ["u3-0@x.org", "u3-1@x.org"]
    assert env.statements == [], "parent from cache, and its lazy load through RelationshipCache"


def test_unknown_region_in_hint_is_not_an_error(env: Any) -> None:
    # a hint for a region this layer does not own is left to whoever owns it
    _run_twice(env.Session, select(User.id).options(FromCache("elsewhere")))
    assert env.layer.stats()["misses"] == 0


def test_uninstall(env: Any) -> None:
    env.layer.uninstall(env.Session)
    _run_twice(env.Session, select(User.id).options(FromCache()))
    assert env.layer.stats()["misses"] == 0
    env.layer.install(env.Session)
    env.layer.install(env.Session)  # idempotent
    _run_twice(env.Session, select(User.id).options(FromCache()))
    assert env.layer.stats()["hits"] == 1 and env.layer.stats()["misses"] == 1


def test_install_targets(env: Any) -> None:
    from sqlalchemy.orm import Session, scoped_session

    stmt = select(User.id).options(FromCache())
    scoped = env.layer.install(scoped_session(sessionmaker(env.engine)))
    for _ in range(2):
        scoped.execute(stmt).all()
        scoped.remove()
    assert env.layer.stats()["hits"] == 1

    class MySession(Session):
        pass

    assert env.layer.install(MySession) is MySession
    for _ in range(2):
        with MySession(env.engine) as s:
            s.execute(stmt).all()
    assert env.layer.stats()["hits"] == 3  # the entry is shared: both are hits

    one = Session(env.engine)
    env.layer.install(one)
    one.execute(stmt).all()
    one.close()
    with Session(env.engine) as plain:
        plain.execute(stmt).all()  # not installed: no hit counted
    assert env.layer.stats()["hits"] == 4
    env.layer.uninstall(MySession)
    with MySession(env.engine) as s:
        s.execute(stmt).all()
    assert env.layer.stats()["hits"] == 4


def test_install_rejects_other_objects(env: Any) -> None:
    import pytest

    with pytest.raises(TypeError, match="sessionmaker"):
        env.layer.install(object())


def test_both_argument_orders_of_the_recipe_and_the_contract(env: Any) -> None:
    contract = FromCache("default", 60, "k1")
    recipe = FromCache("default", "k1", 60)
    assert (contract.expiration_time, contract.cache_key) == (60, "k1")
    assert (recipe.expiration_time, recipe.cache_key) == (60, "k1")
    rel = RelationshipCache(User.addresses, "default", "k2")
    assert rel.cache_key == "k2" and rel.expiration_time is None
    import pytest

    with pytest.raises(TypeError, match="expiration_time"):
        FromCache("default", expiration_time=[1])


def test_default_region_setting_wins_over_a_region_named_default(make_env: Any) -> None:
    regions = {
        "default": make_region().configure("dogpile.cache.memory"),
        "local": make_region().configure("dogpile.cache.memory"),
    }
    env = make_env(region=regions, default_region="local")
    _run_twice(env.Session, select(User.id).options(FromCache()))
    assert len(regions["local"].backend._cache) == 1
    assert len(regions["default"].backend._cache) == 0
    _run_twice(env.Session, select(User.name).options(FromCache("default")))
    assert len(regions["default"].backend._cache) == 1


def test_relationship_cache_leaves_eager_loads_alone(env: Any) -> None:
    from sqlalchemy.orm import selectinload

    stmt = select(User).options(RelationshipCache(User.addresses), selectinload(User.addresses))
    with env.Session() as s:
        assert len(s.scalars(stmt).all()) == 5
    stats = env.layer.stats()
    assert stats["misses"] == 0 and stats["not_stored"] == 0


# ---------------------------------------------------------------------------
# arguments that would have been taken wrongly


def test_a_keyword_means_what_it_says() -> None:
    import datetime

    import pytest

    from sqla_cachelayer import FromCache

    with pytest.raises(TypeError, match="expiration_time"):
        FromCache(expiration_time="5m")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expiration_time"):
        FromCache("default", expiration_time="5m")  # type: ignore[arg-type]
    # the dogpile_caching example's positional order still works
    hint = FromCache("default", "per-tenant", 30)  # type: ignore[arg-type]
    assert (hint.cache_key, hint.expiration_time) == ("per-tenant", 30.0)
    hint = FromCache("default", cache_key="k", expiration_time=datetime.timedelta(minutes=5))
    assert (hint.cache_key, hint.expiration_time) == ("k", 300.0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        FromCache(expiry=5)  # type: ignore[call-arg]


def test_a_class_as_region_or_a_column_as_relationship_raises_at_once() -> None:
    import pytest
    from _models import User

    from sqla_cachelayer import FromCache, RelationshipCache

    with pytest.raises(TypeError, match="region must be"):
        FromCache(User)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="relationship attribute"):
        RelationshipCache(User.name)
    with pytest.raises(TypeError, match="region must be"):
        RelationshipCache(User.addresses, User)  # type: ignore[arg-type]


def test_unknown_region_runs_uncached_warned_once_and_counted(make_env: Any, caplog: Any) -> None:
    import logging

    from _models import User
    from sqlalchemy import select

    from sqla_cachelayer import FromCache

    env = make_env()
    stmt = select(User).where(User.id == 1).options(FromCache("defualt"))
    with caplog.at_level(logging.WARNING, logger="sqla_cachelayer"):
        for _ in range(3):
            with env.Session() as s:
                s.scalars(stmt).one()
    assert env.sql_count() == 3
    assert env.layer.stats()["bypasses"] == 3
    warned = [r for r in caplog.records if "defualt" in r.getMessage()]
    assert len(warned) == 1
    with env.Session() as s:
        s.scalars(
            select(User).where(User.id == 1), execution_options={"cache_region": "nosuch"}
        ).one()
    assert env.layer.stats()["bypasses"] == 4


@pytest.mark.skipif(
    not SESSION_EXECUTION_OPTIONS, reason="Session(execution_options=...) arrived in SQLAlchemy 2.1"
)
def test_session_wide_unknown_region_fails_at_install(make_env: Any) -> None:
    import pytest
    from sqlalchemy.orm import Session, sessionmaker

    from sqla_cachelayer import ConfigurationError

    env = make_env()
    with pytest.raises(ConfigurationError) as err:
        env.layer.install(sessionmaker(env.engine, execution_options={"cache_region": "nosuch"}))
    assert err.value.key == "cache_region" and err.value.value == "nosuch"
    assert "nosuch" in str(err.value)
    with pytest.raises(ConfigurationError):
        env.layer.install(Session(env.engine, execution_options={"cache_region": "nosuch"}))
    # a known region, and None (the opt-out), are fine
    env.layer.install(sessionmaker(env.engine, execution_options={"cache_region": "default"}))
    env.layer.install(sessionmaker(env.engine, execution_options={"cache_region": None}))
