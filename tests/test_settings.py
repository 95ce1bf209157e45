"""CacheLayer.from_settings: flat settings, coercion, ConfigurationError naming key and value."""

from __future__ import annotations

from typing import Any

import pytest
from _models import Base, User
from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker

from sqla_cachelayer import CacheLayer, ConfigurationError, FromCache


def test_from_settings_builds_regions_and_options(tmp_path: Any) -> None:
    layer = CacheLayer.from_settings(
        {
            "sqlalchemy.url": "sqlite://",  # not ours: ignored
            "cachelayer.regions.default.backend": "dogpile.cache.memory",
            "cachelayer.regions.default.expiration_time": "300",
            "cachelayer.regions.short.backend": "dogpile.cache.memory",
            "cachelayer.regions.short.expiration_time": "5.5",
            "cachelayer.default_region": "short",
            "cachelayer.cache_all": "true",
        }
    )
    assert set(layer.regions) == {"default", "short"}
    assert layer.regions["default"].expiration_time == 300
    assert layer.regions["short"].expiration_time == 5.5
    assert layer.default_region == "short"
    assert layer.cache_all is True
    engine = create_engine(f"sqlite:///{tmp_path}/s.db")
    Base.metadata.create_all(engine)
    Session = layer.install(sessionmaker(engine))
    for _ in range(2):
        with Session() as s:
            s.scalars(select(User)).all()
    assert layer.stats()["hits"] == 1
    assert len(layer.regions["short"].backend._cache) == 1


def test_custom_prefix_and_arguments() -> None:
    layer = CacheLayer.from_settings(
        {
            "app.cache.regions.default.backend": "dogpile.cache.memory",
            "app.cache.regions.default.arguments.cache_size": "100",
        },
        prefix="app.cache.",
    )
    assert set(layer.regions) == {"default"}


def test_defaults_when_nothing_configured() -> None:
    layer = CacheLayer.from_settings({})
    assert set(layer.regions) == {"default"}
    assert layer.default_region == "default" and layer.cache_all is False


def test_stats_keys() -> None:
    stats = CacheLayer.from_settings({}).stats()
    for key in ("hits", "misses", "stores", "bypasses", "invalidations", "errors"):
        assert stats[key] == 0 and isinstance(stats[key], int)


BAD = [
    (
        {"cachelayer.regions.default.backend": "no.such.backend"},
        "cachelayer.regions.default.backend",
        "no.such.backend",
    ),
    ({"cachelayer.regions.default.backend": ""}, "cachelayer.regions.default.backend", ""),
    (
        {
            "cachelayer.regions.default.backend": "dogpile.cache.memory",
            "cachelayer.regions.default.expiration_time": "soon",
        },
        "cachelayer.regions.default.expiration_time",
        "soon",
    ),
    (
        {
            "cachelayer.regions.default.backend": "dogpile.cache.memory",
            "cachelayer.regions.default.expiration_time": "-5",
        },
        "cachelayer.regions.default.expiration_time",
        "-5",
    ),
    (
        {
            "cachelayer.regions.default.backend": "dogpile.cache.memory",
            "cachelayer.default_region": "missing",
        },
        "cachelayer.default_region",
        "missing",
    ),
    (
        {
            "cachelayer.regions.default.backend": "dogpile.cache.memory",
            "cachelayer.cache_all": "maybe",
        },
        "cachelayer.cache_all",
        "maybe",
    ),
    ({"cachelayer.cache_alll": "true"}, "cachelayer.cache_alll", "true"),
    (
        {"cachelayer.regions.default.backnd": "dogpile.cache.memory"},
        "cachelayer.regions.default.backnd",
        "dogpile.cache.memory",
    ),
    ({"cachelayer.regions.default.arguments": "x"}, "cachelayer.regions.default.arguments", "x"),
    ({"cachelayer.breaker_reset_seconds": "later"}, "cachelayer.breaker_reset_seconds", "later"),
]


@pytest.mark.parametrize(
    ("settings", "key", "value"), BAD, ids=[b[1] + "=" + repr(b[2]) for b in BAD]
)
def test_bad_settings_name_key_and_value(settings: dict[str, str], key: str, value: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        CacheLayer.from_settings(settings)
    message = str(info.value)
    assert key in message
    assert repr(value) in message
    assert info.value.key == key


def test_bad_backend_arguments_fail_at_configuration() -> None:
    with pytest.raises(ConfigurationError) as info:
        CacheLayer.from_settings(
            {
                "cachelayer.regions.default.backend": "dogpile.cache.dbm",
                "cachelayer.regions.default.arguments.nonsense": "1",
            }
        )
    assert "cachelayer.regions.default" in str(info.value)


def test_programmatic_validation() -> None:
    from dogpile.cache import make_region

    with pytest.raises(ConfigurationError, match="default_region"):
        CacheLayer({"main": make_region().configure("dogpile.cache.memory")})
    with pytest.raises(ConfigurationError, match="not configured"):
        CacheLayer({"default": make_region()})
    layer = CacheLayer(
        {"main": make_region().configure("dogpile.cache.memory")}, default_region="main"
    )
    assert layer.default_region == "main"


def test_from_cache_default_name_uses_default_region(tmp_path: Any) -> None:
    layer = CacheLayer.from_settings(
        {
            "cachelayer.regions.main.backend": "dogpile.cache.memory",
            "cachelayer.default_region": "main",
        }
    )
    engine = create_engine(f"sqlite:///{tmp_path}/d.db")
    Base.metadata.create_all(engine)
    Session = layer.install(sessionmaker(engine))
    for _ in range(2):
        with Session() as s:
            s.scalars(select(User).options(FromCache())).all()
    assert layer.stats()["hits"] == 1


def test_project_backend_argument_errors_name_the_settings_key() -> None:
    with pytest.raises(ConfigurationError) as info:
        CacheLayer.from_settings(
            {
                "cachelayer.regions.local.backend": "sqla_cachelayer.memory",
                "cachelayer.regions.local.arguments.max_entries": "lots",
                "cachelayer.default_region": "local",
            }
        )
    assert info.value.key == "cachelayer.regions.local.arguments.max_entries"
    assert "'lots'" in str(info.value)


def test_a_misspelt_pragma_names_its_key_and_value() -> None:
    import pytest

    import sqla_cachelayer as scl

    with pytest.raises(scl.ConfigurationError) as err:
        scl.engine_from_config(
            {"sqlalchemy.url": "sqlite:///x.db", "sqlalchemy.pragma.jornal_mode": "WAL"}
        )
    assert err.value.key == "sqlalchemy.pragma.jornal_mode"
    assert err.value.value == "WAL"
    assert "jornal_mode" in str(err.value)
