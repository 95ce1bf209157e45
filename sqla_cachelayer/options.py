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

from sqlalchemy.orm import RelationshipProperty
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


def _hint_arguments(
    kind: str, args: tuple[Any, ...], kw: dict[str, Any]
) -> tuple[str, float | None, str | None, bool]:
    """``(region, expiration_time, cache_key, ignore_expiration)`` from a hint's
    arguments, checked.

    Positionally, both orders are accepted: the contract's ``(region,
    expiration_time, cache_key)`` and the dogpile_caching example's ``(region,
    cache_key, expiration_time)``, told apart by type (a string in second place
    is the example's ``cache_key``), so moving from it is an import change. By
    keyword, a name means what it says: ``expiration_time="5m"`` is an error.
    """
    if len(args) > 4:
        raise TypeError(f"{kind}() takes at most 4 positional arguments ({len(args)} given)")
    names = ("region", "expiration_time", "cache_key", "ignore_expiration")
    given = dict(zip(names, args, strict=False))
    for name, value in kw.items():
        if name not in names:
            raise TypeError(f"{kind}() got an unexpected keyword argument {name!r}")
        if name in given:
            raise TypeError(f"{kind}() got multiple values for argument {name!r}")
        given[name] = value
    region = given.get("region", DEFAULT_REGION)
    if not isinstance(region, str):
        raise TypeError(f"{kind}(): region must be a region name (a string), got {region!r}")
    expiration_time = given.get("expiration_time")
    cache_key = given.get("cache_key")
    if (
        len(args) >= 2
        and isinstance(expiration_time, str)
        and "cache_key" not in kw
        and not isinstance(cache_key, str)
    ):
        expiration_time, cache_key = cache_key, expiration_time  # the example's order
    expiration = seconds(expiration_time, "expiration_time")
    if cache_key is not None and not isinstance(cache_key, str):
        raise TypeError(f"{kind}(): cache_key must be a string, got {cache_key!r}")
    return region, expiration, cache_key, bool(given.get("ignore_expiration", False))


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


class _Option(UserDefinedOption):
    __slots__ = ()

    def _clone(self, **kw: Any) -> Any:
        # SQLAlchemy 2.0's Select.params() clones a statement's options with
        # ExecutableOption._clone, which copies __dict__, and these options
        # have slots. They are never changed once built (RelationshipCache's
        # and_() only adds to the dict a copy would share), so the option
        # itself serves as its copy.
        return self


class FromCache(_Option):
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

    region: str
    expiration_time: float | None
    cache_key: str | None
    ignore_expiration: bool

    __slots__ = ("cache_key", "expiration_time", "ignore_expiration", "region")

    propagate_to_loaders = False

    if TYPE_CHECKING:

        def __init__(
            self,
            region: str = DEFAULT_REGION,
            expiration_time: float | datetime.timedelta | None = None,
            cache_key: str | None = None,
            ignore_expiration: bool = False,
        ) -> None: ...

    else:

        def __init__(self, *args, **kw):
            # *args: the example's positional order is accepted, never by keyword
            self.payload = None  # UserDefinedOption's, unused
            if not args and not kw:  # FromCache(): the usual case, nothing to check
                self.region = DEFAULT_REGION
                self.expiration_time = self.cache_key = None
                self.ignore_expiration = False
                return
            (
                self.region,
                self.expiration_time,
                self.cache_key,
                self.ignore_expiration,
            ) = _hint_arguments("FromCache", args, kw)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(region={self.region!r}, "
            f"expiration_time={self.expiration_time!r}, cache_key={self.cache_key!r}, "
            f"ignore_expiration={self.ignore_expiration!r})"
        )


class RelationshipCache(_Option):
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

    _relationship_options: dict[tuple[type[Any], str], RelationshipCache]
    region: str
    expiration_time: float | None
    cache_key: str | None
    ignore_expiration: bool

    __slots__ = (
        "_relationship_options",
        "cache_key",
        "expiration_time",
        "ignore_expiration",
        "region",
    )

    propagate_to_loaders = True

    if TYPE_CHECKING:

        def __init__(
            self,
            attribute: Any,
            region: str = DEFAULT_REGION,
            expiration_time: float | datetime.timedelta | None = None,
            cache_key: str | None = None,
            ignore_expiration: bool = False,
        ) -> None: ...

    else:

        def __init__(self, attribute, *args, **kw):
            super().__init__()
            (
                self.region,
                self.expiration_time,
                self.cache_key,
                self.ignore_expiration,
            ) = _hint_arguments("RelationshipCache", args, kw)
            prop = getattr(attribute, "property", None)
            if not isinstance(prop, RelationshipProperty):
                raise TypeError(
                    "RelationshipCache() takes a relationship attribute such as "
                    f"User.addresses, got {attribute!r}"
                )
            self._relationship_options = {(prop.parent.class_, prop.key): self}

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


class NoCache(_Option):
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


def _contract_signatures() -> None:
    # inspect.signature() shows the documented parameters, not *args/**kw
    import inspect

    for cls, first in ((FromCache, []), (RelationshipCache, ["attribute"])):
        params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in first]
        for name, default in (
            ("region", "default"),
            ("expiration_time", None),
            ("cache_key", None),
            ("ignore_expiration", False),
        ):
            params.append(
                inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
            )
        setattr(cls.__init__, "__signature__", inspect.Signature(params))  # noqa: B010


_contract_signatures()
