"""Every private SQLAlchemy name the package relies on exists on the installed
SQLAlchemy (CI runs this on the lowest version allowed and on the newest)."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy
from _models import Address, Base, User
from sqlalchemy import create_engine, event, inspect, select, update
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import QueryContext, Session, loading, mapperlib
from sqlalchemy.sql.cache_key import CacheKey

from sqla_cachelayer import _compat


def _owners(tmp_path: Any) -> dict[str, Any]:
    engine = create_engine(f"sqlite:///{tmp_path}/compat.db")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(User(id=1, name="a"))
        s.commit()
    session = Session(engine)
    seen: list[Any] = []
    event.listen(session, "do_orm_execute", lambda ctx: seen.append(ctx.execution_options))
    user = session.get(User, 1)
    assert user is not None
    session.expire(user, ["name"])
    assert user.name == "a"  # an expired-attribute load: carries the ORM's load options
    refresh_options = next(o for o in seen if "_sa_orm_load_options" in o)
    result = session.execute(select(User))
    owners = {
        "Select": select(User).where(User.id == 1).with_for_update(),
        "CacheKey": select(User)._generate_cache_key(),
        "load_options": QueryContext.default_load_options,
        "execution_options": refresh_options,
        "Session": session,
        "IdentityMap": session.identity_map,
        "SessionTransaction": session.begin_nested(),
        "Connection": session.connection(),
        "Engine": engine,
        "UpdateDMLState": update(User)
        .where(User.id == Address.user_id)
        .values(name="x")
        .compile(dialect=mysql.dialect())
        .compile_state,
        "orm.mapperlib": mapperlib,
        "orm.loading": loading,
        "Result": result,
        "FrozenResult": session.execute(select(User)).freeze(),
        "InstanceState": inspect(user),
        "Mapper": inspect(User),
    }
    return owners


def test_every_private_name_exists(tmp_path: Any) -> None:
    owners = _owners(tmp_path)
    missing = []
    for owner, name, _why in _compat.PRIVATE_NAMES:
        if owner == "CacheKey" and "params" not in CacheKey._fields:
            continue  # 2.1 only; _compat.cache_key_params answers None on 2.0
        obj = owners[owner]
        found = name in obj if isinstance(obj, dict | sqlalchemy.util.immutabledict) else None
        if found is None:
            found = hasattr(obj, name)
        if not found:
            missing.append(f"{owner}.{name}")
    assert not missing, f"SQLAlchemy {sqlalchemy.__version__} lacks {missing}"
    owners["Session"].close()


def test_compat_helpers_answer_as_the_layer_expects(tmp_path: Any) -> None:
    owners = _owners(tmp_path)
    session = owners["Session"]
    nested = owners["SessionTransaction"]
    root = _compat.root_transaction(session)
    assert root is not None and root is not nested and root._parent is None
    assert nested._parent is root
    assert _compat.is_autocommit_isolation(owners["Connection"]) is False
    assert _compat.new_runid() != _compat.new_runid()
    session.close()
    assert _compat.root_transaction(session) is None
    ck = owners["CacheKey"]
    params = _compat.cache_key_params(ck)
    assert params is None or isinstance(params, dict) or hasattr(params, "keys")


@pytest.mark.parametrize("uid", [1, 2])
def test_params_values_reach_the_key_on_this_version(uid: int) -> None:
    # 2.1 keeps .params() values in CacheKey.params; 2.0 binds them into a copy
    from sqlalchemy import bindparam

    ck = select(User.id).where(User.id == bindparam("u")).params(u=uid)._generate_cache_key()
    assert ck is not None
    bound = [bp.value for bp in ck.bindparams]
    params = _compat.cache_key_params(ck) or {}
    assert uid in bound or params.get("u") == uid


def test_multi_table_update_counts_every_table_as_written() -> None:
    # MySQL's UPDATE users, addresses SET ... writes both tables; the second is
    # only on the compile state, which the tracker must read
    from sqla_cachelayer.tracking import _writes_of

    stmt = (
        update(User).where(User.id == Address.user_id).values({User.name: "x", Address.email: "y"})
    )
    compiled = stmt.compile(dialect=mysql.dialect())
    assert "addresses" in str(compiled).split("SET")[0]
    assert _writes_of(compiled) >= {"users", "addresses"}
