"""Signed values: a backend an attacker can write to cannot make the layer unpickle."""

from __future__ import annotations

import os
import pickle
from typing import Any

import pytest
from _models import User
from dogpile.cache import make_region
from dogpile.cache.api import CachedValue
from sqlalchemy import select

from sqla_cachelayer import CacheLayer, ConfigurationError, FromCache

STMT = select(User.name).where(User.id == 1).options(FromCache())


class Exploit:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


def test_tampered_entry_is_never_unpickled(make_env: Any, tmp_path: Any) -> None:
    region = make_region().configure("dogpile.cache.memory")
    env = make_env(region=region, signing_key="k" * 32)
    for _ in range(2):
        with env.Session() as s:
            assert s.execute(STMT).scalar_one() == "user1"
    assert env.layer.stats()["hits"] == 1
    marker = tmp_path / "pwned"
    entries = [k for k, v in region.backend._cache.items() if ":q:" in k]
    assert len(entries) == 1
    forged = pickle.dumps(Exploit(str(marker)))
    region.backend._cache[entries[0]] = CachedValue(b"\0" * 32 + forged, {})
    with env.Session() as s:
        assert s.execute(STMT).scalar_one() == "user1"
    assert not os.path.exists(marker), "a forged value was unpickled"
    assert env.layer.stats()["errors"] >= 1


def test_signed_values_round_trip_between_layers(make_env: Any) -> None:
    region = make_region().configure("dogpile.cache.memory")
    env = make_env(region=region, signing_key="s" * 20)
    with env.Session() as s:
        s.execute(STMT).all()
    other = CacheLayer({"default": region}, signing_key="s" * 20)
    other.install(env.Session)
    env.layer.uninstall(env.Session)
    with env.Session() as s:
        assert s.execute(STMT).scalar_one() == "user1"
    assert other.stats()["hits"] == 1


def test_short_signing_key_is_refused() -> None:
    with pytest.raises(ConfigurationError) as info:
        CacheLayer.from_settings({"cachelayer.signing_key": "short"})
    assert "cachelayer.signing_key" in str(info.value) and "short" not in str(info.value)
