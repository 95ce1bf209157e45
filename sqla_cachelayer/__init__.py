"""sqla_cachelayer: a query-result cache for SQLAlchemy ORM sessions.

Results of ORM SELECTs are cached in dogpile.cache regions and invalidated by
table when a commit that wrote those tables returns, in every process sharing
the cache backend. Engines are tuned (SQLite pragmas, BEGIN mode, pool
defaults), and :func:`run_in_transaction` reruns whole units of work on
transient failures.

::

    import sqla_cachelayer as scl

    engine = scl.engine_from_config(settings)
    layer = scl.CacheLayer.from_settings(settings)
    Session = layer.install(sessionmaker(engine))

    with Session() as s:
        users = s.scalars(select(User).options(scl.FromCache("default"))).all()

See ``docs/`` for the settings, the hints, the invalidation protocol and its
guarantees.
"""

from __future__ import annotations

from typing import Any

from .exc import ConfigurationError
from .layer import CacheLayer
from .options import FromCache, NoCache, RelationshipCache

try:  # registers sqla_cachelayer.memory and sqla_cachelayer.sqlite with dogpile
    from . import backends as _backends  # noqa: F401
except Exception:  # pragma: no cover - only while the backends are being built
    pass

__all__ = [
    "CacheLayer",
    "ConfigurationError",
    "FromCache",
    "NoCache",
    "RelationshipCache",
    "engine_from_config",
    "run_in_transaction",
    "run_in_transaction_async",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # the engine half lives in its own modules and is imported on first use
    if name == "engine_from_config":
        from .engine import engine_from_config

        return engine_from_config
    if name in ("run_in_transaction", "run_in_transaction_async"):
        from . import retry

        return getattr(retry, name)
    raise AttributeError(f"module 'sqla_cachelayer' has no attribute {name!r}")
