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

# importing the backends registers sqla_cachelayer.memory and sqla_cachelayer.sqlite
from . import backends as _backends  # noqa: F401
from .engine import async_engine_from_config, engine_from_config
from .exc import ConfigurationError
from .layer import CacheLayer
from .options import FromCache, NoCache, RelationshipCache
from .retry import RetryStats, retry_stats, run_in_transaction, run_in_transaction_async

__all__ = [
    "CacheLayer",
    "ConfigurationError",
    "FromCache",
    "NoCache",
    "RelationshipCache",
    "RetryStats",
    "async_engine_from_config",
    "engine_from_config",
    "retry_stats",
    "run_in_transaction",
    "run_in_transaction_async",
]

__version__ = "0.1.0"
