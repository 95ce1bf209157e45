"""Backend settings errors name the full settings key; a key mangler hides bound
values from a shared Redis's key space and the protocol still works with it."""

from __future__ import annotations

from typing import Any

import pytest
from _models import Address, Base, User
from sqlalchemy import create_engine, select, update
from sqlalchemy.orm import sessionmaker

import sqla_cachelayer as scl
from sqla_cachelayer import FromCache

EMAIL = "alice.secret@example.com"


def test_sqlite_backend_without_path_names_the_full_key() -> None:
    with pytest.raises(scl.ConfigurationError) as info:
        scl.CacheLayer.from_settings(
            {"cachelayer.regions.shared.backend": "sqla_cachelayer.sqlite"}
        )
    assert info.value.key == "cachelayer.regions.shared.arguments.path"
    assert info.value.value is None
    assert str(info.value).startswith("cachelayer.regions.shared.arguments.path")


def test_backend_argument_error_names_the_full_key() -> None:
    """docs/settings.md's example."""
    with pytest.raises(scl.ConfigurationError) as info:
        scl.CacheLayer.from_settings(
            {
                "cachelayer.regions.default.backend": "sqla_cachelayer.memory",
                "cachelayer.regions.default.arguments.max_entries": "lots",
            }
        )
    assert info.value.key == "cachelayer.regions.default.arguments.max_entries"
    assert info.value.value == "lots"


def _setup(tmp_path: Any, region: Any) -> tuple[Any, Any]:
    engine = scl.engine_from_config({"sqlalchemy.url": f"sqlite:///{tmp_path}/db.sqlite"})
    Base.metadata.create_all(engine)
    layer = scl.CacheLayer({"default": region})
    Session = layer.install(sessionmaker(engine))
    with Session() as s:
        s.add(User(id=1, name="alice", addresses=[Address(id=1, email=EMAIL)]))
        s.commit()
    return layer, Session


def _owner(Session: Any) -> str:
    stmt = select(User.name).join(User.addresses).where(Address.email == EMAIL)
    with Session() as s:
        return str(s.execute(stmt.options(FromCache())).scalar_one())


def _redis_keys(url: str) -> list[str]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return [k.decode() for k in client.keys("*")]
    finally:
        client.close()


def _region(url: str, mangler: Any) -> Any:
    from dogpile.cache import make_region

    from sqla_cachelayer.backends.redis import bounded_arguments

    args = bounded_arguments("dogpile.cache.redis", {"url": url})
    return make_region(key_mangler=mangler).configure("dogpile.cache.redis", arguments=args)


def test_bound_values_are_readable_without_a_mangler(tmp_path: Any, redis_db_url: str) -> None:
    _layer, Session = _setup(tmp_path, _region(redis_db_url, None))
    assert _owner(Session) == "alice"
    assert any(EMAIL in k for k in _redis_keys(redis_db_url))


def test_key_mangler_hides_values_and_keeps_the_protocol(tmp_path: Any, redis_db_url: str) -> None:
    from dogpile.cache.util import sha1_mangle_key

    layer, Session = _setup(tmp_path, _region(redis_db_url, sha1_mangle_key))
    assert _owner(Session) == "alice"
    assert _owner(Session) == "alice"
    assert layer.stats()["hits"] == 1
    keys = _redis_keys(redis_db_url)
    assert keys and not any(EMAIL in k or "scl:default:q:" in k for k in keys)
    # counters keep their hash tag (one cluster slot for the Lua bump)
    assert sum(k.startswith("{scl:default}") for k in keys) >= 2
    with Session() as s:  # a commit through the layer invalidates the entry
        s.get(User, 1).name = "alice2"
        s.commit()
    assert _owner(Session) == "alice2"
    assert _owner(Session) == "alice2"
    assert layer.stats()["hits"] == 2
    # a write this layer does not see, invalidated by another layer (another
    # process) that shares the backend and the mangler
    plain = create_engine(f"sqlite:///{tmp_path}/db.sqlite")
    with plain.begin() as conn:
        conn.execute(update(User).values(name="alice3"))
    plain.dispose()
    assert _owner(Session) == "alice2"  # served from the cache: nothing told it
    other = scl.CacheLayer({"default": _region(redis_db_url, sha1_mangle_key)})
    other.invalidate(User)
    assert _owner(Session) == "alice3"


def test_key_mangler_from_settings(tmp_path: Any, redis_db_url: str) -> None:
    built = scl.CacheLayer.from_settings(
        {
            "cachelayer.regions.default.backend": "sqla_cachelayer.redis",
            "cachelayer.regions.default.arguments.url": redis_db_url,
            "cachelayer.regions.default.arguments.key_mangler": "sha1",
        }
    )
    layer, Session = _setup(tmp_path, built.regions["default"])
    assert _owner(Session) == "alice"
    assert _owner(Session) == "alice"
    assert layer.stats()["hits"] == 1
    keys = _redis_keys(redis_db_url)
    assert keys and not any(EMAIL in k for k in keys)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("key_manglr", "sha1"),
        ("key_mangler", "md5"),
        ("socket_timeout", "soon"),
        ("max_connections", "0"),
        ("max_connections", "many"),
    ],
)
def test_redis_backend_refuses_bad_arguments(name: str, value: str) -> None:
    pytest.importorskip("redis")
    with pytest.raises(scl.ConfigurationError) as info:
        scl.CacheLayer.from_settings(
            {
                "cachelayer.regions.default.backend": "sqla_cachelayer.redis",
                f"cachelayer.regions.default.arguments.{name}": value,
            }
        )
    assert info.value.key == f"cachelayer.regions.default.arguments.{name}"
    assert info.value.value == value
