"""Only backend errors open a region's breaker: a fault inside the layer is
logged with its traceback, counted, and the query runs against the database,
while the region keeps serving hits."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

from _models import Base, User
from dogpile.cache import make_region
from dogpile.cache.api import CachedValue
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session, sessionmaker

import sqla_cachelayer as scl


class _Bomb:
    """Unpickles by calling a function that raises: a record whose decoding
    fails with an error that is neither the backend's nor a format change."""

    def __reduce__(self) -> Any:
        return (_explode, ())


def _explode() -> None:
    raise RuntimeError("decoding bug")


def test_a_fault_in_the_layer_does_not_switch_the_region_off(tmp_path: Path, caplog: Any) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/errors.db")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([User(id=1, name="one"), User(id=2, name="two")])
        s.commit()
    region = make_region().configure(
        "sqla_cachelayer.memory",
        arguments={"max_bytes": "1MiB"},  # entries as bytes
    )
    layer = scl.CacheLayer({"default": region})
    factory = layer.install(sessionmaker(engine))

    def name(uid: int) -> str:
        with factory() as s:
            return s.scalars(select(User.name).where(User.id == uid).options(scl.FromCache())).one()

    assert name(1) == "one" and name(2) == "two"  # both stored
    backend = region.backend
    keys = [k for k in backend._lru if ":q:" in k]
    assert len(keys) == 2
    entry = backend.get(keys[0])
    assert isinstance(entry, CachedValue) and isinstance(entry.payload, bytes)
    backend.set(keys[0], CachedValue(pickle.dumps(_Bomb()), entry.metadata))

    with caplog.at_level(logging.ERROR, logger="sqla_cachelayer"):
        answers = [name(1), name(2)]
    stats = layer.stats()
    assert sorted(answers) == ["one", "two"]  # the faulty entry's query from the database
    assert stats["errors"] == 1
    assert stats["breaker_opened"] == 0
    assert stats["hits"] == 1  # the other entry was served: the region stayed on
    assert any(r.exc_info and "decoding bug" in str(r.exc_info[1]) for r in caplog.records), (
        "the error is logged with its traceback"
    )
    assert name(2) == "two" and layer.stats()["hits"] == 2
