"""Per-query cache hints: :class:`FromCache`, :class:`RelationshipCache`, :class:`NoCache`.

They are SQLAlchemy ``UserDefinedOption`` objects: they ride on a statement
(``select(User).options(FromCache("default"))``), are invisible to SQLAlchemy's
own statement cache key, and are read by the layer's ``do_orm_execute`` hook.
The signatures are those of SQLAlchemy's ``dogpile_caching`` example, so that
moving from it is an import change.

The same hints exist as execution options, which is the form a whole session
takes (``sessionmaker(engine, execution_options={"cache_region": "default"})``):

``cache_region``
    a region name, or ``None`` to switch caching off for this execution.
``cache_expiration_time``
    seconds an entry may be served for.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm.interfaces import UserDefinedOption

if TYPE_CHECKING:
    from sqlalchemy.orm import ORMExecuteState

__all__ = ["FromCache", "NoCache", "RelationshipCache"]


class _DefaultRegionName(str):
    """The name ``"default"`` as the hints' default argument.

    It compares equal to ``"default"`` (so ``FromCache().region == "default"``,
    as in the recipe), but the layer tells it apart by identity: a hint given no
    region uses the layer's ``default_region``, while ``FromCache("default")``
    names the region called ``default``.
    """

    __slots__ = ()


#: Marks "use the layer's default region" (``cachelayer.default_region``).
DEFAULT_REGION = _DefaultRegionName("default")


def _expiration_and_key(expiration_time: Any, cache_key: Any) -> tuple[float | None, str | None]:
    """Accept both argument orders: the contract's ``(region, expiration_time,
    cache_key)`` and the dogpile_caching example's ``(region, cache_key,
    expiration_time)``, told apart by type, so moving is an import change."""
    if isinstance(expiration_time, str) and not isinstance(cache_key, str):
        expiration_time, cache_key = cache_key, expiration_time
    expiration_time = seconds(expiration_time, "expiration_time")
    if cache_key is not None and not isinstance(cache_key, str):
        raise TypeError(f"cache_key must be a string, got {cache_key!r}")
    return expiration_time, cache_key


def seconds(value: Any, name: str) -> float | None:
    """A number of seconds (``int``, ``float`` or ``timedelta``, as dogpile
    takes them) as a float; ``TypeError`` naming ``name`` for anything else."""
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or a timedelta, got {value!r}")
    return float(value)


class FromCache(UserDefinedOption):
    """Serve this query from a cache region.

    ::

        stmt = select(User).where(User.name == "ed").options(FromCache("default"))
        users = session.scalars(stmt).all()        # a miss: one SELECT, result stored
        users = session.scalars(stmt).all()        # a hit: no SQL, no connection

    :param region: the region name; when not given, the layer's
        ``default_region`` (``cachelayer.default_region``).
    :param expiration_time: seconds an entry may be served for, overriding the
        region's ``expiration_time``. Expiry only bounds an entry's life: the
        entry is invalidated by commits to the tables it read regardless.
    :param cache_key: a string added to the key the layer derives from the
        statement, its bound values and the database, as in SQLAlchemy 2.x's
        dogpile_caching example: it separates entries, it never merges them.
    :param ignore_expiration: serve an entry however old it is (still subject to
        invalidation by commits).
    """

    __slots__ = ("cache_key", "expiration_time", "ignore_expiration", "region")

    propagate_to_loaders = False

    def __init__(
        self,
        region: str = DEFAULT_REGION,
        expiration_time: float | None = None,
        cache_key: str | None = None,
        ignore_expiration: bool = False,
    ) -> None:
        self.payload = None  # UserDefinedOption's, unused
        self.region = region
        if expiration_time is None and cache_key is None:
            self.expiration_time = self.cache_key = None  # the usual case, checked cheaply
        else:
            self.expiration_time, self.cache_key = _expiration_and_key(expiration_time, cache_key)
        self.ignore_expiration = ignore_expiration

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(region={self.region!r}, "
            f"expiration_time={self.expiration_time!r}, cache_key={self.cache_key!r}, "
            f"ignore_expiration={self.ignore_expiration!r})"
        )


class RelationshipCache(UserDefinedOption):
    """Serve the lazy loads of a relationship from a cache region.

    The option propagates to the objects a query loads, so that touching the
    relationship later runs its lazy load through the cache::

        stmt = select(User).options(
            RelationshipCache(User.addresses, "default").and_(
                RelationshipCache(Address.user)
            )
        )
        for user in session.scalars(stmt):
            user.addresses          # lazy load: served from the region after the first time

    Eager loaders (``selectinload`` ...) are cached with their parent query by
    :class:`FromCache` instead.
    """

    __slots__ = (
        "_relationship_options",
        "cache_key",
        "expiration_time",
        "ignore_expiration",
        "region",
    )

    propagate_to_loaders = True

    def __init__(
        self,
        attribute: Any,
        region: str = DEFAULT_REGION,
        expiration_time: float | None = None,
        cache_key: str | None = None,
        ignore_expiration: bool = False,
    ) -> None:
        super().__init__()
        self.region = region
        self.expiration_time, self.cache_key = _expiration_and_key(expiration_time, cache_key)
        self.ignore_expiration = ignore_expiration
        prop = attribute.property
        self._relationship_options: dict[tuple[type[Any], str], RelationshipCache] = {
            (prop.parent.class_, prop.key): self
        }

    def and_(self, option: RelationshipCache) -> RelationshipCache:
        """Chain another relationship's option onto this one; returns ``self``."""
        self._relationship_options.update(option._relationship_options)
        return self

    def for_load(self, orm_execute_state: ORMExecuteState) -> RelationshipCache | None:
        """The option that applies to the lazy load being executed, if any."""
        path = orm_execute_state.loader_strategy_path
        # lazy loads only: an eager loader's query runs inside its parent's and
        # is cached with it (FromCache on the parent)
        if not path or orm_execute_state.lazy_loaded_from is None:
            return None
        mapper, prop = path[-2], path[-1]
        key = getattr(prop, "key", None)
        for cls in mapper.class_.__mro__:  # type: ignore[union-attr]
            found = self._relationship_options.get((cls, key))  # type: ignore[arg-type]
            if found is not None:
                return found
        return None

    def __repr__(self) -> str:
        names = sorted(f"{c.__name__}.{k}" for c, k in self._relationship_options)
        return f"RelationshipCache({', '.join(names)}, region={self.region!r})"


class NoCache(UserDefinedOption):
    """Never serve or store this query through the cache.

    Wins over every default: ``cache_all``, a session-wide ``cache_region``
    execution option and a :class:`FromCache` on the same statement::

        fresh = session.scalars(select(Account).options(NoCache())).all()
    """

    __slots__ = ()

    propagate_to_loaders = False

    def __init__(self) -> None:
        super().__init__()

    def __repr__(self) -> str:
        return "NoCache()"
