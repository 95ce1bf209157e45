"""Issue-9 class of bugs: deployments where a cache could answer wrong.

Schema-per-tenant, forked workers, read-modify-write units of work, textual
fragments, engines sharing a dialect, two-phase commits, read replicas.
"""

from __future__ import annotations

from typing import Any

from _models import User
from sqlalchemy import select

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
